"""Pre-flight: every config value and data file of a job is checked before the backbone is loaded.

``preflight(cfg)`` runs at the start of both modes (comol/pipeline.py) and returns what it read, so that
nothing is read twice: the training rows (handed to the datamodule), the evaluation rows (handed to the
evaluation), the tokenizer, and for ``mode=eval`` the saved adapter's config and the backbone to build.
Errors are one-line :class:`comol.errors.ComolError` naming the key / file; soft problems (rows that
``dataset.max_length`` cuts) are logged as one warning line with their count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from comol.errors import CheckpointError, ConfigError, config_check

log = logging.getLogger(__name__)

TASKS = ("math", "commonsense", "code", "none")
SCHEDULES = ("constant", "cosine")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = {"32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true", "64", "64-true",
              "transformer-engine", "transformer-engine-float16"}
TOY_SOURCE = "toy_math"
SPLIT_SOURCE = "eval_split"
SOURCES = (TOY_SOURCE, "files", SPLIT_SOURCE)   # the sources comol.data.datamodule reads
FILE_PRESETS = "dataset=math14k dataset.train=<file> (or dataset=codealpaca20k)"


@dataclass
class Checked:
    """What the checks read (so that the job does not read it again)."""

    model_cfg: dict
    tokenizer: Any
    splits: dict[str, list[dict]] = field(default_factory=dict)    # training rows per split (+ toy 'test')
    eval_rows: dict[str, list[dict]] = field(default_factory=dict)  # evaluation rows per set (non-code sets)
    adapter_meta: dict | None = None                                 # mode=eval: adapter_config.json
    warnings: list[str] = field(default_factory=list)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# ----------------------------------------------------------------------------------------------- value checks

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(key: str, value: Any, minimum: int = 1, allow_none: bool = False, extra: tuple = ()) -> None:
    if value is None and allow_none or value in extra and _is_int(value):
        return
    what = f"an integer >= {minimum}" + (" or null" if allow_none else "") + "".join(f" or {e}" for e in extra)
    config_check(_is_int(value) and value >= minimum, key, value, what)


def check_positive(key: str, value: Any, allow_zero: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = _is_num(value) and (value >= 0 if allow_zero else value > 0)
    config_check(ok, key, value, ("a number >= 0" if allow_zero else "a number > 0") + (" or null" if allow_none else ""))


def check_bool(key: str, value: Any) -> None:
    config_check(isinstance(value, bool), key, value, "true or false")


def check_run(cfg: Mapping[str, Any]) -> None:
    config_check(cfg.get("mode", "train") in ("train", "eval", "base"), "mode", cfg.get("mode"),
                 "'train', 'eval' or 'base'")
    check_int("seed", cfg.get("seed", 0), minimum=0)
    check_int("routing_stats_every", cfg.get("routing_stats_every", 1), minimum=1)
    best = cfg.get("select_best")
    config_check(best is None or isinstance(best, str) and best, "select_best", best, "null or a logged metric, e.g. val/loss")


def check_optim(o: Mapping[str, Any]) -> None:
    check_positive("optim.lr", o.get("lr"))
    check_positive("optim.weight_decay", o.get("weight_decay", 0.0), allow_zero=True)
    betas = o.get("betas", (0.9, 0.999))
    config_check(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_num(b) and 0 <= b < 1 for b in betas),
                 "optim.betas", betas, "two numbers in [0, 1)")
    config_check(o.get("schedule", "constant") in SCHEDULES, "optim.schedule", o.get("schedule"), " or ".join(SCHEDULES))
    check_int("optim.warmup_steps", o.get("warmup_steps", 0), minimum=0)


def check_trainer(t: Mapping[str, Any]) -> None:
    steps, epochs = t.get("max_steps", -1), t.get("max_epochs")
    check_int("trainer.max_steps", steps, minimum=1, extra=(-1,))
    check_int("trainer.max_epochs", epochs, minimum=1, allow_none=True, extra=(-1,))
    if steps == -1 and epochs in (None, -1):
        raise ConfigError("trainer.max_steps=-1 with trainer.max_epochs=-1 is invalid: training would never end; "
                          "set one of them")
    check_int("trainer.accumulate_grad_batches", t.get("accumulate_grad_batches", 1))
    check_positive("trainer.gradient_clip_val", t.get("gradient_clip_val"), allow_zero=True, allow_none=True)
    vci = t.get("val_check_interval")
    config_check(vci is None or _is_int(vci) and vci >= 1 or isinstance(vci, float) and 0 < vci <= 1,
                 "trainer.val_check_interval", vci, "null, a number of batches >= 1 or a fraction in (0, 1]")
    lvb = t.get("limit_val_batches")
    config_check(lvb is None or _is_int(lvb) and lvb >= 0 or isinstance(lvb, float) and 0 <= lvb <= 1,
                 "trainer.limit_val_batches", lvb, "null, a number of batches >= 0 or a fraction in [0, 1]")
    check_int("trainer.log_every_n_steps", t.get("log_every_n_steps", 50))
    prec = t.get("precision", "32-true")
    config_check(str(prec) in PRECISIONS, "trainer.precision", prec, "one of " + ", ".join(sorted(PRECISIONS)))
    acc = t.get("accelerator", "auto")
    config_check(acc in ACCELERATORS, "trainer.accelerator", acc, "one of " + ", ".join(ACCELERATORS))
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={acc} is invalid here: no CUDA device is visible (use trainer=cpu)")


def check_dataset(ds: Mapping[str, Any], context: int | None) -> None:
    source = ds.get("source")
    config_check(source in SOURCES, "dataset.source", source, " or ".join(f"'{s}'" for s in SOURCES))
    if source == TOY_SOURCE:
        for key in ("train", "val"):
            if ds.get(key) is not None:
                raise ConfigError(f"dataset.{key}={ds.get(key)!r} is not used by dataset={ds.get('name')} (generated "
                                  f"rows): to train on a file use {FILE_PRESETS}")
        check_int("dataset.train_size", ds.get("train_size"))
        check_int("dataset.val_size", ds.get("val_size", 0), minimum=0)
        check_int("dataset.test_size", ds.get("test_size", 0), minimum=0)
        check_int("dataset.max_operand", ds.get("max_operand", 9))
        check_int("dataset.data_seed", ds.get("data_seed", 0), minimum=0)
    elif source == SPLIT_SOURCE:   # a seeded split of evaluation files (comol/data/eval_split.py)
        sets = ds.get("sets")
        config_check(isinstance(sets, Mapping) and len(sets) > 0, "dataset.sets", sets,
                     "a mapping {set name: file} (source=eval_split)")
        check_int("dataset.train_per_set", ds.get("train_per_set"))
        check_int("dataset.val_per_set", ds.get("val_per_set", 0), minimum=0)
        check_int("dataset.test_per_set", ds.get("test_per_set", 0), minimum=0)
        check_int("dataset.data_seed", ds.get("data_seed", 0), minimum=0)
    else:
        config_check(isinstance(ds.get("train"), str) and ds.get("train"), "dataset.train", ds.get("train"),
                     "a .json/.jsonl path or a hub dataset id")
    length = ds.get("max_length")
    check_int("dataset.max_length", length)
    if context is not None and length > context:
        raise ConfigError(f"dataset.max_length={length} is invalid: expected at most the model's context, "
                          f"model.arch.max_position_embeddings={context}")
    check_int("dataset.batch_size", ds.get("batch_size"))
    check_int("dataset.eval_batch_size", ds.get("eval_batch_size", ds.get("batch_size")))
    check_int("dataset.num_workers", ds.get("num_workers", 0), minimum=0)
    check_bool("dataset.train_on_prompt", ds.get("train_on_prompt", True))


def check_eval(ev: Mapping[str, Any], context: int | None, tokenizer=None) -> None:
    from comol.eval.generate import decoding_config

    task = ev.get("task", "none")
    config_check(task in TASKS, "eval.task", task, "one of " + ", ".join(TASKS))
    limit = ev.get("limit")
    config_check(limit is None or _is_int(limit) and limit >= 1, "eval.limit", limit,
                 "a positive integer (rows per set) or null (all rows)")
    if task == "none" or not ev.get("sets"):
        return
    check_int("eval.batch_size", ev.get("batch_size", 16))
    check_int("eval.max_new_tokens", ev.get("max_new_tokens"))
    if context is not None and ev["max_new_tokens"] >= context:
        raise ConfigError(f"eval.max_new_tokens={ev['max_new_tokens']} is invalid: expected less than the model's "
                          f"context, model.arch.max_position_embeddings={context}")
    dec = ev.get("decoding") or {}
    check_bool("eval.decoding.do_sample", dec.get("do_sample", False))
    check_int("eval.decoding.num_samples", dec.get("num_samples", 1))
    if dec.get("do_sample"):
        check_positive("eval.decoding.temperature", dec.get("temperature", 1.0))
        top_p = dec.get("top_p", 1.0)
        config_check(_is_num(top_p) and 0 < top_p <= 1, "eval.decoding.top_p", top_p, "a number in (0, 1]")
    decoding_config(dec, int(ev["max_new_tokens"]), tokenizer)
    if task == "code":
        ks = ev.get("ks", [1])
        config_check(isinstance(ks, (list, tuple)) and ks and all(_is_int(k) and k >= 1 for k in ks), "eval.ks", ks,
                     "a list of positive integers")
        check_positive("eval.timeout", ev.get("timeout", 3.0))
        check_int("eval.workers", ev.get("workers", 4))
        check_int("eval.memory_mb", ev.get("memory_mb", 1024))
        style = ev.get("prompt_style", "raw")
        config_check(style in ("raw", "alpaca"), "eval.prompt_style", style, "raw or alpaca")


def load_eval_sets(ev: Mapping[str, Any], has_toy: bool) -> dict[str, list[dict]]:
    """Read and check every evaluation file now (HumanEval: its presence; the sandbox reads it)."""
    from comol.eval.eval_files import load_eval_rows
    from comol.eval.runner import set_path

    rows: dict[str, list[dict]] = {}
    if ev.get("task", "none") == "none":
        return rows
    for name, source in dict(ev.get("sets") or {}).items():
        source = str(source)
        if source == TOY_SOURCE:
            if not has_toy:
                raise ConfigError(f"eval.sets.{name}=toy_math needs dataset=toy_math (its held-out test split)")
            continue
        path = set_path(source, ev)
        if ev.get("task") == "code":
            if not path.is_file():
                raise ConfigError(f"eval.sets.{name}: evaluation file {path} does not exist")
            continue
        rows[name] = load_eval_rows(path)
    return rows


# ----------------------------------------------------------------------------------------------- lengths

def _lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []


def check_row_lengths(rows: list[dict], tokenizer, max_length: int, split: str = "train") -> str | None:
    """Count the rows ``max_length`` cuts. All of them losing their whole answer is an error; some: a warning."""
    from comol.data.clip import clip_row
    from comol.data.prompts import build_prompt

    if not rows:
        return None
    rows = [clip_row(r, max_length, tokenizer) for r in rows]   # a huge field is cut before tokenising
    prompts = [build_prompt(r) for r in rows]
    prompt_len = _lengths(tokenizer, prompts)
    full_len = [n + 1 for n in _lengths(tokenizer, [p + r["output"] for p, r in zip(prompts, rows)])]  # + EOS
    cut = sum(n > max_length for n in full_len)
    no_answer = sum(n >= max_length for n in prompt_len)
    if no_answer == len(rows):
        raise ConfigError(f"dataset.max_length={max_length} is invalid: every {split} prompt is at least that long "
                          f"(shortest {min(prompt_len)} tokens), so no answer token would be trained on")
    if not cut:
        return None
    return (f"dataset.max_length={max_length} cuts {cut} of {len(rows)} {split} rows (longest {max(full_len)} tokens"
            f" with EOS); {no_answer} of them lose their whole answer")


# ----------------------------------------------------------------------------------------------- backbone

def model_context(model_cfg: Mapping[str, Any]) -> int | None:
    ctx = (model_cfg.get("arch") or {}).get("max_position_embeddings")
    return int(ctx) if _is_int(ctx) else None


def model_given_on_command_line() -> bool:
    """True when this Hydra job's overrides choose the backbone (model=..., model.*=..., experiment=...)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return False
        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001
        return False
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return any(k == "model" or k.startswith("model.") or k == "experiment" for k in keys)


def eval_backbone(cfg: Mapping[str, Any], adapter_dir: Path, meta: dict, model_given: bool | None) -> dict:
    """The backbone ``mode=eval`` builds: the adapter's own, unless the command line chose one (it must match)."""
    from comol.adapters.inject import check_adapter_backbone

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


# ----------------------------------------------------------------------------------------------- entry

def preflight(cfg: DictConfig | Mapping[str, Any], model_given: bool | None = None) -> Checked:
    """Check the whole job config and read its inputs; raise a one-line ComolError on the first problem."""
    from comol.adapters.base import build_adapter_config
    from comol.adapters.inject import read_adapter_config, verify_adapter_weights
    from comol.data import dataset_splits
    from comol.models import load_tokenizer

    c = _plain(cfg)
    mode = c.get("mode", "train")
    check_run(c)
    meta = None
    if mode == "eval":
        if not c.get("adapter_path"):
            raise ConfigError("adapter_path is missing: mode=eval needs adapter_path=<saved adapter dir>")
        adapter_dir = Path(c["adapter_path"])
        meta = read_adapter_config(adapter_dir)
        try:
            build_adapter_config(meta["adapter"])
        except ConfigError as e:
            raise CheckpointError(f"{adapter_dir}: {e}") from None
        verify_adapter_weights(adapter_dir, meta)
        model_cfg = eval_backbone(c, adapter_dir, meta, model_given)
    else:
        model_cfg = dict(c["model"])
        build_adapter_config(c["adapter"])
        check_optim(c.get("optim") or {})
        check_trainer(c.get("trainer") or {})
    context = model_context(model_cfg)

    # the dataset: the one trained on (train), or the adapter's own for toy held-out rows (eval)
    ds = c["dataset"]
    if mode == "eval":
        trained_on = (meta or {}).get("dataset") or {}
        ds = trained_on if trained_on.get("source") == TOY_SOURCE else ds
    if mode == "train" or ds.get("source") == TOY_SOURCE:
        check_dataset(ds, context if mode == "train" else None)
    check_eval(c["eval"], context)
    has_toy = ds.get("source") == TOY_SOURCE
    splits: dict[str, list[dict]] = {}   # first: a seeded eval split writes the held-out rows evaluation reads
    if mode in ("train", "base"):
        splits = dataset_splits(ds)
    elif has_toy:
        splits = {"test": dataset_splits(ds).get("test", [])}
    eval_rows = load_eval_sets(c["eval"], has_toy)
    tokenizer = load_tokenizer(model_cfg)

    warnings = []
    if mode == "train":
        for split in ("train", "val"):
            w = check_row_lengths(splits.get(split) or [], tokenizer, ds["max_length"], split)
            if w:
                warnings.append(w)
    if context is not None and c["eval"].get("task", "none") not in ("none", "code"):
        from comol.data.prompts import build_prompt

        sets = {**eval_rows, **({"toy_math": splits.get("test") or []} if has_toy else {})}
        limit = c["eval"].get("limit")
        for name, rows in sets.items():
            lens = _lengths(tokenizer, [build_prompt(r) for r in rows[:limit]])
            over = sum(n + c["eval"]["max_new_tokens"] > context for n in lens)
            if over:
                warnings.append(f"eval set {name}: {over} of {len(lens)} prompts + eval.max_new_tokens="
                                f"{c['eval']['max_new_tokens']} exceed the model's context ({context} tokens)")
    for w in warnings:
        log.warning(w)
    return Checked(model_cfg=model_cfg, tokenizer=tokenizer, splits=splits, eval_rows=eval_rows, adapter_meta=meta,
                   warnings=warnings)
