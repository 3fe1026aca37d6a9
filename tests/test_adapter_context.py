"""The explicit adapter context: a plain PyTorch loop equals the LightningModule; masks, aux losses,
per-step updates and routing statistics flow through the model's context only; hooks come off."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import fresh_micro_model
from comol.adapters import adapter_context, attach_optimizer, inject_adapter
from comol.adapters.routing_stats import DEAD_FRACTION, RoutingStats
from comol.data import collate_left, encode_example, generate_toy_math
from comol.errors import ComolError
from comol.models.lit_module import AdapterLM

ROUTED = [
    {"name": "mola", "r": 4, "num_experts": 4, "top_k": 2, "dropout": 0.0, "aux_loss_coeff": 0.5},
    {"name": "adamole", "r": 4, "num_experts": 4, "dropout": 0.0, "aux_loss_coeff": 0.5},
    {"name": "flylora", "r": 8, "top_k": 2, "dropout": 0.0},
    {"name": "comol", "r": 4, "num_experts": 4, "dropout": 0.0},
    {"name": "sparsemoa", "dropout": 0.0},
]


def padded_batch(tok, n=4):
    rows = generate_toy_math(n, seed=5)
    batch = collate_left([encode_example(r, tok, 64) for r in rows], tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # padding to exclude
    return batch


def adapted(adapter, family="qwen3"):
    model, tok = fresh_micro_model(family)
    inject_adapter(model, adapter)
    with torch.no_grad():  # non-zero B so every path matters
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model, tok


def two_steps(model, batch, via_lightning: bool, coeff: float):
    """Two optimizer steps; returns (losses, aux losses, grads of step 2, adapter state after)."""
    model = copy.deepcopy(model).train()
    ctx = adapter_context(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if via_lightning:
        lit = AdapterLM(model, {"lr": 1e-2, "warmup_steps": 0}, aux_loss_coeff=coeff)
        opt = torch.optim.AdamW(params, lr=1e-2)
        ctx.attach_optimizer(opt)  # what AdapterLM.configure_optimizers does

        def loss_fn():
            out = lit(batch)
            aux = ctx.aux_loss()
            return out.loss, aux, out.loss + coeff * aux if aux is not None and coeff > 0 else out.loss
    else:
        opt = torch.optim.AdamW(params, lr=1e-2)
        attach_optimizer(model, opt)

        def loss_fn():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            aux = ctx.aux_loss()
            return out.loss, aux, out.loss + coeff * aux if aux is not None and coeff > 0 else out.loss
    losses, auxes = [], []
    for _ in range(2):
        opt.zero_grad()
        loss, aux, total = loss_fn()
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
        auxes.append(None if aux is None else aux.item())
    state = {n: t.clone() for n, t in model.state_dict().items() if "adapter_" in n}
    return losses, auxes, grads, state


@pytest.mark.parametrize("adapter", ROUTED, ids=[a["name"] for a in ROUTED])
def test_plain_loop_equals_lightning_module(adapter):
    model, tok = adapted(adapter)
    batch = padded_batch(tok)
    coeff = adapter.get("aux_loss_coeff", 0.0)
    torch.manual_seed(0)
    lit = two_steps(model, batch, True, coeff)
    torch.manual_seed(0)
    plain = two_steps(model, batch, False, coeff)
    assert lit[0] == plain[0] and lit[1] == plain[1]
    if coeff:
        assert lit[1][0] is not None and lit[1][0] > 0
    assert lit[2].keys() == plain[2].keys() and lit[2]
    for name in lit[2]:
        assert torch.equal(lit[2][name], plain[2][name]), name
    for name in lit[3]:  # FlyLoRA's routing bias moved identically (once per optimizer step)
        assert torch.equal(lit[3][name], plain[3][name]), name
    if adapter["name"] == "flylora":
        assert any(t.abs().sum() > 0 for n, t in plain[3].items() if n.endswith("adapter_router_bias"))


def test_padding_changes_neither_aux_loss_nor_statistics():
    """Tokens under attention_mask == 0 are left out: rewriting them changes no routing number."""
    model, tok = adapted(ROUTED[0])
    model.train()
    batch = padded_batch(tok)
    ctx = adapter_context(model)
    results = []
    for fill in (0, 7):
        ids = batch["input_ids"].clone()
        ids[batch["attention_mask"] == 0] = fill
        with ctx.routing.collecting() as stats:
            model(input_ids=ids, attention_mask=batch["attention_mask"])
            results.append((ctx.aux_loss().item(), stats.summary()))
    # left padding + causal attention: real tokens never see the pad ids, so everything is equal
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for key, value in results[0][1].items():
        assert value == pytest.approx(results[1][1][key], abs=1e-5), key


def test_kv_cache_generation_uses_the_last_mask_columns():
    from comol.eval.generate import generate_responses

    model, tok = adapted(ROUTED[3])
    model.eval()
    with adapter_context(model).routing.collecting() as stats:
        out = generate_responses(model, tok, ["1 + 1 =", "a much longer prompt here: 2 + 2 ="], max_new_tokens=3,
                                 decoding={})
        summary = stats.summary()
    assert len(out) == 2 and summary["routing/mean_entropy"] > 0


def test_direct_layer_call_with_a_stale_mask_is_an_error():
    model, tok = adapted(ROUTED[3])
    batch = padded_batch(tok)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    layer = model.model.layers[0].self_attn.q_proj
    ctx = adapter_context(model)
    with ctx.routing.collecting():  # CoMoL reads the mask only for its statistics
        with pytest.raises(ComolError, match="attention_mask of shape"):
            layer(torch.randn(1, 3, layer.in_features))
        with ctx.masked(torch.ones(1, 3)):
            assert layer(torch.randn(1, 3, layer.in_features)).shape == (1, 3, layer.out_features)


def test_remove_takes_every_hook_off():
    model, tok = adapted({"name": "softmoa", "dropout": 0.0})
    hooked = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())  # noqa: E731
    assert hooked() > 1
    adapter_context(model).remove()
    assert hooked() == 0


def test_routing_statistics_hand_computed():
    stats = RoutingStats()
    stats.enabled = True
    # two modules, N = 2; token 3 is padding (weights would flip the result if counted)
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([True, True, True, False])
    stats.record("a", w, mask)
    sel = torch.tensor([[True, False], [True, False], [True, False], [False, True]])
    stats.record("b", sel.float(), mask, selected=sel)
    out = stats.summary()
    # a: loads (1 + .5 + 1)/3 = 5/6, 1/6; entropy (0 + 1 + 0)/3 (normalised by log 2)
    assert out["routing/a/entropy"] == pytest.approx(1 / 3)
    assert out["routing/a/max_load_ratio"] == pytest.approx(5.0)
    assert out["routing/a/dead_experts"] == 0  # 1/6 > 0.1 * 1/2
    # b: every valid token picks expert 0: expert 1 is dead, ratio floored at 1e-6 / N
    assert out["routing/b/dead_experts"] == 1
    assert out["routing/b/max_load_ratio"] == pytest.approx(1.0 / (1e-6 / 2))
    assert out["routing/mean_entropy"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["routing/dead_experts"] == 1
    assert DEAD_FRACTION == 0.1
    assert stats.loads()["a"]["load"] == pytest.approx([5 / 6, 1 / 6])


def test_routing_statistics_match_a_naive_recount_on_a_model():
    """CoMoL: the logged per-module entropy equals one recomputed from the gates by hand."""
    model, tok = adapted(ROUTED[3])
    model.eval()
    batch = padded_batch(tok)
    layer = model.model.layers[1].self_attn.v_proj
    seen = {}
    layer.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))  # returns None: output untouched
    with adapter_context(model).routing.collecting() as stats, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out = stats.summary()
    x = seen["x"].reshape(-1, layer.in_features)[batch["attention_mask"].reshape(-1).bool()]
    g = torch.softmax((x @ layer.lora_A.T) @ layer.adapter_router.weight.T, -1)
    want = (-(g * g.log()).sum(-1) / math.log(4)).mean().item()
    assert out["routing/model.layers.1.self_attn.v_proj/entropy"] == pytest.approx(want, rel=1e-5)


def test_statistics_are_off_unless_enabled():
    model, tok = adapted(ROUTED[3])
    batch = padded_batch(tok)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert adapter_context(model).routing.summary() == {}


@pytest.mark.parametrize("adapter", ["comol", "lora"])
def test_run_logs_routing_at_log_interval_and_summarises_in_results(tmp_path, adapter):
    import csv
    import json

    from comol.config import compose
    from comol.pipeline import run

    cfg = compose(["trainer=debug", "trainer.max_steps=4", "trainer.log_every_n_steps=2", "logger=csv",
                   "routing_stats_every=2",  # batches 0 and 2 recorded
                   f"adapter={adapter}", "eval.limit=4", "dataset.train_size=32", "dataset.val_size=8",
                   f"paths.output_dir={tmp_path}"])
    results = run(cfg)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/version_*/metrics.csv")))))
    logged = [r for r in rows if r.get("routing/model.layers.0.self_attn.q_proj/entropy")]  # training rows
    if adapter == "lora":  # nothing routed, nothing reported
        assert not any(k.startswith("routing/") for k in on_disk) and not logged
        return
    for key in ("routing/mean_entropy", "routing/dead_experts", "routing/max_load_ratio"):
        assert key in on_disk and on_disk[key] == results[key]
    assert 0 < on_disk["routing/mean_entropy"] <= 1
    assert [int(r["step"]) for r in logged] == [0, 2]  # the steps of the recorded batches 0 and 2, and only those
    assert all(r["routing/mean_entropy"] for r in logged)
    module_keys = [k for k in rows[0] if k.startswith("routing/model.layers.0.") and k.endswith("/entropy")]
    assert len(module_keys) == 5  # q, k, v, o, down of layer 0


#: every adapter preset with a router (conf/adapter/*.yaml): linear-level ones route inside each adapted
#: projection, block-level ones (MoA) once per decoder layer (``layer.adapter_moa``)
ROUTED_PRESETS = ["comol", "comol_nocr", "comol_sh", "molora", "hydralora", "mola", "mole", "adamole", "flylora",
                  "softmoa", "softmoa_instance", "sparsemoa", "unipeft"]
BLOCK_LEVEL = {"softmoa", "softmoa_instance", "sparsemoa", "unipeft"}


def preset(name: str) -> dict:
    from omegaconf import OmegaConf

    from comol.config import compose

    return OmegaConf.to_container(compose([f"adapter={name}"]).adapter, resolve=True)


def one_recorded_forward(model, batch):
    """(summary, loads, recorded tokens per module) of one eval forward with statistics on."""
    model.eval()
    with adapter_context(model).routing.collecting() as stats, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        # the token count every mean is divided by (the accumulators are not public otherwise)
        tokens = {name: float(acc.tokens) for name, acc in stats._acc.items()}
        return stats.summary(), stats.loads(), tokens


@pytest.mark.parametrize("name", ROUTED_PRESETS)
def test_routing_statistics_of_every_routed_adapter(name):
    """One left-padded forward per preset: an entry per routed module, loads summing to 1 (gate mass: the
    share of real tokens with any weight, so at most 1), entropy in [0, 1], exactly the real tokens counted."""
    cfg = preset(name)
    model, tok = adapted(cfg)
    batch = padded_batch(tok)
    real = int(batch["attention_mask"].sum())
    layers = model.config.num_hidden_layers
    if name in BLOCK_LEVEL:
        want = {f"model.layers.{i}.adapter_moa" for i in range(layers)}
    else:
        want = {n for n, _ in model.named_modules()  # the adapted projections (not comol_sh's shared A, B)
                if n.startswith("model.layers.") and n.rsplit(".", 1)[-1] in cfg["target_modules"]}
        assert len(want) == layers * len(cfg["target_modules"])
    summary, loads, tokens = one_recorded_forward(model, batch)

    modules = {k[len("routing/"):-len("/entropy")] for k in summary if k.count("/") > 1 and k.endswith("/entropy")}
    assert modules == set(loads) == set(tokens) == want
    experts = cfg["r"] if name == "flylora" else cfg.get("num_experts")  # FlyLoRA routes over its ranks
    for module in want:
        load = loads[module]["load"]
        assert experts is None or len(load) == experts
        assert min(load) >= 0 and sum(load) == pytest.approx(1.0, abs=1e-5), module
        if "gate_mass" in loads[module]:
            assert min(loads[module]["gate_mass"]) >= 0 and 0 < sum(loads[module]["gate_mass"]) <= 1 + 1e-5
        assert -1e-6 <= summary[f"routing/{module}/entropy"] <= 1 + 1e-6, module
        assert tokens[module] == real, module
    assert 0 <= summary["routing/mean_entropy"] <= 1 + 1e-6


def test_presets_without_a_router_record_nothing():
    """The list above is complete: every other preset leaves the statistics empty."""
    from comol import CONF_DIR

    others = sorted({p.stem for p in (CONF_DIR / "adapter").glob("*.yaml")} - set(ROUTED_PRESETS))
    assert others and set(ROUTED_PRESETS) <= {p.stem for p in (CONF_DIR / "adapter").glob("*.yaml")}
    for name in others:
        model, tok = adapted(preset(name))
        summary, loads, _ = one_recorded_forward(model, padded_batch(tok))
        assert summary == {} and loads == {}, name
