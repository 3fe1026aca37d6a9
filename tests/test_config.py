"""Config groups: each entry's values reach the composed config and the objects built from it, and every
value is written once (adapter YAML vs dataclass, experiment presets vs the groups they pick)."""

import dataclasses

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from comol import CONF_DIR
from comol.adapters import adapter_config_class, build_adapter_config, registered_adapters
from comol.config import compose, group_option
from comol.data import dataset_splits
from comol.models import build_meta_model

#: groups whose entries are one node at ``<group>`` (experiment and sweep presets are _global_)
NODE_GROUPS = ["adapter", "dataset", "eval", "logger", "model", "paths", "trainer"]
EXPERIMENTS = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
                     for p in (CONF_DIR / "experiment").rglob("*.yaml"))


def entries(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a plain mapping."""
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def dig(node, key):
    """The raw (unresolved) value at a dotted key of a plain mapping, or a marker when absent."""
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<absent>"
        node = node[part]
    return node


def resolved_adapter(entry):
    return OmegaConf.to_container(compose([f"adapter={entry}"]).adapter, resolve=True)


@pytest.mark.parametrize("group,entry", [(g, e) for g in NODE_GROUPS for e in entries(g)])
def test_every_group_entry_reaches_the_composed_config(group, entry):
    """The composed ``<group>`` node is exactly the entry's file (its own ``defaults:`` merged in)."""
    cfg = compose([f"{group}={entry}"])
    want = OmegaConf.to_container(group_option(group, entry), resolve=False)
    assert OmegaConf.to_container(cfg[group], resolve=False) == want


@pytest.mark.parametrize("entry", entries("adapter"))
def test_adapter_entries_reach_the_built_config(entry):
    node = resolved_adapter(entry)
    cfg = build_adapter_config(node)
    assert cfg.name == node["name"] and type(cfg) is adapter_config_class(node["name"])
    for key, value in node.items():
        if key == "name":
            continue
        if value is None:  # null means "derived": 1/N for thresholds
            assert getattr(cfg, key) == pytest.approx(1.0 / node["num_experts"]), key
        else:
            assert getattr(cfg, key) == value, key
    if "alpha" in node:  # the papers: alpha = r, so the scaling is 1
        assert cfg.alpha == cfg.r and cfg.scaling == 1.0


def test_adapter_values_are_written_once():
    """The dataclasses hold no defaults: every field is set by the adapter's YAML, and only there."""
    for name in registered_adapters():
        cls = adapter_config_class(name)
        fields = {f.name for f in dataclasses.fields(cls)}
        with_default = [f.name for f in dataclasses.fields(cls)
                        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not with_default, f"{cls.__name__} restates defaults of conf/adapter/{name}.yaml: {with_default}"
        stated = set(group_option("adapter", name)) - {"name"}  # == the composed node (test above)
        assert stated == fields, f"conf/adapter/{name}.yaml: missing {fields - stated}, unknown {stated - fields}"


@pytest.mark.parametrize("entry", entries("adapter"))
def test_adapter_variants_state_only_their_deltas(entry):
    """An adapter YAML built on another (``defaults: [comol]``) repeats none of its values."""
    own = yaml.safe_load((CONF_DIR / "adapter" / f"{entry}.yaml").read_text())
    for base in [d for d in own.pop("defaults", []) if d != "_self_"]:
        base_values = OmegaConf.to_container(group_option("adapter", base), resolve=False)
        repeated = [k for k, v in own.items() if base_values.get(k) == v]
        assert not repeated, f"conf/adapter/{entry}.yaml repeats {repeated} of {base}.yaml"


def test_partial_adapter_values_are_completed_from_the_yaml():
    cfg = build_adapter_config({"name": "lora", "r": 4})
    assert (cfg.r, cfg.alpha, cfg.dropout) == (4, 4, 0.1)  # alpha follows r: `alpha: ${.r}` resolves after merging
    assert cfg.target_modules == resolved_adapter("lora")["target_modules"]


def _group_choices(preset_path):
    """{group: option} picked by an experiment preset's defaults list (its recipe's included)."""
    choices, todo = {}, [preset_path]
    while todo:
        node = yaml.safe_load(todo.pop().read_text())
        for item in node.get("defaults", []):
            if isinstance(item, dict):
                (key, value), = item.items()
                choices.setdefault(key.replace("override /", ""), value)
            elif item.startswith("/experiment/"):
                todo.append(CONF_DIR / f"{item[1:]}.yaml")
    return choices


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_presets_state_only_what_differs_from_their_groups(experiment):
    """A preset reads like its table row: each value it writes differs from what its groups already give,
    and reaches the composed config."""
    path = CONF_DIR / "experiment" / f"{experiment}.yaml"
    stated = yaml.safe_load(path.read_text())
    stated.pop("defaults", None)
    groups = OmegaConf.to_container(compose([f"{g}={o}" for g, o in _group_choices(path).items()]), resolve=False)
    composed = OmegaConf.to_container(compose([f"experiment={experiment}"]), resolve=False)
    for key, value in leaves(stated):
        assert dig(groups, key) != value, f"{experiment}: {key}={value} restates its group's value"
        assert dig(composed, key) == value, key


@pytest.mark.parametrize("entry", entries("model"))
def test_model_entries_build_on_meta(entry):
    cfg = compose([f"model={entry}"])
    model = build_meta_model(cfg.model)
    arch, c = cfg.model.arch, model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.max_position_embeddings) == (
        arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim,
        arch.intermediate_size, arch.max_position_embeddings)
    if arch.vocab_size is not None:
        assert c.vocab_size == arch.vocab_size
    assert model.config.model_type == cfg.model.family


@pytest.mark.parametrize("entry", entries("trainer"))
def test_trainer_entries_reach_the_lightning_trainer(entry, tmp_path):
    cfg = compose([f"trainer={entry}"])
    if cfg.trainer.accelerator == "gpu":
        cfg.trainer.accelerator = "cpu"  # CI has no GPU; the rest of the entry must still be valid
        cfg.trainer.precision = "bf16-mixed"
    t = cfg.trainer
    with open_dict(t):   # trainer.compile is the platform's (AdapterLM), not a Lightning Trainer argument
        assert t.pop("compile") is False
    if "FSDPStrategy" in str(OmegaConf.select(t, "strategy._target_")):  # Lightning refuses FSDP on a CPU:
        strategy = instantiate(t.strategy)                                # check the strategy object alone
        assert type(strategy).__name__ == "FSDPStrategy"
        assert strategy.kwargs.get("use_orig_params") is True
        t.strategy = "auto"
    trainer = instantiate(t, logger=False, default_root_dir=str(tmp_path))
    assert (trainer.max_steps, trainer.max_epochs, trainer.accumulate_grad_batches, trainer.gradient_clip_val,
            trainer.val_check_interval, trainer.log_every_n_steps, trainer.num_sanity_val_steps) == (
        t.max_steps, t.max_epochs, t.accumulate_grad_batches, t.gradient_clip_val, t.val_check_interval,
        t.log_every_n_steps, t.num_sanity_val_steps)
    assert trainer.precision == t.precision
    assert trainer.limit_val_batches == (1.0 if t.limit_val_batches is None else t.limit_val_batches)


@pytest.mark.parametrize("entry", entries("logger"))
def test_logger_entries_instantiate_with_their_settings(entry, tmp_path):
    cfg = compose([f"logger={entry}", f"hydra.run.dir={tmp_path}"])
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path), force_add=True)
    nodes = dict(cfg.logger or {})
    loggers = [instantiate(node) for node in nodes.values()]
    assert len(loggers) == len(nodes) == (0 if entry == "none" else 1)
    for node, logger in zip(nodes.values(), loggers):
        assert f"{type(logger).__module__}.{type(logger).__name__}".endswith(node._target_.rsplit(".", 1)[-1])
        assert logger.save_dir == str(tmp_path)


def test_toy_math_dataset_sizes_reach_the_splits():
    ds = OmegaConf.to_container(compose(["dataset=toy_math", "dataset.train_size=40"]).dataset, resolve=True)
    splits = dataset_splits(ds)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (40, ds["val_size"], ds["test_size"])


def test_default_run_is_tiny_qwen3_comol_toy_math():
    cfg = compose([])
    assert (cfg.model.name, cfg.adapter.name, cfg.dataset.name) == ("tiny_qwen3", "comol", "toy_math")
    assert cfg.logger.wandb.mode == "offline"


def test_real_models_carry_hub_id_and_arch():
    for entry in ("qwen3_8b", "qwen3_14b", "llama31_8b"):
        node = group_option("model", entry)
        assert node.hub_id and all(node.arch[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                            "head_dim", "intermediate_size", "vocab_size"))
