"""CoMoL against the paper's equation: hand-computed values, bf16, init, and no per-expert stack."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cases_core import naive_comol

from comol.adapters import build_adapter_config, inject_adapter
from comol.adapters.comol import CoMoLLinear
from comol.errors import ConfigError


class One(nn.Module):
    def __init__(self, n, m, bias=False):
        super().__init__()
        self.q_proj = nn.Linear(n, m, bias=bias)


def comol_layer(n=24, m=20, **kw) -> CoMoLLinear:
    model = One(n, m, bias=True)
    inject_adapter(model, {"name": "comol", "target_modules": ["q_proj"], "dropout": 0.0, **kw})
    return model.q_proj


def randomize(layer: CoMoLLinear, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.adapter_A, layer.adapter_B, layer.adapter_cores, layer.adapter_router.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_hand_computed_value():
    """n=2, m=1, r=2, N=2, alpha=4 (s=2): every number below is worked out by hand."""
    model = One(2, 1)
    inject_adapter(model, {"name": "comol", "r": 2, "alpha": 4, "num_experts": 2, "dropout": 0.0,
                           "target_modules": ["q_proj"]})
    layer = model.q_proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor([[0.5, -1.0]]))
        layer.adapter_A.copy_(torch.eye(2))                                   # z = x = (1, 2)
        layer.adapter_router.weight.copy_(torch.eye(2))                       # logits = (1, 2)
        layer.adapter_cores.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]))
        layer.adapter_B.copy_(torch.tensor([[1.0, 0.0]]))
    g2 = 1 / (1 + math.exp(-1))                    # softmax((1, 2))[1]
    g1 = 1 - g2
    # merged core = [[g1, g2], [g2, g1]]; merged·z = (g1 + 2 g2, g2 + 2 g1); B picks the first entry
    expected = 0.5 * 1 - 1.0 * 2 + 2 * (g1 + 2 * g2)
    out = layer(torch.tensor([[1.0, 2.0]]))
    assert out.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.9621171573, abs=1e-9)


@pytest.mark.parametrize("core_router", [True, False])
@pytest.mark.parametrize("mixing", ["output", "merged"])
def test_bf16_autocast_matches_fp32_naive(core_router, mixing):
    layer = comol_layer(core_router=core_router, mixing=mixing, r=8, num_experts=4).eval()
    randomize(layer)
    x = torch.randn(2, 5, 24)
    want = naive_comol(layer, x.reshape(-1, 24)).reshape(2, 5, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x) - layer.base_layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
    # gradients under autocast against fp32 naive gradients
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (layer(xg) - layer.base_layer(xg)).float().sum().backward()
    xr = x.clone().requires_grad_(True)
    naive_comol(layer, xr.reshape(-1, 24)).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=0.15, rtol=0.05)


def test_bf16_base_weights_keep_fp32_adapter():
    layer = comol_layer().eval()
    layer.base_layer.to(torch.bfloat16)
    randomize(layer)
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.adapter_cores.dtype == torch.float32
    want = layer.base_layer(x).float() + naive_comol(layer, x.float())
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.02)


def test_zero_delta_at_init_and_init_ranges():
    layer = comol_layer(r=16, num_experts=8)
    x = torch.randn(4, 24)
    assert torch.equal(layer(x), layer.base_layer(x))
    bound = 1 / math.sqrt(16)
    assert layer.adapter_cores.abs().max() <= bound and layer.adapter_cores.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.adapter_B) == 0
    assert layer.adapter_router.bias is None and layer.adapter_router.in_features == 16


def test_output_and_merged_forms_agree():
    a = comol_layer(mixing="output", r=4, num_experts=6).eval()
    b = comol_layer(mixing="merged", r=4, num_experts=6).eval()
    randomize(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(9, 24)
    torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=1e-5)


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.numels.append((t.numel(), func.__name__, tuple(t.shape)))
        return out


@pytest.mark.parametrize("num_experts,core_dropout", [(8, 0.0), (64, 0.0), (8, 0.1)])
def test_never_builds_per_token_stack_of_cores(num_experts, core_dropout):
    """No tensor in forward or backward is as large as [tokens, N, r, r]."""
    r, tokens = 8, 32
    layer = comol_layer(n=24, m=20, r=r, num_experts=num_experts, core_dropout=core_dropout).train()
    randomize(layer)
    x = torch.randn(tokens, 24, requires_grad=True)
    with ShapeRecorder() as rec:
        layer(x).sum().backward()
    biggest = max(rec.numels)
    assert biggest[0] < tokens * num_experts * r * r / 2, biggest
    # activations stay O(tokens * min(N r, r^2)); the largest other tensors are parameters (cores, W)
    assert biggest[0] <= max(tokens * max(min(num_experts, r) * r, r * r), num_experts * r * r, 24 * 20, tokens * 24), biggest


def test_core_dropout_only_in_training():
    layer = comol_layer(core_dropout=0.5, r=4, num_experts=3)
    randomize(layer)
    x = torch.randn(6, 24)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(2)
    assert not torch.equal(y1, layer(x))


@pytest.mark.parametrize("field,value", [("r", 0), ("r", -4), ("num_experts", 0), ("dropout", 1.0),
                                         ("mixing", "stack"), ("core_dropout", -0.1)])
def test_invalid_settings_name_the_key(field, value):
    with pytest.raises(ConfigError, match=rf"adapter\.{field}="):
        build_adapter_config({"name": "comol", field: value})
