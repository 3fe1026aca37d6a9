"""Checks of what an evaluation reads, run before the backbone is built: the evaluation files (read once here
and handed to the evaluation), prompts that would overflow the context, and for ``mode=eval`` the saved
adapter directory (its config against the schema and the backbone it will be loaded on, its checksum).
The config values themselves were checked already (comol/schema.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hydra.core.hydra_config import HydraConfig

from comol.adapters import build_adapter_config
from comol.adapters.inject import check_adapter_backbone, read_adapter_config, verify_adapter_weights
from comol.data.checks import token_lengths
from comol.data.prompts import build_prompt
from comol.errors import CheckpointError, ConfigError, DataError
from comol.eval.eval_files import load_eval_rows
from comol.eval.runner import set_path
from comol.schema import adapter_problems, context_problems, toy_set_problems, validate_group
from comol.schema_data import TOY_SOURCE
from comol.schema_eval import TOY_SET


def load_eval_sets(ev: Mapping[str, Any], has_toy: bool) -> dict[str, list[dict]]:
    """Read and check every evaluation file now (HumanEval: its presence; the sandbox reads it)."""
    rows: dict[str, list[dict]] = {}
    if ev.get("task", "none") == "none":
        return rows
    for name, source in dict(ev.get("sets") or {}).items():
        source = str(source)
        if source == TOY_SET:
            if not has_toy:
                raise ConfigError(f"eval.sets.{name}=toy_math needs dataset=toy_math (its held-out test split)")
            continue
        path = set_path(source, ev)
        if ev.get("task") == "code":
            if not path.is_file():
                raise DataError(f"eval.sets.{name}: evaluation file {path} does not exist")
            continue
        rows[name] = load_eval_rows(path)
    return rows


def prompt_length_warnings(sets: Mapping[str, list[dict]], tokenizer, ev: Mapping[str, Any],
                           context: int | None) -> list[str]:
    """One line per set whose prompts + ``eval.max_new_tokens`` exceed the model's context."""
    if context is None or ev.get("task", "none") in ("none", "code"):
        return []
    out, limit, new = [], ev.get("limit"), ev["max_new_tokens"]
    for name, rows in sets.items():
        lens = token_lengths(tokenizer, [build_prompt(r) for r in rows[:limit]])
        over = sum(n + new > context for n in lens)
        if over:
            out.append(f"eval set {name}: {over} of {len(lens)} prompts + eval.max_new_tokens={new} exceed the "
                       f"model's context ({context} tokens)")
    return out


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


def check_saved_adapter(cfg: Mapping[str, Any], model_given: bool | None = None) -> tuple[dict, dict, dict]:
    """``mode=eval``: (adapter_config.json, the backbone to build, the dataset whose held-out rows are scored).

    Everything read from the adapter dir is checked as a run config is, against the backbone it will be
    loaded on, before anything is allocated; the weights against their checksum."""
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
    verify_adapter_weights(adapter_dir, meta)
    return meta, dict(model_cfg), dataset
