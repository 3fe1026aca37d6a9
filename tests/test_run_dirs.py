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
from comol.run_dir import (CLAIM_FILE, RunDirTaken, claim_dir, claim_run_dir, default_run_dir, read_claim,
                           release_run_dir)


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


def _hold_claim(path: str, resume: bool, ready, release, results) -> None:
    """Claim ``path`` (as a new run or a resume), report, keep it until told to let go (a running job)."""
    try:
        claim_run_dir(path, resume=resume)
        results.put("won")
    except RunDirTaken as e:
        results.put(f"refused: {e}")
    ready.set()
    release.wait(60)


def test_a_resume_is_refused_while_the_run_it_would_continue_still_runs(tmp_path):
    """The original run (another process) still holds its dir: resume=true is refused in one line naming its pid;
    once that process has ended, however it ended, the resume takes the dir over."""
    ctx = mp.get_context("fork")
    ready, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
    run = tmp_path / "run"
    original = ctx.Process(target=_hold_claim, args=(str(run), False, ready, release, results))
    original.start()
    assert ready.wait(30) and results.get(timeout=5) == "won"
    try:
        with pytest.raises(RunDirTaken) as e:
            claim_run_dir(run, resume=True)
        msg = str(e.value)
        assert f"is in use by a train run (pid {original.pid}" in msg and "still running" in msg
        assert f"kill -TERM {original.pid}" in msg and "\n" not in msg
        assert read_claim(run)["pid"] == original.pid          # the claim of the running run is untouched
    finally:
        original.kill()                                          # SIGKILL: no cleanup, the kernel drops the lock
        original.join(30)
    claim_run_dir(run, resume=True)
    assert read_claim(run)["pid"] == os.getpid() and read_claim(run)["resumed"] is True


def test_concurrent_resumes_of_one_dir_have_exactly_one_winner(tmp_path):
    ctx = mp.get_context("fork")
    run = tmp_path / "run"
    claim_run_dir(run)          # the interrupted run's claim (this process has ended its job)
    release_run_dir(run)
    n = 5
    ready, release, results = [ctx.Event() for _ in range(n)], ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_hold_claim, args=(str(run), True, ready[i], release, results)) for i in range(n)]
    for p in procs:
        p.start()
    for r in ready:
        assert r.wait(30)
    outcomes = [results.get(timeout=5) for _ in range(n)]
    release.set()
    for p in procs:
        p.join(30)
    assert sorted(o[:7] for o in outcomes) == ["refused"] * (n - 1) + ["won"]
    assert all("still running" in o for o in outcomes if o != "won")


def test_a_new_run_keeps_its_dir_locked_until_the_job_ends(tmp_path):
    """A new run holds the lock as well as the claim: a resume meanwhile (another process) is refused;
    release_run_dir (the end of the job) lets it in."""
    run = tmp_path / "run"
    claim_run_dir(run)
    ctx = mp.get_context("fork")
    ready, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_hold_claim, args=(str(run), True, ready, release, results))
    p.start()
    assert ready.wait(30)
    assert "still running" in results.get(timeout=5)
    release.set()
    p.join(30)
    release_run_dir(run)
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_claim, args=(str(run), True, ready, release, results))
    p.start()
    assert ready.wait(30) and results.get(timeout=5) == "won"
    release.set()
    p.join(30)


@pytest.mark.slow
def test_cli_resume_while_the_run_still_trains_is_refused_and_its_log_stays_whole(tmp_path):
    """Two processes on one dir: the run trains; `resume=true` launched meanwhile exits 2 with one line and
    writes nothing (before: both trained and interleaved metrics.csv). The run then ends (SIGTERM, checkpoint)
    with every step once in its metrics.csv, and a resume after it is let in."""
    import csv
    import signal
    import time

    from comol.training.checkpointing import checkpoint_path

    args = ["model.arch.hidden_size=64", "model.arch.num_layers=2", "model.arch.head_dim=16",
            "model.arch.intermediate_size=128", "trainer=debug", "trainer.max_steps=400", "trainer.val_check_interval=50",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "dataset.train_size=48",
            "dataset.val_size=8", "eval=none", "adapter=lora", "checkpoint.every_n_steps=2", "logger=csv",
            f"hydra.run.dir={tmp_path}"]
    first = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3000):
            if checkpoint_path(tmp_path).is_file() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]
        listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "csv" not in p.parts
                         and "checkpoints" not in p.parts and not p.name.endswith(".log"))
        second = cli(*args, "resume=true")
        assert second.returncode == 2, second.stderr[-2000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: run dir {tmp_path} is in use by a train run (pid {first.pid}"), last
        assert "still running" in last and "Traceback" not in second.stderr
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "csv" not in p.parts
                      and "checkpoints" not in p.parts and not p.name.endswith(".log")) == listing
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 2 and "stopped by SIGTERM" in err, err[-2000:]
    (path,) = tmp_path.glob("csv/version_*/metrics.csv")
    steps = [int(r["step"]) for r in csv.DictReader(open(path)) if r.get("train/loss")]
    assert steps == list(range(len(steps))) and len(steps) >= 2     # one writer: every step once, in order
    claim_run_dir(tmp_path, resume=True)                             # the run has ended: a resume is let in
