"""The config schema (comol/schema.py): a bad value stops a run with one line naming the key, the value and what
is expected, before the run dir is claimed or a backbone / tokenizer is built; every shipped YAML validates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import comol.schema
from comol import CONF_DIR, ROOT
from comol.adapters.comol import CoMoLConfig
from comol.config import compose
from comol.errors import CheckpointError, ConfigError
from comol.models import backbone
from comol.pipeline import run
from comol.schema import MAX_EXPERTS, RunConfig, describe_key, validate_config, validate_group
from comol.schema_base import SchemaError
from comol.schema_groups import DTYPES, FAMILIES

from conftest import fresh_micro_model, micro_model_cfg

# (family, overrides, the error line, or its start when it ends with "...")
BAD = [
    # -- type: a value of the wrong kind (Hydra parses "1e8" as a float, "maybe" as a string)
    ("type", ["progress_interval_s=abc"], "progress_interval_s='abc' is invalid: expected a number > 0"),
    ("type", ["save_adapter=maybe"], "save_adapter='maybe' is invalid: expected true or false"),
    ("type", ["resume=maybe"], "resume='maybe' is invalid: expected true or false"),
    ("type", ["dataset.batch_size=1e8"], "dataset.batch_size=100000000.0 is invalid: expected an integer >= 1"),
    ("type", ["adapter.num_experts=1e8"], "adapter.num_experts=100000000.0 is invalid: expected an integer >= 1"),
    ("type", ["seed=1.5"], "seed=1.5 is invalid: expected an integer in [0, 4294967295]"),
    ("type", ["optim.lr=fast"], "optim.lr='fast' is invalid: expected a number in (0, 1]"),
    ("type", ["trainer.max_steps=true"], "trainer.max_steps=true is invalid: expected an integer >= 1 or -1"),
    ("type", ["model.arch.hidden_size=2.5"], "model.arch.hidden_size=2.5 is invalid: expected an integer >= 1"),
    ("type", ["eval.limit=abc"], "eval.limit='abc' is invalid: expected a positive integer (rows per set) or null..."),
    ("type", ["tags=[a,1]"], "tags[1]=1 is invalid: expected a string..."),
    ("type", ["trainer.enable_progress_bar=sometimes"],
     "trainer.enable_progress_bar='sometimes' is invalid: expected true or false"),
    # -- range: the right kind, outside what works
    ("range", ["optim.lr=1e308"], "optim.lr=1e+308 is invalid: expected a number in (0, 1]"),
    ("range", ["optim.lr=inf"], "optim.lr=inf is invalid: expected a number in (0, 1]"),
    ("range", ["optim.lr=nan"], "optim.lr=nan is invalid: expected a number in (0, 1]"),
    ("range", ["optim.lr=-1"], "optim.lr=-1 is invalid: expected a number in (0, 1]"),
    ("range", ["trainer.devices=0"], "trainer.devices=0 is invalid: expected an integer >= 1, 'auto' or a list of "
                                     "device indices"),
    ("range", ["dataset.batch_size=0"], "dataset.batch_size=0 is invalid: expected an integer >= 1"),
    ("range", ["dataset.max_length=-5"], "dataset.max_length=-5 is invalid: expected an integer >= 2 (a prompt token "
                                         "and EOS)"),
    ("range", ["trainer.max_steps=0"], "trainer.max_steps=0 is invalid: expected an integer >= 1 or -1"),
    ("range", ["trainer.accumulate_grad_batches=0"],
     "trainer.accumulate_grad_batches=0 is invalid: expected an integer >= 1"),
    ("range", ["trainer.val_check_interval=0"],
     "trainer.val_check_interval=0 is invalid: expected an integer >= 1 or a number in (0, 1] or null"),
    ("range", ["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 is invalid: expected a number >= 0..."),
    ("range", ["optim.betas=[0.9,1.0]"], "optim.betas[1]=1.0 is invalid: expected a number in [0, 1)"),
    ("range", ["optim.betas=[0.9]"], "optim.betas=[0.9] is invalid: expected two numbers in [0, 1)"),
    ("range", ["optim.warmup_steps=-1"], "optim.warmup_steps=-1 is invalid: expected an integer >= 0"),
    ("range", ["seed=-1"], "seed=-1 is invalid: expected an integer in [0, 4294967295]"),
    ("range", ["eval.limit=0"], "eval.limit=0 is invalid: expected a positive integer (rows per set) or null..."),
    ("range", ["eval.max_new_tokens=0"], "eval.max_new_tokens=0 is invalid: expected an integer >= 1"),
    ("range", ["eval.decoding.top_p=1.5"], "eval.decoding.top_p=1.5 is invalid: expected a number in (0, 1]"),
    ("range", ["dataset.train_size=100000000"],
     "dataset.train_size=100000000 is invalid: expected an integer in [1, 1000000]"),
    ("range", ["adapter.r=0"], "adapter.r=0 is invalid: expected an integer > 0"),
    ("range", ["progress_interval_s=inf"], "progress_interval_s=inf is invalid: expected a number > 0"),
    ("range", ["divergence.max_skips=-2"], "divergence.max_skips=-2 is invalid: expected an integer >= 0"),
    ("range", ["dataset=real_commonsense", "eval=none", "dataset.train_per_set=0"],
     "dataset.train_per_set=0 is invalid: expected an integer >= 1"),
    ("range", ["dataset=real_commonsense", "eval=none", "dataset.test_per_set=-1"],
     "dataset.test_per_set=-1 is invalid: expected an integer >= 0"),
    # -- enum: one of a fixed set
    ("enum", ["divergence.policy=bogus"], "divergence.policy='bogus' is invalid: expected 'stop' or 'skip'"),
    ("enum", ["model.dtype=float8"], "model.dtype='float8' is invalid: expected one of 'float32', 'bfloat16', "
                                     "'float16'"),
    ("enum", ["model.family=gpt2"], "model.family='gpt2' is invalid: expected 'qwen3' or 'llama'"),
    ("enum", ["logger.wandb.mode=bogus"], "logger.wandb.mode='bogus' is invalid: expected one of 'online', "
                                          "'offline', 'disabled', 'shared'"),
    ("enum", ["select_best=val/nonexistent"], "select_best='val/nonexistent' is invalid: expected null or a metric "
                                              "logged during training: val/loss, train/loss"),
    ("enum", ["optim.schedule=linear"], "optim.schedule='linear' is invalid: expected 'constant' or 'cosine'"),
    ("enum", ["mode=predict"], "mode='predict' is invalid: expected ..."),
    ("enum", ["trainer.accelerator=quantum"], "trainer.accelerator='quantum' is invalid: expected one of 'auto'..."),
    ("enum", ["trainer.precision=8"], "trainer.precision=8 is invalid: expected one of 32, 32-true, 16..."),
    ("enum", ["eval.task=poetry"], "eval.task='poetry' is invalid: expected one of code, commonsense, math, none (a "
                                   "plug-in task is loaded from plugins=[<dir or module>] or $COMOL_PLUGINS)"),
    ("enum", ["dataset=real_commonsense", "eval=none", "dataset.source=eval_splits"],
     "dataset.source='eval_splits' is invalid: expected 'toy_math' or 'files' or 'eval_split'"),
    ("enum", ["adapter.name=nope"], "adapter.name='nope' is not a known adapter; known: adamole, comol, ..."),
    ("enum", ["adapter.mixing=bad"], "adapter.mixing='bad' is invalid: expected auto | output | merged"),
    ("enum", ["eval=humaneval", "dataset=codealpaca20k", "eval.prompt_style=chat"],
     "eval.prompt_style='chat' is invalid: expected 'raw' or 'alpaca'"),
    # -- unknown keys (Hydra lets `+key=` add any)
    ("key", ["+optim.lrr=3"], "optim.lrr is not a key of optim; known keys: lr, weight_decay, betas, schedule, "
                              "warmup_steps"),
    ("key", ["+learning_rate=3"], "learning_rate is not a key of the config; known keys: task_name, mode, ..."),
    ("key", ["+trainer.max_stepz=3"], "trainer.max_stepz is not an argument of lightning.pytorch.Trainer"),
    ("key", ["logger.wandb._target_=nowhere.Logger"],
     "logger.wandb._target_='nowhere.Logger' is invalid: expected an importable class (ModuleNotFoundError)"),
    # -- cross-field: a value that is wrong given another
    ("cross", ["adapter.r=1000000"], "adapter.r=1000000 is invalid: expected at most 3072 (4 x the widest projection "
                                     "of model=tiny_qwen3, 768)"),
    ("cross", ["adapter.num_experts=100000"], f"adapter.num_experts=100000 is invalid: expected at most {MAX_EXPERTS} "
                                              f"experts per module"),
    ("cross", ["adapter=parallel_adapter", "adapter.adapter_size=100000"],
     "adapter.adapter_size=100000 is invalid: expected at most 3072..."),
    ("cross", ["adapter=prompt", "adapter.prompt_length=5000"],
     "adapter.prompt_length=5000 is invalid: expected less than the model's context, "
     "model.arch.max_position_embeddings=1024"),
    ("cross", ["model.arch.num_heads=3"], "model.arch.num_heads=3 is invalid: expected a divisor of "
                                          "model.arch.hidden_size=256"),
    ("cross", ["model.arch.num_kv_heads=3"], "model.arch.num_kv_heads=3 is invalid: expected a divisor of "
                                             "model.arch.num_heads=4 (grouped-query attention)"),
    ("cross", ["dataset.batch_size=100000"], "dataset.batch_size=100000 is invalid: expected at most the 4000 "
                                             "training rows of dataset=toy_math"),
    ("cross", ["dataset.max_length=50000", "model=qwen3_8b"],
     "dataset.max_length=50000 is invalid: expected at most the model's context, "
     "model.arch.max_position_embeddings=40960"),
    ("cross", ["eval.max_new_tokens=1024"], "eval.max_new_tokens=1024 is invalid: expected less than the model's "
                                            "context, model.arch.max_position_embeddings=1024"),
    ("cross", ["select_best=val/loss", "dataset.val_size=0"],
     "select_best='val/loss' is invalid here: dataset=toy_math has no validation rows (expected dataset.val_size > 0)"),
    ("cross", ["select_best=val/loss", "trainer.limit_val_batches=0"],
     "select_best='val/loss' is invalid with trainer.limit_val_batches=0: no validation runs"),
    ("cross", ["select_best=val/loss", "trainer=fsdp"], "select_best='val/loss' is invalid with trainer=fsdp..."),
    ("cross", ["trainer.max_steps=-1", "trainer.max_epochs=-1"],
     "trainer.max_steps=-1 with trainer.max_epochs=-1 is invalid: training would never end; set one of them"),
    ("cross", ["eval.decoding.num_samples=2"], "eval.decoding.num_samples=2 is invalid with do_sample=false: greedy "
                                               "decoding gives one answer (set eval.decoding.do_sample=true)"),
    ("cross", ["dataset=math14k"], "eval.sets.toy_math=toy_math needs dataset=toy_math (its held-out test split)"),
    ("cross", ["mode=eval"], "adapter_path is missing: mode=eval needs adapter_path=<saved adapter dir>"),
    ("cross", ["+dataset.val=/some/file.json"], "dataset.val='/some/file.json' is not used by dataset=toy_math..."),
    ("cross", ["dataset.train=/x.json"], "dataset.train='/x.json' is not used by dataset=toy_math (generated rows): "
                                         "to train on a file use dataset=math14k dataset.train=<file> (or "
                                         "dataset=codealpaca20k)"),
    ("cross", ["adapter.core_dropout=0.1", "adapter.mixing=output"],
     "adapter.mixing='output' is invalid: expected 'merged' or 'auto' when adapter.core_dropout > 0..."),
    # -- a value that cannot be resolved
    ("resolve", ["dataset=math14k", "eval=none", "dataset.train=${oc.env:COMOL_SCHEMA_TEST_UNSET}"],
     "dataset.train cannot be resolved: ..."),
]


def matches(line: str, want: str) -> bool:
    return line.startswith(want[:-3]) if want.endswith("...") else line == want


@pytest.fixture
def forbid_backbone(monkeypatch):
    """Call it to fail the test if anything builds a backbone or a tokenizer from then on (wherever the
    function was imported)."""
    def fail(*args, **kwargs):
        pytest.fail("a backbone or tokenizer was built before the config was refused")

    def forbid():
        for name in ("load_backbone", "load_tokenizer", "build_meta_model"):
            original = getattr(backbone, name)
            for module in list(sys.modules.values()):
                if getattr(module, "__dict__", {}).get(name) is original:
                    monkeypatch.setattr(module, name, fail)

    return forbid


@pytest.mark.parametrize("family,overrides,message", BAD, ids=[" ".join(o) for _, o, _ in BAD])
def test_bad_value_stops_the_run_in_one_line_before_anything_is_built(family, overrides, message, tmp_path,
                                                                      forbid_backbone, monkeypatch):
    forbid_backbone()
    monkeypatch.delenv("COMOL_SCHEMA_TEST_UNSET", raising=False)
    monkeypatch.setattr(comol.schema, "cuda_available", lambda: True)   # trainer=fsdp on a CPU machine
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run(compose([*overrides, f"paths.output_dir={out}"]))
    first = err.value.problems[0] if isinstance(err.value, SchemaError) else str(err.value)
    assert "\n" not in str(err.value)
    assert matches(first, message), first
    assert not out.exists()   # the run dir was not even claimed


def test_every_problem_is_reported_one_line_each(tmp_path):
    with pytest.raises(SchemaError) as err:
        validate_config(compose(["optim.lr=inf", "trainer.devices=0", "save_adapter=maybe", "model.arch.num_heads=3",
                                 f"paths.output_dir={tmp_path}"]))
    keys = [p.split("=", 1)[0] for p in err.value.problems]
    assert keys == ["save_adapter", "model.arch.num_heads", "trainer.devices", "optim.lr"]   # declaration order
    assert all("\n" not in p for p in err.value.problems)
    assert str(err.value) == (f"{err.value.problems[0]} (and 3 more problems: model.arch.num_heads=3; "
                              f"trainer.devices=0; optim.lr=inf)")


def test_a_good_config_comes_back_typed(tmp_path):
    cfg = validate_config(compose(["optim.lr=1e-3", "adapter.num_experts=4", f"paths.output_dir={tmp_path}"]))
    assert isinstance(cfg, RunConfig) and isinstance(cfg.adapter, CoMoLConfig)
    assert (cfg.adapter.num_experts, cfg.optim.lr, cfg.dataset.source, cfg.eval.task) == (4, 1e-3, "toy_math", "math")
    assert cfg.model.arch.linear_shapes()["k_proj"] == (256, 128)


def test_edges_of_the_ranges_are_accepted(tmp_path):
    validate_config(compose(["optim.lr=1", "optim.betas=[0.0,0.999]", "trainer.val_check_interval=1.0",
                             "trainer.limit_val_batches=0", "trainer.devices=[0,1]", "seed=4294967295",
                             "adapter.r=3072", f"adapter.num_experts={MAX_EXPERTS}", "dataset.max_length=1024",
                             "dataset.batch_size=4000", f"paths.output_dir={tmp_path}"]))


# ----------------------------------------------------------------------------------------------- shipped YAMLs

def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


#: the partner options a group option needs to make a run (a dataset without its toy rows cannot be scored by
#: eval=toy_math; eval=real_commonsense reads dataset=real_commonsense's split)
PARTNERS = {("dataset", "toy_math"): [], ("eval", "toy_math"): [], ("eval", "none"): ["dataset=math14k"],
            ("eval", "real_commonsense"): ["dataset=real_commonsense"]}


def _partners(group, option):
    if (group, option) in PARTNERS:
        return PARTNERS[group, option]
    return {"dataset": ["eval=none"], "eval": ["dataset=math14k"]}.get(group, [])


@pytest.fixture
def gpu_visible(monkeypatch):
    """trainer=gpu/ddp/fsdp presets are valid on a GPU machine; this one may have none."""
    monkeypatch.setattr(comol.schema, "cuda_available", lambda: True)


@pytest.mark.parametrize("group,option", [(g, o) for g in ("adapter", "dataset", "eval", "logger", "model", "paths",
                                                           "trainer") for o in options(g)])
def test_every_group_option_validates(group, option, tmp_path, gpu_visible):
    validate_config(compose([f"{group}={option}", *_partners(group, option), f"paths.output_dir={tmp_path}"]))


@pytest.mark.parametrize("experiment", sorted(p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
                                              for p in (CONF_DIR / "experiment").rglob("*.yaml")))
def test_every_experiment_preset_validates(experiment, tmp_path, gpu_visible):
    validate_config(compose([f"experiment={experiment}", f"paths.output_dir={tmp_path}"]))


@pytest.mark.parametrize("sweep", options("sweep"))
def test_every_sweep_job_validates(sweep, tmp_path, gpu_visible):
    from comol.tools.sweeps import expand

    _, jobs = expand(sweep)
    seen = set()
    for job in jobs:
        key = tuple(o for o in job.overrides if not o.startswith("seed="))   # seeds change no schema check
        if key in seen:
            continue
        seen.add(key)
        node = OmegaConf.to_container(job.config, resolve=False)
        node.pop("hydra")
        node["paths"]["output_dir"] = str(tmp_path / str(job.num))
        validate_config(OmegaConf.create(node))
    assert seen


def test_schema_and_code_agree_on_the_choices():
    assert set(FAMILIES) == set(backbone.FAMILIES) and set(DTYPES) == set(backbone.DTYPES)


def test_help_states_the_schema_ranges():
    from comol.cli_help import help_text

    text = help_text()
    for key in ("optim.lr", "seed", "trainer.max_steps"):
        what, expected = describe_key(key)
        assert what and f"{what} [{expected}]" in text, key
    assert describe_key("optim.lr") == ("peak learning rate", "a number in (0, 1]")


# ----------------------------------------------------------------------------------------------- groups alone

def test_a_group_is_checked_on_its_own_with_its_prefix():
    assert validate_group("model", micro_model_cfg()).arch.hidden_size == 64
    with pytest.raises(SchemaError, match=r"^model\.arch\.num_kv_heads=3 is invalid"):
        validate_group("model", micro_model_cfg(num_kv_heads=3))
    with pytest.raises(ConfigError, match=r"^model\.family='gpt2' is invalid"):   # the backbone asks the schema too
        backbone.load_backbone({**micro_model_cfg(), "family": "gpt2"})


def _saved_adapter(tmp_path, **changes):
    from comol.adapters import inject_adapter, save_adapter

    model, _ = fresh_micro_model()
    inject_adapter(model, {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj"]})
    path = save_adapter(model, tmp_path / "adapter", base_model=micro_model_cfg(),
                        extra={"dataset": {**OmegaConf.to_container(compose([]).dataset), "train_size": 16}})
    meta = json.loads((path / "adapter_config.json").read_text())
    for section, values in changes.items():
        meta[section].update(values)
    (path / "adapter_config.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("section,values,message", [
    ("adapter", {"r": 10 ** 9}, "adapter.r=1000000000 is invalid: expected at most 512 (4 x the widest projection of "
                                "model=micro_qwen3, 128)"),
    ("dataset", {"test_size": 10 ** 9}, "dataset.test_size=1000000000 is invalid: expected an integer in [0, 1000000]"),
    ("base_model", {"dtype": "float8"}, "model.dtype='float8' is invalid"),
])
def test_a_saved_adapter_config_is_checked_like_a_run_config(section, values, message, tmp_path, forbid_backbone):
    """mode=eval: what adapter_config.json says is validated against the schema and its backbone before anything
    is allocated (r=10**9 used to die in an allocation, test_size=10**9 to hang)."""
    path = _saved_adapter(tmp_path, **{section: values})
    forbid_backbone()
    with pytest.raises(CheckpointError) as err:
        run(compose(["mode=eval", f"adapter_path={path}", f"paths.output_dir={tmp_path / 'eval'}"]))
    assert str(err.value).startswith(f"{path / 'adapter_config.json'}: {message}") and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- command line

@pytest.mark.slow
def test_command_line_bad_values_exit_2_writing_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run.py", "optim.lr=inf", "trainer.devices=0", "logger=none",
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-2:] == [
        "error: trainer.devices=0 is invalid: expected an integer >= 1, 'auto' or a list of device indices",
        "error: optim.lr=inf is invalid: expected a number in (0, 1]"]
    assert not run_dir.exists()   # refused in Hydra's on_run_start: not claimed, no .hydra/, no log
