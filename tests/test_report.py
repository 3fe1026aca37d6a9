"""The report: a real tiny multirun (2 adapters x 2 seeds x 2 expert counts) on CPU, then the table and plots;
plus fast checks on fabricated sweep dirs (code table on two backbones, rank plots, missing/failed jobs)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from comol import ROOT
from comol.tools.report import report
from comol.tools.sweeps import _sel, expand

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env():
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def _md_rows(md: str) -> list[list[str]]:
    """Every line of the markdown tables as its cells, stripped (the column-aligning padding and the
    alignment lines left out): table.md is written by pandas' to_markdown, which pads cells to align them."""
    return [[c.strip() for c in line.strip()[1:-1].split("|")] for line in md.splitlines()
            if line.startswith("|") and not set(line.strip()) <= set("|-: ")]


def _md_row(md: str, *cells: str) -> list[str] | None:
    """The first table line whose leading cells are ``cells``."""
    return next((r for r in _md_rows(md) if r[:len(cells)] == list(cells)), None)


# ---------------------------------------------------------------------------------------------- a real tiny sweep

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    """`python run.py sweep=table5_tiny` narrowed to N in {8, 16} and seeds {0, 125}: 8 jobs on CPU."""
    out = tmp_path_factory.mktemp("tiny") / "sweep"
    proc = subprocess.run([sys.executable, "run.py", "sweep=table5_tiny", "adapter.num_experts=8,16", "seed=0,125",
                           f"hydra.sweep.dir={out}"], cwd=ROOT, capture_output=True, text=True, env=_env(),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _job_results(sweep: Path) -> list[tuple[dict, dict]]:
    jobs = []
    for d in sorted(p for p in sweep.iterdir() if (p / "results.json").is_file()):
        jobs.append((yaml.safe_load((d / "config.yaml").read_text()), json.loads((d / "results.json").read_text())))
    return jobs


@pytest.mark.slow
def test_tiny_multirun_lands_in_separate_dirs_and_one_wandb_group(tiny_sweep):
    dirs = sorted(p.name for p in tiny_sweep.iterdir() if p.is_dir())
    assert len(dirs) == 8 and len({d.split("_", 1)[0] for d in dirs}) == 8
    assert (tiny_sweep / "multirun.yaml").is_file()
    groups, names = set(), set()
    for d in tiny_sweep.iterdir():
        if not d.is_dir():
            continue
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        groups.add(cfg["logger"]["wandb"]["group"])
        names.add(cfg["logger"]["wandb"]["name"])
        assert "sweep:table5_tiny" in cfg["logger"]["wandb"]["tags"] and cfg["logger"]["wandb"]["mode"] == "offline"
        (run,) = (d / "wandb").glob("offline-run-*")
        (data,) = run.glob("run-*.wandb")
        blob = data.read_bytes()
        assert cfg["logger"]["wandb"]["group"].encode() in blob and cfg["run_name"].encode() in blob
        assert b"eval/math/mean_acc" in blob and b"params/trainable" in blob  # summary + resolved config
    assert len(groups) == 1 and next(iter(groups)).startswith("table5_tiny-")
    assert names == {f"{m}-r16-N{n}-tiny_qwen3-s{s}" for m in ("comol", "comol_nocr") for n in (8, 16)
                     for s in (0, 125)}


@pytest.mark.slow
def test_report_table_from_the_tiny_sweep(tiny_sweep):
    result = report(tiny_sweep)
    out = tiny_sweep / "report"
    rows = _csv_rows(out / "table.csv")
    assert [(r["method"], r["N"]) for r in rows] == [("CoMoL w/o CR", "8"), ("CoMoL w/o CR", "16"),
                                                    ("CoMoL", "8"), ("CoMoL", "16")]
    assert list(rows[0]) == ["method", "N", "params_trainable", "toy_math mean", "toy_math std", "toy_math n"]

    jobs = _job_results(tiny_sweep)
    md = (out / "table.md").read_text()
    assert md == result["markdown"]
    assert "Note: a _tiny twin checks the wiring, not the methods" in md  # its numbers are noise: it says so
    for row in rows:
        mine = [res for cfg, res in jobs
                if cfg["method"] == row["method"] and cfg["adapter"]["num_experts"] == int(row["N"])]
        assert len(mine) == 2
        accs = [100 * res["eval/math/toy_math/acc"] for res in mine]
        assert float(row["toy_math mean"]) == pytest.approx(statistics.fmean(accs), abs=1e-3)
        assert float(row["toy_math std"]) == pytest.approx(statistics.stdev(accs), abs=1e-3)
        assert row["toy_math n"] == "2/2"
        params = {res["params/trainable"] for res in mine}
        assert len(params) == 1 and int(row["params_trainable"]) == params.pop()
        cell = f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}"
        assert cell in _md_row(md, row["method"], row["N"])[-1]
    # more experts -> more parameters; the router on x costs more than the router on A·x
    p = {(r["method"], int(r["N"])): int(r["params_trainable"]) for r in rows}
    assert p[("CoMoL", 16)] > p[("CoMoL", 8)] and p[("CoMoL w/o CR", 8)] > p[("CoMoL", 8)]
    assert "8 jobs: 8 ok, 0 failed, 0 missing" in md and "Missing or failed" not in md
    for name in ("accuracy_vs_N.png", "params_vs_N.png"):
        _assert_png(out / name)
    assert len(_csv_rows(out / "jobs.csv")) == 8


@pytest.mark.slow
def test_report_lists_missing_and_failed_jobs_and_leaves_them_out(tiny_sweep, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sweep, broken, ignore=shutil.ignore_patterns("report", "wandb", "adapter"))
    jobs = sorted(p for p in broken.iterdir() if p.is_dir())
    shutil.rmtree(jobs[-1])                          # never started
    (jobs[0] / "results.json").unlink()              # crashed
    with open(jobs[0] / "train.log", "a") as f:
        f.write("[x][comol][ERROR] - RuntimeError: CUDA out of memory\n")
    proc = subprocess.run([sys.executable, "-m", "comol.tools.report", str(broken), "--strict"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    md = (broken / "report" / "table.md").read_text()
    assert "8 jobs: 6 ok, 1 failed, 1 missing" in md and "## Missing or failed jobs" in md
    failed = _md_row(md, "0", "failed", jobs[0].name)
    assert failed[3].startswith("no results.json; train.log:") and "CUDA out of memory" in failed[3]
    missing_overrides = " ".join(yaml.safe_load((tiny_sweep / jobs[-1].name / ".hydra" / "overrides.yaml").read_text()))
    assert _md_row(md, "7", "missing", missing_overrides) == ["7", "missing", missing_overrides,
                                                             "no job dir: never started"]
    rows = {(r["method"], r["N"]): r for r in _csv_rows(broken / "report" / "table.csv")}
    assert rows[("CoMoL w/o CR", "8")]["toy_math n"] == "1/2"   # job 0's row
    assert rows[("CoMoL", "16")]["toy_math n"] == "1/2"          # job 7's row, attributed from its overrides
    ok = json.loads((tiny_sweep / jobs[1].name / "results.json").read_text())["eval/math/toy_math/acc"]
    assert float(rows[("CoMoL w/o CR", "8")]["toy_math mean"]) == pytest.approx(100 * ok, abs=1e-3)
    assert rows[("CoMoL w/o CR", "8")]["toy_math std"] == ""     # one value: no std, not a fake 0


# ---------------------------------------------------------------------------------------------- fabricated sweeps

def _fabricate(tmp_path: Path, sweep: str, overrides: list[str], metrics, skip=()) -> Path:
    """A sweep dir as Hydra + the pipeline leave it (multirun.yaml, .hydra/overrides.yaml, config.yaml,
    results.json), with made-up metrics: no training."""
    master, jobs = expand(sweep, overrides)
    out = tmp_path / sweep
    out.mkdir()
    OmegaConf.save(master, out / "multirun.yaml")
    for j in jobs:
        if j.num in skip:
            continue
        d = out / j.summary["subdir"]
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(j.overrides))
        cfg = {"method": j.summary["method"], "seed": j.summary["seed"], "model": {"name": j.summary["model"]},
               "adapter": j.summary["adapter"], "eval": {"sets": _sel(j.config, "eval.sets")}}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (d / "results.json").write_text(json.dumps(metrics(j)))
    return out


def test_code_table_has_a_block_per_backbone_with_pass_at_k(tmp_path):
    def metrics(j):
        s, base = j.summary, 0.3 + 0.01 * j.summary["adapter"]["r"] / 16
        bump = {0: 0.0, 125: 0.02, 1225: 0.04}[s["seed"]]
        return {"params/trainable": 1000 * s["adapter"]["r"], **{f"eval/code/humaneval/pass@{k}": base + bump + k / 100
                                                                  for k in (1, 5, 10)}}

    sweep = _fabricate(tmp_path, "table4", [], metrics)
    result = report(sweep)
    md = result["markdown"]
    assert _md_rows(md)[0] == ["Method", "llama31_8b: Params", "llama31_8b: pass@1", "llama31_8b: pass@5",
                               "llama31_8b: pass@10", "qwen3_8b: Params", "qwen3_8b: pass@1", "qwen3_8b: pass@5",
                               "qwen3_8b: pass@10"]
    rows = _csv_rows(sweep / "report" / "table.csv")
    assert [r["method"] for r in rows] == ["LoRA", "DenseLoRA", "FlyLoRA", "MoLoRA", "HydraLoRA", "MoLA", "AdaMoLE",
                                           "CoMoL"]
    lora = rows[0]
    assert float(lora["llama31_8b: pass@1 mean"]) == pytest.approx(100 * (0.31 + 0.01 + 0.02), abs=1e-3)
    assert float(lora["qwen3_8b: pass@10 std"]) == pytest.approx(100 * statistics.stdev([0, 0.02, 0.04]), abs=1e-3)
    assert lora["llama31_8b: params_trainable"] == "16000" and rows[1]["qwen3_8b: params_trainable"] == "256000"
    assert _md_row(md, "LoRA", "16.0K", "34.00 ± 2.00")
    assert not list((sweep / "report").glob("*.png"))  # no swept axis, no plot


def test_math_table_columns_in_paper_order_with_mean_and_robust_aqua(tmp_path):
    sets = ["AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP"]

    def metrics(j):
        acc = {s: 0.5 + 0.01 * i + 0.001 * j.num for i, s in enumerate(sets)}
        return {"params/trainable": 123_456_789, **{f"eval/math/{s}/acc": a for s, a in acc.items()},
                "eval/math/AQuA/acc_robust": 0.6, "eval/math/mean_acc": statistics.fmean(acc.values())}

    sweep = _fabricate(tmp_path, "table2", ["experiment=math14k/qwen3_8b/lora,math14k/qwen3_8b/comol"], metrics)
    md = report(sweep)["markdown"]
    assert _md_rows(md)[0] == ["Method", "Params", "AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP",
                               "Avg.", "AQuA (robust)"]
    assert _md_row(md, "LoRA", "123.46M", "50.10 ± 0.10") and _md_row(md, "CoMoL", "123.46M")


def test_rank_sweep_plots_one_line_per_method(tmp_path):
    def metrics(j):
        r = j.summary["adapter"]["r"]
        return {"params/trainable": 1000 * r, "eval/code/humaneval/pass@1": 0.2 + r / 1000}

    sweep = _fabricate(tmp_path, "figure2", [], metrics, skip={3})
    result = report(sweep)
    rows = _csv_rows(sweep / "report" / "table.csv")
    assert [(r["method"], r["r"]) for r in rows] == [("LoRA", str(r)) for r in (8, 16, 32, 64, 128)] + [
        ("CoMoL", str(r)) for r in (8, 16, 32, 64, 128)]
    assert rows[3]["pass@1 n"] == "0/1" and "– (0/1)" in result["markdown"] and _md_row(result["markdown"], "3", "missing")
    for name in ("accuracy_vs_r.png", "params_vs_r.png"):
        _assert_png(sweep / "report" / name)


@pytest.mark.slow
def test_report_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "comol.tools.report", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: sweep dir {tmp_path / 'nope'} does not exist"


def test_plain_multirun_dir_is_reported(tmp_path):
    """`python run.py -m seed=0,1 ...` (no sweep=): multirun.yaml has no sweeper params; still a table."""
    master, jobs = expand(None, ["adapter=lora,comol", "seed=0,1"])
    assert master.hydra.sweeper.get("params") is None
    out = tmp_path / "plain"
    out.mkdir()
    OmegaConf.save(master, out / "multirun.yaml")
    for j in jobs[:-1]:                               # the last job never started
        d = out / j.summary["subdir"]
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(j.overrides))
        (d / "config.yaml").write_text(yaml.safe_dump({"method": j.summary["method"], "seed": j.summary["seed"],
                                                       "model": {"name": "tiny_qwen3"}, "adapter": j.summary["adapter"]}))
        (d / "results.json").write_text(json.dumps({"params/trainable": 10, "eval/math/toy_math/acc": 0.1 * j.num}))
    md = report(out)["markdown"]
    assert "4 jobs: 3 ok, 0 failed, 1 missing" in md
    rows = {r["method"]: r for r in _csv_rows(out / "report" / "table.csv")}
    assert float(rows["lora"]["toy_math mean"]) == pytest.approx(100 * statistics.fmean([0.0, 0.1]), abs=1e-6)
    assert rows["comol"]["toy_math n"] == "1/2"


@pytest.mark.slow
def test_unreadable_job_is_named_and_the_rest_reported(tmp_path):
    def metrics(j):
        return {"params/trainable": 1000, "eval/code/humaneval/pass@1": 0.1 + 0.01 * j.num}

    sweep = _fabricate(tmp_path, "figure2", [], metrics)
    dirs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    (dirs[2] / "results.json").write_text('{"eval/code/humaneval/pass@1": 0.5,')     # truncated
    (dirs[4] / "config.yaml").write_text("method: [unclosed\n")                        # corrupt YAML
    proc = subprocess.run([sys.executable, "-m", "comol.tools.report", str(sweep)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (sweep / "report" / "table.md").read_text()
    assert "10 jobs: 8 ok, 0 failed, 0 missing, 2 unreadable" in md
    assert _md_row(md, "2", "unreadable", dirs[2].name)[3].startswith(f"{dirs[2] / 'results.json'}: not valid JSON")
    assert _md_row(md, "4", "unreadable", dirs[4].name)[3].startswith(f"{dirs[4] / 'config.yaml'}: not valid YAML")
    rows = {(r["method"], r["r"]): r for r in _csv_rows(sweep / "report" / "table.csv")}
    assert rows[("LoRA", "32")]["pass@1 n"] == "0/1"      # attributed by its readable config, not averaged
    assert float(rows[("LoRA", "8")]["pass@1 mean"]) == pytest.approx(10.0, abs=1e-6)


def test_report_attributes_results_by_the_jobs_own_claim(tmp_path):
    """A job's claim (written by the job itself) names its overrides, whatever .hydra/overrides.yaml says."""
    def metrics(j):
        return {"params/trainable": 1000, "eval/code/humaneval/pass@1": 0.1 * (j.num + 1)}

    sweep = _fabricate(tmp_path, "figure2", [], metrics)
    dirs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    own = yaml.safe_load((dirs[0] / ".hydra" / "overrides.yaml").read_text())
    (dirs[0] / ".comol_run.json").write_text(json.dumps({"mode": "train", "overrides": own}))
    other = yaml.safe_load((dirs[1] / ".hydra" / "overrides.yaml").read_text())
    (dirs[0] / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(other))   # overwritten by someone else
    from comol.tools.report import load_jobs

    recs = {r.dir.name: r for r in load_jobs(sweep) if r.dir}
    assert recs[dirs[0].name].overrides == own and recs[dirs[0].name].num == 0
    assert sum(r.status == "missing" for r in load_jobs(sweep)) == 0


def test_params_column_reads_zero_for_the_untrained_base_row():
    from comol.tools.report import fmt_params

    assert fmt_params([0]) == "0" and fmt_params([12_345]) == "12.3K" and fmt_params([2_856_960]) == "2.86M"
    assert fmt_params([0, 2_856_960]) == "0–2.86M" and fmt_params([]) == "–"


def test_a_new_metric_name_reaches_the_table_without_touching_the_report(tmp_path):
    """Metric columns come from the results keys (eval/<task>/<set>/<metric>, eval/<task>/<metric>), not a list:
    a task the report has never heard of, scored by F1, shows up in table.md and table.csv."""
    def metrics(j):
        f1 = {"newset": 0.5 + 0.1 * j.num, "otherset": 0.25}
        return {"params/trainable": 1000, **{f"eval/newtask/{s}/f1": v for s, v in f1.items()},
                "eval/newtask/mean_f1": statistics.fmean(f1.values()), "eval/newtask/newset/exact": 0.125}

    master, jobs = expand(None, ["adapter=lora", "seed=0,1"])
    out = tmp_path / "new"
    out.mkdir()
    OmegaConf.save(master, out / "multirun.yaml")
    for j in jobs:
        d = out / j.summary["subdir"]
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(j.overrides))
        (d / "config.yaml").write_text(yaml.safe_dump({"method": "lora", "seed": j.summary["seed"],
                                                       "model": {"name": "tiny_qwen3"}, "adapter": j.summary["adapter"]}))
        (d / "results.json").write_text(json.dumps(metrics(j)))
    md = report(out)["markdown"]
    assert _md_rows(md)[0] == ["Method", "Params", "newset f1", "otherset f1", "Avg. f1", "newset exact"]
    newset = [100 * (0.5 + 0.1 * n) for n in (0, 1)]
    assert _md_row(md, "lora", "1.0K")[2] == f"{statistics.fmean(newset):.2f} ± {statistics.stdev(newset):.2f}"
    (row,) = _csv_rows(out / "report" / "table.csv")
    assert float(row["newset f1 mean"]) == pytest.approx(statistics.fmean(newset))
    assert float(row["Avg. f1 mean"]) == pytest.approx(statistics.fmean([statistics.fmean([v, 25.0]) for v in newset]))
    assert float(row["newset exact mean"]) == pytest.approx(12.5) and row["newset exact std"] == "0.0" and row["newset exact n"] == "2/2"
