"""trainer.reuse_host_memory: a CPU fit keeps freed host memory for reuse instead of faulting it in every step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from comol.config import compose
from comol.pipeline import run
from comol.training import host_memory

# A training step in miniature: the same tensors (one above glibc's largest mmap threshold, 32 MiB) allocated,
# written and freed every "step"; prints the minor page faults of each step.
STEPS = textwrap.dedent("""
    import resource, sys, torch
    from comol.training.host_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    torch.set_num_threads(1)
    for step in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        logits = torch.empty(716, 16384).fill_(1.0)           # 45 MiB
        hidden = [torch.empty(716, 1536).fill_(2.0) for _ in range(8)]
        del logits, hidden
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def step_faults(mode: str) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [int(line) for line in proc.stdout.split()]


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt is glibc's (this C library has none)")
def test_kept_memory_is_reused_without_page_faults_where_glibc_faults_every_step():
    default, kept = step_faults("default"), step_faults("keep")
    # 45 MiB of logits is 11,500 pages: glibc maps it fresh and faults it in on every step
    assert min(default[-4:]) > 10_000, default
    # kept: after the first steps have grown the heap, the same blocks are reused
    assert max(kept[-4:]) < 500, kept


def _recorded(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    monkeypatch.setattr("comol.job.keep_freed_memory", lambda: calls.append(True) or True)
    return calls


@pytest.mark.parametrize("setting, applied", [("true", 1), ("false", 0)])
def test_a_cpu_fit_keeps_host_memory_unless_turned_off(tmp_path, monkeypatch, setting, applied):
    calls = _recorded(monkeypatch)
    run(compose(["trainer=debug", "trainer.max_steps=1", "dataset.train_size=32", "dataset.val_size=4", "eval=none",
                 "logger=none", f"trainer.reuse_host_memory={setting}", f"paths.output_dir={tmp_path}"]))
    assert len(calls) == applied


def test_reuse_host_memory_is_comol_s_key_and_resume_safe():
    from comol.training.callbacks import lightning_trainer_node
    from comol.training.resume import config_differences

    node = compose(["trainer=cpu"]).trainer
    assert node.reuse_host_memory is True
    assert "reuse_host_memory" not in lightning_trainer_node(dict(node))
    saved = {"trainer": {"max_steps": 5}}     # a run saved before the key existed resumes with it
    assert config_differences(saved, {"trainer": {"max_steps": 5, "reuse_host_memory": True}}) == []
