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
from comol.data import SFTDataModule
from comol.errors import ConfigError
from comol.eval.runner import run_evaluation
from comol.io_utils import atomic_write_json, atomic_write_text
from comol.models import load_backbone
from comol.models.best_adapter import BestAdapterKeeper
from comol.models.lit_module import AdapterLM
from comol.preflight import preflight
from comol.run_dir import claim_run_dir

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
    raise ConfigError(f"mode={mode!r} is invalid: expected 'train' or 'eval'")


def start_job(cfg: DictConfig, mode: str):
    """The start of every job: claim its dir, record the resolved config, check everything before any work."""
    out_dir = Path(cfg.paths.output_dir)
    claim_run_dir(out_dir, resume=bool(cfg.get("resume", False)), mode=mode)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    checked = preflight(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return out_dir, checked


def train_and_evaluate(cfg: DictConfig) -> dict[str, float]:
    out_dir, checked = start_job(cfg, "train")
    model, tokenizer = load_backbone(cfg.model)
    adapter_cfg = inject_adapter(model, _container(cfg.adapter))
    trainable, total = count_parameters(model)
    log.info("adapter %s: %d trainable / %d total parameters (%.4f%%)", adapter_cfg.name, trainable, total,
             100 * trainable / total)

    splits = checked.splits
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
        metrics = run_evaluation(model, tokenizer, _container(cfg.eval), out_dir, toy_rows=splits.get("test"),
                                 preloaded=checked.eval_rows)
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
    """``mode=eval adapter_path=<dir>``: rebuild the adapter's backbone, load, evaluate into a fresh dir
    (by default ``<the adapter's run>/evals/<task>_<time>``: the run's own predictions and results stay as they are)."""
    out_dir, checked = start_job(cfg, "eval")
    adapter_dir = Path(cfg.adapter_path)
    model, tokenizer = load_backbone(checked.model_cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    adapter_cfg = load_adapter(model, adapter_dir)
    toy_rows = checked.splits.get("test")
    loggers = build_loggers(cfg)
    ok = False
    try:
        metrics = run_evaluation(model, tokenizer, _container(cfg.eval), out_dir, toy_rows=toy_rows,
                                 preloaded=checked.eval_rows)
        results = {"adapter_path": str(adapter_dir.resolve()), "adapter": adapter_cfg.name, **metrics}
        for lg in loggers:
            lg.log_metrics(metrics, step=0)
        write_results(out_dir, results, _container(cfg.eval))
        ok = True
        return results
    finally:
        finish_loggers(loggers, failed=not ok)
