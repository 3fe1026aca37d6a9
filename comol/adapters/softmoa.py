"""Soft MoA (MoA paper, docs/methods.md §3): every expert of a decoder block, weighted by a per-block router.

Experts per block: gated LoRA on q, k, v, o, down (r=8, alpha=8), a prompt expert (P=10) and a
parallel adapter (a=16). Router (one per block, reading the block input after input_layernorm):
w = sigmoid(router(x)), one independent weight per adapter *type* (K = 7), every expert output is
scaled by its weight. ``router_level``:

* ``token`` (default): one weight vector per token.
* ``instance`` (``conf/adapter/softmoa_instance.yaml``): computed from the mean of the block input
  over non-padding tokens (``instance_pooling``: ``causal`` prefix mean by default, or ``full``).

Parameter count on Qwen3-8B: the paper's 24.34M is the prompt-less configuration
(``adapter.prompt_expert=false``, K = 6, SwiGLU router with biases) — the MoA code ships the
prompt expert switched off; with the prompt expert (K = 7) it is 27.00M. See conf/adapter/softmoa.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass

from comol.adapters.base import register_adapter
from comol.adapters.moa_config import MoAConfig


@register_adapter("softmoa")
@dataclass(kw_only=True)
class SoftMoAConfig(MoAConfig):
    """Soft MoA: dense sigmoid weights per adapter type."""
