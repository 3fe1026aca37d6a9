"""Cap what is tokenised: a row's text fields are cut to a character bound before tokenising.

Training keeps the first ``dataset.max_length`` tokens of prompt + output, but tokenising a 10 MB field to
throw all but those tokens away takes minutes. No token of a vocabulary covers more characters than its
longest entry has (byte-level BPE entries spell one character per byte; SentencePiece and WordPiece entries
are at least as long as the text they cover), so a field cut to ``(max_length + 1) × longest entry``
characters still yields more than ``max_length`` tokens whenever the whole field would. Only the tokens next
to the cut can differ from those of the whole text, and for ordinary text (a few characters per token) the
cut lies several times ``max_length`` tokens in, so the kept ids are those of the uncut text
(tests/test_hostile_data.py checks them against it). Fields shorter than the bound are
untouched, so ordinary rows are encoded exactly as before. (A tokenizer whose normaliser deletes characters,
e.g. accent stripping, could in principle need a larger bound: then set the bound by hand with
:func:`clip_row`'s ``chars``.)
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

#: the fields cut (the ones the prompt template and the training text use)
TEXT_FIELDS = ("instruction", "input", "output")
#: when the tokenizer has no readable vocabulary
FALLBACK_TOKEN_CHARS = 256

_longest: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def longest_token_chars(tokenizer) -> int:
    """Characters in the longest vocabulary entry (computed once per tokenizer object)."""
    try:
        return _longest[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        n = max((len(t) for t in tokenizer.get_vocab()), default=0) or FALLBACK_TOKEN_CHARS
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab
        n = FALLBACK_TOKEN_CHARS
    try:
        _longest[tokenizer] = n
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return n


def char_bound(max_length: int, tokenizer) -> int:
    """The character bound for a field that is truncated to ``max_length`` tokens."""
    return (int(max_length) + 1) * longest_token_chars(tokenizer)


def clip_row(row: Mapping[str, Any], max_length: int, tokenizer, chars: int | None = None) -> Mapping[str, Any]:
    """``row`` with its text fields cut to ``chars`` characters (default :func:`char_bound`); the row itself
    when nothing is that long."""
    bound = chars if chars is not None else char_bound(max_length, tokenizer)
    long = [k for k in TEXT_FIELDS if isinstance(row.get(k), str) and len(row[k]) > bound]
    if not long:
        return row
    # the template strips ``input`` (an all-blank input selects the no-input prompt): strip before cutting
    return {**row, **{k: (row[k].strip() if k == "input" else row[k])[:bound] for k in long}}
