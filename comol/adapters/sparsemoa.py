"""Sparse MoA (MoA paper, docs/methods.md §3): Soft MoA without the prompt expert (K = 6) plus a per-token
threshold.

    w      = sigmoid(router(x))                       [K]   router: SwiGLU, hidden 4K, biases
    tau(x) = max_threshold · sigmoid(w_t · x + b_t)   (max_threshold = 0.5)
    expert i acts on the token only if w_i >= tau(x), with its raw weight w_i

``threshold_mode``: ``hard`` (default, the MoA code: the comparison is not differentiable, so the
threshold Linear gets NO gradient and stays at its initial values — under DDP that needs
``find_unused_parameters``), ``ste`` (same forward, straight-through gradient for tau through
1[w_i >= tau] ~ (w_i - tau)), ``margin`` (weight (w_i - tau) for selected experts; tau learns).

Unselected experts are computed densely and multiplied by 0 (same outputs and gradients as skipping
them; the LoRA/PA experts are cheap next to the frozen projections).

Parameter count on Qwen3-8B: 24,485,436 = 24.49M (docs/methods.md §4), see conf/adapter/sparsemoa.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from comol.adapters.base import register_adapter
from comol.adapters.moa_blocks import THRESHOLD_MODES
from comol.adapters.moa_config import MoAConfig
from comol.errors import config_check


@register_adapter("sparsemoa")
@dataclass(kw_only=True)
class SparseMoAConfig(MoAConfig):
    """Sparse MoA: sigmoid weights per adapter type, experts below a learned per-token threshold dropped."""

    prompt_expert: bool = field(
        default=False, metadata={"help": "add the prompt expert (sparse routing does not apply to it: MoA code)"})
    max_threshold: float = field(default=0.5, metadata={"help": "tau(x) = max_threshold * sigmoid(w.x + b), in (0, 1]"})
    threshold_mode: str = field(default="hard", metadata={"help": "hard (MoA code, tau untrained) | ste | margin"})

    def validate(self) -> None:
        super().validate()
        config_check(isinstance(self.max_threshold, (int, float)) and 0.0 < self.max_threshold <= 1.0,
                     "adapter.max_threshold", self.max_threshold, "a number in (0, 1]")
        config_check(self.threshold_mode in THRESHOLD_MODES, "adapter.threshold_mode", self.threshold_mode,
                     " | ".join(THRESHOLD_MODES))

    def router_kwargs(self) -> dict[str, Any]:
        return {**super().router_kwargs(), "max_threshold": float(self.max_threshold),
                "threshold_mode": self.threshold_mode}
