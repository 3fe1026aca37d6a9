"""Pre-run checks of what a job reads: bad data files are refused before the backbone is loaded (one line, file
named); max_length cuts are counted; adapters carry a verified checksum and name their backbone. Config values
are checked by the schema (tests/test_schema.py)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from comol import ROOT
from comol.config import compose
from comol.data.checks import check_row_lengths
from comol.errors import CheckpointError, ConfigError, DataError
from comol.eval.eval_checks import eval_backbone
from comol.pipeline import run
from comol.preflight import preflight

from conftest import fresh_micro_model, micro_model_cfg

# a real backbone without weights here: any step that built it would fail with "Qwen/Qwen3-8B ... model.path",
# so an error about the input proves the input was checked first
NO_WEIGHTS = ["model=qwen3_8b", "logger=none"]


def _run(tmp_path, *overrides):
    return run(compose([*overrides, f"paths.output_dir={tmp_path / 'run'}"]))


def test_bad_data_file_is_refused_before_the_backbone(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataError, match=rf"{bad}: row 1 lacks 'output'"):
        _run(tmp_path, *NO_WEIGHTS, "dataset=math14k", "eval=none", f"dataset.train={bad}", f"dataset.val={bad}")
    with pytest.raises(DataError, match="evaluation file /nope/eval/math/AddSub.json does not exist"):
        _run(tmp_path / "b", *NO_WEIGHTS, "eval=math", "paths.data_dir=/nope")


def test_good_config_passes_and_hands_over_what_it_read(tmp_path, data_dir):
    checked = preflight(compose(["eval=math", "logger=none", "dataset.train_size=32", "dataset.val_size=4",
                                 f"paths.output_dir={tmp_path}"]))
    assert [len(checked.splits[s]) for s in ("train", "val", "test")] == [32, 4, 100]
    assert set(checked.eval_rows) == {"AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP"}
    assert len(checked.eval_rows["gsm8k"]) == 1319 and checked.warnings == []


def test_rows_cut_by_max_length_are_counted(caplog):
    from comol.data import encode_example, generate_toy_math
    from comol.models import load_tokenizer

    tok = load_tokenizer(micro_model_cfg())
    rows = generate_toy_math(60, seed=3)
    full = [len(encode_example(r, tok, 10 ** 6)["input_ids"]) for r in rows]   # independent: the datamodule's ids
    limit = sorted(full)[len(full) // 2]
    expected = sum(n > limit for n in full)
    assert 0 < expected < len(rows)
    with caplog.at_level(logging.WARNING):
        msg = check_row_lengths(rows, tok, limit)
    assert msg.startswith(f"dataset.max_length={limit} cuts {expected} of 60 train rows (longest {max(full)} tokens")
    assert check_row_lengths(rows, tok, max(full)) is None
    with pytest.raises(ConfigError, match="every train prompt is at least that long"):
        check_row_lengths(rows, tok, 5)


def _saved_adapter(tmp_path):
    from comol.adapters import inject_adapter, save_adapter

    model, _ = fresh_micro_model()
    inject_adapter(model, {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj"]})
    return save_adapter(model, tmp_path / "adapter", base_model=micro_model_cfg())


def test_adapter_checksum_is_recorded_and_verified(tmp_path):
    import hashlib

    from comol.adapters import load_adapter

    path = _saved_adapter(tmp_path)
    meta = json.loads((path / "adapter_config.json").read_text())
    weights = path / "adapter_model.safetensors"
    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    load_adapter(fresh_micro_model()[0], path)       # intact: loads
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF                                 # one flipped bit in the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: sha256 does not match"):
        load_adapter(fresh_micro_model()[0], path)


def test_adapter_for_another_backbone_is_refused_unless_allowed(tmp_path):
    path = _saved_adapter(tmp_path)
    meta = json.loads((path / "adapter_config.json").read_text())
    other = {**micro_model_cfg("llama")}
    cfg = {"model": other, "allow_backbone_mismatch": False}
    assert eval_backbone(cfg, path, meta, model_given=False) == meta["base_model"]   # not chosen: the adapter's own
    with pytest.raises(CheckpointError, match=r"names backbone 'micro_qwen3', not model=micro_llama \(name: "):
        eval_backbone(cfg, path, meta, model_given=True)
    assert eval_backbone({**cfg, "allow_backbone_mismatch": True}, path, meta, model_given=True) == other
    same = {**micro_model_cfg(), "path": "/elsewhere"}      # the same backbone from another folder is fine
    assert eval_backbone({"model": same}, path, meta, model_given=True) == same


@pytest.mark.slow
def test_toy_dataset_train_file_is_a_one_line_cli_error(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "dataset.train=/x.json", "logger=none",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: dataset.train='/x.json' is not used by dataset=toy_math (generated rows): to train on a file use "
        "dataset=math14k dataset.train=<file> (or dataset=codealpaca20k)")


@pytest.mark.slow
def test_help_is_a_short_guide_without_internal_entries():
    proc = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    out = proc.stdout
    assert len(out.splitlines()) < 60 and "_base" not in out and " _tiny" not in out
    assert "table2_tiny" in out and "math14k/{qwen3_14b,qwen3_8b}" in out and "dataset.train=FILE" in out
    assert "hydra:" not in out and "task_name" not in out      # not a config dump
    for group in ("model", "adapter", "dataset", "eval", "trainer", "logger", "sweep", "experiment"):
        assert f"\n  {group} " in out




def test_seeded_eval_split_dataset_passes_preflight_and_trains(tmp_path):
    """dataset=real_commonsense (source=eval_split) through the whole run: checked, split written, trained,
    scored on its own held-out rows (a tiny backbone; the SmolLM2 sweep takes this path)."""
    results = _run(tmp_path, "dataset=real_commonsense", "eval=real_commonsense", "logger=none", "trainer=debug",
                   "dataset.train_per_set=4", "dataset.val_per_set=1", "dataset.test_per_set=2",
                   "eval.max_new_tokens=4")
    split = tmp_path / "run" / "split"
    assert results["train/steps"] == 5 and (split / "split.json").is_file()
    sets = json.loads((split / "split.json").read_text())["sets"]
    assert len(sets) == 7 and all(f"eval/commonsense/{name}/acc" in results for name in sets)
