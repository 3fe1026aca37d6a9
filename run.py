"""Entry point: `python run.py [group=option ...] [key=value ...]` (Hydra). See README."""

import sys

import hydra
from omegaconf import DictConfig

import comol.config  # noqa: F401  (registers the ${comol_root:} resolver)
from comol.errors import ComolError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from comol.pipeline import run

    try:
        metrics = run(cfg)
    except ComolError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k.startswith(("eval/", "params/"))}
    print(f"results ({cfg.paths.output_dir}): {shown}")
    # a scalar for Hydra sweepers that optimise something: the first mean accuracy / pass@1 found
    return next((v for k, v in metrics.items() if k.endswith(("mean_acc", "pass@1"))), None)


if __name__ == "__main__":
    main()
