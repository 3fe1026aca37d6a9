"""Schema of the common config groups: ``model``, ``trainer``, ``optim``, ``logger``, ``paths``, ``checkpoint``,
``divergence``, ``sweep``. Each class lists every key its YAMLs (comol/conf/<group>/*.yaml) use, with type,
range, allowed values and help text; checks that tie two keys of one group together are its validators.
The machinery (strict types, one-line errors) is comol/schema_base.py; the whole config, comol/schema.py.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from comol.errors import ConfigError
from comol.schema_base import (Fraction, Key, NonEmptyStr, NonNegFloat, NonNegInt, PosFloat, PosInt,
                               Probability, Schema, Seed, UnitInterval, check, invalid, plain_config)

FAMILIES = ("qwen3", "llama")                       # comol.models.backbone maps each to a transformers config
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("constant", "cosine")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true", "64", "64-true",
              "transformer-engine", "transformer-engine-float16")
WANDB_MODES = ("online", "offline", "disabled", "shared")
DIVERGENCE_POLICIES = ("stop", "skip")


# ----------------------------------------------------------------------------------------------- model

class ArchConfig(Schema):
    """The architecture block: builds tiny random-init backbones and meta-device parameter counts."""

    hidden_size: PosInt = Key("width of the residual stream")
    num_layers: PosInt = Key("decoder layers")
    num_heads: PosInt = Key("attention (query) heads")
    num_kv_heads: PosInt = Key("key/value heads (grouped-query attention); divides num_heads")
    head_dim: PosInt = Key("width of one attention head")
    intermediate_size: PosInt = Key("MLP width")
    vocab_size: PosInt | None = Key("vocabulary size (null: the tokenizer's)", default=None)
    max_position_embeddings: PosInt = Key("context length in tokens", default=4096)
    tie_word_embeddings: bool = Key("share the input embedding and the LM head", default=False)
    rms_norm_eps: PosFloat | None = Key("RMSNorm epsilon (null: 1e-6)", default=None)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ArchConfig":
        if self.hidden_size % self.num_heads:
            raise ConfigError(invalid("model.arch.num_heads", self.num_heads,
                                      f"a divisor of model.arch.hidden_size={self.hidden_size}"))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(invalid("model.arch.num_kv_heads", self.num_kv_heads,
                                      f"a divisor of model.arch.num_heads={self.num_heads} (grouped-query attention)"))
        return self

    def widest(self) -> int:
        """The largest input/output width of a projection in a decoder layer."""
        return max(self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of the Linear layers of a Qwen3/Llama decoder layer, by module name."""
        h, q, kv, m = (self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                       self.intermediate_size)
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}


class GGUFPackage(Schema):
    module: NonEmptyStr = Key("the Python package holding the GGUF file")
    file: NonEmptyStr = Key("the GGUF file inside it")
    install: str = Key("the command that installs it (quoted in the error when it is missing)", default="")


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class ModelConfig(Schema):
    """A backbone: by hub id / local path / GGUF, or random-init from ``arch`` (all of those null)."""

    name: NonEmptyStr = Key("the backbone's name (run names, reports)")
    family: Literal[FAMILIES] = Key("architecture family")
    hub_id: NonEmptyStr | None = Key("Hugging Face hub id of the weights", default=None)
    path: NonEmptyStr | None = Key("a local folder with config.json + weights (takes precedence)", default=None)
    gguf_file: NonEmptyStr | None = Key("a GGUF file, converted once to a Hugging Face folder", default=None)
    gguf_package: GGUFPackage | None = Key("a pip package shipping a GGUF (the offline fallback)", default=None)
    tokenizer: NonEmptyStr | None = Key("'offline' (built here), a hub id / folder, or null (as the weights)",
                                        default=None)
    dtype: Literal[DTYPES] = Key("dtype of the frozen backbone weights", default="float32")
    gradient_checkpointing: bool = Key("recompute decoder layers in backward (less activation memory)",
                                       default=False)
    init_seed: Seed = Key("seed of a random-init backbone (every process builds the same one)", default=0)
    attn_implementation: Literal[ATTENTION] = Key("attention kernel (packed batches are laid out for it)",
                                                  default="sdpa")
    arch: ArchConfig = Key("the architecture block")


def check_model(model_cfg: Any) -> ModelConfig:
    """A ``model`` node (composed, or a saved adapter's ``base_model``) checked on its own."""
    return check(ModelConfig, plain_config(model_cfg), "model")


# ----------------------------------------------------------------------------------------------- optim

class OptimConfig(Schema):
    """AdamW with a linear warmup, then a constant or cosine schedule."""

    lr: Fraction = Key("peak learning rate")
    weight_decay: NonNegFloat = Key("AdamW weight decay", default=0.0)
    betas: list[Probability] = Key("AdamW (beta1, beta2)", expected="two numbers in [0, 1)", default=[0.9, 0.999],
                                   min_length=2, max_length=2)
    schedule: Literal[SCHEDULES] = Key("learning-rate schedule after the warmup", default="constant")
    warmup_steps: NonNegInt = Key("optimizer steps of linear warmup", default=0)


# ----------------------------------------------------------------------------------------------- trainer

class TargetNode(Schema):
    """A node Hydra instantiates (``_target_`` + its constructor arguments, checked against the class)."""

    model_config = {**Schema.model_config, "extra": "allow"}
    target: NonEmptyStr = Key("the class to build", alias="_target_")


def check_target_arguments(target: str, node: dict[str, Any], key: str) -> None:
    """Refuse a key the ``_target_`` class does not take (unless it takes ``**kwargs``)."""
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - any import problem is the value's fault
        raise ConfigError(invalid(f"{key}._target_", target, f"an importable class ({type(e).__name__})")) from None
    if set(node) <= {"_target_"}:
        return
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(node) - set(params) - {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not an argument of {target}")


class TrainerConfig(Schema):
    """``lightning.Trainer`` arguments (conf/trainer/*.yaml); other Trainer arguments may be added with
    ``+trainer.<name>=...`` and are checked against the Trainer's signature."""

    model_config = {**Schema.model_config, "extra": "allow"}

    target: NonEmptyStr = Key("the trainer class", alias="_target_", default="lightning.pytorch.Trainer")
    accelerator: Literal[ACCELERATORS] = Key("device type", default="auto")
    devices: PosInt | Literal["auto"] | list[NonNegInt] = Key(
        "devices per node: a count, 'auto' (all visible) or a list of indices",
        expected="an integer >= 1, 'auto' or a list of device indices", default="auto")
    num_nodes: PosInt = Key("nodes (multi-node DDP/FSDP under a cluster launcher)", default=1)
    strategy: NonEmptyStr | TargetNode = Key("'auto', a strategy name or a strategy node with _target_",
                                             default="auto")
    precision: Literal[PRECISIONS] | Literal[16, 32, 64] = Key(
        "numeric precision (32-true, bf16-mixed, ...)", expected="one of " + ", ".join(PRECISIONS), default="32-true")
    max_steps: PosInt | Literal[-1] = Key("optimizer steps (-1: by epochs)", default=-1)
    max_epochs: PosInt | Literal[-1] | None = Key("epochs (-1 / null: by steps)", default=None)
    accumulate_grad_batches: PosInt = Key("micro-batches per optimizer step", default=1)
    gradient_clip_val: NonNegFloat | None = Key("gradient norm clip (0 / null: none)", default=None)
    val_check_interval: PosInt | Fraction | None = Key(
        "training batches between validations, or a fraction of an epoch", default=None)
    check_val_every_n_epoch: PosInt | None = Key("validate every N epochs (null: by val_check_interval)", default=1)
    limit_val_batches: NonNegInt | UnitInterval | None = Key(
        "validation batches per validation (0: none), or a fraction", default=None)
    num_sanity_val_steps: Annotated[int, Field(ge=-1)] = Key("validation batches run before training (-1: all)",
                                                             default=0)
    log_every_n_steps: PosInt = Key("logging interval in optimizer steps", default=50)
    enable_checkpointing: bool = Key("Lightning's own checkpoints (comol checkpoints itself: false)", default=False)
    enable_progress_bar: bool = Key("a progress bar on a terminal (progress lines otherwise)", default=True)
    enable_model_summary: bool = Key("Lightning's model summary table", default=False)
    deterministic: bool | Literal["warn"] | None = Key("deterministic algorithms", default=False)
    compile: bool = Key("torch.compile the decoder blocks (comol's key, not the Trainer's)", default=False)
    reuse_host_memory: bool = Key(
        "a fit on the CPU keeps freed host memory for reuse (glibc mallopt; no page faults on every step; "
        "comol's key, not the Trainer's)", default=True)

    @model_validator(mode="after")
    def _ends_and_known_arguments(self) -> "TrainerConfig":
        if self.max_steps == -1 and self.max_epochs in (None, -1):
            raise ConfigError("trainer.max_steps=-1 with trainer.max_epochs=-1 is invalid: training would never end; "
                              "set one of them")
        check_target_arguments(self.target, {**(self.model_extra or {})}, "trainer")
        if isinstance(self.strategy, TargetNode):
            check_target_arguments(self.strategy.target, self.strategy.model_extra or {}, "trainer.strategy")
        return self

    def strategy_name(self) -> str:
        return self.strategy.target if isinstance(self.strategy, TargetNode) else self.strategy


# ----------------------------------------------------------------------------------------------- logger

class WandbConfig(Schema):
    """Weights & Biases through Lightning's WandbLogger (other ``wandb.init`` arguments may be added)."""

    model_config = {**Schema.model_config, "extra": "allow"}
    target: NonEmptyStr = Key("the logger class", alias="_target_")
    project: NonEmptyStr = Key("W&B project", default="comol")
    mode: Literal[WANDB_MODES] = Key("offline: sync later with `wandb sync` | online | disabled", default="offline")
    save_dir: NonEmptyStr = Key("where the offline run is written")
    name: str | None = Key("run name", default=None)
    group: str | None = Key("run group (a sweep's jobs share one)", default=None)
    tags: list[str] | None = Key("run tags", default=None)
    job_type: str | None = Key("job type (the mode)", default=None)
    log_model: bool | Literal["all"] = Key("upload checkpoints as artifacts", default=False)


class CSVConfig(Schema):
    target: NonEmptyStr = Key("the logger class", alias="_target_")
    save_dir: NonEmptyStr = Key("parent folder of the CSV logs")
    name: str | None = Key("subfolder name", default="lightning_logs")
    version: int | str | None = Key("version subfolder (null: the next free one)", default=None)


class LoggerConfig(Schema):
    """The ``logger`` group: zero or more named logger nodes (logger=none gives none)."""

    model_config = {**Schema.model_config, "extra": "allow"}
    wandb: WandbConfig | None = Key("Weights & Biases", default=None)
    csv: CSVConfig | None = Key("CSV files under the run dir", default=None)

    @model_validator(mode="after")
    def _other_loggers(self) -> "LoggerConfig":
        for name, node in (self.model_extra or {}).items():
            if node is None:
                continue
            if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
                raise ConfigError(invalid(f"logger.{name}", node, "a logger node with _target_ (or null)"))
            check_target_arguments(node["_target_"], node, f"logger.{name}")
        for name in ("wandb", "csv"):
            node = getattr(self, name)
            if node is not None:
                check_target_arguments(node.target, getattr(node, "model_extra", None) or {}, f"logger.{name}")
        return self


# ----------------------------------------------------------------------------------------------- small groups

class PathsConfig(Schema):
    root_dir: NonEmptyStr = Key("where outputs/ goes: the checkout, else the working dir")
    data_dir: NonEmptyStr = Key("the benchmark files (data/; $COMOL_DATA_DIR overrides)")
    log_dir: NonEmptyStr = Key("parent of every run dir")
    output_dir: NonEmptyStr = Key("this run's dir (Hydra's run dir)")


class CheckpointConfig(Schema):
    every_n_steps: NonNegInt | Literal["auto"] | None = Key(
        "optimizer steps between resumable checkpoints (auto: max_steps/10 capped at 200; 0: only on signals "
        "and at the end)", default="auto")


class DivergenceConfig(Schema):
    policy: Literal[DIVERGENCE_POLICIES] = Key("on a non-finite loss or gradient: stop the run, or skip the step",
                                               default="stop")
    max_skips: NonNegInt = Key("policy=skip: stop once more steps than this were skipped", default=10)


class SweepInfo(Schema):
    name: str | None = Key("the sweep (sweep=<name>)", default=None)
    id: str | None = Key("this launch's id (its dir and W&B group)", default=None)
    group: str | None = Key("W&B group of the launch's jobs", default=None)
    root: str | None = Key("parent of the sweep dirs", default=None)
