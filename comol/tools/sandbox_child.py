"""The launcher that runs INSIDE the sandbox: ``python -I -B sandbox_child.py`` (stdlib only).

It reads one JSON document from stdin (limits, uid, the program, the pass token), detaches
stdin, sets the resource limits, drops to the sandbox uid when started as root, installs
the in-process guard and executes the program. Only when the program (prompt + completion +
test + ``check(entry_point)``) has run to its end does it write the per-run token to the
result pipe (fd ``result_fd``); the evaluator counts a pass only when it reads back exactly
that token, never from the exit code. Exit codes (informative only): 1 an ``AssertionError``,
2 any other exception or an early ``exit()``, 3 the setup failed.
"""

from __future__ import annotations

import json
import os
import resource
import signal
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


def main() -> None:
    exit_now, write, close = os._exit, os.write, os.close  # kept before the guard swaps them
    status = EXIT_SETUP
    try:
        try:
            cfg = json.loads(sys.stdin.buffer.read())
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            result_fd, token = cfg.pop("result_fd"), cfg.pop("token").encode()
            source = cfg.pop("program")
            os.chdir(cfg["workdir"])
            os.umask(0o077)
            set_limits(cfg)
            if cfg["uid"] is not None:
                drop_privileges(cfg["uid"])
            if cfg["guard"]:
                install_guard(cfg["workdir"])
        except BaseException as exc:
            _report(exc)
            return

        namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        try:
            code = compile(source, "program.py", "exec")
            del source
            exec(code, namespace)
        except BaseException as exc:
            status = EXIT_FAILED if isinstance(exc, AssertionError) else EXIT_ERROR
            # Free the program's memory first: reporting a MemoryError needs some.
            traceback.clear_frames(exc.__traceback__)
            namespace.clear()
            _report(exc)
        else:
            # The checks ran to completion: only now does the token leave this process.
            write(result_fd, token)
            status = EXIT_DONE
        finally:
            close(result_fd)
    except BaseException:
        pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        exit_now(status)


if __name__ == "__main__":
    main()
