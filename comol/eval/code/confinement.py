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
caller gets a user namespace (``--unshare-user``) and keeps its own (unprivileged) uid.
"""

from __future__ import annotations

import os
import shutil
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


def interpreter_paths(python: str) -> list[str]:
    """Folders the interpreter needs, read-only: its prefix(es) (stdlib, site-packages,
    lib-dynload, libpython) plus the installation prefix of the real executable."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
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


def bwrap_command(bwrap: str, python: str, *, tmp_bytes: int, shm_bytes: int) -> list[str]:
    """The bwrap command line that starts ``python -I -B LAUNCHER`` confined."""
    root = os.geteuid() == 0
    cmd = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
    if root:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                "--cap-add", "CAP_SETPCAP"]
    else:
        cmd += ["--unshare-user", "--disable-userns"]
    made: set[str] = set()

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
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(int(tmp_bytes)), "--tmpfs", WORKDIR,
            "--perms", "1777", "--size", str(int(shm_bytes)), "--tmpfs", "/dev/shm",
            "--remount-ro", "/",
            "--chdir", WORKDIR, "--clearenv"]
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
            cmd = bwrap_command(bwrap, python, tmp_bytes=2**20, shm_bytes=2**20)
            try:
                proc = subprocess.run([*cmd, python, "-I", "-B", "-c", "import os; os.listdir('/tmp')"],
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
                err = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
            except (OSError, subprocess.SubprocessError) as exc:
                err = str(exc)
            _probe_cache[key] = None if err is None else (
                f"bubblewrap ({bwrap}) cannot create the sandbox here ({err}); it needs root or "
                "unprivileged user namespaces")
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
