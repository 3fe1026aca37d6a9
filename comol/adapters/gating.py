"""Gating math shared by the routed adapters (docs/methods.md §2): router scores, selection, balancing loss.

* ``fp32_linear`` / ``router_probs``: router logits / softmax in fp32 with autocast off, whatever the input dtype.
* ``topk_mask`` / ``renormalise``: hard selection and renormalisation of routing weights.
* ``load_balancing_loss``: the Switch-Transformer style auxiliary loss, padding excluded.

All functions take token rows ``[T, N]`` (flatten batch and sequence first).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in fp32 with autocast disabled (router logits)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def router_probs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense softmax routing probabilities ``softmax(W_g x)`` [..., N] in fp32."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.softmax(fp32_linear(x, weight, bias), dim=-1)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [..., N] mask of the ``k`` largest entries of ``scores`` along the last dim."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def renormalise(weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """``w_i · 1[selected_i] / sum_j w_j · 1[selected_j]`` along the last dim.

    A row whose selected weights sum to zero (nothing selected, or all selected weights are 0)
    gets all-zero weights instead of NaN, forward and backward.
    """
    kept = weights * selected.to(weights.dtype)
    total = kept.sum(dim=-1, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return kept / safe


def load_balancing_loss(probs: torch.Tensor, selected: torch.Tensor,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style load-balancing loss ``L = N · sum_i f_i · P_i`` (fp32 scalar).

    probs:      [T, N] router scores (softmax probabilities; AdaMoLE passes its a_i = p_i - tau)
    selected:   [T, N] bool, token t is routed to expert i (each top-k slot counts)
    token_mask: [T] bool or None; tokens where it is False (padding) are left out of both means

    f_i = fraction of (valid) tokens routed to i  (sums to k for top-k routing, as in the
          Mixtral/HF convention: perfectly balanced top-k routing gives L = k),
    P_i = mean over (valid) tokens of probs[:, i].
    f carries no gradient; the gradient reaches the router through P. With no valid token
    the loss is 0 (still attached to the graph of ``probs``).

    Under torch.distributed training (DDP/FSDP, gradients on) f, P and the token count are those of
    the global batch (summed over ranks): every rank gets the one-device loss value, and the local
    term carrying the gradient is scaled so that DDP's mean over ranks is the one-device gradient.
    """
    probs = probs.float().reshape(-1, probs.shape[-1])
    sel = selected.reshape(-1, selected.shape[-1]).float()
    n_exp = probs.shape[-1]
    if token_mask is None:
        valid = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
    else:
        valid = token_mask.reshape(-1).to(device=probs.device, dtype=probs.dtype)
    f_sum, p_sum, count = (sel * valid[:, None]).sum(0), (probs * valid[:, None]).sum(0), valid.sum()
    world = training_world_size()
    if world == 1:
        f, p = f_sum / count.clamp_min(1.0), p_sum / count.clamp_min(1.0)
    else:  # the statistics of the global batch: the same loss value and (DDP-averaged) gradient as one device
        total = sum_over_ranks(torch.cat([f_sum, p_sum.detach(), count[None]]))
        count_all = total[-1].clamp_min(1.0)
        f = total[:n_exp] / count_all
        local = p_sum * (world / count_all)  # the mean over ranks of `local` is the global P
        p = total[n_exp:2 * n_exp] / count_all + (local - local.detach())
    return n_exp * (f.detach() * p).sum()


def training_world_size() -> int:
    """The number of processes of a running torch.distributed job while gradients are on (training
    forwards, checkpoint re-runs), else 1: evaluation and generation never wait on other ranks."""
    if not (torch.is_grad_enabled() and dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


@torch.no_grad()
def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` summed over all ranks (every rank calls this together)."""
    out = t.detach().clone()
    dist.all_reduce(out)
    return out
