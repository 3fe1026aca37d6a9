"""Scoring of the commonsense evaluation sets (docs/methods.md §6).

The prediction is the first word of the set's label vocabulary found in the response
(case-insensitive, e.g. "the correct answer is answer2" -> ``answer2``); a response with
no label scores as wrong. Labels are returned in canonical lower case.
"""

from __future__ import annotations

import re

#: Label vocabulary of each set. social_i_qa has three options but answer4/answer5 are
#: accepted (and simply never match gold) so a model naming them is parsed, not ignored.
LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}

# Accept common spellings of the set names (any case, "-" or "_", ARC-C / ARC-E).
_ALIASES = {"arcc": "ARC-Challenge", "arce": "ARC-Easy", "siqa": "social_i_qa", "obqa": "openbookqa"}


def _key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).lower()


_CANONICAL = {_key(name): name for name in LABELS} | _ALIASES

# One alternation per set, longest label first so "answer1" never shadows "answer10".
# Labels must not be glued to other letters/digits ("untrue" is not "true").
_PATTERNS = {
    name: re.compile(
        r"(?<![A-Za-z0-9])(" + "|".join(sorted(map(re.escape, labels), key=len, reverse=True))
        + r")(?![A-Za-z0-9])",
        re.IGNORECASE,
    )
    for name, labels in LABELS.items()
}


def canonical_set_name(set_name: str) -> str:
    """Map ``set_name`` (e.g. ``"arc_challenge"``) to its key in :data:`LABELS`."""
    name = _CANONICAL.get(_key(set_name))
    if name is None:
        raise ValueError(
            f"unknown commonsense set {set_name!r}: known sets are {', '.join(LABELS)}"
        )
    return name


def extract_label(set_name: str, text: str | None) -> str | None:
    """The first label of ``set_name``'s vocabulary in ``text`` (lower case), or ``None``."""
    pattern = _PATTERNS[canonical_set_name(set_name)]
    m = pattern.search(text or "")
    return m.group(1).lower() if m else None


def score_commonsense_row(set_name: str, response: str | None, gold: str) -> dict:
    """Score one response: ``{"pred": label | None, "correct": bool}``."""
    pred = extract_label(set_name, response)
    return {"pred": pred, "correct": pred is not None and pred == str(gold).strip().lower()}


def commonsense_accuracy(set_name: str, responses: list[str], golds: list[str]) -> dict:
    """Accuracy of a whole set: ``{"acc", "n", "correct"}``."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    correct = sum(score_commonsense_row(set_name, r, g)["correct"] for r, g in zip(responses, golds))
    n = len(golds)
    return {"n": n, "correct": correct, "acc": correct / n if n else 0.0}
