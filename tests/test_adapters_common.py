"""One tester for every adapter: each case of tests/cases_*.py goes through the same checks."""

from __future__ import annotations

import importlib
import pathlib

import pytest
import torch

from adapter_cases import AdapterCase, randomize_adapter_
from conftest import fresh_micro_model, micro_model_cfg

from comol.adapters import (
    AdapterLinear,
    count_parameters,
    inject_adapter,
    is_adapter_name,
    load_adapter,
    save_adapter,
)
from comol.data import collate_left, encode_example, generate_toy_math


def _all_cases() -> list[AdapterCase]:
    cases = []
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        cases += importlib.import_module(path.stem).CASES
    return cases


CASES = _all_cases()
LINEAR_CASES = [c for c in CASES if c.naive is not None]
FAMILY_CASES = [pytest.param(c, fam, id=f"{c.id}-{fam}") for c in CASES for fam in c.families]

fresh_model = fresh_micro_model


def batch_for(tok, n=4):
    rows = generate_toy_math(n, seed=3)
    return collate_left([encode_example(r, tok, 64) for r in rows], tok.pad_token_id)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def adapted_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c.id for c in LINEAR_CASES])
@pytest.mark.parametrize("target", ["q_proj", "k_proj", "down_proj"])
def test_forward_and_gradients_match_naive_formula(case: AdapterCase, target: str):
    model, _ = fresh_model("qwen3")
    inject_adapter(model, {**case.adapter, "target_modules": [target]})
    randomize_adapter_(model)
    model.eval()
    name, mod = next(iter(adapted_linears(model).items()))
    x = torch.randn(7, mod.in_features, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    w = torch.randn(7, mod.out_features)

    got = mod(x) - mod.base_layer(x)
    want = case.naive(mod, x2)
    torch.testing.assert_close(got, want, atol=case.atol, rtol=case.rtol)

    params = [p for n, p in mod.named_parameters() if p.requires_grad]
    params += [p for n, p in model.named_parameters() if p.requires_grad and "adapter_shared" in n]
    g_got = torch.autograd.grad((got * w).sum(), [x, *params], allow_unused=True)
    g_want = torch.autograd.grad((want * w).sum(), [x2, *params], allow_unused=True)
    for a, b in zip(g_got, g_want):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=case.atol * 10, rtol=case.rtol * 10)


@pytest.mark.parametrize("case,family", FAMILY_CASES)
def test_noop_at_init_and_only_adapter_trainable(case: AdapterCase, family: str):
    model, tok = fresh_model(family)
    batch = batch_for(tok)
    before = logits(model, batch)
    inject_adapter(model, case.adapter)
    model.eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_name(n) for n in trainable)
    frozen_adapter = [n for n, p in model.named_parameters() if not p.requires_grad and is_adapter_name(n)]
    assert all(any(s in n for s in case.frozen_by_design) for n in frozen_adapter), frozen_adapter
    torch.testing.assert_close(logits(model, batch), before, atol=case.noop_atol, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c.count or c.count_model], ids=lambda c: c.id)
def test_trainable_count_matches_formula(case: AdapterCase):
    model, _ = fresh_model("qwen3")
    base_total = count_parameters(model)[1]
    inject_adapter(model, case.adapter)
    trainable, total = count_parameters(model)
    if case.count_model is not None:
        expected = case.count_model(model)
    else:
        expected = sum(case.count(m.in_features, m.out_features) for m in adapted_linears(model).values())
    assert trainable == expected
    frozen_extra = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and is_adapter_name(n))
    assert total == base_total + trainable + frozen_extra


@pytest.mark.parametrize("case,family", FAMILY_CASES)
def test_save_load_round_trip_is_exact(case: AdapterCase, family: str, tmp_path):
    model, tok = fresh_model(family)
    inject_adapter(model, case.adapter)
    randomize_adapter_(model, scale=0.2)
    model.eval()
    batch = batch_for(tok)
    want = logits(model, batch)
    save_adapter(model, tmp_path / "adapter", base_model=micro_model_cfg(family))
    fresh, _ = fresh_model(family)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    assert torch.equal(logits(fresh, batch), want)
    assert not any(p.requires_grad for p in fresh.parameters())


@pytest.mark.parametrize("case,family", FAMILY_CASES)
def test_training_steps_reduce_loss_and_reach_every_tensor(case: AdapterCase, family: str):
    model, tok = fresh_model(family)
    inject_adapter(model, case.adapter)
    model.train()
    batch = batch_for(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    losses = []  # nothing wired: out.loss holds the aux term, per-step state updates after opt.step() by itself
    for step in range(6):
        out = model(**batch)
        loss = out.loss
        opt.zero_grad()
        loss.backward()
        if step == 1:  # after one optimizer step (B starts at zero, so A gets no gradient at step 0)
            missing = [n for n, p in model.named_parameters()
                       if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
            assert not missing, f"no gradient reached {missing}"
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0]
