"""An adapter dir is untrusted input. Every path that reads one (``load_adapter``, ``mode=eval``,
``python -m comol.export --to peft`` and ``--merge``) checks all of it before allocating anything: the
config (UTF-8, JSON, nesting, format version, the sizes it names, against the adapter dataclass and the
backbone), the weights (sha256 against the config, safetensors, floating point, finite, the exact tensors
the config builds). One table: how the dir is corrupted, the command, the one-line error; exit 2 and
nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comol import ROOT
from comol.adapters import inject_adapter, save_adapter
from comol.adapters.inject import CONFIG_FILE, SHA_KEY, WEIGHTS_FILE, load_adapter
from comol.errors import CheckpointError
from comol.export import main as export_main
from tests.conftest import fresh_micro_model, micro_model_cfg

TOY = {"name": "toy_math", "source": "toy_math", "data_seed": 1, "train_size": 16, "val_size": 4, "test_size": 4,
       "max_operand": 9, "max_length": 96, "train_on_prompt": True, "batch_size": 4, "eval_batch_size": 4,
       "num_workers": 0, "train": None, "val": None}


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    model, _ = fresh_micro_model()
    inject_adapter(model, {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    out = tmp_path_factory.mktemp("good") / "adapter"
    save_adapter(model, out, base_model=micro_model_cfg(), extra={"dataset": TOY})
    return out


def _config(d: Path) -> dict:
    return json.loads((d / CONFIG_FILE).read_text())


def _write_config(d: Path, meta: dict) -> None:
    (d / CONFIG_FILE).write_text(json.dumps(meta))


def _resave(d: Path, change) -> None:
    """Rewrite the weights with ``change(tensors)`` applied and the checksum updated (a consistent, hostile dir)."""
    tensors = {k: v.clone() for k, v in load_file(d / WEIGHTS_FILE).items()}
    change(tensors)
    save_file(tensors, str(d / WEIGHTS_FILE))
    _rehash(d)


def _rehash(d: Path) -> None:
    meta = _config(d)
    meta[SHA_KEY] = hashlib.sha256((d / WEIGHTS_FILE).read_bytes()).hexdigest()
    _write_config(d, meta)


def _first(tensors):
    return sorted(tensors)[0]


def _set(section: str, key: str, value):
    def edit(d: Path):
        meta = _config(d)
        node = meta
        for part in section.split("."):
            node = node[part]
        node[key] = value
        _write_config(d, meta)
    return edit


def _other_weights(d: Path):           # valid safetensors, other values, old checksum kept: replaced weights
    tensors = {k: v + 1 for k, v in load_file(d / WEIGHTS_FILE).items()}
    save_file(tensors, str(d / WEIGHTS_FILE))


def _nan(d):
    _resave(d, lambda t: t[_first(t)].view(-1).__setitem__(0, float("nan")))


def _inf(d):
    _resave(d, lambda t: t[_first(t)].view(-1).__setitem__(0, float("inf")))


def _int_dtype(d):
    _resave(d, lambda t: t.__setitem__(_first(t), t[_first(t)].to(torch.int32)))


def _random_weights(d):
    (d / WEIGHTS_FILE).write_bytes(os.urandom(5000))
    _rehash(d)


def _bad_utf8(d):
    (d / CONFIG_FILE).write_bytes(b'{"format": "comol-adapter/1", "adapter": {"name": "lo\xff\xfera"}}')


def _deep_json(d):
    (d / CONFIG_FILE).write_text("[" * 200_000 + "]" * 200_000)


def _nested_40(d):
    meta = _config(d)
    node = meta["adapter"]
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    _write_config(d, meta)


CORRUPTIONS = {
    "replaced_weights": (_other_weights, "sha256 does not match the weights_sha256"),
    "nan_tensor": (_nan, "holds NaN or infinite values"),
    "inf_tensor": (_inf, "holds NaN or infinite values"),
    "int_tensor": (_int_dtype, "has dtype I32: adapter tensors are floating point"),
    "unknown_format": (_set("", "format", "comol-adapter/99") if False else
                       (lambda d: _write_config(d, {**_config(d), "format": "comol-adapter/99"})),
                       "format 'comol-adapter/99' is not one this version reads"),
    "huge_r": (_set("adapter", "r", 10**9), "the adapter config on this model makes (1000000000,"),
    "huge_arch": (_set("base_model.arch", "hidden_size", 10**9),
                  "base_model.arch.hidden_size=1000000000 is invalid: expected an integer in [0, 65536]"),
    "huge_test_size": (_set("dataset", "test_size", 10**9),
                       "dataset.test_size=1000000000 is invalid: expected an integer in [0, 1000000]"),
    "invalid_utf8": (_bad_utf8, "not UTF-8 text"),
    "deep_json": (_deep_json, "JSON nested too deeply"),
    "nested_40": (_nested_40, "JSON nested too deeply"),
    "random_weights": (_random_weights, "not a safetensors file"),
}

FAST_COMMANDS = ("load", "peft", "merge")


def _run(command: str, adapter: Path, out: Path, capsys) -> tuple[int, str]:
    if command == "load":
        model, _ = fresh_micro_model()
        try:
            load_adapter(model, adapter)
        except CheckpointError as e:
            return 2, f"error: {e}"
        return 0, ""
    if command in ("peft", "merge"):
        how = ["--to", "peft"] if command == "peft" else ["--merge"]
        code = export_main([str(adapter), *how, "--out", str(out)])
        return code, capsys.readouterr().err
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "run.py", "mode=eval", f"adapter_path={adapter}", "eval=none",
                           "logger=none", f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stderr


#: mode=eval checks the saved config against the run schema first (comol/eval/eval_checks.py), so a rank
#: beyond the schema's bound is refused there, before the weights' shapes are compared
EVAL_EXPECTED = {"huge_r": "adapter.r=1000000000 is invalid: expected at most 512 (4 x the widest projection"}


def _check_row(corruption, command, good_adapter, tmp_path, capsys):
    import shutil

    corrupt, expected = CORRUPTIONS[corruption]
    expected = EVAL_EXPECTED.get(corruption, expected) if command == "eval" else expected
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    corrupt(adapter)
    out = tmp_path / "out"
    code, err = _run(command, adapter, out, capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and expected in lines[0], err[-3000:]
    assert "Traceback" not in err
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not {"results.json", "adapter_model.safetensors", "config.json", "predictions"} & set(written), written


@pytest.mark.parametrize("command", FAST_COMMANDS)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_hostile_adapter_dir_is_refused_in_one_line(corruption, command, good_adapter, tmp_path, capsys):
    _check_row(corruption, command, good_adapter, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_hostile_adapter_dir_is_refused_by_mode_eval(corruption, good_adapter, tmp_path, capsys):
    _check_row(corruption, "eval", good_adapter, tmp_path, capsys)


def test_the_good_adapter_loads_and_exports(good_adapter, tmp_path, capsys):
    """The table's base dir is a valid adapter: every command accepts it (so each refusal comes from the corruption)."""
    model, _ = fresh_micro_model()
    load_adapter(model, good_adapter)
    assert export_main([str(good_adapter), "--to", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("where, expected", [
    (".", "the working directory (or a folder above it) would be replaced"),
    ("..", "the working directory (or a folder above it) would be replaced"),
    ("ADAPTER", "inside or around the adapter dir"),
    ("FILE", "is a file: give a new directory"),
    ("OTHER", "holds other files (no earlier export)"),
])
def test_export_out_must_be_a_new_dir_or_an_earlier_export(where, expected, good_adapter, tmp_path, capsys,
                                                           monkeypatch):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    monkeypatch.chdir(work / "sub")
    out = {"ADAPTER": str(adapter), "FILE": str(tmp_path / "file"), "OTHER": str(work / "sub")}.get(where, where)
    if where == "OTHER":
        monkeypatch.chdir(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert export_main([str(adapter), "--to", "peft", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
