"""The import layers of docs/architecture.md, enforced: ``lint-imports`` with the contract in .importlinter
(entry points > job > train/eval/data/models > config > adapters > errors/io; adapters import no Hydra,
OmegaConf or Lightning). import-linter reads every import, function-level ones included."""

import shutil
import subprocess
import sys
from pathlib import Path

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


def test_an_upward_import_breaks_the_contract(tmp_path):
    """Control: the contract can fail. The adapters importing the job (even inside a function) is refused."""
    root = _tree(tmp_path)
    lora = root / "comol" / "adapters" / "lora.py"
    lora.write_text(lora.read_text() + "\n\ndef _hidden():\n    import comol.job  # noqa: F401\n")
    proc = _lint(root)
    assert proc.returncode != 0 and "comol.adapters is not allowed to import comol.job" in proc.stdout, proc.stdout[-3000:]


def test_adapters_importing_hydra_breaks_the_standalone_contract(tmp_path):
    root = _tree(tmp_path)
    base = root / "comol" / "adapters" / "base.py"
    base.write_text(base.read_text() + "\n\ndef _hidden():\n    import omegaconf  # noqa: F401\n")
    proc = _lint(root)
    assert proc.returncode != 0 and "comol.adapters is not allowed to import omegaconf" in proc.stdout, proc.stdout[-3000:]
