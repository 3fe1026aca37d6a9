"""CoMoL-sh: CoMoL with A_t / B_t shared across layers per projection type (docs/methods.md §1,
``mocorelorash`` in the official code; outside the paper's tables).

Each adapted Linear keeps its own N cores and router; the forward pass is CoMoL's unchanged
(CoMoLLinear with its ``shared`` holder). Dimensions come from the model (sharing.py), so any
target set works.

Params: sum over types t of r (n_t + m_t), plus N r^2 + N r (CR) or N r^2 + N n_t (w/o CR)
per adapted module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from comol.adapters.base import register_adapter
from comol.adapters.comol import CoMoLConfig, CoMoLLinear
from comol.adapters.sharing import inject_layer_shared


@register_adapter("comol_sh")
@dataclass(kw_only=True)
class CoMoLShConfig(CoMoLConfig):
    """CoMoL with cross-layer shared A_t/B_t (per projection type), per-layer cores and router."""

    def inject(self, model: nn.Module) -> list[str]:
        return inject_layer_shared(model, self.target_modules, self.r,
                                   lambda base, name, shared: CoMoLLinear(base, self, shared=shared))
