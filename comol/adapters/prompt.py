"""Prompt tuning alone (baseline of the MoA code): the MoA prompt expert in every decoder layer, ungated.

P learnable prompt vectors per layer; their keys/values go through the frozen k/v projections
(plus k_norm on Qwen3, no rotary); the layer's queries attend to them with a separate softmax,
scaled by a zero-initialised per-head gate, and the result is added to the o_proj input
(LLaMA-Adapter style). Exact no-op at init. See ``comol.adapters.moa_blocks.PromptExpert``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from comol.adapters.base import AdapterConfig, register_adapter
from comol.adapters.moa_config import BlockPlan, inject_block_plan
from comol.errors import config_check


@register_adapter("prompt")
@dataclass(kw_only=True)
class PromptTuningConfig(AdapterConfig):
    """Per-layer prompt vectors attended through the frozen attention (gated per head)."""


    target_modules: list[str] = field(
        default_factory=lambda: ["self_attn"], metadata={"help": "where it attaches: the attention module of every decoder layer (fixed: [self_attn])"},
    )
    prompt_length: int = field(default=10, metadata={"help": "number P of prompt vectors per layer"})

    def validate(self) -> None:
        config_check(self.target_modules == ["self_attn"], "adapter.target_modules", self.target_modules,
                     "[self_attn] (prompt tuning attaches to every decoder layer's attention)")
        config_check(isinstance(self.prompt_length, int) and not isinstance(self.prompt_length, bool)
                     and self.prompt_length > 0, "adapter.prompt_length", self.prompt_length, "an integer > 0")

    def inject(self, model: nn.Module) -> list[str]:
        return inject_block_plan(model, BlockPlan(adapter=self.name, prompt_length=self.prompt_length))
