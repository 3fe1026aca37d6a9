"""Adapter presets as the config layer reads them: the hyperparameters a run will use, its method label and
run-name stem. A preset (``conf/adapter/<name>.yaml``) states only what differs from the adapter's
dataclass defaults (``comol.adapters``), plus ``label`` and ``run_name``, e.g.

    name: comol_nocr          # (via defaults: [comol])
    core_router: false
    label: 'CoMoL w/o CR'
    run_name: comol_nocr-r{r}-N{num_experts}

The dataclass defaults themselves reach the composed config through Hydra's ConfigStore: each base preset
starts with ``defaults: [dataclass_<name>, _self_]``, a node ``register_adapter_defaults`` stores from the
dataclass (so ``adapter.r=32`` overrides an existing key and ``${adapter.r}`` resolves). ``adapter_values``
completes any adapter node the same way (alpha null shown as r), and ``${comol_adapter_run_name:${adapter}}``
(registered by comol.config) formats the run-name stem from it.
"""

from __future__ import annotations

from typing import Any, Mapping

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from comol.adapters import PRESET_KEYS, adapter_config_class, adapter_defaults, registered_adapters  # noqa: F401

#: the ConfigStore option of an adapter's dataclass defaults, in group ``adapter``
DEFAULTS_OPTION = "dataclass_{name}"


def register_adapter_defaults() -> None:
    """Store ``adapter/dataclass_<name>``: ``name`` and every field's dataclass default, for each adapter."""
    store = ConfigStore.instance()
    for name in registered_adapters():
        store.store(group="adapter", name=DEFAULTS_OPTION.format(name=name),
                    node={"name": name, **adapter_defaults(adapter_config_class(name))})
from comol.errors import ConfigError
from comol.schema_base import plain_config


def adapter_values(node: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """``name`` and every field of the adapter a run builds from ``node``: the dataclass defaults with the
    node's values over them (``alpha: null`` shown as r, the value it stands for). Without label/run_name."""
    values = {k: v for k, v in plain_config(node).items() if k not in PRESET_KEYS}
    if "name" not in values:
        raise ConfigError("adapter.name is missing")
    out = {"name": values["name"], **adapter_defaults(adapter_config_class(values["name"])), **values}
    if "alpha" in out and out["alpha"] is None:
        out["alpha"] = out["r"]
    return out


def adapter_run_name(node: Mapping[str, Any] | DictConfig) -> str:
    """The preset's ``run_name`` stem with its ``{field}`` placeholders filled from ``adapter_values``
    (a preset without one: the adapter name)."""
    plain = plain_config(node)
    pattern = plain.get("run_name") or str(plain.get("name"))
    try:
        return pattern.format(**adapter_values(plain))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"adapter.run_name={pattern!r} names {e} which is not a field of adapter "
                          f"{plain.get('name')!r}: expected {{field}} placeholders such as {{r}}") from None
