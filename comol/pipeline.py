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

from comol.adapters import adapter_context, count_parameters, inject_adapter, load_adapter, save_adapter
from comol.data import SFTDataModule
from comol.errors import ConfigError
from comol.eval.runner import run_evaluation
from comol.io_utils import atomic_write_json, atomic_write_text, nonfinite_keys, nonfinite_to_none
from comol.models import load_backbone
from comol.models.best_adapter import BestAdapterKeeper
from comol.models.lit_module import AdapterLM
from comol.models.progress import ProgressLog, StepProgressBar, on_terminal, quiet_libraries
from comol.models.wandb_logger import log_job_outputs
from comol.preflight import preflight
from comol.run_dir import claim_run_dir
from comol.training.checkpointing import RunCheckpoint, auto_every_n_steps, checkpoint_path
from comol.training.distributed import DistributedRun, is_global_zero
from comol.training.divergence import DivergenceError, DivergenceGuard, nonfinite_tensors
from comol.training.resume import continue_csv, load_resume_state, logger_resume_kwargs, wants_resume

log = logging.getLogger(__name__)


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_loggers(cfg: DictConfig, extra: dict[str, dict] | None = None) -> list:
    """``extra``: constructor arguments per logger name (a resumed run continues the same W&B run / CSV)."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is not None and "_target_" in node:
            loggers.append(instantiate(node, **(extra or {}).get(name, {})))
    return loggers


def finish_loggers(loggers: list, failed: bool = False) -> None:
    """Close every logger; ``wandb.finish()`` makes each multirun job its own W&B run."""
    for lg in loggers:
        if lg.__class__.__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:  # W&B's own banners are silenced (progress.quiet_libraries): one line instead
                run_dir = Path(wandb.run.dir).parent
                log.info("W&B run %s (%s): %s%s", wandb.run.id, wandb.run.settings.mode, run_dir,
                         f" | upload: wandb sync {run_dir}" if wandb.run.settings.mode == "offline" else "")

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
    return atomic_write_json(path, finite_results({**old, **results}))


def finite_results(results: dict) -> dict:
    """Valid JSON always: NaN/inf become null, and the job is marked failed (the report leaves it out)."""
    bad = nonfinite_keys(results)
    if not bad:
        return results
    log.error("non-finite results %s: the job is marked failed", bad)
    return {**nonfinite_to_none(results), "status": "failed", "failed_reason": f"non-finite values: {', '.join(bad)}"}


def evaluate_with_routing(model, tokenizer, cfg: DictConfig, out_dir: Path, toy_rows=None,
                          preloaded=None, routing_loads: dict | None = None) -> dict[str, float]:
    """``run_evaluation`` plus, for routed adapters, the routing summaries over the evaluation forwards
    (``routing/mean_entropy``, ``routing/dead_experts``, ``routing/max_load_ratio``); ``routing_loads``
    (a dict) receives the expert loads per module (``RoutingStats.loads()``) for the W&B heatmap."""
    evaluate = lambda: run_evaluation(model, tokenizer, _container(cfg.eval), out_dir,  # noqa: E731
                                      toy_rows=toy_rows, preloaded=preloaded)
    if not cfg.routing_stats or not hasattr(model, "comol_adapter_context"):
        return evaluate()
    with adapter_context(model).routing.collecting() as stats:
        metrics = evaluate()
        summary = stats.summary(per_module=False)
        if routing_loads is not None:
            routing_loads.update(stats.loads())
        return {**metrics, **summary}


def run(cfg: DictConfig) -> dict[str, float]:
    mode = cfg.get("mode", "train")
    if mode == "train":
        return train_and_evaluate(cfg)
    if mode == "eval":
        return evaluate_saved(cfg)
    if mode == "base":
        return evaluate_base(cfg)
    raise ConfigError(f"mode={mode!r} is invalid: expected 'train', 'eval' or 'base'")


def start_job(cfg: DictConfig, mode: str):
    """The start of every job: claim its dir, record the resolved config, check everything before any work.
    DDP ranks > 0 (started by Lightning's launcher with rank 0's run dir) neither claim nor write."""
    quiet_libraries()
    out_dir = Path(cfg.paths.output_dir)
    if is_global_zero():
        claim_run_dir(out_dir, resume=mode == "train" and wants_resume(cfg.get("resume")), mode=mode)
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    checked = preflight(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return out_dir, checked


def train_and_evaluate(cfg: DictConfig) -> dict[str, float]:
    out_dir = Path(cfg.paths.output_dir)
    if wants_resume(cfg.get("resume")) and (out_dir / "results.json").is_file():  # finished: say so, change nothing
        log.warning("%s holds a finished run (results.json): nothing to resume", out_dir)
        print(f"{out_dir} holds a finished run (results.json): nothing to resume")
        return json.loads((out_dir / "results.json").read_text())
    out_dir, checked = start_job(cfg, "train")
    resume_ckpt, resume_state = None, {}
    if wants_resume(cfg.get("resume")) and (cfg.get("resume") or checkpoint_path(out_dir).is_file()):
        resume_ckpt, resume_state = load_resume_state(out_dir, OmegaConf.to_container(cfg, resolve=True))
        log.info("resuming %s from step %d", out_dir, resume_state["global_step"])
    model, tokenizer = load_backbone(cfg.model)
    adapter_cfg = inject_adapter(model, _container(cfg.adapter))
    trainable, total = count_parameters(model)
    log.info("adapter %s: %d trainable / %d total parameters (%.4f%%)", adapter_cfg.name, trainable, total,
             100 * trainable / total)

    splits = checked.splits
    datamodule = SFTDataModule(_container(cfg.dataset), tokenizer, seed=int(cfg.seed), splits=splits)
    lit = AdapterLM(model, _container(cfg.optim), aux_loss_coeff=adapter_cfg.aux_loss_coeff,
                    routing_stats=bool(cfg.routing_stats), routing_stats_every=int(cfg.routing_stats_every),
                    compile=bool(cfg.trainer.get("compile", False)))

    loggers = build_loggers(cfg, logger_resume_kwargs(resume_state) if resume_ckpt is not None else None)
    if resume_ckpt is not None:
        continue_csv(loggers, resume_state)
    ok = False
    try:
        for lg in loggers:
            lg.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True),
                                "params/trainable": trainable, "params/total": total})
        keeper = BestAdapterKeeper(cfg.select_best) if cfg.get("select_best") else None
        every = cfg.checkpoint.every_n_steps   # conf/train.yaml holds the defaults of both blocks
        every = auto_every_n_steps(_container(cfg.trainer)) if every in ("auto", None) else int(every)
        guard = DivergenceGuard(cfg.divergence.policy, cfg.divergence.max_skips, lr=cfg.optim.lr)
        checkpointer = RunCheckpoint(out_dir, every, OmegaConf.to_container(cfg, resolve=True))
        bar = bool(cfg.trainer.enable_progress_bar) and on_terminal()  # redirected: progress lines instead
        callbacks = [ProgressLog(cfg.progress_interval_s)] + ([StepProgressBar()] if bar else [])
        callbacks += [c for c in (keeper, guard, checkpointer) if c is not None]
        multi = DistributedRun(out_dir)
        callbacks += multi.callbacks
        trainer_cfg = {k: v for k, v in _container(cfg.trainer).items() if k != "compile"}   # ours: AdapterLM
        trainer: L.Trainer = instantiate(trainer_cfg, logger=loggers or False, default_root_dir=str(out_dir),
                                         callbacks=callbacks, enable_progress_bar=bar)
        start = time.time()
        trainer.fit(lit, datamodule=datamodule, ckpt_path=resume_ckpt, weights_only=False)
        train_time = time.time() - start
        # several processes: close the process group; rank 0 alone saves, evaluates and writes
        model = multi.finish_fit(trainer, model, rebuild=lambda: _fresh_adapted_model(cfg))
        if model is None:
            ok = True
            return {"train/steps": trainer.global_step}
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
        if guard.skipped:
            results["train/skipped_steps"] = guard.skipped
        if resume_ckpt is not None:
            results["train/resumed_from_step"] = int(resume_state["global_step"])
        if keeper is not None and keeper.restore(model):
            results.update({f"train/best_{cfg.select_best}": keeper.best, "train/best_step": keeper.best_step})
            log.info("restored the adapter of step %d (%s = %.4f)", keeper.best_step, cfg.select_best, keeper.best)
        bad = nonfinite_tensors((n, p) for n, p in model.named_parameters() if p.requires_grad)
        if bad:   # never save NaN tensors as if they were a result
            raise DivergenceError(f"training diverged: {len(bad)} adapter tensors are non-finite (e.g. {bad[0]}) "
                                  f"after step {trainer.global_step}; nothing saved")
        if cfg.get("save_adapter", True):
            save_adapter(model, out_dir / "adapter", base_model=_container(cfg.model),
                         extra={"seed": int(cfg.seed), "run_name": cfg.get("run_name"),
                                "dataset": _container(cfg.dataset)})
        loads: dict = {}
        metrics = evaluate_with_routing(model, tokenizer, cfg, out_dir, toy_rows=splits.get("test"),
                                        preloaded=checked.eval_rows, routing_loads=loads)
        results.update(metrics)
        for lg in loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            if hasattr(lg, "experiment") and lg.__class__.__name__ == "WandbLogger":
                lg.experiment.summary.update(results)
        log_job_outputs(loggers, out_dir, trainer.global_step, routing_loads=loads,
                        adapter_dir=out_dir / "adapter" if cfg.get("save_adapter", True) else None)
        results = finite_results(results)
        atomic_write_json(out_dir / "results.json", results)
        ok = results.get("status") != "failed"
        return results
    finally:
        finish_loggers(loggers, failed=not ok)


def _fresh_adapted_model(cfg: DictConfig) -> torch.nn.Module:
    """The backbone with a freshly injected adapter (FSDP: rank 0 loads the gathered adapter into it)."""
    model, _ = load_backbone(cfg.model)
    inject_adapter(model, _container(cfg.adapter))
    return model


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
        loads: dict = {}
        metrics = evaluate_with_routing(model, tokenizer, cfg, out_dir, toy_rows=toy_rows, preloaded=checked.eval_rows,
                                        routing_loads=loads)
        results = {"adapter_path": str(adapter_dir.resolve()), "adapter": adapter_cfg.name, **metrics}
        for lg in loggers:
            lg.log_metrics(metrics, step=0)
        log_job_outputs(loggers, out_dir, 0, routing_loads=loads)
        write_results(out_dir, results, _container(cfg.eval))
        ok = True
        return results
    finally:
        finish_loggers(loggers, failed=not ok)


def evaluate_base(cfg: DictConfig) -> dict[str, float]:
    """``mode=base``: evaluate the bare backbone (no adapter, no training): the zero-shot row of a sweep.
    The dataset's splits are still built (an eval_split dataset writes the held-out rows it is scored on)."""
    out_dir, checked = start_job(cfg, "base")
    splits = checked.splits
    model, tokenizer = load_backbone(cfg.model, device="cuda" if torch.cuda.is_available() else "cpu")
    loggers = build_loggers(cfg)
    ok = False
    try:
        metrics = run_evaluation(model, tokenizer, _container(cfg.eval), out_dir, toy_rows=splits.get("test"),
                                 preloaded=checked.eval_rows)
        results = {"params/trainable": 0, "params/total": sum(p.numel() for p in model.parameters()),
                   "train/steps": 0, **metrics}
        for lg in loggers:
            lg.log_metrics(metrics, step=0)
        log_job_outputs(loggers, out_dir, 0)
        atomic_write_json(out_dir / "results.json", results)
        ok = True
        return results
    finally:
        finish_loggers(loggers, failed=not ok)
