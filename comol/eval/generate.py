"""Batched generation with explicit decoding settings (left padding, KV cache, stop at EOS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from comol.errors import ConfigError


def decoding_config(decoding: Mapping[str, Any], max_new_tokens: int, tokenizer) -> GenerationConfig:
    """A complete GenerationConfig: every field we rely on is set, so a model's own
    generation_config (Qwen3 samples by default) cannot turn greedy into sampling."""
    sample = bool(decoding.get("do_sample", False))
    n = int(decoding.get("num_samples", 1))
    if n < 1:
        raise ConfigError(f"eval.decoding.num_samples={n} is invalid: expected >= 1")
    if not sample and n > 1:
        raise ConfigError(f"eval.decoding.num_samples={n} is invalid with do_sample=false: greedy decoding gives one "
                          f"answer (set eval.decoding.do_sample=true)")
    return GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=sample,
        num_beams=1,
        num_return_sequences=n,
        temperature=float(decoding.get("temperature", 1.0)) if sample else 1.0,
        top_p=float(decoding.get("top_p", 1.0)) if sample else 1.0,
        top_k=0 if sample else None,
        repetition_penalty=1.0,
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        use_cache=True,
    )


@dataclass
class GenerationStats:
    """Token counts of :func:`generate_responses` calls (pass one as ``stats=``; calls add to it)."""

    prompts: int = 0
    batches: int = 0
    prompt_tokens: int = 0          # real prompt tokens (attention mask)
    padded_prompt_tokens: int = 0   # rows x longest prompt, summed over the batches
    new_tokens: int = 0             # per returned sequence: generated tokens up to and including the first EOS

    @property
    def prompt_padding_ratio(self) -> float:
        """Computed / real prompt tokens of the batches (1.0: no padding)."""
        return self.padded_prompt_tokens / max(self.prompt_tokens, 1)


def count_new_tokens(new: torch.Tensor, eos_token_id) -> int:
    """Generated tokens of ``new`` [rows, steps]: each row up to and including its first EOS (what follows is
    padding), the whole row when it has none."""
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not eos or new.shape[1] == 0:
        return int(new.numel())
    is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, new.shape[1])
    return int(first.sum())


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, decoding: Mapping[str, Any],
                       batch_size: int = 16, desc: str = "generate", sort_by_length: bool = True,
                       cache_implementation: str | None = None,
                       stats: GenerationStats | None = None) -> list[list[str]]:
    """For each prompt, ``decoding.num_samples`` decoded continuations (special tokens removed).

    Prompts are batched in order of character length (``sort_by_length=False``: in the given order), left
    padded. ``cache_implementation``: the KV cache of ``transformers`` generation (``None``: its default,
    the dynamic cache; ``"static"``: preallocated). ``stats`` receives the token counts of this call."""
    gen_cfg = decoding_config(decoding, max_new_tokens, tokenizer)
    if cache_implementation is not None:
        gen_cfg.cache_implementation = cache_implementation
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    if gen_cfg.do_sample:
        torch.manual_seed(int(decoding.get("seed", 0)))
    order = list(range(len(prompts)))
    if sort_by_length:
        order.sort(key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False, disable=None):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, generation_config=gen_cfg)
            new = out[:, enc["input_ids"].shape[1]:]
            if stats is not None:
                mask = enc["attention_mask"]
                stats.prompts += len(idx)
                stats.batches += 1
                stats.prompt_tokens += int(mask.sum())
                stats.padded_prompt_tokens += mask.numel()
                stats.new_tokens += count_new_tokens(new, gen_cfg.eos_token_id)
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            n = gen_cfg.num_return_sequences
            for j, i in enumerate(idx):
                results[i] = texts[j * n:(j + 1) * n]
    finally:
        model.train(was_training)
    return results
