"""``eval.task=math``: the six math sets (and the toy_math test split), docs/methods.md §6.

Numeric sets: the last number of the response within 1e-3; AQuA: the reference letter rule (``acc``) and
the robust one (``acc_robust``). Summary: ``mean_acc``, the unweighted mean of the sets' accuracies."""

from __future__ import annotations

from typing import Any, Mapping

from comol.eval.math_scoring import extract_last_number, is_aqua, math_correct, score_math_row
from comol.eval.tasks.base import EvalTask, register_task


def score_math(set_name: str, response: str, gold: str) -> dict:
    """AQuA: letter rules (reference + robust); every other set: last number within 1e-3."""
    if is_aqua(set_name):
        return score_math_row(set_name, response, gold)
    pred = extract_last_number(response)
    return {"pred": pred, "correct": math_correct(pred, gold)}


@register_task("math")
class MathTask(EvalTask):
    set_metrics = ("acc", "acc_robust")

    def score(self, set_name: str, response: str, row: Mapping[str, Any]) -> dict:
        return score_math(set_name, response, str(row["answer"]))
