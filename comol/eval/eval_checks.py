"""Checks of ``mode=eval``'s inputs, run before the backbone is built (the evaluation files are read and checked
by the eval task, comol/eval/tasks): the saved adapter directory (its config against the schema and the backbone it will be loaded on, its checksum).
The config values themselves were checked already (comol/schema.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hydra.core.hydra_config import HydraConfig

from comol.adapters import build_adapter_config
from comol.adapters.inject import VerifiedAdapter, check_adapter_backbone, read_adapter_config, verify_adapter_weights
from comol.errors import CheckpointError, ConfigError
from comol.schema import adapter_problems, context_problems, toy_set_problems, validate_group
from comol.schema_data import TOY_SOURCE


# ----------------------------------------------------------------------------------------------- mode=eval

def model_given_on_command_line() -> bool:
    """True when this Hydra job's overrides choose the backbone (model=..., model.*=..., experiment=...)."""
    try:
        if not HydraConfig.initialized():
            return False
        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001
        return False
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return any(k == "model" or k.startswith("model.") or k == "experiment" for k in keys)


def eval_backbone(cfg: Mapping[str, Any], adapter_dir: Path, meta: dict, model_given: bool | None) -> dict:
    """The backbone ``mode=eval`` builds: the adapter's own, unless the command line chose one (it must match)."""
    saved = meta.get("base_model") or {}
    given = dict(cfg["model"])
    if model_given is None:
        model_given = model_given_on_command_line()
    if not saved:
        return given
    if not model_given:
        return dict(saved)
    check_adapter_backbone(adapter_dir, meta, given, allow=bool(cfg.get("allow_backbone_mismatch", False)))
    return given


def check_saved_adapter(cfg: Mapping[str, Any], model_given: bool | None = None) -> tuple[VerifiedAdapter, dict, dict]:
    """``mode=eval``: (adapter_config.json and the weights' bytes, the backbone to build, the dataset whose
    held-out rows are scored).

    Everything read from the adapter dir is checked as a run config is, against the backbone it will be
    loaded on, before anything is allocated; the weights against their checksum (once: the job loads
    these bytes, see ``load_adapter(..., verified=)``)."""
    adapter_dir = Path(cfg["adapter_path"])
    meta = read_adapter_config(adapter_dir)
    where = adapter_dir / "adapter_config.json"
    try:
        adapter = build_adapter_config(meta["adapter"])
        model_cfg = eval_backbone(cfg, adapter_dir, meta, model_given)
        model = validate_group("model", model_cfg)
        trained_on = meta.get("dataset") or {}
        dataset = dict(trained_on) if trained_on.get("source") == TOY_SOURCE else dict(cfg["dataset"])
        ds = validate_group("dataset", dataset)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    problems = adapter_problems(adapter, model)
    if problems:
        raise CheckpointError(f"{where}: {problems[0]}")
    ev = validate_group("eval", dict(cfg["eval"]))
    problems = context_problems(ds, ev, model, check_dataset=False) + toy_set_problems(ev, ds.source)
    if problems:
        raise ConfigError(problems[0])
    return VerifiedAdapter(meta, verify_adapter_weights(adapter_dir, meta)), dict(model_cfg), dataset
