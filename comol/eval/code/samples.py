"""HumanEval samples files: the rows a run writes (``<set>.samples.jsonl``), reading them back,
and scoring them in the sandbox (``eval/code/<set>/pass@k`` and ``.../confined``)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

from comol.errors import DataError
from comol.eval.code.confinement import ConfinementUnavailable, confinement_problem
from comol.eval.code.humaneval import evaluate_humaneval

log = logging.getLogger(__name__)

SAMPLE_KEYS = ("task_id", "prompt", "test", "entry_point", "completions")
SAMPLES_SUFFIX = ".samples.jsonl"


def check_confinement(allow_unconfined: bool, how_to_allow: str = "eval.allow_unconfined=true") -> bool:
    """True when runs will be confined; False (with a warning) when confinement is missing
    but explicitly allowed; raises :class:`ConfinementUnavailable` (one sentence) otherwise."""
    problem = confinement_problem()
    if problem is None:
        return True
    if not allow_unconfined:
        raise ConfinementUnavailable(
            f"refusing to execute generated code without OS confinement: {problem}, or allow "
            f"unconfined execution explicitly with {how_to_allow}")
    log.warning("EXECUTING GENERATED CODE WITHOUT OS CONFINEMENT (%s): %s", how_to_allow, problem)
    return False


def sample_rows(problems: Sequence[dict], completions: dict[str, list[str]]) -> list[dict]:
    """Self-contained samples: everything needed to score them without the dataset."""
    return [{"task_id": p["task_id"], "prompt": p["prompt"], "test": p["test"],
             "entry_point": p["entry_point"], "completions": list(completions[p["task_id"]])}
            for p in problems]


STANDARD_KEYS = ("task_id", "completion")
#: fields a samples row of the project's own format repeats from its problem: they must be equal
PROBLEM_KEYS = ("prompt", "test", "entry_point")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_samples(path: str | Path, problems: Sequence[dict], problems_file: str | Path = "the problem file"
                 ) -> tuple[list[dict], dict[str, list[str]], str]:
    """The completions of a samples file, judged against the TRUSTED ``problems`` (never the file's own).

    Two formats, line by line: the project's own (``task_id, prompt, test, entry_point,
    completions``: its prompt, test and entry point must equal the problem's, else the row is
    refused), and the standard human-eval one (``task_id, completion``; a task may have many
    lines). Returns (the problems sampled, in file order; task_id -> completions; the format,
    ``"comol"``, ``"human-eval"`` or ``"mixed"``). A one-line :class:`DataError` names the file, line
    and task_id of any row at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: samples file does not exist")
    by_id = {p["task_id"]: p for p in problems}
    completions: dict[str, list[str]] = {}
    own: set[str] = set()
    formats = set()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or ("completions" not in row and "completion" not in row):
            raise DataError(f"{path}:{i}: expected an object with keys {', '.join(SAMPLE_KEYS)} (this project's "
                            f"samples) or {', '.join(STANDARD_KEYS)} (human-eval samples)")
        task_id = row.get("task_id")
        if not isinstance(task_id, str) or task_id not in by_id:
            raise DataError(f"{path}:{i}: task_id {task_id!r} is not a problem of {problems_file}")
        problem = by_id[task_id]
        if "completions" in row:
            formats.add("comol")
            missing = [k for k in SAMPLE_KEYS if k not in row]
            if missing:
                raise DataError(f"{path}:{i}: {task_id}: missing {', '.join(missing)} "
                                f"(expected keys {', '.join(SAMPLE_KEYS)})")
            differ = [k for k in PROBLEM_KEYS if row[k] != problem[k]]
            if differ:
                raise DataError(f"{path}:{i}: {task_id}: its {', '.join(differ)} differ(s) from the problem's in "
                                f"{problems_file}; samples are judged by the problem file's tests only, so "
                                "this row is refused")
            if not isinstance(row["completions"], list) or not row["completions"] or \
                    not all(isinstance(c, str) for c in row["completions"]):
                raise DataError(f"{path}:{i}: {task_id}: completions must be a non-empty list of strings")
            if task_id in completions:
                raise DataError(f"{path}:{i}: task_id {task_id} repeated")
            own.add(task_id)
            completions[task_id] = list(row["completions"])
        else:
            formats.add("human-eval")
            if not isinstance(row["completion"], str):
                raise DataError(f"{path}:{i}: {task_id}: completion must be a string, got "
                                f"{type(row['completion']).__name__}")
            if task_id in own:
                raise DataError(f"{path}:{i}: task_id {task_id} repeated")
            completions.setdefault(task_id, []).append(row["completion"])
    if not completions:
        raise DataError(f"{path}: no samples")
    fmt = formats.pop() if len(formats) == 1 else "mixed"
    return [by_id[t] for t in completions], completions, fmt


def score_samples(samples: Sequence[dict], set_name: str, *, ks: Sequence[int] = (1, 5, 10),
                  workers: int = 4, timeout: float = 3.0, memory_mb: int = 1024,
                  allow_unconfined: bool = False, how_to_allow: str = "eval.allow_unconfined=true",
                  progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Execute the samples; returns (metrics ``eval/code/<set>/...``, scored prediction rows)."""
    confined = check_confinement(allow_unconfined, how_to_allow)
    completions = {s["task_id"]: list(s["completions"]) for s in samples}
    scored = evaluate_humaneval(samples, completions, ks=ks, workers=workers, timeout=timeout,
                                progress=progress, memory_mb=memory_mb, confine=confined)
    per_problem = {r["task_id"]: r for r in scored["per_problem"]}
    records = [{"task_id": s["task_id"], "completions": completions[s["task_id"]],
                "n": per_problem[s["task_id"]]["n"], "c": per_problem[s["task_id"]]["c"],
                "statuses": per_problem[s["task_id"]]["statuses"]} for s in samples]
    metrics = {f"eval/code/{set_name}/{k}": v for k, v in scored["pass@k"].items()}
    metrics[f"eval/code/{set_name}/confined"] = 1.0 if confined else 0.0
    log.info("eval code/%s: %s (%s)", set_name, scored["pass@k"],
             "confined" if confined else "UNCONFINED")
    return metrics, records


def set_name_of(path: Path) -> str:
    name = path.name
    return name[: -len(SAMPLES_SUFFIX)] if name.endswith(SAMPLES_SUFFIX) else path.stem
