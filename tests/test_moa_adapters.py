"""Block-level adapters of the MoA paper (softmoa, sparsemoa, prompt, parallel_adapter, unipeft).

The common tester (test_adapters_common.py + cases_moa.py) covers no-op at init, counts, save/load
and training. Here: one decoder layer's output (and gradients) against an independent naive
re-implementation of the block formula from the frozen weights and the adapter tensors; generation
with the KV cache; gradient checkpointing; fp32 routers; invalid settings; unsupported models.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F


from adapter_cases import randomize_adapter_
from conftest import fresh_micro_model

from comol.adapters import adapter_context, build_adapter_config, inject_adapter, is_adapter_name
from comol.errors import ConfigError

FAMILIES = ("qwen3", "llama")
fresh = fresh_micro_model


# --- the naive block formula ------------------------------------------------------------------

def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, cos, sin):  # x [B, H, T, hd], cos/sin [B, T, hd]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def lin(P, x, prefix):
    y = x @ P[prefix + ".weight"].T
    return y + P[prefix + ".bias"] if prefix + ".bias" in P else y


def naive_weights(P, u, spec, valid):
    """Router weights [B, T, K] by explicit loops over the pooled positions where needed."""
    if spec.get("level") == "instance":
        b, t, _ = u.shape
        rows = []
        for i in range(b):
            cols = []
            for j in range(t):
                upto = t if spec.get("pooling") == "full" else j + 1
                keep = [s for s in range(upto) if valid[i, s]]
                cols.append(torch.stack([u[i, s] for s in keep]).mean(0) if keep else torch.zeros_like(u[i, 0]))
            rows.append(torch.stack(cols))
        u = torch.stack(rows)
    if spec["router"] == "swiglu":
        logits = lin(P, F.silu(lin(P, u, "adapter_moa.router.w1")) * lin(P, u, "adapter_moa.router.w3"),
                     "adapter_moa.router.w2")
    else:
        logits = lin(P, u, "adapter_moa.router.proj")
    w = torch.sigmoid(logits)
    if "threshold" in spec:
        tau = spec["max_threshold"] * torch.sigmoid(lin(P, u, "adapter_moa.threshold"))
        hard = (w >= tau).float()
        if spec["threshold"] == "hard":
            w = torch.where(w >= tau, w, torch.zeros_like(w))
        elif spec["threshold"] == "ste":
            w = w * (hard + (w - tau) - (w - tau).detach())
        else:
            w = (w - tau) * hard
    return w


def naive_block(layer, config, h, cos, sin, spec, valid):
    """One decoder layer, written out: attention (+ gated LoRA q/k/v/o, prompt expert), MLP (+ gated LoRA
    down, parallel adapter). ``spec`` says which experts exist and how they are routed."""
    P = dict(layer.named_parameters())
    eps, hd = config.rms_norm_eps, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    b, t, _ = h.shape
    slots = spec.get("slots", [])
    u = rms(h, P["input_layernorm.weight"], eps)
    w = naive_weights(P, u if spec.get("input", "normed") == "normed" else h, spec, valid) if slots else None

    def gate(name):
        if w is None:
            return 1.0
        return w[..., slots.index(name if spec.get("gate_by", "type") == "type" or name in ("prompt", "pa") else "lora")
                 ].unsqueeze(-1)

    def proj(x, prefix, target):
        if prefix + ".adapter_A" not in P:
            return x @ P[prefix + ".weight"].T
        base = x @ P[prefix + ".base_layer.weight"].T
        return base + gate(target) * spec["s"] * (x @ P[prefix + ".adapter_A"].T @ P[prefix + ".adapter_B"].T)

    q = proj(u, "self_attn.q_proj", "q_proj").view(b, t, nh, hd)
    k = proj(u, "self_attn.k_proj", "k_proj").view(b, t, nkv, hd)
    v = proj(u, "self_attn.v_proj", "v_proj").view(b, t, nkv, hd)
    if "self_attn.q_norm.weight" in P:
        q, k = rms(q, P["self_attn.q_norm.weight"], eps), rms(k, P["self_attn.k_norm.weight"], eps)
    q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
    k, v = k.repeat_interleave(nh // nkv, 1), v.transpose(1, 2).repeat_interleave(nh // nkv, 1)
    scores = q @ k.transpose(-1, -2) * hd ** -0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    attn = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, t, nh * hd)
    if "self_attn.adapter_prompt.prompts" in P:
        pr = P["self_attn.adapter_prompt.prompts"]
        pk = (pr @ P["self_attn.k_proj.weight" if "self_attn.k_proj.weight" in P else "self_attn.k_proj.base_layer.weight"].T)
        pv = (pr @ P["self_attn.v_proj.weight" if "self_attn.v_proj.weight" in P else "self_attn.v_proj.base_layer.weight"].T)
        pk, pv = pk.view(-1, nkv, hd), pv.view(-1, nkv, hd)
        if "self_attn.k_norm.weight" in P:
            pk = rms(pk, P["self_attn.k_norm.weight"], eps)
        pk = pk.transpose(0, 1).repeat_interleave(nh // nkv, 0)
        pv = pv.transpose(0, 1).repeat_interleave(nh // nkv, 0)
        probs = torch.softmax(q @ pk.transpose(-1, -2) * hd ** -0.5, -1)
        po = (P["self_attn.adapter_prompt.head_gate"].view(1, nh, 1, 1) * probs) @ pv
        attn = attn + gate("prompt") * po.transpose(1, 2).reshape(b, t, nh * hd)
    h2 = h + proj(attn, "self_attn.o_proj", "o_proj")
    m = rms(h2, P["post_attention_layernorm.weight"], eps)
    inter = F.silu(m @ P["mlp.gate_proj.weight"].T) * (m @ P["mlp.up_proj.weight"].T)
    y = proj(inter, "mlp.down_proj", "down_proj")
    if "mlp.adapter_pa.down.weight" in P:
        y = y + gate("pa") * lin(P, F.silu(lin(P, m, "mlp.adapter_pa.down")), "mlp.adapter_pa.up")
    return h2 + y


LORA5 = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
VARIANTS = {
    "softmoa": ({"name": "softmoa", "r": 4, "alpha": 8, "adapter_size": 8, "prompt_length": 3},
                {"slots": LORA5 + ["prompt", "pa"], "router": "swiglu", "s": 2.0}),
    "softmoa_instance_causal": ({"name": "softmoa", "r": 4, "adapter_size": 8, "prompt_length": 3,
                                 "router_level": "instance", "router": "linear"},
                                {"slots": LORA5 + ["prompt", "pa"], "router": "linear", "s": 1.0, "level": "instance",
                                 "pooling": "causal"}),
    "softmoa_instance_full_raw": ({"name": "softmoa", "r": 4, "adapter_size": 8, "prompt_length": 3,
                                   "router_level": "instance", "instance_pooling": "full", "router_input": "raw"},
                                  {"slots": LORA5 + ["prompt", "pa"], "router": "swiglu", "s": 1.0,
                                   "level": "instance", "pooling": "full", "input": "raw"}),
    "sparsemoa": ({"name": "sparsemoa", "r": 4, "adapter_size": 8},
                  {"slots": LORA5 + ["pa"], "router": "swiglu", "s": 1.0, "threshold": "hard", "max_threshold": 0.5}),
    "sparsemoa_ste": ({"name": "sparsemoa", "r": 4, "adapter_size": 8, "threshold_mode": "ste", "max_threshold": 0.9},
                      {"slots": LORA5 + ["pa"], "router": "swiglu", "s": 1.0, "threshold": "ste", "max_threshold": 0.9}),
    "sparsemoa_margin": ({"name": "sparsemoa", "r": 4, "adapter_size": 8, "threshold_mode": "margin",
                          "router": "linear", "prompt_expert": True, "prompt_length": 2},
                         {"slots": LORA5 + ["prompt", "pa"], "router": "linear", "s": 1.0, "threshold": "margin",
                          "max_threshold": 0.5}),
    "prompt": ({"name": "prompt", "prompt_length": 3}, {}),
    "parallel_adapter": ({"name": "parallel_adapter", "adapter_size": 8}, {}),
    "unipeft": ({"name": "unipeft", "r": 4, "adapter_size": 8, "prompt_length": 3},
                {"slots": ["lora", "prompt", "pa"], "gate_by": "family", "router": "linear", "s": 1.0,
                 "level": "instance", "pooling": "causal"}),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_forward_and_gradients_match_naive_formula(variant, family):
    adapter, spec = VARIANTS[variant]
    model, _ = fresh(family)
    inject_adapter(model, {**adapter, "dropout": 0.0} if "r" in adapter else adapter)
    randomize_adapter_(model, scale=0.3, seed=1)
    model.eval()
    layer = model.model.layers[1]
    b, t, d = 2, 6, model.config.hidden_size
    h = torch.randn(b, t, d)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :2] = False  # "left padding": excluded from instance statistics (the attention still sees it)
    pos = torch.arange(t).unsqueeze(0).expand(b, t)
    cos, sin = model.model.rotary_emb(h, pos)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    with adapter_context(model).masked(valid):
        got = layer(h1, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    assert isinstance(got, torch.Tensor) and got.shape == h.shape  # what the unwrapped layer returns
    want = naive_block(layer, model.config, h2, cos, sin, spec, valid)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)

    params = [p for n, p in layer.named_parameters() if p.requires_grad]
    r = torch.randn_like(want)
    g_got = torch.autograd.grad((got * r).sum(), [h1, *params], allow_unused=True)
    g_want = torch.autograd.grad((want * r).sum(), [h2, *params], allow_unused=True)
    names = ["input"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, a, e in zip(names, g_got, g_want):
        assert (a is None) == (e is None), name
        if a is not None:
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-3, msg=name)
    if spec.get("threshold") == "hard":  # faithful default: the threshold gets no gradient
        assert all(g is None for n, g in zip(names, g_got) if "threshold" in n)
    else:
        assert all(g is not None for g in g_got)
    # the router weights are handed over only for the duration of the block's forward
    assert all(getattr(m, "route_weight", None) is None for m in model.modules())


def test_sparse_selection_drops_experts_below_threshold():
    model, _ = fresh("qwen3")
    inject_adapter(model, {"name": "sparsemoa", "r": 4, "adapter_size": 8})
    router = model.model.layers[0].adapter_moa
    with torch.no_grad():
        router.threshold.bias.fill_(10.0)  # tau ~ 0.5
        router.router.w2.bias.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0, -5.0]))
    w = router.weights(torch.randn(2, 3, model.config.hidden_size) * 1e-3)
    assert torch.all(w[..., 1::2] == 0) and torch.all(w[..., 0::2] > 0.99)


@pytest.mark.parametrize("adapter", [
    {"name": "softmoa", "r": 4, "adapter_size": 8, "prompt_length": 3},
    {"name": "softmoa", "r": 4, "adapter_size": 8, "prompt_length": 3, "router_level": "instance"},
    {"name": "sparsemoa", "r": 4, "adapter_size": 8},
    {"name": "unipeft", "r": 4, "adapter_size": 8, "prompt_length": 3},
    {"name": "prompt", "prompt_length": 3},
    {"name": "parallel_adapter", "adapter_size": 8},
], ids=lambda a: a["name"] + ("_instance" if a.get("router_level") == "instance" else ""))
def test_generate_with_kv_cache_matches_full_forward(adapter):
    model, tok = fresh("qwen3")
    inject_adapter(model, adapter)
    randomize_adapter_(model, scale=0.2, seed=2)
    model.eval()
    enc = tok(["Question: 12 + 7 =", "Hi"], return_tensors="pt", padding=True)  # left padding
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, use_cache=True, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=None)
    seq = out.sequences
    assert seq.shape == (2, enc["input_ids"].shape[1] + 4)
    mask = torch.cat([enc["attention_mask"], torch.ones(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() derives them for left padding
        full = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits
    n = enc["input_ids"].shape[1]
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, full[:, n - 1 + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("adapter", [
    {"name": "softmoa", "r": 4, "adapter_size": 8, "prompt_length": 3, "router_level": "instance", "dropout": 0.0},
    {"name": "sparsemoa", "r": 4, "adapter_size": 8, "dropout": 0.0, "prompt_expert": True, "prompt_length": 2},
], ids=["softmoa_instance", "sparsemoa_prompt"])
def test_gradient_checkpointing_replays_the_routing(adapter):
    model, tok = fresh("llama")
    inject_adapter(model, adapter)
    randomize_adapter_(model, scale=0.2, seed=3)
    enc = tok(["a b c d e f", "x y"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    def grads():
        model.zero_grad()
        model.train()
        model(**enc, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = grads()
    assert len(calls) == 3  # forward + replay during backward: the routing hooks ran again
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_router_runs_in_fp32_under_autocast():
    model, _ = fresh("qwen3")
    inject_adapter(model, {"name": "softmoa", "r": 4, "adapter_size": 8, "prompt_length": 3})
    seen = []
    layer = model.model.layers[0]
    layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(layer.self_attn.q_proj.route_weight.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert seen == [torch.float32] and torch.isfinite(out).all()


def test_state_dict_names_and_base_untouched():
    model, _ = fresh("llama")
    base_names = set(model.state_dict())
    inject_adapter(model, {"name": "softmoa", "r": 4, "adapter_size": 8, "prompt_length": 3})
    names = set(model.state_dict())
    added = {n for n in names - base_names if ".base_layer." not in n}
    assert added and all(is_adapter_name(n) for n in added)
    for n in {*base_names} - names:  # only the wrapped Linears' weights move, under base_layer
        assert n.rsplit(".", 2)[-2] in LORA5 and n.replace(".weight", ".base_layer.weight") in names
    assert all(is_adapter_name(n) for n, p in model.named_parameters() if p.requires_grad)


def test_near_noop_at_init_with_parallel_adapter():
    model, tok = fresh("qwen3")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inject_adapter(model, {"name": "sparsemoa"})
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert 0 < (after - before).abs().max() < 1e-5  # PA's gain-1e-4 init: tiny, not exactly zero


@pytest.mark.parametrize("adapter,key", [
    ({"name": "softmoa", "adapter_size": 0}, "adapter.adapter_size"),
    ({"name": "unipeft", "adapter_size": -3}, "adapter.adapter_size"),
    ({"name": "parallel_adapter", "adapter_size": 0}, "adapter.adapter_size"),
    ({"name": "sparsemoa", "r": 0}, "adapter.r"),
    ({"name": "softmoa", "r": -1}, "adapter.r"),
    ({"name": "softmoa", "router": "mlp"}, "adapter.router"),
    ({"name": "sparsemoa", "max_threshold": 0.0}, "adapter.max_threshold"),
    ({"name": "sparsemoa", "max_threshold": 1.5}, "adapter.max_threshold"),
    ({"name": "sparsemoa", "threshold_mode": "soft"}, "adapter.threshold_mode"),
    ({"name": "softmoa", "router_level": "batch"}, "adapter.router_level"),
    ({"name": "softmoa", "instance_pooling": "max"}, "adapter.instance_pooling"),
    ({"name": "softmoa", "router_input": "post"}, "adapter.router_input"),
    ({"name": "prompt", "prompt_length": 0}, "adapter.prompt_length"),
    ({"name": "prompt", "target_modules": ["q_proj"]}, "adapter.target_modules"),
])
def test_invalid_settings_are_one_line_config_errors(adapter, key):
    with pytest.raises(ConfigError) as e:
        build_adapter_config(adapter)
    msg = str(e.value)
    assert msg.startswith(key + "=") and "\n" not in msg


def test_max_threshold_one_is_allowed():
    assert build_adapter_config({"name": "sparsemoa", "max_threshold": 1.0}).max_threshold == 1.0


def test_unknown_lora_target_names_the_model():
    model, _ = fresh("qwen3")
    with pytest.raises(ConfigError, match=r"Qwen3ForCausalLM.*no nn.Linear named qkv_proj"):
        inject_adapter(model, {"name": "softmoa", "target_modules": ["q_proj", "qkv_proj"]})


@pytest.mark.parametrize("adapter", ["softmoa", "sparsemoa", "prompt", "unipeft", "parallel_adapter"])
def test_unsupported_architecture_is_a_config_error(adapter):
    from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel has no single `layers` list"):
        inject_adapter(gpt2, {"name": adapter})
    if adapter == "parallel_adapter":
        return  # needs only mlp + post_attention_layernorm, which Phi3 has: supported there
    # Phi3 has decoder layers, but a fused qkv_proj instead of q/k/v_proj
    phi3 = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                      intermediate_size=64, pad_token_id=0))
    with pytest.raises(ConfigError) as e:
        inject_adapter(phi3, {"name": adapter})
    msg = str(e.value)
    assert "Phi3ForCausalLM" in msg and "Phi3DecoderLayer" in msg and "q_proj" in msg and "\n" not in msg
