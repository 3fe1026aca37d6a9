"""Trainable-parameter accounting without weights.

    python -m comol.params model=qwen3_8b adapter=lora adapter.r=16      -> 24.77M
    python -m comol.params model=qwen3_8b --table                          -> every adapter side by side

The backbone is built on the ``meta`` device from its architecture block (no download, no memory),
the adapter is injected, and trainable parameters are counted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from comol.adapters import count_parameters, inject_adapter
from comol.config import compose
from comol.errors import ArgumentParser, ComolError
from comol.models import build_meta_model
from comol.schema_base import plain_config


def trainable_params(overrides: Sequence[str] = ()) -> tuple[int, int]:
    """(trainable, total) for the composed ``model`` + ``adapter`` of ``overrides``."""
    cfg = compose(overrides)
    model = build_meta_model(cfg.model)
    inject_adapter(model, plain_config(cfg.adapter))
    return count_parameters(model)


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def adapter_presets() -> list[str]:
    from comol import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "adapter").glob("*.yaml"))


def table(overrides: Sequence[str]) -> str:
    """A Markdown table of trainable parameters of every adapter preset for one backbone."""
    rows = ["| adapter | trainable | % of backbone |", "|---|---:|---:|"]
    for name in adapter_presets():
        trainable, total = trainable_params([*overrides, f"adapter={name}"])
        rows.append(f"| {name} | {millions(trainable)} | {100 * trainable / (total - trainable):.3f}% |")
    return "\n".join(rows)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m comol.params", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="Hydra overrides of the run config, e.g. model=qwen3_8b adapter=lora adapter.r=16")
    p.add_argument("--table", action="store_true",
                   help="a Markdown table of every adapter preset's trainable parameters for the backbone")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_intermixed_args(argv)
        if args.table:
            print(table(args.overrides))
        else:
            n = trainable_params(args.overrides)[0]
            print(f"{millions(n)} ({n:,})")  # the paper's rounding and the exact count
    except (ComolError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
