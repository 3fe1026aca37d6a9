"""Padding-free packing: a packed batch trains exactly what the same rows padded train (per-row logits,
the token-weighted loss, aux losses, routing statistics, adapter gradients), with either layout; packs,
samplers and resume keep one seeded global order."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import fresh_micro_model
from comol.adapters import adapter_context, inject_adapter
from comol.data import collate_left, encode_example, generate_toy_math
from comol.data.datamodule import SFTDataModule, check_batching
from comol.data.packing import (IGNORE_INDEX, TOKEN_MASK_KEY, collate_packed, fill_room, first_fit_decreasing, next_fit,
                                pack_bins, pack_rows,
                                padding_ratio)
from comol.errors import ConfigError
from comol.models.lit_module import AdapterLM
from comol.training.sampler import LengthGroupedSampler, PackedSampler, ResumableSampler

ADAPTERS = {
    "lora": {"name": "lora", "r": 4, "dropout": 0.0},
    "comol": {"name": "comol", "r": 4, "num_experts": 4, "dropout": 0.0},
    "mola": {"name": "mola", "r": 4, "num_experts": 4, "top_k": 2, "dropout": 0.0, "aux_loss_coeff": 0.5},
    "flylora": {"name": "flylora", "r": 8, "top_k": 2, "dropout": 0.0},
}


def features(tok, n=6, seed=3, max_length=64):
    """Rows of different lengths: half of them cut short, so long + short rows share bins."""
    rows = generate_toy_math(n, seed=seed)
    feats = [encode_example(r, tok, max_length if i % 2 else max_length // 3) for i, r in enumerate(rows)]
    assert len({len(f["input_ids"]) for f in feats}) > 1   # rows of different lengths: padding to remove
    return feats


def adapted(adapter: dict, family: str):
    model, tok = fresh_micro_model(family)
    inject_adapter(model, adapter)
    with torch.no_grad():  # non-zero B so every adapter path matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.train(), tok


def run(model, batch, coeff: float):
    """One forward + backward through the LightningModule's forward; what a training step sees."""
    model = copy.deepcopy(model)
    ctx = adapter_context(model)
    lit = AdapterLM(model, {"lr": 1e-2})
    with ctx.routing.collecting() as routing:
        out = lit(batch)
        aux = ctx.aux_loss()
        stats = routing.summary()
    loss = out.loss   # the model's objective: LM loss + aux_loss_coeff x aux (comol/adapters/context.py)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    counts = {n: m.adapter_step_counts.clone() for n, m in model.named_modules()
              if getattr(m, "adapter_step_counts", None) is not None}
    return out, aux, stats, grads, counts


def row_logits_padded(out, batch, i):
    n = int(batch["attention_mask"][i].sum())
    return out.logits[i, -n:]


def row_logits_packed(out, batch, feats, i):
    """Locate row i in a packed batch by its tokens' positions (each row starts at position 0)."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    mask = batch.get(TOKEN_MASK_KEY, torch.ones_like(ids, dtype=torch.bool))
    target = torch.tensor(feats[i]["input_ids"])
    n = len(target)
    for b in range(ids.shape[0]):
        for s in (pos[b] == 0).nonzero().flatten().tolist():
            if s + n <= ids.shape[1] and mask[b, s:s + n].all() and torch.equal(ids[b, s:s + n], target) \
                    and torch.equal(pos[b, s:s + n], torch.arange(n)):
                return out.logits[b, s:s + n]
    raise AssertionError(f"row {i} not found in the packed batch")


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize("layout", ["bins", "flat"])
def test_packed_batch_trains_what_the_padded_batch_trains(family, name, layout):
    adapter = ADAPTERS[name]
    model, tok = adapted(adapter, family)
    feats = features(tok)
    padded = collate_left(feats, tok.pad_token_id)
    width = 2 * max(len(f["input_ids"]) for f in feats) + 3   # bins of two rows, with tails
    packed = collate_packed(feats, tok.pad_token_id, layout=layout, width=width)
    assert packed["input_ids"].shape[0] < len(feats)   # rows really share sequences
    if layout == "bins":
        assert TOKEN_MASK_KEY in packed   # a padding tail the adapters must leave out
    coeff = adapter.get("aux_loss_coeff", 0.0)
    out_p, aux_p, stats_p, grads_p, counts_p = run(model, padded, coeff)
    out_k, aux_k, stats_k, grads_k, counts_k = run(model, packed, coeff)

    for i in range(len(feats)):
        torch.testing.assert_close(row_logits_packed(out_k, packed, feats, i), row_logits_padded(out_p, padded, i),
                                   atol=2e-5, rtol=1e-4)
    # the loss: mean over every label token of the batch (each row's first token excluded), computed naively
    terms = []
    for i, f in enumerate(feats):
        logp = torch.log_softmax(row_logits_padded(out_p, padded, i).double(), -1)
        terms += [-logp[t - 1, f["labels"][t]] for t in range(1, len(f["labels"])) if f["labels"][t] != IGNORE_INDEX]
    naive = torch.stack(terms).mean()
    torch.testing.assert_close(out_p.lm_loss.double(), naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k.lm_loss.double(), naive, atol=1e-5, rtol=1e-5)
    if coeff:
        assert aux_p is not None
        torch.testing.assert_close(aux_k, aux_p, atol=1e-6, rtol=1e-5)
    assert stats_k.keys() == stats_p.keys()
    for key in stats_p:
        assert stats_k[key] == pytest.approx(stats_p[key], rel=1e-4, abs=1e-6), key
    assert counts_k.keys() == counts_p.keys()
    for key in counts_p:   # FlyLoRA's per-step selection counts: real tokens only
        assert torch.equal(counts_k[key], counts_p[key]), key
    assert grads_k.keys() == grads_p.keys() and grads_p
    for key in grads_p:
        torch.testing.assert_close(grads_k[key], grads_p[key], atol=1e-6, rtol=1e-4)


def test_padding_tail_without_the_mask_would_count():
    """The check above can fail: without the token mask the tail's tokens enter the routing statistics."""
    model, tok = adapted(ADAPTERS["mola"], "qwen3")
    feats = features(tok)
    packed = collate_packed(feats, tok.pad_token_id, layout="bins", width=2 * max(len(f["input_ids"]) for f in feats) + 3)
    unmasked = {k: v for k, v in packed.items() if k != TOKEN_MASK_KEY}
    _, aux_a, _, _, _ = run(model, packed, 0.5)
    _, aux_b, _, _, _ = run(model, unmasked, 0.5)
    assert not torch.allclose(aux_a, aux_b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "comol", "mola", "flylora"])
def test_packed_equals_padded_on_smollm2(smollm2, name):
    base, tok = smollm2
    model = copy.deepcopy(base).train()
    inject_adapter(model, ADAPTERS[name])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    feats = features(tok, n=4, max_length=96)
    padded = collate_left(feats, tok.pad_token_id)
    packed = collate_packed(feats, tok.pad_token_id, layout="bins", width=2 * max(len(f["input_ids"]) for f in feats) + 5)
    coeff = ADAPTERS[name].get("aux_loss_coeff", 0.0)
    out_p, aux_p, _, grads_p, _ = run(model, padded, coeff)
    out_k, aux_k, _, grads_k, _ = run(model, packed, coeff)
    for i in range(len(feats)):
        torch.testing.assert_close(row_logits_packed(out_k, packed, feats, i), row_logits_padded(out_p, padded, i),
                                   atol=5e-4, rtol=1e-3)
    torch.testing.assert_close(out_k.loss, out_p.loss, atol=1e-5, rtol=1e-5)
    if coeff:
        torch.testing.assert_close(aux_k, aux_p, atol=1e-6, rtol=1e-5)
    for key in grads_p:
        torch.testing.assert_close(grads_k[key], grads_p[key], atol=1e-5, rtol=1e-3)


# -- the pieces ----------------------------------------------------------------------------------------

def test_collate_packed_layout():
    feats = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]},
             {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}]
    flat = collate_packed(feats, pad_id=0, layout="flat")
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert flat["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 7, 8, 9]]
    assert TOKEN_MASK_KEY not in flat and "attention_mask" not in flat
    bins = collate_packed(feats, pad_id=0, layout="bins", width=5)   # cut in order: [1 2 3 | 4 5], [6 7 8 9 | tail]
    assert bins["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert bins["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert bins["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]
    assert bins[TOKEN_MASK_KEY].tolist() == [[True] * 5, [True] * 4 + [False]]
    # out of order, the cut needs three bins of 5; first-fit-decreasing two: [6 7 8 9 | tail], [1 2 3 | 4 5]
    bins = collate_packed([feats[0], feats[2], feats[1]], pad_id=0, layout="bins", width=5)
    assert bins["input_ids"].tolist() == [[6, 7, 8, 9, 0], [1, 2, 3, 4, 5]]


def test_pack_rows_is_greedy_in_order_and_ffd_fills_bins():
    lengths = [5, 3, 4, 6, 2, 7]
    assert pack_rows(lengths, [0, 1, 2, 3, 4, 5], budget=10) == [(0, 1), (2, 3), (4, 5)]
    assert pack_rows(lengths, [5, 4, 3, 2, 1, 0], budget=12) == [(5, 4), (3, 2), (1, 0)]
    assert [i for p in pack_rows(lengths, [3, 0, 5, 1, 4, 2], 9) for i in p] == [3, 0, 5, 1, 4, 2]
    assert first_fit_decreasing([5, 3, 4, 6, 2], width=8) == [[3, 4], [0, 1], [2]]
    # padded to the longest row: 2 rows of 6 for 5 + 3 tokens, ...
    assert padding_ratio(lengths, [(0, 1)]) == pytest.approx(10 / 8)
    assert padding_ratio(lengths, [(0, 1)], layout="flat") == 1.0
    # bins: 5 | 3 + 2 in two bins of 5 (balanced), not 5 + 3 | 2 in two bins of 8
    assert padding_ratio(lengths, [(0, 1, 4)], layout="bins", width=8) == 1.0
    assert padding_ratio(lengths, [(0, 1, 3)], layout="bins", width=8) == pytest.approx(16 / 14)


def test_fill_room_finds_the_best_subset_sum_like_a_brute_force_search():
    """The bitset subset-sum against every subset (naive), on hand-made and random rows."""
    import itertools
    import random

    assert fill_room([5, 3, 4, 6, 2], 9) == [0, 2]          # 5 + 4 = 9 (earliest rows preferred over 3 + 6)
    assert fill_room([7, 8], 6) == [] and fill_room([], 10) == []
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(0, 9))]
        room = rng.randint(0, 100)
        picked = fill_room(lengths, room)
        best = max((sum(c) for k in range(len(lengths) + 1) for c in itertools.combinations(lengths, k)
                    if sum(c) <= room), default=0)
        assert picked == sorted(set(picked)) and sum(lengths[i] for i in picked) == best


def test_pack_bins_fills_bins_in_order_and_keeps_every_row_once():
    lengths = [5, 3, 4, 6, 2, 7, 1, 8]
    # two bins of 10 per pack: [0: 5 + 3 + 2] [2: 4 + 6] | [5: 7 + 1] [7: 8]  (each bin starts with the oldest row)
    assert pack_bins(lengths, range(8), budget=20, width=10) == [(0, 1, 4, 2, 3), (5, 6, 7)]
    assert next_fit([lengths[i] for i in (0, 1, 4, 2, 3)], 10) == [[0, 1, 2], [3, 4]]   # collate gets them back
    # budget < width: one bin of 6 tokens per pack; a row longer than the bin gets one of its own
    assert pack_bins(lengths, range(8), budget=6, width=10) == [(0, 6), (1, 4), (2,), (3,), (5,), (7,)]
    import random

    rng = random.Random(1)
    lengths = [rng.randint(20, 300) for _ in range(500)]
    order = list(range(500))
    rng.shuffle(order)
    packs = pack_bins(lengths, order, budget=16 * 300, width=600)
    flat = [i for p in packs for i in p]
    assert sorted(flat) == sorted(order)                                   # every row exactly once
    placed: set[int] = set()
    for p in packs:
        bins = next_fit([lengths[i] for i in p], 600)
        assert len(bins) <= 8 and sum(lengths[i] for i in p) <= 16 * 300
        for b in bins:          # no row waits: every bin starts with the oldest row not yet placed
            rows = [p[k] for k in b]
            waiting = [r for r in order if r not in placed]
            assert rows[0] == waiting[0] and set(rows[1:]) <= set(waiting[1:16])   # the rest: the next 15 waiting
            placed.update(rows)
    greedy = pack_rows(lengths, order, 16 * 300)
    assert padding_ratio(lengths, packs, layout="bins", width=600) < 1.02 < \
        padding_ratio(lengths, greedy, layout="bins", width=600)


def test_samplers_share_one_global_order_and_resume():
    seq = ResumableSampler(list(range(10)), seed=4)
    torch_order = list(torch.utils.data.DistributedSampler(list(range(10)), num_replicas=1, rank=0, seed=4))
    assert list(seq) == torch_order   # bitwise the order of the runs before this sampler existed
    ranks = [ResumableSampler(list(range(10)), seed=4, num_replicas=2, rank=r) for r in range(2)]
    assert [x for pair in zip(*map(list, ranks)) for x in pair] == torch_order
    lengths = [3, 9, 1, 7, 5, 8, 2, 6, 4, 10]
    grouped = LengthGroupedSampler(lengths, seed=4, group=5)
    order = list(grouped)
    assert sorted(order) == list(range(10)) and set(order[:5]) == set(torch_order[:5])
    assert [lengths[i] for i in order[:5]] == sorted((lengths[i] for i in order[:5]), reverse=True)
    packs = pack_rows(lengths, torch_order, budget=12)
    sampler = PackedSampler(packs, seed=4)
    sampler.set_epoch(1)
    whole = list(sampler)
    assert sorted(whole) == sorted(packs) and len(sampler) == len(packs)
    sampler.skip_next(1, 2)
    assert list(sampler) == whole[2:] and list(sampler) == whole   # the skip applies once
    two = [PackedSampler(packs, seed=4, num_replicas=2, rank=r) for r in range(2)]
    for s in two:
        s.set_epoch(1)
    assert [p for pair in zip(*map(list, two)) for p in pair][:len(whole)] == whole


def test_batching_keys_are_checked():
    base = {"max_length": 64, "batch_size": 4}
    check_batching({**base, "packing": True, "packing_tokens": 64})
    with pytest.raises(ConfigError, match=r"dataset.packing_tokens=10 is invalid: .*>= dataset.max_length=64"):
        check_batching({**base, "packing": True, "packing_tokens": 10})
    with pytest.raises(ConfigError, match=r"dataset.group_by_length=true is invalid with dataset.packing=true"):
        check_batching({**base, "packing": True, "group_by_length": True})
    with pytest.raises(ConfigError, match=r"dataset.packing='yes' is invalid: expected true or false"):
        check_batching({**base, "packing": "yes"})


def test_datamodule_packs_within_the_budget():
    _, tok = fresh_micro_model("qwen3")
    cfg = {"name": "toy", "source": "toy_math", "train_size": 40, "val_size": 4, "max_length": 64,
           "train_on_prompt": True, "batch_size": 4, "packing": True, "packing_tokens": 128}
    dm = SFTDataModule(cfg, tok, seed=2, attn_implementation="sdpa")
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    rows = sum(len(p) for p in dm.packs())
    assert rows == len(dm.train_features) and len(batches) == len(dm.packs())
    real = 0
    for b in batches:
        mask = b.get(TOKEN_MASK_KEY, torch.ones_like(b["input_ids"], dtype=torch.bool))
        assert int(mask.sum()) <= 128 and b["input_ids"].shape[1] <= 2 * 64
        real += int(mask.sum())
    assert real == sum(len(f["input_ids"]) for f in dm.train_features)   # every row once per epoch


@pytest.mark.parametrize("preset", ["softmoa_instance", "prompt"])
def test_packing_refuses_adapters_that_work_on_whole_sequences(preset):
    from comol.data.packing import check_packable

    model, _ = fresh_micro_model("qwen3")
    inject_adapter(model, {"name": preset.split("_")[0] if preset == "prompt" else "softmoa",
                           **({"router_level": "instance"} if preset != "prompt" else {})})
    with pytest.raises(ConfigError, match=r"dataset.packing=true is invalid with this adapter: .*use dataset.packing=false"):
        check_packable(model)
    lora, _ = fresh_micro_model("qwen3")
    inject_adapter(lora, {"name": "lora"})
    check_packable(lora)


@pytest.mark.slow
def test_sigterm_then_resume_with_packing_equals_uninterrupted_run(tmp_path):
    """As tests/test_resume.py, with packed batches: the resumed run skips the packs already trained on."""
    import signal

    from test_resume import adapter_tensors, cfg_for, csv_rows, interrupt_when_checkpointed, losses
    from comol.pipeline import run as run_job
    from comol.training.checkpointing import RunInterrupted, checkpoint_path

    packed = ["logger=csv", "dataset.packing=true", "dataset.packing_tokens=256"]
    whole = tmp_path / "whole"
    run_job(cfg_for(whole, *packed))
    out = tmp_path / "cut"
    interrupt_when_checkpointed(out, signal.SIGTERM)
    with pytest.raises(RunInterrupted):
        run_job(cfg_for(out, *packed))
    stopped = torch.load(checkpoint_path(out), weights_only=False)["global_step"]
    assert 4 <= stopped < 12
    results = run_job(cfg_for(out, *packed, "resume=true"))
    assert results["train/steps"] == 12 and results["train/resumed_from_step"] == stopped
    a, b = adapter_tensors(whole), adapter_tensors(out)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name   # bitwise
    assert losses(csv_rows(out)) == losses(csv_rows(whole))
