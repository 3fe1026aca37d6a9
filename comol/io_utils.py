"""Atomic file writes: outputs appear complete or not at all."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temp file/dir the permissions an ordinary create would (mkstemp uses 0600, mkdtemp 0700)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        normal_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def nonfinite_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted keys (list items as [i]) of the NaN/inf floats inside ``obj``."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [prefix or "<value>"]
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in nonfinite_keys(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in nonfinite_keys(v, f"{prefix}[{i}]")]
    return []


def nonfinite_to_none(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: nonfinite_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nonfinite_to_none(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (no bare NaN/Infinity, which JSON does not have): a non-finite number is a ValueError
    naming the key; callers turn such values into null first (``nonfinite_to_none``)."""
    bad = nonfinite_keys(obj)
    if bad:
        raise ValueError(f"{path}: non-finite number at {', '.join(bad[:5])}: JSON cannot hold it")
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def replace_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Move a fully written ``tmp_dir`` onto ``final_dir`` (replacing an older one)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    return final_dir
