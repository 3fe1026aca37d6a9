"""Evaluation of a (trained or loaded) model on the sets of an ``eval`` config node.

Writes ``predictions/<set>.jsonl`` atomically (re-running replaces, never appends) and returns
metrics named ``eval/<task>/<set>/<metric>`` plus ``eval/<task>/mean_acc`` (unweighted mean).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from comol.data.prompts import build_prompt
from comol.errors import ConfigError
from comol.eval.commonsense_scoring import score_commonsense_row
from comol.eval.eval_files import load_eval_rows
from comol.eval.generate import generate_responses
from comol.eval.math_scoring import extract_last_number, is_aqua, math_correct, score_math_row
from comol.io_utils import atomic_write_jsonl

log = logging.getLogger(__name__)

TOY_SOURCE = "toy_math"


def score_math(set_name: str, response: str, gold: str) -> dict:
    """AQuA: letter rules (reference + robust); every other set: last number within 1e-3."""
    if is_aqua(set_name):
        return score_math_row(set_name, response, gold)
    pred = extract_last_number(response)
    return {"pred": pred, "correct": math_correct(pred, gold)}


SCORERS: dict[str, Callable[[str, str, str], dict]] = {
    "math": score_math,
    "commonsense": score_commonsense_row,
}


def eval_rows(set_name: str, source: str, eval_cfg: Mapping[str, Any], toy_rows: list[dict] | None) -> list[dict]:
    if source == TOY_SOURCE:
        if toy_rows is None:
            raise ConfigError(f"eval.sets.{set_name}=toy_math needs dataset=toy_math (its held-out test split)")
        rows = toy_rows
    else:
        data_dir = eval_cfg.get("data_dir")
        path = Path(source) if Path(source).is_absolute() or not data_dir else Path(data_dir) / source
        rows = load_eval_rows(path)
    limit = eval_cfg.get("limit")
    return rows[: int(limit)] if limit else rows


def run_evaluation(model, tokenizer, eval_cfg: Mapping[str, Any], out_dir: str | Path,
                   toy_rows: list[dict] | None = None) -> dict[str, float]:
    """Generate and score every set of ``eval_cfg``; return the metrics dict."""
    task = eval_cfg.get("task", "none")
    sets = dict(eval_cfg.get("sets") or {})
    if task == "none" or not sets:
        return {}
    if task not in SCORERS:
        raise ConfigError(f"eval.task={task!r} is invalid: expected one of {', '.join(SCORERS)} or none")
    scorer = SCORERS[task]
    pred_dir = Path(out_dir) / "predictions"
    metrics: dict[str, float] = {}
    accs = []
    for set_name, source in sets.items():
        rows = eval_rows(set_name, str(source), eval_cfg, toy_rows)
        responses = generate_responses(
            model, tokenizer, [build_prompt(r) for r in rows], eval_cfg["max_new_tokens"], eval_cfg["decoding"],
            batch_size=eval_cfg.get("batch_size", 16), desc=f"eval {set_name}",
        )
        records = []
        for i, (row, outs) in enumerate(zip(rows, responses)):
            scored = scorer(set_name, outs[0], str(row["answer"]))
            records.append({"idx": i, "instruction": row["instruction"], "input": row.get("input", ""),
                            "answer": row["answer"], "response": outs[0], **scored})
        acc = sum(r["correct"] for r in records) / max(len(records), 1)
        metrics[f"eval/{task}/{set_name}/acc"] = acc
        if records and "correct_robust" in records[0]:
            metrics[f"eval/{task}/{set_name}/acc_robust"] = sum(r["correct_robust"] for r in records) / len(records)
        accs.append(acc)
        atomic_write_jsonl(pred_dir / f"{set_name}.jsonl", records)
        log.info("eval %s/%s: acc %.4f on %d rows", task, set_name, acc, len(records))
    metrics[f"eval/{task}/mean_acc"] = sum(accs) / len(accs)
    return metrics
