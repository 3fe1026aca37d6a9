"""AdaMoLE: LoRA experts with a per-token adaptive selection threshold (docs/methods.md §2).

    p      = softmax(W_g x)                          (router W_g: N x n, no bias, fp32)
    tau(x) = tau_max · sigmoid(w · x + b)            (threshold net: Linear(n -> 1) with bias)
    a_i    = p_i - tau(x);   S = {i : a_i >= 0}
    w_i    = a_i / sum_{j in S} a_j  for i in S, else 0
    h      = W x + s · sum_{i in S} w_i B_i A_i Drop(x)

If the selected a_i sum to 0 (possible only when a_i == 0 exactly, or when tau_max > 1/N lets
every a_i go negative) the token's update is 0 — never NaN. With tau_max <= 1/N the largest
p_i >= 1/N >= tau, so at least one expert is always selected.

Auxiliary loss (training forward passes only): ``N · sum_i f_i P_i`` with f_i = fraction of
(non-padding) tokens selecting i and P_i = mean of the adapted score a_i (as the official code).

Params per module: N r (n + m) + N n + n + 1 (Qwen3-8B, r=8, N=8, qkvo+down: 108.38M).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from comol.adapters.base import register_adapter
from comol.adapters.molora import MoELoraLinear, MoLoRAConfig
from comol.adapters.gating import fp32_linear, load_balancing_loss, renormalise, router_probs
from comol.errors import config_check


@register_adapter("adamole")
@dataclass(kw_only=True)
class AdaMoleConfig(MoLoRAConfig):
    """Mixture of LoRA experts with an input-dependent threshold tau(x) = tau_max·sigmoid(w·x + b)."""

    aux_loss_coeff: float = field(
        default=1e-3, metadata={"help": "weight of the summed load-balancing loss in the model's loss"})
    tau_max: float | None = field(default=None, metadata={"help": "maximum threshold, in (0, 1]; null = 1/N"})

    def validate(self) -> None:
        super().validate()
        if self.tau_max is None:
            self.tau_max = 1.0 / self.num_experts
        config_check(isinstance(self.tau_max, (int, float)) and 0.0 < self.tau_max <= 1.0,
                     "adapter.tau_max", self.tau_max, "a number in (0, 1] (or null for 1/num_experts)")
        self.tau_max = float(self.tau_max)

    def make_layer(self, base: nn.Linear, module_name: str) -> nn.Module:
        return AdaMoleLinear(base, self)


class AdaMoleLinear(MoELoraLinear):
    def __init__(self, base_layer: nn.Linear, cfg: AdaMoleConfig):
        super().__init__(base_layer, cfg)
        self.tau_max = float(cfg.tau_max)
        self.adapter_threshold = nn.Linear(self.in_features, 1, bias=True, **self.factory_kwargs())

    def thresholds(self, x: torch.Tensor) -> torch.Tensor:
        """tau(x) [T, 1] in fp32."""
        with torch.autocast(x.device.type, enabled=False):
            logit = fp32_linear(x, self.adapter_threshold.weight, self.adapter_threshold.bias)
            return self.tau_max * torch.sigmoid(logit)

    def route(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        adapted = router_probs(x, self.adapter_router.weight) - self.thresholds(x)
        selected = adapted >= 0
        self.add_aux_loss(lambda: load_balancing_loss(adapted, selected, mask))
        weights = renormalise(adapted, selected)
        self.report_routing(weights, mask, selected=selected)
        return weights
