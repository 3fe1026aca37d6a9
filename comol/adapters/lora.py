"""LoRA: h = W x + s · B A Drop(x)   (A: r x n kaiming-uniform, B: m x r zeros, s = alpha / r).

LoRA's update is a fixed weight delta (``delta_weight``), so it can be merged into W
(``comol.adapters.merge``) and exported (``comol.export``: PEFT or a merged Transformers model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from comol.adapters.base import AdapterLinear, LowRankConfig, kaiming_uniform_, register_adapter


@register_adapter("lora")
@dataclass
class LoraConfig(LowRankConfig):
    """Plain LoRA (Hu et al.); the paper's parameter-parity baseline at r=16."""

    r: int = field(default=16, metadata={"help": "rank of the low-rank update"})

    def make_layer(self, base: nn.Linear, module_name: str) -> nn.Module:
        return LoraLinear(base, self)


class LoraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, cfg: LowRankConfig):
        super().__init__(base_layer)
        kw = self.factory_kwargs()
        self.scaling = cfg.scaling
        self.adapter_A = nn.Parameter(kaiming_uniform_(torch.empty(cfg.r, self.in_features, **kw)))
        self.adapter_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, **kw))
        self.adapter_dropout = nn.Dropout(cfg.dropout)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.adapter_dropout(x), self.adapter_A), self.adapter_B) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s·B·A [out, in] in fp32: dropout is the identity in eval, so delta(x) = x (s·B·A)^T."""
        return (self.adapter_B.float() @ self.adapter_A.float()) * self.scaling
