"""A run checkpoint is data, never code: ``checkpoints/last.ckpt`` is only read with ``torch.load(weights_only=True)``
(tensors, numbers, strings, lists, tuples, dicts), and one that needs anything else is refused in one line
naming the file, before anything of it runs. What the run itself saves always passes that test."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict
from omegaconf import OmegaConf

from comol import ROOT
from comol.errors import CheckpointError
from comol.training.checkpointing import checkpoint_path
from comol.training.plain_state import load_plain, to_plain

TINY = ["model.arch.hidden_size=64", "model.arch.num_layers=2", "model.arch.head_dim=16",
        "model.arch.intermediate_size=128", "trainer=debug", "trainer.max_steps=2", "dataset.train_size=16",
        "dataset.val_size=4", "eval=none", "adapter=lora", "logger=none"]


class RunsCode:
    """Unpickling this runs a shell command (what a hostile checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _run_state(extra) -> dict:
    """A checkpoint shaped like comol's (Lightning keys + the RunCheckpoint state) with ``extra`` inside."""
    return {"epoch": 0, "global_step": 1, "state_dict": {"w": torch.zeros(2)}, "loops": {},
            "callbacks": {"RunCheckpoint": {"global_step": 1, "config": {}, "rng": {}, "payload": extra}}}


def _hostile(kind: str, path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch_zip":        # torch.save's zip format, the code hidden in the callback state
        torch.save(_run_state(RunsCode(marker)), path)
    elif kind.startswith("raw_pickle"):     # a bare pickle (torch's legacy format), protocol 2 or 4
        protocol = 4 if kind.endswith("4") else 2
        path.write_bytes(pickle.dumps({"global_step": 1, "callbacks": {"RunCheckpoint": {"x": RunsCode(marker)}}},
                                      protocol=protocol))
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 160)   # fixed bytes: random ones can parse as opcodes
    elif kind == "not_a_dict":
        torch.save([torch.zeros(1)], path)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle", "raw_pickle4"])
def test_the_hostile_files_of_this_table_do_run_code_when_fully_unpickled(kind, tmp_path):
    """The table's hostile files are real: torch.load(weights_only=False), what resume.py used, runs them."""
    marker = tmp_path / "ran"
    _hostile(kind, tmp_path / "last.ckpt", marker)
    with contextlib.suppress(RuntimeError):   # a bare pickle runs as torch's "magic number", then fails
        torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind, expected", [
    ("torch_zip", "refused: it holds posix.system besides tensors and plain data"),
    ("raw_pickle", "refused: it holds posix.system besides tensors and plain data"),
    ("raw_pickle4", "refused: it holds pickle opcode 149 besides tensors and plain data"),
    ("garbage", "unreadable checkpoint"),
    ("not_a_dict", "not a run checkpoint (it holds a list"),
])
def test_load_plain_refuses_in_one_line_and_runs_nothing(kind, expected, tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "last.ckpt"
    _hostile(kind, ckpt, marker)
    with pytest.raises(CheckpointError) as e:
        load_plain(ckpt)
    assert expected in str(e.value) and str(ckpt) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_resume_from_a_hostile_checkpoint_is_refused_and_runs_nothing(kind, tmp_path):
    """``run.py ... resume=true`` on a dir whose last.ckpt runs code when unpickled: exit 2, one line naming
    the file, the command never ran (no marker), nothing trained or saved."""
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    _hostile(kind, checkpoint_path(run_dir), marker)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "run.py", *TINY, f"hydra.run.dir={run_dir}", "resume=true"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {checkpoint_path(run_dir)}: refused: it holds posix.system"), last
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (run_dir / "adapter").exists() and not (run_dir / "results.json").exists()


@dataclass
class _Pos:
    epoch: int
    batches: int


def test_to_plain_turns_what_lightning_may_store_into_plain_data(tmp_path):
    """Lightning's AttributeDict hyperparameters, OmegaConf containers, dataclasses, NumPy arrays and scalars
    (e.g. NumPy's RNG state) become plain data that weights_only=True loads back equal."""
    state = {"hyper_parameters": AttributeDict(lr=1e-3, layers=[1, 2]),
             "cfg": OmegaConf.create({"a": {"b": 1}, "c": "${a.b}"}),
             "pos": _Pos(1, 2), "np_rng": ("MT19937", np.arange(3, dtype=np.uint32), 1, 0, 0.0),
             "np_scalar": np.float32(0.5), "od": OrderedDict(x=torch.ones(2)), "size": torch.Size([2, 3])}
    plain = to_plain(state)
    torch.save(plain, tmp_path / "c.ckpt")
    back = load_plain(tmp_path / "c.ckpt")
    assert back["hyper_parameters"] == {"lr": 1e-3, "layers": [1, 2]}
    assert back["cfg"] == {"a": {"b": 1}, "c": 1} and back["pos"] == {"epoch": 1, "batches": 2}
    assert torch.equal(back["np_rng"][1], torch.arange(3, dtype=torch.int64).to(torch.uint32))
    assert back["np_scalar"] == 0.5 and torch.equal(back["od"]["x"], torch.ones(2)) and back["size"] == (2, 3)
    with pytest.raises(TypeError, match=r"checkpoint\.obj is a builtins\.object"):
        to_plain({"obj": object()})


@pytest.mark.slow
def test_what_a_run_saves_loads_with_weights_only(tmp_path):
    """A real run's checkpoint (Lightning's loops, optimizer and scheduler state, RNG states, config) loads with
    weights_only=True, and nothing is left in $TMPDIR or beside last.ckpt."""
    from comol.config import compose
    from comol.pipeline import run

    run(compose([*TINY, "checkpoint.every_n_steps=1", f"paths.output_dir={tmp_path / 'run'}"]))
    ckpt = torch.load(checkpoint_path(tmp_path / "run"), weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["optimizer_states"] and ckpt["loops"]["fit_loop"]
    state = ckpt["callbacks"]["RunCheckpoint"]
    assert isinstance(state["rng"]["torch"], torch.Tensor) and isinstance(state["rng"]["numpy"][1], torch.Tensor)
    assert [p.name for p in checkpoint_path(tmp_path / "run").parent.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_and_the_earlier_checkpoint_survives(tmp_path, monkeypatch):
    """ENOSPC in the middle of writing the step-2 checkpoint (injected into the write, after half the bytes):
    one line naming the file, the space it needs and the space free; the step-1 checkpoint is intact, no
    temporary file is left, nothing is saved as a result. Before: a 67-line traceback."""
    import errno

    from comol.config import compose
    from comol.pipeline import run
    from comol.training import checkpoint_io
    from comol.training.checkpoint_io import NoSpaceForCheckpoint

    real_write, calls = checkpoint_io._write, []

    def write_then_disk_full(path, data):
        calls.append(path)
        if len(calls) < 2:
            return real_write(path, data)
        real_write(path, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_io, "_write", write_then_disk_full)
    out = tmp_path / "run"
    with pytest.raises(NoSpaceForCheckpoint) as e:
        run(compose([*TINY, "checkpoint.every_n_steps=1", f"paths.output_dir={out}"]))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no space left for checkpoint {calls[1]}: it needs ")
    assert " MB free on that disk, " in msg and "at step 2; the checkpoint of step 1 is kept" in msg
    assert torch.load(checkpoint_path(out), weights_only=True)["global_step"] == 1
    assert [p.name for p in checkpoint_path(out).parent.iterdir()] == ["last.ckpt"]
    assert not (out / "adapter").exists() and not (out / "results.json").exists()


def test_a_save_the_disk_has_no_room_for_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    from comol.training import checkpoint_io
    from comol.training.checkpoint_io import NoSpaceForCheckpoint, RunCheckpointIO

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    target = tmp_path / ".last.ckpt.1.tmp"
    with pytest.raises(NoSpaceForCheckpoint, match=r"it needs 0\.4 MB free on that disk, 0\.0 MB is free"):
        RunCheckpointIO().save_checkpoint({"w": torch.zeros(100_000)}, target)
    assert not target.exists()
