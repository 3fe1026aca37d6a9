"""Executing generated code (HumanEval): the OS sandbox and pass@k.

Modules, bottom up (each imports only those above it):

* :mod:`~comol.eval.code.pass_at_k`: the unbiased pass@k estimator.
* :mod:`~comol.eval.code.launcher`: the stdlib-only launcher that runs INSIDE the sandbox
  (limits, uid drop, in-process guard, the split between the completion and the checks).
* :mod:`~comol.eval.code.confinement`: the bubblewrap command line and its probe.
* :mod:`~comol.eval.code.sandbox`: :func:`run_program` / :func:`evaluate_programs` (public API).
* :mod:`~comol.eval.code.humaneval`: HumanEval problems as split programs, and their pass@k.
* :mod:`~comol.eval.code.samples`: samples files (``<set>.samples.jsonl``) and their scoring.
* :mod:`~comol.eval.code.bench`: ``python -m comol.eval.code.bench``, whole vs split timing.

The command ``python -m comol.eval.execute`` scores a samples file (docs/evaluation.md).
"""
