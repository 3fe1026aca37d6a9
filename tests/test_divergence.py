"""Divergence guard, strict results.json and the report's handling of diverged jobs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import comol.job

from comol.config import compose
from comol.io_utils import atomic_write_json
from comol.pipeline import finite_results, run
from comol.schema import validate_group
from comol.tools.report import load_jobs
from comol.training.checkpointing import checkpoint_path
from comol.training.divergence import DivergenceError, DivergenceGuard, nonfinite_tensors

MICRO = ["model.arch.hidden_size=64", "model.arch.num_layers=2", "model.arch.head_dim=16",
         "model.arch.intermediate_size=128", "trainer=debug", "trainer.enable_progress_bar=false",
         "dataset.train_size=32", "dataset.val_size=8", "eval=none", "logger=none", "adapter=lora"]


def test_lr_1e30_stops_with_one_line_saves_nothing_and_keeps_a_finite_checkpoint(tmp_path, monkeypatch):
    # the schema refuses optim.lr > 1 before anything is built (tests/test_schema.py); to make a run diverge this
    # one lr is let through, every other key still checked
    checked = comol.job.validate_config
    monkeypatch.setattr(comol.job, "validate_config",
                        lambda cfg: checked(OmegaConf.merge(cfg, {"optim": {"lr": 1.0}})))
    cfg = compose([*MICRO, "optim.lr=1e30", "optim.warmup_steps=0", f"paths.output_dir={tmp_path}"])
    with pytest.raises(DivergenceError) as err:
        run(cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("training diverged at step ")
    assert "optim.lr (now 1e+30)" in msg and "divergence.policy=skip" in msg
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "results.json").exists()
    # trainer=debug saves every step: last.ckpt is the last step before the divergence, all of it finite
    ckpt = torch.load(checkpoint_path(tmp_path), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] < int(msg.split("at step ")[1].split(":")[0])
    tensors = dict(_float_tensors(ckpt["state_dict"], "state_dict"))
    tensors.update(_float_tensors(ckpt["optimizer_states"], "optimizer_states"))
    assert any(k.startswith("state_dict.") for k in tensors) and any("exp_avg_sq" in k for k in tensors)
    bad = nonfinite_tensors(tensors.items())
    assert not bad, f"non-finite tensors in last.ckpt: {bad}"


def _float_tensors(obj, prefix: str):
    """(path, tensor) for every floating-point tensor nested in dicts / lists of a checkpoint."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _float_tensors(v, f"{prefix}[{i}]")


def _step(guard, params, opt, loss):
    trainer = SimpleNamespace(global_step=3, precision="32-true")
    guard.on_before_backward(trainer, None, loss)
    guard.on_before_optimizer_step(trainer, None, opt)
    opt.step()


def test_skip_policy_leaves_weights_and_optimizer_moments_untouched():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)
    guard = DivergenceGuard("skip", max_skips=2)
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    _step(guard, [w], opt, torch.tensor(1.0))          # a good step moves w
    after_good, moment = w.detach().clone(), opt.state[w]["exp_avg"].clone()
    assert not torch.equal(after_good, torch.ones(3))
    w.grad = torch.tensor([1.0, float("nan"), 3.0])
    _step(guard, [w], opt, torch.tensor(1.0))          # non-finite gradient: skipped
    w.grad = torch.tensor([1.0, 1.0, 1.0])
    _step(guard, [w], opt, torch.tensor(float("inf")))  # non-finite loss: skipped too
    assert torch.equal(w.detach(), after_good) and torch.equal(opt.state[w]["exp_avg"], moment)
    assert guard.skipped == 2 and int(opt.state[w]["step"]) == 1
    w.grad = torch.tensor([float("nan")] * 3)
    with pytest.raises(DivergenceError, match="2 steps were skipped already"):
        _step(guard, [w], opt, torch.tensor(1.0))


def test_stop_policy_names_step_and_loss():
    guard = DivergenceGuard("stop", max_skips=10, lr=0.5)
    with pytest.raises(DivergenceError, match=r"at step 4: loss=nan; try a lower optim.lr \(now 0.5\)"):
        guard.on_before_backward(SimpleNamespace(global_step=3), None, torch.tensor(float("nan")))


def test_bad_policy_is_config_error():
    """Checked with every config value (comol/schema.py), before anything is built; the guard trusts it."""
    with pytest.raises(ValueError, match="divergence.policy='maybe' is invalid: expected 'stop' or 'skip'"):
        validate_group("divergence", {"policy": "maybe", "max_skips": 10})


def test_results_json_is_always_valid_json(tmp_path):
    results = finite_results({"train/loss_final": float("nan"), "eval/math/mean_acc": 0.5, "train/steps": 3})
    assert results["train/loss_final"] is None and results["status"] == "failed"
    assert "train/loss_final" in results["failed_reason"]
    path = atomic_write_json(tmp_path / "results.json", results)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in results.json"))
    with pytest.raises(ValueError, match=r"non-finite number at a\.b\[1\]"):
        atomic_write_json(tmp_path / "x.json", {"a": {"b": [1.0, math.inf]}})
    assert not (tmp_path / "x.json").exists()


def test_report_marks_diverged_jobs_failed(tmp_path):
    jobs = {"0_ok": {"eval/math/mean_acc": 0.5, "params/trainable": 10},
            "1_marked": {"eval/math/mean_acc": None, "status": "failed", "failed_reason": "non-finite values: x"},
            "2_old_nan": "{\"eval/math/mean_acc\": NaN, \"params/trainable\": 10}",
            "3_broken": "{not json"}
    for name, res in jobs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(res if isinstance(res, str) else json.dumps(res))
    status = {r.dir.name: (r.status, r.reason) for r in load_jobs(tmp_path)}
    assert status["0_ok"] == ("ok", "")
    assert status["1_marked"][0] == "failed" and "non-finite values: x" in status["1_marked"][1]
    assert status["2_old_nan"][0] == "failed" and "eval/math/mean_acc" in status["2_old_nan"][1]
    assert status["3_broken"][0] == "unreadable" and "not valid JSON" in status["3_broken"][1]
