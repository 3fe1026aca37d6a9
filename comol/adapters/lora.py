"""LoRA: h = W x + s · B A Drop(x)   (A: r x n kaiming-uniform, B: m x r zeros, s = alpha / r).

LoRA's update is a fixed weight delta, so it can be merged into W (``merge``/``unmerge`` here,
model-level ``comol.adapters.merge.merge_adapter`` / ``unmerge_adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from comol.adapters.base import AdapterLinear, LowRankConfig, kaiming_uniform_, register_adapter
from comol.errors import ComolError


@register_adapter("lora")
@dataclass
class LoraConfig(LowRankConfig):
    """Plain LoRA (Hu et al.); the paper's parameter-parity baseline at r=16."""

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
        #: while merged, W holds W + s·B·A and the forward pass skips the adapter path
        self.merged = False
        self._merge_backup: torch.Tensor | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.adapter_dropout(x), self.adapter_A), self.adapter_B) * self.scaling

    # -- merging -------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s·B·A, computed in fp32 and cast back to W's dtype (W itself is not modified)."""
        w = self.base_layer.weight
        delta = (self.adapter_B.float() @ self.adapter_A.float()).to(w.device) * self.scaling
        return (w.float() + delta).to(w.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Write W + s·B·A into the base weight in place (no-op if already merged).

        A copy of the original W is kept on the CPU so that ``unmerge`` restores it bit for bit.
        ``safe``: refuse (ComolError, W untouched) when the merged weight has NaN/Inf.
        """
        if self.merged:
            return
        new = self.merged_weight()
        if safe and not torch.isfinite(new).all():
            raise ComolError("the merged weight W + s·B·A contains NaN/Inf")
        w = self.base_layer.weight
        self._merge_backup = w.detach().to("cpu", copy=True)
        w.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight exactly (no-op if not merged)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_(self._merge_backup.to(w.device))
        self._merge_backup = None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return super().forward(x)
