"""No silent downgrade: without bubblewrap, execution is refused unless explicitly allowed;
samples written with eval.execute=false are scored later by ``python -m comol.eval.execute``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from comol.errors import DataError
from comol.eval.code import confinement as sandbox_confine
from comol.eval.code import samples as execute
from comol.eval.code.sandbox import ConfinementUnavailable, evaluate_programs, run_program

REPO = Path(__file__).resolve().parents[1]
PROBLEM = {"task_id": "T/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


@pytest.fixture
def no_bwrap(monkeypatch):
    """Simulate a machine without bubblewrap."""
    monkeypatch.setattr(sandbox_confine, "find_bwrap", lambda: None)


needs_confinement = pytest.mark.skipif(sandbox_confine.confinement_problem() is not None,
                                       reason=f"needs OS confinement: {sandbox_confine.confinement_problem()}")


def test_bwrap_is_installed():
    assert sandbox_confine.confinement_problem() is None, (
        f"{sandbox_confine.confinement_problem()} (CI installs it in .ci/run)")


def test_refuses_without_bwrap(no_bwrap):
    with pytest.raises(ConfinementUnavailable) as err:
        run_program("x = 1")
    msg = str(err.value)
    assert "bubblewrap (`bwrap`) is not installed" in msg and "eval.allow_unconfined=true" in msg
    assert "\n" not in msg
    with pytest.raises(ConfinementUnavailable):
        evaluate_programs([("a", "x = 1")], progress=False)
    with pytest.raises(ConfinementUnavailable, match="eval.allow_unconfined=true"):
        execute.score_samples(execute.sample_rows([PROBLEM], {"T/0": ["    return a + b\n"]}), "t",
                              progress=False)


def test_explicit_unconfined_is_recorded(no_bwrap, caplog):
    rows = execute.sample_rows([PROBLEM], {"T/0": ["    return a + b\n", "    return a - b\n"]})
    with caplog.at_level("WARNING"):
        metrics, records = execute.score_samples(rows, "t", ks=[1, 2], allow_unconfined=True, progress=False)
    assert metrics == {"eval/code/t/pass@1": 0.5, "eval/code/t/pass@2": 1.0, "eval/code/t/confined": 0.0}
    assert records[0]["statuses"] == ["passed", "failed"]
    assert "WITHOUT OS CONFINEMENT" in caplog.text
    # The token still decides in unconfined mode: an early exit 0 is not a pass.
    assert run_program("import ctypes\nctypes.CDLL(None)._exit(0)", confine=False).status == "error"


def test_bwrap_that_cannot_sandbox_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox_confine, "find_bwrap", lambda: str(fake))
    problem = sandbox_confine.confinement_problem()
    assert problem and "No permissions to create new namespace" in problem
    with pytest.raises(ConfinementUnavailable, match="cannot create the sandbox"):
        run_program("x = 1")


@pytest.mark.slow
@needs_confinement
def test_execute_cli_scores_a_samples_file(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "predictions").mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"train/steps": 3, "eval/code/humaneval/pass@1": 0.9}))
    problems = [PROBLEM, {**PROBLEM, "task_id": "T/1"}]
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    samples = execute.sample_rows(problems, {"T/0": ["    return a + b\n", "    return 0\n"],
                                             "T/1": ["    import sys\n    sys.exit(0)\n", "    return b + a\n"]})
    path = run_dir / "predictions" / "humaneval.samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in samples))
    cli = [sys.executable, "-m", "comol.eval.execute", str(path), "--workers", "2", "--ks", "1", "2",
           "--problems", str(problem_file)]
    wrong = subprocess.run([*cli, "--problems-sha256", "0" * 64], capture_output=True, text=True, cwd=REPO)
    assert wrong.returncode == 2 and "problems.jsonl: SHA-256 is " in wrong.stderr and wrong.stderr.count("\n") == 1
    digest = execute.file_sha256(problem_file)
    proc = subprocess.run([*cli, "--problems-sha256", digest], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results == {"train/steps": 3, "eval/code/humaneval/pass@1": 0.5,
                       "eval/code/humaneval/pass@2": 1.0, "eval/code/humaneval/confined": 1.0}
    scored = [json.loads(l) for l in (run_dir / "predictions" / "humaneval.jsonl").read_text().splitlines()]
    assert [r["statuses"] for r in scored] == [["passed", "failed"], ["error", "passed"]]


@pytest.mark.slow
def test_execute_cli_bad_file(tmp_path):
    bad = tmp_path / "x.samples.jsonl"
    bad.write_text(json.dumps({"task_id": "T/0", "prompt": "p"}) + "\n")
    bad.write_text(json.dumps({"task_id": "T/0", "prompt": "p", "completions": ["x"]}) + "\n")
    with pytest.raises(DataError, match=r"x\.samples\.jsonl:1: T/0: missing test, entry_point"):
        execute.read_samples(bad, [PROBLEM])
    proc = subprocess.run([sys.executable, "-m", "comol.eval.execute", str(bad)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_a_humaneval_run_refuses_before_generating_and_records_an_explicit_unconfined_run(no_bwrap, tmp_path):
    """Through the run itself (runner path): without bwrap nothing is generated or written; with
    eval.allow_unconfined=true the run executes and results.json says confined: 0."""
    from comol.config import compose
    from comol.pipeline import run

    def job(name, *extra):
        return compose(["mode=base", "eval=humaneval", "eval.limit=2", "eval.max_new_tokens=4", "logger=none",
                        "eval.workers=1", *extra, f"paths.output_dir={tmp_path / name}"])

    with pytest.raises(ConfinementUnavailable, match="eval.allow_unconfined=true"):
        run(job("refused"))
    assert not list((tmp_path / "refused").rglob("*.jsonl")) and not (tmp_path / "refused" / "results.json").exists()
    results = run(job("allowed", "eval.allow_unconfined=true"))
    assert results["eval/code/humaneval/confined"] == 0.0 and "eval/code/humaneval/pass@1" in results
    saved = json.loads((tmp_path / "allowed" / "results.json").read_text())
    assert saved["eval/code/humaneval/confined"] == 0.0


@pytest.mark.slow
def test_a_machine_that_cannot_confine_collects_and_runs_the_sandbox_tests(tmp_path):
    """No bwrap on PATH (as on macOS or a container without it): the sandbox test files are
    collected, the confined tests are skipped one by one with the reason, the rest run and pass;
    never a session interrupted at collection."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": str(tmp_path)}   # an empty folder: no bwrap
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
                           "-rs", "tests/test_code_exec.py", "tests/test_sandbox_hostile.py"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "error" not in out.splitlines()[-1], out[-3000:]
    assert "SKIPPED" in out and "needs OS confinement, unavailable here: bubblewrap (`bwrap`) is not installed" in out
    passed = int(re.search(r"(\d+) passed", out.splitlines()[-1]).group(1))
    assert passed >= 10, out.splitlines()[-1]   # the unconfined variants and the pure tests ran


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comol.eval.execute", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def humaneval_0():
    from comol.eval.eval_files import humaneval_file, load_humaneval

    return load_humaneval(humaneval_file())[0]


def _write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@needs_confinement
def test_the_samples_file_cannot_bring_its_own_judge(tmp_path, humaneval_0):
    """A samples row whose test is a no-op (with a wrong completion) used to score pass@1 = 1.0: the
    judge came from the file being judged. Now it is refused in one line naming file, line and task;
    the honest row scores the same completion 0.0."""
    wrong = "    return False\n"
    honest = execute.sample_rows([humaneval_0], {humaneval_0["task_id"]: [wrong]})[0]
    for key, value in (("test", "def check(candidate):\n    pass\n"), ("prompt", "def has_close_elements(*a):\n"),
                       ("entry_point", "print")):
        path = _write(tmp_path / key / "predictions" / "humaneval.samples.jsonl", [{**honest, key: value}])
        proc = _cli(path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"error: {path}:1: HumanEval/0: its {key} differ(s) from the problem's"), proc.stderr
        assert not (path.parent.parent / "results.json").exists()
    path = _write(tmp_path / "honest" / "predictions" / "humaneval.samples.jsonl", [honest])
    proc = _cli(path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["eval/code/humaneval/pass@1"] == 0.0


@pytest.mark.slow
@needs_confinement
def test_standard_human_eval_samples_are_scored(tmp_path):
    """openai/human-eval's format: {"task_id", "completion"} per line, a task on several lines, any order;
    problems come from the bundled HumanEval."""
    from comol.eval.eval_files import humaneval_file, load_humaneval

    by_id = {p["task_id"]: p for p in load_humaneval(humaneval_file())}
    rows = [{"task_id": "HumanEval/2", "completion": by_id["HumanEval/2"]["canonical_solution"]},
            {"task_id": "HumanEval/0", "completion": "    return False\n"},
            {"task_id": "HumanEval/2", "completion": "    return 0.0\n"},
            {"task_id": "HumanEval/0", "completion": by_id["HumanEval/0"]["canonical_solution"]}]
    path = _write(tmp_path / "samples.jsonl", rows)
    proc = _cli(path, "--ks", "1", "2", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"eval/code/humaneval/pass@1": 0.5, "eval/code/humaneval/pass@2": 1.0,
                                       "eval/code/humaneval/confined": 1.0}
    scored = [json.loads(l) for l in (tmp_path / "predictions" / "humaneval.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["statuses"]) for r in scored] == [("HumanEval/2", ["passed", "failed"]),
                                                              ("HumanEval/0", ["failed", "passed"])]
    unknown = _write(tmp_path / "unknown.jsonl", [{"task_id": "HumanEval/999", "completion": "x"}])
    proc = _cli(unknown)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {unknown}:1: task_id 'HumanEval/999' is not a problem of "), proc.stderr


@pytest.mark.parametrize("args, says", [
    (["--workers", "0"], "--workers=0 is invalid: expected an integer >= 1"),
    (["--timeout", "0"], "--timeout=0.0 is invalid: expected a positive number of seconds"),
    (["--timeout", "-1"], "--timeout=-1.0 is invalid: expected a positive number of seconds"),
    (["--timeout", "nan"], "--timeout=nan is invalid: expected a positive number of seconds"),
    (["--ks", "0"], "--ks=0 is invalid: expected integers >= 1"),
    (["--memory-mb", "1"], "--memory-mb=1 is invalid: expected an integer >= 64"),
    (["--memory-mb", "16"], "--memory-mb=16 is invalid: expected an integer >= 64"),
    ("int-test", "its test differ(s) from the problem's"),
    ("int-completion", "HumanEval/0: completion must be a string, got int"),
])
def test_scorer_options_and_fields_are_refused_in_one_line(tmp_path, humaneval_0, args, says):
    row = execute.sample_rows([humaneval_0], {"HumanEval/0": [humaneval_0["canonical_solution"]]})[0]
    if args == "int-test":
        row, args = {**row, "test": 7}, []
    elif args == "int-completion":
        row, args = {"task_id": "HumanEval/0", "completion": 7}, []
    path = _write(tmp_path / "predictions" / "humaneval.samples.jsonl", [row])
    proc = _cli(path, *args)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr
    assert not (tmp_path / "results.json").exists()


@needs_confinement
def test_the_smallest_memory_limit_accepted_runs_a_correct_sample(humaneval_0):
    """memory_mb=1 used to score a correct completion as an error (pass@1 0.0, no warning): limits
    below MIN_MEMORY_MB are refused, and MIN_MEMORY_MB itself runs a correct sample."""
    from comol.eval.code.humaneval import build_program
    from comol.errors import ConfigError
    from comol.eval.code.sandbox import MIN_MEMORY_MB

    ok = build_program(humaneval_0, humaneval_0["canonical_solution"])
    assert run_program(ok, memory_mb=MIN_MEMORY_MB, timeout=10.0).status == "passed"
    with pytest.raises(ConfigError, match=f"memory_mb={MIN_MEMORY_MB - 1} is invalid"):
        run_program(ok, memory_mb=MIN_MEMORY_MB - 1)
