"""Adapter building blocks shared by every method: config base classes, the registry and the
Linear wrapper. Routed adapters reach the padding mask, auxiliary losses, routing statistics and
per-optimizer-step updates through the model's ``AdapterContext`` (context.py), nothing global.

Naming rule: every tensor an adapter adds lives in a module attribute whose name starts
with ``adapter_`` (``ADAPTER_PREFIX``).  Freezing, saving and loading are driven by that rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from comol.adapters.context import ContextBound, adapter_context
from comol.errors import ConfigError, config_check

ADAPTER_PREFIX = "adapter_"

_REGISTRY: dict[str, type["AdapterConfig"]] = {}


def register_adapter(name: str):
    """Class decorator: make an ``AdapterConfig`` subclass available as ``adapter.name=<name>``."""

    def wrap(cls: type[AdapterConfig]) -> type[AdapterConfig]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"adapter name {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_adapters() -> list[str]:
    return sorted(_REGISTRY)


def adapter_config_class(name: str) -> type["AdapterConfig"]:
    if name not in _REGISTRY:
        raise ConfigError(f"adapter.name={name!r} is not a known adapter; known: {', '.join(registered_adapters())}")
    return _REGISTRY[name]


#: keys an adapter preset may carry besides the fields: the method's label in reports and the stem of
#: its run names. They describe a preset, not the adapter, so building the config sets them aside.
PRESET_KEYS = ("label", "run_name")

#: the projections the papers adapt: attention q/k/v/o and the MLP down projection
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


def build_adapter_config(values: Mapping[str, Any]) -> "AdapterConfig":
    """Turn a mapping with ``name`` (e.g. the ``adapter`` node of a run config) into a validated config.

    Fields left out take the dataclass defaults (each method's published settings); ``label`` and
    ``run_name`` (``PRESET_KEYS``) are ignored. Plain Python: no config tree is read.
    """
    values = {k: v for k, v in dict(values).items() if k not in PRESET_KEYS}
    if "name" not in values:
        raise ConfigError("adapter.name is missing: expected one of " + ", ".join(registered_adapters()))
    cls = adapter_config_class(values.pop("name"))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"adapter.{unknown[0]} is not a field of adapter {cls.name!r}; known fields: {', '.join(sorted(known))}"
        )
    return cls(**values)


def adapter_defaults(cls: type["AdapterConfig"]) -> dict[str, Any]:
    """The default value of every field of an adapter config class (before ``__post_init__`` derives any)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def is_adapter_name(param_name: str) -> bool:
    """True when a parameter/buffer name belongs to an adapter (some component starts with ``adapter_``)."""
    return any(part.startswith(ADAPTER_PREFIX) for part in param_name.split("."))


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields common to every adapter. Subclasses add their hyperparameters (with ``help`` metadata).

    Every field has a default: each method's published setting, so ``CoMoLConfig()`` is the paper's
    CoMoL. The presets ``conf/adapter/<name>.yaml`` state only what differs (plus a label and run name)."""

    name: ClassVar[str] = ""
    #: True for adapters whose update is a function of the token (cannot be merged into W).
    token_routed: ClassVar[bool] = False

    target_modules: list[str] = field(
        default_factory=lambda: list(PAPER_TARGETS),
        metadata={"help": "names (last path component) of the nn.Linear modules to adapt"},
    )
    aux_loss_coeff: float = field(
        default=0.0, metadata={"help": "weight of the summed auxiliary routing loss in the model's loss (0: none)"})

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        config_check(
            len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
            "adapter.target_modules", self.target_modules, "a non-empty list of module names",
        )
        config_check(self.aux_loss_coeff >= 0, "adapter.aux_loss_coeff", self.aux_loss_coeff, "a number >= 0")
        self.validate()

    def validate(self) -> None:
        """Subclass hook: raise ConfigError for invalid hyperparameters."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    # -- injection -----------------------------------------------------------------
    def make_layer(self, base: nn.Linear, module_name: str) -> nn.Module:
        """Return the module that replaces the frozen Linear ``base`` (Linear-level adapters)."""
        raise NotImplementedError(f"adapter {self.name!r} does not define make_layer")

    def inject(self, model: nn.Module) -> list[str]:
        """Replace every targeted Linear of ``model`` in place; return the adapted module names.

        Adapters that act at block level or share tensors across layers override this.
        """
        names = matching_linears(model, self.target_modules)
        for module_name in names:
            parent, attr = _parent_of(model, module_name)
            setattr(parent, attr, self.make_layer(getattr(parent, attr), module_name))
        return names


@dataclass(kw_only=True)
class LowRankConfig(AdapterConfig):
    """Adapters with a LoRA-style rank, alpha/r scaling and input dropout."""

    r: int = field(default=8, metadata={"help": "rank of the low-rank update (per expert where relevant)"})
    alpha: float | None = field(default=None, metadata={"help": "scaling numerator: s = alpha / r (null: alpha = r)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter input x"})

    def __post_init__(self) -> None:
        config_check(isinstance(self.r, int) and self.r > 0, "adapter.r", self.r, "an integer > 0")
        config_check(0.0 <= self.dropout < 1.0, "adapter.dropout", self.dropout, "a probability in [0, 1)")
        if self.alpha is None:
            self.alpha = self.r
        config_check(self.alpha > 0, "adapter.alpha", self.alpha, "a number > 0")
        super().__post_init__()

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r


def matching_linears(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules whose last path component is one of ``targets``."""
    wanted = set(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted]
    if not names:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"adapter.target_modules={list(targets)} matched no nn.Linear in the model; "
            f"available Linear names: {', '.join(available)}"
        )
    return names


def _parent_of(model: nn.Module, module_name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = module_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


#: reasons given by ``AdapterLinear.delta_weight`` when a layer has no weight delta to merge
NOT_LINEAR = "its update is not a fixed linear weight delta (it is a nonlinear function of x)"
TOKEN_ROUTED = ("it is token-routed (its update depends on each token's routing), "
                "so there is no single weight delta")


class NoWeightDelta(Exception):
    """``AdapterLinear.delta_weight``: this layer's update is not a fixed linear map of x (the
    message says why). ``comol.adapters.merge`` turns it into a ComolError naming the adapter."""


# --- wrapped Linear ---------------------------------------------------------------------

class AdapterLinear(ContextBound, nn.Module):
    """Wraps a frozen ``base_layer`` (nn.Linear) and adds ``delta(x)`` to its output.

    Adapter tensors are kept in fp32 (``adapter_dtype``) whatever the base dtype; the input is
    cast to that dtype for the adapter path (a no-op under autocast, which recasts matmuls).
    """

    #: True while W holds W + delta_weight() (comol.adapters.merge): forward skips the adapter path
    merged: bool = False

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        #: False while this layer runs again in the same forward scope (a gradient-checkpointing
        #: re-run during backward): side effects (aux losses, counts, statistics) happen once
        self.fresh_call = True

    @property
    def weight(self) -> torch.Tensor:  # some HF code reads module.weight.dtype / .device
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def factory_kwargs(self) -> dict[str, Any]:
        return {"device": self.base_layer.weight.device, "dtype": torch.float32}

    def delta_weight(self) -> torch.Tensor:
        """The exact weight delta dW [out, in] (fp32) with ``delta(x) == x @ dW.T`` in eval mode.

        Merging and the merged export (``comol.adapters.merge``) rely on this one method. Layers
        whose update is not a fixed linear map of x raise NoWeightDelta with the reason.
        """
        raise NoWeightDelta(NOT_LINEAR)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def report_routing(self, weights: torch.Tensor, mask: torch.Tensor | None, probs: torch.Tensor | None = None,
                       selected: torch.Tensor | None = None) -> None:
        """Hand this forward's routing to the context's statistics (once per forward, padding excluded)."""
        if self.fresh_call and self.context.routing.enabled:
            self.context.routing.record(self._context_name, weights, mask, probs=probs, selected=selected)

    def add_aux_loss(self, loss_fn) -> None:
        """In training forwards, add ``loss_fn()`` to the context's auxiliary losses. A checkpoint
        re-run computes it again (the re-run must repeat the forward's ops) but does not add it."""
        if self.training:
            loss = loss_fn()
            if self.fresh_call:
                self.context.add_aux_loss(loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fresh_call = self.context.first_call(self)
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.delta(x.to(torch.float32) if not torch.is_autocast_enabled(x.device.type) else x).to(out.dtype)


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """PyTorch's default nn.Linear weight init (kaiming_uniform with a=sqrt(5))."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses of the model's last forward (None if none)."""
    return adapter_context(model).aux_loss()
