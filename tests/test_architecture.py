"""The import layers of docs/architecture.md, enforced: ``lint-imports`` with the contract in .importlinter
(entry points > job > train/eval/data/models > config > adapters > errors/io; adapters import no Hydra,
OmegaConf or Lightning). import-linter reads every import, function-level ones included."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; "
        "sys.exit(c.main(args=['--no-cache'], standalone_mode=False))"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=root, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def _tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "comol", tmp_path / "comol", ignore=shutil.ignore_patterns("__pycache__", "conf", "metrics"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_import_contract_holds():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module,line,refusal", [
    # the adapters importing the job, even inside a function
    ("adapters/lora.py", "import comol.job", "comol.adapters is not allowed to import comol.job"),
    # the adapters importing OmegaConf: no longer a standalone library
    ("adapters/base.py", "import omegaconf", "comol.adapters is not allowed to import omegaconf"),
])
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, line, refusal):
    """Control: the contract can fail."""
    root = _tree(tmp_path)
    path = root / "comol" / module
    path.write_text(path.read_text() + f"\n\ndef _hidden():\n    {line}  # noqa: F401\n")
    proc = _lint(root)
    assert proc.returncode != 0 and refusal in proc.stdout, proc.stdout[-3000:]
