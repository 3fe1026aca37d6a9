"""End-to-end runs on CPU: train + save + evaluate, multirun, eval of a saved adapter, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from comol import ROOT
from comol.config import compose
from comol.errors import ConfigError
from comol.pipeline import run

FAST = ["trainer=debug", "eval.limit=8", "dataset.train_size=128", "dataset.val_size=16"]


def run_in(tmp_path: Path, *overrides: str) -> dict:
    cfg = compose([*FAST, *overrides, f"paths.output_dir={tmp_path}"])
    return run(cfg)


def cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def test_train_eval_smoke_writes_everything_and_loss_falls(tmp_path):
    results = run_in(tmp_path, "logger=csv", "trainer.max_steps=60", "trainer.log_every_n_steps=1",
                     "trainer.val_check_interval=60")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    preds = [json.loads(l) for l in (tmp_path / "predictions" / "toy_math.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and {"response", "pred", "correct", "answer"} <= set(preds[0])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["eval/math/toy_math/acc"] == results["eval/math/toy_math/acc"]
    assert on_disk["eval/math/mean_acc"] == results["eval/math/toy_math/acc"]
    assert on_disk["params/trainable"] == 223744  # CoMoL r=16 N=8 on tiny_qwen3 (4 layers, qkvo+down)
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/version_*/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 50
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses


def test_wandb_offline_run_has_curve_and_config(tmp_path):
    run_in(tmp_path, "adapter=lora", "model=tiny_llama")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (history,) = runs[0].glob("run-*.wandb")
    for _ in range(50):  # the W&B service writes the file from another process: give it a moment
        data = history.read_bytes()  # protobuf records: keys and string values appear verbatim
        if b"eval/math/toy_math/acc" in data:
            break
        time.sleep(0.2)
    assert data.count(b"train/loss") >= 5  # one record per logged step (trainer=debug logs every step)
    for needle in (b"params/trainable", b"tiny_llama", b"eval/math/toy_math/acc", b"val/loss"):
        assert needle in data, needle


def test_comol_without_core_router_16_experts(tmp_path):
    results = run_in(tmp_path, "logger=none", "adapter.num_experts=16", "adapter.core_router=false")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["adapter"]["num_experts"] == 16 and saved["adapter"]["core_router"] is False
    assert "eval/math/mean_acc" in results


def test_eval_mode_reloads_saved_adapter_and_reproduces_scores(tmp_path):
    trained = run_in(tmp_path / "train", "logger=none", "dataset.data_seed=99")
    # the held-out rows come from the dataset the adapter was trained with, not the current default
    again = run_in(tmp_path / "eval", "logger=none", "mode=eval", f"adapter_path={tmp_path / 'train' / 'adapter'}")
    assert again["eval/math/toy_math/acc"] == trained["eval/math/toy_math/acc"]
    a = (tmp_path / "train" / "predictions" / "toy_math.jsonl").read_text()
    assert a == (tmp_path / "eval" / "predictions" / "toy_math.jsonl").read_text()


@pytest.mark.slow
def test_multirun_gives_separate_dirs_and_wandb_runs(tmp_path):
    proc = cli("-m", "adapter=lora,comol", "seed=0,1", *FAST, "eval.limit=2", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "results.json").exists())
    assert len(jobs) == 4, [p.name for p in tmp_path.iterdir()]
    names = {json.loads((j / "adapter" / "adapter_config.json").read_text())["run_name"] for j in jobs}
    assert names == {"lora-tiny_qwen3-toy_math-s0", "lora-tiny_qwen3-toy_math-s1",
                     "comol-tiny_qwen3-toy_math-s0", "comol-tiny_qwen3-toy_math-s1"}
    wandb_runs = list(tmp_path.glob("*/wandb/offline-run-*"))
    assert len(wandb_runs) == 4 and len({r.name for r in wandb_runs}) == 4


@pytest.mark.parametrize("override,message", [
    ("adapter.r=0", "adapter.r=0 is invalid"),
    ("adapter.num_experts=0", "adapter.num_experts=0 is invalid"),
    ("adapter.target_modules=[foo_proj]", "matched no nn.Linear"),
    ("dataset=math14k eval=none dataset.train=/no/such/file.json", "/no/such/file.json does not exist"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_error(override, message, tmp_path):
    proc = cli(*override.split(), "logger=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    if override in ("adapter.r=0", "adapter.num_experts=0"):   # a config value: refused at composition, before the dir is claimed
        assert not tmp_path.exists() or not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.iterdir())
    else:                                  # data: the job's own log says why it failed
        assert message in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("override,message", [("adapter=nope", "Could not find 'adapter/nope'"),
                                              ("model=gpt9", "Could not find 'model/gpt9'")])
@pytest.mark.slow
def test_unknown_group_option_is_named(override, message, tmp_path):
    proc = cli(override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bad_data_row_names_file_and_row(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    proc = cli("dataset=math14k", "eval=none", f"dataset.train={bad}", f"dataset.val={bad}", "logger=none",
               f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and f"{bad}: row 1 lacks 'output'" in proc.stderr


@pytest.mark.slow
def test_real_model_without_weights_fails_fast_with_one_sentence(tmp_path):
    proc = cli("model=qwen3_8b", "logger=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "Qwen/Qwen3-8B" in last and "model.path" in last


def test_select_best_restores_adapter_of_lowest_val_loss(tmp_path):
    results = run_in(tmp_path, "logger=csv", "select_best=val/loss", "trainer.max_steps=12",
                     "trainer.val_check_interval=3", "optim.lr=0.05", "eval=none")
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/version_*/metrics.csv")))))
    vals = [(float(r["val/loss"]), int(r["step"])) for r in rows if r.get("val/loss")]
    assert len(vals) == 4
    best_loss, best_step = min(vals)
    assert results["train/best_val/loss"] == pytest.approx(best_loss, rel=1e-6)
    assert results["train/best_step"] == best_step + 1 or results["train/best_step"] == best_step
    # the saved adapter is the restored one: its validation loss is the best, not the last
    from comol.adapters import load_adapter
    from comol.data import SFTDataModule, dataset_splits
    from comol.models import load_backbone

    cfg = compose([*FAST, f"paths.output_dir={tmp_path}"])
    model, tok = load_backbone(cfg.model)
    load_adapter(model, tmp_path / "adapter")
    dm = SFTDataModule(cfg.dataset, tok, splits=dataset_splits(cfg.dataset))
    dm.setup()
    (batch,) = list(dm.val_dataloader())
    with torch.no_grad():
        loss = model.eval()(**batch).loss.item()
    assert loss == pytest.approx(best_loss, rel=1e-4) and best_loss < vals[-1][0]


def test_a_run_dir_is_never_reused(tmp_path):
    run_in(tmp_path, "logger=none", "eval=none")
    with pytest.raises(ConfigError, match=r"already holds a run \(results\.json\)"):
        run_in(tmp_path, "logger=none", "eval=none")


def test_bad_decoding_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.decoding\.num_samples=2 is invalid with do_sample=false"):
        run_in(tmp_path, "logger=none", "eval.decoding.num_samples=2")
    assert not (tmp_path / "adapter").exists()


def test_outputs_get_ordinary_permissions(tmp_path):
    run_in(tmp_path, "logger=none", "eval.limit=2")
    mask = os.umask(0)
    os.umask(mask)
    for path in (tmp_path / "results.json", tmp_path / "adapter" / "adapter_config.json",
                 tmp_path / "predictions" / "toy_math.jsonl"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~mask
