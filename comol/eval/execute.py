"""Score HumanEval samples by executing them, apart from generation.

``eval=humaneval eval.execute=false`` writes ``predictions/<set>.samples.jsonl`` (one row per
problem: task_id, prompt, test, entry_point, completions) and executes nothing. Score such a
file later, on this or another machine (or in a container)::

    python -m comol.eval.execute outputs/<run>/predictions/humaneval.samples.jsonl

It writes ``predictions/<set>.jsonl`` (n, c, statuses per problem) next to the samples and
merges ``eval/code/<set>/pass@k`` and ``eval/code/<set>/confined`` into the run's
``results.json`` (the folder above ``predictions/``, or ``--out-dir``), exactly as an
``eval.execute=true`` run does. Execution is confined by the OS (bubblewrap) or refused;
``--allow-unconfined`` (``eval.allow_unconfined=true`` in a run) permits running without it,
which is logged and recorded as ``confined: 0``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from comol.errors import DataError
from comol.io_utils import atomic_write_json, atomic_write_jsonl
from comol.tools.sandbox import evaluate_humaneval
from comol.tools.sandbox_confine import ConfinementUnavailable, confinement_problem

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


def read_samples(path: str | Path) -> list[dict]:
    """Rows of a samples file; a one-line :class:`DataError` names the file, row and key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: samples file does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
        missing = [k for k in SAMPLE_KEYS if k not in row] if isinstance(row, dict) else list(SAMPLE_KEYS)
        if missing:
            raise DataError(f"{path}:{i}: missing {', '.join(missing)} (expected keys {', '.join(SAMPLE_KEYS)})")
        if not isinstance(row["completions"], list) or not row["completions"] or \
                not all(isinstance(c, str) for c in row["completions"]):
            raise DataError(f"{path}:{i}: completions must be a non-empty list of strings")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no samples")
    ids = [r["task_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: task_id repeated")
    return rows


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


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(prog="python -m comol.eval.execute", description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", type=Path, help="a <set>.samples.jsonl written with eval.execute=false")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="run folder receiving results.json and predictions/ (default: the samples' run folder)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--allow-unconfined", action="store_true",
                    help="run WITHOUT OS confinement when bubblewrap is unavailable (recorded as confined: 0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    samples = read_samples(args.samples)
    set_name = set_name_of(args.samples)
    folder = args.samples.resolve().parent
    out_dir = args.out_dir or (folder.parent if folder.name == "predictions" else folder)
    n = min(len(s["completions"]) for s in samples)
    metrics, records = score_samples(samples, set_name, ks=[k for k in args.ks if k <= n] or [1],
                                     workers=args.workers, timeout=args.timeout, memory_mb=args.memory_mb,
                                     allow_unconfined=args.allow_unconfined, how_to_allow="--allow-unconfined")
    atomic_write_jsonl(out_dir / "predictions" / f"{set_name}.jsonl", records)
    results_path = out_dir / "results.json"
    old = json.loads(results_path.read_text()) if results_path.is_file() else {}
    old = {k: v for k, v in old.items() if not k.startswith(f"eval/code/{set_name}/")}
    atomic_write_json(results_path, {**old, **metrics})
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (DataError, ConfinementUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
