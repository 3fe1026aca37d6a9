"""FlyLoRA: a frozen sparse random A with per-token top-k rank selection (docs/methods.md §2).

    a    = A · Drop(x)                              A: r x n, FROZEN, sparse random
    S    = top-k_j (a_j + bias_j)                   per token; bias steers selection only
    h    = W x + s · B (a ⊙ 1_S)                    B: m x r, zero-initialised (the only trained tensor)

A: each of the r rows has ``n // (r // k)`` non-zeros (i.e. n·k/r, at least 1) at random
columns, with values drawn from N(0, 1/r^2) (std 1/r, as in the FlyLoRA and CoMoL reference code). It is stored as the persistent
buffer ``adapter_A`` (saved and loaded with the adapter, never trained).

Load balancing without gradients: in training forward passes each module counts, over the
non-padding tokens, how often every rank j is selected; ``update_bias()`` (run by the model's
adapter context after every optimizer step: ``attach_optimizer``; never in eval or generation) then applies
``bias += u · sign(mean(count) - count)`` and resets the counts. The bias is the persistent
buffer ``adapter_router_bias`` (saved: it changes which ranks a token uses). Under DDP the
counts are summed over ranks first so every rank keeps the same bias.

Params per module: r m trained (+ r n frozen buffer, + r bias buffer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from comol.adapters.base import AdapterLinear, LowRankConfig, register_adapter
from comol.adapters.context import AdapterContext
from comol.adapters.gating import topk_mask
from comol.errors import config_check
from comol.adapters.base import TOKEN_ROUTED, NoWeightDelta


@register_adapter("flylora")
@dataclass(kw_only=True)
class FlyLoraConfig(LowRankConfig):
    """Implicit rank-wise mixture: frozen sparse random A, top-k of r ranks per token, trained B."""

    token_routed = True

    r: int = field(default=32, metadata={"help": "number r of ranks (rows of the frozen sparse A)"})
    top_k: int = field(default=8, metadata={"help": "ranks active per token (must divide r)"})
    bias_lr: float = field(default=1e-3, metadata={"help": "u: step of the sign-based routing-bias update"})

    def validate(self) -> None:
        config_check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.r, "adapter.top_k", self.top_k,
                     f"an integer in [1, r={self.r}]")
        config_check(self.r % self.top_k == 0, "adapter.top_k", self.top_k, f"a divisor of r={self.r}")
        config_check(self.bias_lr >= 0, "adapter.bias_lr", self.bias_lr, "a number >= 0")

    def make_layer(self, base: nn.Linear, module_name: str) -> nn.Module:
        return FlyLoraLinear(base, self)


def sparse_random_projection(r: int, n: int, nnz: int, device: torch.device | str) -> torch.Tensor:
    """r x n matrix, ``nnz`` non-zeros per row at random columns, values N(0, 1/r^2), std 1/r (fp32)."""
    if torch.device(device).type == "meta":
        return torch.empty(r, n, device="meta")
    cols = torch.rand(r, n).argsort(dim=1)[:, :nnz]
    out = torch.zeros(r, n)
    out.scatter_(1, cols, torch.randn(r, nnz) / r)
    return out.to(device)


class FlyLoraLinear(AdapterLinear):
    def __init__(self, base_layer: nn.Linear, cfg: FlyLoraConfig):
        super().__init__(base_layer)
        kw = self.factory_kwargs()
        r, n = cfg.r, self.in_features
        self.r, self.top_k, self.scaling, self.bias_lr = r, cfg.top_k, cfg.scaling, cfg.bias_lr
        self.nnz_per_row = max(1, n // (r // cfg.top_k))
        self.register_buffer("adapter_A", sparse_random_projection(r, n, self.nnz_per_row, kw["device"]))
        self.register_buffer("adapter_router_bias", torch.zeros(r, **kw))
        #: selection counts of the current training step: a plain attribute, not a buffer, so it
        #: is never saved nor overwritten by DDP's buffer broadcast; None until a training forward
        self.adapter_step_counts: torch.Tensor | None = None
        self.adapter_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.adapter_dropout = nn.Dropout(cfg.dropout)

    def select(self, a: torch.Tensor) -> torch.Tensor:
        """Boolean [T, r]: the top-k ranks of a + bias per token (no gradient)."""
        with torch.no_grad():
            return topk_mask(a.detach().float() + self.adapter_router_bias.float(), self.top_k)

    def delta_weight(self) -> torch.Tensor:
        raise NoWeightDelta(TOKEN_ROUTED)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        a = F.linear(self.adapter_dropout(rows), self.adapter_A.to(rows.dtype))  # [T, r]
        selected = self.select(a)
        if self.fresh_call and (self.training or self.context.routing.enabled):  # not on checkpoint re-runs
            mask = self.context.token_mask(x)
            if self.training:
                self._count(selected, mask)
            self.report_routing(selected.float(), mask, selected=selected)
        y = F.linear(a * selected.to(a.dtype), self.adapter_B)
        return (y * self.scaling).reshape(*lead, self.out_features)

    @torch.no_grad()
    def _count(self, selected: torch.Tensor, mask: torch.Tensor | None) -> None:
        sel = selected.float()
        if mask is not None:
            sel = sel * mask.to(sel.device, sel.dtype).unsqueeze(-1)
        counts = sel.sum(0)
        self.adapter_step_counts = counts if self.adapter_step_counts is None else self.adapter_step_counts + counts

    def on_bind(self, ctx: AdapterContext) -> None:
        ctx.on_optimizer_step(self.update_bias)

    @torch.no_grad()
    def update_bias(self) -> None:
        """bias += u · sign(mean(count) - count) from this step's training counts; then reset."""
        counts, self.adapter_step_counts = self.adapter_step_counts, None
        bias = self.adapter_router_bias
        if dist.is_available() and dist.is_initialized():  # every rank takes part, counted or not
            counts = torch.zeros(self.r, device=bias.device) if counts is None else counts.to(bias.device)
            dist.all_reduce(counts)
        if counts is None or counts.sum() == 0:
            return
        bias += self.bias_lr * torch.sign(counts.mean() - counts).to(device=bias.device, dtype=bias.dtype)
