"""comol: config-driven fine-tuning with mixtures of LoRA experts (CoMoL and baselines)."""

import os
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


#: Environment variable pointing at another data folder (``eval/``, ``train/``) than the bundled one.
DATA_ENV_VAR = "COMOL_DATA_DIR"
#: The evaluation sets and validation splits shipped with the repository (see data/README.md).
BUNDLED_DATA_DIR = ROOT / "data"


def default_data_dir() -> Path:
    """The data folder: ``$COMOL_DATA_DIR`` when set, else the repository's bundled ``data/``.

    The folder is returned even if it does not exist; callers that need it use
    :func:`require_data_dir`.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    # a checkout (run.py beside data/); an installed wheel has no data/: ./data of the working dir
    return BUNDLED_DATA_DIR if in_checkout(ROOT) else Path.cwd() / "data"
