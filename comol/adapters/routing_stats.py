"""Routing statistics of mixture adapters, accumulated on the device (no host sync per step).

Every routed layer reports, per forward, its per-token expert weights ``weights`` [T, N] (what the
token actually uses), optionally the router's distribution before selection ``probs`` [T, N] and
the hard selection ``selected`` [T, N] of top-k / threshold routers, with the padding mask [T].
Padding tokens are weighted 0 (multiplication, never boolean indexing: no sync).

Definitions (``summary``), per module, over the non-padding tokens since the last reset:

* ``load_i``: mean share of expert i in a token's weights (weights normalised to sum 1 per token;
  for softmax routers these are the gates themselves); for top-k / threshold routers the share of
  selections ``selected_i / sum_j selected_j`` is the load instead, and ``gate_mass_i`` is kept too.
* ``entropy``: mean per-token entropy of ``probs`` (or of the normalised weights), divided by
  log N: 1 = uniform gates, 0 = one expert per token.
* ``dead_experts``: experts whose load is below ``DEAD_FRACTION`` of the uniform load 1/N.
* ``max_load_ratio``: max_i load_i / min_i load_i, the min floored at 1e-6 / N so it stays finite.

The run summaries are ``routing/mean_entropy`` (mean over modules), ``routing/dead_experts`` (sum)
and ``routing/max_load_ratio`` (max).

``capturing()`` additionally keeps every recorded call's per-token weights and mask (for pictures
of single prompts, comol/routing.py); off by default, when recording costs one attribute test more.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

#: an expert is dead when its load is below this fraction of the uniform load 1/N
DEAD_FRACTION = 0.1
_EPS = 1e-12


class _Accumulator:
    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        self.tokens = torch.zeros((), device=device)
        self.mass = torch.zeros(n, device=device)
        self.entropy = torch.zeros((), device=device)
        self.selected: torch.Tensor | None = None


class RoutingStats:
    """Per-module accumulators; ``enabled`` switches recording on (off by default: zero cost)."""

    def __init__(self) -> None:
        self.enabled = False
        self._acc: dict[str, _Accumulator] = {}
        #: while ``capturing()``: module name -> [(weights [T, N] fp32, mask [T] bool or None), ...]
        self._captured: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] | None = None

    @torch.no_grad()
    def record(self, name: str, weights: torch.Tensor, mask: torch.Tensor | None = None,
               probs: torch.Tensor | None = None, selected: torch.Tensor | None = None) -> None:
        if not self.enabled:
            return
        n = weights.shape[-1]
        w = weights.detach().float().reshape(-1, n)
        acc = self._acc.get(name)
        if acc is None or acc.n != n:
            acc = self._acc[name] = _Accumulator(n, w.device)
        valid = (w.new_ones(w.shape[0]) if mask is None
                 else mask.reshape(-1).to(device=w.device, dtype=w.dtype))
        # few, fused ops (the reductions over tokens are matrix-vector products with the 0/1 mask)
        share = w / w.sum(-1, keepdim=True).clamp_min(_EPS)
        acc.mass.addmv_(share.T, valid)
        acc.tokens.add_(valid.sum())
        if n > 1:
            p = share if probs is None else probs.detach().float().reshape(-1, n)
            # entr(p) = -p log p (0 at p = 0): the per-token entropies, summed over the valid tokens
            acc.entropy.add_(torch.special.entr(p).sum(-1) @ valid, alpha=1.0 / math.log(n))
        if selected is not None:
            sel = valid @ selected.reshape(-1, n).to(w.dtype)
            acc.selected = sel if acc.selected is None else acc.selected + sel
        if self._captured is not None:
            self._captured.setdefault(name, []).append(
                (w.clone(), None if mask is None else mask.reshape(-1).to(device=w.device, dtype=torch.bool)))

    def reset(self) -> None:
        self._acc.clear()

    @contextlib.contextmanager
    def collecting(self) -> Iterator["RoutingStats"]:
        """Record into fresh accumulators inside the block (read ``summary()`` there); then restore."""
        saved, was = self._acc, self.enabled
        self._acc, self.enabled = {}, True
        try:
            yield self
        finally:
            self.enabled = was
            self._acc = saved

    @contextlib.contextmanager
    def capturing(self) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]]:
        """Inside ``collecting()``: also keep each recorded call's weights [T, N] and mask [T] per module
        (yields that dict: module name -> list of (weights, mask), one entry per call)."""
        saved = self._captured
        self._captured = {}
        try:
            yield self._captured
        finally:
            self._captured = saved

    def _all_reduce(self) -> None:
        """Under torch.distributed, sum every accumulator over ranks (all ranks call this together)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for name in sorted(self._acc):
            acc = self._acc[name]
            for t in (acc.tokens, acc.mass, acc.entropy) + ((acc.selected,) if acc.selected is not None else ()):
                dist.all_reduce(t)

    def loads(self) -> dict[str, dict[str, list[float]]]:
        """Per module: ``load`` (and ``gate_mass`` for routers with a hard selection), as lists (one sync)."""
        out = {}
        for name, acc in self._acc.items():
            tokens = acc.tokens.clamp_min(1.0)
            mass = (acc.mass / tokens).tolist()
            if acc.selected is not None:
                load = (acc.selected / acc.selected.sum().clamp_min(_EPS)).tolist()
                out[name] = {"load": load, "gate_mass": mass}
            else:
                out[name] = {"load": mass}
        return out

    def summary(self, per_module: bool = True) -> dict[str, float]:
        """``routing/<module>/{entropy,dead_experts,max_load_ratio}`` and the run summaries (one sync)."""
        if not self._acc:
            return {}
        self._all_reduce()
        names = list(self._acc)
        stacked_entropy = torch.stack([self._acc[k].entropy / self._acc[k].tokens.clamp_min(1.0) for k in names])
        entropy = stacked_entropy.tolist()
        loads = self.loads()
        out: dict[str, float] = {}
        dead_total, worst = 0, 0.0
        for name, ent in zip(names, entropy):
            load = torch.tensor(loads[name]["load"])
            n = load.numel()
            dead = int((load < DEAD_FRACTION / n).sum())
            ratio = float(load.max() / load.min().clamp_min(1e-6 / n))
            dead_total, worst = dead_total + dead, max(worst, ratio)
            if per_module:
                out.update({f"routing/{name}/entropy": ent, f"routing/{name}/dead_experts": float(dead),
                            f"routing/{name}/max_load_ratio": ratio})
        out.update({"routing/mean_entropy": sum(entropy) / len(entropy), "routing/dead_experts": float(dead_total),
                    "routing/max_load_ratio": worst})
        return out
