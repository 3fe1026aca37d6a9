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
from comol.eval.code.confinement import ConfinementUnavailable
from comol.eval.code.samples import read_samples, score_samples, set_name_of
from comol.io_utils import atomic_write_json, atomic_write_jsonl


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
