"""Loading Alpaca-style rows from a local JSON/JSONL file or a hub dataset id, with row checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from comol.errors import DataError, DataFileNotFound

log = logging.getLogger(__name__)


def _looks_like_path(source: str) -> bool:
    """Local file when it ends in .json/.jsonl or exists; otherwise a hub dataset id."""
    return source.endswith((".json", ".jsonl")) or Path(source).exists()


def _line_of(data: bytes | str, offset: int) -> int:
    return data.count(b"\n" if isinstance(data, bytes) else "\n", 0, offset) + 1


def _scan(text: str):
    """Walk a JSON text outside its strings: yields (offset, depth after the char, row) at each bracket, where
    ``row`` counts the commas at depth 1 before it (the row of a JSON list being read)."""
    depth = row = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            yield i, depth, row
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 1:
            row += 1
    yield len(text), depth, row


def _where(text: str, offset: int, is_list: bool) -> str:
    """'row R (line L)' for a JSON list, 'line L' for JSON lines."""
    line = _line_of(text, offset)
    if not is_list:
        return f"line {line}"
    *_, (_, _, row) = _scan(text[:offset])
    return f"row {row} (line {line})"


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        head = data[:e.start].decode("utf-8")
        where = _where(head, e.start, head.lstrip().startswith("["))
        raise DataError(f"{path}: {where} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                        f"expected a UTF-8 text file") from None


def _too_deep(path: Path, text: str, where: str) -> DataError:
    """The error for nesting too deep for the JSON parser (RecursionError): name the row/line of the deepest
    nesting (found by a scan that skips strings; this runs only on that error)."""
    deepest, at_offset, at_row = 0, 0, 0
    for offset, depth, row in _scan(text):
        if depth > deepest:
            deepest, at_offset, at_row = depth, offset, row
    at = f"row {at_row} (line {_line_of(text, at_offset)})" if where == "list" else f"line {where}"
    return DataError(f"{path}: {at} nests JSON arrays/objects {deepest} levels deep, too deep to read; expected "
                     f"flat {{instruction, input, output}} rows")


def read_json_rows(path: str | Path, what: str = "data file") -> list:
    """Rows of a JSON-list file or a JSON-lines file (told apart by content, not by suffix).

    Errors name the file (and the line for JSON lines): not UTF-8, not JSON, nested too deep to parse.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"{what} {path} does not exist")
    text = _decode(path, path.read_bytes())
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise _too_deep(path, text, "list") from None
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
            except RecursionError:
                raise _too_deep(path, line, str(lineno)) from None
    return rows


#: text fields a row may have besides the required ones: a string or null
OPTIONAL_TEXT = ("input",)


def _text_problem(value) -> str | None:
    """Why a text field's value cannot be tokenised, or None."""
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, expected a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds {value[e.start]!r} at character {e.start} (a lone surrogate), expected valid Unicode text"
    return None


def check_rows(rows: list, source: str, required: Sequence[str] = ("instruction", "output"),
               strings: bool = True) -> list[dict]:
    """Every row is an object with the fields ``required`` (strings, unless ``strings=False``); ``input``, when
    present, is a string or null. Errors name the source, the row (counted from 0) and the field."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {i} is a {type(row).__name__}, expected an object with {list(required)}")
        for key in required:
            if key not in row or row[key] is None:
                raise DataError(f"{source}: row {i} lacks '{key}' (required: {', '.join(required)})")
            problem = _text_problem(row[key]) if strings else None
            if problem:
                raise DataError(f"{source}: row {i} field '{key}' {problem}")
        for key in OPTIONAL_TEXT:
            problem = _text_problem(row[key]) if row.get(key) is not None else None
            if problem:
                raise DataError(f"{source}: row {i} field '{key}' {problem} or null")
    return rows


def row_key(row: dict) -> tuple[str, str, str]:
    """What makes two rows the same example: instruction, input and output (outer whitespace ignored)."""
    return (row["instruction"].strip(), (row.get("input") or "").strip(), row["output"].strip())


def drop_rows_in(rows: list[dict], other: list[dict], what: str) -> list[dict]:
    """``rows`` without those equal to a row of ``other`` (e.g. training rows that are validation rows);
    logs how many were dropped."""
    held = {row_key(r) for r in other}
    kept = [r for r in rows if row_key(r) not in held]
    log.info("%s: dropped %d of %d training rows equal to one of the %d validation rows", what,
             len(rows) - len(kept), len(rows), len(other))
    if not kept:
        raise DataError(f"{what}: every one of the {len(rows)} training rows is also a validation row")
    return kept


def load_rows(source: str, split: str = "train", required: Sequence[str] = ("instruction", "output")) -> list[dict]:
    """Rows from a local .json/.jsonl file, or from a hub dataset id through ``datasets``."""
    source = str(source)
    if _looks_like_path(source):
        rows = read_json_rows(source)
        if not rows:
            raise DataError(f"{source}: holds no rows (expected a JSON list or JSON lines of objects with "
                            f"{', '.join(required)})")
        return check_rows(rows, source, required)
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not found/offline"
        raise DataError(
            f"dataset {source!r} (split {split!r}) could not be loaded: {type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}; offline, download https://huggingface.co/datasets/{source} on a "
            f"machine with internet and give its .json/.jsonl file as dataset.train=<file> (or the preset's env var, "
            f"e.g. COMOL_CODEALPACA20K=<file>)"
        ) from None
    if len(ds) == 0:
        raise DataError(f"dataset {source!r} (split {split!r}) holds no rows")
    return check_rows([dict(r) for r in ds], f"{source}[{split}]", required)
