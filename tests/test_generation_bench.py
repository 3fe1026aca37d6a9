"""The evaluation generation bench (python -m comol.tools.bench --generate) and what it relies on in
comol.eval.generate: batch size, length sorting and the KV cache do not change greedy outputs (fp32, CPU),
the token counts and prompt padding it reports match a naive recount. No timings are asserted."""

from __future__ import annotations

import copy

import pytest
import torch

from comol.adapters import inject_adapter
from comol.config import adapter_preset
from comol.errors import ConfigError
from comol.eval.generate import GenerationStats, count_new_tokens, decoding_config, generate_responses
from comol.models import load_backbone
from comol.tools import bench, generation_bench
from comol.tools.generation_bench import (GREEDY, eval_task_and_set, make_variants, measure_generation,
                                          prompt_padding, set_prompts)
from conftest import micro_model_cfg

_MODELS: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Micro matmuls: one thread, much faster than two on the busy shared CPU (nothing here is timed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapted_micro(family: str = "qwen3"):
    """A micro backbone (context 1024: the gsm8k prompts are up to ~500 offline-tokenizer tokens) with a CoMoL
    adapter whose weights are perturbed, so that the adapter changes the outputs (at init it adds zero)."""
    if family not in _MODELS:
        model, tok = load_backbone(micro_model_cfg(family, max_position_embeddings=1024))
        inject_adapter(model, {"name": "comol", **adapter_preset("comol")})
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        _MODELS[family] = (model.eval(), tok)
    return _MODELS[family]


@pytest.fixture(scope="module")
def gsm8k_prompts():
    task, set_name = eval_task_and_set("math/gsm8k")
    return set_prompts(task, set_name, 12)


def test_prompts_are_the_eval_tasks_prompts(gsm8k_prompts):
    task, set_name = eval_task_and_set("math/gsm8k")
    rows = task.read_set(set_name, task.set_path("gsm8k.json"))
    assert gsm8k_prompts == [task.prompt(r) for r in rows[:12]]
    assert "### Instruction:" in gsm8k_prompts[0] and rows[0]["instruction"] in gsm8k_prompts[0]


@pytest.mark.parametrize("spec,match", [("gsm8k", "expected <eval config>/<set>"),
                                        ("math/nosuchset", "has no set 'nosuchset'")])
def test_bad_set_is_one_line_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        eval_task_and_set(spec)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_batching_sorting_and_static_cache_keep_greedy_texts(family, gsm8k_prompts):
    """Exactly equal in fp32 on the CPU: batch sizes 1..12, file order vs sorted, static vs dynamic cache."""
    model, tok = adapted_micro(family)
    variants = make_variants([1, 3, 5, 12], default_batch=5)
    rows = measure_generation(model, tok, gsm8k_prompts, variants, max_new_tokens=10, rounds=1)
    assert [r["error"] for r in rows] == [None] * len(variants)
    ref = rows[0]["texts"]
    assert len(set(ref)) >= len(ref) // 2, ref        # diverse outputs: the equality below means something
    for r in rows[1:]:
        assert r["texts"] == ref, r["variant"].label
    # and the adapter matters: the same backbone without it answers differently
    bare, _ = load_backbone(micro_model_cfg(family, max_position_embeddings=1024))
    assert [o[0] for o in generate_responses(bare, tok, gsm8k_prompts, 10, GREEDY, batch_size=5)] != ref


def test_variants_of_the_default():
    labels = [(v.label, v.batch_size, v.sort_by_length, v.cache_implementation) for v in make_variants([1, 16, 32], 16)]
    assert labels == [("batch 16", 16, True, None), ("batch 1", 1, True, None), ("batch 32", 32, True, None),
                      ("batch 16 unsorted", 16, False, None), ("batch 16 static", 16, True, "static")]
    assert [v.label for v in make_variants([8], 16, static=False)] == ["batch 16", "batch 8", "batch 16 unsorted"]


def _naive_new_tokens(new: torch.Tensor, eos: set[int]) -> int:
    total = 0
    for row in new.tolist():
        n = 0
        for t in row:
            n += 1
            if t in eos:
                break
        total += n
    return total


@pytest.mark.parametrize("eos", [0, [0, 3], None])
def test_count_new_tokens_matches_a_naive_count(eos):
    g = torch.Generator().manual_seed(0)
    new = torch.randint(0, 6, (7, 9), generator=g)
    new[2] = 5           # a row without EOS
    new[4, 0] = 0        # EOS first
    eos_set = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    expected = new.numel() if eos is None else _naive_new_tokens(new, eos_set)
    assert count_new_tokens(new, eos) == expected


def test_stats_count_the_batches_generate_builds(gsm8k_prompts):
    """Prompt padding of generate_responses' batches (sorted and file order) against the tokenizer-only
    recount of the bench; the new-token count against a naive recount of the returned token ids."""
    model, tok = adapted_micro()
    for sort in (True, False):
        stats = GenerationStats()
        generate_responses(model, tok, gsm8k_prompts, 6, GREEDY, batch_size=5, sort_by_length=sort, stats=stats)
        lengths = [len(ids) for ids in tok(gsm8k_prompts)["input_ids"]]
        assert stats.prompts == 12 and stats.batches == 3 and stats.prompt_tokens == sum(lengths)
        assert stats.prompt_padding_ratio == pytest.approx(prompt_padding(tok, gsm8k_prompts, 5, sort))
        assert stats.new_tokens == 12 * 6            # the random model never emits EOS within 6 tokens
    # sorting pays: the 12 prompts in file order pad more than sorted
    assert prompt_padding(tok, gsm8k_prompts, 5, False) > prompt_padding(tok, gsm8k_prompts, 5, True) >= 1.0
    assert prompt_padding(tok, gsm8k_prompts, 1, False) == 1.0


def test_new_tokens_stop_at_eos(gsm8k_prompts):
    """A model steered to emit EOS: the count of a batched call stops at each row's first EOS, as a naive
    count over one-prompt ``model.generate`` calls (no padding) does."""
    model, tok = adapted_micro()
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.eos_token_id] *= 3.0     # EOS likely for some rows, not all
    stats = GenerationStats()
    generate_responses(model, tok, gsm8k_prompts, 8, GREEDY, batch_size=4, stats=stats)
    expected, ended = 0, 0
    cfg = decoding_config(GREEDY, 8, tok)
    for p in gsm8k_prompts:
        enc = tok([p], return_tensors="pt")
        new = model.generate(**enc, generation_config=cfg)[0, enc["input_ids"].shape[1]:].tolist()
        n = next((i + 1 for i, t in enumerate(new) if t == tok.eos_token_id), len(new))
        expected += n
        ended += n < 8
    assert 0 < ended < len(gsm8k_prompts), ended                     # both kinds of rows occur
    assert stats.new_tokens == expected


def test_bench_cli_end_to_end(monkeypatch, capsys):
    monkeypatch.setattr(generation_bench, "load_model", lambda name: (load_backbone(
        micro_model_cfg("qwen3", max_position_embeddings=1024))))
    assert bench.main(["--generate", "--model", "micro", "--prompts", "6", "--max-new-tokens", "4", "--rounds", "2",
                       "--batch-sizes", "1,4,16", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "round 2/2 batch 16 static: " in captured.err and "24 new tokens" in captured.err
    assert ("generation: micro + comol adapter, 6 prompts of math/gsm8k (eval=math prompt), greedy, "
            "max_new_tokens 4, float32, cpu") in out
    lines = [l for l in out.splitlines() if l.startswith("| batch ")]
    labels = [l.split("|")[1].strip() for l in lines[:5]]
    assert labels == ["batch 16 (default)", "batch 1", "batch 4", "batch 16 unsorted", "batch 16 static"]
    for line in lines[:5]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[4] == "24" and cells[-1] == "6/6", line         # 6 prompts x 4 tokens; same greedy texts
        assert float(cells[7]) > 0
    assert "whole math/gsm8k set, 1319 prompts" in out


def test_a_failing_variant_is_reported_not_raised(gsm8k_prompts):
    model, tok = adapted_micro()
    variants = [*make_variants([2], 2, static=False),
                generation_bench.GenVariant("batch 2 bogus", 2, cache_implementation="no_such_cache")]
    rows = measure_generation(model, tok, gsm8k_prompts[:4], variants, 3, 1)
    assert rows[-1]["error"] and rows[-1]["times"] == []
    report = generation_bench.generation_report(rows, "h")
    assert "batch 2 bogus: not measured, it fails here (" in report
