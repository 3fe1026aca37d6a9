"""`evaluate` metric: unbiased pass@k of generated programs, run in comol's sandbox.

Each prediction is the list of candidate programs of one problem (prompt + completion); the
matching reference is its test code followed by ``check(<entry_point>)``. Every candidate is
executed as ``candidate + "\\n" + reference`` by comol.eval.code.sandbox.run_program::

    metric = load_metric("code_pass_at_k")
    metric.compute(predictions=[[prompt + completion, ...]],
                   references=[test + "\\n" + f"check({entry_point})"], k=[1, 5, 10])
    # {'pass@1': ..., 'pass@5': ..., 'pass@10': ..., 'n_problems': ...}
"""

import datasets
import evaluate

from comol.eval.code.pass_at_k import mean_pass_at_k
from comol.eval.code.sandbox import evaluate_programs

_DESCRIPTION = """Unbiased pass@k (Chen et al., 2021) of candidate programs executed confined by
the operating system (bubblewrap; refused when it is unavailable), where a candidate passes only
when the harness reports that its checks ran to completion. Only k values not larger than the
smallest number of candidates are reported."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list (one per problem) of lists of candidate programs.
    references: list of test programs (test code + "check(entry_point)").
    k: list of k values (default [1, 5, 10]).
    num_workers: parallel sandboxes (default 4).
    timeout: wall-clock seconds per program (default 3.0).
Returns:
    pass@k for each reported k, and n_problems.
"""

_CITATION = "Chen et al., Evaluating Large Language Models Trained on Code (2021)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CodePassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5, 10), num_workers=4, timeout=3.0):
        jobs = [
            ((i, j), candidate + "\n" + test + "\n")
            for i, (candidates, test) in enumerate(zip(predictions, references))
            for j, candidate in enumerate(candidates)
        ]
        results = evaluate_programs(jobs, workers=num_workers, timeout=timeout, progress=False)
        counts = [
            (len(candidates), sum(results[(i, j)].passed for j in range(len(candidates))))
            for i, candidates in enumerate(predictions)
        ]
        out = mean_pass_at_k(counts, k)
        out["n_problems"] = len(counts)
        return out
