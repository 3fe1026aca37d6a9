"""Resumable adapter-only checkpoints: ``<run dir>/checkpoints/last.ckpt``.

Lightning's own checkpoint (adapter tensors only, see AdapterLM.on_save_checkpoint; optimizer, LR
scheduler, loop position) plus, in this callback's state: the RNG states (dropout), the data position
(epoch, batches done, for ResumableSampler), the resolved run config and the loggers' run ids.

Saves happen at the *start* of a training batch, i.e. between optimizer steps, when nothing of the next
step has run yet: every ``every_n_steps`` optimizer steps, when a signal arrived (signals.py), and once
more when training ends. Each save is written to a temporary file ``.last.ckpt.<pid>.tmp`` beside it
(checkpoint_io.py: plain data only, fsync'ed), then renamed over the last one, so a kill at any moment
leaves the previous checkpoint intact; the temporary file of a killed save is removed when the run (or its
resume) starts again. A disk too full for the save stops the run with one line, the previous checkpoint kept.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
import numpy as np
import torch

from comol.errors import ComolError
from comol.training.checkpoint_io import NO_SPACE, NoSpaceForCheckpoint, RunCheckpointIO, free_bytes
from comol.training.signals import SignalCatcher

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LAST = "last.ckpt"


class RunInterrupted(ComolError):
    """The run stopped on a signal after saving a checkpoint."""


def checkpoint_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CKPT_DIR / LAST


def temp_path(path: Path, pid: int) -> Path:
    """Where process ``pid`` writes a checkpoint before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{pid}.tmp")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files that killed saves left beside ``path``: those named for a process that no
    longer runs (on this host; the run dir's claim lock, run_dir.py, keeps other live runs out). Returns them."""
    stale = []
    for p in path.parent.glob(f".{path.name}.*.tmp"):
        pid = p.name[len(path.name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)
            stale.append(p)
            log.info("removed %s, left by a save that was killed", p)
    return stale


def auto_every_n_steps(trainer_cfg: dict) -> int:
    """``checkpoint.every_n_steps: auto``: a tenth of ``max_steps`` (at most 200); 200 for epoch-based runs
    (gpu preset: ~5-10 min of an 8B model). cpu preset: 100, debug: 1."""
    max_steps = int(trainer_cfg.get("max_steps") or -1)
    return max(1, min(200, max_steps // 10)) if max_steps > 0 else 200


def rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    random.setstate(states["python"])


def logger_ids(trainer: L.Trainer) -> dict[str, Any]:
    """What a resumed run needs to continue each logger's record: W&B run id, CSV version."""
    ids = {}
    for lg in trainer.loggers:
        kind = lg.__class__.__name__
        if kind == "WandbLogger":
            ids["wandb"] = lg.experiment.id
        elif kind == "CSVLogger":
            ids["csv"] = lg.version
    return ids


class RunCheckpoint(L.Callback):
    def __init__(self, out_dir: str | os.PathLike, every_n_steps: int, config: dict):
        self.path = checkpoint_path(out_dir)
        self.every_n_steps = int(every_n_steps)
        self.config = config
        self.signals = SignalCatcher()
        self._last_saved = -1
        self._at_boundary = True      # the previous batch ended an optimizer step (gradient accumulation)
        self._gs_at_start = 0
        self._state: dict[str, Any] = {}
        self._restore: dict[str, Any] | None = None   # loaded state, applied when training (re)starts

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict
        self._last_saved = int(state_dict.get("global_step", -1))

    # ---------------------------------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.signals.capture()  # before Lightning's own SIGTERM handler goes in (Trainer._run)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:   # before Lightning restores a checkpoint
            trainer.strategy.checkpoint_io = RunCheckpointIO()
        if trainer.is_global_zero:
            remove_stale_temps(self.path)

    def on_train_start(self, trainer, pl_module) -> None:
        self.signals.install()  # after Lightning's: ours decide (Lightning restores the originals at the end)
        if self._restore is not None:
            pos = self._restore.get("data") or {}
            sampler = getattr(trainer.train_dataloader, "sampler", None)
            if pos and hasattr(sampler, "skip_next"):
                sampler.skip_next(pos["epoch"], pos["batches"] * trainer.train_dataloader.batch_size)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._restore is not None:   # first batch after a resume: continue the RNG streams exactly
            set_rng_states(self._restore["rng"])
            logged = self._restore.get("logged_steps")
            if logged is not None:
                # Restarting from a save taken right after a validation, Lightning first runs an empty loop
                # iteration (it skips the validation already done) that still counts one logged step: every
                # metrics row would come one step late. The step counter of the loggers is the saved one.
                trainer.fit_loop.epoch_loop._batches_that_stepped = int(logged)
            self._restore = None
        self._gs_at_start = trainer.global_step
        if not self._at_boundary:
            return
        signum = self.signals.pending
        due = (self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
               and trainer.global_step > self._last_saved and trainer.global_step > 0)
        if due or signum is not None:
            self.save(trainer, batch_idx)
        if signum is not None:
            self.signals.pending = None
            chained = self.signals.chained_handler(signum)
            if chained is not None:   # e.g. submitit: requeue the job and exit, or ignore SIGTERM and go on
                chained(signum, None)
                return
            raise RunInterrupted(f"stopped by {signal.Signals(signum).name} at step {trainer.global_step}: "
                                 f"checkpoint {self.path}; continue with the same overrides plus "
                                 f"hydra.run.dir={self.path.parent.parent} resume=true")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._at_boundary = trainer.global_step != self._gs_at_start

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._at_boundary = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Saved at a batch start, the next batch is already counted "ready" (fetched) but nothing of it ran.
        # Record it as not fetched: Lightning then restores "the last batch completed, validation after
        # it done" (its RESTARTED_ON_LAST stage) and continues with that next batch, step counters intact.
        progress = (checkpoint.get("loops") or {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if progress and self._state.get("data") is not None:
            for part in ("total", "current"):
                progress[part]["ready"] = progress[part]["started"] = progress[part]["completed"]
                progress[part]["processed"] = progress[part]["completed"]
            progress["is_last_batch"] = False

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_saved:
            self.save(trainer, None)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.signals.restore()

    # ---------------------------------------------------------------------------------------- saving
    def save(self, trainer: L.Trainer, batch_idx: int | None) -> Path:
        self._state = {"global_step": trainer.global_step, "config": self.config, "rng": rng_states(),
                       "data": None if batch_idx is None else {"epoch": trainer.current_epoch, "batches": batch_idx},
                       "loggers": logger_ids(trainer), "training_done": batch_idx is None,
                       "logged_steps": trainer.fit_loop.epoch_loop._batches_that_stepped}
        for lg in trainer.loggers:   # what was logged so far is on disk together with the checkpoint
            lg.save()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(self.path, os.getpid())
        try:
            # collective under DDP (every rank calls it); only global rank 0 writes the file
            trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
        except NoSpaceForCheckpoint as e:
            kept = f"the checkpoint of step {self._last_saved} is kept" if self._last_saved >= 0 else "no earlier checkpoint"
            raise NoSpaceForCheckpoint(e.path, e.needed, e.free, f"at step {trainer.global_step}; {kept}: "
                                       f"free some space, then continue with resume=true") from None
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            raise NoSpaceForCheckpoint(tmp, 0, free_bytes(self.path.parent), f"at step {trainer.global_step} "
                                       f"({e.strerror}): free some space, then continue with resume=true") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._last_saved = trainer.global_step
        log.debug("checkpoint: step %d -> %s", trainer.global_step, self.path)
        return self.path
