"""Unbiased pass@k and the offline `evaluate` metric modules."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from comol.eval.code.pass_at_k import mean_pass_at_k, pass_at_k

REPO = Path(__file__).resolve().parents[1]


def _by_hand(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) with exact integers (math.comb is 0 when k > n - c)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("c", range(11))
@pytest.mark.parametrize("k", [1, 5, 10])
def test_pass_at_k_matches_binomial_formula(c, k):
    assert pass_at_k(10, c, k) == pytest.approx(_by_hand(10, c, k), abs=1e-12)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 1, 1, 0.1),
        (10, 1, 5, 0.5),
        (10, 1, 10, 1.0),
        (10, 0, 1, 0.0),
        (10, 0, 10, 0.0),
        (10, 10, 1, 1.0),
        (10, 5, 1, 0.5),
        (10, 2, 5, 1 - 56 / 252),  # C(8,5)=56, C(10,5)=252
        (10, 3, 5, 1 - 21 / 252),  # C(7,5)=21
        (10, 6, 5, 1.0),  # fewer than 5 failures: any 5 contain a pass
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_literal_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert 0.0 < pass_at_k(1000, 3, 10) < 1.0


@pytest.mark.parametrize(
    "n, c, k, match",
    [
        (10, 11, 1, r"c=11 correct samples must be between 0 and n=10"),
        (10, -1, 1, r"c=-1"),
        (10, 1, 11, r"k=11 must be between 1 and the number of samples n=10"),
        (10, 1, 0, r"k=0"),
        (0, 0, 1, r"n=0 samples"),
    ],
)
def test_pass_at_k_rejects_bad_input(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError, match="k must be an int"):
        pass_at_k(10, 1, 1.5)


def test_mean_pass_at_k_and_k_filter():
    out = mean_pass_at_k([(10, 1), (10, 0), (10, 10)], ks=(1, 5, 10))
    assert out == pytest.approx({"pass@1": (0.1 + 0 + 1) / 3, "pass@5": (0.5 + 0 + 1) / 3,
                                 "pass@10": (1 + 0 + 1) / 3})
    # k larger than the smallest sample count is not reported.
    assert mean_pass_at_k([(1, 1), (10, 3)], ks=(1, 5, 10)) == {"pass@1": pytest.approx((1 + 0.3) / 2)}
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], ks=(1,))


def test_load_metric_rejects_unknown_name():
    from comol.eval.metrics import metric_path

    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metric_path("bleu")


_METRIC_SCRIPT = r"""
import json
from comol.eval.metrics import load_metric

out = {}
m = load_metric("math_accuracy", config_name="AQuA")
out["aqua"] = m.compute(predictions=["A train... The answer is (C).", "The answer is (B)."],
                        references=["C", "B"])
m = load_metric("math_accuracy", config_name="gsm8k")
out["gsm8k"] = m.compute(predictions=["The answer is 1,200.", "no number"], references=["1200.0", "3"])
m = load_metric("code_pass_at_k")
out["code"] = m.compute(
    predictions=[["def f(x):\n    return x + 1", "def f(x):\n    return x"], ["def g():\n    return 1"] * 2],
    references=["assert f(1) == 2", "assert g() == 1"],
    k=[1, 2], num_workers=2, timeout=5.0,
)
print("RESULT" + json.dumps(out))
"""


def test_evaluate_metrics_load_offline(tmp_path):
    """Both local metric modules load with `evaluate.load(<folder>)` with the hub switched
    off, and inside a network namespace (no network at all) where `unshare` works."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "hf" / "modules"),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", _METRIC_SCRIPT]
    unshare = shutil.which("unshare")
    if unshare and os.geteuid() == 0 and subprocess.run([unshare, "-n", "true"]).returncode == 0:
        cmd = [unshare, "-n", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["aqua"] == {"accuracy": 0.5, "correct": 1, "n": 2, "accuracy_robust": 1.0,
                           "correct_robust": 2}
    assert out["gsm8k"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert out["code"] == {"pass@1": pytest.approx(0.75), "pass@2": 1.0, "n_problems": 2}
