"""HumanEval samples files: the rows a run writes (``<set>.samples.jsonl``), reading them back,
and scoring them in the sandbox (``eval/code/<set>/pass@k`` and ``.../confined``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from comol.errors import DataError
from comol.eval.code.confinement import ConfinementUnavailable, confinement_problem
from comol.eval.code.humaneval import evaluate_humaneval

log = logging.getLogger(__name__)

SAMPLE_KEYS = ("task_id", "prompt", "test", "entry_point", "completions")
SAMPLES_SUFFIX = ".samples.jsonl"


def check_confinement(allow_unconfined: bool, how_to_allow: str = "eval.allow_unconfined=true") -> bool:
    """True when runs will be confined; False (with a warning) when confinement is missing
    but explicitly allowed; raises :class:`ConfinementUnavailable` (one sentence) otherwise."""
    problem = confinement_problem()
    if problem is None:
        return True
    if not allow_unconfined:
        raise ConfinementUnavailable(
            f"refusing to execute generated code without OS confinement: {problem}, or allow "
            f"unconfined execution explicitly with {how_to_allow}")
    log.warning("EXECUTING GENERATED CODE WITHOUT OS CONFINEMENT (%s): %s", how_to_allow, problem)
    return False


def sample_rows(problems: Sequence[dict], completions: dict[str, list[str]]) -> list[dict]:
    """Self-contained samples: everything needed to score them without the dataset."""
    return [{"task_id": p["task_id"], "prompt": p["prompt"], "test": p["test"],
             "entry_point": p["entry_point"], "completions": list(completions[p["task_id"]])}
            for p in problems]


def read_samples(path: str | Path) -> list[dict]:
    """Rows of a samples file; a one-line :class:`DataError` names the file, row and key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: samples file does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
        missing = [k for k in SAMPLE_KEYS if k not in row] if isinstance(row, dict) else list(SAMPLE_KEYS)
        if missing:
            raise DataError(f"{path}:{i}: missing {', '.join(missing)} (expected keys {', '.join(SAMPLE_KEYS)})")
        if not isinstance(row["completions"], list) or not row["completions"] or \
                not all(isinstance(c, str) for c in row["completions"]):
            raise DataError(f"{path}:{i}: completions must be a non-empty list of strings")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no samples")
    ids = [r["task_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: task_id repeated")
    return rows


def score_samples(samples: Sequence[dict], set_name: str, *, ks: Sequence[int] = (1, 5, 10),
                  workers: int = 4, timeout: float = 3.0, memory_mb: int = 1024,
                  allow_unconfined: bool = False, how_to_allow: str = "eval.allow_unconfined=true",
                  progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Execute the samples; returns (metrics ``eval/code/<set>/...``, scored prediction rows)."""
    confined = check_confinement(allow_unconfined, how_to_allow)
    completions = {s["task_id"]: list(s["completions"]) for s in samples}
    scored = evaluate_humaneval(samples, completions, ks=ks, workers=workers, timeout=timeout,
                                progress=progress, memory_mb=memory_mb, confine=confined)
    per_problem = {r["task_id"]: r for r in scored["per_problem"]}
    records = [{"task_id": s["task_id"], "completions": completions[s["task_id"]],
                "n": per_problem[s["task_id"]]["n"], "c": per_problem[s["task_id"]]["c"],
                "statuses": per_problem[s["task_id"]]["statuses"]} for s in samples]
    metrics = {f"eval/code/{set_name}/{k}": v for k, v in scored["pass@k"].items()}
    metrics[f"eval/code/{set_name}/confined"] = 1.0 if confined else 0.0
    log.info("eval code/%s: %s (%s)", set_name, scored["pass@k"],
             "confined" if confined else "UNCONFINED")
    return metrics, records


def set_name_of(path: Path) -> str:
    name = path.name
    return name[: -len(SAMPLES_SUFFIX)] if name.endswith(SAMPLES_SUFFIX) else path.stem
