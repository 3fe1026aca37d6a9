"""Sandboxed execution of HumanEval programs: correctness, timeouts and hostile completions.

Hostile programs run with the in-process guard on (the default) under both isolation modes,
and again with the guard OFF to prove the OS-level layers (namespaces, unprivileged uid,
resource limits) hold on their own where this machine provides them.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from comol.tools.sandbox import (
    ExecResult,
    build_program,
    describe_sandbox,
    evaluate_humaneval,
    evaluate_programs,
    run_program,
)
from comol.eval.eval_files import humaneval_file, load_humaneval, require_data_dir

SANDBOX = describe_sandbox()
HAS_NAMESPACES = SANDBOX["isolation"] == "namespaces"
ISOLATIONS = ["auto", "none"] if HAS_NAMESPACES else ["none"]


@pytest.fixture(scope="module")
def problems():
    try:
        data_dir = require_data_dir()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    return load_humaneval(humaneval_file(data_dir))


@pytest.fixture(scope="module")
def by_id(problems):
    return {p["task_id"]: p for p in problems}


def _run(program: str, **kw) -> ExecResult:
    kw.setdefault("timeout", 5.0)
    return run_program(program, **kw)


def _program(problem: dict, body: str) -> str:
    """A HumanEval program whose completion is ``body`` (indented into the function)."""
    completion = "".join(f"    {line}\n" for line in body.strip("\n").splitlines())
    return build_program(problem, completion)


def _n_processes() -> int:
    return sum(name.isdigit() for name in os.listdir("/proc"))


def _n_matching(marker: str) -> int:
    """Processes whose command line contains ``marker``."""
    n = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    n += 1
        except OSError:
            pass
    return n


def _wait_until(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


@pytest.fixture
def sandbox_root():
    """A private folder for this test's sandboxes (traversable by the sandbox uid); its
    unique path appears on the command line of every sandboxed process."""
    root = tempfile.mkdtemp(prefix="comol-test-sandboxes-")
    os.chmod(root, 0o711)
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ basics


def test_build_program_layout():
    problem = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1", "entry_point": "f"}
    assert build_program(problem, "    return 1") == (
        "def f():\n    return 1\ndef check(c):\n    assert c() == 1\ncheck(f)\n"
    )


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_statuses(isolation):
    assert _run("x = 1", isolation=isolation).status == "passed"
    res = _run("assert 1 == 2, 'boom'", isolation=isolation)
    assert res.status == "failed" and "AssertionError: boom" in res.detail
    res = _run("raise KeyError('k')", isolation=isolation)
    assert res.status == "error" and "KeyError" in res.detail
    res = _run("def f(:\n  pass", isolation=isolation)
    assert res.status == "error" and "SyntaxError" in res.detail
    res = _run("raise SystemExit(0)", isolation=isolation)  # exiting early is not a pass
    assert res.status == "error" and "SystemExit" in res.detail
    # Ordinary programs can still use imports and their sandbox folder.
    ok = ("import hashlib, tempfile, os, re, math, collections, itertools, functools\n"
          "p = os.path.join(tempfile.gettempdir(), 'x.txt')\n"
          "open(p, 'w').write('hi')\nassert open(p).read() == 'hi'\n"
          "assert hashlib.md5(b'a').hexdigest().startswith('0cc1')\n")
    assert _run(ok, isolation=isolation).status == "passed"


def test_output_is_truncated():
    res = _run("print('x' * 100000)\nassert False", max_output=200)
    assert res.status == "failed"
    assert len(res.detail) < 400


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        run_program("x=1", timeout=0)
    with pytest.raises(ValueError, match="isolation"):
        run_program("x=1", isolation="docker")
    with pytest.raises(ValueError, match="unique"):
        evaluate_programs([("a", "x=1"), ("a", "x=2")], progress=False)


# ------------------------------------------------------------------ HumanEval


def test_canonical_solutions_subset_pass(problems):
    subset = problems[:10]
    res = evaluate_humaneval(subset, {p["task_id"]: [p["canonical_solution"]] for p in subset},
                             ks=(1, 5, 10), workers=2, progress=False)
    assert res["pass@k"] == {"pass@1": 1.0}  # k > n=1 is not reported
    assert all(r["statuses"] == ["passed"] for r in res["per_problem"])


def test_all_canonical_solutions_pass(problems):
    start = time.monotonic()
    res = evaluate_humaneval(problems, {p["task_id"]: [p["canonical_solution"]] for p in problems},
                             workers=4, progress=False)
    elapsed = time.monotonic() - start
    failing = [(r["task_id"], r["statuses"], r["details"]) for r in res["per_problem"] if r["c"] != 1]
    assert failing == []
    assert res["pass@k"] == {"pass@1": 1.0}
    print(f"164 canonical HumanEval solutions: {elapsed:.1f} s with 4 workers")


def test_subtly_wrong_solutions_fail(by_id):
    wrong = {
        # Compares only neighbours in the given order (forgets to sort first).
        "HumanEval/0": "    for a, b in zip(numbers, numbers[1:]):\n        if abs(a - b) < threshold:\n            return True\n    return False\n",
        # Off by one: the running balance check starts after the first operation.
        "HumanEval/3": "    balance = 0\n    for op in operations[1:]:\n        balance += op\n        if balance < 0:\n            return True\n    return False\n",
        # Rounds instead of truncating.
        "HumanEval/2": "    return round(number % 1.0, 1)\n",
    }
    for task_id, completion in wrong.items():
        res = run_program(build_program(by_id[task_id], completion), timeout=5.0)
        assert res.status == "failed", (task_id, res)
        assert "AssertionError" in res.detail


def test_pass_at_k_with_mixed_completions(by_id):
    ids = ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    probs = [by_id[t] for t in ids]
    completions = {
        "HumanEval/0": [by_id["HumanEval/0"]["canonical_solution"], "    return False\n"],
        "HumanEval/2": ["    return 0.0\n", "    return -1\n"],
        "HumanEval/4": [by_id["HumanEval/4"]["canonical_solution"]] * 2,
    }
    res = evaluate_humaneval(probs, completions, ks=(1, 2, 5), workers=2, progress=False)
    assert [r["c"] for r in res["per_problem"]] == [1, 0, 2]
    assert res["pass@k"] == pytest.approx({"pass@1": (0.5 + 0 + 1) / 3, "pass@2": (1 + 0 + 1) / 3})
    with pytest.raises(ValueError, match="unknown task_id"):
        evaluate_humaneval(probs, {**completions, "HumanEval/99": ["x"]}, progress=False)
    with pytest.raises(ValueError, match="no completions for task_id 'HumanEval/4'"):
        evaluate_humaneval(probs, {k: v for k, v in completions.items() if k != "HumanEval/4"},
                           progress=False)


# ------------------------------------------------------------------ timeouts


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_infinite_loop_times_out(isolation):
    for prog in ("while True:\n    pass\n", "import time\ntime.sleep(60)\n"):
        start = time.monotonic()
        res = run_program(prog, timeout=1.0, isolation=isolation)
        assert res.status == "timeout", res
        assert time.monotonic() - start < 4.0


def test_infinite_loops_do_not_stall_the_pool(by_id):
    problem = by_id["HumanEval/0"]
    jobs = [(f"loop{i}", _program(problem, "while True:\n    pass")) for i in range(4)]
    jobs += [(f"ok{i}", build_program(problem, problem["canonical_solution"])) for i in range(4)]
    start = time.monotonic()
    res = evaluate_programs(jobs, workers=4, timeout=1.0, progress=False)
    assert time.monotonic() - start < 8.0
    assert {k: r.status for k, r in res.items()} == {
        **{f"loop{i}": "timeout" for i in range(4)}, **{f"ok{i}": "passed" for i in range(4)}}


# ------------------------------------------------------------------ hostile completions

DELETE_ATTEMPTS = [
    "import os\nos.remove({path!r})",
    "import pathlib\npathlib.Path({path!r}).unlink()",
    "import shutil\nshutil.rmtree({dir!r})",
    "import os\nos.rename({path!r}, {path!r} + '.moved')",
    "open({path!r}, 'w').write('overwritten')",
    "import os\nos.chmod({path!r}, 0)",
    "import os\nos.system('rm -f {path}')",
]
DELETE_IDS = ["remove", "pathlib-unlink", "rmtree", "rename", "overwrite", "chmod", "os-system-rm"]


def _victim(tmp_path: Path) -> Path:
    victim_dir = tmp_path / "outside"
    victim_dir.mkdir()
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    return victim


def _assert_intact(victim: Path):
    assert victim.exists()
    assert victim.read_text() == "keep me"
    assert not Path(str(victim) + ".moved").exists()
    assert os.stat(victim).st_mode & 0o600 == 0o600


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("attempt", DELETE_ATTEMPTS, ids=DELETE_IDS)
def test_file_outside_sandbox_survives(by_id, tmp_path, attempt, isolation):
    victim = _victim(tmp_path)
    body = attempt.format(path=str(victim), dir=str(victim.parent)) + "\nreturn False"
    res = _run(_program(by_id["HumanEval/0"], body), isolation=isolation)
    assert res.status in ("failed", "error"), res
    _assert_intact(victim)


@pytest.mark.skipif(not SANDBOX["drops_privileges"],
                    reason="files are protected by the unprivileged uid only when the caller is root")
@pytest.mark.parametrize("attempt", DELETE_ATTEMPTS, ids=DELETE_IDS)
def test_file_outside_sandbox_survives_without_guard(tmp_path, attempt):
    victim = _victim(tmp_path)
    program = attempt.format(path=str(victim), dir=str(victim.parent))
    program = "try:\n" + "".join(f"    {l}\n" for l in program.splitlines()) + "except OSError:\n    pass\n"
    _run(program, guard=False)
    _assert_intact(victim)


# Spawned commands carry {marker} on their command line so leftovers can be counted exactly.
FORK_BOMBS = [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])",
    "import multiprocessing, time\nwhile True:\n    multiprocessing.Process(target=time.sleep, args=(60,)).start()",
    "import os\nwhile True:\n    os.system(\"sh -c 'sleep 60; true' {marker} &\")",
]
BOMB_IDS = ["os-fork", "subprocess", "multiprocessing", "os-system"]


def _assert_all_gone(marker: str, before: int):
    assert _wait_until(lambda: _n_matching(marker) == 0), f"{_n_matching(marker)} processes left"
    # The machine's process count returns to where it was (slack for unrelated activity).
    assert _wait_until(lambda: _n_processes() <= before + 10), (before, _n_processes())


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("bomb", FORK_BOMBS, ids=BOMB_IDS)
def test_fork_bomb_is_contained(by_id, sandbox_root, bomb, isolation):
    before = _n_processes()
    start = time.monotonic()
    program = _program(by_id["HumanEval/0"], bomb.format(marker=sandbox_root))
    res = _run(program, timeout=2.0, isolation=isolation, tmp_root=sandbox_root)
    assert res.status in ("error", "failed", "timeout"), res
    assert time.monotonic() - start < 6.0
    _assert_all_gone(sandbox_root, before)


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("bomb", FORK_BOMBS[:2], ids=BOMB_IDS[:2])
def test_fork_bomb_is_contained_without_guard(sandbox_root, bomb, isolation):
    """With the guard off, RLIMIT_NPROC stops the bomb and the PID namespace / process-group
    kill removes every child when the run ends."""
    if not SANDBOX["nproc_enforced"]:
        pytest.skip("RLIMIT_NPROC is not enforced for this caller (root without a spare uid)")
    before = _n_processes()
    body = bomb.format(marker=sandbox_root).replace("\n    ", "\n    try:\n        ", 1)
    body = body.rstrip() + "\n    except OSError:\n        pass\n"
    start = time.monotonic()
    res = _run(body, timeout=2.0, guard=False, isolation=isolation, tmp_root=sandbox_root)
    assert res.status in ("timeout", "error"), res
    assert time.monotonic() - start < 6.0
    _assert_all_gone(sandbox_root, before)


@pytest.mark.parametrize("guard", [True, False])
def test_unbounded_memory_is_stopped(by_id, guard):
    for body in ("data = []\nwhile True:\n    data.append(bytearray(10**7))",
                 "x = bytearray(10**11)\nreturn True"):
        start = time.monotonic()
        res = _run(_program(by_id["HumanEval/0"], body), memory_mb=256, guard=guard)
        assert res.status == "error" and "MemoryError" in res.detail, res
        assert time.monotonic() - start < 5.0


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.5)
    yield srv
    srv.close()


def _assert_no_connection(srv: socket.socket):
    with pytest.raises(socket.timeout):
        conn, _ = srv.accept()
        conn.close()


SOCKET_ATTEMPTS = [
    "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')",
    "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
]
SOCKET_IDS = ["create_connection", "socket-connect", "urllib"]


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("attempt", SOCKET_ATTEMPTS, ids=SOCKET_IDS)
def test_no_network(by_id, listener, attempt, isolation):
    port = listener.getsockname()[1]
    body = attempt.format(port=port) + "\nreturn False"
    res = _run(_program(by_id["HumanEval/0"], body), isolation=isolation)
    assert res.status in ("error", "failed"), res
    _assert_no_connection(listener)


@pytest.mark.skipif(not HAS_NAMESPACES, reason="network is cut by a network namespace only where unshare works")
@pytest.mark.parametrize("attempt", SOCKET_ATTEMPTS, ids=SOCKET_IDS)
def test_no_network_without_guard(listener, attempt):
    port = listener.getsockname()[1]
    res = _run(attempt.format(port=port), guard=False)
    assert res.status == "error", res
    _assert_no_connection(listener)


def test_sandbox_folder_is_removed(sandbox_root):
    res = _run("import os\nopen('left.txt', 'w').write('x')\nassert os.path.exists('left.txt')",
               tmp_root=sandbox_root)
    assert res.status == "passed"
    assert os.listdir(sandbox_root) == []


def test_exit_status_classification():
    from comol.tools.sandbox import _classify

    assert _classify(0, False, 3.0, "") == ("passed", "")
    assert _classify(0, True, 3.0, "")[0] == "timeout"
    assert _classify(1, False, 3.0, "AssertionError")[0] == "failed"
    assert _classify(128 + signal.SIGXCPU, False, 3.0, "") == ("timeout", "CPU time limit exceeded (SIGXCPU)")
    assert _classify(-signal.SIGXCPU, False, 3.0, "")[0] == "timeout"
    assert _classify(128 + signal.SIGKILL, False, 3.0, "") == ("error", "killed by SIGKILL")
    assert _classify(3, False, 3.0, "boom") == ("error", "sandbox setup failed: boom")
