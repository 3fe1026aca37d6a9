"""No silent downgrade: without bubblewrap, execution is refused unless explicitly allowed;
samples written with eval.execute=false are scored later by ``python -m comol.eval.execute``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comol.errors import DataError
from comol.eval.code import confinement as sandbox_confine
from comol.eval.code import samples as execute
from comol.eval.code.sandbox import ConfinementUnavailable, evaluate_programs, run_program

PROBLEM = {"task_id": "T/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


@pytest.fixture
def no_bwrap(monkeypatch):
    """Simulate a machine without bubblewrap."""
    monkeypatch.setattr(sandbox_confine, "find_bwrap", lambda: None)


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
def test_execute_cli_scores_a_samples_file(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "predictions").mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"train/steps": 3, "eval/code/humaneval/pass@1": 0.9}))
    samples = execute.sample_rows([PROBLEM, {**PROBLEM, "task_id": "T/1"}],
                                  {"T/0": ["    return a + b\n", "    return 0\n"],
                                   "T/1": ["    import sys\n    sys.exit(0)\n", "    return b + a\n"]})
    path = run_dir / "predictions" / "humaneval.samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in samples))
    proc = subprocess.run([sys.executable, "-m", "comol.eval.execute", str(path), "--workers", "2", "--ks", "1", "2"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
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
    with pytest.raises(DataError, match=r"x\.samples\.jsonl:1: missing test, entry_point, completions"):
        execute.read_samples(bad)
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
