"""Merging an adapter into the frozen base weights (W <- W + dW) and undoing it exactly.

Everything goes through one method of the adapter layer, ``AdapterLinear.delta_weight()``: the
exact weight delta dW of its update in eval mode, or ``NoWeightDelta`` with the reason there is
none. Today only ``lora`` has one (dW = s·B·A). Token-routed layers (CoMoL, MoLoRA, MoLA,
FlyLoRA, HydraLoRA, the MoA family, ...) compute a different delta for every token; DenseLoRA is
nonlinear in x; block-level experts (prompt, parallel adapter) are not Linear wrappers at all.
All of them raise a ComolError that names the adapter and the reason.

``merge_adapter`` keeps a CPU copy of each original weight (unless ``reversible=False``) so
``unmerge_adapter`` restores it bit for bit (memory: one host copy of the adapted weights).
``safe=True`` checks every merged weight for NaN/Inf and leaves the model unmerged if any is
found. ``fold_adapter`` merges for good and removes the adapter modules: what remains is the
plain Transformers model, ready for ``save_pretrained``.
"""

from __future__ import annotations

import torch
from torch import nn

from comol.adapters.base import AdapterConfig, AdapterLinear, NoWeightDelta, _parent_of, is_adapter_name
from comol.errors import ComolError


def _adapter_name(model: nn.Module) -> str:
    cfg: AdapterConfig | None = getattr(model, "comol_adapter_config", None)
    if cfg is not None:
        return cfg.name
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, AdapterLinear)})
    return "/".join(kinds) or "none"


def _refusal(model: nn.Module, reason: str) -> ComolError:
    return ComolError(f"adapter {_adapter_name(model)!r} cannot be merged into the base weights: {reason}; "
                      f"run it unmerged")


def _adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
    if not layers and not any(is_adapter_name(n) for n, _ in model.named_parameters()):
        raise ComolError("merge_adapter: the model carries no injected adapter to merge")
    return layers


def _check_nothing_else(model: nn.Module, layers: list[tuple[str, AdapterLinear]]) -> None:
    """Refuse when adapter tensors live outside the Linear wrappers (block-level experts)."""
    inside = tuple(f"{n}." for n, _ in layers)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    outside = [n for n, _ in tensors if is_adapter_name(n) and not n.startswith(inside)]
    if outside:
        parts = outside[0].split(".")
        module = ".".join(parts[:next(i for i, p in enumerate(parts) if is_adapter_name(p)) + 1])
        raise _refusal(model, f"it adds modules inside the decoder blocks ({module}) whose output is not a "
                              f"weight delta of a Linear")


@torch.no_grad()
def merge_adapter(model: nn.Module, safe: bool = True, reversible: bool = True) -> int:
    """Merge every adapter layer into its base weight in place; return how many were merged.

    With ``safe`` a NaN/Inf merged weight raises ComolError and every layer is left unmerged.
    Already-merged layers are skipped. While merged, forward passes skip the adapter path
    (do not train a merged model). ``reversible=False`` keeps no copy of the original weights
    (and, on an error, leaves the layers merged so far merged: for a model about to be discarded).
    """
    layers = _adapter_layers(model)
    done: list[AdapterLinear] = []

    def fail(error: ComolError) -> ComolError:
        for layer in done:
            if reversible:
                _restore(layer)
        return error

    for module_name, layer in layers:
        if layer.merged:
            continue
        try:
            delta = layer.delta_weight()
        except NoWeightDelta as e:
            raise fail(_refusal(model, str(e))) from None
        w = layer.base_layer.weight
        new = (w.float() + delta.to(w.device)).to(w.dtype)
        if safe and not torch.isfinite(new).all():
            raise fail(ComolError(f"merge_adapter: {module_name}: the merged weight W + dW contains NaN/Inf; "
                                  f"the model was left unmerged"))
        layer._merge_backup = w.detach().to("cpu", copy=True) if reversible else None
        w.copy_(new)
        layer.merged = True
        done.append(layer)
    try:
        _check_nothing_else(model, layers)
    except ComolError as e:
        raise fail(e) from None
    return len(done)


def _restore(layer: AdapterLinear) -> None:
    backup = getattr(layer, "_merge_backup", None)
    if backup is None:
        raise ComolError("unmerge_adapter: this layer was merged with reversible=False; its original weight is gone")
    w = layer.base_layer.weight
    w.copy_(backup.to(w.device))
    layer._merge_backup = None
    layer.merged = False


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> int:
    """Restore the original base weights of every merged layer; return how many were restored."""
    count = 0
    for m in model.modules():
        if isinstance(m, AdapterLinear) and m.merged:
            _restore(m)
            count += 1
    return count


def fold_adapter(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge for good: every adapter layer becomes its base Linear holding W + dW; return ``model``.

    The result has no adapter modules or tensors left (a plain Transformers model). Raises the
    same ComolError as ``merge_adapter`` for adapters without an exact weight delta.
    """
    merge_adapter(model, safe=safe, reversible=False)
    for module_name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]:
        parent, attr = _parent_of(model, module_name)
        setattr(parent, attr, layer.base_layer)
    if hasattr(model, "comol_adapter_config"):
        del model.comol_adapter_config
    return model
