"""``python -m comol.routing``: its numbers equal an independent recount (every prompt run alone, without
padding, gates recomputed from the layer inputs by hand), its core numbers equal hand computations, and
the command writes the pictures for a routed adapter and refuses a non-routed one in one sentence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import fresh_micro_model, micro_model_cfg
from comol.adapters import adapter_context, inject_adapter, save_adapter
from comol.adapters.comol import CoMoLLinear
from comol.adapters.routing_stats import RoutingStats
from comol.data import generate_toy_math
from comol.data.prompts import build_prompt
from comol.routing import cosine_matrix, effective_rank, main, routing_numbers

TOY = {"source": "toy_math", "train_size": 8, "val_size": 4, "test_size": 6, "data_seed": 3, "max_operand": 9}


def adapted(adapter: dict):
    model, tok = fresh_micro_model()
    inject_adapter(model, adapter)
    with torch.no_grad():  # trained-looking adapter: non-uniform routers, distinct cores
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), tok


def prompts(n=5):
    out = [build_prompt(r) for r in generate_toy_math(n, seed=11)]
    out[1] += " Think about it carefully, step by step."  # lengths differ: the batches are padded
    return out


def naive_erank(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    p = [v / s.sum() for v in s if v > 0]
    return math.exp(-sum(v * math.log(v) for v in p))


def test_effective_rank_of_known_matrices():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 4.0), torch.ones(3))) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    # singular values 3, 1, 0, 0 (under random rotations): p = (3/4, 1/4)
    u, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    m = u @ torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)) @ v.T
    assert effective_rank(m) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-9)


def test_cosine_matrix_by_hand():
    cores = torch.randn(4, 3, 3)
    got = cosine_matrix(cores)
    for i in range(4):
        for j in range(4):
            a, b = cores[i].flatten().tolist(), cores[j].flatten().tolist()
            dot = sum(x * y for x, y in zip(a, b))
            want = dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))
            assert float(got[i, j]) == pytest.approx(want, abs=1e-6)


def naive_recount(model, tok, texts, route):
    """Per routed Linear: summed per-token weights, summed normalised entropy, selection counts, token count,
    and the weights of texts[0]; each prompt is run alone (no padding), the router recomputed by ``route``."""
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "adapter_router") and hasattr(m, "base_layer")}
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.__setitem__(n, a[0].reshape(-1, mod.in_features)))
             for n, m in layers.items()]
    acc = {n: {"share": 0.0, "entropy": 0.0, "selected": 0.0} for n in layers}
    tokens, first = 0, {}
    with torch.no_grad():
        for k, text in enumerate(texts):
            enc = tok([text], return_tensors="pt")
            model(**enc)
            tokens += enc["input_ids"].shape[1]
            for n, layer in layers.items():
                probs, weights, selected = route(layer, inputs[n])
                n_exp = probs.shape[-1]
                acc[n]["share"] = acc[n]["share"] + (weights / weights.sum(-1, keepdim=True)).sum(0)
                acc[n]["entropy"] += float((-(probs * probs.log()).sum(-1) / math.log(n_exp)).sum())
                acc[n]["selected"] = acc[n]["selected"] + selected.sum(0)
                if k == 0:
                    first[n] = weights
    for h in hooks:
        h.remove()
    return acc, tokens, first


def comol_route(layer, x):
    g = torch.softmax((x @ layer.lora_A.T) @ layer.adapter_router.weight.T, -1)
    return g, g, torch.ones_like(g)


def mola_route(layer, x, k=2):
    p = torch.softmax(x @ layer.adapter_router.weight.T, -1)
    order = torch.argsort(p, dim=-1, descending=True)[:, :k]
    sel = torch.zeros_like(p).scatter_(1, order, 1.0)
    kept = p * sel
    return p, kept / kept.sum(-1, keepdim=True), sel  # renormalised over the selected experts


@pytest.mark.parametrize("adapter,route", [
    ({"name": "comol", "r": 4, "num_experts": 4, "dropout": 0.0}, comol_route),
    ({"name": "mola", "r": 4, "num_experts": 4, "top_k": 2, "dropout": 0.0}, mola_route),
], ids=["comol", "mola"])
def test_numbers_equal_a_naive_recount(adapter, route):
    model, tok = adapted(adapter)
    texts = prompts()
    numbers = routing_numbers(model, tok, texts, batch_size=2, module="model.layers.1.self_attn.v_proj")
    acc, tokens, first = naive_recount(model, tok, texts, route)
    assert numbers["tokens"] == tokens
    assert set(numbers["modules"]) == set(acc) and len(acc) == 10  # q k v o down x 2 layers
    for name, m in numbers["modules"].items():
        if adapter["name"] == "comol":
            want_load = (acc[name]["share"] / tokens).tolist()
        else:  # top-k: share of the selections
            want_load = (acc[name]["selected"] / acc[name]["selected"].sum()).tolist()
            assert m["gate_mass"] == pytest.approx((acc[name]["share"] / tokens).tolist(), abs=1e-5)
        assert m["load"] == pytest.approx(want_load, abs=1e-5), name
        assert m["entropy"] == pytest.approx(acc[name]["entropy"] / tokens, abs=1e-5), name
        assert m["layer"] == int(name.split(".")[2]) and m["projection"] == ".".join(name.split(".")[3:])
    gates = numbers["gates_prompt0"]
    assert gates["module"] == "model.layers.1.self_attn.v_proj"
    want = first[gates["module"]]
    assert torch.tensor(gates["weights"]) == pytest.approx(want, abs=1e-5)
    assert len(gates["tokens"]) == want.shape[0] and "".join(gates["tokens"]) == texts[0]
    assert ("cores" in numbers) == (adapter["name"] == "comol")
    if adapter["name"] != "comol":
        return
    for name, layer in model.named_modules():
        if isinstance(layer, CoMoLLinear):
            cores = layer.adapter_cores.detach().double().numpy()
            got = numbers["cores"][name]
            flat = cores.reshape(4, -1)
            cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a in flat for b in flat]
            assert sum(got["cosine"], []) == pytest.approx(cos, abs=1e-9)
            gbar = (acc[name]["share"] / tokens).double().numpy()
            merged = sum(g * c for g, c in zip(gbar, cores))  # = the mean over tokens of the merged cores
            assert got["merged_effective_rank"] == pytest.approx(naive_erank(merged), rel=1e-4)
            assert got["expert_effective_ranks"] == pytest.approx([naive_erank(c) for c in cores], rel=1e-9)


def test_capturing_keeps_weights_and_leaves_the_numbers_alone():
    w, mask = torch.rand(6, 3), torch.tensor([1, 1, 0, 1, 1, 1]).bool()
    plain, captured = RoutingStats(), RoutingStats()
    plain.enabled = True
    plain.record("m", w, mask)
    with captured.collecting(), captured.capturing() as seen:
        captured.record("m", w, mask)
        numbers = captured.summary()
    assert numbers == plain.summary()
    assert torch.equal(seen["m"][0][0], w) and torch.equal(seen["m"][0][1], mask)
    captured.enabled = True
    captured.record("m", w, mask)  # outside capturing(): nothing kept
    assert captured._captured is None


def save(tmp_path, adapter: dict):
    model, _ = adapted(adapter)
    return save_adapter(model, tmp_path / adapter["name"] / "adapter", base_model=micro_model_cfg(),
                        extra={"dataset": TOY})


def test_cli_writes_the_pictures_and_json_for_comol(tmp_path, capsys):
    adapter_dir = save(tmp_path, {"name": "comol", "r": 4, "num_experts": 4, "dropout": 0.0})
    assert main([str(adapter_dir), "--rows", "4"]) == 0  # default set: the toy held-out rows
    out = adapter_dir.parent / "routing"
    for png in ("loads.png", "entropy.png", "gates_prompt0.png", "cores.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    numbers = json.loads((out / "routing.json").read_text())
    assert numbers["adapter"] == "comol" and numbers["eval_set"] == "toy_math" and numbers["rows"] == 4
    assert len(numbers["modules"]) == 10 and len(numbers["cores"]) == 10
    assert 0 < numbers["summary"]["routing/mean_entropy"] <= 1
    assert all(1 <= c["merged_effective_rank"] <= 4 for c in numbers["cores"].values())
    assert str(out / "routing.json") in capsys.readouterr().out


def test_cli_refuses_a_non_routed_adapter(tmp_path, capsys):
    adapter_dir = save(tmp_path, {"name": "lora", "r": 4, "dropout": 0.0})
    assert main([str(adapter_dir), "--out", str(tmp_path / "pics")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: adapter 'lora'") and "is not routed" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "pics").exists()


def test_cli_names_an_unknown_eval_set(tmp_path, capsys):
    adapter_dir = save(tmp_path, {"name": "comol", "r": 4, "num_experts": 4, "dropout": 0.0})
    assert main([str(adapter_dir), "math/nope", "--out", str(tmp_path / "pics")]) == 2
    assert "math/nope" in capsys.readouterr().err
    assert not (tmp_path / "pics").exists()
