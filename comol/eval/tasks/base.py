"""What an evaluation task is, and the registry of tasks (built-in and plug-in).

A task is a class registered under the name its ``conf/eval/<name>.yaml`` gives as ``task:``::

    @register_task("mytask")
    class MyTask(EvalTask):
        config_class = MyConfig            # its eval.* keys: defaults + validation (a dataclass)
        set_metrics = ("acc",)             # per set: eval/mytask/<set>/<metric>
        summary_metrics = ("mean_acc",)    # over the sets: eval/mytask/<metric>
        primary_metric = "mean_acc"        # what a sweeper optimises by default ...
        direction = "maximize"             # ... and which way

        def prompt(self, row): ...
        def score(self, set_name, response, row): ...   # -> {"correct": bool, ...}

The job builds one task object from the composed ``eval`` node (validated once), hands it the rows it
already holds (the toy test split, the held-out rows of a seeded split) with :meth:`EvalTask.load_rows`,
which reads and checks every other set before the backbone is built, and calls :meth:`EvalTask.evaluate`.
Plug-in tasks live outside the package: :func:`load_plugins` imports them (see docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

from comol.data.prompts import build_prompt
from comol.errors import ConfigError, config_check
from comol.eval.eval_files import load_eval_rows
from comol.eval.generate import decoding_config, generate_responses
from comol.io_utils import atomic_write_jsonl
from comol.schema_data import TOY_SOURCE  # the source name of the toy_math dataset's generated test split

log = logging.getLogger(__name__)

#: Environment variable naming plug-in task files, dirs or modules (``os.pathsep``-separated), like ``plugins=[...]``.
PLUGINS_ENV_VAR = "COMOL_PLUGINS"
DIRECTIONS = ("maximize", "minimize")

_TASKS: dict[str, type["EvalTask"]] = {}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass
class EvalConfig:
    """The ``eval.*`` keys every generating task has (a task's own config class adds its keys)."""

    task: str = "none"
    sets: dict = dataclasses.field(default_factory=dict)   # set name -> file (relative to data_dir) or toy_math
    data_dir: str | None = None
    limit: int | None = None          # rows per set (null: all)
    batch_size: int = 16
    max_new_tokens: int = 64
    decoding: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any]) -> "EvalConfig":
        """Build from the composed ``eval`` node; an unknown key is an error naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(node) - names)
        if unknown:
            raise ConfigError(f"eval.{unknown[0]}={node[unknown[0]]!r} is not a key of eval task "
                              f"{node.get('task')!r}: expected one of {', '.join(sorted(names))}")
        cfg = cls(**dict(node))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        config_check(isinstance(self.sets, Mapping), "eval.sets", self.sets, "a mapping {set name: file}")
        config_check(self.limit is None or _is_int(self.limit) and self.limit >= 1, "eval.limit", self.limit,
                     "a positive integer (rows per set) or null (all rows)")
        if not self.sets:
            return
        config_check(_is_int(self.batch_size) and self.batch_size >= 1, "eval.batch_size", self.batch_size,
                     "an integer >= 1")
        config_check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "eval.max_new_tokens",
                     self.max_new_tokens, "an integer >= 1")
        dec = self.decoding or {}
        config_check(isinstance(dec.get("do_sample", False), bool), "eval.decoding.do_sample", dec.get("do_sample"),
                     "true or false")
        n = dec.get("num_samples", 1)
        config_check(_is_int(n) and n >= 1, "eval.decoding.num_samples", n, "an integer >= 1")
        if dec.get("do_sample"):
            t, top_p = dec.get("temperature", 1.0), dec.get("top_p", 1.0)
            num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
            config_check(num(t) and t > 0, "eval.decoding.temperature", t, "a number > 0")
            config_check(num(top_p) and 0 < top_p <= 1, "eval.decoding.top_p", top_p, "a number in (0, 1]")
        decoding_config(dec, int(self.max_new_tokens), None)


class EvalTask:
    """One evaluation task: its config, rows, prompt, scorer and metric names. Subclass and register."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[EvalConfig]] = EvalConfig
    set_metrics: ClassVar[tuple[str, ...]] = ("acc",)       # fnmatch patterns, e.g. "pass@*"
    summary_metrics: ClassVar[tuple[str, ...]] = ("mean_acc",)
    primary_metric: ClassVar[str] = "mean_acc"              # a summary metric, or a set metric (first set)
    direction: ClassVar[str] = "maximize"

    def __init__(self, eval_cfg: Mapping[str, Any]):
        self.cfg = self.config_class.from_mapping(eval_cfg)
        self.rows: dict[str, list[dict]] | None = None

    # ------------------------------------------------------------------ names
    def key(self, metric: str, set_name: str | None = None) -> str:
        return f"eval/{self.name}/{set_name}/{metric}" if set_name else f"eval/{self.name}/{metric}"

    def primary_key(self) -> str | None:
        """The results key of the primary metric (``None`` when the task scores nothing)."""
        if not self.cfg.sets:
            return None
        if self.primary_metric in self.summary_metrics:
            return self.key(self.primary_metric)
        return self.key(self.primary_metric, next(iter(self.cfg.sets)))

    @property
    def active(self) -> bool:
        return bool(self.cfg.sets)

    # ------------------------------------------------------------------ checks and rows
    def check(self, context: int | None) -> None:
        """Checks against the backbone (before it is built): prompts + answers fit its context."""
        if self.active and context is not None and self.cfg.max_new_tokens >= context:
            raise ConfigError(f"eval.max_new_tokens={self.cfg.max_new_tokens} is invalid: expected less than the "
                              f"model's context, model.arch.max_position_embeddings={context}")

    def set_path(self, source: str) -> Path:
        data_dir = self.cfg.data_dir
        return Path(source) if Path(source).is_absolute() or not data_dir else Path(data_dir) / source

    def read_set(self, set_name: str, path: Path) -> list[dict]:
        """Read and check one set's file (one-line error naming file / row / field)."""
        return load_eval_rows(path)

    def load_rows(self, held_out: Mapping[str, list[dict]] | None = None) -> dict[str, list[dict]]:
        """Every set's rows, read once and kept. ``held_out``: rows the job already holds, keyed by the
        source name (``toy_math``) or the path of the file they were written to (a seeded split)."""
        held_out = held_out or {}
        rows: dict[str, list[dict]] = {}
        for set_name, source in self.cfg.sets.items():
            source = str(source)
            if source == TOY_SOURCE:
                if TOY_SOURCE not in held_out:
                    raise ConfigError(f"eval.sets.{set_name}=toy_math needs dataset=toy_math (its held-out test split)")
                got = held_out[TOY_SOURCE]
            else:
                path = self.set_path(source)
                got = held_out[str(path)] if str(path) in held_out else self.read_set(set_name, path)
            rows[set_name] = got[: self.cfg.limit] if self.cfg.limit else got
        self.rows = rows
        return rows

    # ------------------------------------------------------------------ generation and scoring
    def prompt(self, row: Mapping[str, Any]) -> str:
        return build_prompt(row)

    def score(self, set_name: str, response: str, row: Mapping[str, Any]) -> dict:
        raise NotImplementedError

    def set_summary(self, records: list[dict]) -> dict[str, float]:
        """Per-set metrics from the scored records: accuracy (and the mean of any other boolean column
        named ``correct_<x>`` as ``acc_<x>``)."""
        n = max(len(records), 1)
        out = {"acc": sum(bool(r["correct"]) for r in records) / n}
        for extra in [k for k in (records[0] if records else {}) if k.startswith("correct_")]:
            out[f"acc_{extra[len('correct_'):]}"] = sum(bool(r[extra]) for r in records) / n
        return out

    def summarize(self, per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Summary metrics over the sets (default: the unweighted mean of the sets' accuracies)."""
        accs = [m["acc"] for m in per_set.values()]
        return {"mean_acc": sum(accs) / len(accs)} if accs else {}

    def evaluate(self, model, tokenizer, out_dir: str | Path) -> dict[str, float]:
        """Generate, score, write ``predictions/<set>.jsonl`` (atomically) and return the metrics."""
        if not self.active:
            return {}
        rows = self.rows if self.rows is not None else self.load_rows()
        pred_dir = Path(out_dir) / "predictions"
        metrics: dict[str, float] = {}
        per_set: dict[str, dict[str, float]] = {}
        for set_name, set_rows in rows.items():
            responses = generate_responses(model, tokenizer, [self.prompt(r) for r in set_rows],
                                           self.cfg.max_new_tokens, self.cfg.decoding,
                                           batch_size=self.cfg.batch_size, desc=f"eval {set_name}")
            records = []
            for i, (row, outs) in enumerate(zip(set_rows, responses)):
                records.append({"idx": i, "instruction": row.get("instruction"), "input": row.get("input", ""),
                                "answer": row.get("answer"), "response": outs[0],
                                **self.score(set_name, outs[0], row)})
            per_set[set_name] = self.set_summary(records)
            metrics.update({self.key(m, set_name): v for m, v in per_set[set_name].items()})
            atomic_write_jsonl(pred_dir / f"{set_name}.jsonl", records)
            log.info("eval %s/%s: %s on %d rows", self.name, set_name,
                     ", ".join(f"{m} {v:.4f}" for m, v in per_set[set_name].items()), len(records))
        metrics.update({self.key(m): v for m, v in self.summarize(per_set).items()})
        return metrics


# ----------------------------------------------------------------------------------------------- registry

def register_task(name: str):
    """Class decorator: register an :class:`EvalTask` subclass as ``eval.task=<name>``."""

    def deco(cls: type[EvalTask]) -> type[EvalTask]:
        if not (isinstance(cls, type) and issubclass(cls, EvalTask)):
            raise TypeError(f"@register_task({name!r}) decorates {cls!r}: expected an EvalTask subclass")
        if cls.direction not in DIRECTIONS:
            raise TypeError(f"task {name!r}: direction={cls.direction!r}, expected maximize or minimize")
        old = _TASKS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"eval task {name!r} is registered twice ({old.__module__}.{old.__qualname__} and "
                            f"{cls.__module__}.{cls.__qualname__})")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


def registered_tasks() -> dict[str, type[EvalTask]]:
    return dict(_TASKS)


def task_class(name: str) -> type[EvalTask]:
    if name not in _TASKS:
        raise ConfigError(f"eval.task={name!r} is invalid: expected one of {', '.join(sorted(_TASKS))} "
                          f"(a plug-in task is loaded from plugins=[<dir or module>] or ${PLUGINS_ENV_VAR})")
    return _TASKS[name]


def build_task(eval_cfg: Mapping[str, Any], plugins: Iterable[str] | None = None) -> EvalTask:
    """The task object of a composed ``eval`` node (plug-ins loaded first; config validated)."""
    load_plugins(plugins)
    return task_class(str(eval_cfg.get("task", "none")))(eval_cfg)


def plugin_sources(plugins: Iterable[str] | None = None) -> list[str]:
    env = [p for p in os.environ.get(PLUGINS_ENV_VAR, "").split(os.pathsep) if p]
    return [*env, *[str(p) for p in (plugins or [])]]


def load_plugins(plugins: Iterable[str] | None = None) -> None:
    """Import plug-in tasks: each entry is a ``.py`` file, a directory (its ``*.py`` files, sorted) or a
    module name; ``$COMOL_PLUGINS`` entries first. Importing twice is harmless."""
    for entry in plugin_sources(plugins):
        path = Path(entry).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.py"))
        elif path.suffix == ".py":
            if not path.is_file():
                raise ConfigError(f"plugins: {path} does not exist")
            files = [path]
        else:
            try:
                importlib.import_module(entry)
            except ImportError as e:
                raise ConfigError(f"plugins: {entry!r} is neither a directory, a .py file nor an importable "
                                  f"module ({e})") from None
            continue
        for file in files:
            digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
            mod_name = f"comol_plugin_{digest}_{file.stem}"
            if mod_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(mod_name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception:
                del sys.modules[mod_name]
                raise


def split_metric_key(key: str) -> tuple[str, str | None, str] | None:
    """``(task, set or None, metric)`` when ``key`` is a metric some registered task declares, else None."""
    parts = key.split("/")
    if len(parts) not in (3, 4) or parts[0] != "eval" or parts[1] not in _TASKS:
        return None
    cls = _TASKS[parts[1]]
    if len(parts) == 3:
        return (parts[1], None, parts[2]) if parts[2] in cls.summary_metrics else None
    ok = any(fnmatch.fnmatchcase(parts[3], pat) for pat in cls.set_metrics)
    return (parts[1], parts[2], parts[3]) if ok else None
