"""OS-level confinement of one sandboxed run with bubblewrap (``bwrap``).

:func:`bwrap_command` builds the command line: a new mount namespace whose root is an empty
tmpfs holding only read-only binds of what the interpreter needs (its prefix, which holds the
stdlib and site-packages, the system libraries under ``/usr/lib*``, and the launcher file),
a fresh ``/proc`` of the sandbox's own PID namespace, a minimal ``/dev``, and private
size-limited tmpfs ``/tmp`` and ``/dev/shm``. No home, no ``/etc``, no repository. New
PID, network, IPC, UTS and cgroup namespaces; bwrap's init is PID 1, so every process of the
run dies with it, and ``--die-with-parent`` kills it with the evaluator. When the caller is
root, no user namespace is used: all capabilities but CAP_SETUID/CAP_SETGID/CAP_SETPCAP are dropped and
the launcher becomes a throw-away unprivileged uid before it reads the program; a non-root
caller gets a user namespace (``--unshare-user --disable-userns``) and keeps its own
(unprivileged) uid. For every caller a seccomp filter (:func:`seccomp_program`, loaded by bwrap
before the launcher starts) refuses new user namespaces (``unshare``/``clone`` with
``CLONE_NEWUSER``, ``clone3``, ``setns``), the only way an unprivileged process regains
capabilities (and with them ``mount``).
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import struct
import subprocess
import sys
import sysconfig
import threading

from comol.errors import ComolError

#: Path of the launcher inside the sandbox (bound read-only from comol/eval/code/launcher.py).
LAUNCHER = "/.comol/launcher.py"
LAUNCHER_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
#: Working folder (and HOME, TMPDIR) inside the sandbox: a private tmpfs.
WORKDIR = "/tmp"


class ConfinementUnavailable(ComolError, RuntimeError):
    """OS-level confinement (bubblewrap) is missing or does not work on this machine."""


#: Per architecture: the audit arch of its syscalls and the numbers of unshare, clone, clone3, setns.
SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, {"unshare": 272, "clone": 56, "clone3": 435, "setns": 308}),
    "aarch64": (0xC00000B7, {"unshare": 97, "clone": 220, "clone3": 435, "setns": 268}),
}
CLONE_NEWUSER = 0x10000000
_X32_SYSCALL_BIT = 0x40000000


def seccomp_program(machine: str | None = None) -> bytes:
    """The classic-BPF seccomp filter of every sandboxed run (``struct sock_filter`` array).

    Refused with ``EPERM``: ``unshare`` and ``clone`` whose flags hold ``CLONE_NEWUSER``, ``setns``,
    syscalls of another ABI (i386, x32). ``clone3`` gets ``ENOSYS`` (its flags sit in memory a
    filter cannot read; the C library then falls back to ``clone``). Everything else is allowed.
    """
    machine = machine or platform.machine()
    if machine not in SECCOMP_ARCHES:
        raise ConfinementUnavailable(f"no seccomp filter for the {machine} architecture (known: "
                                     f"{', '.join(SECCOMP_ARCHES)})")
    arch, nr = SECCOMP_ARCHES[machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06   # BPF_LD|W|ABS, JMP|JEQ/JGE/JSET|K, RET|K
    allow, eperm = 0x7FFF0000, 0x00050000 | errno.EPERM
    enosys = 0x00050000 | errno.ENOSYS
    # (code, target-if-true, target-if-false, k): targets are labels resolved below
    prog = [
        (ld, None, None, 4),                          # seccomp_data.arch
        (jeq, "next", "eperm", arch),
        (ld, None, None, 0),                          # seccomp_data.nr
        (jge, "eperm", "next", _X32_SYSCALL_BIT) if machine == "x86_64" else None,
        (jeq, "flags", "next", nr["unshare"]),
        (jeq, "flags", "next", nr["clone"]),
        (jeq, "enosys", "next", nr["clone3"]),
        (jeq, "eperm", "next", nr["setns"]),
        (ret, None, None, allow),
        ("flags", ld, None, None, 16),                # low 32 bits of args[0] (little endian)
        (jset, "eperm", "next", CLONE_NEWUSER),
        (ret, None, None, allow),
        ("eperm", ret, None, None, eperm),
        ("enosys", ret, None, None, enosys),
    ]
    prog = [p if isinstance(p[0], str) else (None, *p) for p in prog if p is not None]
    labels = {p[0]: i for i, p in enumerate(prog) if p[0]}
    out = b""
    for i, (_label, code, jt, jf, k) in enumerate(prog):
        off = [0 if t in (None, "next") else labels[t] - i - 1 for t in (jt, jf)]
        out += struct.pack("=HBBI", code, *off, k)
    return out


def seccomp_pipe() -> int:
    """A pipe's read end holding :func:`seccomp_program`, for bwrap's ``--seccomp FD``."""
    program = seccomp_program()
    read_end, write_end = os.pipe()
    os.write(write_end, program)   # a few hundred bytes: fits the pipe's buffer
    os.close(write_end)
    return read_end


def interpreter_paths(python: str) -> list[str]:
    """Folders the interpreter needs, read-only: its prefix(es) (stdlib, site-packages,
    lib-dynload, libpython) plus the installation prefix of the real executable."""
    # not realpath: a venv's python is a symlink to its base interpreter, with another prefix
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        out = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
               *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))]
    else:
        code = ("import sys, sysconfig; p = sysconfig.get_paths(); print('\\n'.join([sys.prefix, "
                "sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix] + [p[k] for k in "
                "('stdlib', 'platstdlib', 'purelib', 'platlib')]))")
        out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60,
                             check=True).stdout.split("\n")
    real = os.path.realpath(python)
    out.append(os.path.dirname(os.path.dirname(real)))  # <prefix>/bin/python -> <prefix>
    paths = sorted({os.path.realpath(p) for p in out if p and os.path.isdir(p)})
    # Keep only the outermost folders (a prefix already holds its stdlib and site-packages).
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


def system_paths() -> list[str]:
    """System folders a dynamically linked interpreter needs (libc, libssl, ...)."""
    return [p for p in ("/usr/lib", "/usr/lib64", "/usr/lib32") if os.path.isdir(p)]


def bwrap_command(bwrap: str, python: str, *, tmp_bytes: int, shm_bytes: int, seccomp_fd: int) -> list[str]:
    """The bwrap command line that starts ``python -I -B LAUNCHER`` confined; ``seccomp_fd`` is a
    descriptor of :func:`seccomp_pipe` (the caller passes it to bwrap, which consumes it)."""
    root = os.geteuid() == 0
    cmd = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox",
           "--seccomp", str(int(seccomp_fd))]
    if root:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                "--cap-add", "CAP_SETPCAP"]
    else:
        cmd += ["--unshare-user", "--disable-userns"]
    # the private /tmp and /dev/shm first: the binds below land on top of them, so an interpreter
    # that lives under /tmp (a venv there, a node-local $TMPDIR) stays visible
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(int(tmp_bytes)), "--tmpfs", WORKDIR,
            "--perms", "1777", "--size", str(int(shm_bytes)), "--tmpfs", "/dev/shm"]
    made: set[str] = {WORKDIR, "/dev", "/dev/shm", "/proc"}

    def bind(path: str, dest: str | None = None) -> None:
        dest = dest or path
        # bwrap would create missing parents with mode 0700 (as root), out of the uid's reach
        parents = []
        parent = os.path.dirname(dest)
        while parent not in ("/", "") and parent not in made:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for folder in reversed(parents):
            cmd.extend(["--perms", "0755", "--dir", folder])
            made.add(folder)
        cmd.extend(["--ro-bind", path, dest])

    for path in system_paths():
        bind(path)
    for name in ("lib", "lib64", "lib32", "bin"):
        target = f"/{name}"
        if os.path.islink(target):
            cmd += ["--symlink", os.readlink(target), target]
        elif name != "bin" and os.path.isdir(target):
            bind(target)
    bound = set(system_paths())
    for path in interpreter_paths(python):
        if not any(path == b or path.startswith(b + "/") for b in bound):
            bind(path)
    bind(LAUNCHER_SOURCE, LAUNCHER)
    cmd += ["--remount-ro", "/", "--chdir", WORKDIR, "--clearenv"]
    return cmd


_probe_lock = threading.Lock()
_probe_cache: dict[str, str | None] = {}


def find_bwrap() -> str | None:
    """Path of the ``bwrap`` executable, or None (tests monkeypatch this to simulate a
    machine without bubblewrap)."""
    return shutil.which("bwrap")


def confinement_problem(python: str | None = None) -> str | None:
    """None when bwrap confines a run here, else one sentence saying what is missing."""
    python = python or sys.executable
    bwrap = find_bwrap()
    if bwrap is None:
        return ("bubblewrap (`bwrap`) is not installed: install it (Debian/Ubuntu: "
                "`apt-get install -y bubblewrap`)")
    key = f"{bwrap}\0{python}"
    with _probe_lock:
        if key not in _probe_cache:
            seccomp_fd = None
            try:
                seccomp_fd = seccomp_pipe()
                cmd = bwrap_command(bwrap, python, tmp_bytes=2**20, shm_bytes=2**20, seccomp_fd=seccomp_fd)
                proc = subprocess.run([*cmd, python, "-I", "-B", "-c", "import os; os.listdir('/tmp')"],
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                                      pass_fds=(seccomp_fd,))
                err = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
            except (OSError, subprocess.SubprocessError, ConfinementUnavailable) as exc:
                err = str(exc)
            finally:
                if seccomp_fd is not None:
                    os.close(seccomp_fd)
            _probe_cache[key] = None if err is None else (
                f"bubblewrap ({bwrap}) cannot create the sandbox here: starting {python} in it failed "
                f"({err}); bwrap needs root or unprivileged user namespaces, and the interpreter "
                "readable by the sandbox's uid")
        return _probe_cache[key]


def require_confinement(python: str | None = None) -> str:
    """The ``bwrap`` path; raises :class:`ConfinementUnavailable` (one sentence) otherwise."""
    problem = confinement_problem(python)
    if problem:
        raise ConfinementUnavailable(
            f"refusing to execute generated code without OS confinement: {problem}, or allow "
            "unconfined execution explicitly with eval.allow_unconfined=true "
            "(run_program(..., confine=False))")
    return find_bwrap()
