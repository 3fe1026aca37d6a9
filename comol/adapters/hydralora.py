"""HydraLoRA: one shared A, N expert heads B_i mixed by a dense softmax router (docs/methods.md §2).

    z = A · Drop(x)                                 (A: r x n, shared by the heads)
    g = softmax(W_g x)                              (router W_g: N x n, no bias, fp32)
    h = W x + s · sum_i g_i B_i z                   (B_i: m x r, zero-initialised)

Computed as one GEMM: (g ⊗ z) [T, N·r] @ [B_1 | ... | B_N]^T.
Params per module: r n + N r m + N n (Qwen3-8B, r=8, N=8, qkvo+down: 49.55M).
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


@register_adapter("hydralora")
@dataclass(kw_only=True)
class HydraLoraConfig(LowRankConfig):
    """Asymmetric mixture: a shared down-projection A and N up-projection heads B_i."""

    token_routed = True

    num_experts: int = field(default=8, metadata={"help": "number N of B heads"})

    def validate(self) -> None:
        config_check(isinstance(self.num_experts, int) and self.num_experts >= 1,
                     "adapter.num_experts", self.num_experts, "an integer >= 1")

    def make_layer(self, base: nn.Linear, module_name: str) -> nn.Module:
        return HydraLoraLinear(base, self)


class HydraLoraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, cfg: HydraLoraConfig):
        super().__init__(base_layer)
        kw = self.factory_kwargs()
        self.r, self.num_experts, self.scaling = cfg.r, cfg.num_experts, cfg.scaling
        self.adapter_A = nn.Parameter(kaiming_uniform_(torch.empty(cfg.r, self.in_features, **kw)))
        self.adapter_B = nn.Parameter(torch.zeros(cfg.num_experts, self.out_features, cfg.r, **kw))
        self.adapter_router = nn.Linear(self.in_features, cfg.num_experts, bias=False, **kw)
        self.adapter_dropout = nn.Dropout(cfg.dropout)

    def delta_weight(self) -> torch.Tensor:
        raise NoWeightDelta(TOKEN_ROUTED)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        t, n_exp, r = rows.shape[0], self.num_experts, self.r
        z = F.linear(self.adapter_dropout(rows), self.adapter_A)  # [T, r]
        g = router_probs(rows, self.adapter_router.weight)  # [T, N] fp32
        if self.context.routing.enabled:
            self.report_routing(g, self.context.token_mask(x))
        g = g.to(z.dtype)
        outer = (g.unsqueeze(-1) * z.unsqueeze(1)).reshape(t, n_exp * r)
        b_cat = self.adapter_B.permute(1, 0, 2).reshape(self.out_features, n_exp * r)
        return (F.linear(outer, b_cat) * self.scaling).reshape(*lead, self.out_features)
