"""Exclusive output directories: a run (or a sweep launch) claims its directory before anything is written.

A claim is the file ``.comol_run.json`` created with ``O_CREAT | O_EXCL`` (atomic on every local filesystem and
on NFSv3+): of two launches into one directory exactly one gets it, the other is refused. A directory that
already holds a run's outputs (results.json, adapter/, ...) is refused too, claimed or not.

Who claims:
- ``RunDirCallback`` (conf/hydra/default.yaml), in Hydra's ``on_run_start`` / ``on_multirun_start``. Hydra 1.3
  calls these before ``run_job`` creates the run dir and saves ``.hydra/*.yaml`` (``on_job_start`` comes only
  after the save), and before the sweeper saves ``multirun.yaml``: a refused launch writes nothing at all.
- the pipeline, at the start of each job (``claim_run_dir``): it adopts the callback's claim of a single run,
  and claims each job dir of a multirun itself (inside the sweep dir its launch has claimed).

``resume=True`` lets a run take over a directory it claimed before (a resumed run continues its own outputs),
but never one that a live process holds: every claimant, new run or resume, keeps an exclusive ``flock`` on the
claim file for as long as its job runs (the kernel drops it when the process ends, however it ends). A resume
launched twice, or while the original run still runs, finds the lock taken and is refused. The claim file is
never replaced (a resume rewrites it in place), so the lock always sits on the one file every claimant opens.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from comol.errors import ConfigError

log = logging.getLogger(__name__)

CLAIM_FILE = ".comol_run.json"
#: what a finished or running job leaves in its dir (``.hydra`` only counts before Hydra has written ours)
RUN_OUTPUTS = ("results.json", "adapter", "predictions", "config.yaml")
SWEEP_OUTPUTS = ("multirun.yaml",)
EVAL_SUBDIR = "evals"

_PENDING: dict[str, str] = {}   # dirs this process claimed in a Hydra callback, not yet adopted by its job
_HELD: dict[str, tuple[int, int]] = {}   # dir -> (pid, flock'ed descriptor of its claim file) while pid holds it


class RunDirTaken(ConfigError):
    """The output directory belongs to another run (claimed, or holding its outputs)."""


def read_claim(path: str | os.PathLike) -> dict | None:
    """The claim record of a directory (None when unclaimed or unreadable)."""
    try:
        data = json.loads((Path(path) / CLAIM_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(claim: dict | None) -> str:
    if not claim:
        return "another run"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claim["time"])) if "time" in claim else "?"
    return f"a {claim.get('mode', '?')} run (pid {claim.get('pid', '?')} on {claim.get('host', '?')}, started {when})"


def _held_fd(key: str, claim: Path) -> int | None:
    """The descriptor of ``claim`` this process still holds locked (None when it holds none, or the file was
    replaced since, e.g. a test's dir deleted and made again)."""
    pid, fd = _HELD.get(key, (None, None))
    if fd is None:
        return None
    try:
        if pid == os.getpid() and os.fstat(fd).st_ino == os.stat(claim).st_ino:
            return fd
    except OSError:
        pass
    release_dir(key)   # a forked child closes its copy only: the parent's lock stays
    return None


def _lock(fd: int) -> bool:
    """Take the exclusive lock on an open claim file without waiting; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):   # e.g. NFS mounted with nolock
            log.warning("the filesystem of %s supports no file locks (%s): two resumes of this dir, or a "
                        "resume of a run still going, are not detected", _fd_path(fd), e.strerror)
            return True
        raise


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "the run dir"


def _in_use(what: str, path: Path) -> RunDirTaken:
    claim = read_claim(path)
    stop = (f" (kill -TERM {claim['pid']} on {claim.get('host', '?')}: a training run saves a checkpoint and stops)"
            if claim and "pid" in claim else "")
    return RunDirTaken(f"{what} {path} is in use by {_describe(claim)}, still running: a run never shares its "
                       f"directory; wait for it to end, or stop it{stop}, before resume=true")


def _rewrite(fd: int, record: Mapping[str, Any]) -> None:
    """Replace the content of the (locked) claim file in place: its inode, and so the lock, stay."""
    data = json.dumps(dict(record), indent=1, default=str).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _take_over(path: Path, key: str, record: dict, what: str, hint: str) -> Path:
    """``resume``: hold the lock of the dir's claim (made now when it has none), then record this process in it."""
    claim = path / CLAIM_FILE
    fd = _held_fd(key, claim)
    if fd is None:
        while True:
            try:
                fd = os.open(claim, os.O_RDWR)
                break
            except FileNotFoundError:
                try:
                    fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
                    break
                except FileExistsError:   # another launch made it in between: open theirs
                    continue
        if not _lock(fd):
            os.close(fd)
            raise _in_use(what, path)
        _HELD[key] = (os.getpid(), fd)
    try:
        before = json.loads(os.pread(fd, 1 << 20, 0) or b"{}")
    except ValueError:
        before = {}
    _rewrite(fd, {**(before if isinstance(before, dict) else {}), **record, "resumed": True})
    return path


def claim_dir(path: str | os.PathLike, *, outputs: Iterable[str] = RUN_OUTPUTS, resume: bool = False,
              info: Mapping[str, Any] | None = None, what: str = "run dir",
              hint: str = "choose another hydra.run.dir (or leave it to the default)") -> Path:
    """Make ``path`` this process's own (see the module doc); raise RunDirTaken naming what holds it.
    This process keeps the claim file locked until ``release_dir`` (or its end)."""
    path = Path(os.path.abspath(path))   # as Hydra makes hydra.runtime.output_dir (paths.output_dir)
    key = str(path)
    if _PENDING.pop(key, None) is not None:   # claimed for this very job by the Hydra callback
        return path
    path.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "token": uuid.uuid4().hex,
              **dict(info or {})}
    if resume:
        return _take_over(path, key, record, what, hint)
    held = [name for name in outputs if (path / name).exists()]
    finished = [name for name in held if name != ".hydra"]
    if (path / "checkpoints" / "last.ckpt").is_file() and not (path / "results.json").exists():
        hint = "it was interrupted: continue it with resume=true and the same overrides, or " + hint
    elif (path / "config.yaml").is_file() and not (path / "results.json").exists() \
            and (read_claim(path) or {}).get("mode") == "train":
        hint = ("it was interrupted before its first checkpoint: start it again from step 0 with resume=true and "
                "the same overrides, or " + hint)
    if finished:   # a run's outputs say most
        raise RunDirTaken(f"{what} {path} already holds a run ({finished[0]}): a run never overwrites another; {hint}")
    if (path / CLAIM_FILE).exists():
        raise RunDirTaken(f"{what} {path} is claimed by {_describe(read_claim(path))}: a run never shares its "
                          f"directory; {hint}")
    if held:
        raise RunDirTaken(f"{what} {path} already holds a run ({held[0]}): a run never overwrites another; {hint}")
    try:
        fd = os.open(path / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    except FileExistsError:   # another launch got there first
        raise RunDirTaken(f"{what} {path} is claimed by {_describe(read_claim(path))}: a run never shares its "
                          f"directory; {hint}") from None
    if not _lock(fd):   # a resume opened the file in the instant since it appeared, and holds it
        os.close(fd)
        raise _in_use(what, path)
    _HELD[key] = (os.getpid(), fd)
    _rewrite(fd, record)
    return path


def release_dir(path: str | os.PathLike) -> None:
    """Let go of the lock this process holds on ``path``'s claim (the claim record itself stays)."""
    _, fd = _HELD.pop(str(Path(os.path.abspath(path))), (None, None))
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)   # closing the last descriptor of the claim file drops the flock


def _job_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - outside Hydra (tests, notebooks)
        return None


def claim_run_dir(out_dir: str | os.PathLike, resume: bool = False, mode: str = "train") -> Path:
    """Claim a job's output dir (the single entry point for the pipeline and for resuming runs).

    ``resume=False``: refuse a dir claimed by another run or holding a run's outputs.
    ``resume=True``: take the dir over (the caller continues the run that is in it).
    The claim records the job's command-line overrides: the report attributes results by them.
    """
    info: dict[str, Any] = {"mode": mode}
    overrides = _job_overrides()
    if overrides is not None:
        info["overrides"] = overrides
    return claim_dir(out_dir, resume=resume, info=info)


def release_run_dir(out_dir: str | os.PathLike) -> None:
    """The job in ``out_dir`` has ended (finished or failed): another process may now resume it."""
    _PENDING.pop(str(Path(os.path.abspath(out_dir))), None)
    release_dir(out_dir)


# --------------------------------------------------------------------------------------------- Hydra side

def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _resume(config: DictConfig) -> bool:
    from comol.training.resume import wants_resume   # resume=true, or a requeued SLURM job

    return wants_resume(OmegaConf.select(config, "resume", default=False))


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra is a dependency
    Callback = object  # type: ignore[misc,assignment]


class RunDirCallback(Callback):
    """Claims ``hydra.run.dir`` (single run) or ``hydra.sweep.dir`` (multirun) before Hydra writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from comol.training.distributed import is_global_zero

        if not is_global_zero():   # DDP ranks > 0: Lightning started them in rank 0's (claimed) run dir
            return
        try:
            path = claim_dir(str(config.hydra.run.dir), outputs=(*RUN_OUTPUTS, ".hydra"), resume=_resume(config),
                             info={"mode": OmegaConf.select(config, "mode", default="train"),
                                   "overrides": list(config.hydra.overrides.task)})
        except (ConfigError, OSError) as e:
            _fail(e)
        _PENDING[str(path)] = "run"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            claim_dir(str(config.hydra.sweep.dir), outputs=SWEEP_OUTPUTS, resume=_resume(config),
                      info={"mode": "multirun", "overrides": list(config.hydra.overrides.task)}, what="sweep dir",
                      hint="another launch uses it; give another sweep.id / hydra.sweep.dir")
        except (ConfigError, OSError) as e:
            _fail(e)


# --------------------------------------------------------------------------------------------- default dirs

def default_run_dir(mode: Any, adapter_path: Any, eval_task: Any, stamp: str, runs_root: str) -> str:
    """``hydra.run.dir`` unless given: ``<runs_root>/<stamp>``; for ``mode=eval`` of an adapter saved by a run,
    ``<that run>/evals/<task>_<stamp>``: the evaluation sits with the run it scores, without touching the
    run's own predictions or results.json."""
    if mode == "eval" and adapter_path:
        run = Path(str(adapter_path)).absolute().parent
        if (run / CLAIM_FILE).is_file() or (run / "results.json").is_file() or (run / ".hydra").is_dir():
            return str(run / EVAL_SUBDIR / f"{eval_task or 'eval'}_{stamp}")
    return f"{runs_root}/{stamp}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("comol_run_dir"):
        OmegaConf.register_new_resolver("comol_run_dir", default_run_dir)


register_resolvers()
