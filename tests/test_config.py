"""Every config group entry composes, validates and (for tiny models) instantiates."""

import pathlib

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from comol import CONF_DIR
from comol.adapters import build_adapter_config
from comol.config import compose
from comol.models import build_meta_model

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def entries(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,entry", [(g, e) for g in GROUPS for e in entries(g)])
def test_every_group_entry_composes(group, entry):
    cfg = compose([f"{group}={entry}"])
    container = OmegaConf.to_container(cfg, resolve=False)
    assert group in container
    # resolve everything that does not need a Hydra run (paths.output_dir does)
    for key in ("model", "adapter", "dataset", "trainer", "eval", "optim"):
        OmegaConf.to_container(cfg[key], resolve=True)


@pytest.mark.parametrize("entry", entries("adapter"))
def test_adapter_entries_build_valid_configs(entry):
    cfg = build_adapter_config(OmegaConf.to_container(compose([f"adapter={entry}"]).adapter, resolve=True))
    assert cfg.name


@pytest.mark.parametrize("entry", entries("model"))
def test_model_entries_build_on_meta(entry):
    cfg = compose([f"model={entry}"])
    model = build_meta_model(cfg.model)
    arch = cfg.model.arch
    assert model.config.hidden_size == arch.hidden_size
    assert model.config.num_hidden_layers == arch.num_layers
    assert model.config.num_key_value_heads == arch.num_kv_heads
    assert model.config.intermediate_size == arch.intermediate_size


@pytest.mark.parametrize("entry", entries("trainer"))
def test_trainer_entries_instantiate(entry, tmp_path):
    cfg = compose([f"trainer={entry}"])
    if cfg.trainer.accelerator == "gpu":
        cfg.trainer.accelerator = "cpu"  # CI has no GPU; the rest of the entry must still be valid
        cfg.trainer.precision = "bf16-mixed"
    trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(tmp_path))
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("entry", entries("logger"))
def test_logger_entries_instantiate(entry, tmp_path):
    cfg = compose([f"logger={entry}", f"hydra.run.dir={tmp_path}"])
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path), force_add=True)
    loggers = [instantiate(node) for node in (cfg.logger or {}).values()]
    assert len(loggers) == (0 if entry == "none" else 1)


def test_default_run_is_tiny_qwen3_comol_toy_math():
    cfg = compose([])
    assert (cfg.model.name, cfg.adapter.name, cfg.dataset.name) == ("tiny_qwen3", "comol", "toy_math")
    assert cfg.logger.wandb.mode == "offline"


def test_real_models_carry_hub_id_and_arch():
    for entry in ("qwen3_8b", "qwen3_14b", "llama31_8b"):
        node = OmegaConf.load(pathlib.Path(CONF_DIR, "model", f"{entry}.yaml"))
        assert node.hub_id and all(node.arch[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                            "head_dim", "intermediate_size", "vocab_size"))
