"""Sparse mixtures of LoRA experts: top-k routing (``mola``) and threshold routing (``mole``).

Both reuse MoLoRA's stacked experts (molora.py) and only change the routing (docs/methods.md §2):

``mola`` (MoLA / top-k MoE-LoRA)
    p = softmax(W_g x);  S = top-k(p);  w_i = p_i / sum_{j in S} p_j for i in S, else 0
    h = W x + s · sum_{i in S} w_i B_i A_i Drop(x)

``mole`` (threshold routing; not in the paper's tables, offered as a variant)
    p = softmax(W_g x);  S = {i : p_i >= threshold} ∪ {argmax_i p_i};  w as above
    ``threshold`` in (0, 1]; default 1/N ("above-average" experts). The argmax is always kept,
    so a token whose probabilities all fall below the threshold uses its single best expert
    (with the default 1/N this never triggers: the largest of N probabilities is >= 1/N).

Unselected experts get weight exactly 0, so they contribute nothing and receive no gradient:
the result equals running the selected experts only. The experts are evaluated densely with the
masked weights (same cost as MoLoRA; with r=8 the expert GEMMs are small next to W x).

Auxiliary loss (training forward passes only): Switch-style ``N · sum_i f_i P_i``
(routing.load_balancing_loss) with f from S and P from p, padding tokens excluded; the trainer
weights the sum over modules by ``aux_loss_coeff`` (paper: 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from comol.adapters.base import register_adapter
from comol.adapters.molora import MoELoraLinear, MoLoRAConfig
from comol.adapters.gating import load_balancing_loss, renormalise, router_probs, topk_mask
from comol.errors import config_check


@register_adapter("mola")
@dataclass(kw_only=True)
class MolaConfig(MoLoRAConfig):
    """Top-k routed mixture of LoRA experts with renormalised weights and a load-balancing loss."""

    aux_loss_coeff: float = field(
        default=1e-3, metadata={"help": "weight of the summed load-balancing loss in the model's loss"})
    top_k: int = field(default=2, metadata={"help": "experts used per token (1 <= top_k <= num_experts)"})

    def validate(self) -> None:
        super().validate()
        config_check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts, "adapter.top_k",
                     self.top_k, f"an integer in [1, num_experts={self.num_experts}]")

    def make_layer(self, base: nn.Linear, module_name: str) -> nn.Module:
        return MolaLinear(base, self)


@register_adapter("mole")
@dataclass(kw_only=True)
class MoleConfig(MoLoRAConfig):
    """Threshold-routed mixture: experts with p_i >= threshold (and always the argmax), renormalised."""

    aux_loss_coeff: float = field(
        default=1e-3, metadata={"help": "weight of the summed load-balancing loss in the model's loss"})
    threshold: float | None = field(
        default=None, metadata={"help": "keep experts with probability >= threshold, in (0, 1]; null = 1/N"})

    def validate(self) -> None:
        super().validate()
        if self.threshold is None:
            self.threshold = 1.0 / self.num_experts
        config_check(isinstance(self.threshold, (int, float)) and 0.0 < self.threshold <= 1.0,
                     "adapter.threshold", self.threshold, "a number in (0, 1] (or null for 1/num_experts)")
        self.threshold = float(self.threshold)

    def make_layer(self, base: nn.Linear, module_name: str) -> nn.Module:
        return MoleLinear(base, self)


class _SelectiveMoELoraLinear(MoELoraLinear):
    """MoLoRA experts with a hard expert selection; subclasses define ``select``."""

    def select(self, probs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def route(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        probs = router_probs(x, self.adapter_router.weight)
        selected = self.select(probs)
        self.add_aux_loss(lambda: load_balancing_loss(probs, selected, mask))
        weights = renormalise(probs, selected)
        self.report_routing(weights, mask, probs=probs, selected=selected)
        return weights


class MolaLinear(_SelectiveMoELoraLinear):
    def __init__(self, base_layer: nn.Linear, cfg: MolaConfig):
        super().__init__(base_layer, cfg)
        self.top_k = cfg.top_k

    def select(self, probs: torch.Tensor) -> torch.Tensor:
        return topk_mask(probs, self.top_k)


class MoleLinear(_SelectiveMoELoraLinear):
    def __init__(self, base_layer: nn.Linear, cfg: MoleConfig):
        super().__init__(base_layer, cfg)
        self.threshold = float(cfg.threshold)

    def select(self, probs: torch.Tensor) -> torch.Tensor:
        return (probs >= self.threshold) | topk_mask(probs, 1)
