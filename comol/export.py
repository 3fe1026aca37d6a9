"""Export a saved comol adapter for other tools (see docs/export.md).

    python -m comol.export ADAPTER_DIR --to peft --out DIR   # LoRA -> a PEFT adapter directory
    python -m comol.export ADAPTER_DIR --merge --out DIR     # adapter merged into a Transformers model

``--to peft`` writes PEFT's ``adapter_config.json`` (r, lora_alpha, target_modules, lora_dropout
mapped one to one; bias none, CAUSAL_LM, no rsLoRA/DoRA) and ``adapter_model.safetensors`` with
PEFT's tensor names (``base_model.model.<module>.lora_A.weight``). The names and shapes are
checked against the backbone on the ``meta`` device; where peft is installed, also against the
model PEFT itself builds from the written config (PEFT only warns about missing keys on load).

``--merge`` folds the adapter's exact weight delta (``AdapterLinear.delta_weight``) into the
backbone and saves it with its tokenizer (``save_pretrained``): any Transformers-based stack can
serve it. Adapters without an exact delta refuse before the backbone is loaded.

Both outputs are written to a temporary folder and moved into place when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors.torch import save_file

from comol.adapters import inject_adapter, is_adapter_name, load_adapter
from comol.adapters.base import AdapterConfig, build_adapter_config
from comol.adapters.inject import CONFIG_FILE, read_adapter_config, read_adapter_tensors
from comol.adapters.merge import fold_adapter
from comol.errors import CheckpointError, ComolError
from comol.io_utils import atomic_write_json, normal_permissions, replace_dir
from comol.models import build_meta_model, load_backbone

PEFT_PREFIX = "base_model.model."
#: our tensor suffix -> PEFT's, for a LoRA layer
PEFT_NAMES = {"adapter_A": "lora_A.weight", "adapter_B": "lora_B.weight"}


@contextlib.contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces ``out`` only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        normal_permissions(tmp, directory=True)
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _saved_adapter(adapter_dir: Path) -> tuple[AdapterConfig, dict[str, Any]]:
    meta = read_adapter_config(adapter_dir)   # untrusted: size, encoding, format version, bounded sizes
    try:
        cfg = build_adapter_config(meta["adapter"])
    except ComolError as e:
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: {e}") from None
    base = meta.get("base_model") or {}
    if not base.get("family"):
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: no base_model section (the model config node), "
                              f"so the backbone cannot be rebuilt")
    return cfg, base


def _meta_adapted(base: Mapping[str, Any], adapter: AdapterConfig) -> torch.nn.Module:
    """The backbone with the adapter injected, on the meta device (shapes only, no memory)."""
    model = build_meta_model(base)
    inject_adapter(model, adapter)
    return model


# --- PEFT ---------------------------------------------------------------------------------

def peft_refusal(cfg: AdapterConfig) -> str | None:
    """Why ``cfg``'s adapter cannot be written as a PEFT adapter (None when it can)."""
    if cfg.name == "lora":
        return None
    if cfg.token_routed:
        return (f"adapter {cfg.name!r} cannot be exported to PEFT: it is token-routed (a router mixes its "
                f"experts per token), which no PEFT method expresses")
    return f"adapter {cfg.name!r} cannot be exported to PEFT: PEFT has no equivalent of this method"


def peft_config(cfg: AdapterConfig, base: Mapping[str, Any], targets: list[str]) -> dict[str, Any]:
    """PEFT's LoraConfig fields for our LoRA config (scaling lora_alpha / r, as ours)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": cfg.r, "lora_alpha": float(cfg.alpha), "lora_dropout": float(cfg.dropout),
        "target_modules": targets, "bias": "none",
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True,
        "base_model_name_or_path": base.get("hub_id") or base.get("path"),   # portable id first
    }


def peft_tensors(adapter_dir: Path, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Our LoRA tensors renamed to PEFT's; every expected tensor present with its shape, nothing else, read only
    after the checksum, dtype and shape checks (and finite)."""
    ours = read_adapter_tensors(adapter_dir, read_adapter_config(adapter_dir),
                                {k: tuple(v) for k, v in expected.items()})
    out = {}
    for name, t in ours.items():
        module, _, leaf = name.rpartition(".")
        out[PEFT_PREFIX + module + "." + PEFT_NAMES[leaf]] = t.contiguous()
    return out


def check_with_peft(peft_dir: Path, base: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bool:
    """Build PEFT's own model from the written config (meta device) and compare its adapter
    tensor names and shapes with ours. False when peft is not installed (check skipped)."""
    try:
        import peft
    except ImportError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside peft: noise here
        model = peft.get_peft_model(build_meta_model(base), peft.LoraConfig.from_pretrained(str(peft_dir)))
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(model).items()}
    ours = {k: tuple(v.shape) for k, v in tensors.items()}
    if theirs != ours:
        diff = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if ours[k] != theirs[k])
        raise ComolError(f"PEFT export check failed: PEFT's model and the export disagree on {diff[0]}")
    return True


def export_peft(adapter_dir: str | Path, out: str | Path) -> Path:
    adapter_dir, out = Path(adapter_dir), Path(out)
    check_out_dir(adapter_dir, out)
    cfg, base = _saved_adapter(adapter_dir)
    reason = peft_refusal(cfg)
    if reason:
        raise ComolError(reason)
    model = _meta_adapted(base, cfg)
    expected = {n: t.shape for n, t in model.state_dict().items() if is_adapter_name(n)}
    targets = sorted({n.rsplit(".", 2)[-2] for n in expected})
    tensors = peft_tensors(adapter_dir, expected)
    with _staging_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", peft_config(cfg, base, targets))
        checked = check_with_peft(tmp, base, tensors)
    print(f"wrote PEFT LoRA adapter to {out} ({len(tensors)} tensors, targets {', '.join(targets)}; "
          f"{'checked against PEFT' if checked else 'peft not installed: PEFT-side check skipped'})")
    return out


# --- merged model -------------------------------------------------------------------------

def export_merged(adapter_dir: str | Path, out: str | Path) -> Path:
    adapter_dir, out = Path(adapter_dir), Path(out)
    check_out_dir(adapter_dir, out)
    cfg, base = _saved_adapter(adapter_dir)
    meta_model = _meta_adapted(base, cfg)
    expected = {n: tuple(t.shape) for n, t in meta_model.state_dict().items() if is_adapter_name(n)}
    fold_adapter(meta_model, safe=False)  # refuses now, before loading real weights
    # every check of the weights file (checksum, dtypes, names and shapes, finite) before the backbone is built
    read_adapter_tensors(adapter_dir, read_adapter_config(adapter_dir), expected)
    model, tok = load_backbone(base)
    load_adapter(model, adapter_dir)
    fold_adapter(model.eval())
    model.config.use_cache = True  # load_backbone's training default; a served model wants the KV cache
    with _staging_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"wrote merged {type(model).__name__} ({cfg.name} folded in) to {out}")
    return out


def check_out_dir(adapter_dir: Path, out: Path) -> None:
    """``--out`` must be a new directory, or an earlier export (it is replaced): never the working directory,
    the adapter dir or a folder around either, never a file or a folder of other files."""
    where, src, cwd = out.resolve(), adapter_dir.resolve(), Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise ComolError(f"--out {out}: the working directory (or a folder above it) would be replaced: "
                         f"give a new directory, e.g. --out {Path(adapter_dir.name + '_export')}")
    if where == src or where in src.parents or src in where.parents:
        raise ComolError(f"--out {out}: inside or around the adapter dir {adapter_dir}: give a directory elsewhere")
    if where.exists() and not where.is_dir():
        raise ComolError(f"--out {out} is a file: give a new directory")
    if where.is_dir() and any(where.iterdir()) and not any((where / f).is_file() for f in EXPORT_MARKERS):
        raise ComolError(f"--out {out} holds other files (no earlier export): give a new directory")


#: files that mark a directory as an earlier export (PEFT adapter, or a merged Transformers model)
EXPORT_MARKERS = ("adapter_config.json", "config.json")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comol.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="a saved adapter directory (adapter_config.json + adapter_model.safetensors)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--to", choices=["peft"], help="write the adapter in another library's format")
    how.add_argument("--merge", action="store_true", help="write the backbone with the adapter merged in")
    parser.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    args = parser.parse_args(argv)
    try:
        (export_merged if args.merge else export_peft)(args.adapter_dir, args.out)
    except ComolError as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
