"""How a run checkpoint reaches the disk and comes back (Lightning's ``CheckpointIO`` for ``RunCheckpoint``).

Lightning's own ``TorchCheckpointIO`` pickles everything it is given, writes through an fsspec transaction
(a temporary file in ``$TMPDIR``, then copied next to the target: a kill leaves a checkpoint-sized file in
``/tmp``, and a full ``/tmp`` fails a save the run dir has room for) and loads with whatever ``weights_only``
it is passed. This one:

* saves only tensors and plain data (``plain_state.to_plain``), serialised in memory first so the size is
  known, then written straight into the file it is given (RunCheckpoint passes a temp name beside
  ``last.ckpt`` and renames it when complete) and fsync'ed;
* refuses a save the disk has no room for before writing a byte (free space < size), and turns ENOSPC /
  EDQUOT during the write into ``NoSpaceForCheckpoint`` (one line: path, bytes needed, bytes free), removing
  what it wrote;
* loads with ``weights_only=True`` whatever it is asked (``plain_state.load_plain``).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from comol.errors import ComolError
from comol.training.plain_state import load_plain, to_plain

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceForCheckpoint(ComolError):
    """The checkpoint did not fit on its disk; the previous checkpoint is untouched."""

    def __init__(self, path: Path, needed: int, free: int, more: str = ""):
        self.path, self.needed, self.free = path, needed, free
        need = f"it needs {mb(needed)} free on that disk, {mb(free)} is free" if needed else f"{mb(free)} is free"
        super().__init__(f"no space left for checkpoint {path}: {need}" + (f" {more}" if more else ""))


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return -1


def _write(path: Path, data: bytes) -> None:
    """``data`` into a new file ``path``, on disk (fsync) when this returns."""
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class RunCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        # Lightning records the class of OmegaConf hyperparameters ("hparams_type"): a class is not data, and
        # resuming never needs it (only LightningModule.load_from_checkpoint does)
        plain = to_plain({k: v for k, v in checkpoint.items() if not isinstance(v, type)})
        buf = io.BytesIO()
        torch.save(plain, buf)
        data = buf.getbuffer()
        path.parent.mkdir(parents=True, exist_ok=True)
        free = free_bytes(path.parent)
        if 0 <= free < len(data):
            raise NoSpaceForCheckpoint(path, len(data), free)
        try:
            _write(path, data)
        except OSError as e:
            path.unlink(missing_ok=True)
            if e.errno in NO_SPACE:
                raise NoSpaceForCheckpoint(path, len(data), free_bytes(path.parent)) from None
            raise

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        return load_plain(path)   # weights_only=True, whatever the caller asked
