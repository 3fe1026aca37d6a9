"""Routing pictures of a saved adapter (docs/routing.md).

    python -m comol.routing <adapter dir> [eval set] [--rows N] [--batch-size B] [--out DIR] [--module NAME]

Loads the backbone named in the adapter's config and the adapter, runs teacher-forced forwards of
the prompts of ``--rows`` rows of an evaluation set (batched and left-padded as in generation,
padding excluded from every number) with routing statistics on, and writes to ``--out``
(default: ``routing/`` beside the adapter dir, i.e. inside its run dir):

* ``loads.png``: per projection type, a layer x expert heatmap of the loads (``load · N``: 1 = uniform);
* ``entropy.png``: normalised routing entropy by layer, one line per projection type;
* ``gates_prompt0.png``: the per-token expert weights of the first row's prompt for one module;
* ``cores.png`` (CoMoL, CoMoL-sh): pairwise cosine similarity of the N cores of the middle layer's
  modules, and the effective rank of the merged core by layer;
* ``routing.json``: every number shown, with the definitions.

Eval sets: ``toy_math`` (the held-out rows of the toy split the adapter was trained on),
``math/<name>``, ``commonsense/<name>``, ``code/humaneval`` (files of the data dir), or a path to a
.json/.jsonl file of rows with ``instruction``. Default: ``toy_math`` for an adapter trained on it,
``code/humaneval`` for one trained on codealpaca20k, else ``math/gsm8k``.

Definitions of load, entropy, dead experts and max load ratio: comol/adapters/routing_stats.py.
The core numbers are defined here:

* ``cosine[i][j]``: cosine similarity of cores M_i and M_j flattened to r² vectors.
* ``merged_effective_rank``: effective rank (Roy & Vetterli, 2007) of the gate-weighted mean core
  M̄ = sum_i ḡ_i M_i, ḡ_i = the mean gate of expert i over the non-padding tokens (its load), which
  by linearity is the mean over tokens of the per-token merged cores. erank(M) = exp(H(p)),
  p_k = σ_k / sum_j σ_j over the singular values σ of M, H the Shannon entropy (natural log);
  it lies in [1, r] (0 for the zero matrix).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from comol.errors import ComolError, DataError
from comol.models.routing_figures import (_integer_ticks, _pyplot, _save, by_projection, loads_figure,  # noqa: F401
                                          modules_of_loads, split_name)

DEFAULT_ROWS = 32
#: the eval set used for an adapter trained on a dataset of this name (others: DEFAULT_SET)
SET_FOR_DATASET = {"codealpaca20k": "code/humaneval", "math14k": "math/gsm8k"}
DEFAULT_SET = "math/gsm8k"
DEFINITIONS = {
    "load": "per expert: mean over non-padding tokens of its share of the token's weights (weights normalised to "
            "sum 1 per token); top-k / threshold routers: share of the selections (gate_mass keeps the weights' share)",
    "entropy": "mean over non-padding tokens of the entropy of the router's distribution divided by log N "
               "(1 = uniform, 0 = one expert per token)",
    "dead_experts": "experts whose load is below 0.1 / N",
    "max_load_ratio": "max load / min load, the min floored at 1e-6 / N",
    "cosine": "cosine similarity of two r x r cores flattened to vectors",
    "merged_effective_rank": "exp(entropy of sigma / sum(sigma)) (Roy & Vetterli 2007) for the singular values sigma "
                             "of the load-weighted mean core sum_i load_i M_i (= mean over tokens of the merged cores)",
    "expert_effective_ranks": "the same effective rank of each core M_i alone",
}


class NothingRouted(ComolError):
    """The adapter has no router: there is nothing to plot."""


# --- numbers ----------------------------------------------------------------------------

def effective_rank(matrix: torch.Tensor) -> float:
    """exp(H(p)), p = singular values / their sum (Roy & Vetterli 2007); 0 for the zero matrix."""
    s = torch.linalg.svdvals(matrix.detach().double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def cosine_matrix(cores: torch.Tensor) -> torch.Tensor:
    """[N, N] cosine similarities of the N cores [N, r, r] flattened."""
    flat = F.normalize(cores.detach().double().flatten(1), dim=1)
    return flat @ flat.T




def core_numbers(model: torch.nn.Module, loads: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Per CoMoL module: cosine matrix of its cores, effective ranks of each core and of the merged mean core."""
    from comol.adapters.comol import CoMoLLinear

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, CoMoLLinear) or name not in loads:
            continue
        cores = module.adapter_cores.detach().double().cpu()
        gbar = torch.tensor(loads[name]["load"], dtype=torch.float64)  # softmax gates: load = mean gate
        cos = cosine_matrix(cores)
        n = cos.shape[0]
        off = cos[~torch.eye(n, dtype=torch.bool)]
        out[name] = {
            "r": int(cores.shape[-1]),
            "cosine": cos.tolist(),
            "mean_offdiag_cosine": float(off.mean()) if n > 1 else None,
            "max_offdiag_cosine": float(off.max()) if n > 1 else None,
            "merged_effective_rank": effective_rank(torch.einsum("i,iab->ab", gbar, cores)),
            "expert_effective_ranks": [effective_rank(c) for c in cores],
        }
    return out


@torch.no_grad()
def routing_numbers(model: torch.nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 8,
                    max_length: int = 1024, module: str | None = None) -> dict[str, Any]:
    """Run the prompts (left-padded batches, teacher forcing) with routing statistics on; every number of
    routing.json: per-module loads / entropy / dead experts / max load ratio, the run summaries, the
    per-token weights of ``prompts[0]`` for ``module`` (default: the middle layer's first routed module)
    and, for CoMoL, the core numbers."""
    from comol.adapters import adapter_context

    ctx = adapter_context(model)
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    enc_kw = {"return_tensors": "pt", "padding": True, "truncation": True, "max_length": max_length}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    tokens = 0
    try:
        with ctx.routing.collecting() as stats:
            for start in range(0, len(order), batch_size):
                enc = tokenizer([prompts[i] for i in order[start:start + batch_size]], **enc_kw).to(device)
                model(**enc, logits_to_keep=1)
                tokens += int(enc["attention_mask"].sum())
            loads, summary = stats.loads(), stats.summary()
        if not loads:
            return {"tokens": tokens, "modules": {}}
        with ctx.routing.collecting(), ctx.routing.capturing() as captured:
            enc = tokenizer([prompts[0]], **enc_kw).to(device)
            model(**enc, logits_to_keep=1)
    finally:
        model.train(was_training)
    modules = {name: {**entry, **{k: summary[f"routing/{name}/{k}"] for k in ("entropy", "dead_experts", "max_load_ratio")}}
               for name, entry in modules_of_loads(loads).items()}
    if module is None:
        layers = sorted({m["layer"] for m in modules.values() if m["layer"] is not None})
        middle = layers[len(layers) // 2] if layers else None
        module = next(n for n, m in modules.items() if m["layer"] == middle)
    if module not in captured:
        raise ComolError(f"--module {module!r} is not a routed module of this adapter; routed modules: "
                         f"{', '.join(list(modules)[:6])}{', ...' if len(modules) > 6 else ''}")
    weights = captured[module][0][0].cpu()
    ids = enc["input_ids"][0].tolist()
    result = {
        "tokens": tokens,
        "summary": {k: v for k, v in summary.items() if k.count("/") == 1},
        "modules": modules,
        "gates_prompt0": {"module": module, "prompt": prompts[0],
                          "tokens": [tokenizer.decode([i]) for i in ids] if weights.shape[0] == len(ids) else None,
                          "weights": weights.tolist()},
    }
    cores = core_numbers(model, loads)
    if cores:
        result["cores"] = cores
    return result


# --- rows -------------------------------------------------------------------------------

def default_set(meta: dict) -> str:
    trained_on = meta.get("dataset") or {}
    if trained_on.get("source") == "toy_math":
        return "toy_math"
    return SET_FOR_DATASET.get(trained_on.get("name"), DEFAULT_SET)


def eval_prompts(spec: str, meta: dict, rows: int) -> list[str]:
    """The prompts of the first ``rows`` rows of eval set ``spec`` (see the module docstring)."""
    from comol.data.prompts import build_prompt
    from comol.eval.eval_files import commonsense_file, humaneval_file, load_eval_rows, load_humaneval, math_file

    kind, _, name = spec.partition("/")
    if spec == "toy_math":
        from comol.data import dataset_splits

        trained_on = meta.get("dataset") or {}
        if trained_on.get("source") != "toy_math":
            from omegaconf import OmegaConf

            from comol.config import compose

            trained_on = OmegaConf.to_container(compose(["dataset=toy_math"]).dataset, resolve=True)
        data = dataset_splits(trained_on).get("test") or []
    elif kind in ("math", "commonsense") and name:
        path = (math_file if kind == "math" else commonsense_file)(name)
        if not path.is_file():
            raise DataError(f"eval set {spec!r}: {path} does not exist")
        data = load_eval_rows(path, required=("instruction",))
    elif spec == "code/humaneval":
        data = [{"prompt": p["prompt"]} for p in load_humaneval(humaneval_file())]
    elif Path(spec).suffix in (".json", ".jsonl") and Path(spec).is_file():
        data = load_eval_rows(spec, required=("instruction",))
    else:
        raise DataError(f"eval set {spec!r} is unknown: expected toy_math, math/<name>, commonsense/<name>, "
                        f"code/humaneval or an existing .json/.jsonl file")
    if not data:
        raise DataError(f"eval set {spec!r} has no rows")
    return [r["prompt"] if "prompt" in r else build_prompt(r) for r in data[:rows]]


# --- pictures ---------------------------------------------------------------------------











def plot_loads(plt, numbers: dict, path: Path) -> Path:
    fig = loads_figure(plt, numbers["modules"], f"expert load x N (1 = uniform), {numbers['tokens']} prompt tokens")
    out = _save(fig, path)
    plt.close(fig)
    return out




def plot_entropy(plt, numbers: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for proj, entries in by_projection(numbers["modules"]).items():
        ax.plot([layer for layer, _ in entries], [numbers["modules"][n]["entropy"] for _, n in entries],
                marker="o", label=proj)
    ax.set_ylim(0, 1.05)
    _integer_ticks(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("entropy / log N")
    ax.set_title(f"routing entropy (mean {numbers['summary']['routing/mean_entropy']:.3f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_gates(plt, numbers: dict, path: Path) -> Path:
    gates = numbers["gates_prompt0"]
    w = torch.tensor(gates["weights"])
    t, n = w.shape
    fig, ax = plt.subplots(figsize=(max(3.5, 0.35 * n + 2), min(60.0, max(2.5, 0.16 * t + 1.2))))
    im = ax.imshow(w.numpy(), aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_xticks(range(n))
    if gates["tokens"]:
        labels = [repr(tok)[1:-1] for tok in gates["tokens"]]
        ax.set_yticks(range(t), labels, fontsize=6)
    else:
        ax.set_ylabel("position")
    ax.set_title(f"{gates['module']}\nexpert weights per token of prompt 0", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_cores(plt, numbers: dict, path: Path) -> Path:
    cores = numbers["cores"]
    modules = numbers["modules"]
    layers = sorted({modules[n]["layer"] or 0 for n in cores})
    middle = layers[len(layers) // 2]
    shown = [n for n in cores if (modules[n]["layer"] or 0) == middle][:5]
    fig = plt.figure(figsize=(3.2 * max(len(shown), 2), 6.4))
    grid = fig.add_gridspec(2, len(shown), height_ratios=[1, 0.9])
    for i, name in enumerate(shown):
        ax = fig.add_subplot(grid[0, i])
        im = ax.imshow(torch.tensor(cores[name]["cosine"]).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"{modules[name]['projection']} (layer {middle})\nmean off-diag "
                     f"{cores[name]['mean_offdiag_cosine'] or 0:.2f}", fontsize=8)
        ax.set_xlabel("core")
        ax.set_ylabel("core")
    fig.colorbar(im, ax=fig.axes, fraction=0.02, pad=0.02, label="cosine")
    ax = fig.add_subplot(grid[1, :])
    for proj, entries in by_projection({n: modules[n] for n in cores}).items():
        ax.plot([layer for layer, _ in entries], [cores[n]["merged_effective_rank"] for _, n in entries],
                marker="o", label=proj)
    r = max(c["r"] for c in cores.values())
    ax.axhline(r, color="grey", ls="--", lw=1)
    ax.set_ylim(0, r + 0.5)
    _integer_ticks(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank")
    ax.set_title(f"effective rank of the load-weighted mean core (max r = {r})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_pictures(numbers: dict, out_dir: Path) -> list[Path]:
    """Every PNG of the module docstring plus routing.json into ``out_dir``."""
    from comol.io_utils import atomic_write_json

    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_loads(plt, numbers, out_dir / "loads.png"), plot_entropy(plt, numbers, out_dir / "entropy.png"),
             plot_gates(plt, numbers, out_dir / "gates_prompt0.png")]
    if numbers.get("cores"):
        paths.append(plot_cores(plt, numbers, out_dir / "cores.png"))
    paths.append(atomic_write_json(out_dir / "routing.json", numbers))
    return paths


# --- command ----------------------------------------------------------------------------

def analyse(adapter_dir: str | os.PathLike, eval_set: str | None = None, rows: int = DEFAULT_ROWS,
            out_dir: str | os.PathLike | None = None, module: str | None = None, batch_size: int = 8) -> list[Path]:
    from comol.adapters import build_adapter_config, load_adapter
    from comol.adapters.inject import read_adapter_config
    from comol.models import load_backbone

    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    cfg = build_adapter_config(meta["adapter"])
    nothing = f"adapter {cfg.name!r} ({adapter_dir}) is not routed: it has no router, so there is nothing to plot"
    if not cfg.token_routed:
        raise NothingRouted(nothing)
    if rows < 1:
        raise ComolError(f"--rows {rows} is invalid: expected >= 1")
    _pyplot()  # fail before the model is built when matplotlib is missing
    if not meta.get("base_model"):
        raise ComolError(f"{adapter_dir}: adapter_config.json names no base_model, so the backbone cannot be rebuilt")
    spec = eval_set or default_set(meta)
    prompts = eval_prompts(spec, meta, rows)
    model, tokenizer = load_backbone(meta["base_model"], device="cuda" if torch.cuda.is_available() else "cpu")
    load_adapter(model, adapter_dir)
    numbers = routing_numbers(model, tokenizer, prompts, batch_size=batch_size, module=module)
    if not numbers["modules"]:
        raise NothingRouted(nothing)
    numbers = {"adapter": cfg.name, "adapter_dir": str(adapter_dir.resolve()), "eval_set": spec,
               "rows": len(prompts), "definitions": DEFINITIONS, **numbers}
    return write_pictures(numbers, Path(out_dir) if out_dir else adapter_dir.resolve().parent / "routing")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m comol.routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter_dir", help="a saved adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("eval_set", nargs="?", default=None,
                   help="toy_math | math/<name> | commonsense/<name> | code/humaneval | a .json/.jsonl file")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help=f"rows of the set to run (default {DEFAULT_ROWS})")
    p.add_argument("--out", default=None, help="output folder (default: routing/ beside the adapter dir)")
    p.add_argument("--module", default=None, help="module of the per-token gate picture (default: middle layer)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    try:
        paths = analyse(args.adapter_dir, args.eval_set, rows=args.rows, out_dir=args.out, module=args.module,
                        batch_size=args.batch_size)
    except ComolError as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
