"""Config groups: each entry's values reach the composed config and the objects built from it, and every
value is written once (adapter YAML vs its dataclass defaults, experiment presets vs the groups they pick)."""

import dataclasses

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from comol import CONF_DIR
from comol.adapter_presets import DEFAULTS_OPTION, adapter_run_name, adapter_values
from comol.adapters import PAPER_TARGETS, PRESET_KEYS, adapter_config_class, build_adapter_config, registered_adapters
from comol.config import adapter_preset, compose, group_option
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
    fields = {f.name for f in dataclasses.fields(type(cfg))}
    assert set(node) == fields | {"name", *PRESET_KEYS}  # every field reaches the composed node (and overrides)
    for key, value in node.items():
        if key in ("name", *PRESET_KEYS):
            continue
        if value is None and key == "alpha":  # null: alpha = r, so the scaling is 1
            assert cfg.alpha == cfg.r and cfg.scaling == 1.0
        elif value is None:  # null means "derived": 1/N for thresholds
            assert getattr(cfg, key) == pytest.approx(1.0 / node["num_experts"]), key
        else:
            assert getattr(cfg, key) == value, key


def test_adapter_dataclasses_have_a_default_for_every_field():
    """A plain ``XConfig()`` is the method's published setting: no field is required."""
    for name in registered_adapters():
        cls = adapter_config_class(name)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        assert not missing, f"{cls.__name__}: no default for {missing}"
        assert cls().name == name


@pytest.mark.parametrize("entry", entries("adapter"))
def test_adapter_presets_state_only_what_differs_from_the_dataclass(entry):
    """conf/adapter/<entry>.yaml writes a label, a run-name stem and only the fields whose value differs from
    what it builds on (the dataclass defaults, via ``dataclass_<name>``, or the preset in its defaults list)."""
    own = yaml.safe_load((CONF_DIR / "adapter" / f"{entry}.yaml").read_text())
    bases = [d for d in own.pop("defaults") if d != "_self_"]
    assert len(bases) == 1, f"{entry}: builds on exactly one node, got {bases}"
    inherited = OmegaConf.to_container(group_option("adapter", bases[0]), resolve=False)
    name = own.get("name", inherited.get("name"))
    if bases[0].startswith("dataclass_"):
        assert bases[0] == DEFAULTS_OPTION.format(name=name) and "label" in own and "run_name" in own
    fields = {f.name for f in dataclasses.fields(adapter_config_class(name))}
    unknown = set(own) - fields - {"name", *PRESET_KEYS}
    assert not unknown, f"conf/adapter/{entry}.yaml: {unknown} are not fields of {name}"
    repeated = [k for k, v in own.items() if k in fields and inherited.get(k) == v]
    assert not repeated, f"conf/adapter/{entry}.yaml restates {repeated} of {bases[0]}"
    node = compose([f"adapter={entry}"]).adapter
    assert node.label and adapter_run_name(node).startswith(entry.removesuffix("_n4"))


def test_partial_adapter_values_are_completed_from_the_dataclass():
    cfg = build_adapter_config({"name": "lora", "r": 4})
    assert (cfg.r, cfg.alpha, cfg.dropout) == (4, 4, 0.1)  # alpha follows r (alpha: null)
    assert cfg.target_modules == list(PAPER_TARGETS) == resolved_adapter("lora")["target_modules"]
    assert build_adapter_config({"name": "lora", "label": "x", "run_name": "y"}) == adapter_config_class("lora")()


def test_adapter_preset_reads_the_yaml_in_the_config_layer():
    assert adapter_preset("comol_nocr", {"r": 4})["core_router"] is False
    values = adapter_values(compose(["adapter=molora_n4", "adapter.r=4"]).adapter)
    assert (values["num_experts"], values["r"], values["alpha"]) == (4, 4, 4)


@pytest.mark.parametrize("entry,overrides,stem", [
    ("comol", [], "comol-r16-N8"), ("comol_nocr", ["adapter.num_experts=32"], "comol_nocr-r16-N32"),
    ("flylora", [], "flylora-r32-k8"), ("lora", ["adapter.r=64"], "lora-r64"), ("sparsemoa", [], "sparsemoa-r8-a16"),
    ("adamole_n4", [], "adamole-r8-N4"), ("comol_n4", [], "comol-r16-N4"),
])
def test_label_and_run_name_come_from_the_adapter_preset(entry, overrides, stem):
    cfg = compose(["experiment=math14k/qwen3_8b", f"adapter={entry}", *overrides, "seed=125"])
    assert cfg.run_name == f"{stem}-qwen3_8b-s125"
    assert cfg.method == yaml.safe_load((CONF_DIR / "adapter" / f"{entry}.yaml").read_text()).get(
        "label", cfg.adapter.label)


def test_a_run_name_naming_an_unknown_field_is_one_line():
    from comol.errors import ConfigError

    with pytest.raises(ConfigError, match=r"adapter.run_name='lora-k\{top_k\}' names 'top_k'"):
        adapter_run_name({"name": "lora", "run_name": "lora-k{top_k}"})


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
    with open_dict(t):   # trainer.compile / reuse_host_memory are the platform's, not Lightning Trainer arguments
        assert t.pop("compile") is False
        assert t.pop("reuse_host_memory") is True
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
