"""Backbones: a real model by hub id / local path, or a random-init one from the architecture block.

Every model YAML (conf/model/*.yaml) carries ``family`` and ``arch`` (hidden size, layers, heads,
KV heads, head dim, MLP width, vocab), so parameter counts work on the ``meta`` device without
weights. Tiny models (``hub_id: null``) are random-init from ``arch`` with a fixed ``init_seed`` so
every process rebuilds the very same backbone, and use the offline tokenizer.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig, Qwen3Config

from comol.errors import ConfigError, ModelNotFoundError
from comol.models.gguf import convert_gguf, gguf_source
from comol.models.tokenizer import offline_tokenizer
from comol.schema_groups import ATTENTION, check_model

log = logging.getLogger(__name__)

FAMILIES: dict[str, type[PretrainedConfig]] = {"qwen3": Qwen3Config, "llama": LlamaConfig}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _get(cfg: Mapping[str, Any], key: str, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]   # a checked model node names one of them (comol/schema_groups.py)


def hf_config(model_cfg: Mapping[str, Any], vocab_size: int | None = None) -> PretrainedConfig:
    """A transformers config built from the model YAML's ``family`` and ``arch`` block."""
    family = check_model(model_cfg).family   # one line naming model.<key> when a value is invalid
    arch = _get(model_cfg, "arch") or {}
    vocab = _get(arch, "vocab_size") or vocab_size
    if not vocab:
        raise ConfigError("model.arch.vocab_size is missing: expected a positive integer")
    return FAMILIES[family](
        hidden_size=arch["hidden_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"],
        head_dim=arch["head_dim"],
        intermediate_size=arch["intermediate_size"],
        vocab_size=vocab,
        max_position_embeddings=_get(arch, "max_position_embeddings", 4096),
        tie_word_embeddings=bool(_get(arch, "tie_word_embeddings", False)),
        rms_norm_eps=_get(arch, "rms_norm_eps", 1e-6),
    )


def build_meta_model(model_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The architecture on the ``meta`` device: shapes without memory, for parameter accounting."""
    config = hf_config(model_cfg, vocab_size=len(load_tokenizer(model_cfg)) if is_random_init(model_cfg) else None)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def is_random_init(model_cfg: Mapping[str, Any]) -> bool:
    return not any(_get(model_cfg, key) for key in ("hub_id", "path", "gguf_file", "gguf_package"))


def in_local_cache(hub_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``hub_id`` (its config.json), without any network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except ValueError:  # not a valid repo id (e.g. a local path)
        return False


def weights_source(model_cfg: Mapping[str, Any]) -> str:
    """Where a pretrained backbone is read from (a local folder or a hub id), in this order:
    ``path``; ``gguf_file`` (converted once, comol/models/gguf.py); ``hub_id`` when it is in the local
    cache or the hub answers; the GGUF of ``gguf_package`` when that package is installed."""
    if _get(model_cfg, "path"):
        return str(_get(model_cfg, "path"))
    if _get(model_cfg, "gguf_file"):
        return str(convert_gguf(gguf_source(model_cfg)))
    hub_id = _get(model_cfg, "hub_id")
    if hub_id and (not _get(model_cfg, "gguf_package") or in_local_cache(hub_id) or hub_reachable()):
        return str(hub_id)
    if _get(model_cfg, "gguf_package"):
        return str(convert_gguf(gguf_source(model_cfg)))  # raises with the install command when missing
    raise ConfigError(f"model={_get(model_cfg, 'name')}: no weights source: set model.path, model.gguf_file or model.hub_id")


def load_tokenizer(model_cfg: Mapping[str, Any], source: str | None = None):
    source = source or _get(model_cfg, "tokenizer")
    if source == "offline" or (source is None and is_random_init(model_cfg)):
        return offline_tokenizer()
    tok = _from_pretrained(AutoTokenizer, model_cfg, source or weights_source(model_cfg))
    tok.padding_side = "left"
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        _set_distinct_pad(tok)
    return tok


def _set_distinct_pad(tok) -> None:
    """Use a reserved special token distinct from EOS as pad (Llama-3.1 has no pad token). Where the
    vocabulary has none (SmolLM2: pad = eos = <|im_end|>), pad stays EOS: that is safe because padding is
    masked by position (attention mask / length, comol/data/datamodule.py), never by token id."""
    for candidate in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<|pad|>", "<|endoftext|>"):
        tid = tok.convert_tokens_to_ids(candidate)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid != tok.eos_token_id and tid is not None:
            tok.pad_token = candidate
            return
    if tok.eos_token_id is None:
        raise ModelNotFoundError(f"tokenizer {tok.name_or_path!r} has neither a pad nor an EOS token")
    log.info("tokenizer %s: no pad token distinct from EOS; padding with EOS (masked by position)", tok.name_or_path)
    tok.pad_token = tok.eos_token


def _not_found(model_cfg: Mapping[str, Any], source: str, err: Exception) -> str:
    name = _get(model_cfg, "name", "?")
    return (
        f"model={name}: could not load {source!r} (not in the local Hugging Face cache and the hub is unreachable: "
        f"{type(err).__name__}). Download it where there is internet (`hf download {source}`) and copy the cache, "
        f"or set model.path=/dir/with/config.json+weights"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub endpoint (no retries), unless HF_HUB_OFFLINE is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(auto_cls, model_cfg: Mapping[str, Any], source: str, **kwargs):
    """Load from a local dir / the local cache first; go to the hub only when it answers at once."""
    try:
        return auto_cls.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        if Path(source).exists() or not hub_reachable():
            raise ModelNotFoundError(_not_found(model_cfg, source, e)) from None
    try:
        return auto_cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(_not_found(model_cfg, source, e)) from None


def attn_implementation(model_cfg: Mapping[str, Any]) -> str:
    """``model.attn_implementation`` (default sdpa); packed batches are laid out for it (comol/data/packing.py)."""
    attn = _get(model_cfg, "attn_implementation", None) or "sdpa"
    if attn not in ATTENTION:
        raise ConfigError(f"model.attn_implementation={attn!r} is invalid: expected one of {', '.join(ATTENTION)}")
    return attn


def load_backbone(model_cfg: Mapping[str, Any], device: str | torch.device = "cpu", tokenizer=None):
    """Return ``(model, tokenizer)`` for a model YAML node (``tokenizer``: one already loaded for it)."""
    check_model(model_cfg)
    source = None if is_random_init(model_cfg) else weights_source(model_cfg)
    tok = tokenizer if tokenizer is not None else load_tokenizer(model_cfg, None if _get(model_cfg, "tokenizer") else source)
    dtype = torch_dtype(_get(model_cfg, "dtype", "float32"))
    attn = attn_implementation(model_cfg)
    if source is None:
        config = hf_config(model_cfg, vocab_size=len(tok))
        config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(_get(model_cfg, "init_seed", 0)))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        model = _from_pretrained(AutoModelForCausalLM, model_cfg, source, dtype=dtype, attn_implementation=attn)
    # max_length checks (comol/data/datamodule.py) read the context length off the tokenizer
    # (pretrained tokenizers only: the offline one is shared between the tiny models)
    context = getattr(model.config, "max_position_embeddings", None)
    if source is not None and context and (not tok.model_max_length or tok.model_max_length > context):
        tok.model_max_length = int(context)
    model.to(device)
    model.train()  # from_pretrained returns eval mode, from_config train mode: the same for every source
    model.config.use_cache = False  # training default; generation turns the KV cache on explicitly
    if _get(model_cfg, "gradient_checkpointing", False):  # recompute decoder layers in backward (training only)
        from comol.training.distributed import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    return model, tok
