"""``resume=true``: continue the run in ``hydra.run.dir`` from ``checkpoints/last.ckpt``.

The checkpointed config must equal the current one except for resume-safe keys (those that cannot change
what the adapter learns); loggers continue the same records (W&B run id, CSV version).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from comol.errors import ConfigError
from comol.io_utils import atomic_write_text
from comol.training.checkpointing import checkpoint_path
from comol.training.plain_state import load_plain

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"   # the resolved config a job writes into its run dir when it starts

# Keys (and key prefixes) that may differ between the interrupted run and its resumption.
#: keys a resumed run may change. ``callbacks`` is made of interpolations of other keys (optim.lr, checkpoint.*,
#: progress_interval_s, ...), each compared on its own, so a change is reported once, under its own name.
RESUME_SAFE = ("resume", "paths", "logger", "checkpoint", "divergence", "sweep", "tags", "run_name", "eval",
               "save_adapter", "trainer.enable_progress_bar", "trainer.enable_model_summary",
               "trainer.log_every_n_steps", "trainer.reuse_host_memory", "progress_interval_s", "callbacks")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _safe(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in RESUME_SAFE)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ (added, removed or changed), resume-safe keys left out."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in set(a) | set(b) if not _safe(k) and (k not in a or k not in b or a[k] != b[k]))


def wants_resume(cfg_resume: Any) -> bool:
    """``resume=true``, or a SLURM job that was requeued (its restarted run finds its own checkpoint)."""
    if isinstance(cfg_resume, str):
        cfg_resume = cfg_resume.lower() in ("true", "1", "yes")
    if cfg_resume:
        return True
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def previous_run_config(out_dir: Path, current_cfg: dict) -> dict | None:
    """The resolved config the run in ``out_dir`` started with (its ``config.yaml``), None when no run started
    there. Read it before this job writes its own: when the run has no checkpoint (it will start again from step
    0, see ``load_resume_state``), a ``current_cfg`` that differs from it is refused here, config.yaml untouched."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # noqa: BLE001 - yaml errors of many kinds
        raise ConfigError(f"resume=true: {path} is unreadable ({type(e).__name__}): it should hold the resolved "
                          f"config of the run in {out_dir}") from None
    if not isinstance(node, dict):
        raise ConfigError(f"resume=true: {path} holds no config mapping")
    if not checkpoint_path(out_dir).is_file():
        _refuse_other_config(path, node, current_cfg)
    return node


def _csv_version(current_cfg: dict) -> int | None:
    """The newest CSV log version of the run (the one a restart continues), None when there is none."""
    node = (current_cfg.get("logger") or {}).get("csv") or {}
    if not isinstance(node, dict) or not node.get("save_dir"):
        return None
    root = Path(str(node["save_dir"])) / str(node.get("name") or "lightning_logs")
    versions = [int(p.name[len("version_"):]) for p in root.glob("version_*") if p.name[len("version_"):].isdigit()]
    return max(versions) if versions else None


def load_resume_state(out_dir: Path, current_cfg: dict, previous_cfg: dict | None = None) -> tuple[Path | None, dict]:
    """(checkpoint path, this callback's saved state); a one-line ConfigError when it cannot resume.

    A run killed before its first checkpoint (``previous_cfg``: the config it started with) restarts from step 0:
    (None, a state of step 0 whose loggers continue its CSV log, rows dropped)."""
    ckpt = checkpoint_path(out_dir)
    if not ckpt.is_file():
        if previous_cfg is None:
            raise ConfigError(f"resume=true: {out_dir} has no {ckpt.relative_to(out_dir)}: nothing to resume (no run "
                              f"started there; hydra.run.dir must name the interrupted run's dir)")
        _refuse_other_config(out_dir / CONFIG_FILE, previous_cfg, current_cfg)
        log.warning("resume=true: %s holds a run stopped before its first checkpoint: it starts again from step 0",
                    out_dir)
        version = _csv_version(current_cfg)
        return None, {"global_step": 0, "loggers": {} if version is None else {"csv": version}}
    data = load_plain(ckpt)   # weights_only=True: a checkpoint never runs code
    callbacks = data.get("callbacks")
    state = next((v for k, v in callbacks.items() if str(k).startswith("RunCheckpoint")), None) \
        if isinstance(callbacks, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) \
            or not isinstance(state.get("global_step"), int):
        raise ConfigError(f"resume=true: {ckpt} holds no comol run state")
    _refuse_other_config(ckpt, state["config"], current_cfg)
    return ckpt, state


def _refuse_other_config(source: Path, saved: dict, current: dict) -> None:
    """A one-line ConfigError naming the keys where ``current`` differs from the run's ``saved`` config, with the
    run's own values (.hydra/overrides.yaml is no guide: Hydra rewrote it for this very launch)."""
    diff = config_differences(saved, current)
    if diff:
        shown = ", ".join(diff[:12]) + (f" (+{len(diff) - 12} more)" if len(diff) > 12 else "")
        flat = _flatten(saved)
        own = " ".join(f"{k}={flat[k] if k in flat else '(absent)'}" for k in diff[:6])
        whose = "checkpointed" if source.suffix == ".ckpt" else "interrupted"
        raise ConfigError(f"resume=true: the config differs from the {whose} run's in {shown}; resume with the run's "
                          f"own values ({own}{' ...' if len(diff) > 6 else ''}; recorded in {source})")


def logger_resume_kwargs(state: dict) -> dict[str, dict]:
    """Extra constructor arguments, per logger config name, that continue the saved records."""
    ids = state.get("loggers") or {}
    out: dict[str, dict] = {}
    if ids.get("wandb"):
        out["wandb"] = {"id": ids["wandb"], "resume": "allow"}
    if ids.get("csv") is not None:
        out["csv"] = {"version": ids["csv"]}
    return out


def continue_csv(loggers: list, state: dict) -> None:
    """Let a resumed run's CSVLogger append to its metrics.csv instead of replacing it (Lightning deletes an
    existing file when its writer starts), minus the rows logged after the checkpoint: the resumed run logs
    those steps again. After a hard kill that is every row since the checkpoint (Lightning writes each row
    as it is logged), the last one possibly cut short (no line end): it is dropped too. The old file is kept
    aside until the trimmed copy is in place; a resume killed in between finds it there the next time."""
    for lg in loggers:
        if lg.__class__.__name__ != "CSVLogger":
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        aside = path.with_name(".metrics.csv.pre-resume")
        if path.is_file():
            os.replace(path, aside)
        elif not aside.is_file():
            continue
        with warnings.catch_warnings():   # "previous log files ... will be deleted": none is, it was moved aside
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            writer = lg.experiment   # starts the writer: nothing left for it to delete
        text = aside.read_text()
        if not text.endswith("\n"):   # killed while writing its last row
            text = text[:text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        rows, header = list(reader), list(reader.fieldnames or [])
        # the checkpoint at step G is saved when the batch after step G starts. A training row carries the
        # optimizer steps done before its forward (the batch that ended at step g: g-1), a validation row the
        # step it measured (AdapterLM logs val/ at global_step): a validation row of step G precedes the save
        cut = int(state["global_step"])
        kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) < cut
                or (int(float(r["step"])) == cut and any(k.startswith("val/") and v not in (None, "")
                                                         for k, v in r.items()))]
        if header:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
            w.writeheader()
            w.writerows(kept)
            atomic_write_text(path, buf.getvalue())
            writer.metrics_keys = list(header)
        aside.unlink()
        log.info("resume: %s keeps %d of %d rows (steps < %d)", path, len(kept), len(rows), cut)
