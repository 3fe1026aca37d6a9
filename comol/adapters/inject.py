"""Injecting an adapter into a backbone, freezing the rest, counting, saving and loading.

A saved adapter is a directory (PEFT-style) holding
  adapter_config.json        {"format", "adapter": {...fields}, "base_model": {...model config}}
  adapter_model.safetensors  the adapter tensors only (names containing an ``adapter_`` component)
The config records the sha256 of the weights file (``weights_sha256``), checked whenever the adapter is loaded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import types
from dataclasses import dataclass
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
#: limits on what an adapter dir may ask for (it is untrusted input): config size and nesting, the sizes of the
#: backbone it names (a random-init backbone is built from them), the sizes of a generated dataset it names
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32
ARCH_CAPS = {"hidden_size": 65536, "num_layers": 1024, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096,
             "intermediate_size": 262144, "vocab_size": 1 << 21, "max_position_embeddings": 1 << 21}
DATASET_CAPS = {"train_size": 10**6, "val_size": 10**6, "test_size": 10**6, "train_per_set": 10**6,
                "val_per_set": 10**6, "test_per_set": 10**6, "max_operand": 10**9, "max_length": 1 << 21}
#: the dtypes an adapter's tensors may have (floating point: an integer tensor is no trained adapter)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
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


def _depth(node: Any) -> int:
    if isinstance(node, dict):
        return 1 + max((_depth(v) for v in node.values()), default=0)
    if isinstance(node, list):
        return 1 + max((_depth(v) for v in node), default=0)
    return 0


def _check_bounded(path: Path, section: str, node: Any, caps: Mapping[str, int]) -> None:
    """Integers of ``node`` named in ``caps`` must lie in 0..cap (what a saved adapter may ask to build)."""
    if not isinstance(node, dict):
        return
    for key, cap in caps.items():
        value = node.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= cap:
            raise CheckpointError(f"{path}: {section}.{key}={value!r} is invalid: expected an integer in [0, {cap}]")


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of a saved adapter directory: untrusted input, so one line naming the
    file for anything that is not what ``save_adapter`` writes (size, encoding, nesting, format version, the
    sizes it would have built)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CheckpointError(f"adapter directory {adapter_dir} does not exist")
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / fname).is_file():
            raise CheckpointError(f"{adapter_dir}: missing {fname} (a saved adapter holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    path = adapter_dir / CONFIG_FILE
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than an adapter config holds "
                              f"(at most {MAX_CONFIG_BYTES})")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}): not an adapter config") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply (an adapter config is at most {MAX_DEPTH} deep)") from None
    if _depth(meta) > MAX_DEPTH:
        raise CheckpointError(f"{path}: JSON nested too deeply (an adapter config is at most {MAX_DEPTH} deep)")
    if not isinstance(meta, dict) or not isinstance(meta.get("adapter"), dict):
        raise CheckpointError(f"{path}: no 'adapter' section")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not one this version reads (expected {FORMAT!r})")
    base = meta.get("base_model")
    if base is not None and not isinstance(base, dict):
        raise CheckpointError(f"{path}: base_model is a {type(base).__name__}, expected the model config mapping")
    _check_bounded(path, "base_model.arch", (base or {}).get("arch"), ARCH_CAPS)
    _check_bounded(path, "dataset", meta.get("dataset"), DATASET_CAPS)
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


def weights_header(adapter_dir: str | os.PathLike, data: bytes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from the safetensors header of the weights file's ``data`` (nothing allocated);
    refuses a file that is not safetensors and tensors that are not floating point."""
    path = Path(adapter_dir) / WEIGHTS_FILE
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > min(len(data) - 8, MAX_CONFIG_BYTES * 16):
            raise ValueError("header length")
        header = json.loads(data[8:8 + n].decode("utf-8"))
        out = {name: (str(v["dtype"]), tuple(int(d) for d in v["shape"]))
               for name, v in header.items() if name != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file") from None
    for name, (dtype, _) in out.items():
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}: adapter tensors are floating point "
                                  f"({', '.join(FLOAT_DTYPES)})")
    return out


@dataclass(frozen=True)
class VerifiedAdapter:
    """An adapter dir's config and the weights file's bytes, read once and checked against the checksum:
    loading these bytes later needs no second read or hash (and cannot load a file swapped in between)."""

    meta: dict
    data: bytes


def verified_adapter(adapter_dir: str | os.PathLike) -> VerifiedAdapter:
    meta = read_adapter_config(adapter_dir)
    return VerifiedAdapter(meta, verify_adapter_weights(adapter_dir, meta))


def read_adapter_tensors(adapter_dir: str | os.PathLike, meta: Mapping[str, Any] | None = None,
                         expected: Mapping[str, tuple[int, ...]] | None = None,
                         verified: VerifiedAdapter | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors, read only after every check: the checksum (already done for ``verified``), the
    safetensors header (floating point dtypes; when ``expected`` (name -> shape) is given, exactly those names
    and shapes, checked before any tensor is read), finite values."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / WEIGHTS_FILE
    data = verified.data if verified is not None else verify_adapter_weights(adapter_dir, meta)
    header = weights_header(adapter_dir, data)
    if expected is not None:
        check_tensor_shapes(path, {k: v[1] for k, v in header.items()}, expected, meta)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values: not a usable adapter")
    return tensors


def check_tensor_shapes(path: Path, found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                        meta: Mapping[str, Any] | None = None) -> None:
    """The weights file holds exactly the tensors (names, shapes) the adapter config builds on this backbone."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        name = ((meta or {}).get("base_model") or {}).get("name", "?")
        raise CheckpointError(f"{path}: {what} for this adapter on this model (saved for another backbone? "
                              f"it names {name!r})")
    for name, shape in found.items():
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(shape)}, the adapter config on this model "
                                  f"makes {tuple(expected[name])} (different backbone or adapter size?)")


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the ``meta`` device: its modules and shapes, no
    memory. An adapter injected into it shows the tensors it would allocate."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        twin = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
    return copy.deepcopy(model, memo)


def adapter_shapes(model: nn.Module, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of the tensors ``cfg``'s adapter has on ``model``, found on a meta twin (nothing allocated)."""
    twin = meta_twin(model)
    inject_adapter(twin, cfg)
    out: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for name, t in twin.state_dict(keep_vars=True).items():   # the tensors themselves: shared ones once
        if is_adapter_name(name) and id(t) not in seen:
            seen.add(id(t))
            out[name] = tuple(t.shape)
    return out


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


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, trainable: bool = False,
                 verified: VerifiedAdapter | None = None) -> AdapterConfig:
    """Rebuild the saved adapter on a fresh ``model`` and load its tensors (exact round trip).

    ``trainable=True`` leaves the adapter parameters trainable (for resuming training). ``verified``: the
    dir's config and weights as a check already read them (``verified_adapter``), used instead of re-reading.
    """
    adapter_dir = Path(adapter_dir)
    meta = verified.meta if verified is not None else read_adapter_config(adapter_dir)
    try:
        cfg = build_adapter_config(meta["adapter"])
        # the tensors the config would allocate, on a meta twin: they must be the weights file's, checked
        # before anything is allocated (an adapter_config.json with r=10**9 is refused here)
        expected = adapter_shapes(model, cfg)
    except ComolError as e:
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: {e}") from None
    tensors = read_adapter_tensors(adapter_dir, meta, expected, verified)
    cfg = inject_adapter(model, cfg)
    model.load_state_dict(tensors, strict=False)
    set_trainable(model, trainable)
    return cfg
