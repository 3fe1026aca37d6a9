"""Keep the adapter state with the best validation metric, in memory (adapter tensors only)."""

from __future__ import annotations

import lightning as L
import torch

from comol.adapters import adapter_state_dict
from comol.errors import ConfigError


class BestAdapterKeeper(L.Callback):
    """After each validation, copy the adapter tensors when ``monitor`` improves; ``restore`` puts
    the best copy back (docs/methods.md §5: the 5-epoch code runs keep the epoch with the lowest val loss)."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ConfigError(f"select_best mode={mode!r} is invalid: expected min or max")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_step = value, trainer.global_step
            self.state = {k: v.clone() for k, v in adapter_state_dict(pl_module.model).items()}

    def restore(self, model: torch.nn.Module) -> bool:
        """Load the best adapter tensors into ``model``; False when no validation ever ran."""
        if self.state is None:
            return False
        model.load_state_dict(self.state, strict=False)
        return True
