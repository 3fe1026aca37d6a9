"""Checkpoints and resume: a run stopped by a real signal and resumed ends with the adapter tensors of an
uninterrupted run (bitwise) and one continuous loss curve (CSV rows, the same W&B run id)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comol import ROOT
from comol.config import compose
from comol.errors import ConfigError
from comol.pipeline import run
from comol.training.checkpointing import RunInterrupted, checkpoint_path
from comol.schema import plain_config
from comol.training.resume import config_differences, continue_csv

# micro backbone, adapter dropout on (RNG must be restored), 3 batches per epoch (epoch boundaries at 3, 6, 9)
SHORT = ["model.arch.hidden_size=64", "model.arch.num_layers=2", "model.arch.head_dim=16", "model.arch.intermediate_size=128",
         "trainer=debug", "trainer.max_steps=12", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", "dataset.train_size=48", "dataset.val_size=8", "eval=none",
         "adapter=lora", "adapter.dropout=0.2", "checkpoint.every_n_steps=4"]


def cfg_for(out: Path, *extra: str):
    return compose([*SHORT, *extra, f"paths.output_dir={out}"])


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def csv_rows(out: Path) -> list[dict]:
    (path,) = out.glob("csv/version_*/metrics.csv")
    return list(csv.DictReader(open(path)))


def losses(rows: list[dict], key: str = "train/loss") -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def interrupt_when_checkpointed(out: Path, signum: int) -> threading.Thread:
    """Send ``signum`` to this process as soon as the first periodic checkpoint exists."""
    def watch():
        for _ in range(6000):
            if checkpoint_path(out).is_file():
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.01)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


#: a run in a child process that SIGKILLs itself in the middle of optimizer step argv[1], after its forward:
#: no signal handler, no checkpoint at the kill, no logger finalize, no `finally` (what the OOM killer or a
#: node failure does); argv[2:] are the config overrides
HARD_KILL = """
import os, signal, sys
from comol.config import compose
from comol.models.lit_module import AdapterLM
from comol.pipeline import run

kill_at, step = int(sys.argv[1]), AdapterLM.training_step

def training_step(self, batch, batch_idx):
    loss = step(self, batch, batch_idx)
    if self.trainer.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss

AdapterLM.training_step = training_step
run(compose(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    run(cfg_for(out, "logger=csv"))
    return out


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "cut"
    interrupt_when_checkpointed(out, signal.SIGTERM)
    with pytest.raises(RunInterrupted, match=r"stopped by SIGTERM at step (\d+).*resume=true"):
        run(cfg_for(out, "logger=csv"))
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    stopped = torch.load(checkpoint_path(out), weights_only=True)["global_step"]
    assert 4 <= stopped < 12
    results = run(cfg_for(out, "logger=csv", "resume=true"))
    assert results["train/steps"] == 12 and results["train/resumed_from_step"] == stopped

    whole, cut = adapter_tensors(uninterrupted), adapter_tensors(out)
    assert whole.keys() == cut.keys() and len(whole) > 0
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name   # bitwise
    # one curve: every step once, the same values as the uninterrupted run
    a, b = losses(csv_rows(uninterrupted)), losses(csv_rows(out))
    assert [s for s, _ in b] == list(range(12)) and b == a
    assert losses(csv_rows(out), "val/loss") == losses(csv_rows(uninterrupted), "val/loss")


@pytest.mark.slow
def test_hard_kill_then_resume_from_periodic_checkpoint_equals_uninterrupted_run(uninterrupted, tmp_path):
    """SIGKILL in the middle of step 6: nothing is saved at the kill; resume=true continues from the step-4
    periodic checkpoint. Lightning writes each row to metrics.csv as it is logged, so the killed run's file
    holds rows logged after that checkpoint (train/loss of steps 4 and 5, val/loss of step 6): the resumed
    run drops them and logs those steps again, once."""
    out = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", HARD_KILL, "6", *SHORT, "logger=csv", f"paths.output_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert torch.load(checkpoint_path(out), weights_only=True)["global_step"] == 4
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    killed = csv_rows(out)   # rows past the checkpoint are on disk: the resume has to drop them
    assert [s for s, _ in losses(killed)] == list(range(6))
    assert [s for s, _ in losses(killed, "val/loss")] == [3, 6]   # logged at the step they measured

    results = run(cfg_for(out, "logger=csv", "resume=true"))
    assert results["train/steps"] == 12 and results["train/resumed_from_step"] == 4
    whole, cut = adapter_tensors(uninterrupted), adapter_tensors(out)
    assert whole.keys() == cut.keys() and len(whole) > 0
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name   # bitwise
    rows, ref = csv_rows(out), csv_rows(uninterrupted)
    assert [s for s, _ in losses(rows)] == list(range(12)) and losses(rows) == losses(ref)
    assert losses(rows, "val/loss") == losses(ref, "val/loss")


@pytest.mark.slow
def test_resume_from_a_checkpoint_taken_right_after_a_validation_keeps_every_step(uninterrupted, tmp_path):
    """Validation runs after step 3 (val_check_interval=3) and the step-3 checkpoint is saved right after it.
    Lightning, restarting there, skips the already-run validation with an empty loop iteration that still
    counts one logged step: every later metrics.csv row came out one step late (3 -> 4, ...)."""
    out = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", HARD_KILL, "4", *SHORT, "logger=csv", "checkpoint.every_n_steps=3",
                           f"paths.output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert torch.load(checkpoint_path(out), weights_only=True)["global_step"] == 3
    # the validation before the save, logged at step 3 like the train/loss of the 4th batch: both measure the
    # weights after 3 optimizer steps
    assert [s for s, _ in losses(csv_rows(out), "val/loss")] == [3]

    results = run(cfg_for(out, "logger=csv", "resume=true", "checkpoint.every_n_steps=3"))
    assert results["train/steps"] == 12 and results["train/resumed_from_step"] == 3
    whole, cut = adapter_tensors(uninterrupted), adapter_tensors(out)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    rows, ref = csv_rows(out), csv_rows(uninterrupted)
    assert [s for s, _ in losses(rows)] == list(range(12)) and losses(rows) == losses(ref)
    assert losses(rows, "val/loss") == losses(ref, "val/loss")
    assert [r["step"] for r in rows] == [r["step"] for r in ref]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_restarts_from_step_0_with_resume(uninterrupted, tmp_path):
    """SIGKILL in step 2, before the first (step-4) checkpoint: the dir holds the run's claim, config.yaml and
    the metrics rows of steps 0-1, but no checkpoint. A plain relaunch is refused and says to use resume=true;
    resume=true starts it again from step 0 (before: "nothing to resume") and ends equal to an uninterrupted
    run, one metrics.csv. The temporary file of a save killed earlier (a dead pid's) is removed."""
    out = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", HARD_KILL, "1", *SHORT, "logger=csv", f"paths.output_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not checkpoint_path(out).exists() and (out / "config.yaml").is_file()
    assert [s for s, _ in losses(csv_rows(out))] == [0]
    stale = checkpoint_path(out).with_name(f".last.ckpt.{_dead_pid()}.tmp")
    stale.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    with pytest.raises(ConfigError, match="interrupted before its first checkpoint: start it again from step 0 "
                                          "with resume=true"):
        run(cfg_for(out, "logger=csv"))
    config = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"differs from the interrupted run's in optim\.lr; resume with the run's "
                                          r"own values \(optim\.lr=0\.002; recorded in .*config\.yaml\)"):
        run(cfg_for(out, "logger=csv", "resume=true", "optim.lr=0.1"))
    assert (out / "config.yaml").read_text() == config   # the refused launch changed nothing

    results = run(cfg_for(out, "logger=csv", "resume=true"))
    assert results["train/steps"] == 12 and "train/resumed_from_step" not in results
    assert not stale.exists() and [p.name for p in stale.parent.iterdir()] == ["last.ckpt"]
    whole, cut = adapter_tensors(uninterrupted), adapter_tensors(out)
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    rows, ref = csv_rows(out), csv_rows(uninterrupted)   # csv_rows: exactly one metrics.csv
    assert losses(rows) == losses(ref) and losses(rows, "val/loss") == losses(ref, "val/loss")


def test_config_differences_name_each_changed_key_once_and_leave_resume_safe_keys_out(tmp_path):
    """The callbacks node interpolates other keys: a changed optim.lr is named once (not also as
    callbacks.divergence.lr), and a resume-safe key (checkpoint.every_n_steps) is not refused through it."""
    def resolved(*overrides):
        return plain_config(compose([f"paths.output_dir={tmp_path}", *overrides]))

    saved = resolved()
    assert config_differences(saved, resolved("optim.lr=0.1", "adapter.r=4")) == ["adapter.r", "optim.lr"]
    safe = ["checkpoint.every_n_steps=7", "progress_interval_s=1", "trainer.enable_progress_bar=false", "logger=csv"]
    assert config_differences(saved, resolved(*safe)) == []


def test_remove_stale_temps_removes_only_those_of_dead_processes(tmp_path):
    from comol.training.checkpointing import remove_stale_temps, temp_path

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    dead, live, own = temp_path(last, _dead_pid()), temp_path(last, os.getppid()), temp_path(last, os.getpid())
    for p in (dead, live, own, last):
        p.write_bytes(b"x")
    assert remove_stale_temps(last) == [dead]
    assert sorted(p.name for p in last.parent.iterdir()) == sorted(p.name for p in (live, own, last))


@pytest.mark.slow
def test_resume_refuses_other_config_and_allows_resume_safe_keys(tmp_path):
    out = tmp_path / "run"
    interrupt_when_checkpointed(out, signal.SIGINT)
    with pytest.raises(RunInterrupted, match="stopped by SIGINT"):
        run(cfg_for(out, "logger=none"))
    with pytest.raises(ConfigError, match=r"differs from the checkpointed run's in adapter\.r, optim\.lr;"):
        run(cfg_for(out, "logger=none", "resume=true", "optim.lr=0.1", "adapter.r=4"))
    with pytest.raises(ConfigError, match="already holds a run .*resume=true"):   # no silent restart over it
        run(cfg_for(out, "logger=none"))
    # logger and checkpoint settings may change; the run then finishes, and a second resume says so
    results = run(cfg_for(out, "logger=csv", "resume=true", "checkpoint.every_n_steps=0"))
    assert results["train/steps"] == 12
    assert run(cfg_for(out, "logger=none", "resume=true")) == results


def _csv_steps(path: Path) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(open(path, newline=""))]


def _metrics_lines(steps, torn: str = "") -> str:
    """metrics.csv as Lightning's CSV writer leaves it (sorted header, \\r\\n), plus a last row cut short."""
    rows = [f"{s // 3},{s / 1000},{s},{6 - s / 10}," for s in steps]
    return "\r\n".join(["epoch,lr,step,train/loss,val/loss", *rows]) + "\r\n" + torn


def test_continue_csv_drops_rows_after_the_checkpoint_and_a_row_cut_short_by_a_kill(tmp_path):
    """A hard kill can land while a row is being written: that last line (no line end) is dropped, even
    when what was written of it parses as an earlier step (here "1" of step 10's row)."""
    from lightning.pytorch.loggers import CSVLogger

    lg = CSVLogger(tmp_path, name="csv", version=0)
    path = Path(lg.log_dir) / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text(_metrics_lines(range(10), torn="3,0.01,1"), newline="")
    continue_csv([lg], {"global_step": 8})
    assert _csv_steps(path) == list(range(8))
    lg.log_metrics({"train/loss": 5.2}, step=8)   # the resumed run appends to it
    lg.save()
    assert _csv_steps(path) == list(range(9))
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())


def test_continue_csv_keeps_the_validation_row_of_the_checkpoint_step(tmp_path):
    """val/loss is logged at the step it measured (AdapterLM); the checkpoint of step G is saved when the next
    batch starts, after that validation: its row (step G) stays, the training row of step G (logged after the
    save) goes."""
    from lightning.pytorch.loggers import CSVLogger

    lg = CSVLogger(tmp_path, name="csv", version=0)
    path = Path(lg.log_dir) / "metrics.csv"
    path.parent.mkdir(parents=True)
    lines = ["epoch,lr,step,train/loss,val/loss", "0,0.1,3,6.0,", "0,,4,,5.5", "0,0.1,4,5.9,", "0,,5,,5.4"]
    path.write_text("\r\n".join(lines) + "\r\n", newline="")
    continue_csv([lg], {"global_step": 4})
    rows = list(csv.DictReader(open(path, newline="")))
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == [("3", "6.0", ""), ("4", "", "5.5")]


def test_continue_csv_recovers_the_rows_a_killed_resume_left_aside(tmp_path):
    """A resume killed after moving metrics.csv aside and before writing its trimmed copy: the next resume
    takes the rows from the file left aside."""
    from lightning.pytorch.loggers import CSVLogger

    lg = CSVLogger(tmp_path, name="csv", version=0)
    path = Path(lg.log_dir) / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.with_name(".metrics.csv.pre-resume").write_text(_metrics_lines(range(6)), newline="")
    continue_csv([lg], {"global_step": 4})
    assert _csv_steps(path) == list(range(4))
    assert not path.with_name(".metrics.csv.pre-resume").exists()


def test_resume_without_checkpoint_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="has no checkpoints/last.ckpt: nothing to resume"):
        run(cfg_for(tmp_path, "logger=none", "resume=true"))


@pytest.mark.slow
def test_checkpoint_holds_adapter_tensors_only(uninterrupted):
    ckpt = torch.load(checkpoint_path(uninterrupted), weights_only=True)
    adapter = adapter_tensors(uninterrupted)
    assert len(ckpt["state_dict"]) == len(adapter) > 0
    from comol.adapters import is_adapter_name

    assert all(is_adapter_name(k) for k in ckpt["state_dict"])
    assert sum(t.numel() for t in ckpt["state_dict"].values()) == sum(t.numel() for t in adapter.values())
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]


@pytest.mark.slow
def test_cli_sigusr1_resume_continues_the_same_wandb_run(tmp_path):
    """The real command line: SIGUSR1 -> checkpoint, exit 2 with the resume command; resume=true continues
    the same W&B run id; resume=true on the finished run says so."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "run.py", *SHORT, "logger=[csv,wandb]", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3000):
        if checkpoint_path(tmp_path).is_file() or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "stopped by SIGUSR1" in err.splitlines()[-1] and "resume=true" in err.splitlines()[-1]
    again = subprocess.run([*args, "resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    runs = sorted(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]
    steps = [s for s, _ in losses(csv_rows(tmp_path))]
    assert steps == list(range(12))
    done = subprocess.run([*args, "resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "finished run" in done.stdout


@pytest.mark.slow
def test_slurm_preemption_signal_requeue_then_auto_resume(uninterrupted, tmp_path, monkeypatch):
    """What hydra/launcher=slurm does on preemption/timeout, locally: submitit's SIGUSR2 handler is in place;
    the run saves a checkpoint after the current step and hands the signal to it (submitit requeues the job
    and exits); the requeued job (SLURM_RESTART_COUNT=1, same dir, same overrides) resumes by itself."""
    out = tmp_path / "job"
    calls = []

    def submitit_like(signum, frame):   # submitit: checkpoint + `scontrol requeue` + sys.exit(-1)
        calls.append(checkpoint_path(out).is_file())
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        interrupt_when_checkpointed(out, signal.SIGUSR2)
        with pytest.raises(SystemExit):
            run(cfg_for(out, "logger=csv"))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [True]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    results = run(cfg_for(out, "logger=csv"))       # no resume=true: the requeued job finds its checkpoint
    assert results["train/resumed_from_step"] >= 5   # saved on the signal, after the step-4 periodic save
    whole, cut = adapter_tensors(uninterrupted), adapter_tensors(out)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert losses(csv_rows(out)) == losses(csv_rows(uninterrupted))
