"""Parallel adapter alone (baseline of the MoA code): PA(u) = U · SiLU(D u + b_D) + b_U added to the
MLP output of every decoder layer, u = the MLP input (post-attention normed hidden state).

D (a x d), U (d x a) xavier-uniform with gain 1e-4, biases 0: a *near* no-op at init (output
~1e-8 relative), not an exact one. See ``comol.adapters.moa_blocks.ParallelAdapter``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from comol.adapters.base import AdapterConfig, register_adapter
from comol.adapters.moa_config import BlockPlan, inject_block_plan
from comol.errors import config_check


@register_adapter("parallel_adapter")
@dataclass(kw_only=True)
class ParallelAdapterConfig(AdapterConfig):
    """A SiLU bottleneck adapter in parallel with every decoder layer's MLP."""


    target_modules: list[str] = field(
        default_factory=lambda: ["mlp"], metadata={"help": "where it attaches: the MLP of every decoder layer (fixed: [mlp])"},
    )
    adapter_size: int = field(default=16, metadata={"help": "bottleneck size a"})

    def validate(self) -> None:
        config_check(self.target_modules == ["mlp"], "adapter.target_modules", self.target_modules,
                     "[mlp] (the parallel adapter attaches to every decoder layer's MLP)")
        config_check(isinstance(self.adapter_size, int) and not isinstance(self.adapter_size, bool)
                     and self.adapter_size > 0, "adapter.adapter_size", self.adapter_size, "an integer > 0")

    def inject(self, model: nn.Module) -> list[str]:
        return inject_block_plan(model, BlockPlan(adapter=self.name, adapter_size=self.adapter_size))
