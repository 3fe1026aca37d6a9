"""Time the 164 canonical HumanEval solutions through the sandbox, whole program vs split, side by side.

    python -m comol.eval.code.bench [--rounds 2] [--workers 4]

Split (``build_program``) is how samples are scored; a whole program (``whole_program``) runs the checks in
the program's own process, as other harnesses do. Every run must pass (164/164), or it exits 1.
"""

from __future__ import annotations

import argparse
import time

from comol.eval.eval_files import humaneval_file, load_humaneval
from comol.eval.code.humaneval import build_program, whole_program
from comol.eval.code.sandbox import evaluate_programs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m comol.eval.code.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args(argv)
    problems = load_humaneval(humaneval_file())
    ok = True
    for rnd in range(1, args.rounds + 1):
        for name, make in (("whole", whole_program), ("split", build_program)):
            jobs = [(pr["task_id"], make(pr, pr["canonical_solution"])) for pr in problems]
            start = time.monotonic()
            res = evaluate_programs(jobs, workers=args.workers, timeout=10.0, progress=False)
            passed = sum(r.passed for r in res.values())
            ok &= passed == len(problems)
            print(f"round {rnd} {name}: {passed}/{len(problems)} in {time.monotonic() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
