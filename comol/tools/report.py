"""Turn a finished sweep into the paper's table (and, for expert/rank sweeps, its plots).

    python -m comol.tools.report outputs/sweeps/table2/<id>            # -> <id>/report/{table.md, table.csv, jobs.csv}
    python -m comol.tools.report outputs/sweeps/table5/<id> --out DIR  # + accuracy_vs_N.png, params_vs_N.png
    python -m comol.tools.report <sweep dir> --strict                  # exit 1 when a job is missing or failed

Reads every job's ``results.json`` (and its config) under the sweep dir. Rows are methods (the config's
``method``, set by the experiment presets), plus the swept expert count N or rank r when a method has several;
columns are the evaluation sets (accuracy %, the tasks' mean as "Avg.", HumanEval pass@k %), one block per
backbone when the sweep has several, and the trainable parameters. Cells are mean ± sample std (ddof=1) over
the seeds; a cell with fewer seeds than its row was meant to have says so ("n=2/3"). The job list the
launch was meant to run is re-expanded from the ``multirun.yaml`` Hydra saved; jobs that never started
(missing), have no results.json (failed or still running) or whose files cannot be read (unreadable, the
file named) are listed under the table, never averaged in. Each job is attributed by its own record: the
overrides in the claim the job wrote (``.comol_run.json``), else ``.hydra/overrides.yaml``, and the resolved
``config.yaml`` the pipeline wrote. A plain ``python run.py -m a=1,2`` multirun dir is reported the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf

import comol.config  # noqa: F401  (registers ${comol_root:} for .hydra/config.yaml)
from comol.run_dir import read_claim
from comol.tools.sweeps import _hydra, overrides_from_multirun_yaml

AXES = (("N", "adapter.num_experts"), ("r", "adapter.r"))   # swept hyperparameters that become row keys


@dataclass
class JobRecord:
    num: int | None
    overrides: list[str]
    status: str                       # ok | failed | unreadable | missing
    dir: Path | None = None
    reason: str = ""
    info: dict = field(default_factory=dict)      # method, model, seed, N, r, eval_sets
    results: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- reading

def _lookup(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _job_info(cfg: Any) -> dict:
    """The keys the report needs from a job config (a resolved dict, or a DictConfig resolved key by key)."""
    def get(key):
        if isinstance(cfg, DictConfig):
            try:
                v = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            except Exception:
                return None
            return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        return _lookup(cfg, key)

    method = get("method") or get("adapter.name")
    info = {"method": str(method) if method is not None else "?", "model": get("model.name"), "seed": get("seed"),
            "eval_sets": list((get("eval.sets") or {}).keys()), "adapter": get("adapter.name")}
    for label, key in AXES:
        info[label] = get(key)
    return info


def _read_config(job_dir: Path) -> Any:
    """The pipeline's resolved config.yaml; else Hydra's .hydra/config.yaml (resolved key by key)."""
    resolved = job_dir / "config.yaml"
    if resolved.is_file():
        return yaml.safe_load(resolved.read_text()) or {}
    raw = job_dir / ".hydra" / "config.yaml"
    if raw.is_file():
        return OmegaConf.load(raw)
    return None


def _failure_reason(job_dir: Path) -> str:
    for log in sorted(job_dir.glob("*.log")):
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
        errors = [l for l in lines if re.search(r"error|exception|traceback", l, re.I)]
        if errors:
            return f"no results.json; {log.name}: {errors[-1][-200:]}"
    return "no results.json (the job failed, was killed, or is still running)"


def _failed_results(results: Any) -> str:
    """Why a readable results.json counts as failed, or "": a diverged job (status failed, NaN/inf or null
    metrics, as older runs wrote them) is never averaged in."""
    if not isinstance(results, dict):
        return "results.json is not an object"
    if results.get("status") == "failed":
        return f"marked failed: {results.get('failed_reason', '?')}"
    bad = [k for k, v in results.items() if k.startswith(("eval/", "train/", "val/", "params/"))
           and (v is None or (isinstance(v, float) and not math.isfinite(v)))]
    return f"non-finite results (diverged?): {', '.join(bad)}" if bad else ""


def _job_num(path: Path) -> int | None:
    m = re.match(r"^(\d+)(_|$)", path.name)
    return int(m.group(1)) if m else None


def _expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return None
    return overrides_from_multirun_yaml(multirun)


def _compose_missing(sweep_dir: Path, overrides: list[str]) -> dict:
    """Row attribution for a job that never started: compose its config as the launcher would."""
    try:
        master = OmegaConf.load(sweep_dir / "multirun.yaml")
        with _hydra() as (_, loader):
            cfg = loader.load_sweep_config(master, list(overrides))
            return _job_info(cfg)
    except Exception:
        return {}


class Unreadable(Exception):
    """A job file that cannot be read; the message names the file."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise Unreadable(f"{path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise Unreadable(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise Unreadable(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key, value in data.items():
        if key.startswith(("eval/", "params/")) and value is not None and not isinstance(value, (int, float)):
            raise Unreadable(f"{path}: {key}={value!r} is not a number")
    return data   # null / NaN metrics (a diverged job) are judged by _failed_results


def _job_overrides(job_dir: Path) -> list[str]:
    """The job's own command-line overrides: recorded in its claim by the job itself (comol/run_dir.py),
    else Hydra's .hydra/overrides.yaml."""
    claim = read_claim(job_dir)
    if claim and isinstance(claim.get("overrides"), list):
        return [str(o) for o in claim["overrides"]]
    ov_file = job_dir / ".hydra" / "overrides.yaml"
    if not ov_file.is_file():
        return []
    try:
        return [str(o) for o in (yaml.safe_load(ov_file.read_text()) or [])]
    except (OSError, yaml.YAMLError) as e:
        raise Unreadable(f"{ov_file}: not valid YAML ({str(e).splitlines()[0]})") from None


def _read_job(d: Path) -> JobRecord:
    overrides = _job_overrides(d)
    try:
        cfg = _read_config(d)
    except (OSError, yaml.YAMLError, ValueError) as e:
        name = "config.yaml" if (d / "config.yaml").is_file() else ".hydra/config.yaml"
        raise Unreadable(f"{d / name}: not valid YAML ({str(e).splitlines()[0]})") from None
    if cfg is not None and not isinstance(cfg, dict) and not OmegaConf.is_config(cfg):
        raise Unreadable(f"{d / 'config.yaml'}: expected a mapping, got {type(cfg).__name__}")
    info = _job_info(cfg) if cfg is not None else {}
    res_file = d / "results.json"
    if res_file.is_file():
        try:
            results = _read_json(res_file)
        except Unreadable as e:   # still attributed to its row (which then shows n=0/1)
            return JobRecord(_job_num(d), overrides, "unreadable", d, reason=str(e), info=info)
        failed = _failed_results(results)
        if failed:
            return JobRecord(_job_num(d), overrides, "failed", d, reason=failed, info=info)
        return JobRecord(_job_num(d), overrides, "ok", d, info=info, results=results)
    return JobRecord(_job_num(d), overrides, "failed", d, reason=_failure_reason(d), info=info)


def load_jobs(sweep_dir: str | Path, notes: list[str] | None = None) -> list[JobRecord]:
    """Every job of the sweep: the ones that ran (ok / failed), the ones whose files cannot be read
    (unreadable, the file named) and the expected ones that never started. ``notes`` collects problems
    with the launch itself (e.g. an unreadable multirun.yaml)."""
    sweep_dir = Path(sweep_dir)
    notes = [] if notes is None else notes
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep dir {sweep_dir} does not exist")
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name != "report" and (
        (p / ".hydra").is_dir() or (p / "results.json").is_file() or (p / "config.yaml").is_file())]
    dirs.sort(key=lambda p: (_job_num(p) is None, _job_num(p) or 0, p.name))
    records: list[JobRecord] = []
    for d in dirs:
        try:
            records.append(_read_job(d))
        except Unreadable as e:
            try:
                overrides = _job_overrides(d)
            except Unreadable:
                overrides = []
            records.append(JobRecord(_job_num(d), overrides, "unreadable", d, reason=str(e)))

    try:
        expected = _expected_jobs(sweep_dir)
    except Exception as e:  # noqa: BLE001 - the jobs that ran are still worth a table
        notes.append(f"{sweep_dir / 'multirun.yaml'}: could not list the launch's jobs ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); jobs that never started are not listed")
        expected = None
    if expected is not None:
        seen = {frozenset(r.overrides) for r in records}
        unreadable_nums = {r.num for r in records if r.status == "unreadable" and not r.overrides}
        for num, ovr in enumerate(expected):
            if frozenset(ovr) not in seen and num not in unreadable_nums:
                records.append(JobRecord(num, list(ovr), "missing", reason="no job dir: never started",
                                         info=_compose_missing(sweep_dir, list(ovr))))
        by_key = {frozenset(o): i for i, o in enumerate(expected)}
        for r in records:   # number jobs by their place in the launch, whatever their dir names say
            if frozenset(r.overrides) in by_key:
                r.num = by_key[frozenset(r.overrides)]
    records.sort(key=lambda r: (r.num is None, r.num if r.num is not None else 0))
    return records


# ----------------------------------------------------------------------------------------------- one row per job

#: results keys that describe how a score was obtained, not a score (``eval/code/<set>/confined``)
NOT_SCORES = frozenset({"confined"})
#: the metric a column label leaves out: cells are % accuracy unless the label names another metric
UNIT = "acc"
INFO = ["num", "status", "method", "model", "seed", "N", "r", "dir", "overrides", "reason"]


def jobs_frame(records: Sequence[JobRecord]) -> pd.DataFrame:
    """One row per job: its number, status, attribution (method, backbone, seed, N, r), dir, overrides, the
    reason it is not counted, then every ``eval/...`` and ``params/...`` value of its results.json."""
    rows = []
    for r in records:
        row = {"num": r.num, "status": r.status, **{k: r.info.get(k) for k in ("method", "model", "seed", "N", "r")},
               "dir": r.dir.name if r.dir else "", "overrides": " ".join(r.overrides), "reason": r.reason}
        row.update({k: v for k, v in r.results.items() if k.startswith(("eval/", "params/"))})
        rows.append(row)
    keys = list(dict.fromkeys(k for row in rows for k in row if k not in INFO))
    return pd.DataFrame(rows, columns=INFO + keys, dtype=object)


def _metric_parts(key: str) -> tuple[str, str | None, str] | None:
    """``eval/<task>/<set>/<metric>`` -> (task, set, metric); ``eval/<task>/<metric>`` -> (task, None, metric)."""
    parts = key.split("/")
    if parts[0] != "eval" or len(parts) not in (3, 4) or parts[-1] in NOT_SCORES:
        return None
    return (parts[1], parts[2], parts[3]) if len(parts) == 4 else (parts[1], None, parts[2])


def _natural(text: str) -> tuple:
    """pass@5 before pass@10."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", text) if t)


def primary_metric(task: str, keys: Iterable[str]) -> str | None:
    """The results key of ``task``'s headline metric among ``keys``: its mean over the sets
    (``eval/<task>/mean_<metric>``) when it reports one, else the first per-set metric in natural order
    (``pass@1`` before ``pass@10``). The one place that decides it (report columns and plots)."""
    mine = [(k, p) for k in keys if (p := _metric_parts(k)) and p[0] == task]
    means = [k for k, (_, s, m) in mine if s is None and m.startswith("mean_")]
    if means:
        return means[0]
    per_set = sorted((k for k, (_, s, _m) in mine if s is not None), key=lambda k: _natural(k.rsplit("/", 1)[1]))
    return per_set[0] if per_set else (mine[0][0] if mine else None)


def metric_columns(keys: Iterable[str], set_order: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(results key, label) of every score column, taken from the results keys themselves: per task, the sets
    of its primary metric (in the eval config's order), then its means over sets, then its other metrics."""
    order = {s: i for i, s in enumerate(dict.fromkeys(set_order))}
    tasks: dict[str, dict] = {}
    keys = list(dict.fromkeys(keys))
    for key in keys:
        if (p := _metric_parts(key)) is None:
            continue
        task, set_name, metric = p
        t = tasks.setdefault(task, {"sets": {}, "means": []})
        if set_name is None:
            t["means"].append(metric)
        else:
            t["sets"].setdefault(metric, []).append(set_name)
    out = []
    for task, t in tasks.items():
        head = primary_metric(task, keys)
        first = head.rsplit("/", 1)[1] if head else None
        if head and head.count("/") == 2 and first.startswith("mean_"):
            first = first[len("mean_"):]
        n_sets = len({s for sets in t["sets"].values() for s in sets})
        prefix = f"{task} " if len(tasks) > 1 else ""

        def label(set_name: str, metric: str) -> str:
            shown = None if metric == UNIT else (f"({metric[len(UNIT) + 1:]})" if metric.startswith(f"{UNIT}_") else metric)
            return " ".join(x for x in (set_name if n_sets > 1 or shown is None else None, shown) if x)

        def per_set(metric: str) -> list[tuple[str, str]]:
            sets = sorted(t["sets"][metric], key=lambda s: (order.get(s, len(order)), s))
            return [(f"eval/{task}/{s}/{metric}", label(s, metric)) for s in sets]

        if first in t["sets"]:
            out += per_set(first)
        for mean in t["means"]:
            of = mean[len("mean_"):] if mean.startswith("mean_") else None
            if of is not None and len(t["sets"].get(of, ())) < 2:
                continue   # the mean of one set is that set's column
            name = mean if of is None else "Avg." if of == UNIT else f"Avg. {of}"
            out.append((f"eval/{task}/{mean}", prefix + name))
        for metric in sorted((m for m in t["sets"] if m != first), key=_natural):
            out += per_set(metric)
    return out


# ----------------------------------------------------------------------------------------------- the table

@dataclass
class Column:
    model: str | None
    key: str          # results.json key
    label: str


@dataclass
class Table:
    title: str
    axes: list[str]                    # e.g. ["N"]
    models: list[str | None]
    columns: list[Column]
    jobs: pd.DataFrame                 # one row per job (jobs_frame)
    cells: pd.DataFrame                # index: method (+ axes); columns: (model, key, mean|std|n|expected), params
    records: list[JobRecord]
    notes: list[str] = field(default_factory=list)   # problems with the launch itself


def _num_sort(v):
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def build_table(records: list[JobRecord], title: str = "") -> Table:
    jobs = jobs_frame(records)
    attributed = jobs[jobs["method"].notna()].assign(model=lambda f: f["model"].fillna("?"))
    # an axis is a row key when some method takes several values of it in this sweep
    axes = [a for a, _ in AXES if attributed.dropna(subset=[a]).groupby("method")[a].nunique().gt(1).any()]
    models = list(dict.fromkeys(attributed["model"]))
    ok = attributed[attributed["status"] == "ok"]
    set_order = [s for r in records for s in (r.info.get("eval_sets") or [])]
    metrics = metric_columns([k for k in ok.columns if k not in INFO and ok[k].notna().any()], set_order)
    keys = [k for k, _ in metrics]
    multi = len(models) > 1
    columns = [Column(m, key, f"{m}: {label}" if multi else label) for m in models for key, label in metrics]

    by = ["method", *axes, "model"]
    grouped = lambda frame: frame.groupby(by, dropna=False, sort=False)  # noqa: E731
    expected = grouped(attributed).size()
    parts: dict[tuple, pd.Series] = {}
    if keys:
        numeric = ok[by].join(ok[keys].apply(pd.to_numeric, errors="coerce"))
        stats = grouped(numeric)[keys].agg(["mean", "std", "count"]).reindex(expected.index)
        for k in keys:   # std: sample std (ddof=1), NaN for one seed
            parts.update({(k, "mean"): stats[(k, "mean")], (k, "std"): stats[(k, "std")],
                          (k, "n"): stats[(k, "count")].fillna(0), (k, "expected"): expected})
    params = (grouped(ok)["params/trainable"].apply(lambda s: sorted({int(v) for v in s.dropna()}))
              if len(ok) and "params/trainable" in ok else pd.Series(dtype=object))
    parts[("params", "")] = params.reindex(expected.index)
    cells = pd.DataFrame(parts, index=expected.index).unstack("model")   # one block of columns per backbone
    cells.columns = cells.columns.reorder_levels([2, 0, 1])             # (model, key, stat)
    # rows: the sweep's method order; within a method, ascending axis values
    first = {m: i for i, m in enumerate(dict.fromkeys(attributed["method"]))}
    cells = cells.reindex(sorted(cells.index, key=lambda k: (first[k[0]], *map(_num_sort, k[1:])) if axes
                                 else first[k]))
    return Table(title, axes, models, columns, jobs, cells, records)


def fmt_params(values: list[int]) -> str:
    if not values:
        return "–"
    f = lambda n: f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n else "0"  # noqa: E731  (0: base model)
    return f(values[0]) if len(values) == 1 else f"{f(values[0])}–{f(values[-1])}"


def fmt_cell(mean: float, std: float, n: int, expected: int) -> str:
    if n == 0 or pd.isna(mean):
        return f"– (0/{expected})" if expected else "–"
    text = f"{100 * mean:.2f}" + ("" if pd.isna(std) else f" ± {100 * std:.2f}")
    return text + (f" (n={n}/{expected})" if n < expected else "")


def _cell(t: Table, row, model, key: str, stat: str):
    value = t.cells.loc[row, (model, key, stat)]
    return int(0 if pd.isna(value) else value) if stat in ("n", "expected") else value


def _params(t: Table, row, model) -> list[int]:
    value = t.cells.loc[row, (model, "params", "")]
    return value if isinstance(value, list) else []


def _row_keys(t: Table, row) -> list:
    """method and axis values of a row (a missing axis value: "–")."""
    return [row] if not t.axes else [row[0], *("–" if pd.isna(v) else v for v in row[1:])]


def display_frame(t: Table) -> pd.DataFrame:
    """The table as shown in table.md: one string per cell."""
    out = []
    for row in t.cells.index:
        line = dict(zip(["Method", *t.axes], (str(v) for v in _row_keys(t, row))))
        for m in t.models:
            line[f"{m}: Params" if len(t.models) > 1 else "Params"] = fmt_params(_params(t, row, m))
            for c in (c for c in t.columns if c.model == m):
                line[c.label] = fmt_cell(*(_cell(t, row, m, c.key, s) for s in ("mean", "std", "n", "expected")))
        out.append(line)
    return pd.DataFrame(out, columns=list(out[0]) if out else ["Method"])


def to_markdown(t: Table) -> str:
    shown = display_frame(t)
    table = shown.to_markdown(index=False, colalign=["left"] + ["right"] * (shown.shape[1] - 1),
                                                  disable_numparse=True) if len(shown) else ""
    status = t.jobs["status"]
    counts = {s: int((status == s).sum()) for s in ("ok", "failed", "missing", "unreadable")}
    seeds = sorted(t.jobs["seed"].dropna().unique(), key=_num_sort)
    out = [f"# {t.title}" if t.title else "", "",
           f"{len(t.jobs)} jobs: {counts['ok']} ok, {counts['failed']} failed, {counts['missing']} missing"
           f"{f', {n} unreadable' if (n := counts['unreadable']) else ''}; "
           f"seeds {', '.join(map(str, seeds)) or '–'}. Cells: % (accuracy unless the column names another metric, "
           "e.g. pass@k), mean ± sample std over seeds; (n=a/b): only a of the row's b jobs have results. "
           "Params: trainable parameters.", "", table]
    if t.notes:
        out += ["", *(f"Note: {n}" for n in t.notes)]
    bad = t.jobs[t.jobs["status"] != "ok"]
    if len(bad):
        listed = pd.DataFrame({"#": bad["num"].map(lambda n: "" if n is None or pd.isna(n) else str(n)),
                               "status": bad["status"], "job": bad["dir"].where(bad["dir"] != "", bad["overrides"]),
                               "reason": bad["reason"]})
        out += ["", "## Missing or failed jobs (not in the averages)", "",
                listed.to_markdown(index=False, colalign=["right", "left", "left", "left"], disable_numparse=True)]
    return "\n".join(out).lstrip("\n") + "\n"


def csv_frame(t: Table) -> pd.DataFrame:
    """table.csv: per cell mean and std in % (4 decimals, empty when undefined) and n as 'a/b'."""
    multi = len(t.models) > 1
    out = []
    for row in t.cells.index:
        line = dict(zip(["method", *t.axes], _row_keys(t, row)))
        for m in t.models:
            ps = _params(t, row, m)
            line[f"{m}: params_trainable" if multi else "params_trainable"] = \
                ps[0] if len(ps) == 1 else ";".join(map(str, ps))
            for c in (c for c in t.columns if c.model == m):
                mean, std, n, expected = (_cell(t, row, m, c.key, s) for s in ("mean", "std", "n", "expected"))
                line[f"{c.label} mean"] = "" if pd.isna(mean) else round(100 * mean, 4)
                line[f"{c.label} std"] = "" if pd.isna(std) else round(100 * std, 4)
                line[f"{c.label} n"] = f"{n}/{expected}"
        out.append(line)
    return pd.DataFrame(out, dtype=object)


def to_csv(t: Table) -> str:
    return csv_frame(t).to_csv(index=False)


def jobs_csv(t: Table) -> str:
    return t.jobs.to_csv(index=False)


# ----------------------------------------------------------------------------------------------- plots

def _headline(t: Table, model: str | None) -> Column | None:
    cols = [c for c in t.columns if c.model == model]
    tasks = list(dict.fromkeys(_metric_parts(c.key)[0] for c in cols))
    head = primary_metric(tasks[0], [c.key for c in cols]) if tasks else None
    return next((c for c in cols if c.key == head), None)


def plot_axes(t: Table, out_dir: Path) -> list[Path]:
    """accuracy_vs_<axis>.png (the headline metric, error bars: sample std over seeds) and
    params_vs_<axis>.png, one line per method (and backbone)."""
    if not t.axes:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = []
    for row in t.cells.index:
        keys = dict(zip(["method", *t.axes], _row_keys(t, row)))
        for m in t.models:
            col = _headline(t, m)
            ps = _params(t, row, m)
            long.append({**keys, "model": m, "label": keys["method"] if len(t.models) == 1 else f"{keys['method']} ({m})",
                         "accuracy": 100 * _cell(t, row, m, col.key, "mean") if col else float("nan"),
                         "err": 100 * _cell(t, row, m, col.key, "std") if col else float("nan"),
                         "params": ps[0] / 1e6 if ps else float("nan"),
                         "ylabel": f"{_metric_parts(col.key)[0]}: {col.label.split(': ')[-1]} (%)" if col else ""})
    points = pd.DataFrame(long)
    written = []
    for axis in t.axes:
        data = points[points[axis].map(lambda v: isinstance(v, (int, float)) and not pd.isna(v))]
        for kind, ylabel in (("accuracy", next((y for y in data["ylabel"] if y), "accuracy (%)")),
                             ("params", "trainable parameters (M)")):
            fig, ax = plt.subplots(figsize=(5.5, 4))
            for label, line in data.dropna(subset=[kind]).groupby("label", sort=False):
                line = line.sort_values(axis)
                if kind == "accuracy":
                    ax.errorbar(line[axis], line[kind], yerr=line["err"].fillna(0.0), marker="o", capsize=3,
                                label=label)
                else:
                    ax.plot(line[axis], line[kind], marker="o", label=label)
            values = sorted(set(data[axis]))
            if values and min(values) > 0 and max(values) / min(values) >= 4:
                ax.set_xscale("log", base=2)
            if values:
                ax.set_xticks(values)
                ax.set_xticklabels([str(v) for v in values])
            ax.set_xlabel({"N": "experts N", "r": "rank r"}.get(axis, axis))
            ax.set_ylabel(ylabel)
            ax.set_title(f"{t.title}: {kind} vs {axis}" if t.title else f"{kind} vs {axis}")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            fig.tight_layout()
            path = out_dir / f"{kind}_vs_{axis}.png"
            tmp = path.with_name(f".{path.name}.tmp.png")
            fig.savefig(tmp, dpi=120)
            plt.close(fig)
            tmp.replace(path)
            written.append(path)
    return written


# ----------------------------------------------------------------------------------------------- entry

def _title(sweep_dir: Path) -> str:
    multirun = sweep_dir / "multirun.yaml"
    name = None
    if multirun.is_file():
        try:
            name = _lookup(yaml.safe_load(multirun.read_text()) or {}, "sweep.name")
        except (OSError, yaml.YAMLError):   # load_jobs notes it
            name = None
    return f"{name or sweep_dir.name} ({sweep_dir.name})" if name and name != sweep_dir.name else (name or sweep_dir.name)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Build and write the report; returns {"table": Table, "markdown": str, "files": [paths]}."""
    sweep_dir = Path(sweep_dir)
    notes: list[str] = []
    records = load_jobs(sweep_dir, notes)
    title = _title(sweep_dir)
    if title.split(" ")[0].endswith("_tiny"):
        notes.append("a _tiny twin checks the wiring, not the methods: a few optimizer steps on a random-init "
                     "backbone leave the loss near its start, so these accuracies are noise, not a comparison")
    table = build_table(records, title)
    table.notes = notes
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(table)
    files = [out / "table.md", out / "table.csv", out / "jobs.csv"]
    _write(files[0], md)
    _write(files[1], to_csv(table))
    _write(files[2], jobs_csv(table))
    files += plot_axes(table, out)
    return {"table": table, "markdown": md, "files": files}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comol.tools.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a sweep or multirun dir (holding the job dirs and multirun.yaml)")
    parser.add_argument("--out", default=None, help="where to write (default: <sweep dir>/report)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a job is missing or failed")
    args = parser.parse_args(argv)
    try:
        result = report(args.sweep_dir, args.out)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    for f in result["files"]:
        print(f"wrote {f}")
    if not result["table"].records:
        print(f"error: no jobs found under {args.sweep_dir}", file=sys.stderr)
        return 2
    bad = [r for r in result["table"].records if r.status != "ok"]
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
