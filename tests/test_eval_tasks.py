"""Evaluation tasks as registered objects: a throw-away plug-in task (two files in a temp dir) reaches
results.json and the report table; the registry's names drive the objective a sweeper optimises."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from comol.config import compose
from comol.errors import ConfigError
from comol.eval.tasks import EvalTask, build_task, register_task, registered_tasks, split_metric_key
from comol.job import objective, objective_spec, run
from comol.tools.report import report

FAST = ["trainer=debug", "logger=none", "dataset.train_size=32", "dataset.val_size=8", "eval.limit=6"]

PLUGIN_PY = '''
    """A throw-away task: a response is right when it contains the gold answer anywhere."""
    from comol.eval.tasks import EvalTask, register_task


    @register_task("contains")
    class ContainsTask(EvalTask):
        set_metrics = ("hit",)
        summary_metrics = ("mean_hit",)
        primary_metric = "mean_hit"
        direction = "maximize"

        def score(self, set_name, response, row):
            return {"correct": str(row["answer"]) in response}

        def set_summary(self, records):
            return {"hit": sum(r["correct"] for r in records) / len(records)}

        def summarize(self, per_set):
            return {"mean_hit": sum(m["hit"] for m in per_set.values()) / len(per_set)}
'''

PLUGIN_YAML = '''
    task: contains
    sets:
      toy_math: toy_math
    data_dir: null
    limit: null
    batch_size: 8
    max_new_tokens: 8
    decoding: {do_sample: false, num_samples: 1, temperature: 1.0, top_p: 1.0, seed: 0}
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plugin")
    (d / "contains_task.py").write_text(textwrap.dedent(PLUGIN_PY))
    (d / "eval").mkdir()
    (d / "eval" / "contains.yaml").write_text(textwrap.dedent(PLUGIN_YAML))
    return d


def test_plugin_task_from_two_files_reaches_results_and_report(tmp_path, plugin_dir):
    job = tmp_path / "sweep" / "0_contains"
    cfg = compose([*FAST, f"hydra.searchpath=[file://{plugin_dir}]", f"plugins=[{plugin_dir}]", "eval=contains",
                   f"paths.output_dir={job}"])
    results = run(cfg)
    on_disk = json.loads((job / "results.json").read_text())
    preds = [json.loads(l) for l in (job / "predictions" / "toy_math.jsonl").read_text().splitlines()]
    assert len(preds) == 6
    expected = sum(str(p["answer"]) in p["response"] for p in preds) / 6   # recomputed from the predictions
    assert on_disk["eval/contains/toy_math/hit"] == results["eval/contains/toy_math/hit"] == expected
    assert on_disk["eval/contains/mean_hit"] == expected
    assert not any(k.startswith("eval/math/") for k in on_disk)
    # the objective a sweeper gets is the plug-in's primary metric
    assert objective_spec(cfg) == ("eval/contains/mean_hit", "maximize")
    assert objective(cfg, results) == expected
    # the report reads the job's config, loads its plug-ins and shows the task's metrics as columns
    out = report(tmp_path / "sweep")
    table = (tmp_path / "sweep" / "report" / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("|"))
    assert "hit" in [c.strip() for c in header.split("|")], table   # one set: its metric is the column
    rows = [l for l in table.splitlines() if l.startswith("| comol")]
    assert rows and f"{100 * expected:.2f}" in rows[0], table
    assert out is not None


def test_plugin_from_env_var_and_unknown_task_is_one_line(tmp_path, plugin_dir, monkeypatch):
    monkeypatch.setenv("COMOL_PLUGINS", str(plugin_dir / "contains_task.py"))
    task = build_task({"task": "contains", "sets": {"toy_math": "toy_math"}, "max_new_tokens": 4})
    assert task.primary_key() == "eval/contains/mean_hit"
    with pytest.raises(ConfigError, match=r"eval.task='nosuch' is invalid: expected one of .*plugins="):
        build_task({"task": "nosuch"})
    with pytest.raises(ConfigError, match=r"eval.colour='red' is not a key of eval task 'math'"):
        build_task({"task": "math", "colour": "red"})


def test_builtin_tasks_declare_their_metrics():
    assert {"math", "commonsense", "code", "none"} <= set(registered_tasks())
    assert split_metric_key("eval/math/gsm8k/acc") == ("math", "gsm8k", "acc")
    assert split_metric_key("eval/math/AQuA/acc_robust") == ("math", "AQuA", "acc_robust")
    assert split_metric_key("eval/math/mean_acc") == ("math", None, "mean_acc")
    assert split_metric_key("eval/code/humaneval/pass@10") == ("code", "humaneval", "pass@10")
    assert split_metric_key("eval/code/humaneval/confined") is None      # a flag, not a metric column
    assert split_metric_key("eval/math/gsm8k/n") is None


@pytest.mark.parametrize("overrides, expected", [
    ([], ("eval/math/mean_acc", "maximize")),
    (["eval=none"], ("val/loss", "minimize")),
    (["eval=humaneval"], ("eval/code/humaneval/pass@1", "maximize")),
    (["eval=commonsense"], ("eval/commonsense/mean_acc", "maximize")),
    (["objective.metric=train/loss"], ("train/loss", "minimize")),
    (["objective.metric=val/loss", "objective.direction=maximize"], ("val/loss", "maximize")),
])
def test_objective_defaults_to_the_task(overrides, expected):
    assert objective_spec(compose(overrides)) == expected


def test_objective_is_always_a_float():
    cfg = compose(["eval=none"])
    assert objective(cfg, {"val/loss_final": 1.25}) == 1.25
    assert objective(cfg, {}) == math.inf                     # no val/loss: worst value, never None
    assert objective(compose([]), {"eval/math/mean_acc": float("nan")}) == -math.inf
    with pytest.raises(ConfigError, match="objective.direction='up' is invalid"):
        objective_spec(compose(["objective.direction=up"]))


class AlwaysNan(EvalTask):
    def score(self, set_name, response, row):
        return {"correct": False}

    def summarize(self, per_set):
        return {"mean_acc": float("nan")}


def test_base_mode_results_get_the_finite_check(tmp_path):
    """One writer of results.json: mode=base too marks a job with a non-finite metric failed (it skipped it)."""
    register_task("always_nan")(AlwaysNan)      # conftest restores the registry after the test
    results = run(compose([*FAST, "mode=base", "eval.task=always_nan", f"paths.output_dir={tmp_path}"]))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["eval/always_nan/mean_acc"] is None
    assert results == on_disk
