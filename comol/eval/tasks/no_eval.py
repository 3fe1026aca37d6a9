"""``eval=none``: nothing is generated or scored (a sweep's objective is then ``val/loss``)."""

from __future__ import annotations

import dataclasses

from comol.errors import ConfigError
from comol.eval.tasks.base import EvalConfig, EvalTask, register_task


@dataclasses.dataclass
class NoEvalConfig(EvalConfig):
    max_new_tokens: int = 0

    def validate(self) -> None:
        if self.sets:
            raise ConfigError(f"eval.sets={dict(self.sets)!r} is invalid with eval.task=none: expected {{}}")


@register_task("none")
class NoEvalTask(EvalTask):
    config_class = NoEvalConfig
    set_metrics = ()
    summary_metrics = ()
    primary_metric = ""
