"""trainer.compile=true: the decoder blocks are compiled in place (names, hooks, adapter context unchanged) and
train exactly what the eager model trains; the adapters' hot path compiles without graph breaks."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import fresh_micro_model
from comol.adapters import adapter_context, inject_adapter
from comol.data import collate_left, encode_example, generate_toy_math
from comol.errors import ConfigError
from comol.models.lit_module import AdapterLM, compile_blocks


def adapted(name: str):
    model, tok = fresh_micro_model("qwen3")
    inject_adapter(model, {"name": name, "r": 4, "dropout": 0.0, **({"num_experts": 4} if name == "comol" else {})})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = collate_left([encode_example(r, tok, 64) for r in generate_toy_math(3, seed=1)], tok.pad_token_id)
    return model.train(), batch


def test_compile_refuses_a_model_without_decoder_blocks():
    with pytest.raises(ConfigError, match=r"trainer.compile=true: Linear has no \*DecoderLayer modules"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "comol"])
def test_compiled_blocks_train_what_eager_blocks_train(name):
    model, batch = adapted(name)
    eager = copy.deepcopy(model)
    lit = AdapterLM(model, {"lr": 1e-2}, compile=True)
    names_before = [n for n, _ in eager.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names_before   # in place: checkpoints unchanged
    with adapter_context(model).routing.collecting() as routing:
        out = lit(batch)
        stats = routing.summary()
    out.loss.backward()
    with adapter_context(eager).routing.collecting() as routing_e:
        ref = AdapterLM(eager, {"lr": 1e-2})(batch)
        stats_e = routing_e.summary()
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert stats.keys() == stats_e.keys()
    for k in stats_e:
        assert stats[k] == pytest.approx(stats_e[k], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "comol"])
def test_adapted_block_has_no_graph_breaks(name):
    """torch._dynamo.explain on one adapted decoder block (the unit trainer.compile compiles), training mode,
    routing statistics off (as on 9 batches in 10)."""
    import torch._dynamo

    model, batch = adapted(name)
    block = model.model.layers[0]
    x = model.model.embed_tokens(batch["input_ids"]).detach()
    pos = model.model.rotary_emb(x, torch.arange(x.shape[1])[None])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x, attention_mask=None, position_embeddings=pos)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


@pytest.mark.parametrize("name", [pytest.param("lora", marks=pytest.mark.slow), "comol"])
def test_compiled_blocks_share_one_graph_across_blocks_and_forwards(name):
    """Every block of the model and every later forward reuse the graphs of the first: nothing in the adapters'
    hot path is a per-layer or per-forward constant the graph is guarded on (before, AdapterContext.first_call
    keyed a table by id(layer) and compared forward_id, so each block and forward compiled anew until the
    recompile limit, after which blocks ran eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, batch = adapted(name)
    assert len(model.model.layers) >= 2
    torch._dynamo.reset()
    counters.clear()
    lit = AdapterLM(model, {"lr": 1e-2}, compile=True)
    for _ in range(3):
        lit(batch).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, dict(counters["stats"])   # the forward graph (+ at most one variant of it)
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_the_bench_compiles_adapter_layers_in_place():
    from comol.adapters.base import AdapterLinear
    from comol.tools.bench import compile_adapter_layers

    model, _ = adapted("comol")
    layers = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    assert compile_adapter_layers(model) == len(layers) > 0
    assert all(m._compiled_call_impl is not None for m in layers)
