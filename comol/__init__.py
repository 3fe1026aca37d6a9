"""comol: config-driven fine-tuning with mixtures of LoRA experts (CoMoL and baselines)."""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root (the folder holding run.py and conf/) when comol runs from a checkout.
ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
