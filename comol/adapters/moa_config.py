"""Config base and injection shared by the block-level adapters (docs/methods.md §3).

``inject_block_plan`` adds, to every decoder layer of a Llama/Qwen3-style model, the experts a
``BlockPlan`` asks for (gated LoRA on the targeted Linears, a prompt expert, a parallel adapter)
and, when the plan has a router, the per-block ``BlockRouter`` that weights them
(see ``comol.adapters.moa_blocks``).

Router slots: ``gate_by="type"`` (Soft/Sparse MoA) gives every LoRA target its own slot, then
``prompt``, then ``parallel_adapter`` (K = 5 + 1 + 1 = 7 for Soft MoA on qkvo+down);
``gate_by="family"`` (UniPEFT) gives all LoRA targets one shared slot (K <= 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from comol.adapters.base import LowRankConfig
from comol.adapters.moa_blocks import (
    INSTANCE_POOLINGS,
    ROUTER_INPUTS,
    ROUTER_KINDS,
    ROUTER_LEVELS,
    BlockRouter,
    GatedLoraLinear,
    ParallelAdapter,
    PromptExpert,
    attach,
    check_block_support,
    decoder_layers,
)
from comol.errors import ConfigError, config_check


@dataclass
class BlockPlan:
    """What to add to every decoder block."""

    adapter: str
    lora_targets: list[str] = field(default_factory=list)
    r: int = 8
    scaling: float = 1.0
    dropout: float = 0.0
    prompt_length: int = 0  # 0: no prompt expert
    adapter_size: int = 0  # 0: no parallel adapter
    gate_by: str = "type"  # type | family
    router: dict[str, Any] | None = None  # BlockRouter keyword arguments; None: experts ungated

    def required(self) -> list[str]:
        req: list[str] = []
        if self.router is not None:
            req += ["input_layernorm.weight", "self_attn", "mlp"]
        if self.prompt_length:
            req += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "self_attn.head_dim", "self_attn.scaling"]
        if self.adapter_size:
            req += ["mlp", "post_attention_layernorm.weight"]
        return list(dict.fromkeys(req))


def _linears_named(layer: nn.Module, target: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] == target]


def inject_block_plan(model: nn.Module, plan: BlockPlan) -> list[str]:
    """Add the plan's experts (and router) to every decoder layer; return the names of what was added."""
    layers = decoder_layers(model, plan.adapter)
    for layer in layers:
        check_block_support(model, layer, plan.required(), plan.adapter, needs_rope=plan.prompt_length > 0)
        missing = [t for t in plan.lora_targets if not _linears_named(layer, t)]
        if missing:
            raise ConfigError(
                f"adapter.target_modules={plan.lora_targets} is invalid for model class {type(model).__name__}: its "
                f"decoder layer {type(layer).__name__} has no nn.Linear named {', '.join(missing)}"
            )
    prefix = {id(m): n for n, m in model.named_modules()}
    added: list[str] = []
    for layer in layers:
        lname = prefix[id(layer)]
        slots: dict[str, int] = {}

        def slot(key: str) -> int:
            return slots.setdefault(key, len(slots))

        experts: list[tuple[nn.Module, int]] = []
        for target in plan.lora_targets:
            for name, linear in _linears_named(layer, target):
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                wrapped = GatedLoraLinear(linear, plan.r, plan.scaling, plan.dropout)
                setattr(parent, name.rsplit(".", 1)[-1], wrapped)
                experts.append((wrapped, slot(target if plan.gate_by == "type" else "lora")))
                added.append(f"{lname}.{name}")
        if plan.prompt_length:
            expert = attach(layer.self_attn, "adapter_prompt", PromptExpert(layer.self_attn, plan.prompt_length))
            experts.append((expert, slot("prompt")))
            added.append(f"{lname}.self_attn.adapter_prompt")
        if plan.adapter_size:
            hidden = layer.post_attention_layernorm.weight.shape[-1]
            expert = attach(layer.mlp, "adapter_pa", ParallelAdapter(layer.mlp, hidden, plan.adapter_size))
            experts.append((expert, slot("parallel_adapter")))
            added.append(f"{lname}.mlp.adapter_pa")
        if plan.router is not None:
            attach(layer, "adapter_moa", BlockRouter(layer, experts, len(slots), **plan.router))
            added.append(f"{lname}.adapter_moa")
    return added


@dataclass(kw_only=True)
class MoAConfig(LowRankConfig):
    """Heterogeneous mixture of adapters per decoder block: gated LoRA experts (``target_modules``),
    an optional prompt expert and parallel adapter, and a per-block sigmoid router."""

    token_routed = True
    #: router slots: one per LoRA target ("type") or one for all LoRA targets ("family")
    gate_by: ClassVar[str] = "type"

    adapter_size: int = field(default=16, metadata={"help": "bottleneck size a of the parallel adapter"})
    parallel_adapter: bool = field(default=True, metadata={"help": "add the parallel adapter expert (MLP side)"})
    prompt_expert: bool = field(default=True, metadata={"help": "add the prompt expert (attention side)"})
    prompt_length: int = field(default=10, metadata={"help": "number P of prompt vectors per layer"})
    router: str = field(default="swiglu", metadata={"help": "linear (d -> K) | swiglu (hidden K * router_hidden_mult)"})
    router_hidden_mult: int = field(default=4, metadata={"help": "SwiGLU router hidden size = K * this"})
    router_bias: bool = field(default=True, metadata={"help": "biases in the router Linears (MoA code: yes)"})
    router_input: str = field(default="normed",
        metadata={"help": "normed: the block input after input_layernorm (MoA code) | raw: before"})
    router_level: str = field(default="token", metadata={"help": "token | instance (mean over non-padding tokens)"})
    instance_pooling: str = field(default="causal",
        metadata={"help": "instance level: causal (prefix mean, no look-ahead) | full (whole-sequence mean)"})

    def validate(self) -> None:
        ok_int = lambda v, lo: isinstance(v, int) and not isinstance(v, bool) and v >= lo  # noqa: E731
        config_check(ok_int(self.adapter_size, 1), "adapter.adapter_size", self.adapter_size, "an integer > 0")
        config_check(ok_int(self.prompt_length, 1), "adapter.prompt_length", self.prompt_length, "an integer > 0")
        config_check(self.router in ROUTER_KINDS, "adapter.router", self.router, " | ".join(ROUTER_KINDS))
        config_check(ok_int(self.router_hidden_mult, 1), "adapter.router_hidden_mult", self.router_hidden_mult,
                     "an integer >= 1")
        config_check(self.router_input in ROUTER_INPUTS, "adapter.router_input", self.router_input,
                     " | ".join(ROUTER_INPUTS))
        config_check(self.router_level in ROUTER_LEVELS, "adapter.router_level", self.router_level,
                     " | ".join(ROUTER_LEVELS))
        config_check(self.instance_pooling in INSTANCE_POOLINGS, "adapter.instance_pooling", self.instance_pooling,
                     " | ".join(INSTANCE_POOLINGS))
        for key in ("parallel_adapter", "prompt_expert", "router_bias"):
            config_check(isinstance(getattr(self, key), bool), f"adapter.{key}", getattr(self, key), "true or false")

    def router_kwargs(self) -> dict[str, Any]:
        return {"kind": self.router, "hidden_mult": self.router_hidden_mult, "bias": self.router_bias,
                "router_input": self.router_input, "level": self.router_level, "pooling": self.instance_pooling}

    def plan(self) -> BlockPlan:
        return BlockPlan(
            adapter=self.name, lora_targets=list(self.target_modules), r=self.r, scaling=self.scaling,
            dropout=self.dropout, prompt_length=self.prompt_length if self.prompt_expert else 0,
            adapter_size=self.adapter_size if self.parallel_adapter else 0, gate_by=self.gate_by,
            router=self.router_kwargs(),
        )

    def inject(self, model: nn.Module) -> list[str]:
        return inject_block_plan(model, self.plan())
