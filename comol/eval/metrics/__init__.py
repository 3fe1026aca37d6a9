"""Local `evaluate` metric modules, loadable offline.

``load_metric("math_accuracy", config_name="gsm8k")`` and ``load_metric("code_pass_at_k")``
return ``evaluate.EvaluationModule`` objects built from the folders next to this file; no
network access is needed (a local folder path never reaches the Hugging Face Hub). The plain
functions of :mod:`comol.eval.math_scoring` and :mod:`comol.eval.code.sandbox` compute the same
numbers and are what the pipeline calls directly.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE = ("math_accuracy", "code_pass_at_k")


def metric_path(name: str) -> Path:
    """Folder of the local metric ``name``."""
    if name not in AVAILABLE:
        raise ValueError(f"unknown metric {name!r}: available metrics are {', '.join(AVAILABLE)}")
    return METRICS_DIR / name


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of a local metric folder (extra kwargs, e.g. config_name, pass through)."""
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)
