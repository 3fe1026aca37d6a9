"""W&B as its users expect, checked by reading the offline run files back (WANDB_MODE=offline): the
records of ``run-<id>.wandb`` (the run, its history rows, artifacts) and the media under ``files/``."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from comol import ROOT
from comol.config import compose
from comol.pipeline import run

#: a small backbone and a short run: 6 optimizer steps, validation after steps 3 and 6
SMALL = ["model.arch.hidden_size=64", "model.arch.num_layers=2", "model.arch.head_dim=16",
         "model.arch.intermediate_size=128", "trainer=debug", "trainer.max_steps=6", "trainer.val_check_interval=3",
         "trainer.log_every_n_steps=1", "dataset.train_size=64", "dataset.val_size=8", "eval.limit=5"]

BLOCK = 32 * 1024   # the transaction log is written in blocks of 32 KiB, records split across them


def read_records(path: Path) -> list[pb.Record]:
    """Every record of a ``.wandb`` transaction log: a 7-byte header (":W&B", magic, version), then chunks
    of [crc32 (4 bytes), length (2), type (1: whole, 2: first, 3: middle, 4: last)] + payload; a block's
    tail shorter than a chunk header is padding."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, payloads, parts = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind in (2, 3):
            parts = (b"" if kind == 2 else parts) + chunk
        elif kind == 4:
            payloads.append(parts + chunk)
    records = []
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def offline_run(run_dir: Path) -> tuple[Path, list[pb.Record]]:
    (offline,) = run_dir.glob("wandb/offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    for _ in range(100):   # the W&B service writes from another process: wait for the exit record
        records = read_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    return offline, records


def history(records: list[pb.Record]) -> list[dict]:
    """The history rows; a logged object (table, image) comes as items with nested keys [name, field]."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in r.history.item:
            value, path = json.loads(item.value_json), [item.key] if item.key else list(item.nested_key)
            node = row
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def comol_run(tmp_path_factory) -> tuple[Path, dict, list[pb.Record]]:
    out = tmp_path_factory.mktemp("wandb") / "run"
    os.environ.setdefault("WANDB_SILENT", "true")
    results = run(compose([*SMALL, "adapter=comol", "routing_stats_every=4", "logger.wandb.predictions_rows=3",
                           f"paths.output_dir={out}"]))
    return out, results, offline_run(out)[1]


def test_val_loss_is_plotted_at_the_step_it_measured(comol_run):
    _, _, records = comol_run
    rows = history(records)
    val = [row["trainer/global_step"] for row in rows if "val/loss" in row]
    train = [row["trainer/global_step"] for row in rows if "train/loss" in row]
    assert val == [3, 6]                  # after optimizer steps 3 and 6 (Lightning alone logged 2 and 5)
    assert train == [0, 1, 2, 3, 4, 5]    # the batch that starts after step k: its loss is that of the weights at k
    evals = [row["trainer/global_step"] for row in rows if "eval/math/toy_math/acc" in row]
    assert evals == [6]                   # the evaluation of the final weights, at the same step as the last val


def test_routing_curves_only_at_recorded_steps(comol_run):
    _, _, records = comol_run
    rows = history(records)
    key = "routing/model.layers.0.self_attn.q_proj/entropy"
    # routing_stats_every=4: batches 0 and 4 recorded; with a log row every step, nothing in between
    assert [row["trainer/global_step"] for row in rows if key in row] == [0, 4]
    assert [row["trainer/global_step"] for row in rows if "routing/mean_entropy" in row and "eval/math/mean_acc" not in row] == [0, 4]


def test_adapter_artifact_predictions_table_and_routing_heatmap(comol_run):
    out, _, records = comol_run
    offline, _ = offline_run(out)
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    (adapter,) = [a for a in artifacts if a.type == "model"]
    assert adapter.name == "adapter-comol-tiny_qwen3-toy_math-s0"
    files = {entry.path: entry.size for entry in adapter.manifest.contents}
    on_disk = {p.name: p.stat().st_size for p in (out / "adapter").iterdir()}
    assert files == on_disk and "adapter_model.safetensors" in files

    rows = history(records)
    (table_row,) = [row for row in rows if "predictions/toy_math" in row]
    table = table_row["predictions/toy_math"]
    assert table["_type"] == "table-file" and table["nrows"] == 3 and table_row["trainer/global_step"] == 6
    saved = json.loads((offline / "files" / table["path"]).read_text())
    preds = [json.loads(line) for line in (out / "predictions" / "toy_math.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and {"response", "correct", "answer"} <= set(saved["columns"])
    by_idx = {p["idx"]: p for p in preds}
    for data in saved["data"]:   # every logged row is one of the job's predictions, as written
        row = dict(zip(saved["columns"], data))
        assert row["response"] == by_idx[row["idx"]]["response"] and row["correct"] == by_idx[row["idx"]]["correct"]

    (image_row,) = [row for row in rows if "routing/eval_load" in row]
    image = image_row["routing/eval_load"]
    assert image["_type"] == "image-file" and image["width"] > 100 and image["height"] > 100
    assert (offline / "files" / image["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_log_adapter_false_and_no_router_log_neither(tmp_path):
    run(compose([*SMALL, "adapter=lora", "trainer.max_steps=1", "logger.wandb.log_adapter=false",
                 f"paths.output_dir={tmp_path}"]))
    _, records = offline_run(tmp_path)
    assert not [r for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
    rows = history(records)
    assert not any("routing/eval_load" in row for row in rows)      # LoRA has no router
    assert any("predictions/toy_math" in row for row in rows)


@pytest.mark.slow
def test_plain_multirun_jobs_share_one_group_named_for_the_multirun_dir(tmp_path):
    sweep_dir = tmp_path / "my-launch"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "run.py", "-m", "adapter=lora", "seed=0,1", *SMALL, "trainer.max_steps=1",
                           "eval=none", f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 2
    groups = set()
    for job in jobs:
        (run_record,) = [r.run for r in offline_run(job)[1] if r.WhichOneof("record_type") == "run"]
        groups.add(run_record.run_group)
    assert groups == {"my-launch"}
