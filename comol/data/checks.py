"""Checks of the training rows themselves, run once they are read and before the backbone is built: the
config values were checked already (comol/schema.py), these need the rows and the tokenizer."""

from __future__ import annotations

from comol.data.clip import clip_row
from comol.data.prompts import build_prompt
from comol.errors import ConfigError


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Tokens per text (special tokens such as a BOS included, as the datamodule tokenises prompts)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []


def check_row_lengths(rows: list[dict], tokenizer, max_length: int, split: str = "train") -> str | None:
    """Count the rows ``max_length`` cuts. All of them losing their whole answer is an error; some: a warning
    line (returned)."""
    if not rows:
        return None
    rows = [clip_row(r, max_length, tokenizer) for r in rows]   # a huge field is cut before tokenising
    prompts = [build_prompt(r) for r in rows]
    prompt_len = token_lengths(tokenizer, prompts)
    full_len = [n + 1 for n in token_lengths(tokenizer, [p + r["output"] for p, r in zip(prompts, rows)])]  # + EOS
    cut = sum(n > max_length for n in full_len)
    no_answer = sum(n >= max_length for n in prompt_len)
    if no_answer == len(rows):
        raise ConfigError(f"dataset.max_length={max_length} is invalid: every {split} prompt is at least that long "
                          f"(shortest {min(prompt_len)} tokens), so no answer token would be trained on")
    if not cut:
        return None
    return (f"dataset.max_length={max_length} cuts {cut} of {len(rows)} {split} rows (longest {max(full_len)} tokens"
            f" with EOS); {no_answer} of them lose their whole answer")


def training_row_warnings(splits: dict[str, list[dict]], tokenizer, max_length: int) -> list[str]:
    """The length warnings of the training and validation rows."""
    lines = [check_row_lengths(splits.get(split) or [], tokenizer, max_length, split) for split in ("train", "val")]
    return [line for line in lines if line]
