"""Method-specific behaviour of the mixture-of-LoRA baselines (routing, aux loss, FlyLoRA's bias,
layer sharing, validation) and of LoRA merging. The per-token formulas, counts, save/load and
training checks of every adapter live in the common tester (tests/cases_moe.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


from cases_moe import naive_flylora
from conftest import fresh_micro_model

from comol.adapters import adapter_context, build_adapter_config, inject_adapter
from comol.adapters.base import AdapterLinear, aux_loss
from comol.adapters.merge import merge_adapter, unmerge_adapter
from comol.adapters.gating import load_balancing_loss
from comol.data import collate_left, encode_example, generate_toy_math
from comol.errors import ComolError, ConfigError
from comol.models.lit_module import AdapterLM

micro = fresh_micro_model


def toy_batch(tok, n=4):
    rows = generate_toy_math(n, seed=5)
    return collate_left([encode_example(r, tok, 64) for r in rows], tok.pad_token_id)


def layer(adapter: dict, n=16, m=12):
    """A single adapted Linear built from an adapter config node."""
    torch.manual_seed(0)
    cfg = build_adapter_config({"dropout": 0.0, **adapter})
    mod = cfg.make_layer(nn.Linear(n, m), "x")
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.startswith("adapter_"):
                p.normal_(0, 0.5)
    return mod


def padded_input(n=16):
    x = torch.randn(2, 5, n)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return x, mask


# --- auxiliary loss ----------------------------------------------------------------------

def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1]])
    sel = torch.tensor([[True, False], [False, True], [True, False]])
    # f = (2/3, 1/3), P = (0.7, 0.3): L = 2 (2/3 · 0.7 + 1/3 · 0.3) = 17/15
    torch.testing.assert_close(load_balancing_loss(probs, sel), torch.tensor(17 / 15))
    # token 2 is padding: f = (1/2, 1/2), P = (0.6, 0.4): L = 2 (0.3 + 0.2) = 1
    torch.testing.assert_close(load_balancing_loss(probs, sel, torch.tensor([True, True, False])), torch.tensor(1.0))
    # perfectly balanced top-k routing gives L = k (f sums to k, the HF/Mixtral convention)
    uniform = torch.full((4, 4), 0.25)
    top2 = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(load_balancing_loss(uniform, top2), torch.tensor(2.0))
    # no valid token: 0, not NaN
    assert load_balancing_loss(probs, sel, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_load_balancing_loss_gradient_goes_through_probabilities_only():
    logits = torch.randn(6, 3, requires_grad=True)
    probs = logits.softmax(-1)
    sel = torch.rand(6, 3) > 0.5
    load_balancing_loss(probs, sel).backward()
    f = sel.float().mean(0)
    want = torch.autograd.grad((3 * f * logits.softmax(-1).mean(0)).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, want)


@pytest.mark.parametrize("adapter", [{"name": "mola", "num_experts": 4, "top_k": 2},
                                     {"name": "mole", "num_experts": 4},
                                     {"name": "adamole", "num_experts": 4}])
def test_aux_loss_excludes_padding_and_only_in_training(adapter):
    mod = layer({"r": 3, **adapter})
    x, mask = padded_input()
    mod.train()
    with mod.context.masked(mask):
        mod(x)
    aux = mod.context.aux_loss()
    assert aux is not None and aux.dtype == torch.float32 and aux.ndim == 0

    # expected value from the valid tokens only
    rows = x.reshape(-1, 16)[mask.reshape(-1)]
    p = torch.softmax(rows @ mod.adapter_router.weight.T, -1)
    if adapter["name"] == "mola":
        sel = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(2, -1).indices, True)
        score = p
    elif adapter["name"] == "mole":
        sel = (p >= 0.25) | (p == p.max(-1, keepdim=True).values)
        score = p
    else:
        tau = 0.25 * torch.sigmoid(rows @ mod.adapter_threshold.weight.T + mod.adapter_threshold.bias)
        score = p - tau
        sel = score >= 0
    want = 4 * (sel.float().mean(0) * score.mean(0)).sum()
    torch.testing.assert_close(aux, want)

    # padding rows do not matter
    x2 = x.clone()
    x2[0, :2] = torch.randn(2, 16) * 10
    with mod.context.masked(mask):
        mod(x2)
        torch.testing.assert_close(mod.context.aux_loss(), aux)

    # eval forward passes leave no aux loss
    mod.eval()
    with mod.context.masked(mask):
        mod(x)
        assert mod.context.aux_loss() is None


def test_aux_loss_reaches_the_training_objective():
    model, tok = micro()
    inject_adapter(model, {"name": "mola", "r": 2, "num_experts": 4, "top_k": 2, "aux_loss_coeff": 0.5})
    batch = toy_batch(tok)
    lit = AdapterLM(model, {"lr": 1e-3}, aux_loss_coeff=0.5).train()
    lit(batch)
    n_modules = sum(isinstance(m, AdapterLinear) for m in model.modules())
    assert n_modules == 10
    total = aux_loss(model)
    assert total is not None and total.requires_grad
    per_module = adapter_context(model).aux_losses
    assert len(per_module) == n_modules  # one loss per routed module call
    torch.testing.assert_close(total, torch.stack(per_module).sum())
    total.backward()
    assert all(m.adapter_router.weight.grad is not None for m in model.modules() if isinstance(m, AdapterLinear))
    lit.eval()
    lit(batch)
    assert aux_loss(model) is None


# --- routing -------------------------------------------------------------------------------

def test_topk_routing_selects_k_experts_and_renormalises():
    mod = layer({"name": "mola", "r": 2, "num_experts": 5, "top_k": 2})
    x = torch.randn(30, 16)
    w = mod.route(x, None)
    p = torch.softmax(x @ mod.adapter_router.weight.T, -1)
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(30))
    top = p.topk(2, -1)
    torch.testing.assert_close(w.gather(1, top.indices), top.values / top.values.sum(-1, keepdim=True))


def test_unselected_experts_get_no_gradient():
    mod = layer({"name": "mola", "r": 2, "num_experts": 6, "top_k": 1})
    x = torch.randn(1, 16)
    expert = mod.route(x, None).argmax().item()
    mod(x).sum().backward()
    nonzero = [i for i in range(6) if mod.adapter_B.grad[i].abs().sum() > 0]
    assert nonzero == [expert]


def test_threshold_routing_keeps_argmax_when_nothing_passes():
    mod = layer({"name": "mole", "r": 2, "num_experts": 4, "threshold": 1.0})
    x = torch.randn(20, 16)
    w = mod.route(x, None)
    p = torch.softmax(x @ mod.adapter_router.weight.T, -1)
    assert ((w > 0).sum(-1) == 1).all() and torch.equal(w.argmax(-1), p.argmax(-1))
    mod_default = layer({"name": "mole", "r": 2, "num_experts": 4})
    assert mod_default.threshold == 0.25


def test_adamole_all_rejected_gives_zero_update_without_nan():
    mod = layer({"name": "adamole", "r": 2, "num_experts": 3, "tau_max": 1.0})
    with torch.no_grad():
        mod.adapter_threshold.weight.zero_()
        mod.adapter_threshold.bias.fill_(50.0)  # tau = 1 > every probability
    x = torch.randn(4, 16, requires_grad=True)
    d = mod.delta(x)
    assert torch.equal(d, torch.zeros_like(d))
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in mod.parameters())


def test_routers_run_in_fp32_under_autocast():
    mod = layer({"name": "adamole", "r": 2, "num_experts": 3})
    x = torch.randn(2, 4, 16)
    mod.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = mod.route(x.reshape(-1, 16).bfloat16(), None)
        out = mod(x)
    assert w.dtype == torch.float32 and mod.context.aux_loss().dtype == torch.float32
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()


# --- FlyLoRA -----------------------------------------------------------------------------

def fly_modules(model):
    from comol.adapters.flylora import FlyLoraLinear

    return [m for m in model.modules() if isinstance(m, FlyLoraLinear)]


def test_flylora_projection_is_sparse_frozen_and_saved():
    mod = layer({"name": "flylora", "r": 32, "top_k": 8}, n=4096, m=8)
    a = mod.adapter_A
    assert not isinstance(a, nn.Parameter) and not a.requires_grad
    assert ((a != 0).sum(1) == 4096 // (32 // 8)).all()  # n / (r / k) non-zeros per row
    assert abs(a[a != 0].std().item() - 1 / 32) < 0.001  # std 1/r (FlyLoRA / CoMoL reference code), not 1/sqrt(r)
    keys = set(mod.state_dict())
    assert {"adapter_A", "adapter_router_bias", "adapter_B"} <= keys and not any("counts" in k for k in keys)
    assert [n for n, _ in mod.named_parameters() if n.startswith("adapter_")] == ["adapter_B"]


def test_flylora_bias_shifts_selection_and_matches_naive():
    mod = layer({"name": "flylora", "r": 8, "alpha": 4, "top_k": 2}).eval()
    mod.adapter_router_bias.copy_(torch.randn(8) * 2)
    x = torch.randn(9, 16)
    torch.testing.assert_close(mod.delta(x), naive_flylora(mod, x), atol=1e-5, rtol=1e-4)


def test_flylora_counts_exclude_padding_and_update_rule():
    mod = layer({"name": "flylora", "r": 8, "top_k": 2, "bias_lr": 0.01}).train()
    x, mask = padded_input()
    with mod.context.masked(mask):
        mod(x)
    rows = x.reshape(-1, 16)[mask.reshape(-1)]
    a = rows @ mod.adapter_A.T
    want = torch.zeros(a.shape, dtype=torch.bool).scatter_(1, a.topk(2, -1).indices, True).sum(0).float()
    torch.testing.assert_close(mod.adapter_step_counts, want)
    assert mod.adapter_step_counts.sum().item() == 2 * int(mask.sum())
    with mod.context.masked(mask):
        mod(x)  # counts accumulate until the step ends
    torch.testing.assert_close(mod.adapter_step_counts, 2 * want)

    counts = torch.tensor([5.0, 0.0, 2.0, 2.0, 3.0, 1.0, 1.0, 2.0])  # mean 2
    mod.adapter_step_counts = counts
    mod.update_bias()
    torch.testing.assert_close(mod.adapter_router_bias, 0.01 * torch.sign(2.0 - counts))
    assert mod.adapter_step_counts is None
    before = mod.adapter_router_bias.clone()
    mod.update_bias()  # no forward since: nothing to learn from
    assert torch.equal(mod.adapter_router_bias, before)


def test_flylora_bias_changes_in_training_steps_only():
    from comol.eval.generate import generate_responses

    model, tok = micro()
    inject_adapter(model, {"name": "flylora", "r": 8, "top_k": 2, "bias_lr": 1e-3})
    batch = toy_batch(tok)
    lit = AdapterLM(model, {"lr": 1e-3})
    start = [m.adapter_router_bias.clone() for m in fly_modules(model)]

    def unchanged():
        return all(torch.equal(m.adapter_router_bias, b) for m, b in zip(fly_modules(model), start))

    lit.eval()
    with torch.no_grad():
        lit(batch)  # validation-style forward
    generate_responses(model, tok, ["1 + 1 =", "2 + 2 ="], max_new_tokens=3, decoding={})
    adapter_context(model).optimizer_step()  # even if the step hook fired, nothing was counted
    assert unchanged()

    lit.train()
    lit(batch)
    assert unchanged()  # the forward only counts
    counts = [m.adapter_step_counts.clone() for m in fly_modules(model)]
    adapter_context(model).optimizer_step()
    assert not unchanged()
    for m, c, b in zip(fly_modules(model), counts, start):  # one update from this step's counts
        torch.testing.assert_close(m.adapter_router_bias, b + 1e-3 * torch.sign(c.mean() - c), atol=1e-9, rtol=0)


# --- layer sharing ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["denselora", "comol_sh"])
def test_layer_shared_tensors_are_registered_once(name):
    model, _ = micro()
    inject_adapter(model, {"name": name, "r": 4, "target_modules": ["q_proj", "down_proj"]})
    holder = model.adapter_shared
    assert sorted(holder.keys()) == ["down_proj", "q_proj"]
    shared_names = [n for n, _ in model.named_parameters() if "adapter_shared" in n]
    assert sorted(shared_names) == sorted(f"adapter_shared.{t}.adapter_{x}" for t in ("q_proj", "down_proj")
                                          for x in "AB")
    state = model.state_dict()
    assert sum("adapter_A" in k for k in state) == 2
    for mod_name, mod in model.named_modules():
        if isinstance(mod, AdapterLinear):
            t = mod_name.rsplit(".", 1)[-1]
            assert mod.lora_A is holder[t].adapter_A and mod.lora_B is holder[t].adapter_B
    copied = copy.deepcopy(model)
    q = copied.model.layers[1].self_attn.q_proj
    assert q.lora_A is copied.adapter_shared["q_proj"].adapter_A


def test_layer_sharing_rejects_mismatched_shapes():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(8, 8))
            self.b = nn.Sequential(nn.Linear(8, 4))

    with pytest.raises(ConfigError, match="different shapes"):
        inject_adapter(Two(), {"name": "denselora", "r": 2, "target_modules": ["0"]})


# --- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("adapter,key", [
    ({"name": "mola", "num_experts": 4, "top_k": 5}, "adapter.top_k"),
    ({"name": "mola", "top_k": 0}, "adapter.top_k"),
    ({"name": "molora", "num_experts": 0}, "adapter.num_experts"),
    ({"name": "hydralora", "num_experts": 0}, "adapter.num_experts"),
    ({"name": "molora", "r": 0}, "adapter.r"),
    ({"name": "mole", "threshold": 0.0}, "adapter.threshold"),
    ({"name": "mole", "threshold": 1.5}, "adapter.threshold"),
    ({"name": "adamole", "tau_max": 0.0}, "adapter.tau_max"),
    ({"name": "adamole", "tau_max": 2.0}, "adapter.tau_max"),
    ({"name": "flylora", "r": 8, "top_k": 3}, "adapter.top_k"),
    ({"name": "flylora", "r": 8, "top_k": 16}, "adapter.top_k"),
    ({"name": "flylora", "bias_lr": -1.0}, "adapter.bias_lr"),
    ({"name": "denselora", "r": -2}, "adapter.r"),
    ({"name": "comol_sh", "num_experts": 0}, "adapter.num_experts"),
    ({"name": "mola", "experts": 4}, "adapter.experts"),
])
def test_invalid_settings_raise_one_line_config_error(adapter, key):
    with pytest.raises(ConfigError) as info:
        build_adapter_config(adapter)
    msg = str(info.value)
    assert key in msg and "\n" not in msg


def test_defaults_resolve_thresholds_to_one_over_n():
    assert build_adapter_config({"name": "adamole", "num_experts": 4}).tau_max == 0.25
    assert build_adapter_config({"name": "mole", "num_experts": 8}).threshold == 0.125


# --- merging -----------------------------------------------------------------------------

def lora_model():
    model, tok = micro()
    inject_adapter(model, {"name": "lora", "r": 4, "alpha": 8})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval(), tok


def run_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}


def test_merge_unmerge_round_trip_is_exact():
    model, tok = lora_model()
    batch = toy_batch(tok)
    want = run_logits(model, batch)
    original = base_weights(model)
    assert merge_adapter(model) == 10
    assert merge_adapter(model) == 0  # idempotent
    assert any(not torch.equal(p, original[n]) for n, p in base_weights(model).items())
    torch.testing.assert_close(run_logits(model, batch), want, atol=1e-4, rtol=1e-4)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.base_layer.weight, original["model.layers.0.self_attn.q_proj.base_layer.weight"]
                               + q.scaling * q.adapter_B @ q.adapter_A)
    assert unmerge_adapter(model) == 10
    assert all(torch.equal(p, original[n]) for n, p in base_weights(model).items())
    assert torch.equal(run_logits(model, batch), want)


def test_safe_merge_refuses_nan_and_leaves_model_unmerged():
    model, _ = lora_model()
    original = base_weights(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.adapter_B[0, 0] = float("nan")
    with pytest.raises(ComolError, match="down_proj.*NaN/Inf.*left unmerged"):
        merge_adapter(model, safe=True)
    assert all(torch.equal(p, original[n]) for n, p in base_weights(model).items())
    assert not any(getattr(m, "merged", False) for m in model.modules())
    merge_adapter(model, safe=False)  # the caller's choice
    assert not torch.isfinite(model.model.layers[1].mlp.down_proj.base_layer.weight).all()
    unmerge_adapter(model)
    assert all(torch.equal(p, original[n]) for n, p in base_weights(model).items())


@pytest.mark.parametrize("adapter,reason", [
    ({"name": "comol", "r": 2, "num_experts": 2}, "token-routed"),
    ({"name": "molora", "r": 2, "num_experts": 2}, "token-routed"),
    ({"name": "flylora", "r": 4, "top_k": 2}, "token-routed"),
    ({"name": "comol_sh", "r": 2, "num_experts": 2}, "token-routed"),
    ({"name": "hydralora", "r": 2, "num_experts": 2}, "token-routed"),
    ({"name": "adamole", "r": 2, "num_experts": 2}, "token-routed"),
    ({"name": "softmoa", "r": 2, "adapter_size": 4, "prompt_length": 2}, "token-routed"),
    ({"name": "denselora", "r": 2}, "not a fixed linear weight delta"),
    ({"name": "parallel_adapter", "adapter_size": 4}, "inside the decoder blocks (model.layers.0.mlp.adapter_pa)"),
])
def test_merge_refuses_unmergeable_adapters(adapter, reason):
    model, _ = micro()
    inject_adapter(model, adapter)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ComolError) as info:
        merge_adapter(model)
    assert repr(adapter["name"]) in str(info.value) and reason in str(info.value)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


class FullRankDelta(AdapterLinear):
    """A made-up adapter with a fixed dense update (h = W x + D x): mergeable through
    ``delta_weight`` alone, with no merge code of its own."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.adapter_D = nn.Parameter(torch.randn(self.out_features, self.in_features) * 0.05)

    def delta(self, x):
        return x @ self.adapter_D.T

    def delta_weight(self):
        return self.adapter_D.detach().clone()


def test_merge_goes_through_delta_weight_for_any_layer():
    model, tok = micro()
    attn = model.model.layers[1].self_attn
    original = attn.v_proj.weight.detach().clone()
    attn.v_proj = FullRankDelta(attn.v_proj)
    batch = toy_batch(tok)
    want = run_logits(model, batch)
    assert merge_adapter(model) == 1
    torch.testing.assert_close(attn.v_proj.base_layer.weight, original + attn.v_proj.adapter_D)
    torch.testing.assert_close(run_logits(model, batch), want, atol=1e-5, rtol=1e-5)
    assert unmerge_adapter(model) == 1 and torch.equal(attn.v_proj.base_layer.weight, original)


def test_fold_leaves_a_plain_model_with_the_merged_weights():
    from comol.adapters.merge import fold_adapter

    model, tok = lora_model()
    batch = toy_batch(tok)
    want = run_logits(model, batch)
    q = model.model.layers[0].self_attn.q_proj
    expected_q = q.base_layer.weight + q.scaling * q.adapter_B @ q.adapter_A
    fold_adapter(model)
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())
    assert not hasattr(model, "comol_adapter_config")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, expected_q)
    torch.testing.assert_close(run_logits(model, batch), want, atol=1e-4, rtol=1e-4)


def test_flylora_bias_moves_once_per_optimizer_step_with_accumulation(tmp_path, monkeypatch):
    """With gradient accumulation the bias update uses the whole step's counts, once per optimizer step,
    and moves each rank's bias by exactly u·sign(mean(count) - count) for the counts of that step."""
    import lightning as L

    from comol.adapters.flylora import FlyLoraLinear
    from comol.data import SFTDataModule, generate_toy_math

    seen: dict = {}  # layer -> the counts each update was made from
    original = FlyLoraLinear.update_bias

    def spy(self):
        seen.setdefault(self, []).append(self.adapter_step_counts.clone())
        original(self)

    monkeypatch.setattr(FlyLoraLinear, "update_bias", spy)  # before injection: the context binds the spy
    model, tok = micro()
    inject_adapter(model, {"name": "flylora", "r": 8, "top_k": 2, "bias_lr": 1e-3})
    rows = generate_toy_math(16, seed=5)
    dm = SFTDataModule({"batch_size": 4, "max_length": 64, "train_on_prompt": True}, tok,
                       splits={"train": rows, "val": []})
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(AdapterLM(model, {"lr": 1e-3}), datamodule=dm)
    assert trainer.global_step == 2
    # 2 optimizer steps x 2 micro-batches x 4 rows = the 16 rows once: every real token counted top_k times
    tokens = sum(len(encode_example(r, tok, 64)["input_ids"]) for r in rows)
    updates = {m: seen.get(m, []) for m in fly_modules(model)}
    for m, counts in updates.items():
        assert len(counts) == 2
        assert sum(c.sum().item() for c in counts) == 2 * tokens
        want = sum(1e-3 * torch.sign(c.mean() - c) for c in counts)
        torch.testing.assert_close(m.adapter_router_bias, want, atol=1e-9, rtol=0)
    assert any(m.adapter_router_bias.abs().sum() > 0 for m in updates)  # uneven counts: the bias moved


def test_aux_loss_gradients_survive_gradient_checkpointing():
    """The context keeps the padding mask until the next forward, so checkpointed re-runs route like the forward."""
    import copy

    model, tok = micro()
    inject_adapter(model, {"name": "mola", "r": 4, "num_experts": 4, "top_k": 2, "dropout": 0.0,
                           "aux_loss_coeff": 0.5})
    batch = toy_batch(tok)
    assert (batch["attention_mask"] == 0).any()  # there is padding to exclude
    grads = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model).train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lit = AdapterLM(m, {"lr": 1e-3}, aux_loss_coeff=0.5)
        out = lit(batch)  # out.loss = LM loss + 0.5 x aux: the objective is the model's
        torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * aux_loss(m))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
