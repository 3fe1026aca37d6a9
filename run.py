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
    return metrics.get("eval/math/mean_acc")


if __name__ == "__main__":
    main()
