"""Run untrusted HumanEval programs confined by the operating system, and score them.

Layers (docs/evaluation.md, "Executing generated code", states exactly what is contained):

1. **OS confinement** (default, :mod:`comol.eval.code.confinement`): bubblewrap gives every
   run its own mount, PID, network, IPC, UTS and cgroup namespaces, a read-only view of only
   the interpreter and system libraries, private size-limited ``/tmp`` and ``/dev/shm``, and
   an unprivileged uid with no capabilities and ``no_new_privs``. Without a working ``bwrap``
   execution is refused (:class:`ConfinementUnavailable`) unless the caller passes
   ``confine=False`` (``eval.allow_unconfined=true``), which the runner logs and records.
2. **Resource limits** set by the launcher: address space, CPU time, file size, processes,
   open files, no core files; plus a wall-clock timeout after which the whole run is killed.
3. **In-process guard** (:func:`comol.eval.code.launcher.install_guard`, best effort).
4. **Unforgeable pass**: a run passes only when the launcher writes a per-run random token to
   a pipe that is read back here; the exit code never makes a pass. HumanEval samples run
   *split* (:class:`SplitProgram`, built by :mod:`comol.eval.code.humaneval`): the completion runs in a child process that never holds the
   token, and the checks run in the launcher's own process, which calls the completion's
   entry point over a pipe and takes only plain data back (see ``launcher``).

Status of a run: ``passed``, ``failed`` (an ``AssertionError``), ``timeout`` (wall clock or
CPU limit) or ``error`` (anything else: other exceptions, early exits, blocked operations,
memory exhaustion, crashes).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Hashable, Iterable

from comol.eval.code import launcher as child
from comol.eval.code.confinement import (
    LAUNCHER,
    LAUNCHER_SOURCE,
    WORKDIR,
    ConfinementUnavailable,
    bwrap_command,
    confinement_problem,
    find_bwrap,
    require_confinement,
)

__all__ = ["STATUSES", "ExecResult", "ConfinementUnavailable", "SplitProgram", "run_program",
           "evaluate_programs", "describe_sandbox"]

STATUSES = ("passed", "failed", "timeout", "error")

#: First uid used for confined runs when the caller is root (one uid per concurrent run, so
#: that RLIMIT_NPROC of one run is not shared with another).
SANDBOX_UID_BASE = 2_000_000_000


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: ``status`` is one of :data:`STATUSES`."""

    status: str
    detail: str = ""
    duration: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class SplitProgram:
    """A program whose checks run apart from it: ``program`` (untrusted: prompt + completion)
    runs in one process, ``checks`` (trusted: prompt + test, defining ``check(candidate)``) in
    another, with ``candidate`` a proxy that calls ``entry_point`` in the program's process."""

    program: str
    checks: str
    entry_point: str


class _UidPool:
    """Hands out distinct unprivileged uids to concurrent confined runs (root callers)."""

    def __init__(self, base: int):
        self.base, self._free, self._next, self._lock = base, [], 0, threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._next += 1
            return self.base + self._next - 1

    def release(self, uid: int | None) -> None:
        if uid is not None:
            with self._lock:
                self._free.append(uid)


_UIDS = _UidPool(SANDBOX_UID_BASE)


def _tasks_of_uid(uid: int) -> int:
    """Number of tasks (threads) owned by real ``uid``: what ``RLIMIT_NPROC`` counts."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                real_uid, threads = None, 1
                for line in f:
                    if line.startswith("Uid:"):
                        real_uid = int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads = int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if real_uid == uid:
            total += threads
    return total


def describe_sandbox(python: str | None = None) -> dict:
    """How :func:`run_program` confines runs on this machine (for logs, results and docs)."""
    problem = confinement_problem(python)
    return {
        "confinement": "bwrap" if problem is None else None,
        "problem": problem,
        "caller_is_root": os.geteuid() == 0,
        "bwrap": find_bwrap(),
    }


def _read_tail(f, limit: int) -> str:
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    text = f.read().decode("utf-8", errors="replace")
    return ("[...]" + text) if size > limit else text


def _read_available(fd: int, limit: int = 4096) -> bytes:
    """What is in the (non-blocking) pipe ``fd`` now, at most ``limit`` bytes."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < limit:
        try:
            chunk = os.read(fd, limit - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit WITHOUT reaping it (the pid and its
    process group id stay reserved, so killing the group afterwards is race-free)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _classify(rc: int, timed_out: bool, timeout: float, stderr: str, token_ok: bool) -> tuple[str, str]:
    """Status of a run. Only ``token_ok`` (the launcher's token read back) makes a pass."""
    if timed_out:
        return "timeout", f"wall-clock timeout after {timeout:g} s"
    if token_ok:
        return "passed", ""
    err = stderr.strip()
    sig = -rc if rc < 0 else (rc - 128 if rc > 128 else None)
    if rc == child.EXIT_FAILED:
        return "failed", err
    if rc == child.EXIT_SETUP:
        return "error", "sandbox setup failed: " + err
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGXCPU:
            return "timeout", "CPU time limit exceeded (SIGXCPU)"
        return "error", f"killed by {name}" + (f": {err}" if err else "")
    if rc in (child.EXIT_DONE, child.EXIT_ERROR) and err:
        return "error", err
    return "error", f"exited with status {rc} before its checks finished" + (f": {err}" if err else "")


def run_program(
    program: str | SplitProgram,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    *,
    max_file_mb: int = 16,
    max_procs: int = 16,
    max_output: int = 4096,
    guard: bool = True,
    confine: bool = True,
    python: str | None = None,
) -> ExecResult:
    """Run ``program`` (Python source, or a :class:`SplitProgram`) in a sandbox and report how it ended.

    ``timeout`` is wall-clock seconds (the CPU limit is a backstop); ``memory_mb`` bounds the
    address space; ``max_file_mb`` the size of any file written and of the private ``/tmp``
    and ``/dev/shm``; ``max_procs`` the extra processes/threads; ``max_output`` the bytes of
    stdout/stderr kept. ``guard=False`` turns the in-process guard off (tests use it to check
    the OS layers alone). ``confine=False`` runs WITHOUT OS confinement (explicit opt-in);
    with ``confine=True`` a machine without working bubblewrap raises
    :class:`ConfinementUnavailable`. ``python`` is the interpreter (default: the caller's).
    """
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be positive")
    python = python or sys.executable
    bwrap = require_confinement(python) if confine else None
    root = os.geteuid() == 0
    start = time.monotonic()
    uid = _UIDS.acquire() if (confine and root) else None
    host_dir = None if confine else tempfile.mkdtemp(prefix="comol-unconfined-")
    token = secrets.token_hex(16)
    res_r, res_w = os.pipe()
    tok_r, tok_w = os.pipe()   # the token travels apart from the program (read after a split's fork)
    os.write(tok_w, token.encode())
    os.close(tok_w)
    split = isinstance(program, SplitProgram)
    try:
        if uid is not None:
            nproc = max_procs + 2
        else:
            nproc = _tasks_of_uid(os.getuid()) + max_procs + 8
        config = {
            "workdir": WORKDIR if confine else host_dir,
            "uid": uid,
            "memory_bytes": int(memory_mb) * 2**20,
            "cpu_seconds": int(math.ceil(timeout)) + 1,
            "file_bytes": int(max_file_mb) * 2**20,
            "nproc": nproc,
            "guard": guard,
            "result_fd": res_w,
            "token_fd": tok_r,
            "program": program.program if split else program,
        }
        if split:
            config["split"] = {"checks": program.checks, "entry_point": program.entry_point}
        home = WORKDIR if confine else host_dir
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
               # numeric libraries must not start a thread per core under RLIMIT_NPROC
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if confine:
            cmd = bwrap_command(bwrap, python, tmp_bytes=int(max_file_mb) * 2**20,
                                shm_bytes=int(max_file_mb) * 2**20)
            for key, value in env.items():
                cmd += ["--setenv", key, value]
            cmd += [python, "-I", "-B", LAUNCHER]
        else:
            cmd = [python, "-I", "-B", LAUNCHER_SOURCE]
        payload = json.dumps(config).encode()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as inp:
            inp.write(payload)
            inp.seek(0)
            proc = subprocess.Popen(
                cmd, stdin=inp, stdout=out, stderr=err, cwd=host_dir or "/", env=env,
                start_new_session=True, close_fds=True, pass_fds=(res_w, tok_r),
            )
            os.close(res_w)
            res_w = None
            os.close(tok_r)
            tok_r = None
            try:
                exited = _wait_exited(proc.pid, timeout)
            finally:
                try:  # kill whatever is left of the group, then reap the leader
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                rc = proc.wait()
            token_ok = exited and _read_available(res_r) == token.encode()
            stderr = _read_tail(err, max_output)
            stdout = _read_tail(out, max_output)
        status, detail = _classify(rc, not exited, timeout, stderr, token_ok)
        if status == "error" and "before its checks finished" in detail and stdout.strip():
            detail += ": " + stdout.strip()[-max_output:]
        return ExecResult(status, detail, time.monotonic() - start)
    finally:
        os.close(res_r)
        for fd in (res_w, tok_r):
            if fd is not None:
                os.close(fd)
        if host_dir is not None:
            shutil.rmtree(host_dir, ignore_errors=True)
        _UIDS.release(uid)


def evaluate_programs(
    jobs: Iterable[tuple[Hashable, str | SplitProgram]],
    workers: int = 4,
    timeout: float = 3.0,
    progress: bool = True,
    desc: str = "exec",
    **run_kwargs,
) -> dict:
    """Run ``(key, program)`` jobs in parallel sandboxes; returns ``{key: ExecResult}``.

    ``workers`` threads each launch one subprocess at a time; extra keyword arguments go to
    :func:`run_program`. Refuses (before running anything) when confinement is required and
    unavailable.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    jobs = list(jobs)
    keys = [k for k, _ in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("evaluate_programs: job keys must be unique")
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if run_kwargs.get("confine", True):
        require_confinement(run_kwargs.get("python"))  # probe once, before the threads start
    results: dict = {}
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(jobs), desc=desc, disable=not progress, leave=False
    ) as bar:
        futures = {pool.submit(run_program, prog, timeout, **run_kwargs): key for key, prog in jobs}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results
