"""``python run.py --help``: a short guide (groups, their options, the common keys), built from conf/ when asked.

Hydra prints ``hydra.help.template`` (conf/hydra/help/comol.yaml), whose body is the ``${comol_help:}``
resolver below: the option lists are read from the config tree, so they never go stale. Internal entries
(``_``-prefixed files such as the shared sweep fragments ``sweep/_base``, ``sweep/_tiny``) are not listed.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from omegaconf import OmegaConf

from comol import CONF_DIR
from comol.schema import describe_key

GROUPS = (
    ("model", "backbone"),
    ("adapter", "PEFT method"),
    ("dataset", "training data"),
    ("eval", "evaluation sets"),
    ("trainer", "Lightning trainer"),
    ("logger", "W&B (offline by default) / csv / none"),
    ("sweep", "a paper sweep: runs all its jobs (multirun); <name>_tiny = CPU twin"),
    ("hydra/launcher", "where sweep jobs run"),
)

#: (key, example value) of the common keys; their help text and allowed values come from the schema
#: (comol/schema.py ``describe_key``), so ``--help`` states the same ranges the checks enforce
KEYS = (
    ("mode", "train|eval|base"),
    ("adapter_path", "DIR"),
    ("seed", "0"),
    ("adapter.r", "16"),
    ("adapter.num_experts", "8"),
    ("dataset.train", "FILE"),
    ("dataset.max_length", "N"),
    ("trainer.max_steps", "N"),
    ("optim.lr", "2e-3"),
    ("optim.warmup_steps", "20"),
    ("eval.limit", "N"),
    ("select_best", "val/loss"),
    ("resume", "true"),
    ("sweep.id", "ID"),
)
#: keys that are Hydra's, not the run config's
HYDRA_KEYS = (("hydra.run.dir=DIR", "where the run writes (must not hold another run)"),)


def key_line(key: str, example: str, width: int = 118) -> str:
    """``  key=example   help [allowed values]`` (the allowed values left out when they would not fit)."""
    what, expected = describe_key(key)
    line = f"  {key + '=' + example:30s} {what}"
    return line if expected == what or len(line) + len(expected) + 3 > width else f"{line} [{expected}]"


def group_options(group: str) -> list[str]:
    """Option names of a config group: its YAML files, ``_``-prefixed ones left out."""
    folder = CONF_DIR / group
    if group == "hydra/launcher":
        return ["basic (default)", *sorted(p.stem for p in folder.glob("*.yaml"))]
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


def experiment_options() -> list[str]:
    """``experiment=<dataset>/<model>/<method>`` presets, summarised per dataset/model."""
    out = []
    root = CONF_DIR / "experiment"
    for folder in sorted({p.parent for p in root.rglob("*.yaml")}):
        rel = folder.relative_to(root).as_posix()
        if rel == "recipe" or any(part.startswith("_") for part in Path(rel).parts):
            continue
        out.append(f"{rel}/{{{','.join(sorted(p.stem for p in folder.glob('*.yaml') if not p.stem.startswith('_')))}}}")
    return out


def default_choices() -> dict[str, str]:
    """group -> default option, from the defaults list of conf/train.yaml."""
    entries = yaml.safe_load((CONF_DIR / "train.yaml").read_text()).get("defaults", [])
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()}


def help_text() -> str:
    lines = [
        "comol: fine-tune a backbone with a (mixture of) LoRA adapter(s), then evaluate it. Hydra command line:",
        "",
        "  python run.py [group=option ...] [key=value ...]       one run (outputs/train/runs/<time>/)",
        "  python run.py -m key=a,b ...                           one job per combination (multirun)",
        "  python run.py sweep=table2_tiny                         a paper sweep; list its jobs first with",
        "                                                          python -m comol.tools.sweeps table2_tiny",
        "  python -m comol.tools.report <sweep or multirun dir>    its table",
        "",
        "Groups (group=option; the default is marked *):",
    ]
    defaults = default_choices()
    for group, what in GROUPS:
        opts = [f"{o}*" if defaults.get(group) == o else o for o in group_options(group)]
        lines.append(f"  {group:15s} {what}")
        lines += textwrap.wrap(", ".join(opts), 110, initial_indent=" " * 20, subsequent_indent=" " * 20)
    lines.append(f"  {'experiment':15s} a paper setting (model + data + adapter + recipe)")
    for e in experiment_options():
        lines.append(f"  {'':15s}   {e}")
    lines += ["", "Common keys (key=value [allowed values]; every key is checked before anything is built):"]
    lines += [key_line(key, example) for key, example in KEYS]
    lines += [f"  {key:30s} {what}" for key, what in HYDRA_KEYS]
    lines += ["", "More: README.md. The full composed config: python run.py [overrides] --cfg job.",
              "Hydra's own flags: python run.py --hydra-help."]
    return "\n".join(lines)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("comol_help"):
        OmegaConf.register_new_resolver("comol_help", help_text)


register_resolvers()
