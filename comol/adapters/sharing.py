"""Cross-layer sharing of low-rank factors (DenseLoRA, CoMoL-sh).

For every projection type t (the last path component of a targeted Linear: q_proj, down_proj,
...) one holder keeps A_t [r, n_t] (default Linear init) and B_t [m_t, r] (zeros), with n_t, m_t
read from the model. All holders live in ONE ModuleDict registered on the top-level model as
``adapter_shared`` (state-dict names ``adapter_shared.<t>.adapter_A``): each tensor is stored,
counted, saved and loaded exactly once. The per-layer modules only *reference* their holder
(``object.__setattr__``, not a submodule), as CoMoLLinear's ``shared`` hook expects.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from comol.adapters.base import _parent_of, kaiming_uniform_, matching_linears
from comol.errors import ConfigError

SHARED_ATTR = "adapter_shared"


class SharedLowRank(nn.Module):
    """One projection type's shared factors: ``adapter_A`` [r, n] and ``adapter_B`` [m, r]."""

    def __init__(self, r: int, in_features: int, out_features: int, device: torch.device):
        super().__init__()
        kw = {"device": device, "dtype": torch.float32}
        self.in_features, self.out_features = in_features, out_features
        self.adapter_A = nn.Parameter(kaiming_uniform_(torch.empty(r, in_features, **kw)))
        self.adapter_B = nn.Parameter(torch.zeros(out_features, r, **kw))


def group_by_type(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """Targeted Linear names grouped by projection type; every group must share one shape."""
    groups: dict[str, list[str]] = {}
    for name in matching_linears(model, targets):
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    for t, names in groups.items():
        shapes = {tuple(model.get_submodule(n).weight.shape) for n in names}
        if len(shapes) > 1:
            raise ConfigError(
                f"adapter.target_modules: the {t!r} Linears have different shapes {sorted(shapes)}; "
                f"layer-shared adapters need one (out, in) shape per projection type"
            )
    return groups


def inject_layer_shared(model: nn.Module, targets: list[str], r: int,
                        make_layer: Callable[[nn.Linear, str, SharedLowRank], nn.Module]) -> list[str]:
    """Create ``model.adapter_shared`` and replace every targeted Linear by ``make_layer(base, name, holder)``."""
    if SHARED_ATTR in dict(model.named_children()):
        raise ConfigError(f"the model already carries {SHARED_ATTR!r}: inject a layer-shared adapter only once")
    groups = group_by_type(model, targets)
    holders = nn.ModuleDict()
    for t, names in groups.items():
        first = model.get_submodule(names[0])
        holders[t] = SharedLowRank(r, first.in_features, first.out_features, first.weight.device)
    model.add_module(SHARED_ATTR, holders)
    adapted = []
    for t, names in groups.items():
        for name in names:
            parent, attr = _parent_of(model, name)
            setattr(parent, attr, make_layer(getattr(parent, attr), name, holders[t]))
            adapted.append(name)
    return adapted
