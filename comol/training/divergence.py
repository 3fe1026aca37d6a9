"""Divergence guard: a non-finite loss or gradient stops the run (policy ``stop``) or skips that optimizer
step (policy ``skip``: the adapter tensors and optimizer moments stay as they were)."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from comol.errors import ComolError

log = logging.getLogger(__name__)


class DivergenceError(ComolError):
    """Training produced a non-finite loss, gradient or adapter tensor."""


def advice(lr) -> str:
    return (f"try a lower optim.lr (now {lr}), more optim.warmup_steps, trainer.gradient_clip_val, "
            "trainer.precision=32-true, or divergence.policy=skip to skip such steps")


def nonfinite_tensors(named) -> list[str]:
    return [name for name, t in named if t is not None and not bool(torch.isfinite(t).all())]


class DivergenceGuard(L.Callback):
    def __init__(self, policy: str, max_skips: int, lr=None):
        """``policy`` and ``max_skips``: the checked ``divergence`` group (comol/schema_groups.py)."""
        self.policy, self.max_skips, self.lr = policy, int(max_skips), lr
        self.skipped = 0
        self._bad_loss: float | None = None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def _fail(self, step: int, what: str) -> None:
        raise DivergenceError(f"training diverged at step {step}: {what}; {advice(self.lr)}")

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if math.isfinite(value):
            return
        if self.policy == "stop":
            self._fail(trainer.global_step + 1, f"loss={value}")
        self._bad_loss = value

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # with fp16 AMP the grad scaler skips inf steps itself (and lowers its scale): leave those to it
        if "16-mixed" in str(trainer.precision) and "bf16" not in str(trainer.precision):
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        bad = [i for i, p in enumerate(params) if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if not bad and self._bad_loss is None:
            return
        step = trainer.global_step + 1
        what = f"loss={self._bad_loss}" if self._bad_loss is not None else f"non-finite gradient in {len(bad)} tensors"
        self._bad_loss = None
        if self.policy == "stop":
            self._fail(step, what)
        self.skipped += 1
        if self.skipped > self.max_skips:
            self._fail(step, f"{what}, and {self.max_skips} steps were skipped already (divergence.max_skips)")
        log.warning("step %d skipped (%s); %d skipped so far", step, what, self.skipped)
        for p in params:   # AdamW leaves parameters without a gradient untouched (no moment or decay update)
            p.grad = None
