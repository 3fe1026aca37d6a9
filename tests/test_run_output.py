"""What a run prints: progress lines in the log when output is redirected, and no library chatter."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
import types

import torch

from comol import ROOT
from comol.training.progress import ProgressLog, _duration


def test_progress_line_hand_computed():
    opt = types.SimpleNamespace(param_groups=[{"lr": 2e-3}])
    trainer = types.SimpleNamespace(global_step=120, max_steps=1000, optimizers=[opt],
                                    callback_metrics={"train/loss": torch.tensor(2.31414)})
    cb = ProgressLog(interval_s=0, to_console=True)
    cb._t0, cb._step0, cb._tokens = 0.0, 20, torch.tensor(52300)
    # 100 steps in 10 s -> 880 steps left take 88 s; 52,300 tokens / 10 s
    assert cb.line(trainer, now=10.0) == ("step 120/1000 (12%) | loss 2.3141 | lr 2.00e-03 | 5,230 tok/s | "
                                          "elapsed 0m10s | eta 1m28s")
    assert _duration(3725) == "1h02m05s"


@pytest.mark.slow
def test_redirected_run_logs_progress_lines_and_no_library_noise(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    env.pop("WANDB_SILENT", None)
    proc = subprocess.run([sys.executable, "run.py", "trainer=debug", "eval.limit=2", "progress_interval_s=0.001",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = (proc.stdout + proc.stderr).splitlines()
    for noise in ("GPU available", "TPU available", "litlogger", "anonymous", "Run history", "LeafSpec", "Epoch 0/-"):
        assert not any(noise in line for line in printed), noise
    assert len(printed) <= 12, printed
    log_lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    steps = [line for line in log_lines if "comol.progress" in line]
    assert [line.split(" - ")[1].split(" (")[0] for line in steps] == [f"step {i}/5" for i in range(1, 6)]
    assert all(" | loss " in line and " tok/s " in line and " | eta " in line for line in steps)
    assert any("wandb sync" in line for line in log_lines)  # the one W&B line names the run folder
