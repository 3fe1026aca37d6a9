"""Exclusive output dirs: claims are atomic, a claimed dir is refused before Hydra writes into it,
a sweep launch id is used once, mode=eval writes into its own subdir of the adapter's run."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comol import ROOT
from comol.run_dir import CLAIM_FILE, RunDirTaken, claim_dir, claim_run_dir, default_run_dir, read_claim


def _env():
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, env=_env(),
                          timeout=600)


def _try_claim(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        claim_dir(path)
        results.put("won")
    except RunDirTaken:
        results.put("refused")


def test_concurrent_claims_of_one_dir_have_exactly_one_winner(tmp_path):
    ctx = mp.get_context("fork")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_try_claim, args=(str(tmp_path / "run"), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in range(n))
    assert outcomes == ["refused"] * (n - 1) + ["won"]
    assert read_claim(tmp_path / "run")["pid"] in {p.pid for p in procs}


def test_claim_refuses_a_run_and_a_claimed_dir_and_resume_takes_over(tmp_path):
    claim_run_dir(tmp_path / "a")
    with pytest.raises(RunDirTaken, match=r"is claimed by a train run \(pid \d+"):
        claim_run_dir(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text("{}")
    with pytest.raises(RunDirTaken, match=r"already holds a run \(results\.json\)"):
        claim_run_dir(tmp_path / "b")
    assert not (tmp_path / "b" / CLAIM_FILE).exists()
    first = read_claim(tmp_path / "a")["token"]
    claim_run_dir(tmp_path / "a", resume=True)       # a resumed run continues in its own dir
    claim = read_claim(tmp_path / "a")
    assert claim["resumed"] is True and claim["token"] != first
    claim_run_dir(tmp_path / "empty")                # an existing empty dir (e.g. made by the user) is fine
    claim_run_dir(tmp_path / "empty2", resume=True)


@pytest.mark.slow
def test_a_claimed_run_dir_is_refused_before_hydra_writes_anything(tmp_path):
    run = tmp_path / "run"
    claim_run_dir(run)
    (run / ".hydra").mkdir()
    sentinel = "- seed=7\n"
    (run / ".hydra" / "overrides.yaml").write_text(sentinel)
    before = sorted(p.name for p in run.rglob("*"))
    proc = cli("seed=5", "logger=none", f"hydra.run.dir={run}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: run dir {run} is claimed by a train run")
    assert "Traceback" not in proc.stderr
    assert (run / ".hydra" / "overrides.yaml").read_text() == sentinel   # Hydra's files of the old run untouched
    assert sorted(p.name for p in run.rglob("*")) == before              # nothing written (no log either)


@pytest.mark.slow
def test_a_sweep_id_is_launched_once(tmp_path):
    """A second launch of sweep.id=X (its dir is claimed by the first) is refused before any job starts."""
    args = ["sweep=table2_tiny", "sweep.id=fixed", f"sweep.root={tmp_path}", "seed=0",
            "adapter=lora"]
    sweep_dir = tmp_path / "table2_tiny" / "fixed"
    claim_dir(sweep_dir, outputs=("multirun.yaml",), info={"mode": "multirun"})   # the first launch
    proc = cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: sweep dir {sweep_dir} is claimed by a multirun run") and "sweep.id" in last
    assert sorted(p.name for p in sweep_dir.iterdir()) == [CLAIM_FILE]   # no multirun.yaml, no job dir


def test_eval_default_dir_is_a_subdir_of_the_adapters_run(tmp_path):
    run = tmp_path / "run"
    claim_run_dir(run)
    (run / "adapter").mkdir()
    got = default_run_dir("eval", str(run / "adapter"), "math", "STAMP", str(tmp_path / "runs"))
    assert got == str(run / "evals" / "math_STAMP")
    loose = tmp_path / "downloaded" / "adapter"          # not inside a run: the ordinary runs dir
    loose.mkdir(parents=True)
    assert default_run_dir("eval", str(loose), "math", "STAMP", str(tmp_path / "runs")) == f"{tmp_path}/runs/STAMP"
    assert default_run_dir("train", str(run / "adapter"), "math", "S", "/r") == "/r/S"


@pytest.mark.slow
def test_eval_mode_writes_its_own_subdir_and_leaves_the_run_alone(tmp_path):
    from comol.config import compose
    from comol.pipeline import run as run_job

    run = tmp_path / "run"
    run_job(compose(["trainer=debug", "trainer.max_steps=2", "dataset.train_size=32", "dataset.val_size=4",
                     "eval.limit=2", "eval.max_new_tokens=4", "logger=none", f"paths.output_dir={run}"]))
    before = {p: p.read_bytes() for p in [run / "results.json", *run.glob("predictions/*")]}
    proc = cli("mode=eval", f"adapter_path={run / 'adapter'}", "eval.limit=2", "eval.max_new_tokens=4", "logger=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sub,) = (run / "evals").iterdir()
    assert sub.name.startswith("math_")
    assert json.loads((sub / "results.json").read_text())["adapter_path"] == str((run / "adapter").resolve())
    assert (sub / "predictions" / "toy_math.jsonl").is_file() and (sub / ".hydra").is_dir()
    assert {p: p.read_bytes() for p in before} == before                 # the run's own outputs unchanged
    # told otherwise: into the training run's own dir is refused, nothing replaced
    proc = cli("mode=eval", f"adapter_path={run / 'adapter'}", "logger=none", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert {p: p.read_bytes() for p in before} == before
