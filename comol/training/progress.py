"""What a training run shows a person.

* On a terminal: a progress bar that counts optimizer steps (not ``Epoch 3/-2``).
* Always, in the job's log (``<run dir>/train.log``): one progress line at most every
  ``progress_interval_s`` seconds and at the last step::

      step 120/1000 (12%) | loss 2.3141 | lr 2.00e-03 | 5,230 tok/s | elapsed 1m02s | eta 7m38s

  With output redirected (nohup, SLURM, CI) the bar is off and these lines go to the console too;
  on a terminal they go to the log file only, under the bar.
* Third-party chatter a researcher does not read is silenced (``quiet_libraries``): Lightning's
  GPU/TPU/tip lines, a deprecation warning from Lightning's pytree helper, W&B's banners and
  its end-of-run summary (the run's W&B folder is logged by the pipeline in one line instead).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from comol.data.packing import real_tokens

log = logging.getLogger("comol.progress")


def on_terminal() -> bool:
    return sys.stderr.isatty() and sys.stdout.isatty()


def quiet_libraries() -> None:
    """Silence what every job would otherwise repeat (called once per job, before the Trainer)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    os.environ.setdefault("WANDB_SILENT", "true")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class StepProgressBar(RichProgressBar):
    """Rich bar whose label counts optimizer steps against ``max_steps``."""

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's label hook
        total = self.trainer.max_steps
        return f"train ({total} steps)" if total and total > 0 else f"train (epoch {current_epoch + 1})"


class ProgressLog(L.Callback):
    """One progress line per interval: step/total, loss, lr, tokens/s, elapsed, ETA."""

    def __init__(self, interval_s: float = 30.0, to_console: bool | None = None):
        self.interval_s = float(interval_s)
        self.to_console = (not on_terminal()) if to_console is None else to_console
        self._tokens: torch.Tensor | None = None  # on the device: no host sync per step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()
        self._step0 = trainer.global_step
        self._tokens = None
        log.propagate = self.to_console
        if not self.to_console:  # on a terminal: into the log file only, the bar stays clean
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler) and handler not in log.handlers:
                    log.addHandler(handler)
        log.setLevel(logging.INFO)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = real_tokens(batch)
        self._tokens = n if self._tokens is None else self._tokens + n
        now = time.monotonic()
        last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if now - self._last >= self.interval_s or last:
            self._last = now
            log.info(self.line(trainer, now))

    def line(self, trainer: L.Trainer, now: float) -> str:
        step, total = trainer.global_step, trainer.max_steps if trainer.max_steps > 0 else None
        elapsed = max(now - self._t0, 1e-9)
        done = max(step - self._step0, 0)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        tokens = 0 if self._tokens is None else int(self._tokens)
        parts.append(f"{tokens / elapsed:,.0f} tok/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if total and done:
            parts.append(f"eta {_duration((total - step) * elapsed / done)}")
        return " | ".join(parts)
