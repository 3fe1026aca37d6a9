"""Run one evaluation task on a (trained, loaded or bare) model.

The task (comol/eval/tasks) generates, scores and writes ``predictions/<set>.jsonl``; for a routed adapter
the routing summaries over the evaluation forwards (``routing/mean_entropy``, ``routing/dead_experts``,
``routing/max_load_ratio``) join its metrics.
"""

from __future__ import annotations

from pathlib import Path

from comol.adapters import adapter_context
from comol.eval.tasks import EvalTask


def evaluate_task(task: EvalTask, model, tokenizer, out_dir: str | Path, routing_stats: bool = True,
                  routing_loads: dict | None = None) -> dict[str, float]:
    """``task.evaluate`` plus, for routed adapters (``routing_stats``), the routing summaries; ``routing_loads``
    (a dict) receives the expert loads per module (``RoutingStats.loads()``) for the W&B heatmap."""
    if not task.active:
        return {}
    if not routing_stats or not hasattr(model, "comol_adapter_context"):
        return task.evaluate(model, tokenizer, out_dir)
    with adapter_context(model).routing.collecting() as stats:
        metrics = task.evaluate(model, tokenizer, out_dir)
        summary = stats.summary(per_module=False)
        if routing_loads is not None:
            routing_loads.update(stats.loads())
        return {**metrics, **summary}
