"""Paper sweeps: list their jobs without running them (a dry run), and keep one W&B group per launch.

    python -m comol.tools.sweeps                          # the sweeps in conf/sweep/ with their job counts
    python -m comol.tools.sweeps table2                   # every job of `python run.py sweep=table2`, key hyperparameters
    python -m comol.tools.sweeps table5 seed=0            # the same overrides you would give run.py
    python -m comol.tools.sweeps table2 --json            # machine-readable
    python -m comol.tools.sweeps table2 --cfg             # each job's full config (like `run.py --cfg job`, per job)
    python -m comol.tools.sweeps table2 --estimate --tokens-per-s 2500   # tokens and hours per job (comol/tools/estimate.py)
    python -m comol.tools.sweeps table2 --estimate --tokens-per-s bench.json   # rates saved by bench --pipeline --save

Hydra's own ``python run.py -m sweep=table2 --cfg job`` prints one config (the sweep's base), not the jobs.
This module expands the sweep exactly as Hydra's basic sweeper does (``hydra.sweeper.params`` first, then
the command-line overrides, cartesian product in that order) and composes every job's config with Hydra's
config loader, the way the launcher does before running it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from comol import CONF_DIR
from comol.adapter_presets import adapter_values
from comol.errors import ArgumentParser, UsageError
from comol.schema_base import plain_config

log = logging.getLogger(__name__)

SWEEP_DIR = CONF_DIR / "sweep"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
ADAPTER_KEYS = ("r", "alpha", "num_experts", "top_k", "core_router", "tau_max", "adapter_size", "max_threshold")
SHORT = {"num_experts": "N", "core_router": "CR", "adapter_size": "a"}


class SweepCallback(Callback):
    """Hydra callback (conf/sweep/_base.yaml). Resolving ``sweep.id`` once on the launch config stores the
    ``${now:}`` value in its resolver cache, which Hydra copies into every job's config: all jobs of a launch
    share one id, hence one W&B group, whatever ``hydra.sweep.dir`` says and whichever launcher runs them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        group = pin_sweep_id(config)
        if group:
            log.info("sweep %s: W&B group %s", OmegaConf.select(config, "sweep.name"), group)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        log.info("sweep done; table: python -m comol.tools.report %s", config.hydra.sweep.dir)


def pin_sweep_id(config: DictConfig) -> str | None:
    try:
        OmegaConf.select(config, "sweep.id", throw_on_resolution_failure=True)
        return OmegaConf.select(config, "sweep.group", throw_on_resolution_failure=True)
    except Exception:  # a config without a sweep block: nothing to pin
        return None


def available_sweeps() -> list[str]:
    """Sweep names (conf/sweep/*.yaml without the shared ``_*`` fragments)."""
    return sorted(p.stem for p in SWEEP_DIR.glob("*.yaml") if not p.stem.startswith("_"))


@dataclass
class Job:
    num: int
    overrides: list[str]
    summary: dict = field(default_factory=dict)
    config: DictConfig | None = field(default=None, repr=False)


def _sweep_arguments(master: DictConfig) -> list[str]:
    params = master.hydra.sweeper.get("params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(master.hydra.overrides.task)


def expand_overrides(params: dict, task_overrides: Sequence[str], config_loader=None) -> list[list[str]]:
    """The override list of every job, in launch order, as Hydra's basic sweeper builds them (public parser
    API): one list of values per key, a later override of a key (the command line) replacing an earlier one
    (the sweep's own list) in its place, then the cartesian product, the first key varying slowest."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [f"{k}={v}" for k, v in (params or {}).items()] + list(task_overrides)
    parser = OverridesParser.create(config_loader=config_loader)
    choices: dict[str, list[str]] = {}
    for o in parser.parse_overrides(args):
        key = o.get_key_element()
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ValueError(f"{o.input_line}: the basic sweeper takes lists, range() or glob(), not an interval")
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices[key] = [f"{key}={v}" for v in values]
    return [list(job) for job in itertools.product(*choices.values())]


def overrides_from_multirun_yaml(path: str | Path) -> list[list[str]]:
    """Re-expand a finished launch's job list from the ``multirun.yaml`` Hydra saved in its sweep dir."""
    master = OmegaConf.load(path)
    params = master.hydra.sweeper.get("params")   # absent (None) in a plain `-m a=1,2` launch
    params = OmegaConf.to_container(params, resolve=False) if OmegaConf.is_config(params) else dict(params or {})
    task = OmegaConf.to_container(master.hydra.overrides.task, resolve=False)
    try:
        with _hydra() as (_, loader):
            return expand_overrides(params, task, loader)
    except Exception:  # no conf/ here (e.g. a copied sweep dir): fine unless the sweep used glob()
        return expand_overrides(params, task, None)


class _hydra:
    """Context: a Hydra instance on conf/ (like run.py's), cleared on exit."""

    def __enter__(self):
        import comol.config  # noqa: F401  (the ${comol_root:} resolver)
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        self._ctx = initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="run")
        self._ctx.__enter__()
        hydra = GlobalHydra.instance().hydra
        return hydra, hydra.config_loader

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        return False


def sweep_overrides(sweep: str | None, overrides: Sequence[str] = ()) -> list[str]:
    """``table2`` + ``[seed=0]`` -> the run.py command line ``[sweep=table2, seed=0]``."""
    return ([f"sweep={sweep}"] if sweep else []) + list(overrides)


def expand(sweep: str | None, overrides: Sequence[str] = (), with_configs: bool = True) -> tuple[DictConfig, list[Job]]:
    """(launch config, jobs) of ``python run.py sweep=<sweep> <overrides>``, without running anything."""
    from hydra.types import RunMode

    if sweep is not None and sweep not in available_sweeps():
        raise ValueError(f"sweep {sweep!r} not found: expected one of {available_sweeps()} (conf/sweep/)")
    with _hydra() as (hydra, loader):
        master = hydra.compose_config("train", sweep_overrides(sweep, overrides), run_mode=RunMode.MULTIRUN,
                                      with_log_configuration=False)
        target = master.hydra.sweeper.get("_target_")
        if target != BASIC_SWEEPER:
            raise ValueError(f"hydra.sweeper={target} cannot be listed: only the basic sweeper is supported")
        pin_sweep_id(master)
        jobs = []
        for num, ovr in enumerate(expand_overrides(master.hydra.sweeper.get("params") or {},
                                                   list(master.hydra.overrides.task), loader)):
            job = Job(num=num, overrides=list(ovr))
            if with_configs:
                cfg = loader.load_sweep_config(master, list(ovr))
                with open_dict(cfg):
                    cfg.hydra.job.num = num
                    cfg.hydra.job.id = str(num)
                job.config = cfg
                job.summary = summarize(cfg, ovr)
            jobs.append(job)
    if not jobs:
        raise ValueError(f"sweep {sweep or ''} {' '.join(overrides)} expands to no jobs "
                         "(glob() does not see the nested experiment presets: list them)".replace("  ", " "))
    return master, jobs


def _sel(cfg: DictConfig, key: str, default: Any = None) -> Any:
    try:
        return plain_config(OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=True))
    except Exception:
        return "?"


def summarize(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """The hyperparameters a reader checks against the paper, resolved."""
    experiment = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), None)
    try:  # the values the run builds: the preset over the dataclass defaults (presets state only deltas)
        values = adapter_values(cfg.adapter)
    except Exception:
        values = {"name": "?"}
    adapter = {k: values[k] for k in ("name", *ADAPTER_KEYS) if values.get(k) is not None}
    bs, acc = _sel(cfg, "dataset.batch_size"), _sel(cfg, "trainer.accumulate_grad_batches", 1)
    return {
        "experiment": experiment,
        "mode": _sel(cfg, "mode"),
        "method": _sel(cfg, "method"),
        "run_name": _sel(cfg, "run_name"),
        "model": _sel(cfg, "model.name"),
        "dataset": _sel(cfg, "dataset.name"),
        "adapter": adapter,
        "seed": _sel(cfg, "seed"),
        "lr": _sel(cfg, "optim.lr"),
        "schedule": _sel(cfg, "optim.schedule"),
        "warmup_steps": _sel(cfg, "optim.warmup_steps"),
        "weight_decay": _sel(cfg, "optim.weight_decay"),
        "batch_size": bs,
        "accumulate_grad_batches": acc,
        "effective_batch": bs * acc if isinstance(bs, int) and isinstance(acc, int) else "?",
        "max_epochs": _sel(cfg, "trainer.max_epochs"),
        "max_steps": _sel(cfg, "trainer.max_steps"),
        "precision": _sel(cfg, "trainer.precision"),
        "max_length": _sel(cfg, "dataset.max_length"),
        "eval": _sel(cfg, "eval.task"),
        "eval_sets": list((_sel(cfg, "eval.sets") or {}).keys()),
        "max_new_tokens": _sel(cfg, "eval.max_new_tokens"),
        "decoding": _sel(cfg, "eval.decoding"),
        "wandb_group": _sel(cfg, "sweep.group"),
        "tags": _sel(cfg, "tags"),
        "subdir": f"{_sel(cfg, 'hydra.job.num')}_{_sel(cfg, 'run_name')}",
    }


def _adapter_str(a: dict) -> str:
    parts = [f"{SHORT.get(k, k)}={str(v).lower() if isinstance(v, bool) else v}" for k, v in a.items() if k != "name"]
    return f"{a.get('name')}({', '.join(parts)})"


def _decoding_str(d: Any) -> str:
    if not isinstance(d, dict):
        return str(d)
    if not d.get("do_sample"):
        return "greedy"
    return f"sample n={d.get('num_samples')} T={d.get('temperature')} p={d.get('top_p')}"


def format_jobs(master: DictConfig, jobs: list[Job]) -> str:
    head = ["#", "method", "model", "adapter", "seed", "lr/warmup", "batch", "epochs", "max_len", "precision",
            "eval", "run_name"]
    rows = []
    for j in jobs:
        s = j.summary
        epochs = s["max_epochs"] if s["max_steps"] in (-1, None) else f"{s['max_steps']} steps"
        adapter = _adapter_str(s["adapter"])
        if s.get("mode") == "base":   # the bare backbone: no adapter is built and nothing trains
            adapter, epochs = "none (mode=base)", "no training"
        rows.append([str(j.num), str(s["method"]), str(s["model"]), adapter, str(s["seed"]),
                     f"{s['lr']:g}/{s['warmup_steps']} {s['schedule']}" if isinstance(s["lr"], float) else str(s["lr"]),
                     f"{s['batch_size']}x{s['accumulate_grad_batches']}={s['effective_batch']}", str(epochs),
                     str(s["max_length"]), str(s["precision"]),
                     f"{s['eval']} ({_decoding_str(s['decoding'])}, {s['max_new_tokens']} tok)", str(s["run_name"])])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    name = OmegaConf.select(master, "sweep.name", default=None)
    launcher = str(master.hydra.launcher.get("_target_", "?")).rsplit(".", 1)[-1]
    group = jobs[0].summary.get("wandb_group") if jobs and jobs[0].summary else None
    out = [f"sweep {name}: {len(jobs)} jobs, launcher {launcher}, W&B group {group} (project "
           f"{OmegaConf.select(master, 'logger.wandb.project', default='-')})",
           line(head), line(["-" * w for w in widths]), *map(line, rows)]
    return "\n".join(out)


def job_config_yaml(job: Job) -> str:
    cfg = OmegaConf.to_container(job.config, resolve=False)
    cfg.pop("hydra", None)
    return OmegaConf.to_yaml(cfg)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m comol.tools.sweeps", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Without arguments: the sweeps in conf/sweep/ with their job counts.")
    p.add_argument("args", nargs="*", metavar="[sweep] key=value",
                   help="a sweep name (conf/sweep/<name>.yaml), then the overrides you would give run.py")
    p.add_argument("--json", action="store_true", help="the jobs as JSON (num, overrides, key hyperparameters)")
    p.add_argument("--cfg", action="store_true", help="each job's full config (like `run.py --cfg job`, per job)")
    p.add_argument("--estimate", action="store_true", help="tokens and hours per job (comol/tools/estimate.py)")
    p.add_argument("--tokens-per-s", metavar="RATE|FILE",
                   help="with --estimate: tokens/s, or a JSON of rates saved by `bench --pipeline --save`")
    p.add_argument("--tokens-per-row", type=float, metavar="N",
                   help="with --estimate: tokens per training row instead of counting them")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parser().parse_intermixed_args(argv)
        rates = opts.tokens_per_s
        if opts.estimate and rates is not None:
            from comol.tools.estimate import load_rates

            rates = load_rates(rates)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = opts.args
    if not args:
        print(__doc__.strip())
        print("\nsweeps:")
        for name in available_sweeps():
            try:
                _, jobs = expand(name, with_configs=False)
                print(f"  {name:18s} {len(jobs):3d} jobs")
            except Exception as e:  # a broken sweep file should not hide the others
                print(f"  {name:18s} error: {str(e).splitlines()[0]}")
        return 0
    sweep, overrides = (args[0], args[1:]) if "=" not in args[0] else (None, args)
    try:
        master, jobs = expand(sweep, overrides)
    except Exception as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if opts.estimate:
        from comol.tools.estimate import estimate_jobs, format_estimates

        try:
            found = estimate_jobs(jobs, rates, opts.tokens_per_row)
        except ValueError as e:
            print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
            return 2
        print(format_estimates(found))
        return 0
    try:
        _print_jobs(master, jobs, opts.json, opts.cfg)
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
    return 0


def _print_jobs(master: DictConfig, jobs: list[Job], as_json: bool, show_cfg: bool) -> None:
    if as_json:
        print(json.dumps([{"num": j.num, "overrides": j.overrides, **j.summary} for j in jobs], indent=1, default=str))
    elif show_cfg:
        for j in jobs:
            print(f"# ---- job {j.num}: {' '.join(j.overrides)}\n{job_config_yaml(j)}")
    else:
        print(format_jobs(master, jobs))


if __name__ == "__main__":
    raise SystemExit(main())
