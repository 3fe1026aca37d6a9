"""Generation settings and evaluation runs on a tiny model (math, commonsense, HumanEval, re-runs)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import GenerationConfig

from conftest import micro_model_cfg

from comol.adapters import load_adapter
from comol.config import compose
from comol.errors import CheckpointError
from comol.eval.generate import generate_responses
from comol.eval.tasks.code import truncate_completion
from comol.models import load_backbone
from comol.pipeline import run

GREEDY = {"do_sample": False, "num_samples": 1}
PROMPTS = ["Ann has 3 apples", "The answer is", "Below is an instruction"]


@pytest.fixture(scope="module")
def micro():
    model, tok = load_backbone(micro_model_cfg("qwen3"))
    return model.eval(), tok


def manual_greedy(model, tok, prompt, steps):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if nxt.item() == tok.eos_token_id:
                break
            out.append(nxt.item())
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(out, skip_special_tokens=True)


def test_greedy_stays_greedy_even_if_model_config_samples(micro):
    model, tok = micro
    model.generation_config = GenerationConfig(do_sample=True, temperature=5.0, top_k=50, top_p=0.5)  # like Qwen3
    a = generate_responses(model, tok, PROMPTS, 12, {**GREEDY, "seed": 1}, batch_size=2)
    b = generate_responses(model, tok, PROMPTS, 12, {**GREEDY, "seed": 2}, batch_size=3)
    assert a == b
    assert [r[0] for r in a] == [manual_greedy(model, tok, p, 12) for p in PROMPTS]


def test_sampling_gives_n_seeded_samples(micro):
    model, tok = micro
    dec = {"do_sample": True, "num_samples": 3, "temperature": 1.0, "top_p": 0.95, "seed": 0}
    a = generate_responses(model, tok, PROMPTS, 10, dec, batch_size=2)
    assert all(len(r) == 3 for r in a)
    assert a == generate_responses(model, tok, PROMPTS, 10, dec, batch_size=2)
    assert a != generate_responses(model, tok, PROMPTS, 10, {**dec, "seed": 1}, batch_size=2)


def test_truncate_completion_stops_at_next_top_level_statement():
    assert truncate_completion("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert truncate_completion("    return x\nprint(f(1))") == "    return x"
    assert truncate_completion("    return 1") == "    return 1"


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = compose(["trainer=debug", "logger=none", "eval=none", "dataset.train_size=64", "dataset.val_size=8",
                   f"paths.output_dir={out}"])
    run(cfg)
    return out / "adapter"


def eval_run(out, adapter, *overrides):
    cfg = compose(["mode=eval", f"adapter_path={adapter}", "logger=none", *overrides, f"paths.output_dir={out}"])
    return run(cfg)


def test_eval_saved_adapter_on_six_math_files(tmp_path, trained_adapter, shared_data):
    res = eval_run(tmp_path, trained_adapter, "eval=math", "eval.limit=3", "eval.max_new_tokens=8",
                   f"paths.data_dir={shared_data}")
    sets = ["AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP"]
    for s in sets:
        assert f"eval/math/{s}/acc" in res
        lines = (tmp_path / "predictions" / f"{s}.jsonl").read_text().splitlines()
        assert len(lines) == 3
    assert "eval/math/AQuA/acc_robust" in res
    assert res["eval/math/mean_acc"] == pytest.approx(sum(res[f"eval/math/{s}/acc"] for s in sets) / 6)
    assert json.loads((tmp_path / "results.json").read_text())["eval/math/mean_acc"] == res["eval/math/mean_acc"]


def test_eval_reads_and_hashes_the_adapter_weights_once(tmp_path, trained_adapter, monkeypatch):
    """mode=eval: the checks read and hash the weights file; the load uses those very bytes (no second hash)."""
    import hashlib

    from comol.adapters import inject

    weights = (trained_adapter / inject.WEIGHTS_FILE).read_bytes()
    hashed = []
    real_sha256 = hashlib.sha256

    def counting_sha256(data=b"", *a, **k):
        if data == weights:
            hashed.append(1)
        return real_sha256(data, *a, **k)

    monkeypatch.setattr(inject.hashlib, "sha256", counting_sha256)
    res = eval_run(tmp_path, trained_adapter, "eval=toy_math", "eval.limit=2", "eval.max_new_tokens=4")
    assert any(k.startswith("eval/") for k in res) and len(hashed) == 1


def test_eval_commonsense_and_a_rerun_never_overwrites(tmp_path, trained_adapter, shared_data):
    from comol.run_dir import RunDirTaken

    args = ("eval=commonsense", "eval.limit=2", "eval.max_new_tokens=4", f"paths.data_dir={shared_data}")
    eval_run(tmp_path / "a", trained_adapter, *args)
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    assert len([k for k in first if k.startswith("eval/commonsense/")]) == 8
    assert len((tmp_path / "a" / "predictions" / "boolq.jsonl").read_text().splitlines()) == 2
    before = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    with pytest.raises(RunDirTaken, match="already holds a run"):  # the same dir again: refused, untouched
        eval_run(tmp_path / "a", trained_adapter, *args)
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == before
    again = eval_run(tmp_path / "b", trained_adapter, *args)  # its own dir: the same metrics
    assert {k: v for k, v in again.items() if k.startswith("eval/")} == {
        k: v for k, v in first.items() if k.startswith("eval/")}
    assert not list((tmp_path / "b" / "predictions").glob("*.tmp"))


def test_eval_humaneval_sampling_and_sandbox(tmp_path, trained_adapter, shared_data):
    res = eval_run(tmp_path, trained_adapter, "eval=humaneval", "eval.limit=2", "eval.max_new_tokens=8",
                   "eval.decoding.num_samples=2", "eval.workers=2", f"paths.data_dir={shared_data}")
    assert set(k for k in res if k.startswith("eval/")) == {"eval/code/humaneval/pass@1",
                                                              "eval/code/humaneval/confined"}
    assert res["eval/code/humaneval/confined"] == 1.0
    recs = [json.loads(l) for l in (tmp_path / "predictions" / "humaneval.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["n"] == 2 and len(r["completions"]) == 2 for r in recs)
    # Generation apart from execution: eval.execute=false only writes the samples ...
    later = tmp_path / "later"
    res = eval_run(later, trained_adapter, "eval=humaneval", "eval.limit=2", "eval.max_new_tokens=8",
                   "eval.decoding.num_samples=2", "eval.execute=false", f"paths.data_dir={shared_data}")
    assert not any(k.startswith("eval/") for k in res)
    samples = later / "predictions" / "humaneval.samples.jsonl"
    assert not (later / "predictions" / "humaneval.jsonl").exists()
    # ... which comol.eval.execute scores the same way (same seed: same samples, same pass@1).
    from comol.eval.execute import main as execute_main

    first_pass1 = json.loads((tmp_path / "results.json").read_text())["eval/code/humaneval/pass@1"]
    assert execute_main([str(samples), "--workers", "2"]) == {"eval/code/humaneval/pass@1": first_pass1,
                                                              "eval/code/humaneval/confined": 1.0}
    assert json.loads((later / "results.json").read_text())["eval/code/humaneval/confined"] == 1.0


def test_incomplete_adapter_dir_is_named(tmp_path, trained_adapter, micro):
    broken = tmp_path / "broken"
    shutil.copytree(trained_adapter, broken)
    (broken / "adapter_model.safetensors").unlink()
    model, _ = load_backbone(micro_model_cfg("qwen3"))
    with pytest.raises(CheckpointError, match=r"broken: missing adapter_model\.safetensors"):
        load_adapter(model, broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing adapter_config\.json"):
        load_adapter(model, broken)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_adapter(model, tmp_path / "nowhere")


def test_adapter_for_another_backbone_is_rejected(trained_adapter):
    model, _ = load_backbone(micro_model_cfg("qwen3"))  # hidden 64, the adapter was trained on hidden 256
    with pytest.raises(CheckpointError, match=r"unexpected tensor .*saved for another backbone\? it names 'tiny_qwen3'"):
        load_adapter(model, trained_adapter)


def test_loaded_adapter_can_come_back_trainable(trained_adapter):
    from comol.adapters import is_adapter_name
    from comol.config import compose as _compose

    model, _ = load_backbone(_compose([]).model)
    load_adapter(model, trained_adapter, trainable=True)  # resuming training: PEFT's is_trainable trap
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in model.named_parameters() if is_adapter_name(n)}
