"""``eval.task=code``: HumanEval-style sets, docs/methods.md §6. Sampled completions are cut at the first
stop sequence, each program runs confined by the OS (comol/eval/execute.py), scored by unbiased pass@k."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

from comol.data.prompts import build_prompt
from comol.errors import ConfigError, config_check
from comol.eval.eval_files import load_humaneval
from comol.eval.code.samples import SAMPLES_SUFFIX, check_confinement, sample_rows, score_samples
from comol.eval.generate import generate_responses
from comol.eval.tasks.base import EvalConfig, EvalTask, register_task
from comol.io_utils import atomic_write_jsonl

log = logging.getLogger(__name__)

#: HumanEval completions stop where a new top-level statement would begin.
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
PROMPT_STYLES = ("raw", "alpaca")


def truncate_completion(text: str) -> str:
    """Cut a code completion at the first stop sequence (the function body ends there)."""
    cut = min((i for i in (text.find(s) for s in CODE_STOPS) if i >= 0), default=len(text))
    return text[:cut]


def code_prompt(problem: Mapping[str, Any], style: str) -> str:
    if style == "raw":
        return problem["prompt"]
    if style == "alpaca":
        return build_prompt({"instruction": "Complete the following Python code.", "input": problem["prompt"]})
    raise ConfigError(f"eval.prompt_style={style!r} is invalid: expected raw or alpaca")


@dataclasses.dataclass
class CodeConfig(EvalConfig):
    batch_size: int = 8
    max_new_tokens: int = 400
    prompt_style: str = "raw"          # raw: the model continues the prompt | alpaca: wrapped in the template
    ks: list = dataclasses.field(default_factory=lambda: [1])
    timeout: float = 3.0               # seconds per program
    memory_mb: int = 1024
    workers: int = 4
    execute: bool = True               # false: only write predictions/<set>.samples.jsonl
    allow_unconfined: bool = False     # true: execute without OS confinement when it is unavailable

    def validate(self) -> None:
        super().validate()
        ks = self.ks
        config_check(isinstance(ks, (list, tuple)) and len(ks) > 0 and all(isinstance(k, int) and not isinstance(k, bool)
                     and k >= 1 for k in ks), "eval.ks", ks, "a list of positive integers")
        t = self.timeout
        config_check(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0, "eval.timeout", t, "a number > 0")
        for key in ("workers", "memory_mb"):
            v = getattr(self, key)
            config_check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"eval.{key}", v, "an integer >= 1")
        config_check(self.prompt_style in PROMPT_STYLES, "eval.prompt_style", self.prompt_style, "raw or alpaca")
        for key in ("execute", "allow_unconfined"):
            config_check(isinstance(getattr(self, key), bool), f"eval.{key}", getattr(self, key), "true or false")


@register_task("code")
class CodeTask(EvalTask):
    config_class = CodeConfig
    set_metrics = ("pass@*",)
    summary_metrics = ()
    primary_metric = "pass@1"

    def read_set(self, set_name: str, path: Path) -> list[dict]:
        if not path.is_file():
            raise ConfigError(f"eval.sets.{set_name}: evaluation file {path} does not exist")
        return load_humaneval(path)

    def prompt(self, row: Mapping[str, Any]) -> str:
        return code_prompt(row, self.cfg.prompt_style)

    def evaluate(self, model, tokenizer, out_dir: str | Path) -> dict[str, float]:
        """Sample completions, run each program confined, unbiased pass@k. ``eval.execute=false`` only writes
        ``predictions/<set>.samples.jsonl`` (score later with ``python -m comol.eval.execute``). Execution is
        refused before generation when OS confinement is missing, unless ``eval.allow_unconfined=true``."""
        if not self.active:
            return {}
        cfg = self.cfg
        n = int(cfg.decoding.get("num_samples", 1))
        ks = [k for k in cfg.ks if k <= n]
        if cfg.execute:
            check_confinement(cfg.allow_unconfined)  # refuse before spending time on generation
        rows = self.rows if self.rows is not None else self.load_rows()
        pred_dir = Path(out_dir) / "predictions"
        metrics: dict[str, float] = {}
        for set_name, problems in rows.items():
            samples = generate_responses(model, tokenizer, [self.prompt(p) for p in problems], cfg.max_new_tokens,
                                         cfg.decoding, batch_size=cfg.batch_size, desc=f"generate {set_name}")
            completions = {p["task_id"]: [truncate_completion(s) for s in outs] for p, outs in zip(problems, samples)}
            samples_rows = sample_rows(problems, completions)
            if not cfg.execute:
                path = atomic_write_jsonl(pred_dir / f"{set_name}{SAMPLES_SUFFIX}", samples_rows)
                log.info("eval code/%s: samples written to %s (eval.execute=false); score them with "
                         "`python -m comol.eval.execute %s`", set_name, path, path)
                continue
            set_metrics, records = score_samples(samples_rows, set_name, ks=ks, workers=cfg.workers,
                                                 timeout=float(cfg.timeout), memory_mb=cfg.memory_mb,
                                                 allow_unconfined=cfg.allow_unconfined)
            atomic_write_jsonl(pred_dir / f"{set_name}.jsonl", records)
            metrics.update(set_metrics)
        return metrics
