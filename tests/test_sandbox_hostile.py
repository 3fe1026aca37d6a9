"""Hostile completions, table-driven: each is contained, scored not passed, leaves nothing behind.

Every attack is written so that it would PASS if it succeeded: it sets ``ok`` when the
forbidden thing worked and ends with ``assert ok`` (or is itself an attempt to forge a pass).
Each case runs with the in-process guard on (the default) and off (the OS confinement alone).
Afterwards no file carrying the run's marker may exist in /tmp, /dev/shm, the repository or
the caller's home, and no sandbox process may be left.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~90 sandboxed runs: the full table runs in CI (-m slow)

from comol.eval.code.confinement import LAUNCHER, interpreter_paths
from comol.eval.code.humaneval import build_program, whole_program
from comol.eval.code.sandbox import SplitProgram, describe_sandbox, run_program

SANDBOX = describe_sandbox()
if SANDBOX["problem"]:
    pytest.fail(f"the hostile-completion tests need OS confinement: {SANDBOX['problem']}", pytrace=False)

REPO = Path(__file__).resolve().parents[1]
HOME = Path(os.path.expanduser("~"))
ROOT = os.geteuid() == 0


def _try(attack: str) -> str:
    """``ok = False``; run ``attack`` (which sets ``ok = True`` when it worked); ``assert ok``."""
    body = "".join(f"    {line}\n" for line in attack.strip("\n").splitlines())
    return f"ok = False\ntry:\n{body}except BaseException as exc:\n    print(repr(exc))\nassert ok\n"


LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"

#: id -> program template; fields: {marker} (unique per run), {repo}, {home}, {secret_dir},
#: {secret_name}, {port}, {pid} (the evaluator's pid). Attacks that "succeed" only inside the
#: sandbox's private tmpfs (writes to /tmp, /dev/shm) are checked by the leftover scan instead.
CASES = {
    # ---- reading the machine's files
    "read-etc-shadow": _try("ok = len(open('/etc/shadow').read()) > 0"),
    "read-0600-in-0700-dir": _try("ok = open('{secret_dir}/{secret_name}').read() == 'secret'"),
    "read-0600-in-0700-dir-mounted": _try("ok = open('{mounted_secret}').read() == 'secret'"),
    "list-home": _try("import os\nok = '{secret_name}' in os.listdir('{home}')"),
    "read-home-file": _try("ok = open('{home}/{secret_name}').read() == 'secret'"),
    "read-repo": _try("ok = len(open('{repo}/pyproject.toml').read()) > 0"),
    "env-secret": _try("import os\nok = 'COMOL_HOSTILE_SECRET' in os.environ"),
    # ---- writing outside
    "write-open-tmp": _try("open('/tmp/{marker}', 'w').write('x')") + "assert False\n",
    "write-io-open-tmp": _try("import _io\n_io.open('/tmp/{marker}', 'w').write('x')") + "assert False\n",
    "write-os-open-tmp": _try("import os\nos.write(os.open('/tmp/{marker}', os.O_WRONLY | os.O_CREAT), b'x')")
    + "assert False\n",
    "write-io-open-shm": _try("import _io\n_io.open('/dev/shm/{marker}', 'w').write('x')") + "assert False\n",
    "write-os-open-shm": _try("import os\nos.write(os.open('/dev/shm/{marker}', os.O_WRONLY | os.O_CREAT), b'x')")
    + "assert False\n",
    "write-open-repo": _try("open('{repo}/{marker}', 'w').write('x')\nok = True"),
    "write-io-open-repo": _try("import _io\n_io.open('{repo}/{marker}', 'w').write('x')\nok = True"),
    "write-os-open-repo": _try("import os\nos.write(os.open('{repo}/{marker}', os.O_WRONLY | os.O_CREAT), b'x')\n"
                               "ok = True"),
    "write-io-open-home": _try("import _io\n_io.open('{home}/{marker}', 'w').write('x')\nok = True"),
    "write-ctypes-open-repo": _try(LIBC + "ok = libc.open(b'{repo}/{marker}', 0o101, 0o644) >= 0"),
    "fill-tmp": _try("import _io, os\nfor i in range(64):\n"
                     "    with _io.open(f'/tmp/{marker}-{{i}}', 'wb') as f:\n"
                     "        f.write(b'x' * 2**20 * 8)\nok = True"),
    "fill-dev-shm": _try("import _io, os\nfor i in range(64):\n"
                         "    with _io.open(f'/dev/shm/{marker}-{{i}}', 'wb') as f:\n"
                         "        f.write(b'x' * 2**20 * 8)\nok = True"),
    # ---- the host's processes
    "host-proc": _try("import os\nok = any(b'pytest' in open(f'/proc/{{p}}/cmdline', 'rb').read()\n"
                      "         for p in os.listdir('/proc') if p.isdigit())"),
    "host-proc-pid": _try("ok = b'pytest' in open('/proc/{pid}/cmdline', 'rb').read()"),
    "kill-evaluator": _try("import os, signal\nos.kill({pid}, signal.SIGKILL)\nok = True"),
    "kill-parent": _try("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nok = True"),
    "ctypes-kill-evaluator": _try(LIBC + "ok = libc.kill({pid}, 9) == 0"),
    "ctypes-kill-all": _try(LIBC + "ok = libc.kill(-1, 9) == 0"),
    # ---- network
    "socket-connect": _try("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                           "ok = True"),
    "io-socket-connect": _try("import _socket\ns = _socket.socket()\ns.settimeout(1)\n"
                              "s.connect(('127.0.0.1', {port}))\nok = True"),
    "ctypes-raw-socket": _try(LIBC + "import struct\nfd = libc.syscall(41, 2, 1, 0)\n"
                              "addr = struct.pack('!HH4s8x', 0, {port}, bytes([127, 0, 0, 1]))\n"
                              "addr = struct.pack('=H', 2) + addr[2:]\n"
                              "ok = fd >= 0 and libc.connect(fd, addr, len(addr)) == 0"),
    # ---- processes that outlive the run
    "fork-bomb": _try("import os\nwhile True:\n    os.fork()"),
    "detached-child": _try("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
                           "'import time; time.sleep(60)', '{marker}'], start_new_session=True)\n"
                           "ok = True") + "import time\ntime.sleep(60)\n",
    "ctypes-fork-bomb": _try(LIBC + "while True:\n    libc.fork()"),
    # ---- resources
    "memory-hog": _try("x = bytearray(10**11)\nok = True"),
    "infinite-loop": "while True:\n    pass\n",
    "huge-stdout": "import sys\nfor _ in range(2000):\n    sys.stdout.write('x' * 100000)\nassert False\n",
    # ---- forging a pass
    "sys-exit-0": "import sys\nsys.exit(0)\n",
    "os-exit-0": "import os\nos._exit(0)\n",
    "ctypes-exit-0": "import ctypes\nctypes.CDLL(None)._exit(0)\n",
    "exec-python-pass": "import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'pass'])\n",
    "print-passed": "import ctypes\nprint('passed')\nctypes.CDLL(None)._exit(0)\n",
    "write-guessed-token": "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 32)\n"
                           "    except OSError:\n        pass\nimport ctypes\nctypes.CDLL(None)._exit(0)\n",
    "raise-in-atexit": "import atexit, sys\natexit.register(lambda: None)\nsys.exit(0)\n",
}

#: Cases that need more time than the default (they end by timeout or fill memory).
SLOW_TIMEOUT = {"fork-bomb": 2.0, "ctypes-fork-bomb": 2.0, "infinite-loop": 1.0, "detached-child": 1.0}


@pytest.fixture(scope="module")
def secrets_on_disk():
    """A 0600 file in a 0700 folder (not mounted), one in the caller's home, and one inside the
    interpreter prefix, which IS mounted read-only: only the uid drop protects that one."""
    name = f"comol-hostile-secret-{secrets.token_hex(4)}"
    folder = Path(f"/var/tmp/{name}")
    folder.mkdir(mode=0o700)
    (folder / name).write_text("secret")
    os.chmod(folder / name, 0o600)
    home_file = HOME / name
    home_file.write_text("secret")
    os.chmod(home_file, 0o600)
    mounted_dir = Path(interpreter_paths(os.path.realpath(os.sys.executable))[0]) / name
    mounted_dir.mkdir(mode=0o700)
    (mounted_dir / "secret").write_text("secret")
    os.chmod(mounted_dir / "secret", 0o600)
    os.environ["COMOL_HOSTILE_SECRET"] = "secret"
    yield {"secret_dir": str(folder), "secret_name": name, "mounted_secret": str(mounted_dir / "secret")}
    os.environ.pop("COMOL_HOSTILE_SECRET", None)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(mounted_dir, ignore_errors=True)
    home_file.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    yield srv
    srv.close()


def _leftovers(marker: str) -> list[str]:
    found = []
    for folder in ("/tmp", "/dev/shm", "/var/tmp", str(REPO), str(HOME)):
        found += glob.glob(os.path.join(folder, f"*{marker}*"))
    return found


def _sandbox_processes(marker: str) -> list[int]:
    """Host processes of a sandbox: the launcher, or anything carrying ``marker``."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if LAUNCHER.encode() in cmdline or marker.encode() in cmdline:
                pids.append(int(name))
    return pids


def _wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _as_sample(program: str) -> SplitProgram:
    """The attack as a HumanEval sample run split (the evaluator's path): it PASSES if the attack
    lets the program get past ``assert ok``, since the function it then defines is right."""
    return SplitProgram(program=program + "\ndef f():\n    return 1\n",
                        checks="def check(candidate):\n    assert candidate() == 1\n", entry_point="f")


@pytest.mark.parametrize("mode", ["guard", "no-guard", "split"])
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_completion_is_contained(case, mode, secrets_on_disk, listener):
    if case == "read-0600-in-0700-dir-mounted" and not ROOT:
        pytest.skip("a non-root caller owns the file itself: the case is about dropping root")
    marker = f"comol-hostile-{secrets.token_hex(6)}"
    program = CASES[case].format(marker=marker, repo=REPO, home=HOME, port=listener.getsockname()[1],
                                 pid=os.getpid(), **secrets_on_disk)
    timeout = SLOW_TIMEOUT.get(case, 5.0)
    start = time.monotonic()
    if mode == "split":
        program = _as_sample(program)
    res = run_program(program, timeout=timeout, memory_mb=512, guard=mode != "no-guard")
    elapsed = time.monotonic() - start
    assert res.status != "passed", (case, res)
    assert res.status in ("failed", "error", "timeout")
    assert elapsed < timeout + 4.0, (case, elapsed)
    assert _leftovers(marker) == []
    assert _wait_until(lambda: _sandbox_processes(marker) == []), _sandbox_processes(marker)
    with pytest.raises(socket.timeout):  # nothing reached the host's listener
        listener.accept()[0].close()


def test_the_sandbox_is_what_the_docs_say():
    """Seen from inside: own PID, network, IPC, UTS and mount namespaces, no_new_privs, no
    capabilities, a throw-away uid (root callers), the hostname, and a 16 MiB /tmp and /dev/shm."""
    probe = (
        "import os, sys\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
        "ns = {n: os.readlink(f'/proc/self/ns/{n}') for n in ('pid', 'net', 'ipc', 'uts', 'mnt')}\n"
        "vfs = {d: os.statvfs(d).f_blocks * os.statvfs(d).f_frsize for d in ('/tmp', '/dev/shm')}\n"
        "print(repr({'ns': ns, 'nnp': status['NoNewPrivs'].strip(), 'cap': status['CapEff'].strip(),\n"
        "            'uid': os.getuid(), 'host': os.uname().nodename, 'size': vfs}), file=sys.stderr)\n"
        "assert False\n"
    )
    res = run_program(probe, timeout=5.0)
    assert res.status == "failed", res
    import ast

    seen = ast.literal_eval(res.detail.strip().splitlines()[0])
    for name, link in seen["ns"].items():
        assert link != os.readlink(f"/proc/self/ns/{name}"), name    # not the evaluator's namespace
    assert seen["nnp"] == "1" and int(seen["cap"], 16) == 0 and seen["host"] == "sandbox"
    assert seen["size"] == {"/tmp": 16 * 2**20, "/dev/shm": 16 * 2**20}
    if ROOT:
        assert seen["uid"] >= 2_000_000_000


def test_the_in_process_guard_refuses_what_the_os_would_allow():
    """The guard is a layer of its own: inside the sandbox, writing to the private /dev/shm and
    starting a process are allowed by the OS (guard off) and refused by the guard (guard on)."""
    attempts = {
        "write": ("open('/dev/shm/x', 'w').write('x')\n", "writing '/dev/shm/x' outside the sandbox is disabled"),
        "spawn": ("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'pass'], check=True)\n",
                  "subprocess.run is disabled in the sandbox"),
        "fork": ("import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)\n",
                 "os.fork is disabled in the sandbox"),
    }
    for name, (program, refusal) in attempts.items():
        assert run_program(program, timeout=5.0, guard=False).status == "passed", name
        res = run_program(program, timeout=5.0, guard=True)
        assert res.status == "error" and refusal in res.detail, (name, res)


def test_the_sandbox_dies_with_the_evaluator():
    """--die-with-parent: an evaluator killed mid-run (SIGKILL, no cleanup) leaves no sandbox behind."""
    import subprocess
    import sys

    def launchers() -> list[int]:   # sandbox launchers on the host, whoever started them
        return [p for p in _sandbox_processes("\0no marker\0") if p != evaluator.pid]

    evaluator = subprocess.Popen([sys.executable, "-c", "from comol.eval.code.sandbox import run_program\n"
                                  "run_program('import time\\ntime.sleep(120)', timeout=120)\n"], cwd=REPO)
    try:
        assert _wait_until(lambda: launchers() != [], timeout=30), "the sandbox never started"
        time.sleep(0.5)   # well inside the program's sleep
    finally:
        evaluator.kill()
        evaluator.wait()
    assert _wait_until(lambda: launchers() == [], timeout=10), launchers()


@pytest.mark.parametrize("case", ["read-etc-shadow", "read-0600-in-0700-dir-mounted", "host-proc",
                                  "host-proc-pid", "socket-connect", "ctypes-raw-socket", "ctypes-exit-0"])
def test_attacks_work_unconfined(case, secrets_on_disk, listener):
    """The table can fail: without OS confinement and guard the same programs DO pass (or, for
    the forged exit, are caught by the token alone), so the confined runs above prove something."""
    if not ROOT and case in ("read-etc-shadow", "read-0600-in-0700-dir-mounted"):
        pytest.skip("reading root's files needs a root caller")
    program = CASES[case].format(marker="m", repo=REPO, home=HOME, port=listener.getsockname()[1],
                                 pid=os.getpid(), **secrets_on_disk)
    res = run_program(program, timeout=5.0, guard=False, confine=False)
    if case == "ctypes-exit-0":
        assert res.status == "error" and "before its checks finished" in res.detail, res
    else:
        assert res.status == "passed", res
    if "socket" in case:
        listener.accept()[0].close()


ADD = {"prompt": "def add(a, b):\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n"}

#: Completions of ``add`` that answer wrongly and try to forge a pass from inside the program's
#: process instead: each would pass if it reached the token, the result pipe or the checks.
FORGERIES = {
    "frame-walk": "    import sys\n    f = sys._getframe()\n    while f is not None:\n"
                  "        loc = f.f_locals\n        if 'result_fd' in loc and ('token' in loc or 'token_fd' in loc):\n"
                  "            import os\n            tok = loc.get('token') or os.read(loc['token_fd'], 256)\n"
                  "            loc.get('write', os.write)(loc['result_fd'], tok)\n        f = f.f_back\n"
                  "    return -999\n",
    "read-every-fd": "    import os\n    got = b''\n    for fd in range(3, 64):\n        try:\n"
                     "            got += os.read(fd, 256) if not got else b''\n        except OSError:\n"
                     "            pass\n    for fd in range(3, 64):\n        try:\n            os.write(fd, got)\n"
                     "        except OSError:\n            pass\n    return -999\n",
    "parent-fds-via-proc": "    import os\n    ppid = os.getppid()\n    got = b''\n    for fd in range(64):\n"
                           "        try:\n            got += open(f'/proc/{ppid}/fd/{fd}', 'rb').read(256)\n"
                           "        except OSError:\n            pass\n    for fd in range(64):\n        try:\n"
                           "            open(f'/proc/{ppid}/fd/{fd}', 'wb').write(got)\n        except OSError:\n"
                           "            pass\n    return -999\n",
    "parent-memory": "    import os\n    try:\n        open(f'/proc/{os.getppid()}/mem', 'rb').read(1)\n"
                     "        return a + b\n    except OSError:\n        return -999\n",
    "ptrace-parent": "    import ctypes, os\n    libc = ctypes.CDLL(None, use_errno=True)\n"
                     "    return a + b if libc.ptrace(16, os.getppid(), 0, 0) == 0 else -999\n",
    "gc-walk": "    import gc, os\n    for o in gc.get_objects():\n        if isinstance(o, dict) and 'result_fd' in o:\n"
               "            for fd in range(3, 64):\n                try:\n"
               "                    os.write(o['result_fd'], os.read(fd, 256))\n                except OSError:\n"
               "                    pass\n    return -999\n",
    "eq-always-true": "    class Any:\n        def __eq__(self, other):\n            return True\n    return Any()\n",
    "eq-always-true-global": "    return ANY\nclass Any:\n    def __eq__(self, other):\n        return True\nANY = Any()\n",
    "kill-the-checks": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return -999\n",
    "exit-0": "    import ctypes\n    ctypes.CDLL(None)._exit(0)\n",
}


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no-guard"])
@pytest.mark.parametrize("case", list(FORGERIES))
def test_a_split_sample_cannot_forge_a_pass(case, guard):
    """HumanEval samples run split: the checks and the token live in a process the completion
    never runs in, so none of these forgeries passes, with or without the in-process guard."""
    res = run_program(build_program(ADD, FORGERIES[case]), timeout=5.0, guard=guard)
    assert res.status in ("failed", "error", "timeout"), (case, res)   # read-every-fd blocks on its own pipe


@pytest.mark.parametrize("case", ["frame-walk", "read-every-fd", "eq-always-true"])
def test_forgeries_pass_when_checks_share_the_process(case):
    """The control: run as ONE program (as other harnesses do), the same completions DO pass, so
    the split runs above prove something. This is the documented limit of whole-program runs."""
    assert run_program(whole_program(ADD, FORGERIES[case]), timeout=5.0, guard=False).status == "passed"


def test_split_sample_right_and_wrong_answers():
    assert run_program(build_program(ADD, "    return a + b\n")).status == "passed"
    assert run_program(build_program(ADD, "    return a - b\n")).status == "failed"
    assert run_program(build_program(ADD, "    raise ValueError('no')\n")).status == "error"
    assert run_program(build_program(ADD, "    return [a + b]\n")).status == "failed"
