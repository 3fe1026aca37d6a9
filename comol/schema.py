"""The typed schema of a composed run config, and ``validate_config``: every key checked once, before anything
is built.

``validate_config(cfg)`` takes the composed Hydra config (comol/conf/train.yaml and its groups) and returns a
:class:`RunConfig` (typed access to every value; ``.adapter`` is the built adapter config object), or raises
a :class:`~comol.schema_base.SchemaError` whose problems are one line each: ``key=value is invalid:
expected ...``. It runs in the Hydra callback :class:`SchemaCallback` (conf/hydra/default.yaml) before the
run dir is claimed, and again at the start of every job (comol/pipeline.py), so a multirun job and a test
that calls the job function in-process are checked too. Nothing is read from disk here: files and rows are
checked where they are read (comol/data/checks.py, comol/eval/eval_checks.py).

Where the types live: the common groups in comol/schema_groups.py, ``dataset`` in comol/schema_data.py,
``eval`` in comol/schema_eval.py; each adapter declares its own config dataclass beside its code
(``comol.adapters``, selected by ``adapter.name``). Checks that tie groups together are below
(:meth:`RunConfig.cross_problems`); the bounds of adapter sizes relative to the backbone are
:func:`adapter_problems`. Why pydantic: see comol/schema_base.py.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Literal, Mapping, get_args, get_type_hints

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from pydantic import create_model, field_validator

from comol.adapters import AdapterConfig, adapter_config_class, build_adapter_config
from comol.errors import ConfigError
from comol.schema_base import (Key, NonEmptyStr, PosFloat, PosInt, Schema, SchemaError, Seed, check, expected_text,
                               field_expected, invalid, plain_config)
from comol.schema_data import DatasetConfig, has_validation
from comol.schema_eval import EvalConfig, toy_sets
from comol.schema_groups import (CheckpointConfig, DivergenceConfig, LoggerConfig, ModelConfig, OptimConfig,
                                 PathsConfig, SweepInfo, TrainerConfig)

MODES = ("train", "eval", "base")
#: metrics ``select_best`` can follow (the keeper keeps the lowest value seen at a validation): the ones the
#: LightningModule logs during training (comol/models/lit_module.py)
SELECTABLE = {"val/loss": "the validation loss", "train/loss": "the last training loss"}
#: adapter sizes: a rank above the width of the layer it adapts adds parameters but no expressiveness. Up to
#: RANK_FACTOR x the backbone's widest projection is allowed, so that the small-scale twins keep the paper's
#: ranks on their 64-wide backbones (figure2_tiny: r=128, denselora: r=256); r=10**6 is a typo.
RANK_FACTOR = 4
#: experts per adapted module: the paper sweeps go to 64; more than this is a typo, not an experiment
MAX_EXPERTS = 1024


class ObjectiveConfig(Schema):
    """The float a Hydra sweeper optimises (comol/job.py ``objective``)."""

    metric: NonEmptyStr | None = Key("a results key (null: the eval task's primary metric; val/loss with eval=none)",
                                     default=None)
    direction: Literal["maximize", "minimize"] | None = Key("null: the task's direction (minimize for a loss)",
                                                           default=None)


class RunConfig(Schema):
    """The composed config of one run (``python run.py ...``): every group and top-level key."""

    task_name: NonEmptyStr = Key("Hydra task name (outputs/<task_name>/runs)", default="train")
    mode: Literal[MODES] = Key("train: fit, save, evaluate | eval: score adapter_path | base: the bare backbone",
                               default="train")
    adapter_path: NonEmptyStr | None = Key("the saved adapter dir of mode=eval", default=None)
    allow_backbone_mismatch: bool = Key("mode=eval: load an adapter on another backbone than its own",
                                        default=False)
    seed: Seed = Key("training seed", default=0)
    run_name: str = Key("the run's name (W&B, reports)", default="")
    method: str = Key("row label in reports (experiment presets give the paper's name)", default="")
    tags: list[str] = Key("W&B tags", default=[])
    sweep: SweepInfo = Key("filled in by sweep=<name>", default_factory=SweepInfo)
    save_adapter: bool = Key("write <run>/adapter after training", default=True)
    routing_stats: bool = Key("routed adapters: routing/<module>/... metrics and run summaries", default=True)
    routing_stats_every: PosInt = Key("training records routing statistics on 1 batch in N", default=1)
    progress_interval_s: PosFloat = Key("seconds between progress lines in train.log", default=30.0)
    select_best: str | None = Key("before saving/evaluating, restore the adapter of the best validation "
                                  "(null: the last)", expected="null or a metric logged during training: "
                                                               + ", ".join(SELECTABLE), default=None)
    resume: bool = Key("continue the run in hydra.run.dir from its last checkpoint", default=False)

    paths: PathsConfig = Key("where things are")
    model: ModelConfig = Key("the backbone (model=<name>)")
    adapter: Any = Key("the PEFT method (adapter=<name>): validated by its registered config class")
    dataset: DatasetConfig = Key("training data (dataset=<name>)")
    trainer: TrainerConfig = Key("Lightning trainer (trainer=<name>)")
    optim: OptimConfig = Key("optimizer")
    logger: LoggerConfig = Key("loggers (logger=wandb|csv|none)", default_factory=LoggerConfig)
    eval: EvalConfig = Key("evaluation (eval=<name>)")
    checkpoint: CheckpointConfig = Key("resumable checkpoints", default_factory=CheckpointConfig)
    divergence: DivergenceConfig = Key("what a non-finite loss does", default_factory=DivergenceConfig)
    plugins: list[NonEmptyStr] = Key("plug-in eval tasks: .py files, dirs of them or module names", default=[])
    objective: ObjectiveConfig = Key("what run.py returns to a Hydra sweeper", default_factory=ObjectiveConfig)
    callbacks: dict[str, dict[str, Any] | None] = Key("the Trainer's callbacks (callbacks=<name>): "
                                                      "{name: {_target_: ..., ...} or null}", default={})

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter(cls, v: Any) -> AdapterConfig:
        if isinstance(v, AdapterConfig):
            return v
        if not isinstance(v, Mapping):
            raise ConfigError(invalid("adapter", v, "a mapping with name (adapter=<name>)"))
        return build_adapter_config(v)

    @field_validator("select_best")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        if v is not None and v not in SELECTABLE:
            raise ConfigError(invalid("select_best", v, cls.model_fields["select_best"].json_schema_extra["expected"]))
        return v

    # ------------------------------------------------------------------------------------------- cross-field

    def cross_problems(self) -> list[str]:
        """Checks that tie groups together, one line each (all of them, not just the first)."""
        out: list[str] = []
        if self.mode == "eval" and not self.adapter_path:
            out.append("adapter_path is missing: mode=eval needs adapter_path=<saved adapter dir>")
        if self.mode != "eval":   # mode=eval: against the adapter's own backbone and data (eval_checks)
            out += adapter_problems(self.adapter, self.model)
            out += context_problems(self.dataset, self.eval, self.model, check_dataset=self.mode == "train")
            out += toy_set_problems(self.eval, self.dataset.source)
        if self.mode == "train":
            out += self._training_problems()
        return out

    def _training_problems(self) -> list[str]:
        out = []
        ds, t = self.dataset, self.trainer
        rows = ds.train_rows()
        if rows is not None and ds.batch_size > rows:
            out.append(invalid("dataset.batch_size", ds.batch_size, f"at most the {rows} training rows of "
                                                                    f"dataset={ds.name}"))
        if self.select_best == "val/loss":
            if not has_validation(ds):
                out.append(f"select_best='val/loss' is invalid here: dataset={ds.name} has no validation rows "
                           f"(expected {validation_key(ds)} > 0)")
            elif t.limit_val_batches == 0:
                out.append("select_best='val/loss' is invalid with trainer.limit_val_batches=0: no validation runs")
        if self.select_best and "fsdp" in t.strategy_name().lower():
            out.append(f"select_best={self.select_best!r} is invalid with trainer=fsdp (its in-memory copies would be "
                       f"FSDP shards): expected null, or trainer=ddp")
        if t.accelerator in ("gpu", "cuda") and not cuda_available():
            out.append(f"trainer.accelerator={t.accelerator} is invalid here: no CUDA device is visible "
                       f"(use trainer=cpu)")
        return out


def validation_key(ds: Any) -> str:
    return {"toy_math": "dataset.val_size", "eval_split": "dataset.val_per_set"}.get(ds.source, "dataset.val")


def cuda_available() -> bool:
    import torch   # only asked for trainer.accelerator=gpu

    return torch.cuda.is_available()


def adapter_problems(adapter: AdapterConfig, model: ModelConfig) -> list[str]:
    """Adapter sizes against the backbone they adapt (sane upper bounds; see RANK_FACTOR, MAX_EXPERTS)."""
    arch, out = model.arch, []
    widest = arch.widest()
    r = getattr(adapter, "r", None)
    if isinstance(r, int) and r > RANK_FACTOR * widest:
        out.append(invalid("adapter.r", r, f"at most {RANK_FACTOR * widest} ({RANK_FACTOR} x the widest projection "
                                           f"of model={model.name}, {widest})"))
    size = getattr(adapter, "adapter_size", None)
    if isinstance(size, int) and size > RANK_FACTOR * widest:
        out.append(invalid("adapter.adapter_size", size, f"at most {RANK_FACTOR * widest} ({RANK_FACTOR} x the "
                                                         f"widest projection of model={model.name})"))
    n = getattr(adapter, "num_experts", None)
    if isinstance(n, int) and n > MAX_EXPERTS:
        out.append(invalid("adapter.num_experts", n, f"at most {MAX_EXPERTS} experts per module"))
    prompt = getattr(adapter, "prompt_length", None)
    if isinstance(prompt, int) and prompt >= arch.max_position_embeddings:
        out.append(invalid("adapter.prompt_length", prompt, f"less than the model's context, "
                                                            f"model.arch.max_position_embeddings="
                                                            f"{arch.max_position_embeddings}"))
    return out


def context_problems(ds: Any, ev: Any, model: ModelConfig, check_dataset: bool = True) -> list[str]:
    """Token budgets against the backbone's context."""
    ctx, out = model.arch.max_position_embeddings, []
    if check_dataset and ds.max_length > ctx:
        out.append(invalid("dataset.max_length", ds.max_length,
                           f"at most the model's context, model.arch.max_position_embeddings={ctx}"))
    if ev.task != "none" and ev.sets and ev.max_new_tokens >= ctx:
        out.append(invalid("eval.max_new_tokens", ev.max_new_tokens,
                           f"less than the model's context, model.arch.max_position_embeddings={ctx}"))
    return out


def toy_set_problems(ev: Any, dataset_source: str | None) -> list[str]:
    """``eval.sets.<name>: toy_math`` scores the held-out split of dataset=toy_math: it needs that dataset."""
    return [f"eval.sets.{name}=toy_math needs dataset=toy_math (its held-out test split)"
            for name in toy_sets(ev) if dataset_source != "toy_math"]


# ----------------------------------------------------------------------------------------------- entry points

def validate_config(cfg: DictConfig | Mapping[str, Any]) -> RunConfig:
    """Check every key of a composed run config; raise SchemaError (one line per problem) or return it typed."""
    values = {k: v for k, v in plain_config(cfg).items() if k != "hydra"}
    run = check(RunConfig, values)
    problems = run.cross_problems()
    if problems:
        raise SchemaError(problems)
    return run


def validate_group(group: str, values: Any) -> Any:
    """Check one group node on its own (e.g. a saved adapter's backbone or dataset); errors name ``<group>.<key>``."""
    node = plain_config(values)
    if group not in _HOLDERS:
        info = RunConfig.model_fields[group]
        _HOLDERS[group] = create_model(f"{group}_holder", __base__=Schema, **{group: (info.annotation, info)})
    return getattr(check(_HOLDERS[group], {group: node}), group)


_HOLDERS: dict[str, type[Schema]] = {}   # one tiny model per group, holding just that group


# ----------------------------------------------------------------------------------------------- Hydra callback

def job_config(config: DictConfig) -> DictConfig:
    """The job's config as the task function will see it, from the config Hydra hands its callbacks before
    the run dir exists: without ``hydra``, with ``paths.output_dir`` set to the run dir it will be."""
    job = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    run_dir = os.path.abspath(str(config.hydra.run.dir))
    job.pop("hydra", None)
    if OmegaConf.is_interpolation(job.paths, "output_dir"):
        job.paths.output_dir = run_dir
    return job


class SchemaCallback(Callback):
    """Validates a single run's config in Hydra's ``on_run_start``: before the run dir is claimed or Hydra
    writes anything into it, a bad value prints one ``error:`` line per problem and exits 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate_config(job_config(config))
        except ConfigError as e:
            for line in getattr(e, "problems", None) or [str(e)]:
                print(f"error: {line}", file=sys.stderr)
            sys.exit(2)


# ----------------------------------------------------------------------------------------------- help text

def _classes(tp: Any) -> list[type]:
    """The classes a type annotation names (through unions and ``Annotated``, e.g. the tagged eval union)."""
    return [tp] if isinstance(tp, type) else [c for a in get_args(tp) for c in _classes(a)]


def describe_key(dotted: str, adapter: str = "comol") -> tuple[str, str]:
    """(help text, expected values) of a dotted key, from the schema (``adapter.<field>``: the config
    dataclass of ``adapter=<adapter>``); ``python run.py --help`` prints them."""
    head, _, rest = dotted.partition(".")
    if head == "adapter" and rest:
        cls = adapter_config_class(adapter)
        f = next(f for f in dataclasses.fields(cls) if f.name == rest)
        return f.metadata.get("help", ""), expected_text(get_type_hints(cls)[rest])
    tp: Any = RunConfig
    info = None
    for part in dotted.split("."):
        models = _classes(tp)
        found = [m.model_fields[part] for m in models if issubclass(m, Schema) and part in m.model_fields]
        info = next((i for i in found if i.annotation is not Any), found[0])   # toy_math's unused train: last
        tp = info.annotation
    return info.description or "", field_expected(info)
