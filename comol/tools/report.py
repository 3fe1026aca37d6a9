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

import csv
import io
import json
import math
import re
import statistics
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from comol.eval.tasks import load_plugins, split_metric_key, task_class

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
    from omegaconf import DictConfig, OmegaConf

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
            "eval_sets": list((get("eval.sets") or {}).keys()), "adapter": get("adapter.name"),
            "plugins": get("plugins") or []}
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
        import comol.config  # noqa: F401  (${comol_root:})
        from omegaconf import OmegaConf

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
    from comol.tools.sweeps import overrides_from_multirun_yaml

    return overrides_from_multirun_yaml(multirun)


def _compose_missing(sweep_dir: Path, overrides: list[str]) -> dict:
    """Row attribution for a job that never started: compose its config as the launcher would."""
    try:
        from omegaconf import OmegaConf

        from comol.tools.sweeps import _hydra

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
    from comol.run_dir import read_claim

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
    if cfg is not None and not isinstance(cfg, dict) and not OmegaConf_is_config(cfg):
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


def OmegaConf_is_config(obj: Any) -> bool:  # noqa: N802 - a lazy import of OmegaConf.is_config
    from omegaconf import OmegaConf

    return OmegaConf.is_config(obj)


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
    rows: list[dict]                   # method, axis values, per-model params, per-column values
    records: list[JobRecord]
    notes: list[str] = field(default_factory=list)   # problems with the launch itself


def _ordered_metric_keys(records: list[JobRecord]) -> list[tuple[str, str]]:
    """(results key, label) of every metric column, in the eval config's set order."""
    found: "OrderedDict[str, dict]" = OrderedDict()   # task -> {"sets": [...], "mean": bool, "robust": [...], "pass": {set: [k]}}
    set_order: dict[str, int] = {}
    new = lambda: {"sets": [], "mean": False, "robust": [], "pass": OrderedDict(), "other": [], "summary": []}  # noqa: E731
    for r in records:
        load_plugins(r.info.get("plugins"))   # a job's plug-in tasks declare their metric names too
        for i, s in enumerate(r.info.get("eval_sets") or []):
            set_order.setdefault(s, i)
    for r in records:
        if r.status != "ok":
            continue
        for key in r.results:
            m = split_metric_key(key)   # (task, set or None, metric) of a metric the task declares
            if m is None:
                continue
            t = found.setdefault(m[0], new())
            m = {"task": m[0], "set": m[1], "metric": m[2]}
            if m["set"] is None:
                if m["metric"] == "mean_acc":
                    t["mean"] = True
                elif m["metric"] not in t["summary"]:
                    t["summary"].append(m["metric"])
            else:
                if m["metric"] == "acc" and m["set"] not in t["sets"]:
                    t["sets"].append(m["set"])
                elif m["metric"] == "acc_robust" and m["set"] not in t["robust"]:
                    t["robust"].append(m["set"])
                elif m["metric"].startswith("pass@"):
                    ks = t["pass"].setdefault(m["set"], [])
                    k = int(m["metric"][5:])
                    if k not in ks:
                        ks.append(k)
                elif m["metric"] not in ("acc", "acc_robust") and not m["metric"].startswith("pass@") \
                        and (m["set"], m["metric"]) not in t["other"]:
                    t["other"].append((m["set"], m["metric"]))
    out = []
    for task, t in found.items():
        for s in sorted(t["sets"], key=lambda s: (set_order.get(s, 1 << 20), s)):
            out.append((f"eval/{task}/{s}/acc", s))
        if t["mean"] and len(t["sets"]) > 1:
            out.append((f"eval/{task}/mean_acc", "Avg." if len(found) == 1 else f"{task} Avg."))
        for s, ks in t["pass"].items():
            for k in sorted(ks):
                out.append((f"eval/{task}/{s}/pass@{k}", f"pass@{k}" if len(t["pass"]) == 1 else f"{s} pass@{k}"))
        for s in t["robust"]:
            out.append((f"eval/{task}/{s}/acc_robust", f"{s} (robust)"))
        for s, metric in sorted(t["other"], key=lambda sm: (set_order.get(sm[0], 1 << 20), sm)):
            out.append((f"eval/{task}/{s}/{metric}", f"{s} {metric}"))
        for metric in t["summary"]:
            out.append((f"eval/{task}/{metric}", f"{task} {metric}"))
    return out


def build_table(records: list[JobRecord], title: str = "") -> Table:
    attributed = [r for r in records if r.info.get("method")]
    # an axis is a row key when some method takes several values of it in this sweep
    axes = []
    for label, _ in AXES:
        per_method: dict[str, set] = {}
        for r in attributed:
            if r.info.get(label) is not None:
                per_method.setdefault(r.info["method"], set()).add(r.info[label])
        if any(len(v) > 1 for v in per_method.values()):
            axes.append(label)
    models = list(OrderedDict.fromkeys(r.info.get("model") for r in attributed))
    multi = len(models) > 1
    metrics = _ordered_metric_keys(records)
    columns = [Column(m, key, f"{m}: {label}" if multi else label) for m in models for key, label in metrics]

    def row_key(r):
        return (r.info["method"], *(r.info.get(a) for a in axes))

    groups: "OrderedDict[tuple, list[JobRecord]]" = OrderedDict()
    for r in sorted(attributed, key=lambda r: (r.num is None, r.num or 0)):
        groups.setdefault(row_key(r), []).append(r)
    # keep the sweep's method order; within a method, ascending axis values
    method_order = list(OrderedDict.fromkeys(k[0] for k in groups))
    keys = sorted(groups, key=lambda k: (method_order.index(k[0]), *(_num_sort(v) for v in k[1:])))
    rows = []
    for k in keys:
        jobs = groups[k]
        row = {"method": k[0], **{a: v for a, v in zip(axes, k[1:])}, "cells": {}, "params": {}, "jobs": jobs}
        for m in models:
            mine = [j for j in jobs if j.info.get("model") == m]
            ok = [j for j in mine if j.status == "ok"]
            params = sorted({j.results["params/trainable"] for j in ok if "params/trainable" in j.results})
            row["params"][m] = params
            for col in (c for c in columns if c.model == m):
                vals = [float(j.results[col.key]) for j in ok if col.key in j.results]
                row["cells"][(m, col.key)] = {"values": vals, "expected": len(mine)}
        rows.append(row)
    return Table(title, axes, models, columns, rows, records)


def _num_sort(v):
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt_params(values: list[int]) -> str:
    if not values:
        return "–"
    f = lambda n: f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n else "0"  # noqa: E731  (0: base model)
    return f(values[0]) if len(values) == 1 else f"{f(values[0])}–{f(values[-1])}"


def fmt_cell(cell: dict) -> str:
    vals, expected = cell["values"], cell["expected"]
    mean, std = mean_std(vals)
    if mean is None:
        return f"– (0/{expected})" if expected else "–"
    text = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
    if len(vals) < expected:
        text += f" (n={len(vals)}/{expected})"
    return text


def to_markdown(t: Table) -> str:
    multi = len(t.models) > 1
    head = ["Method", *t.axes]
    for m in t.models:
        head.append(f"{m}: Params" if multi else "Params")
        head += [c.label for c in t.columns if c.model == m]
    align = ["---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for row in t.rows:
        cells = [row["method"], *(str(row[a]) for a in t.axes)]
        for m in t.models:
            cells.append(fmt_params(row["params"][m]))
            cells += [fmt_cell(row["cells"][(m, c.key)]) for c in t.columns if c.model == m]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s: sum(r.status == s for r in t.records) for s in ("ok", "failed", "missing", "unreadable")}
    seeds = sorted({r.info.get("seed") for r in t.records if r.info.get("seed") is not None}, key=_num_sort)
    out = [f"# {t.title}" if t.title else "", "",
           f"{len(t.records)} jobs: {counts['ok']} ok, {counts['failed']} failed, {counts['missing']} missing"
           f"{f', {n} unreadable' if (n := counts['unreadable']) else ''}; "
           f"seeds {', '.join(map(str, seeds)) or '–'}. Cells: % (accuracy or pass@k), mean ± sample std over seeds; "
           "(n=a/b): only a of the row's b jobs have results. Params: trainable parameters.", "", *lines]
    if t.notes:
        out += ["", *(f"Note: {n}" for n in t.notes)]
    bad = [r for r in t.records if r.status != "ok"]
    if bad:
        out += ["", "## Missing or failed jobs (not in the averages)", "", "| # | status | job | reason |",
                "|---:|---|---|---|"]
        for r in bad:
            where = r.dir.name if r.dir else " ".join(r.overrides)
            out.append(f"| {'' if r.num is None else r.num} | {r.status} | {where} | {r.reason} |")
    return "\n".join(out).lstrip("\n") + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    multi = len(t.models) > 1
    head = ["method", *t.axes]
    for m in t.models:
        p = f"{m}: " if multi else ""
        head.append(f"{p}params_trainable")
        for c in (c for c in t.columns if c.model == m):
            head += [f"{c.label} mean", f"{c.label} std", f"{c.label} n"]
    w.writerow(head)
    for row in t.rows:
        line = [row["method"], *(row[a] for a in t.axes)]
        for m in t.models:
            ps = row["params"][m]
            line.append(ps[0] if len(ps) == 1 else ";".join(map(str, ps)))
            for c in (c for c in t.columns if c.model == m):
                cell = row["cells"][(m, c.key)]
                mean, std = mean_std(cell["values"])
                line += ["" if mean is None else round(100 * mean, 4), "" if std is None else round(100 * std, 4),
                         f"{len(cell['values'])}/{cell['expected']}"]
        w.writerow(line)
    return buf.getvalue()


def jobs_csv(t: Table) -> str:
    keys = list(OrderedDict.fromkeys(k for r in t.records for k in r.results if k.startswith(("eval/", "params/"))))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["num", "status", "method", "model", "seed", "N", "r", "dir", "overrides", "reason", *keys])
    for r in t.records:
        w.writerow([r.num, r.status, r.info.get("method"), r.info.get("model"), r.info.get("seed"), r.info.get("N"),
                    r.info.get("r"), r.dir.name if r.dir else "", " ".join(r.overrides), r.reason,
                    *(r.results.get(k, "") for k in keys)])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- plots

def _headline(t: Table, model: str | None) -> Column | None:
    cols = [c for c in t.columns if c.model == model]

    def primary(c: Column) -> bool:   # the column of its task's primary metric
        m = split_metric_key(c.key)
        return m is not None and m[2] == task_class(m[0]).primary_metric

    for pick in (primary, lambda c: True):
        hit = [c for c in cols if pick(c) and not c.key.endswith("acc_robust")]
        if hit:
            return hit[0]
    return None


def _metric_label(col: Column) -> str:
    parts = col.key.split("/")          # eval/<task>/mean_acc | eval/<task>/<set>/<metric>
    if parts[-1] == "mean_acc":
        return f"{parts[1]} mean accuracy (%)"
    if len(parts) == 3:
        return f"{parts[1]} {parts[2]} (%)"
    return f"{parts[2]} {parts[3]} (%)" if len(parts) == 4 else f"{col.label} (%)"


def plot_axes(t: Table, out_dir: Path) -> list[Path]:
    """accuracy_vs_<axis>.png and params_vs_<axis>.png, one line per method (and backbone)."""
    if not t.axes:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis in t.axes:
        for kind in ("accuracy", "params"):
            fig, ax = plt.subplots(figsize=(5.5, 4))
            ylabel = "trainable parameters (M)"
            for model in t.models:
                col = _headline(t, model)
                lines: "OrderedDict[str, list]" = OrderedDict()
                for row in t.rows:
                    if row.get(axis) is None:
                        continue
                    if kind == "accuracy":
                        if col is None:
                            continue
                        mean, std = mean_std(row["cells"][(model, col.key)]["values"])
                        if mean is None:
                            continue
                        point = (row[axis], 100 * mean, 100 * (std or 0.0))
                    else:
                        ps = row["params"][model]
                        if not ps:
                            continue
                        point = (row[axis], ps[0] / 1e6, 0.0)
                    lines.setdefault(row["method"], []).append(point)
                if kind == "accuracy" and col is not None:
                    ylabel = _metric_label(col)
                for method, pts in lines.items():
                    pts.sort()
                    xs, ys, es = zip(*pts)
                    label = method if len(t.models) == 1 else f"{method} ({model})"
                    if kind == "accuracy":
                        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
                    else:
                        ax.plot(xs, ys, marker="o", label=label)
            values = sorted({row[axis] for row in t.rows if isinstance(row.get(axis), (int, float))})
            if values and min(values) > 0 and max(values) / min(values) >= 4:
                ax.set_xscale("log", base=2)
            if values:
                ax.set_xticks(values)
                ax.set_xticklabels([str(v) for v in values])
            ax.set_xlabel({"N": "experts N", "r": "rank r"}.get(axis, axis))
            ax.set_ylabel("accuracy (%)" if kind == "accuracy" and ylabel.startswith("trainable") else ylabel)
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
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    strict = "--strict" in args
    args = [a for a in args if a != "--strict"]
    out = None
    if "--out" in args:
        i = args.index("--out")
        if i + 1 >= len(args):
            print("error: --out needs a directory", file=sys.stderr)
            return 2
        out = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        print("error: expected one sweep dir: python -m comol.tools.report <sweep dir> [--out DIR] [--strict]", file=sys.stderr)
        return 2
    try:
        result = report(args[0], out)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    for f in result["files"]:
        print(f"wrote {f}")
    bad = [r for r in result["table"].records if r.status != "ok"]
    if not result["table"].records:
        print(f"error: no jobs found under {args[0]}", file=sys.stderr)
        return 2
    return 1 if strict and bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
