"""``python -m comol.export``: a LoRA adapter as a PEFT adapter (loaded by PEFT itself, logits
compared with ours) and any exactly-mergeable adapter as a merged Transformers model folder
(loaded by ``AutoModelForCausalLM``); refusals for the adapters that have neither.

Backbones: the tiny Qwen3 and tiny Llama of conf/model (random-init from ``init_seed``, so
``load_backbone`` rebuilds the same weights every time), and SmolLM2-135M (the session
``smollm2`` fixture of conftest: real weights, real tokenizer) for one PEFT round trip.
peft is a dev dependency: imported plainly, so a missing peft fails the module instead of
skipping it.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import peft
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from comol import CONF_DIR
from comol.adapters import inject_adapter, save_adapter
from comol.data import collate_left, encode_example, generate_toy_math
from comol.errors import CheckpointError
from comol.export import export_peft, main
from comol.models import load_backbone

FAMILIES = ["tiny_qwen3", "tiny_llama"]
LORA = {"name": "lora", "r": 4, "alpha": 12, "dropout": 0.05, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def model_cfg(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))


def batch(tok):
    rows = generate_toy_math(3, seed=4)
    return collate_left([encode_example(r, tok, 48) for r in rows], tok.pad_token_id)


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def saved_adapter(tmp_path, cfg: dict, adapter: dict):
    """Inject ``adapter`` into ``cfg``'s backbone, give every adapter tensor random non-zero
    values (B starts at zero: an untrained adapter would hide a lost B), save it."""
    model, tok = load_backbone(cfg)
    inject_adapter(model, adapter)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = save_adapter(model, tmp_path / "adapter", base_model=cfg)
    return model.eval(), tok, out


def naive_lora_logits_fp64(cfg, adapted, b):
    """Independent reference: a float64 backbone with W x + s·(x Aᵀ) Bᵀ added by forward hooks."""
    ref, _ = load_backbone(cfg)
    ref.double()
    for name, layer in adapted.named_modules():
        if hasattr(layer, "adapter_A"):
            a, b_, s = layer.adapter_A.double(), layer.adapter_B.double(), layer.scaling
            ref.get_submodule(name).register_forward_hook(
                lambda mod, args, out, a=a, b_=b_, s=s: out + s * (args[0] @ a.T) @ b_.T)
    return logits(ref, b)


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


# --- PEFT -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_loads_in_peft_with_our_logits(tmp_path, family, capsys):
    cfg = model_cfg(family)
    ours, tok, adapter_dir = saved_adapter(tmp_path, cfg, LORA)
    code, io = run_cli([adapter_dir, "--to", "peft", "--out", tmp_path / "peft"], capsys)
    assert code == 0 and "checked against PEFT" in io.out, io

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                   "use_rslora", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 12.0, "lora_dropout": 0.05,
        "bias": "none", "use_rslora": False, "base_model_name_or_path": None}  # random-init: no hub id
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]

    backbone, _ = load_backbone(cfg)  # a second, independent build of the same backbone
    b = batch(tok)
    base_logits = logits(backbone, b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(backbone, str(tmp_path / "peft")).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]

    # PEFT's adapter tensors: exactly our LoRA layers, same values, same scaling
    state = peft.get_peft_model_state_dict(theirs)
    ours_layers = {n: m for n, m in ours.named_modules() if hasattr(m, "adapter_A")}
    assert len(state) == 2 * len(ours_layers) == 2 * 3 * 4  # (A, B) x 3 targets x 4 layers
    for name, layer in ours_layers.items():
        assert torch.equal(state[f"base_model.model.{name}.lora_A.weight"], layer.adapter_A)
        assert torch.equal(state[f"base_model.model.{name}.lora_B.weight"], layer.adapter_B)
        assert theirs.get_submodule(f"base_model.model.{name}").scaling["default"] == layer.scaling == 3.0

    want = logits(ours, b)
    assert (want - base_logits).abs().max() > 1e-3  # the adapter changes the output
    # same fp32 operations in the same order (W x + s·B(A x)): equal up to summation order of GEMMs
    torch.testing.assert_close(logits(theirs, b), want, atol=1e-6, rtol=0)


def test_peft_export_refuses_a_corrupt_adapter_and_keeps_the_old_output(tmp_path, capsys):
    _, _, adapter_dir = saved_adapter(tmp_path, model_cfg("tiny_qwen3"), LORA)
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.2.mlp.down_proj.adapter_B"]
    save_file(tensors, str(weights))
    config = adapter_dir / "adapter_config.json"   # checksum made to match: the tensor check is what refuses
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}))
    out = tmp_path / "peft"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")   # an earlier export (--out may replace only one)
    (out / "keep.txt").write_text("older export")
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: missing tensor "
                                              r"model\.layers\.2\.mlp\.down_proj\.adapter_B"):
        export_peft(adapter_dir, out)
    assert (out / "keep.txt").read_text() == "older export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


@pytest.mark.parametrize("adapter,reason", [
    ({"name": "comol", "r": 2, "num_experts": 2}, "it is token-routed"),
    ({"name": "mola", "r": 2, "num_experts": 3, "top_k": 1}, "it is token-routed"),
    ({"name": "denselora", "r": 2}, "PEFT has no equivalent"),
    ({"name": "parallel_adapter", "adapter_size": 4}, "PEFT has no equivalent"),
])
@pytest.mark.slow
def test_peft_export_refuses_other_adapters_in_one_line(tmp_path, adapter, reason, capsys):
    _, _, adapter_dir = saved_adapter(tmp_path, model_cfg("tiny_qwen3"), adapter)
    code, io = run_cli([adapter_dir, "--to", "peft", "--out", tmp_path / "peft"], capsys)
    assert code == 2 and io.err.count("\n") == 1
    assert io.err.startswith(f"error: adapter {adapter['name']!r} cannot be exported to PEFT: ") and reason in io.err
    assert not (tmp_path / "peft").exists()


# --- merged Transformers model --------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_merged_export_is_a_transformers_model_with_our_logits(tmp_path, family, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, tok, adapter_dir = saved_adapter(tmp_path, model_cfg(family), LORA)
    code, io = run_cli([adapter_dir, "--merge", "--out", tmp_path / "merged"], capsys)
    assert code == 0, io
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = "Question: what is 12 + 7? Answer: 19"
    assert merged_tok(text)["input_ids"] == tok(text)["input_ids"]
    backbone, _ = load_backbone(model_cfg(family))
    assert merged.state_dict().keys() == backbone.state_dict().keys()  # no adapter tensor left
    assert merged.config.use_cache is True

    b = batch(tok)
    want, got = logits(ours, b), logits(merged, b)
    assert (want - logits(backbone, b)).abs().max() > 1e-3
    # Tolerance: W x + s·B(A x) and (W + s·B·A) x are equal in exact arithmetic and differ only by
    # fp32 rounding. Measure that rounding: the same adapted model in float64 is the reference, and
    # the merged model may be off it by no more than a few times the adapted fp32 model itself.
    exact = naive_lora_logits_fp64(model_cfg(family), ours, b)
    noise = (want.double() - exact).abs().max().item()
    assert 0 < noise < 1e-4
    assert (got.double() - exact).abs().max().item() <= 4 * noise


@pytest.mark.parametrize("adapter,reason", [
    ({"name": "comol", "r": 2, "num_experts": 2}, "it is token-routed"),
    ({"name": "comol_sh", "r": 2, "num_experts": 2}, "it is token-routed"),
    ({"name": "flylora", "r": 4, "top_k": 2}, "it is token-routed"),
    ({"name": "denselora", "r": 2}, "not a fixed linear weight delta"),
    ({"name": "prompt", "prompt_length": 2}, "modules inside the decoder blocks"),
])
@pytest.mark.slow
def test_merged_export_refuses_adapters_without_an_exact_delta(tmp_path, adapter, reason, capsys):
    _, _, adapter_dir = saved_adapter(tmp_path, model_cfg("tiny_qwen3"), adapter)
    code, io = run_cli([adapter_dir, "--merge", "--out", tmp_path / "merged"], capsys)
    assert code == 2 and io.err.count("\n") == 1
    assert io.err.startswith(f"error: adapter {adapter['name']!r} cannot be merged into the base weights: ")
    assert reason in io.err
    assert not (tmp_path / "merged").exists()


def test_peft_export_on_the_real_smollm2_backbone(tmp_path, capsys, smollm2):
    """The same round trip on SmolLM2-135M (real weights, real tokenizer): PEFT's logits equal ours."""
    import copy

    from omegaconf import OmegaConf

    from comol.config import compose

    cfg = OmegaConf.to_container(compose(["model=smollm2_135m"]).model, resolve=True)
    ours, tok, adapter_dir = saved_adapter(tmp_path, cfg, LORA)
    code, io = run_cli([adapter_dir, "--to", "peft", "--out", tmp_path / "peft"], capsys)
    assert code == 0 and "checked against PEFT" in io.out, io
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    b = batch(tok)
    want = logits(ours, b)
    assert (want - logits(smollm2[0], b)).abs().max() > 1e-3  # the adapter changes the output
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2[0]), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(theirs, b), want, atol=1e-5, rtol=0)
