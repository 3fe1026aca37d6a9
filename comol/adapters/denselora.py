"""DenseLoRA: cross-layer shared encoder/decoder with a dense per-module r x r matrix (docs/methods.md §2).

    h = W x + s · GELU(B_t · C · GELU(A_t · Drop(x)))

A_t [r, n_t], B_t [m_t, r]: one pair per projection type t, shared by every layer (sharing.py);
C [r, r]: one per adapted module. GELU is the exact (erf) GELU.

Init: A_t and C use PyTorch's default Linear init (kaiming-uniform), B_t starts at zero. Then
B_t C GELU(...) = 0 and GELU(0) = 0, so the adapter is an exact no-op at init; at the first
step only B_t gets a gradient (C and A_t follow once B_t != 0). C must NOT also be zero, or no
tensor would ever get a gradient.

The update is a nonlinear function of x, so it cannot be merged into W.
Params: sum over types t of r (n_t + m_t), plus r^2 per adapted module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from comol.adapters.base import AdapterLinear, LowRankConfig, kaiming_uniform_, register_adapter
from comol.adapters.sharing import SharedLowRank, inject_layer_shared


@register_adapter("denselora")
@dataclass(kw_only=True)
class DenseLoraConfig(LowRankConfig):
    """Shared (per projection type) A_t/B_t with a per-module dense r x r matrix between two GELUs."""

    r: int = field(default=256, metadata={"help": "rank r of the shared A_t/B_t and of the dense r x r matrix"})

    def inject(self, model: nn.Module) -> list[str]:
        return inject_layer_shared(model, self.target_modules, self.r,
                                   lambda base, name, shared: DenseLoraLinear(base, self, shared))


class DenseLoraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, cfg: DenseLoraConfig, shared: SharedLowRank):
        super().__init__(base_layer)
        self.r, self.scaling = cfg.r, cfg.scaling
        object.__setattr__(self, "_shared", shared)  # not a submodule: registered once, on the model
        self.adapter_C = nn.Parameter(kaiming_uniform_(torch.empty(cfg.r, cfg.r, **self.factory_kwargs())))
        self.adapter_dropout = nn.Dropout(cfg.dropout)

    @property
    def lora_A(self) -> torch.Tensor:
        return self._shared.adapter_A

    @property
    def lora_B(self) -> torch.Tensor:
        return self._shared.adapter_B

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        u = F.gelu(F.linear(self.adapter_dropout(x), self.lora_A))
        return F.gelu(F.linear(F.linear(u, self.adapter_C), self.lora_B)) * self.scaling
