"""Alpaca prompt template (docs/methods.md §5)."""

from __future__ import annotations

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:"
)


def build_prompt(row: dict) -> str:
    """The prompt for a row: the 'with input' form when ``input`` is non-empty."""
    inp = (row.get("input") or "").strip()
    if inp:
        return PROMPT_WITH_INPUT.format(instruction=row["instruction"], input=inp)
    return PROMPT_NO_INPUT.format(instruction=row["instruction"])
