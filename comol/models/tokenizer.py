"""An offline tokenizer for the tiny random-init backbones (no hub access needed).

A byte-level BPE (every byte is in the alphabet, so any text encodes) with single-digit number
tokens, trained in well under a second on the prompt template plus generated toy-math text.
Training is deterministic, so every process builds the same vocabulary.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from comol.data.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT
from comol.data.toy_math import generate_toy_math

EOS, PAD = "<|endoftext|>", "<|pad|>"


def _corpus() -> list[str]:
    rows = generate_toy_math(3000, seed=12345, max_operand=99)
    text = [PROMPT_NO_INPUT, PROMPT_WITH_INPUT] * 50
    text += [r["instruction"] + " " + r["output"] for r in rows]
    text += ["The answer is", "the correct answer is", "true false solution1 solution2 answer1 answer2 answer3 "
             "answer4 answer5 ending1 ending2 ending3 ending4 option1 option2", "def return if else for in range"]
    return text


@functools.lru_cache(maxsize=4)
def offline_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left")
    return fast
