"""The pre-run checks of a job, in order, before the backbone is built; returns what they read so that nothing
is read twice.

1. every config value: ``comol.schema.validate_config`` (types, ranges, choices, cross-field; one line each);
2. ``mode=eval``: the saved adapter dir (comol/eval/eval_checks.py ``check_saved_adapter``);
3. the data: training splits (comol/data), the eval task's rows (``EvalTask.load_rows``: every set read and
   checked now, kept by the task), and with the tokenizer the rows that ``dataset.max_length`` cuts
   (comol/data/checks.py) and prompts that overflow the context (one warning line each).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from comol.adapters.inject import VerifiedAdapter
from comol.data import dataset_splits
from comol.data.checks import check_row_lengths, token_lengths, training_row_warnings  # noqa: F401  (re-exported)
from comol.eval.eval_checks import check_saved_adapter, eval_backbone  # noqa: F401  (re-exported)
from comol.eval.tasks import EvalTask, build_task
from comol.models import load_tokenizer
from comol.schema import RunConfig, plain_config, validate_config
from comol.schema_data import SPLIT_SOURCE, TOY_SOURCE

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """What the checks read (so that the job does not read it again)."""

    model_cfg: dict
    tokenizer: Any
    splits: dict[str, list[dict]] = field(default_factory=dict)    # training rows per split (+ toy 'test')
    task: EvalTask | None = None                                     # the eval task, its rows read and checked
    adapter: VerifiedAdapter | None = None                           # mode=eval: adapter_config.json + weights, checked
    warnings: list[str] = field(default_factory=list)
    config: RunConfig | None = None                                  # the validated config

    @property
    def eval_rows(self) -> dict[str, list[dict]]:
        """Evaluation rows per set (as the task holds them)."""
        return dict(self.task.rows or {}) if self.task is not None else {}


def held_out_rows(ds: Mapping[str, Any], splits: Mapping[str, Any]) -> dict[str, list[dict]]:
    """Evaluation rows this job already holds, keyed as an eval task looks them up: ``toy_math`` (the generated
    test split) and, for a seeded split, the path each set's held-out rows are written to (eval=real_commonsense
    names those files): the rows go to the task in memory, never read back from disk."""
    out: dict[str, list[dict]] = {}
    if "test" in splits:
        out[TOY_SOURCE] = splits["test"]
    if ds.get("source") == SPLIT_SOURCE and ds.get("split_dir"):
        for name, rows in (splits.get("held_out") or {}).items():
            out[str(Path(str(ds["split_dir"])) / f"{name}.json")] = rows
    return out


def prompt_length_warnings(task: EvalTask, tokenizer, context: int | None) -> list[str]:
    """One line per set whose prompts + ``eval.max_new_tokens`` exceed the model's context."""
    if context is None or not task.active:
        return []
    out, new = [], task.cfg.max_new_tokens
    for name, rows in (task.rows or {}).items():
        lens = token_lengths(tokenizer, [task.prompt(r) for r in rows])
        over = sum(n + new > context for n in lens)
        if over:
            out.append(f"eval set {name}: {over} of {len(lens)} prompts + eval.max_new_tokens={new} exceed the "
                       f"model's context ({context} tokens)")
    return out


def preflight(cfg: DictConfig | Mapping[str, Any], model_given: bool | None = None,
              validated: RunConfig | None = None) -> Checked:
    """Check the whole job and read its inputs; raise a one-line ComolError on the first problem."""
    run = validated if validated is not None else validate_config(cfg)
    c = plain_config(cfg)
    adapter, ds = None, c["dataset"]
    if run.mode == "eval":
        adapter, model_cfg, ds = check_saved_adapter(c, model_given)
    else:
        model_cfg = dict(c["model"])
    context = (model_cfg.get("arch") or {}).get("max_position_embeddings")
    task = build_task(c["eval"], c.get("plugins"))   # the eval.* keys, checked by the task's config class
    task.check(context)
    has_toy = ds.get("source") == TOY_SOURCE
    splits: dict[str, list[dict]] = {}
    if run.mode in ("train", "base"):
        splits = dataset_splits(ds)
    elif has_toy:
        splits = {"test": dataset_splits(ds).get("test", [])}
    task.load_rows(held_out_rows(ds, splits))   # every set read and checked now, kept by the task
    tokenizer = load_tokenizer(model_cfg)

    warnings = training_row_warnings(splits, tokenizer, ds["max_length"]) if run.mode == "train" else []
    warnings += prompt_length_warnings(task, tokenizer, context)
    for w in warnings:
        log.warning(w)
    return Checked(model_cfg=model_cfg, tokenizer=tokenizer, splits=splits, task=task, adapter=adapter,
                   warnings=warnings, config=run)
