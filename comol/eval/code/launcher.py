"""The launcher that runs INSIDE the sandbox: ``python -I -B launcher.py`` (stdlib only).

It reads one JSON document from stdin (limits, uid, the program), detaches stdin, sets the
resource limits, drops to the sandbox uid when started as root and runs the program. The
per-run pass token arrives on a pipe of its own (``token_fd``); the evaluator counts a pass
only when it reads back exactly that token from the result pipe (``result_fd``), never from
the exit code. Two ways to run:

* **split** (HumanEval, ``cfg["split"]``): the process forks. The child runs the untrusted code
  (prompt + completion) under the in-process guard and serves calls to the entry point; the
  parent, which never runs untrusted code, runs the trusted checks (prompt + test) with a proxy
  that calls the child over pipes and accepts only plain data back (restricted unpickling). The
  parent reads the token after the fork and writes it only when ``check(candidate)`` returned.
  The child has neither the token nor the result pipe, and cannot reach the parent's memory or
  descriptors (the parent is not dumpable, and both run as the same unprivileged uid). A result
  object that lies in ``__eq__`` cannot cross the pipe.
* **whole program** (``cfg["split"]`` absent): the program runs in the launcher's own process
  and the token is written when it has run to its end. A program written against this launcher
  can forge that (it shares the process); kept for code_eval-style references.

Exit codes (informative only): 1 an ``AssertionError``, 2 any other exception or an early
``exit()``, 3 the setup failed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import traceback  # imported before the uid drop: reporting must not need the disk

EXIT_DONE, EXIT_FAILED, EXIT_ERROR, EXIT_SETUP = 0, 1, 2, 3


# --------------------------------------------------------------------------------------
# In-process guard (second layer; the OS-level confinement is the real protection).
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


def install_guard(workdir: str) -> None:
    """Refuse process, signal and network APIs, and file-system changes outside ``workdir``.

    Best effort (a determined program reaches the kernel through ``ctypes`` or ``_io``);
    it turns the usual attempts into clean ``PermissionError``s.
    """
    import builtins
    import io
    import posix
    import socket

    import _posixsubprocess
    import _socket

    root = os.path.realpath(workdir)
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


# --------------------------------------------------------------------------------------
# Launcher.
# --------------------------------------------------------------------------------------


def set_limits(cfg: dict) -> None:
    def limit(which, value):
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    limit(resource.RLIMIT_AS, cfg["memory_bytes"])
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    cpu = cfg["cpu_seconds"] if hard == resource.RLIM_INFINITY else min(cfg["cpu_seconds"], hard - 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
    limit(resource.RLIMIT_FSIZE, cfg["file_bytes"])
    limit(resource.RLIMIT_NPROC, cfg["nproc"])
    limit(resource.RLIMIT_NOFILE, 64)
    limit(resource.RLIMIT_CORE, 0)


def drop_privileges(uid: int) -> None:
    """Become ``uid``/``uid`` without groups: every capability is lost with the uid change
    (no keep-caps), and ``no_new_privs`` (also set by bwrap) keeps it that way."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):  # empty the bounding set (needs CAP_SETPCAP; EINVAL past the last cap)
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError(f"could not drop to uid {uid}")


def _report(exc: BaseException) -> None:
    """Print a short traceback of ``exc`` (program frames only)."""
    if isinstance(exc, SystemExit):
        print(f"SystemExit: program exited ({exc.code!r}) before its checks finished",
              file=sys.stderr)
    else:
        traceback.print_exception(type(exc), exc, exc.__traceback__, limit=-3)


def _not_dumpable() -> None:
    """PR_SET_DUMPABLE 0: another process of the same uid can no longer open this one's
    ``/proc/<pid>/{fd,mem,environ}`` nor ptrace it (inherited by fork)."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


# --------------------------------------------------------------------------------------
# Split mode: messages between the checks (parent) and the program (child).
# --------------------------------------------------------------------------------------

#: largest message accepted from the program's process (a return value, pickled)
MAX_MESSAGE = 64 * 2**20
#: the only classes a return value may name (plain data; every other class is refused)
DATA_CLASSES = {("builtins", name) for name in ("complex", "set", "frozenset", "bytearray", "range", "slice")}


class CandidateError(Exception):
    """The program's entry point raised, returned something that is not plain data, or died."""


class _PlainData(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in DATA_CLASSES:
            import builtins

            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def _send(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=4)
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int, trusted: bool):
    """The next message, or None at end of pipe; from the program's process only plain data."""
    head = _read_exactly(fd, 8)
    if head is None:
        return None
    (size,) = struct.unpack("<Q", head)
    if size > MAX_MESSAGE:
        raise CandidateError(f"the program sent a {size}-byte message (limit {MAX_MESSAGE})")
    data = _read_exactly(fd, size)
    if data is None:
        return None
    if trusted:
        return pickle.loads(data)
    try:
        return _PlainData(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001
        raise CandidateError(f"the program returned something that is not plain data ({exc})") from None


def serve_program(source: str, entry_point: str, requests: int, replies: int) -> int:
    """Child: run the program, then answer ``(args, kwargs)`` calls of ``entry_point`` until
    the parent closes the pipe. Returns the exit status."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
        function = namespace[entry_point]
    except BaseException as exc:
        _report(exc)
        _send(replies, ("failed" if isinstance(exc, AssertionError) else "error", None))
        return EXIT_FAILED if isinstance(exc, AssertionError) else EXIT_ERROR
    _send(replies, ("ready", None))
    while True:
        call = _receive(requests, trusted=True)
        if call is None:
            return EXIT_DONE
        try:
            reply = ("ok", function(*call[0], **call[1]))
            pickle.dumps(reply, protocol=4)
        except BaseException as exc:  # noqa: BLE001  (the parent decides what it means)
            reply = ("raised", (type(exc).__name__, str(exc)[:500]))
        try:
            _send(replies, reply)
        except Exception as exc:  # noqa: BLE001
            _send(replies, ("raised", (type(exc).__name__, str(exc)[:500])))


def check_program(checks: str, entry_point: str, requests: int, replies: int) -> None:
    """Parent: run the trusted checks (prompt + test) on a proxy of the program's entry point.
    Returns only when ``check(candidate)`` returned; raises otherwise."""
    ready = _receive(replies, trusted=False)
    if not isinstance(ready, tuple) or ready[:1] != ("ready",):
        kind = ready[0] if isinstance(ready, tuple) and ready else None
        if kind == "failed":
            raise AssertionError("the program failed an assertion before its checks ran")
        raise CandidateError(f"the program did not define {entry_point} (it raised or exited first)")

    def candidate(*args, **kwargs):
        _send(requests, (args, kwargs))
        reply = _receive(replies, trusted=False)
        if not isinstance(reply, tuple) or len(reply) != 2:
            raise CandidateError(f"{entry_point}: the program's process ended or answered out of turn")
        kind, value = reply
        if kind == "ok":
            return value
        name, message = value if isinstance(value, tuple) and len(value) == 2 else ("?", "")
        if name == "AssertionError":
            raise AssertionError(f"{entry_point} raised AssertionError: {message}")
        raise CandidateError(f"{entry_point} raised {name}: {message}")

    candidate.__name__ = entry_point
    namespace = {"__name__": "__checks__", "__builtins__": __builtins__}
    exec(compile(checks, "checks.py", "exec"), namespace)
    namespace[entry_point] = candidate   # tests may call the function by its name too
    namespace["check"](candidate)


def _run_split(cfg: dict, split: dict, token_fd: int, result_fd: int, write, exit_now) -> int:
    """Fork; the child runs the program, this process the checks. Returns the exit status."""
    import signal as _signal

    _not_dumpable()
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the program's process: no token, no result pipe, no way back up
        status = EXIT_SETUP
        try:
            for fd in (token_fd, result_fd, requests_w, replies_r):
                os.close(fd)
            if cfg["guard"]:
                install_guard(cfg["workdir"])
            status = serve_program(cfg.pop("program"), split["entry_point"], requests_r, replies_w)
        except BaseException:
            pass
        finally:
            _flush_and_exit(exit_now, status)
    cfg.pop("program")
    os.close(requests_r)
    os.close(replies_w)
    token = os.read(token_fd, 256)   # only now, in the process that never runs the program
    os.close(token_fd)
    try:
        check_program(split["checks"], split["entry_point"], requests_w, replies_r)
    except BaseException as exc:
        _report(exc)
        return EXIT_FAILED if isinstance(exc, AssertionError) else EXIT_ERROR
    finally:
        try:
            os.kill(pid, _signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    write(result_fd, token)   # the checks ran to completion
    return EXIT_DONE


def main() -> None:
    exit_now, write, close = os._exit, os.write, os.close  # kept before the guard swaps them
    status = EXIT_SETUP
    try:
        try:
            cfg = json.loads(sys.stdin.buffer.read())
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            result_fd, token_fd = cfg.pop("result_fd"), cfg.pop("token_fd")
            split = cfg.pop("split", None)
            os.chdir(cfg["workdir"])
            os.umask(0o077)
            set_limits(cfg)
            if cfg["uid"] is not None:
                drop_privileges(cfg["uid"])
            if cfg["guard"] and not split:
                install_guard(cfg["workdir"])
        except BaseException as exc:
            _report(exc)
            return

        if split:
            try:
                status = _run_split(cfg, split, token_fd, result_fd, write, exit_now)
            finally:
                close(result_fd)
            return

        namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        try:
            code = compile(cfg.pop("program"), "program.py", "exec")
            exec(code, namespace)
        except BaseException as exc:
            status = EXIT_FAILED if isinstance(exc, AssertionError) else EXIT_ERROR
            # Free the program's memory first: reporting a MemoryError needs some.
            traceback.clear_frames(exc.__traceback__)
            namespace.clear()
            _report(exc)
        else:
            # The program ran to its end: only now is the token read and written back.
            write(result_fd, os.read(token_fd, 256))
            status = EXIT_DONE
        finally:
            close(result_fd)
    except BaseException:
        pass
    finally:
        _flush_and_exit(exit_now, status)


def _flush_and_exit(exit_now, status: int) -> None:
    """Flush what the program printed, then leave at once (no atexit, no finalizers of the program)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    exit_now(status)


if __name__ == "__main__":
    main()
