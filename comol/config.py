"""Config helpers: OmegaConf resolvers, composing ``conf/`` outside of ``run.py``, and reading one
group option (e.g. an adapter preset) on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from comol import CONF_DIR, ROOT, default_data_dir, in_checkout
from comol.adapter_presets import PRESET_KEYS, adapter_run_name, register_adapter_defaults
from comol.errors import ConfigError


def project_root() -> str:
    """Where runs write ``outputs/``: the checkout (the folder holding run.py), else the working dir
    (an installed wheel must not write into site-packages)."""
    return str(ROOT if in_checkout() else Path.cwd())


def wandb_group(group: str | None, *, _root_: DictConfig) -> str | None:
    """``logger.wandb.group``: ``sweep.group`` when a sweep preset set it, else, in a multirun
    (``python run.py -m ...``), the name of its dir (``hydra.sweep.dir``): every job of a launch in one
    W&B group. A single run stays ungrouped."""
    if group:
        return group
    hydra = _root_.get("hydra") if "hydra" in _root_ else (HydraConfig.get() if HydraConfig.initialized() else None)
    if hydra is None or hydra.get("mode") != RunMode.MULTIRUN:
        return None
    return Path(str(hydra.sweep.dir)).name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("comol_wandb_group"):
        OmegaConf.register_new_resolver("comol_wandb_group", wandb_group)
    if not OmegaConf.has_resolver("comol_root"):
        OmegaConf.register_new_resolver("comol_root", project_root)
    if not OmegaConf.has_resolver("comol_data_dir"):  # $COMOL_DATA_DIR, else the bundled data/
        OmegaConf.register_new_resolver("comol_data_dir", lambda: str(default_data_dir()))
    if not OmegaConf.has_resolver("comol_adapter_run_name"):  # the adapter preset's run-name stem, filled in
        OmegaConf.register_new_resolver("comol_adapter_run_name", adapter_run_name)
    register_adapter_defaults()  # conf/adapter presets build on adapter/dataclass_<name> (ConfigStore)


register_resolvers()


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides (no run dir is made)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def group_option(group: str, option: str) -> DictConfig:
    """``conf/<group>/<option>.yaml`` as one node, unresolved, its ``defaults:`` list (options of the same
    group and ``_self_``) merged in Hydra's order. Unlike :func:`compose` it needs no Hydra instance, so it
    also works inside a running ``run.py`` job."""
    path = CONF_DIR / group / f"{option}.yaml"
    stored = None if path.is_file() else ConfigStore.instance().repo.get(group, {}).get(f"{option}.yaml")
    if stored is not None:  # a node registered in code (the adapter dataclass defaults)
        return OmegaConf.create(OmegaConf.to_container(stored.node))
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
        raise ConfigError(f"{group}={option!r} has no file {path}; known: {known}")
    own = OmegaConf.load(path)
    parts = list(own.pop("defaults", None) or [])
    if "_self_" not in parts:
        parts.append("_self_")
    return OmegaConf.merge(*(own if part == "_self_" else group_option(group, part) for part in parts))


def adapter_preset(name: str, overrides: Mapping[str, Any] = ()) -> dict[str, Any]:
    """The hyperparameters stated by ``conf/adapter/<name>.yaml`` (its ``defaults:`` merged, without ``name``,
    ``label`` and ``run_name``), ``overrides`` merged over them. Fields it leaves out take the dataclass
    defaults when the config is built."""
    node = OmegaConf.merge(group_option("adapter", name), dict(overrides))
    values = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in values.items() if k != "name" and k not in PRESET_KEYS}
