"""Every comol CLI parses its command line with argparse: ``--help`` exits 0 and prints the usage with its flags,
and a bad flag of the override-taking CLIs is one ``error: ...`` line with exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKTREE = str(Path(__file__).resolve().parents[1])

#: module -> a flag its --help must list
CLIS = {
    "comol.params": "--table",
    "comol.tools.sweeps": "--estimate",
    "comol.tools.report": "--help",
    "comol.tools.bench": "--help",
    "comol.export": "--help",
    "comol.routing": "--help",
    "comol.eval.execute": "--help",
}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": WORKTREE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=180, cwd=WORKTREE,
                          env=env)


@pytest.mark.parametrize("module,flag", sorted(CLIS.items()))
def test_help_exits_0_and_prints_usage(module, flag):
    proc = _run(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and flag in proc.stdout, proc.stdout[:2000]


@pytest.mark.parametrize("module", ["comol.params", "comol.tools.sweeps"])
def test_unknown_flag_is_one_line_error(module):
    proc = _run(module, "table2" if module.endswith("sweeps") else "model=qwen3_8b", "--bogus")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unrecognized arguments: --bogus"
