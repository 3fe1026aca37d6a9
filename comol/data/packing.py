"""Padding-free packing: several rows per sequence, each row attending only to itself.

A *pack* is one training micro-batch, cut once per run from the seeded global order
(comol/training/sampler.py):

* for the flat layout, consecutive rows taken greedily while their real tokens stay within a token
  budget (``pack_rows``);
* for the bins layout, budget // width bins, each started with the oldest row not yet taken and topped up
  with the subset of the next ``FILL_WINDOW`` rows that fills it closest to ``width`` tokens (``pack_bins``):
  rows move by at most a few positions of the order, and the bins come out almost exactly full.

``collate_packed`` lays a pack out as

* ``layout="flat"``: one sequence [1, N] holding every row back to back, no padding at all (for
  flash-attention / flex-attention, whose kernels skip the blocks between rows), or
* ``layout="bins"``: rows placed into bins of at most ``width`` tokens (the datamodule gives
  2 x ``dataset.max_length``): cut in pack order where a row would overflow the bin (which recovers
  ``pack_bins``' bins) or first-fit-decreasing, whichever computes the fewest tokens (``balanced_bins``), a tensor [bins, fullest bin] with a short padding tail per bin (for SDPA / eager, whose cost grows with
  the square of the sequence length, so one long sequence would cost more than the padding it saves).

In both, ``position_ids`` restart at 0 for every row and no ``attention_mask`` is passed: transformers
(``masking_utils.find_packed_sequence_indices``) then starts a new sequence wherever a position does not
follow its predecessor by 1 and builds the block-diagonal causal mask. The padding tail of a bin gets
positions 0, 1, ... of its own: a separate pseudo-row that no real token attends to. Labels never cross
a row boundary: the first label of every row is IGNORE_INDEX (in a flat sequence the previous row's last
token would otherwise be trained to predict it), and the tail's labels are IGNORE_INDEX.

The tail is padding, which the adapters must leave out of routing statistics and auxiliary losses: the
batch then carries ``comol_token_mask`` [bins, width] (True = real token), which the adapter context
takes off the model call's keyword arguments (comol/adapters/context.py) before the model sees them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from comol.adapters.context import TOKEN_MASK_KWARG
from comol.errors import ConfigError

IGNORE_INDEX = -100
#: the packed batch's real-token mask; popped by the adapter context before the model's forward
TOKEN_MASK_KEY = TOKEN_MASK_KWARG
LAYOUTS = ("flat", "bins")
#: attention implementations whose kernels handle one long packed sequence without quadratic waste
FLAT_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def layout_for(attn_implementation: str | None) -> str:
    """``flat`` for flash / flex attention, ``bins`` otherwise (sdpa, eager)."""
    return "flat" if attn_implementation in FLAT_ATTENTION else "bins"


def check_packable(model) -> None:
    """Refuse adapters that pool over a whole sequence (instance-level routers) or attend to per-sequence
    prompt vectors: in a packed sequence they would mix rows."""
    for name, module in model.named_modules():
        if getattr(module, "level", None) == "instance" or name.endswith("adapter_prompt"):
            raise ConfigError(f"dataset.packing=true is invalid with this adapter: {name} works on whole sequences "
                              f"(instance-level routing / prompt vectors), which packing would mix; use "
                              f"dataset.packing=false")


def pack_rows(lengths: Sequence[int], order: Sequence[int], budget: int) -> list[tuple[int, ...]]:
    """Cut ``order`` (row indices) into packs: consecutive rows whose token count sums to at most ``budget``.

    Greedy and deterministic: a row that does not fit closes the current pack and opens the next, so
    the packs, read one after another, are ``order`` itself. A row longer than the budget gets a pack
    of its own (it cannot happen when budget >= max_length, which the datamodule checks)."""
    packs: list[tuple[int, ...]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if current and used + n > budget:
            packs.append(tuple(current))
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        packs.append(tuple(current))
    return packs


#: rows of the global order ``pack_bins`` looks ahead to fill a bin
FILL_WINDOW = 16


def fill_room(lengths: Sequence[int], room: int) -> list[int]:
    """Positions of the subset of ``lengths`` with the largest sum <= ``room`` (subset-sum over a bitset of
    reachable sums); among equal sums, the one that leaves out the latest rows."""
    full = (1 << (room + 1)) - 1
    reach = [1]                       # reach[k]: bit s set when some subset of the first k rows sums to s
    for n in lengths:
        reach.append((reach[-1] | (reach[-1] << int(n))) & full)
    total = reach[-1].bit_length() - 1
    chosen = []
    for k in range(len(lengths), 0, -1):   # walk back: row k-1 is needed when the first k-1 cannot reach total
        if not (reach[k - 1] >> total) & 1:
            chosen.append(k - 1)
            total -= int(lengths[k - 1])
    return chosen[::-1]


def pack_bins(lengths: Sequence[int], order: Sequence[int], budget: int, width: int,
              window: int = FILL_WINDOW) -> list[tuple[int, ...]]:
    """Cut ``order`` into packs of ``budget // width`` bins of at most ``width`` tokens (one bin of ``budget``
    tokens when the budget is smaller), for the bins layout.

    Each bin starts with the oldest row not yet taken (no row waits longer than the bins before it) and is
    topped up with the subset of the next ``window - 1`` rows that comes closest to ``width`` (``fill_room``).
    A pack lists its rows bin by bin, each bin in order, so cutting it where a row would overflow ``width``
    gives these bins back (or fewer). Deterministic; every row of ``order`` lands in exactly one pack."""
    per_pack, cap = max(1, budget // width), min(width, budget)
    order = [int(i) for i in order]
    taken = [False] * len(order)          # by position in ``order``: linear time, no list shifting
    head = 0                              # the oldest position not yet taken
    packs: list[tuple[int, ...]] = []
    while head < len(order):
        rows: list[int] = []
        for _ in range(per_pack):
            while head < len(order) and taken[head]:
                head += 1
            if head == len(order):
                break
            taken[head] = True
            ahead, p = [], head + 1
            while len(ahead) < window - 1 and p < len(order):
                if not taken[p]:
                    ahead.append(p)
                p += 1
            picked = fill_room([lengths[order[q]] for q in ahead], max(0, cap - int(lengths[order[head]])))
            rows += [order[head], *(order[ahead[k]] for k in picked)]
            for k in picked:
                taken[ahead[k]] = True
        if rows:
            packs.append(tuple(rows))
    return packs


def next_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Positions of ``lengths`` cut in order into bins: a new bin wherever the next row would overflow
    ``width`` (the fewest bins among cuts that keep the order)."""
    bins: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not bins or used + n > width:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def first_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Positions of ``lengths`` grouped into bins of at most ``width`` tokens (longest rows first, each
    into the first bin with room; ties keep the given order). Within a bin the rows keep their order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max(width, n) - n)
    return [sorted(b) for b in bins]


def balanced_bins(lengths: Sequence[int], max_width: int) -> list[list[int]]:
    """Bins for one pack with the fewest computed tokens (bins x fullest bin): the pack cut in order at
    ``max_width`` tokens (``next_fit``: the bins ``pack_bins`` made), and first-fit-decreasing into bins of
    ``max_width`` tokens (or the longest row, if longer) and of max(longest row, ceil(total / k)) tokens for
    every bin count k those allow; the best wins (ties: more bins, i.e. shorter sequences)."""
    total, longest = sum(lengths), max(lengths)
    cap = max(int(max_width), longest)
    widths = sorted({cap} | {max(longest, -(-total // k)) for k in range(-(-total // cap), len(lengths) + 1)},
                    reverse=True)
    best: tuple[int, int] | None = None
    best_bins: list[list[int]] = []
    candidates = [next_fit(lengths, cap)] + [first_fit_decreasing(lengths, width) for width in widths]
    for bins in candidates:
        computed = len(bins) * max(sum(lengths[i] for i in b) for b in bins)
        if best is None or (computed, -len(bins)) < best:
            best, best_bins = (computed, -len(bins)), bins
    return best_bins


def collate_packed(features: list[dict], pad_id: int, layout: str = "bins", width: int | None = None) -> dict:
    """One packed micro-batch from ``features`` (dicts with ``input_ids`` and ``labels``); see module docstring."""
    if layout not in LAYOUTS:
        raise ConfigError(f"packing layout={layout!r} is invalid: expected one of {LAYOUTS}")
    lengths = [len(f["input_ids"]) for f in features]
    if layout == "flat":
        bins = [list(range(len(features)))]
    else:
        if not width:
            raise ConfigError("packing layout='bins' needs a bin width (dataset.max_length)")
        bins = balanced_bins(lengths, width)
    seq = max(sum(lengths[i] for i in b) for b in bins)
    ids = torch.full((len(bins), seq), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), seq), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(bins), seq), dtype=torch.long)
    real = torch.zeros((len(bins), seq), dtype=torch.bool)
    for b, rows in enumerate(bins):
        at = 0
        for i in rows:
            f, n = features[i], lengths[i]
            ids[b, at:at + n] = torch.tensor(f["input_ids"], dtype=torch.long)
            lab = torch.tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
            lab[0] = IGNORE_INDEX   # nothing of this row precedes its first token
            labels[b, at:at + n] = lab
            pos[b, at:at + n] = torch.arange(n)
            real[b, at:at + n] = True
            at += n
        pos[b, at:] = torch.arange(seq - at)   # the tail: a pseudo-row of its own
    out = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not bool(real.all()):
        out[TOKEN_MASK_KEY] = real
    return out


def real_tokens(batch: dict) -> torch.Tensor:
    """Real (non-padding) tokens of a padded or packed batch, as a tensor on the batch's device (no sync)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    if TOKEN_MASK_KEY in batch:
        return batch[TOKEN_MASK_KEY].sum()
    ids = batch["input_ids"]
    return torch.tensor(ids.numel(), device=ids.device)


def padding_ratio(lengths: Sequence[int], batches: Sequence[Sequence[int]], layout: str | None = None,
                  width: int | None = None) -> float:
    """Computed / real tokens of ``batches`` (lists of row indices): left-padded to the longest row
    (``layout=None``), or packed (``"flat"``: 1.0; ``"bins"``: bins x longest bin)."""
    real = computed = 0
    for batch in batches:
        ls = [int(lengths[i]) for i in batch]
        real += sum(ls)
        if layout is None:
            computed += len(ls) * max(ls)
        elif layout == "flat":
            computed += sum(ls)
        else:
            bins = balanced_bins(ls, int(width))
            computed += len(bins) * max(sum(ls[i] for i in b) for b in bins)
    return computed / max(real, 1)
