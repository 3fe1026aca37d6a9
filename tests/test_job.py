"""The job's parts that need no training: callbacks from the `callbacks` config group, the results writer,
the logger context manager."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from comol.config import compose
from comol.job import open_loggers, write_results
from comol.training.best_adapter import BestAdapterKeeper
from comol.training.callbacks import build_callbacks
from comol.training.checkpointing import RunCheckpoint
from comol.training.divergence import DivergenceGuard
from comol.training.progress import ProgressLog


def test_callbacks_come_from_the_config_group(tmp_path):
    cfg = compose(["trainer=debug", "select_best=val/loss", "divergence.policy=skip", f"paths.output_dir={tmp_path}"])
    cbs = build_callbacks(cfg.callbacks, checkpoint={"run_config": {"seed": 0}})
    assert [type(c) for c in cbs] == [ProgressLog, BestAdapterKeeper, DivergenceGuard, RunCheckpoint]  # no bar off a tty
    keeper, guard, ckpt = cbs[1], cbs[2], cbs[3]
    assert keeper.monitor == "val/loss" and guard.policy == "skip" and ckpt.config == {"seed": 0}
    assert ckpt.every_n_steps == 1          # auto: debug's 5 steps -> every step
    # select_best=null drops the keeper; an entry set to null is dropped; a user's own callback is added
    cfg = compose(["trainer=debug", "callbacks.divergence=null", f"paths.output_dir={tmp_path}",
                   "+callbacks.extra={_target_: comol.training.progress.ProgressLog, interval_s: 5}"])
    cbs = build_callbacks(cfg.callbacks, checkpoint={"run_config": {}})
    assert [type(c) for c in cbs] == [ProgressLog, RunCheckpoint, ProgressLog] and cbs[2].interval_s == 5


def test_one_results_writer_merges_and_marks_nonfinite_failed(tmp_path):
    write_results(tmp_path, {"eval/math/gsm8k/acc": 0.5, "eval/math/mean_acc": 0.5, "train/steps": 3}, "math")
    merged = write_results(tmp_path, {"eval/math/AddSub/acc": float("inf"), "eval/math/mean_acc": 0.25}, "math")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == merged
    assert "eval/math/gsm8k/acc" not in on_disk            # the task's stale keys are replaced, others kept
    assert on_disk["train/steps"] == 3 and on_disk["eval/math/AddSub/acc"] is None and on_disk["status"] == "failed"


class _Recorder:
    closed: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def finalize(self, status):
        _Recorder.closed.append(status)


@pytest.mark.parametrize("fail", [False, True])
def test_loggers_are_closed_once_whatever_happens(fail):
    _Recorder.closed = []
    cfg = OmegaConf.create({"logger": {"a": {"_target_": f"{__name__}._Recorder"}, "off": None}})
    if fail:
        with pytest.raises(RuntimeError), open_loggers(cfg) as loggers:
            raise RuntimeError("boom")
    else:
        with open_loggers(cfg, extra={"a": {"version": 3}}) as loggers:
            assert loggers.loggers[0].kwargs == {"version": 3}
    assert _Recorder.closed == ["failed" if fail else "success"]
