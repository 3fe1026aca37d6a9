"""The Trainer's callbacks, built from the ``callbacks`` config group (comol/conf/callbacks/default.yaml).

Each entry of that node is instantiated by Hydra in order; an entry set to null is dropped, and a factory
below may return None (a feature that is off). The job looks callbacks it needs afterwards up by type
(the best-adapter keeper, the divergence guard). A run adds or replaces callbacks with
``callbacks=<preset>`` or ``+callbacks.<name>={_target_: ...}``.
"""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
from hydra.utils import instantiate

from comol.training.best_adapter import BestAdapterKeeper
from comol.training.checkpointing import RunCheckpoint, auto_every_n_steps
from comol.training.progress import StepProgressBar, on_terminal


def step_progress_bar(enabled: bool) -> StepProgressBar | None:
    """The step-counting bar on a terminal; None when off or output is redirected (progress lines instead)."""
    return StepProgressBar() if enabled and on_terminal() else None


def best_adapter(monitor: str | None, mode: str = "min") -> BestAdapterKeeper | None:
    """``select_best=<metric>``: keep the adapter of the best validation; None when select_best is null."""
    return BestAdapterKeeper(monitor, mode) if monitor else None


def run_checkpoint(out_dir: str, every_n_steps: Any, max_steps: int | None, run_config: Mapping[str, Any]) -> RunCheckpoint:
    """The resumable checkpoint; ``every_n_steps: auto`` is a tenth of max_steps, at most 200."""
    every = auto_every_n_steps({"max_steps": max_steps}) if every_n_steps in ("auto", None) else int(every_n_steps)
    return RunCheckpoint(out_dir, every, dict(run_config))


def build_callbacks(node: Mapping[str, Any] | None, **runtime: Any) -> list[L.Callback]:
    """Instantiate every entry of the ``callbacks`` node. ``runtime``: ``<entry>={arg: value}`` arguments only
    the job holds (e.g. the resolved config a checkpoint records)."""
    out = []
    for name, spec in (node or {}).items():
        if spec is None:
            continue
        cb = instantiate(spec, _partial_=True)(**runtime.get(name, {}))  # runtime values bypass Hydra
        if cb is not None:
            out.append(cb)
    return out


#: keys of the ``trainer`` group that are comol's, not ``lightning.Trainer`` arguments (``compile``: AdapterLM;
#: ``reuse_host_memory``: the job, comol/training/host_memory.py)
COMOL_TRAINER_KEYS = ("compile", "reuse_host_memory")


def lightning_trainer_node(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """The ``trainer`` node as ``lightning.Trainer`` takes it: comol's own keys (``COMOL_TRAINER_KEYS``) left out."""
    return {k: v for k, v in trainer.items() if k not in COMOL_TRAINER_KEYS}
