"""Cost before launch: `python -m comol.tools.sweeps table2 --estimate` (tokens and hours per job and in total),
checked against numbers computed by hand from the recipe (math_14k: 14,000 documented rows, 1 epoch, batch 4 x 4)."""

from __future__ import annotations

import json

import pytest

from comol.tools.estimate import estimate_jobs, load_rates
from comol.tools.sweeps import expand, main


@pytest.fixture(scope="module")
def table2():
    return expand("table2")[1]


def test_table2_estimate_with_fixed_rate(capsys):
    assert main(["table2", "--estimate", "--tokens-per-s", "1000", "--tokens-per-row", "200"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    jobs = [line for line in lines if line and line[0].isdigit()]
    assert len(jobs) == 27
    # by hand: 14,000 rows (documented count; the training file is not bundled) x 1 epoch x 200 tokens
    # = 2,800,000 tokens; / 1000 tokens/s / 3600 = 0.78 h per job; 27 jobs: 75,600,000 tokens, 21.00 h
    for line in jobs:
        assert line[-3:] == ["2,800,000", "1000", "0.78"], line
        assert "documented" in " ".join(line)
    (total,) = [line for line in lines if line and line[0] == "total"]
    assert total[-2:] == ["75,600,000", "21.00"] and "378000" in total


def test_estimate_follows_max_steps_and_the_bench_file(table2, tmp_path):
    from omegaconf import open_dict

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"tokens_per_s": {"lora": 2000.0, "comol": 500.0}}))
    rates = load_rates(str(bench))
    jobs = [j for j in table2 if j.num in (0, 24)]   # lora s0, comol s0
    for j in jobs:
        with open_dict(j.config):
            j.config.trainer.max_steps = 100
    lora, comol = estimate_jobs(jobs, rates, tokens_per_row_override=250)
    # 100 optimizer steps x 4 accumulated micro-batches x 4 rows = 1600 rows; x 250 tokens = 400,000 tokens
    assert (lora.rows_trained, lora.tokens, comol.tokens) == (1600, 400_000, 400_000)
    assert lora.hours == pytest.approx(400_000 / 2000 / 3600) and lora.rate_source == "bench lora"
    assert comol.hours == pytest.approx(400_000 / 500 / 3600) and comol.rate_source == "bench comol"
    # a tokens-per-row above max_length (300) is cut there
    (capped,) = estimate_jobs(jobs[:1], 1000.0, tokens_per_row_override=1000)
    assert capped.tokens == 1600 * 300


def test_estimate_rejects_bad_rates(tmp_path, capsys):
    assert main(["table2", "--estimate", "--tokens-per-s", "-3"]) == 2
    assert "--tokens-per-s '-3': expected a positive number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected a number or a bench JSON file"):
        load_rates(str(tmp_path / "missing.json"))
