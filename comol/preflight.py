"""The pre-run checks of a job, in order, before the backbone is built; returns what they read so that nothing
is read twice.

1. every config value: ``comol.schema.validate_config`` (types, ranges, choices, cross-field; one line each);
2. ``mode=eval``: the saved adapter dir (comol/eval/eval_checks.py ``check_saved_adapter``);
3. the data: training splits (comol/data), evaluation files (``load_eval_sets``), and with the tokenizer the
   rows that ``dataset.max_length`` cuts (comol/data/checks.py) and prompts that overflow the context
   (one warning line each).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from omegaconf import DictConfig

from comol.data import dataset_splits
from comol.data.checks import check_row_lengths, training_row_warnings  # noqa: F401  (re-exported)
from comol.eval.eval_checks import check_saved_adapter, eval_backbone, load_eval_sets, prompt_length_warnings  # noqa: F401
from comol.models import load_tokenizer
from comol.schema import RunConfig, plain_config, validate_config
from comol.schema_data import TOY_SOURCE

log = logging.getLogger(__name__)


@dataclass
class Checked:
    """What the checks read (so that the job does not read it again)."""

    model_cfg: dict
    tokenizer: Any
    splits: dict[str, list[dict]] = field(default_factory=dict)    # training rows per split (+ toy 'test')
    eval_rows: dict[str, list[dict]] = field(default_factory=dict)  # evaluation rows per set (non-code sets)
    adapter_meta: dict | None = None                                 # mode=eval: adapter_config.json
    warnings: list[str] = field(default_factory=list)
    config: RunConfig | None = None                                  # the validated config


def preflight(cfg: DictConfig | Mapping[str, Any], model_given: bool | None = None,
              validated: RunConfig | None = None) -> Checked:
    """Check the whole job and read its inputs; raise a one-line ComolError on the first problem."""
    run = validated if validated is not None else validate_config(cfg)
    c = plain_config(cfg)
    meta, ds = None, c["dataset"]
    if run.mode == "eval":
        meta, model_cfg, ds = check_saved_adapter(c, model_given)
    else:
        model_cfg = dict(c["model"])
    has_toy = ds.get("source") == TOY_SOURCE
    splits: dict[str, list[dict]] = {}   # first: a seeded eval split writes the held-out rows evaluation reads
    if run.mode in ("train", "base"):
        splits = dataset_splits(ds)
    elif has_toy:
        splits = {"test": dataset_splits(ds).get("test", [])}
    eval_rows = load_eval_sets(c["eval"], has_toy)
    tokenizer = load_tokenizer(model_cfg)

    warnings = training_row_warnings(splits, tokenizer, ds["max_length"]) if run.mode == "train" else []
    context = (model_cfg.get("arch") or {}).get("max_position_embeddings")
    toy = {"toy_math": splits.get("test") or []} if has_toy else {}
    warnings += prompt_length_warnings({**eval_rows, **toy}, tokenizer, c["eval"], context)
    for w in warnings:
        log.warning(w)
    return Checked(model_cfg=model_cfg, tokenizer=tokenizer, splits=splits, eval_rows=eval_rows, adapter_meta=meta,
                   warnings=warnings, config=run)
