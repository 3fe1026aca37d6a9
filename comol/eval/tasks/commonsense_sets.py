"""``eval.task=commonsense``: the seven commonsense sets (and the held-out rows of dataset=real_commonsense),
docs/methods.md §6: the first label of the set's vocabulary in the response. Summary: ``mean_acc``."""

from __future__ import annotations

from typing import Any, Mapping

from comol.eval.commonsense_scoring import score_commonsense_row
from comol.eval.tasks.base import EvalTask, register_task


@register_task("commonsense")
class CommonsenseTask(EvalTask):
    def score(self, set_name: str, response: str, row: Mapping[str, Any]) -> dict:
        return score_commonsense_row(set_name, response, str(row["answer"]))
