"""What a run checkpoint may hold: tensors and plain data, so that it loads with ``torch.load(weights_only=True)``.

``torch.load(weights_only=False)`` runs whatever the pickle names (a ``last.ckpt`` whose unpickling calls
``os.system`` runs it); ``weights_only=True`` rebuilds only tensors, numbers, strings, None and lists /
tuples / dicts of them and refuses everything else. Saving: ``to_plain`` turns what Lightning or a
library may put into a checkpoint (OmegaConf containers, ``AttributeDict``, dataclasses, NumPy arrays and
scalars) into that plain data, and names any other object (a bug to fix where it is made: it would make the
checkpoint unloadable). Loading: ``load_plain`` refuses, in one line naming the file, a checkpoint that
needs anything else.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comol.errors import CheckpointError

_SCALARS = (str, int, float, bool, type(None), bytes, torch.dtype, torch.device, torch.Size)


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as tensors and plain data (see the module doc); TypeError naming ``where`` for anything else."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):   # dict, OrderedDict, Lightning's AttributeDict, ...
        return {k: to_plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds tensors and "
                    f"plain data only (torch.load(weights_only=True) could not read it back)")


def _refused_global(e: Exception) -> str | None:
    """What torch's weights-only unpickler stopped at: a global (``posix.system``) or a pickle opcode."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    if m:
        return m.group(1)
    m = re.search(r"Unsupported operand (\d+)", str(e))
    return f"pickle opcode {m.group(1)}" if m else None


def load_plain(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` loaded with ``weights_only=True`` (onto the CPU); a one-line CheckpointError
    naming the file when it needs anything else (it is never unpickled beyond plain data) or is unreadable."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = _refused_global(e)
        raise CheckpointError(f"{path}: refused: it holds {what or 'objects'} besides tensors and plain data "
                              f"(a checkpoint is only read with torch.load(weights_only=True), never run); it was not "
                              f"written by comol: delete it (or the run dir) and start the run again") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a run checkpoint (it holds a {type(data).__name__}, not a dict)")
    return data
