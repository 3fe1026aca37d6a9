"""The MoA paper's parameter figures on Qwen3-8B (docs/methods.md §3/§4), on the meta device.

Convention that reproduces them (see conf/adapter/sparsemoa.yaml): LoRA r=8 on q,k,v,o,down;
parallel adapter a=16 with both biases; SwiGLU router with hidden 4K and a bias on all three
Linears; Sparse MoA adds a threshold Linear d -> 1 with bias. Soft MoA's 24.34M is the
prompt-less configuration (K = 6) of the MoA code.
"""

import pytest

from comol.params import main, trainable_params

L, D = 36, 4096
LORA = 8 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (12288 + 4096))  # 344,064
PA = 2 * D * 16 + 16 + D  # 135,184
PROMPT = 10 * D + 32  # 40,992


def swiglu(k: int) -> int:
    h = 4 * k
    return 2 * (D * h + h) + h * k + k


@pytest.mark.parametrize("overrides,expected,paper", [
    (["adapter=sparsemoa"], L * (LORA + PA + swiglu(6) + D + 1), 24.49),
    (["adapter=softmoa", "adapter.prompt_expert=false"], L * (LORA + PA + swiglu(6)), 24.34),
    (["adapter=softmoa"], L * (LORA + PA + PROMPT + swiglu(7)), None),
    (["adapter=softmoa_instance"], L * (LORA + PA + PROMPT + swiglu(7)), None),
    (["adapter=unipeft"], L * (LORA + PA + PROMPT + D * 3 + 3), None),
    (["adapter=prompt"], L * PROMPT, None),
    (["adapter=parallel_adapter"], L * PA, None),
], ids=["sparsemoa", "softmoa_noprompt", "softmoa", "softmoa_instance", "unipeft", "prompt", "parallel_adapter"])
def test_qwen3_8b_counts(overrides, expected, paper, capsys):
    trainable, total = trainable_params(["model=qwen3_8b", *overrides])
    assert trainable == expected
    assert total > 8.1e9
    if paper is not None:
        assert main(["model=qwen3_8b", *overrides]) == 0
        assert capsys.readouterr().out.strip().split(" ")[0] == f"{paper:.2f}M"


def test_sparsemoa_exact_figure():
    assert trainable_params(["model=qwen3_8b", "adapter=sparsemoa"])[0] == 24_485_436


def test_llama31_8b_sparsemoa_follows_the_formula():
    lora = 8 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (14336 + 4096))
    assert trainable_params(["model=llama31_8b", "adapter=sparsemoa"])[0] == 32 * (lora + PA + swiglu(6) + D + 1)
