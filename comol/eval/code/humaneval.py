"""HumanEval problems as sandboxed programs, and their pass@k.

A sample (prompt + completion) runs *split*: the completion in one process, the trusted checks
(prompt + test) in another (:class:`comol.eval.code.sandbox.SplitProgram`).
"""

from __future__ import annotations

from typing import Sequence

from comol.eval.code.pass_at_k import mean_pass_at_k
from comol.eval.code.sandbox import SplitProgram, evaluate_programs

__all__ = ["build_program", "whole_program", "evaluate_humaneval"]


def build_program(problem: dict, completion: str) -> SplitProgram:
    """A HumanEval sample: prompt + completion as the program, prompt + test as the checks."""
    return SplitProgram(program=problem["prompt"] + completion + "\n", checks=_checks_source(problem),
                        entry_point=problem["entry_point"])


def _checks_source(problem: dict) -> str:
    """prompt + test; a prompt whose last function has no body yet (no docstring) gets ``pass``."""
    for filler in ("", "    pass\n"):
        source = problem["prompt"] + filler + "\n" + problem["test"] + "\n"
        try:
            compile(source, "checks.py", "exec")
            return source
        except SyntaxError:
            continue
    return problem["prompt"] + "\n" + problem["test"] + "\n"   # the sandbox reports the error


def whole_program(problem: dict, completion: str) -> str:
    """The same sample as ONE program (prompt + completion + test + ``check(entry_point)``), as
    other harnesses run it; the checks then share the completion's process (forgeable)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def evaluate_humaneval(
    problems: Sequence[dict],
    completions: dict[str, Sequence[str]],
    ks: Sequence[int] = (1, 5, 10),
    workers: int = 4,
    timeout: float = 3.0,
    progress: bool = True,
    **run_kwargs,
) -> dict:
    """Execute every completion of every problem and compute pass@k.

    ``problems`` are the HumanEval rows to score (all of them, or a subset); each must have
    at least one completion in ``completions`` (task_id -> list of completion strings, the
    code that follows the prompt). Returns ``{"per_problem": [{task_id, n, c, statuses,
    details}], "pass@k": {"pass@1": ...}}`` where only k <= the smallest n are reported.
    """
    by_id = {p["task_id"]: p for p in problems}
    unknown = sorted(set(completions) - set(by_id))
    if unknown:
        raise ValueError(f"completions for unknown task_id(s): {', '.join(unknown[:5])}")
    jobs = []
    for p in problems:
        comps = completions.get(p["task_id"])
        if not comps:
            raise ValueError(f"no completions for task_id {p['task_id']!r}")
        jobs += [((p["task_id"], i), build_program(p, c)) for i, c in enumerate(comps)]
    results = evaluate_programs(jobs, workers=workers, timeout=timeout, progress=progress,
                                desc="humaneval", **run_kwargs)
    per_problem = []
    for p in problems:
        n = len(completions[p["task_id"]])
        res = [results[(p["task_id"], i)] for i in range(n)]
        per_problem.append({
            "task_id": p["task_id"],
            "n": n,
            "c": sum(r.passed for r in res),
            "statuses": [r.status for r in res],
            "details": [r.detail[-500:] for r in res],
        })
    return {
        "per_problem": per_problem,
        "pass@k": mean_pass_at_k([(r["n"], r["c"]) for r in per_problem], ks),
    }
