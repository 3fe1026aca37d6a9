"""The package installs as a wheel (not editable) and its commands work from another directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from comol import ROOT


def see_these_site_packages(py) -> None:
    """``--system-site-packages`` gives a new venv the BASE interpreter's packages; when this one is
    itself a venv (its dependencies in its own site-packages), the new venv also needs those: a
    ``.pth`` file lists this interpreter's site-packages folders (plain folders: their own .pth
    files, e.g. an editable comol, are not processed, and the checkout is not among them, so comol
    still comes from the wheel). A conda env or a plain interpreter needs nothing."""
    if sys.prefix == sys.base_prefix:
        return
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in sys.path if os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages")]
    (Path(purelib) / "comol-test-outer-venv.pth").write_text("".join(p + "\n" for p in outer))


@pytest.mark.slow
def test_wheel_carries_the_config_tree_and_runs_from_elsewhere(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("comol-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "comol/conf/train.yaml" in names and "comol/conf/adapter/comol.yaml" in names
    assert any(n.startswith("comol/eval/metrics/") and n.endswith(".py") for n in names)
    # a venv that sees this interpreter's dependencies but gets comol only from the wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    see_these_site_packages(py)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import comol; print(comol.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where, where
    out = subprocess.run([str(py), "-m", "comol.params", "model=qwen3_8b", "adapter=lora"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1].startswith("24.77M "), out.stderr[-1500:]
    run = subprocess.run([str(venv / "bin" / "comol-run"), "trainer=debug", "trainer.max_steps=2", "logger=none",
                          "eval.limit=2", "dataset.train_size=16", "dataset.val_size=4"], cwd=elsewhere,
                         env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert list(elsewhere.glob("outputs/train/runs/*/results.json"))  # outputs land under the working dir
