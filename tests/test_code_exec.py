"""Sandboxed execution of HumanEval programs: statuses, pass@k, timeouts, the canonical 164.

Hostile completions are in tests/test_sandbox_hostile.py; the refusal without confinement and
the explicit unconfined mode in tests/test_sandbox_unconfined.py.
"""

from __future__ import annotations

import signal
import time

import pytest

from comol.eval.code.humaneval import build_program, evaluate_humaneval, whole_program
from comol.eval.code.sandbox import ExecResult, SplitProgram, describe_sandbox, evaluate_programs, run_program
from comol.eval.eval_files import humaneval_file, load_humaneval, require_data_dir

SANDBOX = describe_sandbox()
if SANDBOX["problem"]:
    pytest.fail(f"these tests need OS confinement: {SANDBOX['problem']}", pytrace=False)
CONFINE = [True, False]  # OS confinement, and the explicit unconfined mode


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


# ------------------------------------------------------------------ basics


def test_build_program_layout():
    problem = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1", "entry_point": "f"}
    split = build_program(problem, "    return 1")
    assert split == SplitProgram(program="def f():\n    return 1\n",
                                 checks="def f():\n    pass\n\ndef check(c):\n    assert c() == 1\n", entry_point="f")
    assert whole_program(problem, "    return 1") == (
        "def f():\n    return 1\ndef check(c):\n    assert c() == 1\ncheck(f)\n"
    )


@pytest.mark.parametrize("confine", CONFINE)
def test_statuses(confine):
    assert _run("x = 1", confine=confine).status == "passed"
    res = _run("assert 1 == 2, 'boom'", confine=confine)
    assert res.status == "failed" and "AssertionError: boom" in res.detail
    res = _run("raise KeyError('k')", confine=confine)
    assert res.status == "error" and "KeyError" in res.detail
    res = _run("def f(:\n  pass", confine=confine)
    assert res.status == "error" and "SyntaxError" in res.detail
    res = _run("raise SystemExit(0)", confine=confine)  # exiting early is not a pass
    assert res.status == "error" and "SystemExit" in res.detail
    # Ordinary programs can still use imports and their sandbox folder.
    ok = ("import hashlib, tempfile, os, re, math, collections, itertools, functools\n"
          "p = os.path.join(tempfile.gettempdir(), 'x.txt')\n"
          "open(p, 'w').write('hi')\nassert open(p).read() == 'hi'\n"
          "assert hashlib.md5(b'a').hexdigest().startswith('0cc1')\n")
    assert _run(ok, confine=confine).status == "passed"


def test_output_is_truncated():
    res = _run("print('x' * 100000)\nassert False", max_output=200)
    assert res.status == "failed"
    assert len(res.detail) < 400


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        run_program("x=1", timeout=0)
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


@pytest.mark.parametrize("confine", CONFINE)
def test_infinite_loop_times_out(confine):
    for prog in ("while True:\n    pass\n", "import time\ntime.sleep(60)\n"):
        start = time.monotonic()
        res = run_program(prog, timeout=1.0, confine=confine)
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


def test_exit_status_classification():
    from comol.eval.code.sandbox import _classify

    # Only the token read back makes a pass; exit status 0 alone is an error.
    assert _classify(0, False, 3.0, "", True) == ("passed", "")
    assert _classify(0, False, 3.0, "", False)[0] == "error"
    assert _classify(0, True, 3.0, "", True)[0] == "timeout"
    assert _classify(1, False, 3.0, "AssertionError", False)[0] == "failed"
    assert _classify(128 + signal.SIGXCPU, False, 3.0, "", False) == ("timeout", "CPU time limit exceeded (SIGXCPU)")
    assert _classify(-signal.SIGXCPU, False, 3.0, "", False)[0] == "timeout"
    assert _classify(128 + signal.SIGKILL, False, 3.0, "", False) == ("error", "killed by SIGKILL")
    assert _classify(3, False, 3.0, "boom", False) == ("error", "sandbox setup failed: boom")
