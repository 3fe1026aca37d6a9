"""Cost before launch: ``python -m comol.tools.sweeps <sweep> --estimate [--tokens-per-s N | FILE.json]``.

Per job of the sweep (and in total): the training rows it will see, the tokens they hold, and, given a
measured throughput, the hours of training (not evaluation). Where each number comes from:

* rows of the training split: the training file's row count when the file is there; for ``toy_math`` and
  ``eval_split`` datasets the configured ``train_size`` / ``train_per_set`` x sets; otherwise the count
  documented for the dataset (docs/methods.md §5: math_14k 14,000; commonsense_15k 15,000; CodeAlpaca-20k
  20,000 rows), marked ``documented``;
* rows trained on: ``trainer.max_steps`` x ``accumulate_grad_batches`` x ``dataset.batch_size`` when
  max_steps is set (the row count of the split is then only a cap per epoch), else rows x ``max_epochs``;
* tokens per row: ``--tokens-per-row N``, else the mean of min(row tokens, ``dataset.max_length``) over the
  rows at hand (the training file, else the bundled validation split of the dataset) with the job's
  tokenizer when it loads offline, else with SmolLM2's (``model=smollm2_135m``), else characters / 4; the
  source is printed;
* tokens/s: ``--tokens-per-s N`` (real tokens per second of whole training steps), or a JSON written by
  ``python -m comol.tools.bench --pipeline --save FILE`` whose ``tokens_per_s`` maps an adapter name (and
  ``<name>/packed``) to its measured rate: the job's adapter is looked up there, else ``lora``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from comol.schema_base import plain_config

#: documented training-split sizes (docs/methods.md §5), by the file name stem / dataset name
DOCUMENTED_ROWS = {"math_14k": 14_000, "math14k": 14_000, "commonsense_15k": 15_000, "commonsense15k": 15_000,
                   "codealpaca20k": 20_000, "CodeAlpaca-20k": 20_000}
#: the bundled validation split that stands in for a missing training file when counting tokens per row
VALIDATION_FILE = {"math14k": "train/math_14k_validation.json", "codealpaca20k": "train/codealpaca20k_validation.json",
                   "commonsense15k": "train/commonsense_15k_validation.json"}


@dataclass
class Estimate:
    num: int
    run_name: str
    split_rows: int
    rows_source: str
    rows_trained: int
    tokens_per_row: float
    tokens_source: str
    tokens: float
    tokens_per_s: float | None
    rate_source: str

    @property
    def hours(self) -> float | None:
        return None if not self.tokens_per_s else self.tokens / self.tokens_per_s / 3600.0


def _select(cfg, key: str) -> Any:
    return plain_config(OmegaConf.select(cfg, key, default=None))


def split_rows(ds: Mapping[str, Any]) -> tuple[int, str, list[dict] | None]:
    """(rows of the training split, where the count comes from, the rows when they were read)."""
    source = ds.get("source")
    if source == "toy_math":
        return int(ds["train_size"]), "dataset.train_size", None
    if source == "eval_split":
        n = int(ds["train_per_set"]) * len(ds.get("sets") or {})
        return n, "dataset.train_per_set x sets", None
    train = str(ds.get("train") or "")
    path = Path(train)
    if path.is_file():
        from comol.data.loading import load_rows

        rows = load_rows(str(path))
        return len(rows), f"file {path.name}", rows
    stem = path.stem if train else str(ds.get("name"))
    for key in (stem, str(ds.get("name")), train.rsplit("/", 1)[-1]):
        if key in DOCUMENTED_ROWS:
            return DOCUMENTED_ROWS[key], f"documented ({key}: {DOCUMENTED_ROWS[key]:,} rows)", None
    raise ValueError(f"dataset.train={train!r}: not a file here and no documented row count; "
                     f"give the file or estimate with a dataset whose size is known")


def rows_trained(cfg, n_rows: int) -> int:
    steps = _select(cfg, "trainer.max_steps")
    acc = int(_select(cfg, "trainer.accumulate_grad_batches") or 1)
    batch = int(_select(cfg, "dataset.batch_size"))
    if steps is not None and int(steps) > 0:
        return int(steps) * acc * batch
    epochs = _select(cfg, "trainer.max_epochs")
    if epochs is None or int(epochs) < 0:
        raise ValueError("trainer.max_steps and trainer.max_epochs are both unbounded: nothing to estimate")
    return n_rows * int(epochs)


_TOKENS_CACHE: dict[tuple, tuple[float, str]] = {}


def _tokenizer(model_cfg: Mapping[str, Any]):
    from comol.models.backbone import load_tokenizer

    try:
        return load_tokenizer(model_cfg), str(model_cfg.get("name"))
    except Exception:  # noqa: BLE001 - not available offline: try the bundled real tokenizer
        pass
    try:
        from comol.config import compose

        return load_tokenizer(OmegaConf.to_container(compose(["model=smollm2_135m"]).model, resolve=True)), "smollm2_135m"
    except Exception:  # noqa: BLE001
        return None, "chars/4"


def tokens_per_row(cfg, rows: list[dict] | None) -> tuple[float, str]:
    """Mean training tokens per row (prompt + output + EOS, cut at max_length) and how it was measured."""
    ds = _select(cfg, "dataset")
    model = _select(cfg, "model")
    max_length = int(ds["max_length"])
    what = "train file"
    if rows is None:
        name = str(ds.get("name"))
        if ds.get("source") == "toy_math":
            from comol.data.toy_math import generate_toy_math

            rows, what = generate_toy_math(200, seed=int(ds.get("data_seed", 0))), "toy_math rows"
        elif name in VALIDATION_FILE:
            from comol.data.loading import load_rows
            from comol.eval.eval_files import require_data_dir

            rows = load_rows(str(Path(require_data_dir()) / VALIDATION_FILE[name]))
            what = f"bundled {VALIDATION_FILE[name]}"
        else:
            raise ValueError(f"dataset={name}: no rows to measure tokens per row on; pass --tokens-per-row N")
    key = (what, len(rows), str(model.get("name")), max_length)
    if key not in _TOKENS_CACHE:
        tok, tok_name = _tokenizer(model)
        if tok is None:
            from comol.data.prompts import build_prompt

            lengths = [min((len(build_prompt(r)) + len(r["output"])) / 4 + 1, max_length) for r in rows]
        else:
            from comol.data.datamodule import encode_example

            lengths = [len(encode_example(r, tok, max_length)["input_ids"]) for r in rows]
        _TOKENS_CACHE[key] = (sum(lengths) / len(lengths), f"mean of {len(rows)} {what}, {tok_name} tokenizer")
    return _TOKENS_CACHE[key]


def rate_for(cfg, rates: float | Mapping[str, float] | None) -> tuple[float | None, str]:
    if rates is None:
        return None, "-"
    if isinstance(rates, (int, float)):
        return float(rates), "--tokens-per-s"
    name = str(_select(cfg, "adapter.name"))
    mode = "packed" if _select(cfg, "dataset.packing") else "padded"
    for key in (f"{name}/{mode}", name, f"lora/{mode}", "lora"):
        if key in rates:
            return float(rates[key]), f"bench {key}"
    raise ValueError(f"the bench file has no rate for adapter {name!r} nor for lora (keys: {sorted(rates)})")


def load_rates(value: str) -> float | dict[str, float]:
    """``--tokens-per-s``: a number, or the JSON of ``bench --pipeline --save``."""
    try:
        rate = float(value)
    except ValueError:
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"--tokens-per-s {value!r}: expected a number or a bench JSON file") from None
        data = json.loads(path.read_text())
        if not isinstance(data.get("tokens_per_s"), dict):
            raise ValueError(f"{path}: no 'tokens_per_s' mapping (write it with comol.tools.bench --pipeline --save)")
        return {str(k): float(v) for k, v in data["tokens_per_s"].items()}
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"--tokens-per-s {value!r}: expected a positive number")
    return rate


def estimate_jobs(jobs, rates=None, tokens_per_row_override: float | None = None) -> list[Estimate]:
    out = []
    for job in jobs:
        cfg = job.config
        n, source, rows = split_rows(_select(cfg, "dataset"))
        trained = rows_trained(cfg, n)
        if tokens_per_row_override is not None:
            tpr, tsrc = min(float(tokens_per_row_override), float(_select(cfg, "dataset.max_length"))), "--tokens-per-row"
        else:
            tpr, tsrc = tokens_per_row(cfg, rows)
        rate, rsrc = rate_for(cfg, rates)
        out.append(Estimate(job.num, str(_select(cfg, "run_name")), n, source, trained, tpr, tsrc,
                            trained * tpr, rate, rsrc))
    return out


def format_estimates(estimates: list[Estimate]) -> str:
    head = ["#", "run_name", "split rows (source)", "rows trained", "tokens/row", "tokens", "tokens/s", "hours"]
    rows = []
    for e in estimates:
        rows.append([str(e.num), e.run_name, f"{e.split_rows} ({e.rows_source})", str(e.rows_trained),
                     f"{e.tokens_per_row:.1f}", f"{e.tokens:,.0f}", "-" if e.tokens_per_s is None else f"{e.tokens_per_s:g}",
                     "-" if e.hours is None else f"{e.hours:.2f}"])
    total_tokens = sum(e.tokens for e in estimates)
    hours = [e.hours for e in estimates]
    total_hours = None if any(h is None for h in hours) else sum(hours)
    rows.append(["total", f"{len(estimates)} jobs", "", str(sum(e.rows_trained for e in estimates)), "",
                 f"{total_tokens:,.0f}", "", "-" if total_hours is None else f"{total_hours:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    sources = sorted({e.tokens_source for e in estimates} | {f"rate: {e.rate_source}" for e in estimates})
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), "",
                      "tokens/row: " + "; ".join(sources),
                      "hours = tokens / tokens/s / 3600 (training steps only; evaluation not included)"])
