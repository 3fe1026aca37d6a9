"""Evaluation tasks as registered objects (comol/eval/tasks/base.py): one module per task, one
``conf/eval/<name>.yaml`` per configuration of it. Built-in: ``math`` (eval=math, eval=toy_math),
``commonsense`` (eval=commonsense, eval=real_commonsense), ``code`` (eval=humaneval) and ``none``.
A plug-in task is one ``.py`` (``@register_task``) plus one YAML, loaded with ``plugins=[<dir>]`` or
``$COMOL_PLUGINS`` (docs/evaluation.md, "Adding a task")."""

from comol.eval.tasks import code, commonsense_sets, math_sets, no_eval  # noqa: F401  (register the built-ins)
from comol.eval.tasks.base import (
    PLUGINS_ENV_VAR,
    TOY_SOURCE,
    EvalConfig,
    EvalTask,
    build_task,
    load_plugins,
    register_task,
    registered_tasks,
    split_metric_key,
    task_class,
)

__all__ = ["PLUGINS_ENV_VAR", "TOY_SOURCE", "EvalConfig", "EvalTask", "build_task", "load_plugins", "register_task",
           "registered_tasks", "split_metric_key", "task_class"]
