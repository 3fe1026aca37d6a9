"""One job: build backbone -> inject adapter -> train -> save adapter -> evaluate -> results.json.

``run(cfg)`` is what ``run.py`` calls; it returns the metrics dict (tests call it directly).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from comol.adapters import count_parameters, inject_adapter, load_adapter, save_adapter
from comol.adapters.inject import read_adapter_config
from comol.data import SFTDataModule, dataset_splits
from comol.errors import ConfigError
from comol.eval.generate import decoding_config
from comol.eval.runner import run_evaluation
from comol.io_utils import atomic_write_json, atomic_write_text
from comol.models import load_backbone
from comol.models.best_adapter import BestAdapterKeeper
from comol.models.lit_module import AdapterLM

log = logging.getLogger(__name__)


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is not None and "_target_" in node:
            loggers.append(instantiate(node))
    return loggers


def finish_loggers(loggers: list, failed: bool = False) -> None:
    """Close every logger; ``wandb.finish()`` makes each multirun job its own W&B run."""
    for lg in loggers:
        if lg.__class__.__name__ == "WandbLogger":
            import wandb

            wandb.finish(exit_code=1 if failed else 0)
        else:
            lg.finalize("failed" if failed else "success")


def write_results(out_dir: Path, results: dict, eval_cfg: dict | None = None) -> Path:
    """Merge ``results`` into ``out_dir/results.json`` atomically; an evaluation that is run again
    replaces its own ``eval/<task>/...`` keys instead of piling up stale ones."""
    path = out_dir / "results.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    task = (eval_cfg or {}).get("task")
    if task and task != "none":
        old = {k: v for k, v in old.items() if not k.startswith(f"eval/{task}/")}
    return atomic_write_json(path, {**old, **results})


def run(cfg: DictConfig) -> dict[str, float]:
    mode = cfg.get("mode", "train")
    if mode == "train":
        return train_and_evaluate(cfg)
    if mode == "eval":
        return evaluate_saved(cfg)
    if mode == "base":
        return evaluate_base(cfg)
    raise ConfigError(f"mode={mode!r} is invalid: expected 'train', 'eval' or 'base'")


def check_eval_config(eval_cfg: dict, tokenizer=None) -> None:
    """Fail before training, not after it, on decoding settings that generation would reject."""
    if eval_cfg.get("task", "none") != "none" and eval_cfg.get("sets"):
        decoding_config(eval_cfg.get("decoding") or {}, int(eval_cfg.get("max_new_tokens", 1)), tokenizer)


def train_and_evaluate(cfg: DictConfig) -> dict[str, float]:
    out_dir = Path(cfg.paths.output_dir)
    for taken in ("results.json", "adapter"):
        if (out_dir / taken).exists():
            raise ConfigError(f"{out_dir} already holds a run ({taken}): a run never overwrites another; "
                              f"choose another hydra.run.dir / sweep.id")
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    check_eval_config(_container(cfg.eval))
    model, tokenizer = load_backbone(cfg.model)
    adapter_cfg = inject_adapter(model, _container(cfg.adapter))
    trainable, total = count_parameters(model)
    log.info("adapter %s: %d trainable / %d total parameters (%.4f%%)", adapter_cfg.name, trainable, total,
             100 * trainable / total)

    splits = dataset_splits(_container(cfg.dataset))
    datamodule = SFTDataModule(_container(cfg.dataset), tokenizer, seed=int(cfg.seed), splits=splits)
    lit = AdapterLM(model, _container(cfg.optim), aux_loss_coeff=adapter_cfg.aux_loss_coeff)

    loggers = build_loggers(cfg)
    ok = False
    try:
        for lg in loggers:
            lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True),
                                "params/trainable": trainable, "params/total": total})
        keeper = BestAdapterKeeper(cfg.select_best) if cfg.get("select_best") else None
        trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, default_root_dir=str(out_dir),
                                         callbacks=[keeper] if keeper else None)
        start = time.time()
        trainer.fit(lit, datamodule=datamodule)
        train_time = time.time() - start
        model.to(trainer.strategy.root_device)  # fit's teardown moved it to the CPU: generate where we trained

        results: dict[str, float] = {
            "params/trainable": trainable,
            "params/total": total,
            "train/steps": trainer.global_step,
            "train/time_s": round(train_time, 2),
        }
        for key in ("train/loss", "val/loss"):
            if key in trainer.callback_metrics:
                results[f"{key}_final"] = float(trainer.callback_metrics[key])
        if keeper is not None and keeper.restore(model):
            results.update({f"train/best_{cfg.select_best}": keeper.best, "train/best_step": keeper.best_step})
            log.info("restored the adapter of step %d (%s = %.4f)", keeper.best_step, cfg.select_best, keeper.best)
        if cfg.get("save_adapter", True):
            save_adapter(model, out_dir / "adapter", base_model=_container(cfg.model),
                         extra={"seed": int(cfg.seed), "run_name": cfg.get("run_name"),
                                "dataset": _container(cfg.dataset)})
        metrics = run_evaluation(model, tokenizer, _container(cfg.eval), out_dir, toy_rows=splits.get("test"))
        results.update(metrics)
        for lg in loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            if hasattr(lg, "experiment") and lg.__class__.__name__ == "WandbLogger":
                lg.experiment.summary.update(results)
        atomic_write_json(out_dir / "results.json", results)
        ok = True
        return results
    finally:
        finish_loggers(loggers, failed=not ok)


def evaluate_saved(cfg: DictConfig) -> dict[str, float]:
    """``mode=eval adapter_path=<dir>``: rebuild the backbone named in the adapter's config, load, evaluate."""
    if not cfg.get("adapter_path"):
        raise ConfigError("adapter_path is missing: mode=eval needs adapter_path=<saved adapter dir>")
    adapter_dir = Path(cfg.adapter_path)
    meta = read_adapter_config(adapter_dir)
    model_cfg = meta.get("base_model") or _container(cfg.model)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    check_eval_config(_container(cfg.eval))
    model, tokenizer = load_backbone(model_cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    adapter_cfg = load_adapter(model, adapter_dir)
    toy_rows = None
    trained_on = meta.get("dataset") or {}
    if trained_on.get("source") == "toy_math":  # held-out rows of the very split the adapter was trained with
        toy_rows = dataset_splits(trained_on).get("test")
    elif cfg.dataset.get("source") == "toy_math":
        toy_rows = dataset_splits(_container(cfg.dataset)).get("test")
    loggers = build_loggers(cfg)
    ok = False
    try:
        metrics = run_evaluation(model, tokenizer, _container(cfg.eval), out_dir, toy_rows=toy_rows)
        results = {"adapter_path": str(adapter_dir.resolve()), "adapter": adapter_cfg.name, **metrics}
        for lg in loggers:
            lg.log_metrics(metrics, step=0)
        write_results(out_dir, results, _container(cfg.eval))
        ok = True
        return results
    finally:
        finish_loggers(loggers, failed=not ok)


def evaluate_base(cfg: DictConfig) -> dict[str, float]:
    """``mode=base``: evaluate the bare backbone (no adapter, no training): the zero-shot row of a sweep.
    The dataset's splits are still built (an eval_split dataset writes the held-out rows it is scored on)."""
    out_dir = Path(cfg.paths.output_dir)
    if (out_dir / "results.json").exists():
        raise ConfigError(f"{out_dir} already holds a run (results.json): choose another hydra.run.dir / sweep.id")
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    check_eval_config(_container(cfg.eval))
    splits = dataset_splits(_container(cfg.dataset))
    model, tokenizer = load_backbone(cfg.model, device="cuda" if torch.cuda.is_available() else "cpu")
    loggers = build_loggers(cfg)
    ok = False
    try:
        metrics = run_evaluation(model, tokenizer, _container(cfg.eval), out_dir, toy_rows=splits.get("test"))
        results = {"params/trainable": 0, "params/total": sum(p.numel() for p in model.parameters()),
                   "train/steps": 0, **metrics}
        for lg in loggers:
            lg.log_metrics(metrics, step=0)
        atomic_write_json(out_dir / "results.json", results)
        ok = True
        return results
    finally:
        finish_loggers(loggers, failed=not ok)
