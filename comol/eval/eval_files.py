"""Locate and load the evaluation files (math / commonsense JSON, HumanEval JSONL).

Every loader validates the rows it returns, so a malformed file fails early with a
one-line message naming the file, the row and the missing field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from comol import BUNDLED_DATA_DIR, DATA_ENV_VAR, default_data_dir  # noqa: F401  (re-exported)
from comol.data.loading import check_rows, read_json_rows
from comol.errors import DataError


#: Fields every HumanEval problem must carry (``canonical_solution`` is optional).
HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "test")

MATH_SETS = ("AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP")
COMMONSENSE_SETS = (
    "boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa",
)


def require_data_dir() -> Path:
    """Like :func:`default_data_dir` but raise ``FileNotFoundError`` if the folder is missing."""
    path = default_data_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder {path} not found: it ships with a git checkout of comol (data/), not with an "
            f"installed wheel; set {DATA_ENV_VAR} to a folder holding eval/math, eval/commonsense and eval/code"
        )
    return path


def _read_checked(path: Path, required: Iterable[str]) -> list[dict]:
    rows = read_json_rows(path, what="evaluation file")
    return check_rows(rows, str(path), tuple(required), strings=False)


def load_eval_rows(
    path: str | os.PathLike, required: Sequence[str] = ("instruction", "answer")
) -> list[dict]:
    """Load an evaluation file (JSON list or JSON lines) and check each row has ``required``.

    Raises ``FileNotFoundError`` naming the path when it is missing and
    :class:`comol.errors.DataError` (a ``ValueError``) naming the row and field when a row
    is incomplete.
    """
    path = Path(path)
    return _read_checked(path, required)


def load_humaneval(path: str | os.PathLike) -> list[dict]:
    """Load HumanEval problems; each needs task_id, prompt, entry_point and test."""
    path = Path(path)
    rows = _read_checked(path, HUMANEVAL_FIELDS)
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row["task_id"] in seen:
            raise DataError(f"{path}: row {i} repeats task_id {row['task_id']!r}")
        seen.add(row["task_id"])
    return rows


def math_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of a math evaluation set, e.g. ``math_file("gsm8k")``."""
    return Path(data_dir or default_data_dir()) / "eval" / "math" / f"{name}.json"


def commonsense_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of a commonsense evaluation set, e.g. ``commonsense_file("boolq")``."""
    return Path(data_dir or default_data_dir()) / "eval" / "commonsense" / f"{name}.json"


def humaneval_file(data_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``eval/code/humaneval.jsonl``."""
    return Path(data_dir or default_data_dir()) / "eval" / "code" / "humaneval.jsonl"
