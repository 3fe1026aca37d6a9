"""CoMoL: core-space mixture of LoRA experts (docs/methods.md §1).

Per adapted Linear W (n -> m): shared A (r x n), shared B (m x r), N cores M_i (r x r), router W_g.

    z    = A · Drop(x)
    g    = softmax(W_g · z)            (core router, W_g: N x r)   or softmax(W_g · x) ("w/o CR", N x n)
    h    = W x + s · B · (sum_i g_i M_i) · z

The per-token merged core is never materialised as an [tokens, N, r, r] stack. Two exact forms:

* ``output`` mixing: y = sum_i g_i (M_i z) computed as one GEMM of the outer product
  (g ⊗ z) [tokens, N·r] with the stacked cores [N·r, r]; memory tokens·N·r.
* ``merged`` cores: M(x) = g @ M.view(N, r·r) -> [tokens, r, r], then y = M(x) z;
  memory tokens·r². Needed for the optional element-wise core dropout.

``auto`` picks the cheaper one (output mixing when N <= r). Orientation follows the paper
(M · z); the official code computes zᵀ M, i.e. its cores are the transposes of ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from comol.adapters.base import (TOKEN_ROUTED, AdapterLinear, LowRankConfig, NoWeightDelta, kaiming_uniform_,
                                 register_adapter)
from comol.adapters.gating import router_probs
from comol.errors import config_check

MIXING_FORMS = ("auto", "output", "merged")


@register_adapter("comol")
@dataclass(kw_only=True)
class CoMoLConfig(LowRankConfig):
    """CoMoL: one shared LoRA A/B per module, N r x r cores mixed per token by a router."""

    token_routed = True

    r: int = field(default=16, metadata={"help": "rank r of the shared A/B and of the r x r cores"})
    num_experts: int = field(default=8, metadata={"help": "number N of r x r core experts"})
    core_router: bool = field(
        default=True, metadata={"help": "route on z = A·Drop(x) (True, CoMoL) or on x (False, 'CoMoL w/o CR')"}
    )
    core_dropout: float = field(
        default=0.0, metadata={"help": "extra element-wise dropout on each token's merged r x r core (official code)"}
    )
    mixing: str = field(default="auto", metadata={"help": "auto | output | merged (see module docstring)"})

    def validate(self) -> None:
        config_check(isinstance(self.num_experts, int) and self.num_experts >= 1,
                     "adapter.num_experts", self.num_experts, "an integer >= 1")
        config_check(0.0 <= self.core_dropout < 1.0, "adapter.core_dropout", self.core_dropout, "a probability in [0, 1)")
        config_check(self.mixing in MIXING_FORMS, "adapter.mixing", self.mixing, " | ".join(MIXING_FORMS))
        config_check(not (self.core_dropout > 0 and self.mixing == "output"), "adapter.mixing", self.mixing,
                     "'merged' or 'auto' when adapter.core_dropout > 0 (core dropout needs merged cores)")

    def make_layer(self, base: nn.Linear, module_name: str) -> nn.Module:
        return CoMoLLinear(base, self)


def init_cores_(cores: torch.Tensor) -> torch.Tensor:
    """U(-1/sqrt(r), 1/sqrt(r)) for every r x r core (PyTorch's default Linear init on r x r)."""
    for core in cores:
        kaiming_uniform_(core)
    return cores


class CoMoLLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, cfg: CoMoLConfig, shared: nn.Module | None = None):
        super().__init__(base_layer)
        kw = self.factory_kwargs()
        r, n_exp = cfg.r, cfg.num_experts
        self.r, self.num_experts, self.scaling = r, n_exp, cfg.scaling
        self.core_router = cfg.core_router
        self.core_dropout = cfg.core_dropout
        self.form = cfg.mixing if cfg.mixing != "auto" else ("merged" if cfg.core_dropout > 0 or n_exp > r else "output")
        if shared is None:  # own A/B (per-layer CoMoL); comol_sh passes a shared holder instead
            self.adapter_A = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, **kw)))
            self.adapter_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        else:
            object.__setattr__(self, "_shared", shared)  # not a submodule: saved once, at its owner
        self.adapter_cores = nn.Parameter(init_cores_(torch.empty(n_exp, r, r, **kw)))
        self.adapter_router = nn.Linear(r if cfg.core_router else self.in_features, n_exp, bias=False, **kw)
        self.adapter_dropout = nn.Dropout(cfg.dropout)

    @property
    def lora_A(self) -> torch.Tensor:
        return self.adapter_A if "adapter_A" in self._parameters else self._shared.adapter_A

    @property
    def lora_B(self) -> torch.Tensor:
        return self.adapter_B if "adapter_B" in self._parameters else self._shared.adapter_B

    def gates(self, router_input: torch.Tensor) -> torch.Tensor:
        """Dense softmax routing weights [..., N], computed in fp32 (autocast off)."""
        return router_probs(router_input, self.adapter_router.weight)

    def mix(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """sum_i g_i M_i z for token rows z [T, r] and gates g [T, N] -> [T, r]."""
        # Outside autocast z and the cores are fp32; under autocast the matmuls are recast.
        cores, g = self.adapter_cores, g.to(z.dtype)
        t, r, n_exp = z.shape[0], self.r, self.num_experts
        if self.form == "output":
            # (g ⊗ z)[t, (i, b)] = g_ti z_tb ;  stacked[(i, b), a] = M_i[a, b]
            outer = (g.unsqueeze(-1) * z.unsqueeze(1)).reshape(t, n_exp * r)
            return outer @ cores.transpose(1, 2).reshape(n_exp * r, r)
        merged = (g @ cores.reshape(n_exp, r * r)).view(t, r, r)
        if self.core_dropout > 0 and self.training:
            merged = F.dropout(merged, self.core_dropout, training=True)
        return torch.bmm(merged, z.unsqueeze(-1).to(merged.dtype)).squeeze(-1)

    def delta_weight(self) -> torch.Tensor:
        raise NoWeightDelta(TOKEN_ROUTED)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        z = F.linear(self.adapter_dropout(x), self.lora_A)
        g = self.gates(z if self.core_router else x)
        if self.context.routing.enabled:
            self.report_routing(g.reshape(-1, self.num_experts), self.context.token_mask(x))
        y = self.mix(z.reshape(-1, self.r), g.reshape(-1, self.num_experts)).reshape(*lead, self.r)
        return F.linear(y, self.lora_B) * self.scaling
