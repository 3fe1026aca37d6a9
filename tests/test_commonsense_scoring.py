"""Commonsense label extraction and scoring (docs/methods.md §6), checked on the real files."""

from __future__ import annotations

import pytest

from comol.eval.commonsense_scoring import (
    LABELS,
    canonical_set_name,
    commonsense_accuracy,
    extract_label,
    score_commonsense_row,
)
from comol.eval.eval_files import (
    COMMONSENSE_SETS,
    commonsense_file,
    load_eval_rows,
)


@pytest.mark.parametrize(
    "set_name, text, expected",
    [
        ("boolq", "the correct answer is false", "false"),
        ("boolq", "True. It is not false.", "true"),  # first match wins
        ("boolq", "FALSE", "false"),  # case-insensitive, canonical lower case
        ("boolq", "that is untrue", None),  # not glued to other letters
        ("piqa", "the correct answer is Solution2", "solution2"),
        ("piqa", "solution3", None),
        ("social_i_qa", "the correct answer is answer3", "answer3"),
        ("social_i_qa", "answer5", "answer5"),
        ("hellaswag", "ending4 is right", "ending4"),
        ("winogrande", "the correct answer is option1", "option1"),
        ("ARC-Challenge", "answer4", "answer4"),
        ("ARC-Easy", "answer10", None),
        ("openbookqa", "I pick answer2, not answer1", "answer2"),
        ("openbookqa", "", None),
        ("openbookqa", None, None),
    ],
)
def test_extract_label(set_name, text, expected):
    assert extract_label(set_name, text) == expected


def test_vocabularies_match_the_spec():
    assert LABELS["boolq"] == ("true", "false")
    assert LABELS["piqa"] == ("solution1", "solution2")
    assert LABELS["hellaswag"] == tuple(f"ending{i}" for i in range(1, 5))
    assert LABELS["winogrande"] == ("option1", "option2")
    for name in ("social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa"):
        assert LABELS[name] == tuple(f"answer{i}" for i in range(1, 6))


def test_set_name_aliases_and_unknown():
    assert canonical_set_name("arc_challenge") == "ARC-Challenge"
    assert canonical_set_name("ARC-E") == "ARC-Easy"
    assert canonical_set_name("BoolQ") == "boolq"
    with pytest.raises(ValueError, match=r"unknown commonsense set 'mmlu'.*boolq.*openbookqa"):
        extract_label("mmlu", "answer1")


def test_score_row_and_accuracy():
    assert score_commonsense_row("boolq", "the correct answer is true", "true") == {
        "pred": "true", "correct": True}
    assert score_commonsense_row("boolq", "no idea", "true") == {"pred": None, "correct": False}
    acc = commonsense_accuracy("piqa", ["solution1", "solution1", "x"], ["solution1", "solution2", "solution1"])
    assert acc == {"n": 3, "correct": 1, "acc": pytest.approx(1 / 3)}


# Scoring each file's own `output` ("the correct answer is answer2") as the response: every
# output names its gold label, so all seven sets score 100% (hellaswag is not in the bundled
# data). Recorded as (correct, rows).
GOLD_AS_RESPONSE = {
    "boolq": (3270, 3270),
    "piqa": (1838, 1838),
    "social_i_qa": (1954, 1954),
    "winogrande": (1267, 1267),
    "ARC-Challenge": (1172, 1172),
    "ARC-Easy": (2376, 2376),
    "openbookqa": (500, 500),
}


@pytest.mark.parametrize("set_name", COMMONSENSE_SETS)
def test_gold_output_as_response(data_dir, set_name):
    rows = load_eval_rows(commonsense_file(set_name, data_dir), required=("instruction", "output", "answer"))
    correct = sum(score_commonsense_row(set_name, r["output"], r["answer"])["correct"] for r in rows)
    assert (correct, len(rows)) == GOLD_AS_RESPONSE[set_name]
    # Every gold answer is inside the set's vocabulary.
    assert {r["answer"] for r in rows} <= set(LABELS[set_name])
