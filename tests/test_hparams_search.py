"""Hydra sweepers: the Optuna example (hparams_search=optuna_lr_r) runs end to end with trainer=debug; every
trial returns a float objective in the direction the objective names, and trials get distinct run names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from comol import ROOT

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the `sweeps` extra (hydra-optuna-sweeper)")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("eval_preset, direction, metric", [
    ("none", "minimize", "val/loss_final"),               # eval=none: every trial failed with None before
    ("toy_math", "maximize", "eval/math/mean_acc"),
])
def test_optuna_lr_r_search_runs_and_optimises_the_objective(tmp_path, eval_preset, direction, metric):
    proc = _run("hparams_search=optuna_lr_r", "hydra.sweeper.n_trials=2", "trainer=debug", f"eval={eval_preset}",
                "eval.limit=2", "eval.max_new_tokens=4", "logger=none", "dataset.train_size=32", "dataset.val_size=8",
                f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    jobs = sorted(p for p in tmp_path.iterdir() if (p / "results.json").is_file())
    assert len(jobs) == 2
    values = [yaml.safe_load((j / "results.json").read_text())[metric] for j in jobs]
    pick = min if direction == "minimize" else max
    assert best["best_value"] == pytest.approx(pick(values))
    configs = [yaml.safe_load((j / "config.yaml").read_text()) for j in jobs]
    assert len({c["run_name"] for c in configs}) == 2, [c["run_name"] for c in configs]
    assert set(best["best_params"]) == {"optim.lr", "adapter.r"}
    assert all(1e-4 <= c["optim"]["lr"] <= 1e-2 and c["adapter"]["r"] in (4, 8, 16) for c in configs)
