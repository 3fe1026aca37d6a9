"""MoLoRA: a dense softmax mixture of N LoRA experts per adapted Linear (docs/methods.md §2).

    g = softmax(W_g x)                              (router W_g: N x n, no bias, fp32)
    h = W x + s · sum_i g_i B_i A_i Drop(x)

Experts are stacked tensors ``adapter_A`` [N, r, n] and ``adapter_B`` [N, m, r], so the whole
mixture is two GEMMs over token rows:

    z = Drop(x) @ [A_1; ...; A_N]^T           [T, N·r]   (all experts' r-vectors at once)
    y = (g ⊗ z) @ [B_1 | ... | B_N]^T          [T, m]     (weights folded in before B)

Params per module: N r (n + m) + N n (Qwen3-8B, r=8, N=8, qkvo+down: 107.35M).

``MoELoraLinear`` is the shared layer: subclasses only change ``route`` (which experts a token
uses and with which weights) — see mola.py (top-k / threshold) and adamole.py (adaptive threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from comol.adapters.base import AdapterLinear, LowRankConfig, kaiming_uniform_, register_adapter
from comol.adapters.gating import router_probs
from comol.errors import config_check
from comol.adapters.base import TOKEN_ROUTED, NoWeightDelta


@register_adapter("molora")
@dataclass(kw_only=True)
class MoLoRAConfig(LowRankConfig):
    """Dense softmax mixture of N LoRA experts (r per expert)."""

    token_routed = True

    num_experts: int = field(default=8, metadata={"help": "number N of LoRA experts"})

    def validate(self) -> None:
        config_check(isinstance(self.num_experts, int) and self.num_experts >= 1,
                     "adapter.num_experts", self.num_experts, "an integer >= 1")

    def make_layer(self, base: nn.Linear, module_name: str) -> nn.Module:
        return MoELoraLinear(base, self)


class MoELoraLinear(AdapterLinear):
    """N stacked LoRA experts + a bias-free router on x; ``route`` decides the per-token weights."""

    def __init__(self, base_layer: nn.Linear, cfg: MoLoRAConfig):
        super().__init__(base_layer)
        kw = self.factory_kwargs()
        self.r, self.num_experts, self.scaling = cfg.r, cfg.num_experts, cfg.scaling
        n_exp, r = cfg.num_experts, cfg.r
        a = torch.empty(n_exp, r, self.in_features, **kw)
        for expert in a:  # per-expert default Linear init (fan_in = n), not fan_in of the stack
            kaiming_uniform_(expert)
        self.adapter_A = nn.Parameter(a)
        self.adapter_B = nn.Parameter(torch.zeros(n_exp, self.out_features, r, **kw))
        self.adapter_router = nn.Linear(self.in_features, n_exp, bias=False, **kw)
        self.adapter_dropout = nn.Dropout(cfg.dropout)

    def route(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-token expert weights [T, N] (fp32) for token rows x [T, n].

        ``mask`` [T] (bool or None) marks non-padding tokens, for the aux loss and the statistics.
        MoLoRA: the dense softmax.
        """
        probs = router_probs(x, self.adapter_router.weight)
        self.report_routing(probs, mask)
        return probs

    def mix_experts(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_i w_i B_i A_i Drop(x) for token rows x [T, n] and weights [T, N] -> [T, m]."""
        t, n_exp, r = x.shape[0], self.num_experts, self.r
        z = F.linear(self.adapter_dropout(x), self.adapter_A.reshape(n_exp * r, self.in_features))
        z = (z.view(t, n_exp, r) * weights.to(z.dtype).unsqueeze(-1)).reshape(t, n_exp * r)
        b_cat = self.adapter_B.permute(1, 0, 2).reshape(self.out_features, n_exp * r)
        return F.linear(z, b_cat)

    def delta_weight(self) -> torch.Tensor:
        raise NoWeightDelta(TOKEN_ROUTED)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        weights = self.route(rows, self.context.token_mask(x))
        return (self.mix_experts(rows, weights) * self.scaling).reshape(*lead, self.out_features)
