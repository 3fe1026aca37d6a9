"""Injecting an adapter into a backbone, freezing the rest, counting, saving and loading.

A saved adapter is a directory (PEFT-style) holding
  adapter_config.json        {"format", "adapter": {...fields}, "base_model": {...model config}}
  adapter_model.safetensors  the adapter tensors only (names containing an ``adapter_`` component)
The config records the sha256 of the weights file (``weights_sha256``), checked whenever the adapter is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from comol.adapters.base import AdapterConfig, build_adapter_config, is_adapter_name
from comol.adapters.context import CONTEXT_ATTR, AdapterContext
from comol.errors import CheckpointError, ComolError
from comol.io_utils import atomic_write_json, normal_permissions, replace_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "comol-adapter/1"
SHA_KEY = "weights_sha256"
#: what must agree between the backbone an adapter was saved for and the one it is loaded on
BACKBONE_KEYS = ("name", "family", "hub_id")
ARCH_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")

log = logging.getLogger(__name__)


def inject_adapter(model: nn.Module, cfg: AdapterConfig | Mapping[str, Any]) -> AdapterConfig:
    """Inject ``cfg``'s adapter into ``model`` in place, freeze every non-adapter tensor and install
    the model's ``AdapterContext`` (padding mask, aux losses, routing statistics; context.py)."""
    if not isinstance(cfg, AdapterConfig):
        cfg = build_adapter_config(cfg)
    if getattr(model, CONTEXT_ATTR, None) is not None:
        raise ComolError("the model already carries an adapter: inject one adapter per model")
    cfg.inject(model)
    AdapterContext(aux_loss_coeff=cfg.aux_loss_coeff).install(model)
    set_trainable(model, True)
    model.comol_adapter_config = cfg  # type: ignore[attr-defined]
    if callable(getattr(model, "save_pretrained", None)):  # a transformers model: save the adapter, not a checkpoint
        model.save_pretrained = types.MethodType(save_pretrained_adapter, model)  # type: ignore[method-assign]
    return cfg


def save_pretrained_adapter(model: nn.Module, save_directory: str | os.PathLike, *args: Any,
                            is_main_process: bool = True, **kwargs: Any) -> None:
    """``model.save_pretrained`` of an adapted transformers model (also what ``Trainer.save_model`` calls):
    writes the comol adapter format (``adapter_config.json`` + ``adapter_model.safetensors`` + checksum) into
    ``save_directory``, loadable by ``load_adapter`` on a fresh backbone. A full checkpoint would reload as a
    plain model with freshly initialised q/k/v/o weights, so none is written. Other files already in the
    directory (a tokenizer, training args) are kept. After ``fold_adapter`` the model saves normally."""
    if getattr(model, "comol_adapter_config", None) is None:  # folded: a plain transformers model again
        return type(model).save_pretrained(model, save_directory, *args, is_main_process=is_main_process, **kwargs)
    if not is_main_process:
        return None
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    hf = getattr(model, "config", None)
    extra = {"saved_by": "save_pretrained",
             "hf_model": {"model_type": getattr(hf, "model_type", None), "name_or_path": getattr(hf, "_name_or_path", None)}}
    staged = save_adapter(model, out / f".{CONFIG_FILE}.staging", extra=extra)
    try:
        os.replace(staged / WEIGHTS_FILE, out / WEIGHTS_FILE)
        os.replace(staged / CONFIG_FILE, out / CONFIG_FILE)  # last: a config names complete weights
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return None


def set_trainable(model: nn.Module, trainable: bool = True) -> None:
    """requires_grad = True exactly for adapter parameters (when ``trainable``), False elsewhere."""
    for name, p in model.named_parameters():
        p.requires_grad_(trainable and is_adapter_name(name))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # .parameters() already deduplicates shared tensors
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (parameters and persistent buffers) by name, one entry per storage."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if not is_adapter_name(name):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write the adapter of ``model`` to ``out_dir`` atomically (a complete dir or none)."""
    cfg: AdapterConfig | None = getattr(model, "comol_adapter_config", None)
    if cfg is None:
        raise ComolError("save_adapter: the model carries no injected adapter (call inject_adapter first)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        tensors = adapter_state_dict(model)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        normal_permissions(tmp, directory=True)
        trainable, total = count_parameters(model)
        atomic_write_json(tmp / CONFIG_FILE, {
            "format": FORMAT,
            SHA_KEY: hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest(),
            "adapter": cfg.to_dict(),
            "base_model": dict(base_model or {}),
            "trainable_params": trainable,
            **dict(extra or {}),
        })
        return replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of a saved adapter directory."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CheckpointError(f"adapter directory {adapter_dir} does not exist")
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / fname).is_file():
            raise CheckpointError(f"{adapter_dir}: missing {fname} (a saved adapter holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads((adapter_dir / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("adapter"), dict):
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: no 'adapter' section")
    return meta


def verify_adapter_weights(adapter_dir: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> bytes:
    """The weights file's bytes, after checking them against the sha256 in adapter_config.json
    (an adapter saved before checksums existed loads with a warning)."""
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir) if meta is None else meta
    try:
        data = (adapter_dir / WEIGHTS_FILE).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE}: unreadable ({e})") from None
    expected = meta.get(SHA_KEY)
    if expected is None:
        log.warning("%s has no %s: the weights cannot be verified (saved by an older version)",
                    adapter_dir / CONFIG_FILE, SHA_KEY)
    elif hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE}: sha256 does not match the {SHA_KEY} in {CONFIG_FILE} "
                              f"(the file is corrupt, truncated or was replaced)")
    return data


def backbone_differences(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """``key: saved vs given`` for each identity key / architecture size where two model configs differ."""
    diffs = [f"{k}: {saved.get(k)!r} vs {given.get(k)!r}" for k in BACKBONE_KEYS if saved.get(k) != given.get(k)]
    sa, ga = saved.get("arch") or {}, given.get("arch") or {}
    diffs += [f"arch.{k}: {sa.get(k)!r} vs {ga.get(k)!r}" for k in ARCH_KEYS if sa.get(k) != ga.get(k)]
    return diffs


def check_adapter_backbone(adapter_dir: str | os.PathLike, meta: Mapping[str, Any], model_cfg: Mapping[str, Any],
                           allow: bool = False) -> None:
    """Refuse to load an adapter saved for another backbone than ``model_cfg`` (unless ``allow``)."""
    saved = meta.get("base_model") or {}
    diffs = backbone_differences(saved, model_cfg) if saved else []
    if not diffs:
        return
    if allow:
        log.warning("%s was saved for backbone %r, loading it on %r (allow_backbone_mismatch=true): %s",
                    Path(adapter_dir) / CONFIG_FILE, saved.get("name"), model_cfg.get("name"), "; ".join(diffs))
        return
    raise CheckpointError(f"{Path(adapter_dir) / CONFIG_FILE} names backbone {saved.get('name')!r}, not model="
                          f"{model_cfg.get('name')} ({'; '.join(diffs)}): drop the model override to use the "
                          f"adapter's own backbone, or set allow_backbone_mismatch=true")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, trainable: bool = False) -> AdapterConfig:
    """Rebuild the saved adapter on a fresh ``model`` and load its tensors (exact round trip).

    ``trainable=True`` leaves the adapter parameters trainable (for resuming training).
    """
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    data = verify_adapter_weights(adapter_dir, meta)
    try:
        cfg = inject_adapter(model, meta["adapter"])
    except ComolError as e:
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: {e}") from None
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE}: unreadable ({e})") from None
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise CheckpointError(f"{adapter_dir / WEIGHTS_FILE}: {what} for adapter {cfg.name!r} on this model "
                              f"(saved for another backbone? it names {meta.get('base_model', {}).get('name', '?')!r})")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{adapter_dir / WEIGHTS_FILE}: tensor {name} has shape {tuple(t.shape)}, "
                f"the model expects {tuple(expected[name].shape)} (different backbone or adapter size?)"
            )
    model.load_state_dict(tensors, strict=False)
    set_trainable(model, trainable)
    return cfg
