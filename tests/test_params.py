"""Parameter accounting on the meta device reproduces the paper (docs/methods.md §4)."""

import subprocess
import sys

import pytest

from comol import ROOT
from comol.params import main, trainable_params


@pytest.mark.parametrize("overrides,expected", [
    (["adapter=lora", "adapter.r=16"], 24_772_608),
    (["adapter=comol"], 25_164_288),
    (["adapter=comol_nocr"], 33_398_784),
])
def test_qwen3_8b_paper_counts(overrides, expected):
    trainable, total = trainable_params(["model=qwen3_8b", *overrides])
    assert trainable == expected
    assert total > 8.1e9  # the whole backbone is there, on the meta device


def test_printed_figures_match_paper_within_0_01M(capsys):
    paper = {"adapter=lora": 24.77, "adapter=comol": 25.16, "adapter=comol_nocr": 33.39}
    for override, figure in paper.items():
        assert main(["model=qwen3_8b", override]) == 0
        rounded, exact = capsys.readouterr().out.strip().split(" ")
        assert rounded.endswith("M") and abs(float(rounded[:-1]) - figure) <= 0.0101, (override, rounded)
        assert abs(int(exact.strip("()").replace(",", "")) / 1e6 - float(rounded[:-1])) <= 0.005


@pytest.mark.slow
def test_cli_prints_two_decimals_and_M():
    out = subprocess.run([sys.executable, "-m", "comol.params", "model=qwen3_8b", "adapter=lora", "adapter.r=16"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    assert out == "24.77M (24,772,608)"  # 36 layers x 16 x ((4096+4096)+(4096+1024)x2+(4096+4096)+(12288+4096))


def test_other_backbones_follow_the_formula():
    # LoRA r=16 on Llama-3.1-8B: 32 layers x r(n+m) over q,k,v,o,down
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (14336 + 4096))
    assert trainable_params(["model=llama31_8b", "adapter=lora"])[0] == 32 * per_layer
    per_layer = 16 * ((5120 + 5120) * 2 + (5120 + 1024) * 2 + (17408 + 5120))
    assert trainable_params(["model=qwen3_14b", "adapter=lora"])[0] == 40 * per_layer


def test_bad_override_is_one_line_error(capsys):
    assert main(["adapter=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "adapter/nope" in err and "\n" not in err


PAPER_TABLE_2 = {  # docs/methods.md §4: Qwen3-8B, q,k,v,o,down, the papers' "Param" column
    "lora": 24.77, "molora": 107.35, "hydralora": 49.55, "mola": 107.35, "adamole": 108.38,
    "sparsemoa": 24.49, "comol_nocr": 33.39, "comol": 25.16,
}


def test_paper_table_2_param_column():
    from comol.params import table

    rendered = table(["model=qwen3_8b"])
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in rendered.splitlines()[2:]}
    for adapter, figure in PAPER_TABLE_2.items():
        assert abs(float(rows[adapter].rstrip("M")) - figure) <= 0.0101, (adapter, rows[adapter], figure)
