"""`evaluate` metric: accuracy of math answers, scored by comol.eval.math_scoring.

Load it offline from its folder (``comol.eval.metrics.load_metric("math_accuracy")``) and
pick the evaluation set as the config name::

    metric = load_metric("math_accuracy", config_name="AQuA")
    metric.compute(predictions=["... The answer is (C)."], references=["C"])
    # {'accuracy': 1.0, 'correct': 1, 'n': 1, 'accuracy_robust': 1.0, 'correct_robust': 1}
"""

import datasets
import evaluate

from comol.eval.math_scoring import math_accuracy

_DESCRIPTION = """Accuracy on a math evaluation set (AddSub, AQuA, gsm8k, MultiArith, SingleEq,
SVAMP). Numeric sets: last number of the response, correct when within 1e-3 of the gold
number. AQuA: first capital A-E (reference rule, `accuracy`) and a robust rule
(`accuracy_robust`)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of model responses (strings).
    references: list of gold answers (numbers as strings, or letters A-E for AQuA).
Returns:
    accuracy, correct, n (and accuracy_robust, correct_robust for AQuA).
"""

_CITATION = "Hu et al., LLM-Adapters (2023), evaluation protocol; see docs/evaluation.md."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MathAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        set_name = self.config_name if self.config_name != "default" else "gsm8k"
        out = math_accuracy(set_name, list(predictions), list(references))
        result = {"accuracy": out["acc"], "correct": out["correct"], "n": out["n"]}
        if "acc_robust" in out:
            result.update(accuracy_robust=out["acc_robust"], correct_robust=out["correct_robust"])
        return result
