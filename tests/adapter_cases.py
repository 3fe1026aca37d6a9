"""The table of adapter test cases run through one common tester (tests/test_adapters_common.py).

Each adapter family contributes cases from a ``tests/cases_*.py`` module exposing ``CASES``.
A case says how to build the adapter (a small config), how to compute its update naively
(independently of the production code), how many parameters it must add, and what is frozen
by design.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class AdapterCase:
    id: str
    #: the ``adapter`` config node (must contain ``name``), sized for micro models
    adapter: dict
    #: Linear-level adapters: naive(module, x) -> the adapter's output delta for input x [T, n]
    #: (module is the injected layer in eval mode; read its tensors, re-derive the formula).
    #: Block-level adapters: None here, use ``naive_model`` instead.
    naive: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
    #: parameters added per adapted Linear (n = in_features, m = out_features), or a callable
    #: taking the micro model and returning the expected total trainable count.
    count: Callable[[int, int], int] | None = None
    count_model: Callable[[torch.nn.Module], int] | None = None
    #: the adapted model's logits at initialisation equal the base model's within this (absolute):
    #: 1e-6 for exact no-ops; block-level MoA cases with the parallel adapter (xavier gain 1e-4,
    #: a near no-op) set a looser bound
    noop_atol: float = 1e-6
    #: substrings of trainable-looking names that are frozen by design (get no gradient)
    frozen_by_design: tuple[str, ...] = ()
    #: randomise these adapter tensors before the naive comparison (default: all adapter params)
    families: tuple[str, ...] = ("qwen3", "llama")
    #: tolerances for fp32 naive comparison
    atol: float = 1e-5
    rtol: float = 1e-4
    #: extra per-case kwargs for the naive check (e.g. in/out sizes)
    extra: dict = field(default_factory=dict)


def randomize_adapter_(model: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """Give every adapter parameter random values (so zero-initialised B's do not hide bugs)."""
    from comol.adapters import is_adapter_name

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_name(name) and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
