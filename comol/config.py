"""Config helpers: OmegaConf resolvers and composing ``conf/`` outside of ``run.py``."""

from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from comol import CONF_DIR, ROOT


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("comol_root"):
        OmegaConf.register_new_resolver("comol_root", lambda: str(ROOT))


register_resolvers()


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides (no run dir is made)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
