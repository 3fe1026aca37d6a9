"""Trainable parameters of the mixture-of-LoRA baselines on Qwen3-8B (docs/methods.md §4), on the meta device."""

import pytest

from comol.params import trainable_params

# Qwen3-8B, qkvo+down, 36 layers: (n, m) per projection
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
          "down_proj": (12288, 4096)}
LAYERS = 36


def per_module(fn):
    return LAYERS * sum(fn(n, m) for n, m in SHAPES.values())


@pytest.mark.parametrize("adapter,paper_millions,formula", [
    ("molora", 107.35, lambda n, m: 8 * 8 * (n + m) + 8 * n),
    ("hydralora", 49.55, lambda n, m: 8 * n + 8 * 8 * m + 8 * n),
    ("mola", 107.35, lambda n, m: 8 * 8 * (n + m) + 8 * n),
    ("adamole", 108.38, lambda n, m: 8 * 8 * (n + m) + 8 * n + n + 1),
])
def test_qwen3_8b_matches_paper_table(adapter, paper_millions, formula):
    trainable, total = trainable_params(["model=qwen3_8b", f"adapter={adapter}"])
    assert trainable == per_module(formula)
    assert abs(trainable / 1e6 - paper_millions) <= 0.01
    assert total > 8.1e9


def test_qwen3_8b_other_new_adapters_follow_their_formulas():
    # FlyLoRA r=32: only B (r·m) is trained; A is a frozen buffer
    assert trainable_params(["model=qwen3_8b", "adapter=flylora"])[0] == per_module(lambda n, m: 32 * m)
    # layer-shared: one r(n_t + m_t) per projection type + per-module terms
    shared = lambda r: sum(r * (n + m) for n, m in SHAPES.values())  # noqa: E731
    dense = trainable_params(["model=qwen3_8b", "adapter=denselora"])[0]
    assert dense == shared(256) + per_module(lambda n, m: 256 ** 2)
    assert trainable_params(["model=qwen3_8b", "adapter=comol_sh"])[0] == shared(16) + per_module(
        lambda n, m: 8 * 16 * 16 + 8 * 16)
    assert trainable_params(["model=qwen3_8b", "adapter=mole"])[0] == per_module(lambda n, m: 8 * 8 * (n + m) + 8 * n)
