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
from comol.eval.eval_files import load_eval_rows, load_humaneval
from comol.eval.code.samples import SAMPLES_SUFFIX, check_confinement, sample_rows, score_samples
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


#: HumanEval completions stop where a new top-level statement would begin.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def truncate_completion(text: str) -> str:
    """Cut a code completion at the first stop sequence (the function body ends there)."""
    cut = min((i for i in (text.find(s) for s in CODE_STOPS) if i >= 0), default=len(text))
    return text[:cut]


def set_path(source: str, eval_cfg: Mapping[str, Any]) -> Path:
    data_dir = eval_cfg.get("data_dir")
    return Path(source) if Path(source).is_absolute() or not data_dir else Path(data_dir) / source


def eval_rows(set_name: str, source: str, eval_cfg: Mapping[str, Any], toy_rows: list[dict] | None,
              preloaded: Mapping[str, list[dict]] | None = None) -> list[dict]:
    if preloaded and set_name in preloaded:  # already read and checked (comol/preflight.py)
        rows = preloaded[set_name]
    elif source == TOY_SOURCE:
        if toy_rows is None:
            raise ConfigError(f"eval.sets.{set_name}=toy_math needs dataset=toy_math (its held-out test split)")
        rows = toy_rows
    elif eval_cfg.get("task") == "code":
        rows = load_humaneval(set_path(source, eval_cfg))
    else:
        rows = load_eval_rows(set_path(source, eval_cfg))
    limit = eval_cfg.get("limit")
    return rows[: int(limit)] if limit else rows


def run_evaluation(model, tokenizer, eval_cfg: Mapping[str, Any], out_dir: str | Path,
                   toy_rows: list[dict] | None = None, preloaded: Mapping[str, list[dict]] | None = None) -> dict[str, float]:
    """Generate and score every set of ``eval_cfg``; return the metrics dict (``preloaded``: rows per set
    already read)."""
    task = eval_cfg.get("task", "none")
    sets = dict(eval_cfg.get("sets") or {})
    if task == "none" or not sets:
        return {}
    if task == "code":
        return run_code_evaluation(model, tokenizer, eval_cfg, out_dir)
    if task not in SCORERS:
        raise ConfigError(f"eval.task={task!r} is invalid: expected one of {', '.join(SCORERS)}, code or none")
    scorer = SCORERS[task]
    pred_dir = Path(out_dir) / "predictions"
    metrics: dict[str, float] = {}
    accs = []
    for set_name, source in sets.items():
        rows = eval_rows(set_name, str(source), eval_cfg, toy_rows, preloaded)
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


def code_prompt(problem: dict, style: str) -> str:
    if style == "raw":
        return problem["prompt"]
    if style == "alpaca":
        return build_prompt({"instruction": "Complete the following Python code.", "input": problem["prompt"]})
    raise ConfigError(f"eval.prompt_style={style!r} is invalid: expected raw or alpaca")


def run_code_evaluation(model, tokenizer, eval_cfg: Mapping[str, Any], out_dir: str | Path) -> dict[str, float]:
    """HumanEval-style: sample completions, run each program confined by the OS, unbiased pass@k.

    ``eval.execute=false`` only writes ``predictions/<set>.samples.jsonl`` (score it later with
    ``python -m comol.eval.execute``). Execution is refused before generation when OS
    confinement is missing, unless ``eval.allow_unconfined=true`` (logged; ``confined: 0``).
    """
    metrics: dict[str, float] = {}
    n = int(eval_cfg["decoding"].get("num_samples", 1))
    ks = [k for k in eval_cfg.get("ks", [1]) if k <= n]
    execute = bool(eval_cfg.get("execute", True))
    allow_unconfined = bool(eval_cfg.get("allow_unconfined", False))
    if execute:
        check_confinement(allow_unconfined)  # refuse before spending time on generation
    pred_dir = Path(out_dir) / "predictions"
    for set_name, source in dict(eval_cfg["sets"]).items():
        problems = eval_rows(set_name, str(source), eval_cfg, None)
        style = eval_cfg.get("prompt_style", "raw")
        samples = generate_responses(
            model, tokenizer, [code_prompt(p, style) for p in problems], eval_cfg["max_new_tokens"],
            eval_cfg["decoding"], batch_size=eval_cfg.get("batch_size", 8), desc=f"generate {set_name}",
        )
        completions = {p["task_id"]: [truncate_completion(s) for s in outs] for p, outs in zip(problems, samples)}
        rows = sample_rows(problems, completions)
        if not execute:
            path = atomic_write_jsonl(pred_dir / f"{set_name}{SAMPLES_SUFFIX}", rows)
            log.info("eval code/%s: samples written to %s (eval.execute=false); score them with "
                     "`python -m comol.eval.execute %s`", set_name, path, path)
            continue
        set_metrics, records = score_samples(
            rows, set_name, ks=ks, workers=int(eval_cfg.get("workers", 4)),
            timeout=float(eval_cfg.get("timeout", 3.0)), memory_mb=int(eval_cfg.get("memory_mb", 1024)),
            allow_unconfined=allow_unconfined)
        atomic_write_jsonl(pred_dir / f"{set_name}.jsonl", records)
        metrics.update(set_metrics)
    return metrics
