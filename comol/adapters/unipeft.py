"""UniPEFT (baseline shipped with the MoA code, after UniPELT): LoRA, prompt and parallel-adapter
experts in every decoder block, each *family* scaled by an instance-level sigmoid gate.

    g = sigmoid(W_g · mean(x) + b_g)      one gate per family: lora (all LoRA targets share it), prompt, PA

mean(x) is the mean of the block input (after input_layernorm) over non-padding tokens; with
``instance_pooling=causal`` (default) position t uses the mean over tokens <= t (no look-ahead in
teacher-forced training; the same with and without the KV cache), with ``full`` the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from comol.adapters.base import register_adapter
from comol.adapters.moa_config import MoAConfig


@register_adapter("unipeft")
@dataclass(kw_only=True)
class UniPEFTConfig(MoAConfig):
    """Instance-level gates per adapter family (LoRA / prompt / parallel adapter)."""

    gate_by = "family"

    router: str = field(default="linear", metadata={"help": "linear: one Linear d -> 3, a gate per family"})
    router_level: str = field(default="instance", metadata={"help": "instance: gates from the mean of the input"})
