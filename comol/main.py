"""The training/evaluation entry point (Hydra): ``python run.py ...``, ``python -m comol ...`` or ``comol-run ...``.

The config tree is ``comol/conf`` (inside the package, so an installed wheel has it too). See README."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import comol.cli_help  # noqa: F401  (the ${comol_help:} resolver of `--help`)
import comol.config  # noqa: F401  (registers the ${comol_root:} resolver)
import comol.run_dir  # noqa: F401  (the ${comol_run_dir:} resolver of hydra.run.dir)
from comol.errors import ComolError
from comol.job import objective, run
from comol.run_dir import RunDirTaken


def _note_in_job_log(cfg: DictConfig, line: str) -> None:
    """Append the failure to the job's own log (reports of a sweep read it to say why a job failed)."""
    try:
        with open(Path(cfg.paths.output_dir) / f"{cfg.task_name}.log", "a", encoding="utf-8") as f:
            f.write(line.splitlines()[0] + "\n")
    except Exception:  # noqa: BLE001 - never hide the real error behind a logging problem
        pass


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        metrics = run(cfg)
    except ComolError as e:
        if not isinstance(e, RunDirTaken):  # the dir is another run's: leave its log alone
            _note_in_job_log(cfg, f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # unexpected: keep the traceback, but leave the reason in the job's log too
        _note_in_job_log(cfg, f"error: {type(e).__name__}: {e}")
        raise
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k.startswith(("eval/", "params/"))}
    print(f"results ({cfg.paths.output_dir}): {shown}")
    # the float a Hydra sweeper optimises: objective.metric (default: the eval task's primary metric, val/loss
    # when eval=none), the worst value for its direction when the job has none
    return objective(cfg, metrics)

