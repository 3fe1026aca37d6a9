"""Merging an adapter into the frozen base weights (W <- W + s·B·A) and undoing it exactly.

Only adapters whose update is one fixed weight delta per Linear can be merged: today ``lora``.
Token-routed adapters (config class attribute ``token_routed = True``: CoMoL, MoLoRA, MoLA,
FlyLoRA, ...) compute a different delta for every token; others (DenseLoRA, block-level
adapters) are nonlinear in x. Both raise a ComolError that names the adapter and the reason.

``merge_adapter`` keeps a CPU copy of each original weight so ``unmerge_adapter`` restores it
bit for bit (memory: one host copy of the adapted weights). ``safe=True`` checks every merged
weight for NaN/Inf first and leaves the model unmerged if any is found.
"""

from __future__ import annotations

from torch import nn

from comol.adapters.base import AdapterConfig, AdapterLinear
from comol.adapters.lora import LoraLinear
from comol.errors import ComolError


def _adapter_name(model: nn.Module) -> str:
    cfg: AdapterConfig | None = getattr(model, "comol_adapter_config", None)
    if cfg is not None:
        return cfg.name
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, AdapterLinear)})
    return "/".join(kinds) or "none"


def _check_mergeable(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    cfg: AdapterConfig | None = getattr(model, "comol_adapter_config", None)
    name = _adapter_name(model)
    if cfg is not None and cfg.token_routed:
        raise ComolError(
            f"adapter {name!r} cannot be merged into the base weights: it is token-routed (its update "
            f"depends on each token's routing), so there is no single weight delta; run it unmerged"
        )
    others = [type(m).__name__ for m in model.modules()
              if isinstance(m, AdapterLinear) and not isinstance(m, LoraLinear)]
    if others or (cfg is not None and cfg.name != "lora"):
        raise ComolError(
            f"adapter {name!r} cannot be merged into the base weights: its update is not a fixed "
            f"linear weight delta (merging is supported for 'lora' only); run it unmerged"
        )
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    if not layers:
        raise ComolError("merge_adapter: the model carries no injected adapter to merge")
    return layers


def merge_adapter(model: nn.Module, safe: bool = True) -> int:
    """Merge the model's LoRA layers into their base weights in place; return how many were merged.

    With ``safe`` a NaN/Inf merged weight raises ComolError and every layer is left unmerged.
    Already-merged layers are skipped. While merged, forward passes skip the adapter path
    (do not train a merged model).
    """
    layers = _check_mergeable(model)
    done: list[LoraLinear] = []
    for module_name, layer in layers:
        if layer.merged:
            continue
        try:
            layer.merge(safe=safe)
        except ComolError as e:
            for d in done:
                d.unmerge()
            raise ComolError(f"merge_adapter: {module_name}: {e}; the model was left unmerged") from None
        done.append(layer)
    return len(done)


def unmerge_adapter(model: nn.Module) -> int:
    """Restore the original base weights of every merged LoRA layer; return how many were restored."""
    count = 0
    for m in model.modules():
        if isinstance(m, LoraLinear) and m.merged:
            m.unmerge()
            count += 1
    return count
