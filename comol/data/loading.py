"""Loading Alpaca-style rows from a local JSON/JSONL file or a hub dataset id, with row checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from comol.errors import DataError, DataFileNotFound


def _looks_like_path(source: str) -> bool:
    """Local file when it ends in .json/.jsonl or exists; otherwise a hub dataset id."""
    return source.endswith((".json", ".jsonl")) or Path(source).exists()


def read_json_rows(path: str | Path, what: str = "data file") -> list:
    """Rows of a JSON-list file or a JSON-lines file (told apart by content, not by suffix).

    Errors name the file (and the line for JSON lines).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"{what} {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return data
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
    return rows


def check_rows(rows: list, source: str, required: Sequence[str] = ("instruction", "output"),
               strings: bool = True) -> list[dict]:
    """Every row is an object with the fields ``required`` (strings, unless ``strings=False``)."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {i} is a {type(row).__name__}, expected an object with {list(required)}")
        for key in required:
            if key not in row or row[key] is None:
                raise DataError(f"{source}: row {i} lacks '{key}' (required: {', '.join(required)})")
            if strings and not isinstance(row[key], str):
                raise DataError(f"{source}: row {i} field '{key}' is a {type(row[key]).__name__}, expected a string")
    return rows


def load_rows(source: str, split: str = "train", required: Sequence[str] = ("instruction", "output")) -> list[dict]:
    """Rows from a local .json/.jsonl file, or from a hub dataset id through ``datasets``."""
    source = str(source)
    if _looks_like_path(source):
        return check_rows(read_json_rows(source), source, required)
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not found/offline"
        raise DataError(
            f"dataset {source!r} (split {split!r}) could not be loaded: {type(e).__name__}: {str(e).splitlines()[0][:200]}. "
            f"Give a local .json/.jsonl file instead"
        ) from None
    return check_rows([dict(r) for r in ds], f"{source}[{split}]", required)
