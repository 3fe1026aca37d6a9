"""W&B as its users expect: Lightning's WandbLogger plus what a comol job adds to its run.

* ``WandbLogger``: Lightning's, without the deprecated ``anonymous=None`` it always passes to
  ``wandb.init`` (every job printed "The anonymous setting has no effect"), and with two options of
  ``logger.wandb`` that are not ``wandb.init`` arguments: ``log_adapter`` and ``predictions_rows``.
* ``log_job_outputs``: after evaluation, the saved adapter as a ``model`` artifact (size in the log
  line), one predictions table per evaluation set (``predictions/<set>``: ``predictions_rows`` rows
  sampled with a fixed seed from ``predictions/<set>.jsonl``) and, for routed adapters, the expert load
  by layer over the evaluation forwards as an image (``routing/eval_load``, the heatmap of
  ``python -m comol.routing``).

The group of a multirun's jobs comes from the config (``logger.wandb.group``, comol/config.py).
"""

from __future__ import annotations

import json
import logging
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

import wandb
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from comol.errors import ComolError
from comol.eval.code.samples import SAMPLES_SUFFIX
from comol.models.routing_figures import _pyplot, loads_figure, modules_of_loads

log = logging.getLogger(__name__)


class WandbLogger(_LightningWandbLogger):
    def __init__(self, *args, log_adapter: bool = True, predictions_rows: int = 50, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self.log_adapter = bool(log_adapter)
        self.predictions_rows = int(predictions_rows)

    # -- what a job adds to its run ---------------------------------------------------------------
    def log_adapter_artifact(self, adapter_dir: Path) -> None:
        files = sorted(p for p in adapter_dir.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        config_file = adapter_dir / "adapter_config.json"
        meta = json.loads(config_file.read_text()) if config_file.is_file() else {}
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"adapter-{self.experiment.name or self.experiment.id}")
        artifact = wandb.Artifact(name, type="model", metadata={"adapter": meta.get("adapter"),
                                                                  "base_model": meta.get("base_model"),
                                                                  "size_bytes": size})
        artifact.add_dir(str(adapter_dir))
        self.experiment.log_artifact(artifact)
        log.info("W&B artifact %s: the adapter %s (%d files, %.2f MB)", name, adapter_dir, len(files), size / 1e6)

    def log_predictions(self, pred_dir: Path, step: int) -> None:
        tables = {}
        for path in sorted(pred_dir.glob("*.jsonl")):
            if path.name.endswith(SAMPLES_SUFFIX) or self.predictions_rows <= 0:
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if not rows:
                continue
            keep = sorted(random.Random(0).sample(range(len(rows)), min(self.predictions_rows, len(rows))))
            columns = list(dict.fromkeys(k for i in keep for k in rows[i]))
            data = [[_cell(rows[i].get(c)) for c in columns] for i in keep]
            tables[f"predictions/{path.stem}"] = wandb.Table(columns=columns, data=data)
        if tables:
            self.experiment.log({**tables, "trainer/global_step": step})

    def log_routing_loads(self, loads: dict[str, dict[str, list[float]]], step: int) -> None:
        try:
            plt = _pyplot()
        except ComolError as e:   # matplotlib is optional (the sweeps extra): the job goes on without the image
            log.warning("no routing/eval_load image in W&B: %s", e)
            return
        fig = loads_figure(plt, modules_of_loads(loads), "expert load x N over the evaluation (1 = uniform)")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "eval_load.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            self.experiment.log({"routing/eval_load": wandb.Image(str(path)), "trainer/global_step": step})


def _cell(value: Any) -> Any:
    """A table cell: scalars as they are, lists and dicts as JSON text."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def log_job_outputs(loggers: Iterable[Logger], out_dir: Path, step: int, adapter_dir: Path | None = None,
                    routing_loads: dict[str, dict[str, list[float]]] | None = None) -> None:
    """Everything a job adds to its W&B run after evaluation (see the module docstring); no-op without W&B.
    ``adapter_dir``: the adapter this job saved (None: nothing to log); ``routing_loads``: the expert loads
    over the evaluation forwards (``RoutingStats.loads()``, None or empty for an adapter without a router)."""
    for lg in wandb_loggers(loggers):
        if adapter_dir is not None and lg.log_adapter and (adapter_dir / "adapter_config.json").is_file():
            lg.log_adapter_artifact(adapter_dir)
        lg.log_predictions(Path(out_dir) / "predictions", step)
        if routing_loads:
            lg.log_routing_loads(routing_loads, step)
