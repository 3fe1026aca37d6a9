"""Figures of routing statistics shared by the routing CLI (``python -m comol.routing``) and the W&B job
outputs: module names split into layer and projection, the layer x expert load heatmap, atomic PNG writes."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from comol.errors import ComolError


def split_name(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` -> (3, ``self_attn.q_proj``): the last integer component is the layer."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    if not idx:
        return None, name
    return int(parts[idx[-1]]), ".".join(parts[idx[-1] + 1:]) or name


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ComolError("the routing pictures need matplotlib: pip install 'comol[sweeps]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write a figure atomically (a complete PNG or none)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def by_projection(modules: dict[str, dict]) -> dict[str, list[tuple[int, str]]]:
    """projection -> [(layer, module name)] sorted by layer (modules without a layer index: layer 0)."""
    out: dict[str, list[tuple[int, str]]] = {}
    for name, m in modules.items():
        out.setdefault(m["projection"], []).append((m["layer"] or 0, name))
    return {k: sorted(v) for k, v in out.items()}


def modules_of_loads(loads: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """``RoutingStats.loads()`` (module name -> {"load": [...], ...}) with each module's layer and projection."""
    return {name: {"layer": split_name(name)[0], "projection": split_name(name)[1], **entry}
            for name, entry in loads.items()}


def loads_figure(plt, modules: dict[str, dict], title: str):
    """The layer x expert heatmap of the loads (``load · N``: 1 = uniform), one panel per projection type;
    ``modules``: name -> {"layer", "projection", "load"} (``modules_of_loads``). Returns the figure."""
    numbers = {"modules": modules}
    groups = by_projection(numbers["modules"])
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.35 * max(len(v) for v in groups.values()) * rows + 1.8),
                             squeeze=False)
    for ax, (proj, entries) in zip(axes.flat, groups.items()):
        grid = torch.tensor([numbers["modules"][n]["load"] for _, n in entries]) * len(
            numbers["modules"][entries[0][1]]["load"])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(proj, fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(entries)), [str(layer) for layer, _ in entries])
        if grid.numel() <= 160:
            for (i, j), v in zip(((i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])), grid.flatten()):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < grid.max() / 2 else "k")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
