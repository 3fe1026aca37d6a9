"""Run untrusted HumanEval programs in a sandboxed subprocess and score them.

Each program runs in a fresh ``python -I -B`` interpreter (never a fork of the caller) inside
a throw-away working folder that is deleted afterwards. Protection is layered; every layer
that the machine supports is used:

1. **Namespaces** (``unshare``, when it works here): a new network namespace (no network,
   not even the host's loopback) and a new PID namespace whose init is a tiny supervisor;
   when the supervisor dies every process the program started dies with it, so fork bombs
   and daemonised children cannot outlive the run. Non-root users get the same through a
   user namespace (``--map-root-user``) where the kernel allows it.
2. **Unprivileged user**: when the caller is root, the program runs under a throw-away uid
   (one per concurrent run) with no supplementary groups and ``no_new_privs``, so the files
   of the machine are protected by ordinary permissions and ``RLIMIT_NPROC`` is enforced (it
   is not for root). If the interpreter is installed where other users cannot read it (e.g.
   under ``/root``), the process keeps ``CAP_DAC_READ_SEARCH`` (read anything, write nothing).
3. **Resource limits** set in the child: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``,
   ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``, ``RLIMIT_NOFILE``, no core files.
4. **Process group**: the child starts its own session; at the end (normal exit or wall-clock
   timeout) the whole group is killed with ``SIGKILL``.
5. **In-process guard** (best effort, on by default): before the program runs, functions that
   spawn or signal processes (``os.fork``, ``os.system``, ``subprocess.Popen``, ``os.kill``...)
   or open sockets raise ``PermissionError``, and deleting, renaming, chmod-ing, linking,
   writing or ``chdir``-ing is allowed only inside the sandbox folder. Normal HumanEval
   solutions never need more.

Input is ``/dev/null``; stdout/stderr go to anonymous files (so a child holding them open
cannot block the caller) and only their tail is kept. ``HOME`` and ``TMPDIR`` point at the
sandbox folder.

Status of a run: ``passed`` (the program ran to the end), ``failed`` (an ``AssertionError``,
i.e. a test of ``check`` failed), ``timeout`` (wall clock or CPU limit) or ``error`` (any other
exception, ``exit()``, a blocked operation, memory exhaustion, a crash).

This file is also the launcher executed inside the sandbox (see :func:`_launch`), so its
module-level imports are kept to the standard library.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

STATUSES = ("passed", "failed", "timeout", "error")

# Exit codes of the launcher (the supervisor reports a worker killed by signal N as 128 + N).
_EXIT_PASSED, _EXIT_FAILED, _EXIT_ERROR, _EXIT_SETUP = 0, 1, 2, 3

#: First uid used for sandboxed runs when the caller is root (one uid per concurrent run).
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


def build_program(problem: dict, completion: str) -> str:
    """The HumanEval program: prompt + completion + test + ``check(entry_point)``."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n"
        + f"check({problem['entry_point']})\n"
    )


# --------------------------------------------------------------------------------------
# Parent side: isolation detection, uid pool, launching and classification.
# --------------------------------------------------------------------------------------

_isolation_cache: dict[str, list[str] | None] = {}
_isolation_lock = threading.Lock()


def _namespace_prefix() -> list[str] | None:
    """The ``unshare`` command line that gives a new net + PID namespace here, or None."""
    with _isolation_lock:
        if "prefix" in _isolation_cache:
            return _isolation_cache["prefix"]
        prefix = None
        exe = shutil.which("unshare")
        if exe:
            base = [exe, "--net", "--pid", "--fork", "--kill-child"]
            candidates = [base] if os.geteuid() == 0 else []
            candidates.append([exe, "--map-root-user", *base[1:]])
            for cand in candidates:
                try:
                    ok = subprocess.run(
                        [*cand, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20,
                    ).returncode == 0
                except (OSError, subprocess.TimeoutExpired):
                    ok = False
                if ok:
                    prefix = cand
                    break
        _isolation_cache["prefix"] = prefix
        return prefix


def isolation_mode() -> str:
    """``"namespaces"`` when net+PID namespaces are available here, else ``"none"``."""
    return "namespaces" if _namespace_prefix() is not None else "none"


def _uid_is_mapped(uid: int) -> bool:
    """Whether ``uid`` exists in this (possibly nested) user namespace."""
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, _outside, count = map(int, line.split())
                if inside <= uid < inside + count:
                    return True
        return False
    except OSError:
        return True


class _UidPool:
    """Hands out distinct unprivileged uids to concurrent runs (root callers only)."""

    def __init__(self, base: int):
        self.base, self._free, self._next, self._lock = base, [], 0, threading.Lock()

    def acquire(self) -> int | None:
        with self._lock:
            if self._free:
                return self._free.pop()
            uid = self.base + self._next
            if not _uid_is_mapped(uid):
                uid = 65534 if _uid_is_mapped(65534) else None  # shared "nobody"
                return uid
            self._next += 1
            return uid

    def release(self, uid: int | None) -> None:
        if uid is not None and uid >= self.base:
            with self._lock:
                self._free.append(uid)


_UIDS = _UidPool(SANDBOX_UID_BASE)


def _tasks_of_uid(uid: int) -> int:
    """Number of tasks (threads) owned by real ``uid``: what ``RLIMIT_NPROC`` counts."""
    total = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
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


_hidden_cache: dict[str, bool] = {}


def _interpreter_hidden(python: str) -> bool:
    """Whether an unprivileged user could NOT read this interpreter's library folders
    (e.g. pyenv/conda under ``/root``); then the sandbox keeps CAP_DAC_READ_SEARCH."""
    if python not in _hidden_cache:
        try:
            out = subprocess.run(
                [python, "-I", "-c", "import sys, sysconfig, json; p = sysconfig.get_paths(); "
                 "print(json.dumps([sys.executable] + [p[k] for k in "
                 "('stdlib', 'platstdlib', 'purelib', 'platlib')]))"],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout
            paths = json.loads(out)
        except (OSError, subprocess.SubprocessError, ValueError):
            paths = [python]
        hidden = False
        for path in paths:
            path = os.path.realpath(path)
            if not os.path.exists(path):
                continue
            parts = [path]
            while os.path.dirname(parts[-1]) != parts[-1]:
                parts.append(os.path.dirname(parts[-1]))
            for i, part in enumerate(parts):
                mode = os.stat(part).st_mode
                need = 0o001 if i else (0o005 if os.path.isdir(part) else 0o004)
                if mode & need != need:
                    hidden = True
        _hidden_cache[python] = hidden
    return _hidden_cache[python]


def describe_sandbox(python: str | None = None) -> dict:
    """Which protection layers :func:`run_program` uses on this machine (for logs/docs)."""
    root = os.geteuid() == 0
    drops = root and (_uid_is_mapped(SANDBOX_UID_BASE) or _uid_is_mapped(65534))
    prefix = _namespace_prefix()
    return {
        "isolation": "namespaces" if prefix else "none",
        "unshare": " ".join(prefix) if prefix else None,
        "caller_is_root": root,
        "drops_privileges": drops,
        "keeps_read_capability": drops and _interpreter_hidden(python or sys.executable),
        "nproc_enforced": drops or not root,
    }


def _read_tail(f, limit: int) -> str:
    f.flush()
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    text = f.read().decode("utf-8", errors="replace")
    return ("[...]" + text) if size > limit else text


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


def _classify(rc: int, timed_out: bool, timeout: float, stderr: str) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock timeout after {timeout:g} s"
    sig = -rc if rc < 0 else (rc - 128 if rc > 128 else None)
    if rc == _EXIT_PASSED:
        return "passed", ""
    if rc == _EXIT_FAILED:
        return "failed", stderr.strip()
    if rc == _EXIT_ERROR:
        return "error", stderr.strip()
    if rc == _EXIT_SETUP:
        return "error", "sandbox setup failed: " + stderr.strip()
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGXCPU:
            return "timeout", "CPU time limit exceeded (SIGXCPU)"
        return "error", f"killed by {name}" + (f": {stderr.strip()}" if stderr.strip() else "")
    return "error", f"exit status {rc}" + (f": {stderr.strip()}" if stderr.strip() else "")


def run_program(
    program: str,
    timeout: float = 3.0,
    memory_mb: int = 1024,
    *,
    max_file_mb: int = 16,
    max_procs: int = 16,
    max_output: int = 4096,
    guard: bool = True,
    isolation: str = "auto",
    python: str | None = None,
    tmp_root: str | None = None,
) -> ExecResult:
    """Run ``program`` (Python source) in a sandbox and report how it ended.

    ``timeout`` is wall-clock seconds measured by the caller (the CPU limit is a backstop);
    ``memory_mb`` bounds the address space; ``max_file_mb`` the size of any file written;
    ``max_procs`` the number of extra processes/threads; ``max_output`` the bytes of
    stdout/stderr kept. ``guard=False`` turns off the in-process guard (tests use it to check
    the OS-level layers alone). ``isolation`` is ``"auto"`` (namespaces when available),
    ``"namespaces"`` (require them) or ``"none"``. ``python`` is the interpreter to run
    (default: the caller's); ``tmp_root`` the folder that receives the sandbox folders
    (default: the system temp folder; for a root caller it must be traversable by others).
    """
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be positive")
    if isolation not in ("auto", "namespaces", "none"):
        raise ValueError(f"isolation={isolation!r}: expected 'auto', 'namespaces' or 'none'")
    prefix = None if isolation == "none" else _namespace_prefix()
    if isolation == "namespaces" and prefix is None:
        raise RuntimeError("isolation='namespaces' requested but `unshare` does not work here")

    start = time.monotonic()
    sandbox = tempfile.mkdtemp(prefix="comol-sandbox-", dir=tmp_root)
    uid = _UIDS.acquire() if os.geteuid() == 0 else None
    try:
        with open(os.path.join(sandbox, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if uid is not None:
            os.chown(sandbox, uid, uid)
            os.chmod(sandbox, 0o700)
            nproc = max_procs + 1
        else:
            nproc = _tasks_of_uid(os.getuid()) + max_procs + 8
        config = {
            "sandbox": sandbox,
            "supervise": prefix is not None,
            "uid": uid,
            "keep_read_cap": uid is not None and _interpreter_hidden(python or sys.executable),
            "memory_bytes": int(memory_mb) * 2**20,
            "cpu_seconds": int(math.ceil(timeout)) + 1,
            "file_bytes": int(max_file_mb) * 2**20,
            "nproc": nproc,
            "guard": guard,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": sandbox, "TMPDIR": sandbox, "LANG": "C.UTF-8",
               # numeric libraries must not start a thread per core under RLIMIT_NPROC
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [*(prefix or []), python or sys.executable, "-I", "-B", os.path.abspath(__file__),
               json.dumps(config)]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=sandbox, env=env,
                start_new_session=True, close_fds=True,
            )
            try:
                exited = _wait_exited(proc.pid, timeout)
            finally:
                try:  # kill whatever is left of the group, then reap the leader
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                rc = proc.wait()
            stderr = _read_tail(err, max_output)
            stdout = _read_tail(out, max_output)
        status, detail = _classify(rc, not exited, timeout, stderr)
        if status == "error" and not detail and stdout.strip():
            detail = stdout.strip()
        return ExecResult(status, detail, time.monotonic() - start)
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
        _UIDS.release(uid)


def evaluate_programs(
    jobs: Iterable[tuple[Hashable, str]],
    workers: int = 4,
    timeout: float = 3.0,
    progress: bool = True,
    desc: str = "exec",
    **run_kwargs,
) -> dict:
    """Run ``(key, program)`` jobs in parallel sandboxes; returns ``{key: ExecResult}``.

    ``workers`` threads each launch one subprocess at a time; extra keyword arguments go to
    :func:`run_program`.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm.auto import tqdm

    jobs = list(jobs)
    keys = [k for k, _ in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("evaluate_programs: job keys must be unique")
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    describe_sandbox(run_kwargs.get("python"))  # probe once, before the threads start
    results: dict = {}
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(jobs), desc=desc, disable=not progress, leave=False
    ) as bar:
        futures = {pool.submit(run_program, prog, timeout, **run_kwargs): key for key, prog in jobs}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            bar.update(1)
    return results


def evaluate_humaneval(
    problems: Sequence[dict],
    completions: dict[str, Sequence[str]],
    ks: Sequence[int] = (1, 5, 10),
    workers: int = 4,
    timeout: float = 3.0,
    progress: bool = True,
    **run_kwargs,
) -> dict:
    """Execute every completion of every problem and compute pass@k.

    ``problems`` are the HumanEval rows to score (all of them, or a subset); each must have
    at least one completion in ``completions`` (task_id -> list of completion strings, the
    code that follows the prompt). Returns ``{"per_problem": [{task_id, n, c, statuses,
    details}], "pass@k": {"pass@1": ...}}`` where only k <= the smallest n are reported.
    """
    from comol.eval.passk import mean_pass_at_k

    by_id = {p["task_id"]: p for p in problems}
    unknown = sorted(set(completions) - set(by_id))
    if unknown:
        raise ValueError(f"completions for unknown task_id(s): {', '.join(unknown[:5])}")
    jobs = []
    for p in problems:
        comps = completions.get(p["task_id"])
        if not comps:
            raise ValueError(f"no completions for task_id {p['task_id']!r}")
        jobs += [((p["task_id"], i), build_program(p, c)) for i, c in enumerate(comps)]
    results = evaluate_programs(jobs, workers=workers, timeout=timeout, progress=progress,
                                desc="humaneval", **run_kwargs)
    per_problem = []
    for p in problems:
        n = len(completions[p["task_id"]])
        res = [results[(p["task_id"], i)] for i in range(n)]
        per_problem.append({
            "task_id": p["task_id"],
            "n": n,
            "c": sum(r.passed for r in res),
            "statuses": [r.status for r in res],
            "details": [r.detail[-500:] for r in res],
        })
    return {
        "per_problem": per_problem,
        "pass@k": mean_pass_at_k([(r["n"], r["c"]) for r in per_problem], ks),
    }


# --------------------------------------------------------------------------------------
# Child side: runs as ``python -I -B sandbox.py CONFIG_JSON`` inside the sandbox.
# --------------------------------------------------------------------------------------


def _deny(name: str):
    def denied(*_args, **_kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    denied.__name__ = name.rsplit(".", 1)[-1]
    return denied


#: Calls the guard refuses outright: process creation/replacement, signals, identity
#: changes, fd-relative directory changes and the exit that skips the checks.
_DENIED_OS = (
    "fork forkpty register_at_fork kill killpg setsid setpgid setpgrp setuid setgid setreuid "
    "setregid setresuid setresgid system popen execv execve execl execle execlp execlpe "
    "execvp execvpe spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe "
    "posix_spawn posix_spawnp chroot fchdir fchmod fchown _exit"
).split()

#: Calls allowed only on paths inside the sandbox: name, the path arguments as
#: (position, keyword, matching dir_fd keyword), and whether a final symlink is followed.
_P, _SRC, _DST = (0, "path", "dir_fd"), (0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd")
_CONFINED_OS = (
    ("remove", (_P,), False),
    ("unlink", (_P,), False),
    ("rmdir", (_P,), False),
    ("mkdir", (_P,), False),
    ("rename", (_SRC, _DST), False),
    ("replace", (_SRC, _DST), False),
    ("link", (_SRC, _DST), True),
    ("symlink", ((1, "dst", "dir_fd"),), False),
    ("chmod", (_P,), True),
    ("lchmod", (_P,), False),
    ("chown", (_P,), True),
    ("lchown", (_P,), False),
    ("truncate", ((0, "path", None),), True),
    ("mkfifo", (_P,), False),
    ("mknod", (_P,), False),
    ("chdir", ((0, "path", None),), True),
)


def _install_guard(sandbox: str) -> None:
    """Refuse process, signal and network APIs, and file-system changes outside ``sandbox``.

    Best effort (a determined program can reach the kernel through ``ctypes``); the OS-level
    layers are the real protection, this one turns the usual attempts into clean errors.
    """
    import builtins
    import io
    import posix
    import socket

    import _posixsubprocess
    import _socket

    root = os.path.realpath(sandbox)
    real_readlink, realpath = os.readlink, os.path.realpath

    def resolve(path, dir_fd=None, follow=True) -> str:
        if isinstance(path, int):
            return real_readlink(f"/proc/self/fd/{path}")
        path = os.fsdecode(os.fspath(path))
        base = real_readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        full = os.path.join(base, path)
        if follow:
            return realpath(full)
        head, tail = os.path.split(os.path.normpath(full))
        return os.path.join(realpath(head), tail)

    def check(path, dir_fd=None, follow=True, what="changing") -> None:
        try:
            target = resolve(path, dir_fd, follow)
        except (OSError, TypeError, ValueError):
            target = None
        if target is None or not (target == root or target.startswith(root + os.sep)):
            raise PermissionError(f"{what} {path!r} outside the sandbox is disabled")

    def confine(name, func, params, follow_default):
        def confined(*args, **kwargs):
            follow = kwargs.get("follow_symlinks", follow_default)
            for pos, key, fd_key in params:
                path = args[pos] if pos < len(args) else kwargs.get(key)
                if path is not None:
                    check(path, kwargs.get(fd_key) if fd_key else None, follow)
            return func(*args, **kwargs)

        confined.__name__ = name
        return confined

    for name, params, follow in _CONFINED_OS:
        if hasattr(os, name):
            wrapped = confine(name, getattr(os, name), params, follow)
            setattr(os, name, wrapped)
            setattr(posix, name, wrapped)
    for name in _DENIED_OS:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _deny(f"os.{name}"))

    real_open, real_os_open = builtins.open, posix.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(ch in mode for ch in "wax+"):
            check(file, what="writing")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check(path, dir_fd, what="writing")
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open

    _posixsubprocess.fork_exec = _deny("_posixsubprocess.fork_exec")
    for name in ("Popen", "call", "run", "check_call", "check_output", "getoutput",
                 "getstatusoutput"):
        setattr(subprocess, name, _deny(f"subprocess.{name}"))

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sockets are disabled in the sandbox")

    socket.socket = socket.SocketType = _socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd"):
        if hasattr(socket, name):
            setattr(socket, name, _deny(f"socket.{name}"))
    signal.pthread_kill = _deny("signal.pthread_kill")


def _set_limits(cfg: dict) -> None:
    def limit(which, value):
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    limit(resource.RLIMIT_AS, cfg["memory_bytes"])
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    cpu = cfg["cpu_seconds"] if hard == resource.RLIM_INFINITY else min(cfg["cpu_seconds"], hard - 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
    limit(resource.RLIMIT_FSIZE, cfg["file_bytes"])
    limit(resource.RLIMIT_NPROC, cfg["nproc"])
    limit(resource.RLIMIT_NOFILE, 256)
    limit(resource.RLIMIT_CORE, 0)


def _drop_privileges(uid: int, keep_read_cap: bool) -> None:
    """Become ``uid`` (no groups); optionally keep only CAP_DAC_READ_SEARCH.

    The capability lets the unprivileged process read files it could not otherwise reach
    (e.g. an interpreter installed under ``/root``) while every write stays subject to
    ordinary permissions. ``no_new_privs`` makes setuid binaries useless afterwards.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_keepcaps, pr_set_no_new_privs, cap_dac_read_search = 8, 38, 2

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    if keep_read_cap:
        check(libc.prctl(pr_set_keepcaps, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if keep_read_cap:

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (Data * 2)()
        data[0].effective = data[0].permitted = 1 << cap_dac_read_search
        check(libc.capset(ctypes.byref(header), data), "capset")
        check(libc.prctl(pr_set_keepcaps, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    check(libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _report(exc: BaseException) -> None:
    """Print a short traceback of ``exc`` (program frames only)."""
    import traceback

    if isinstance(exc, SystemExit):
        print(f"SystemExit: program exited ({exc.code!r}) before its checks finished",
              file=sys.stderr)
    else:
        traceback.print_exception(type(exc), exc, exc.__traceback__, limit=-3)


def _run_worker(cfg: dict, exit_now) -> None:
    """Set up the sandboxed process, then execute ``program.py``; never returns."""
    status = _EXIT_SETUP
    try:
        try:
            os.chdir(cfg["sandbox"])
            os.umask(0o077)
            with open("program.py", encoding="utf-8") as f:
                source = f.read()
            _set_limits(cfg)
            if cfg["uid"] is not None:
                _drop_privileges(cfg["uid"], cfg["keep_read_cap"])
            if cfg["guard"]:
                _install_guard(cfg["sandbox"])
        except BaseException as exc:
            _report(exc)
            return

        namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        try:
            exec(compile(source, "program.py", "exec"), namespace)
            status = _EXIT_PASSED
        except BaseException as exc:
            status = _EXIT_FAILED if isinstance(exc, AssertionError) else _EXIT_ERROR
            # Free the program's memory first: reporting a MemoryError needs some.
            import traceback

            traceback.clear_frames(exc.__traceback__)
            namespace.clear()
            _report(exc)
    except BaseException:
        pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        exit_now(status)


def _launch(config_json: str) -> None:
    """Entry point inside the sandbox.

    In a PID namespace this process is init: it forks the worker, waits for it and exits
    with its status (128 + N for a worker killed by signal N); its exit kills every process
    left in the namespace. Without namespaces it is the worker itself.
    """
    cfg = json.loads(config_json)
    exit_now = os._exit  # kept before the guard replaces os._exit
    if not cfg["supervise"]:
        _run_worker(cfg, exit_now)
    pid = os.fork()
    if pid == 0:
        _run_worker(cfg, exit_now)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        exit_now(128 + os.WTERMSIG(status))
    exit_now(os.WEXITSTATUS(status) if os.WIFEXITED(status) else _EXIT_ERROR)


if __name__ == "__main__":
    _launch(sys.argv[1])
