"""Paper sweeps and experiment presets: every preset composes, the dry-run listing holds exactly the paper's
jobs with the paper's hyperparameters, the tiny twins mirror them, launchers and W&B settings compose."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from comol import CONF_DIR, ROOT
from comol.adapter_presets import adapter_values
from comol.training.callbacks import lightning_trainer_node
from comol.adapters import build_adapter_config
from comol.config import compose
from comol.tools.sweeps import available_sweeps, expand as _expand


@functools.lru_cache(maxsize=None)
def _expand_cached(sweep: str, overrides: tuple = ()):
    return _expand(sweep, list(overrides))


def expand(sweep: str, overrides=()):
    """Sweep expansion (Hydra composition of every job), cached across tests: results are read-only here."""
    return _expand_cached(sweep, tuple(overrides))

EXPERIMENTS = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
                     for p in (CONF_DIR / "experiment").rglob("*.yaml"))
REAL = ("real_commonsense/", "recipe/real_commonsense")   # the SmolLM2 mini-experiment, not a paper row
PAPER_EXPERIMENTS = [e for e in EXPERIMENTS if not e.startswith(REAL)]
PRESETS = [e for e in PAPER_EXPERIMENTS if not e.startswith("recipe/")]   # <dataset>/<backbone> settings
SEEDS = {0, 125, 1225}
MATH_SETS = ["AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP"]

# docs/methods.md §2/§4/§7: the paper's per-method settings (alpha = r everywhere)
MATH_8B = {
    "LoRA": ("lora", {"r": 16}),
    "MoLoRA": ("molora", {"r": 8, "num_experts": 8}),
    "HydraLoRA": ("hydralora", {"r": 8, "num_experts": 8}),
    "MoLA": ("mola", {"r": 8, "num_experts": 8, "top_k": 2}),
    "AdaMoLE": ("adamole", {"r": 8, "num_experts": 8}),
    "SparseMoA": ("sparsemoa", {"r": 8, "adapter_size": 16}),
    "FlyLoRA": ("flylora", {"r": 32, "top_k": 8}),
    "CoMoL w/o CR": ("comol", {"r": 16, "num_experts": 8, "core_router": False}),
    "CoMoL": ("comol", {"r": 16, "num_experts": 8, "core_router": True}),
}
MATH_14B = {**MATH_8B, **{m: (a, {**hp, "num_experts": 4}) for m, (a, hp) in MATH_8B.items()
                          if m in ("MoLoRA", "HydraLoRA", "AdaMoLE")}}
CODE = {
    "LoRA": ("lora", {"r": 16}),
    "DenseLoRA": ("denselora", {"r": 256}),
    "FlyLoRA": ("flylora", {"r": 32, "top_k": 8}),
    "MoLoRA": ("molora", {"r": 8, "num_experts": 8}),
    "HydraLoRA": ("hydralora", {"r": 8, "num_experts": 8}),
    "MoLA": ("mola", {"r": 8, "num_experts": 8, "top_k": 2}),
    "AdaMoLE": ("adamole", {"r": 8, "num_experts": 8}),
    "CoMoL": ("comol", {"r": 16, "num_experts": 4, "core_router": True}),
}


def _check_recipe(s: dict, dataset: str) -> None:
    assert s["dataset"] == dataset
    assert (s["lr"], s["schedule"], s["warmup_steps"], s["weight_decay"]) == (1e-4, "constant", 200, 0.0)
    assert (s["batch_size"], s["accumulate_grad_batches"], s["effective_batch"]) == (4, 4, 16)
    assert s["max_steps"] == -1 and s["precision"] == "bf16-mixed"
    if dataset == "math14k":
        assert s["max_length"] == 300 and s["max_epochs"] == 1
        assert s["eval"] == "math" and s["eval_sets"] == MATH_SETS and s["max_new_tokens"] == 300
        assert s["decoding"]["do_sample"] is False and s["decoding"]["num_samples"] == 1
    else:
        assert s["max_length"] == 500
        assert s["eval"] == "code" and s["eval_sets"] == ["humaneval"] and s["max_new_tokens"] == 400
        d = s["decoding"]
        assert (d["do_sample"], d["num_samples"], d["temperature"], d["top_p"]) == (True, 10, 0.7, 0.95)


def _check_adapter(s: dict, expected: dict) -> None:
    name, hp = expected[s["method"]]
    a = s["adapter"]
    assert a["name"] == name, s
    for k, v in hp.items():
        assert a[k] == v, (s["method"], k, a)
    assert a["alpha"] == a["r"], s  # all paper runs: alpha = r (scaling 1)


def _check_grouping(jobs, sweep: str) -> None:
    groups = {j.summary["wandb_group"] for j in jobs}
    assert len(groups) == 1 and next(iter(groups)).startswith(f"{sweep}-"), groups
    assert all(f"sweep:{sweep}" in j.summary["tags"] for j in jobs)
    names = [j.summary["run_name"] for j in jobs]
    assert len(set(names)) == len(names), "W&B run names must tell the jobs apart"
    assert len({j.summary["subdir"] for j in jobs}) == len(jobs)


# ---------------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes(experiment):
    cfg = compose([f"experiment={experiment}"])
    if experiment not in PAPER_EXPERIMENTS:  # its split dir lives in the run dir (needs a Hydra run)
        assert cfg.model.name == "smollm2_135m" and cfg.dataset.name == "real_commonsense"
        return
    for key in ("model", "adapter", "dataset", "trainer", "eval", "optim"):
        OmegaConf.to_container(cfg[key], resolve=True)
    assert cfg.optim.lr == 1e-4 and cfg.dataset.batch_size * cfg.trainer.accumulate_grad_batches == 16
    if experiment in PRESETS:
        dataset, model = experiment.split("/")
        assert (cfg.dataset.name, cfg.model.name) == (dataset, model)
        adapter = build_adapter_config(OmegaConf.to_container(cfg.adapter, resolve=True))
        assert adapter.name == cfg.adapter.name
        assert adapter.alpha == adapter.r
        assert cfg.method == cfg.adapter.label and cfg.run_name.endswith(f"-{model}-s0")


def test_real_commonsense_listing_shows_the_base_row_untrained():
    from comol.tools.sweeps import format_jobs

    master, jobs = expand("real_commonsense")
    assert [j.summary["method"] for j in jobs] == ["base (zero-shot)", "LoRA", "CoMoL", "MoLoRA"]
    rows = format_jobs(master, jobs).splitlines()
    base = next(r for r in rows if "base (zero-shot)" in r)
    assert "none (mode=base)" in base and "no training" in base and "comol(" not in base
    lora = next(r for r in rows if r.split()[1:2] == ["LoRA"])
    assert "lora(r=16, alpha=16)" in lora and "120 steps" in lora


def test_experiment_files_are_the_settings_not_the_rows():
    """One file per (dataset, backbone) setting; the table rows are adapter presets the sweeps iterate over."""
    assert sorted(PRESETS) == ["codealpaca20k/llama31_8b", "codealpaca20k/qwen3_8b", "math14k/qwen3_14b",
                               "math14k/qwen3_8b"]
    assert len(EXPERIMENTS) < 12


def test_preset_is_overridable_on_the_command_line():
    cfg = compose(["experiment=math14k/qwen3_8b", "adapter=comol", "adapter.r=32", "seed=125"])
    values = adapter_values(cfg.adapter)
    assert (values["r"], values["alpha"], cfg.run_name, cfg.method) == (32, 32, "comol-r32-N8-qwen3_8b-s125", "CoMoL")


# ---------------------------------------------------------------------------------------------- dry runs

def test_table2_dry_run_is_exactly_the_paper_jobs():
    _, jobs = expand("table2")
    assert len(jobs) == 27
    assert sorted((j.summary["method"], j.summary["seed"]) for j in jobs) == sorted(
        (m, s) for m in MATH_8B for s in SEEDS)
    assert [j.summary["method"] for j in jobs[::3]] == list(MATH_8B)  # the paper's row order
    for j in jobs:
        s = j.summary
        assert s["model"] == "qwen3_8b"
        _check_recipe(s, "math14k")
        _check_adapter(s, MATH_8B)
    _check_grouping(jobs, "table2")


def test_table3_dry_run_uses_qwen3_14b_and_four_experts_where_the_paper_does():
    _, jobs = expand("table3")
    assert len(jobs) == 27 and {j.summary["model"] for j in jobs} == {"qwen3_14b"}
    for j in jobs:
        _check_recipe(j.summary, "math14k")
        _check_adapter(j.summary, MATH_14B)


def test_table4_dry_run_code_on_two_backbones():
    _, jobs = expand("table4")
    assert len(jobs) == 2 * 8 * 3
    assert sorted((j.summary["model"], j.summary["method"], j.summary["seed"]) for j in jobs) == sorted(
        (m, meth, s) for m in ("llama31_8b", "qwen3_8b") for meth in CODE for s in SEEDS)
    for j in jobs:
        s = j.summary
        _check_recipe(s, "codealpaca20k")
        _check_adapter(s, CODE)
        assert s["max_epochs"] == {"llama31_8b": 1, "qwen3_8b": 5}[s["model"]]
    _check_grouping(jobs, "table4")


@pytest.mark.parametrize("sweep,model", [("table5", "qwen3_8b"), ("table5_14b", "qwen3_14b")])
def test_table5_dry_run_is_two_methods_by_four_expert_counts_by_seeds(sweep, model):
    _, jobs = expand(sweep)
    assert len(jobs) == 2 * 4 * 3
    got = sorted((j.summary["method"], j.summary["adapter"]["num_experts"], j.summary["seed"]) for j in jobs)
    assert got == sorted((m, n, s) for m in ("CoMoL w/o CR", "CoMoL") for n in (8, 16, 32, 64) for s in SEEDS)
    for j in jobs:
        s = j.summary
        assert s["model"] == model and s["adapter"]["r"] == 16 and s["adapter"]["alpha"] == 16
        assert s["adapter"]["core_router"] is (s["method"] == "CoMoL")
        _check_recipe(s, "math14k")
    _check_grouping(jobs, sweep)


def test_figure2_dry_run_rank_sweep_keeps_alpha_equal_to_rank():
    _, jobs = expand("figure2")
    got = sorted((j.summary["method"], j.summary["adapter"]["r"]) for j in jobs)
    assert got == sorted((m, r) for m in ("LoRA", "CoMoL") for r in (8, 16, 32, 64, 128))
    for j in jobs:
        a = j.summary["adapter"]
        assert a["alpha"] == a["r"]
        if a["name"] == "comol":
            assert a["num_experts"] == 4
        _check_recipe(j.summary, "codealpaca20k")


def test_command_line_overrides_narrow_a_sweep():
    _, jobs = expand("table5", ["seed=0", "adapter.num_experts=8,16"])
    assert len(jobs) == 2 * 2 and {j.summary["seed"] for j in jobs} == {0}


@pytest.mark.parametrize("params, task", [
    ({"experiment": "a,b", "seed": "0,125,1225"}, ["seed=0"]),                   # a command-line list replaces the sweep's
    ({"experiment": "a,b", "seed": "0,1"}, ["adapter.num_experts=8,16", "seed=3,4"]),
    ({"seed": "0"}, ["+x=1", "y=range(0,3)"]),
    ({}, ["a=1,2", "b=x", "a=3,4"]),
])
def test_expansion_equals_hydras_basic_sweeper(params, task):
    """Our public-API expansion against Hydra's own BasicSweeper (internal: imported here only to check)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from comol.tools.sweeps import expand_overrides

    args = [f"{k}={v}" for k, v in params.items()] + task
    hydras = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)[0]
    assert expand_overrides(params, task) == hydras and len(hydras) > 1


@pytest.mark.slow   # composes every job of every paper sweep twice (~35 s)
@pytest.mark.parametrize("sweep", [s for s in available_sweeps() if not s.endswith("_tiny") and not s.startswith("real_")])
def test_tiny_twin_has_the_same_jobs_on_a_tiny_backbone(sweep):
    _, paper = expand(sweep)
    _, tiny = expand(f"{sweep}_tiny")
    assert [j.overrides[:-1] for j in tiny] == [j.overrides[:-1] for j in paper]  # all but sweep=<name>
    for p, t in zip(paper, tiny):
        assert (t.summary["method"], t.summary["seed"], t.summary["adapter"]) == (
            p.summary["method"], p.summary["seed"], p.summary["adapter"])
        assert t.summary["model"] == "tiny_" + t.config.model.family
        assert t.config.model.hub_id is None and t.config.model.arch.hidden_size <= 128
        assert (t.summary["dataset"], t.summary["precision"]) == ("toy_math", "32-true")
        assert t.config.trainer.accelerator == "cpu" and 0 < t.summary["max_steps"] <= 20
    assert tiny[0].summary["wandb_group"].startswith(f"{sweep}_tiny-")


@pytest.mark.slow
def test_dry_run_cli_lists_every_job():
    proc = subprocess.run([sys.executable, "-m", "comol.tools.sweeps", "table2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sweep table2: 27 jobs")
    body = [l for l in lines[3:] if l.strip()]
    assert len(body) == 27 and "CoMoL w/o CR" in proc.stdout and "comol-r16-N8-qwen3_8b-s1225" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "comol.tools.sweeps", "table5", "seed=0", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    jobs = json.loads(proc.stdout)
    assert len(jobs) == 8 and {j["adapter"]["num_experts"] for j in jobs} == {8, 16, 32, 64}


@pytest.mark.slow
def test_unknown_sweep_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "comol.tools.sweeps", "table9"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: sweep 'table9' not found")


# ---------------------------------------------------------------------------------------------- launchers, W&B

@pytest.mark.parametrize("launcher,cls", [
    (None, "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
    ("local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launchers_compose_and_leave_the_jobs_unchanged(launcher, cls):
    extra = [f"hydra/launcher={launcher}"] if launcher else []
    master, jobs = expand("table5", ["seed=0", *extra])
    assert master.hydra.launcher._target_ == cls
    get_class(cls)
    if launcher == "slurm":
        assert master.hydra.launcher.gpus_per_node == 1 and master.hydra.launcher.tasks_per_node == 1
        assert str(master.hydra.launcher.submitit_folder).startswith(str(master.hydra.sweep.dir))
    _, plain = expand("table5", ["seed=0"])
    assert [j.summary["adapter"] for j in jobs] == [j.summary["adapter"] for j in plain]


def test_sweep_dirs_are_per_launch_and_per_job():
    master, jobs = expand("table2")
    sweep_dir = str(master.hydra.sweep.dir)
    assert sweep_dir.endswith(f"/sweeps/table2/{master.sweep.id}") and len(master.sweep.id.split("-")[-1]) == 6
    assert [j.summary["subdir"].split("_", 1)[0] for j in jobs] == [str(i) for i in range(27)]


def test_wandb_is_offline_by_default_and_online_with_one_override():
    cfg = compose(["sweep=table2"])
    assert cfg.logger.wandb.mode == "offline"
    assert compose(["sweep=table2", "logger.wandb.mode=online"]).logger.wandb.mode == "online"
    single = compose([])
    assert single.logger.wandb.group is None  # a single run has no group


def test_every_experiment_preset_builds_a_lightning_trainer(tmp_path):
    """Catches trainer settings Lightning rejects (e.g. a float val_check_interval without epochs)."""
    from hydra.utils import instantiate

    from comol import CONF_DIR
    from comol.config import compose

    presets = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix(""))
                     for p in (CONF_DIR / "experiment").rglob("*.yaml") if "recipe" not in p.parts)
    assert len(presets) >= 8
    for preset in presets:
        cfg = compose([f"experiment={preset}"])
        cfg.trainer.accelerator, cfg.trainer.precision = "cpu", "32-true"  # CI has no GPU
        trainer = instantiate(lightning_trainer_node(cfg.trainer), logger=False, default_root_dir=str(tmp_path))
        assert trainer.accumulate_grad_batches == (1 if preset.startswith(REAL) else 4), preset
