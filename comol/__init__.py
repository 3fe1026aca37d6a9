"""comol: config-driven fine-tuning with mixtures of LoRA experts (CoMoL and baselines)."""

from pathlib import Path

__version__ = "0.1.0"

#: The installed package folder (holds conf/, the Hydra config tree, in a checkout and in a wheel).
PACKAGE_DIR = Path(__file__).resolve().parent
#: Repository root (the folder holding run.py and data/) when comol runs from a checkout.
ROOT = PACKAGE_DIR.parent
CONF_DIR = PACKAGE_DIR / "conf"


def in_checkout(root: Path = ROOT) -> bool:
    """True when comol runs from a git checkout (run.py and data/ beside the package), not a wheel."""
    return (root / "run.py").is_file()
