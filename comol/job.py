"""One job: composed config -> results.json, the same path for every mode.

    claim the run dir -> check everything (comol/preflight.py; the eval task reads its rows) -> build the
    backbone (+ a fresh adapter: train | the saved one: eval | none: base) -> [train] -> [save] ->
    evaluate (the task) -> write results.json (one writer, always the finite check)

``run(cfg)`` is what ``run.py`` calls; it returns the results dict (tests call it directly).
``objective(cfg, results)`` is the float a Hydra sweeper optimises (``objective.metric``/``direction``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from comol.adapters import count_parameters, inject_adapter, load_adapter, save_adapter
from comol.data import SFTDataModule
from comol.errors import ConfigError
from comol.eval.runner import evaluate_task
from comol.eval.tasks import EvalTask, build_task, load_plugins, task_class
from comol.io_utils import atomic_write_json, atomic_write_text, nonfinite_keys, nonfinite_to_none
from comol.models import load_backbone
from comol.models.lit_module import AdapterLM
from comol.models.wandb_logger import log_job_outputs
from comol.preflight import Checked, preflight
from comol.run_dir import claim_run_dir, release_run_dir
from comol.schema import plain_config, validate_config
from comol.training.best_adapter import BestAdapterKeeper
from comol.training.callbacks import build_callbacks, lightning_trainer_node
from comol.training.checkpointing import checkpoint_path
from comol.training.distributed import DistributedRun, is_global_zero
from comol.training.divergence import DivergenceError, DivergenceGuard, nonfinite_tensors
from comol.training.host_memory import keep_freed_memory
from comol.training.progress import on_terminal, quiet_libraries
from comol.training.resume import (continue_csv, load_resume_state, logger_resume_kwargs, previous_run_config,
                                   wants_resume)

log = logging.getLogger(__name__)

MODES = ("train", "eval", "base")
DIRECTIONS = ("maximize", "minimize")
#: The objective of a run that scores no evaluation task.
NO_TASK_OBJECTIVE = ("val/loss", "minimize")


# ----------------------------------------------------------------------------------------------- results

def finite_results(results: dict) -> dict:
    """Valid JSON always: NaN/inf become null, and the job is marked failed (the report leaves it out)."""
    bad = nonfinite_keys(results)
    if not bad:
        return results
    log.error("non-finite results %s: the job is marked failed", bad)
    return {**nonfinite_to_none(results), "status": "failed", "failed_reason": f"non-finite values: {', '.join(bad)}"}


def write_results(out_dir: Path, results: dict, task: str | None = None) -> dict:
    """The one writer of ``out_dir/results.json``: merged into what is there (an evaluation run again replaces
    its own ``eval/<task>/...`` keys instead of piling up stale ones), finite-checked, written atomically.
    Returns what was written."""
    path = out_dir / "results.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if task and task != "none":
        old = {k: v for k, v in old.items() if not k.startswith(f"eval/{task}/")}
    merged = finite_results({**old, **results})
    atomic_write_json(path, merged)
    return merged


# ----------------------------------------------------------------------------------------------- loggers

class JobLoggers:
    """The job's experiment loggers (``logger.*`` nodes with a ``_target_``); :func:`open_loggers` closes them."""

    def __init__(self, loggers: list):
        self.loggers = loggers
        self.failed = False

    def log_hyperparams(self, params: dict) -> None:
        for lg in self.loggers:
            lg.log_hyperparams(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step=step)

    def summarize(self, results: dict, task: EvalTask | None) -> None:
        """W&B run summary: every result, the task's metrics summarised in the task's direction."""
        for lg in self.loggers:
            if isinstance(lg, WandbLogger):
                run = lg.experiment
                if task is not None and task.primary_key():
                    run.define_metric(task.primary_key(), summary="max" if task.direction == "maximize" else "min")
                run.summary.update(results)

    def close(self, failed: bool) -> None:
        for lg in self.loggers:
            if isinstance(lg, WandbLogger):
                import wandb  # the wandb package itself: only when a W&B logger was configured

                if wandb.run is not None:  # W&B's own banners are silenced (quiet_libraries): one line instead
                    run_dir = Path(wandb.run.dir).parent
                    log.info("W&B run %s (%s): %s%s", wandb.run.id, wandb.run.settings.mode, run_dir,
                             f" | upload: wandb sync {run_dir}" if wandb.run.settings.mode == "offline" else "")
                wandb.finish(exit_code=1 if failed else 0)   # each multirun job its own W&B run
            else:
                lg.finalize("failed" if failed else "success")


@contextmanager
def open_loggers(cfg: DictConfig, extra: dict[str, dict] | None = None) -> Iterator[JobLoggers]:
    """Open the loggers of ``cfg.logger`` and close them whatever happens (failed: an exception, or
    ``.failed`` set by the job). ``extra``: constructor arguments per logger name (a resumed run continues
    the same W&B run / CSV)."""
    loggers = [instantiate(node, **(extra or {}).get(name, {}))
               for name, node in (cfg.get("logger") or {}).items() if node is not None and "_target_" in node]
    job_loggers = JobLoggers(loggers)
    try:
        yield job_loggers
    except BaseException:
        job_loggers.close(failed=True)
        raise
    job_loggers.close(failed=job_loggers.failed)


# ----------------------------------------------------------------------------------------------- objective

def objective_direction(metric: str | None, task_name: str, plugins=None) -> str:
    """The direction of ``metric`` (null: the task's primary metric): the task's own for its metrics, minimize
    for a loss (``val/loss`` is the objective of eval=none), else maximize."""
    load_plugins(plugins)
    cls = task_class(task_name)
    if metric is None:
        return cls.direction if cls.primary_metric else NO_TASK_OBJECTIVE[1]
    if metric.startswith(f"eval/{task_name}/"):
        return cls.direction
    return "minimize" if "loss" in metric.rsplit("/", 1)[-1] else "maximize"


def objective_spec(cfg: DictConfig | dict, task: EvalTask | None = None) -> tuple[str, str]:
    """(results key, direction) a sweeper optimises: ``objective.metric`` / ``objective.direction`` when set,
    else the eval task's primary metric and direction; ``val/loss`` (minimize) when no task scores anything."""
    node = cfg.get("objective") or {}
    if task is None:
        task = build_task(plain_config(cfg.eval), plain_config(cfg.get("plugins")))
    metric = node.get("metric") or task.primary_key() or NO_TASK_OBJECTIVE[0]
    direction = node.get("direction") or objective_direction(metric, task.name)
    if direction not in DIRECTIONS:
        raise ConfigError(f"objective.direction={direction!r} is invalid: expected maximize or minimize")
    return metric, direction


def _direction_resolver(direction: str | None, metric: str | None, task_name: str, plugins=None) -> str:
    """``${comol_objective_direction:${objective.direction},${objective.metric},${eval.task},${plugins}}``:
    the direction a sweeper config (conf/hparams_search/) hands Optuna."""
    if direction in (None, "null", ""):
        direction = objective_direction(None if metric in (None, "null", "") else str(metric), str(task_name),
                                        list(plugins or []))
    if direction not in DIRECTIONS:
        raise ConfigError(f"objective.direction={direction!r} is invalid: expected maximize or minimize")
    return direction


if not OmegaConf.has_resolver("comol_objective_direction"):
    OmegaConf.register_new_resolver("comol_objective_direction", _direction_resolver)


def objective(cfg: DictConfig, results: dict) -> float:
    """The objective's value in ``results`` (``val/loss`` is read as its final value); a missing or non-finite
    value is the worst one for its direction, so a sweeper ranks the trial last instead of failing it."""
    metric, direction = objective_spec(cfg)
    value = results.get(metric, results.get(f"{metric}_final"))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    log.warning("objective %s is %r in the results: reported as the worst value", metric, value)
    return -math.inf if direction == "maximize" else math.inf


# ----------------------------------------------------------------------------------------------- the job

def multirun_suffix() -> str:
    """``-j<job number>`` for a trial of a search sweeper (Optuna: trials share every other part of the run
    name), else '' (single runs, and the basic sweeper's jobs, whose overrides already name them apart)."""
    if not HydraConfig.initialized():
        return ""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or hc.job.get("num") is None:
        return ""
    # the basic sweeper's jobs differ in their overrides, and so in their names already; a search sweeper's
    # trials (Optuna) share every name-giving key but lr and friends: they get their trial number
    sweeper = str((hc.get("sweeper") or {}).get("_target_", ""))
    return "" if sweeper.endswith("BasicSweeper") else f"-j{hc.job.num}"


class Job:
    """One job of ``mode`` train | eval | base (see the module docstring)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.mode = cfg.get("mode", "train")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is invalid: expected 'train', 'eval' or 'base'")
        self.out_dir = Path(cfg.paths.output_dir)
        self.resume = self.mode == "train" and wants_resume(cfg.get("resume"))
        self.checked: Checked | None = None

    # -- steps
    def validate(self):
        """Every config value (the schema) and the eval task's own keys (plug-ins included), before the dir is
        claimed or anything is built; once per job."""
        if getattr(self, "validated", None) is None:
            self.validated = validate_config(self.cfg)
            build_task(plain_config(self.cfg.eval), plain_config(self.cfg.get("plugins")))
        return self.validated

    def start(self) -> Checked:
        """Claim the dir, record the resolved config, check everything before any work. DDP ranks > 0
        (started by Lightning's launcher with rank 0's run dir) neither claim nor write."""
        quiet_libraries()
        validated = self.validate()
        suffix = multirun_suffix()
        if suffix and not str(self.cfg.get("run_name") or "").endswith(suffix):
            self.cfg.run_name = f"{self.cfg.get('run_name')}{suffix}"   # W&B / adapter name of this trial
        if is_global_zero():
            claim_run_dir(self.out_dir, resume=self.resume, mode=self.mode)
            atomic_write_text(self.out_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self.checked = preflight(self.cfg, validated=validated)
        L.seed_everything(int(self.cfg.seed), workers=True, verbose=False)
        return self.checked

    def build(self) -> tuple[torch.nn.Module, Any, dict]:
        """The backbone (+ adapter) and the results that describe it."""
        cfg, checked = self.cfg, self.checked
        device = "cpu" if self.mode == "train" else "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_backbone(checked.model_cfg, device=device, tokenizer=checked.tokenizer)
        if self.mode == "train":
            adapter_cfg = inject_adapter(model, plain_config(cfg.adapter))
            self.aux_loss_coeff = adapter_cfg.aux_loss_coeff
            trainable, total = count_parameters(model)
            log.info("adapter %s: %d trainable / %d total parameters (%.4f%%)", adapter_cfg.name, trainable, total,
                     100 * trainable / total)
            return model, tokenizer, {"params/trainable": trainable, "params/total": total}
        if self.mode == "eval":
            adapter_dir = Path(cfg.adapter_path)
            adapter_cfg = load_adapter(model, adapter_dir, verified=checked.adapter)   # read and hashed once
            return model, tokenizer, {"adapter_path": str(adapter_dir.resolve()), "adapter": adapter_cfg.name}
        return model, tokenizer, {"params/trainable": 0, "params/total": sum(p.numel() for p in model.parameters()),
                                  "train/steps": 0}

    def train(self, model, tokenizer, loggers: JobLoggers, described: dict) -> tuple[torch.nn.Module | None, dict, int]:
        """Fit; returns (the model rank 0 evaluates, or None on other ranks; the training results; the step)."""
        cfg, out_dir = self.cfg, self.out_dir
        datamodule = SFTDataModule(plain_config(cfg.dataset), tokenizer, seed=int(cfg.seed), splits=self.checked.splits)
        lit = AdapterLM(model, plain_config(cfg.optim), aux_loss_coeff=self.aux_loss_coeff,
                        routing_stats=bool(cfg.routing_stats), routing_stats_every=int(cfg.routing_stats_every),
                        compile=bool(cfg.trainer.get("compile", False)))
        loggers.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **described})
        callbacks = build_callbacks(cfg.get("callbacks"),
                                    checkpoint={"run_config": OmegaConf.to_container(cfg, resolve=True)})
        keeper = next((c for c in callbacks if isinstance(c, BestAdapterKeeper)), None)
        guard = next((c for c in callbacks if isinstance(c, DivergenceGuard)), None)
        multi = DistributedRun(out_dir)
        bar = bool(cfg.trainer.enable_progress_bar) and on_terminal()  # redirected: progress lines instead
        trainer_cfg = lightning_trainer_node(plain_config(cfg.trainer))   # trainer.compile is AdapterLM's
        trainer: L.Trainer = instantiate(trainer_cfg, logger=loggers.loggers or False, default_root_dir=str(out_dir),
                                         callbacks=callbacks + multi.callbacks, enable_progress_bar=bar)
        if cfg.trainer.get("reuse_host_memory", True) and trainer.strategy.root_device.type == "cpu":
            keep_freed_memory()   # no page faults on every step (comol/training/host_memory.py)
        start = time.time()
        trainer.fit(lit, datamodule=datamodule, ckpt_path=self.resume_ckpt, weights_only=True)
        train_time = time.time() - start
        # several processes: close the process group; rank 0 alone saves, evaluates and writes
        model = multi.finish_fit(trainer, model, rebuild=self._fresh_adapted_model)
        results: dict[str, Any] = {"train/steps": trainer.global_step}
        if model is None:
            return None, results, trainer.global_step
        model.to(trainer.strategy.root_device)  # fit's teardown moved it to the CPU: generate where we trained
        results["train/time_s"] = round(train_time, 2)
        for key in ("train/loss", "val/loss"):
            if key in trainer.callback_metrics:
                results[f"{key}_final"] = float(trainer.callback_metrics[key])
        if guard is not None and guard.skipped:
            results["train/skipped_steps"] = guard.skipped
        if self.resume_ckpt is not None:
            results["train/resumed_from_step"] = int(self.resume_state["global_step"])
        if keeper is not None and keeper.restore(model):
            results.update({f"train/best_{cfg.select_best}": keeper.best, "train/best_step": keeper.best_step})
            log.info("restored the adapter of step %d (%s = %.4f)", keeper.best_step, cfg.select_best, keeper.best)
        bad = nonfinite_tensors((n, p) for n, p in model.named_parameters() if p.requires_grad)
        if bad:   # never save NaN tensors as if they were a result
            raise DivergenceError(f"training diverged: {len(bad)} adapter tensors are non-finite (e.g. {bad[0]}) "
                                  f"after step {trainer.global_step}; nothing saved")
        return model, results, trainer.global_step

    def _fresh_adapted_model(self) -> torch.nn.Module:
        """The backbone with a freshly injected adapter (FSDP: rank 0 loads the gathered adapter into it)."""
        model, _ = load_backbone(self.checked.model_cfg)
        inject_adapter(model, plain_config(self.cfg.adapter))
        return model

    def save(self, model) -> None:
        cfg = self.cfg
        save_adapter(model, self.out_dir / "adapter", base_model=plain_config(cfg.model),
                     extra={"seed": int(cfg.seed), "run_name": cfg.get("run_name"), "dataset": plain_config(cfg.dataset)})

    # -- the whole path
    def run(self) -> dict:
        cfg, out_dir = self.cfg, self.out_dir
        if self.resume and (out_dir / "results.json").is_file():  # finished: say so, change nothing
            log.warning("%s holds a finished run (results.json): nothing to resume", out_dir)
            print(f"{out_dir} holds a finished run (results.json): nothing to resume")
            return json.loads((out_dir / "results.json").read_text())
        self.validate()
        resolved = OmegaConf.to_container(cfg, resolve=True)
        previous = previous_run_config(out_dir, resolved) if self.resume else None   # before start() rewrites it
        checked = self.start()
        self.resume_ckpt, self.resume_state = None, {}
        if self.resume and (cfg.get("resume") or previous or checkpoint_path(out_dir).is_file()):
            self.resume_ckpt, self.resume_state = load_resume_state(out_dir, resolved, previous)
            log.info("resuming %s from step %d", out_dir, self.resume_state["global_step"])
        model, tokenizer, results = self.build()
        task = checked.task
        with open_loggers(cfg, logger_resume_kwargs(self.resume_state) if self.resume_state else None) as loggers:
            if self.resume_state:
                continue_csv(loggers.loggers, self.resume_state)
            step = 0
            if self.mode == "train":
                model, trained, step = self.train(model, tokenizer, loggers, results)
                if model is None:        # a DDP rank > 0: rank 0 owns the results
                    return trained
                results.update(trained)
                if cfg.get("save_adapter", True):
                    self.save(model)
            loads: dict = {}
            metrics = evaluate_task(task, model, tokenizer, out_dir,
                                    routing_stats=bool(cfg.routing_stats) and self.mode != "base", routing_loads=loads)
            results.update(metrics)
            loggers.log_metrics(metrics, step=step)
            loggers.summarize(results, task)
            saved = self.mode == "train" and cfg.get("save_adapter", True)
            log_job_outputs(loggers.loggers, out_dir, step, routing_loads=loads,
                            adapter_dir=out_dir / "adapter" if saved else None)
            results = write_results(out_dir, results, task.name)
            loggers.failed = results.get("status") == "failed"
            return results


def run(cfg: DictConfig) -> dict:
    """Run one job (``mode`` train | eval | base) and return its results."""
    try:
        return Job(cfg).run()
    finally:
        release_run_dir(cfg.paths.output_dir)   # the job is over: the dir may be resumed by another process
