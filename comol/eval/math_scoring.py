"""Scoring of the math evaluation sets (docs/methods.md §6).

Numeric sets (AddSub, GSM8K, MultiArith, SingleEq, SVAMP): the prediction is the LAST number
in the response (thousands separators removed, a trailing ``a/b`` read as a fraction) and is
correct when ``|pred - gold| <= 1e-3``.

AQuA (options A-E) is scored two ways and both are reported:

* the *reference* rule of the LLM-Adapters evaluation: the first capital A-E anywhere in the
  text. It misreads words such as "A train" or "Each" and is kept only so results stay
  comparable with published numbers; ``correct`` uses it.
* a *robust* rule: the last "answer is (X)" / "answer is X" / "answer: X", else the last
  option letter standing alone as a token (optionally in parentheses), else ``None``.
"""

from __future__ import annotations

import math
import re

#: Absolute tolerance of a numeric match.
TOLERANCE = 1e-3

AQUA_SET = "aqua"
NUMERIC_SETS = ("addsub", "gsm8k", "multiarith", "singleeq", "svamp")

# A comma between digits followed by exactly three digits is a thousands separator.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A number, optionally negative (a minus directly after a word character or ")" is a
# subtraction, not a sign), optionally a fraction "a/b".
_NUMBER = re.compile(
    r"(?:(?<![\w)])(?P<sign>-))?"
    r"(?P<num>\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
)
_ANSWER_IS = re.compile(r"(?i:answer\s*(?:is|:))\s*:?\s*\(?([A-E])\)?(?![A-Za-z0-9])")
_PAREN_LETTER = re.compile(r"\(([A-E])\)")
_BARE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-E])(?![A-Za-z0-9'])")


def extract_last_number(text: str | None) -> float | None:
    """The last number in ``text`` as a float, or ``None`` when there is none.

    ``"1,234"`` reads as 1234, ``"-3.5"`` as -3.5, ``"3/4"`` as 0.75 and ``"7 - 3 = 4."``
    as 4. A division by zero in a fraction falls back to its numerator.
    """
    if not text:
        return None
    cleaned = _THOUSANDS.sub("", text)
    last = None
    for last in _NUMBER.finditer(cleaned):
        pass
    if last is None:
        return None
    value = float(last.group("num"))
    den = last.group("den")
    if den is not None and float(den) != 0.0:
        value /= float(den)
    return -value if last.group("sign") else value


def parse_gold_number(gold: str | float | int) -> float:
    """Gold answers are strings such as ``"576.0"`` or ``"1,200"``."""
    if isinstance(gold, (int, float)):
        return float(gold)
    try:
        return float(str(gold).replace(",", "").strip())
    except ValueError:
        raise ValueError(f"gold answer {gold!r} is not a number") from None


def math_correct(pred: float | None, gold: str | float | int) -> bool:
    """True when ``pred`` is within :data:`TOLERANCE` of the numeric ``gold``."""
    if pred is None or not math.isfinite(pred):
        return False
    return abs(pred - parse_gold_number(gold)) <= TOLERANCE


def aqua_reference(text: str | None) -> str | None:
    """The reference AQuA rule: the first capital A-E anywhere in ``text``."""
    for ch in text or "":
        if ch in "ABCDE":
            return ch
    return None


def aqua_robust(text: str | None) -> str | None:
    """A robust AQuA rule: "answer is (X)" patterns, else the last standalone option letter.

    A bare capital "A" followed by a lower-case word ("A train ...") is read as an article,
    not as an option.
    """
    if not text:
        return None
    hits = _ANSWER_IS.findall(text)
    if hits:
        return hits[-1]
    hits = _PAREN_LETTER.findall(text)
    if hits:
        return hits[-1]
    for m in reversed(list(_BARE_LETTER.finditer(text))):
        if m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end():]):
            continue
        return m.group(1)
    return None


def _norm_set(set_name: str) -> str:
    return set_name.lower().replace("-", "").replace("_", "")


def is_aqua(set_name: str) -> bool:
    return _norm_set(set_name) == AQUA_SET


def score_math_row(set_name: str, response: str | None, gold: str) -> dict:
    """Score one response of a math set.

    Returns ``{"pred", "correct"}``; for AQuA also ``pred_reference``, ``correct_reference``,
    ``pred_robust`` and ``correct_robust``, with ``pred``/``correct`` equal to the reference
    rule so that the headline number is comparable with the literature.
    """
    if is_aqua(set_name):
        gold_letter = str(gold).strip().upper()
        ref, rob = aqua_reference(response), aqua_robust(response)
        return {
            "pred": ref,
            "correct": ref == gold_letter,
            "pred_reference": ref,
            "correct_reference": ref == gold_letter,
            "pred_robust": rob,
            "correct_robust": rob == gold_letter,
        }
    if _norm_set(set_name) not in NUMERIC_SETS:
        raise ValueError(
            f"unknown math set {set_name!r}: expected one of AddSub, AQuA, gsm8k, MultiArith, "
            "SingleEq, SVAMP"
        )
    pred = extract_last_number(response)
    return {"pred": pred, "correct": math_correct(pred, gold)}


def math_accuracy(set_name: str, responses: list[str], golds: list[str]) -> dict:
    """Accuracy of a whole set: ``{"acc", "n", "correct"}`` (+ ``acc_robust`` for AQuA)."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    rows = [score_math_row(set_name, r, g) for r, g in zip(responses, golds)]
    n = len(rows)
    out = {"n": n, "correct": sum(r["correct"] for r in rows)}
    out["acc"] = out["correct"] / n if n else 0.0
    if is_aqua(set_name):
        out["correct_robust"] = sum(r["correct_robust"] for r in rows)
        out["acc_robust"] = out["correct_robust"] / n if n else 0.0
    return out
