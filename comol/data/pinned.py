"""Pinned training files: a public file fetched once into the cache, verified by its git blob id before use.

A dataset preset says ``train: ${oc.env:COMOL_MATH14K,pinned}`` and carries a ``pinned`` node::

    pinned:
      url: https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/ft-training_set/math_14k.json
      git_blob: 7dc3a2312d83bd5cd6388ecd5d530f2ff6ed1ad6   # `git hash-object` of the file
      env: COMOL_MATH14K                                   # named in the offline message
      local: ${paths.data_dir}/train/math_14k.json         # a copy placed here is used as is

``train`` set to a file (by the env var or ``dataset.train=<file>``) wins and nothing is downloaded; so does
the ``local`` copy when it exists. Otherwise the file lives in ``$COMOL_CACHE/datasets/<git_blob>/<name>``
(``COMOL_CACHE`` defaults to ``~/.cache/comol``): it is downloaded to a temporary name in ``datasets/``, its git
blob id (sha1 of ``b"blob <size>\\0" + bytes``) is checked, and only then renamed into place, so the cache
never holds a partial or unverified file; later runs reuse it (checked again, which costs a read).
Only the standard library is used (urllib), with a tqdm bar when tqdm is installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from comol.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PINNED = "pinned"          # the value of dataset.train that asks for the pinned file
CHUNK = 1 << 20


def cache_dir() -> Path:
    """``$COMOL_CACHE/datasets`` (default ``~/.cache/comol/datasets``)."""
    return Path(os.environ.get("COMOL_CACHE") or Path.home() / ".cache" / "comol") / "datasets"


def git_blob_id(path: str | os.PathLike) -> str:
    """The git blob id of a file: sha1 of ``b"blob <size>\\0"`` followed by its bytes (``git hash-object``)."""
    path = Path(path)
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def offline_advice(spec: Mapping[str, Any]) -> str:
    """What to do without internet (the clause after the failing URL)."""
    env = spec.get("env")
    where = f"{env}=<file> (or dataset.train=<file>)" if env else "dataset.train=<file>"
    return (f"offline, fetch that file on a machine with internet (git blob {spec['git_blob']}) and set {where}, "
            f"or point dataset.pinned.url at a reachable copy")


def _check_spec(spec: Any) -> dict:
    if not isinstance(spec, Mapping) or not spec.get("url") or not spec.get("git_blob"):
        raise ConfigError(f"dataset.train=pinned needs dataset.pinned with 'url' and 'git_blob', got {spec!r}")
    blob = str(spec["git_blob"])
    if len(blob) != 40 or any(c not in "0123456789abcdef" for c in blob):
        raise ConfigError(f"dataset.pinned.git_blob={blob!r} is invalid: expected 40 lowercase hex digits")
    return {**spec, "git_blob": blob}


def _file_name(url: str) -> str:
    name = Path(urlparse(url).path).name
    return name if name and name not in (".", "..") else "data.json"


def _progress(total: int | None, name: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None, leave=False)


def _download(url: str, target: Path, timeout: float, label: str) -> int:
    """Stream ``url`` into ``target``; the number of bytes written. Failing to connect raises what urllib
    raises; a body cut short (an error while reading it, or fewer bytes than its Content-Length) raises
    DataError."""
    written = 0
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(target, "wb") as out:  # noqa: S310 - pinned URL
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = _progress(total, label)
        try:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                out.write(chunk)
                written += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        except Exception as e:  # noqa: BLE001 - http.client / socket raise many types for a broken stream
            raise DataError(f"download of {url} was interrupted after {written} bytes ({type(e).__name__}): "
                            f"nothing was kept; run again") from None
        finally:
            if bar is not None:
                bar.close()
    if total is not None and written != total:
        raise DataError(f"download of {url} was interrupted after {written} of {total} bytes: nothing was kept; "
                        f"run again")
    return written


def fetch_pinned(spec: Mapping[str, Any], timeout: float = 60.0) -> Path:
    """The verified cached copy of a pinned file, downloading it once (atomic rename after the check)."""
    spec = _check_spec(spec)
    url, blob = str(spec["url"]), spec["git_blob"]
    name = _file_name(url)
    folder = cache_dir() / blob
    final = folder / name
    if final.is_file():
        got = git_blob_id(final)
        if got == blob:
            return final
        log.warning("cached %s has git blob %s, expected %s: downloading it again", final, got, blob)
    cache_dir().mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir(), prefix=f".{blob[:12]}.{name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info("downloading %s into %s", url, folder)
        try:
            size = _download(url, tmp, timeout, name)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - offline, refused, timeout, HTTP error, bad URL, bad response
            reason = str(getattr(e, "reason", None) or e).splitlines()
            raise DataError(f"could not download {url} ({type(e).__name__}: {(reason or [''])[0][:160]}); "
                            f"{offline_advice(spec)}") from None
        got = git_blob_id(tmp)
        if got != blob:
            raise DataError(f"{name} from {url}: git blob id expected {blob}, got {got} ({size} bytes): refused, "
                            f"not cached")
        folder.mkdir(exist_ok=True)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("cached %s (%d bytes, git blob %s verified)", final, final.stat().st_size, blob)
    return final


def train_source(cfg: Mapping[str, Any]) -> str:
    """The training source of a ``source: files`` dataset: ``dataset.train`` itself, or for ``train: pinned``
    the ``local`` copy when it exists, else the verified cached download."""
    train = str(cfg.get("train"))
    if train != PINNED:
        return train
    spec = _check_spec(cfg.get("pinned"))
    local = spec.get("local")
    if local and Path(str(local)).is_file():
        got = git_blob_id(local)
        if got != spec["git_blob"]:
            log.warning("dataset=%s: using %s as given; its git blob %s differs from the pinned %s (%s)",
                        cfg.get("name"), local, got, spec["git_blob"], spec["url"])
        return str(local)
    return str(fetch_pinned(spec))
