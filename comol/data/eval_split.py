"""A seeded train/val/test split of evaluation files (``dataset.source: eval_split``).

For an honest small experiment on real data without a separate training set: each set's rows are
permuted with ``data_seed``; the first ``test_per_set`` are held out for evaluation, the next
``val_per_set`` give a validation loss, the next ``train_per_set`` are trained on. Training rows whose
prompt (instruction + input) equals a held-out prompt are dropped, so no test question is trained on.
The split is written to ``split_dir`` (one ``<set>.json`` of held-out rows per set, which the eval
config reads, plus ``train.json``, ``val.json`` and ``split.json`` with the indices and sizes).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

from comol.data.loading import check_rows, read_json_rows
from comol.io_utils import atomic_write_json


def _key(row: Mapping[str, Any]) -> tuple[str, str]:
    return (row["instruction"].strip(), (row.get("input") or "").strip())


def eval_split(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train": rows, "val": rows, "held_out": {set: rows}}``; writes the split when ``split_dir`` is set."""
    sets = dict(cfg.get("sets") or {})   # a checked dataset node (comol/schema_data.py)
    sizes = {key: int(cfg.get(key, 0)) for key in ("train_per_set", "val_per_set", "test_per_set")}
    seed = int(cfg.get("data_seed", 0))
    data_dir = Path(str(cfg.get("data_dir") or "."))
    train, val, held_out, manifest = [], [], {}, {"data_seed": seed, **sizes, "sets": {}}
    for name, file in sets.items():
        path = Path(str(file)) if Path(str(file)).is_absolute() else data_dir / str(file)
        rows = check_rows(read_json_rows(path, what=f"dataset.sets.{name} file"), str(path),
                          required=("instruction", "output", "answer"))
        order = list(range(len(rows)))
        random.Random(f"{seed}:{name}").shuffle(order)
        n_test, n_val = sizes["test_per_set"], sizes["val_per_set"]
        test_idx = order[:n_test]
        val_idx = order[n_test:n_test + n_val]
        held = {_key(rows[i]) for i in test_idx}
        rest = [i for i in order[n_test + n_val:] if _key(rows[i]) not in held]
        train_idx = rest[:sizes["train_per_set"]]
        held_out[name] = [rows[i] for i in test_idx]
        val += [rows[i] for i in val_idx]
        train += [rows[i] for i in train_idx]
        manifest["sets"][name] = {"file": str(path), "rows": len(rows), "test": test_idx, "val": val_idx,
                                  "train": train_idx}
    random.Random(seed).shuffle(train)
    if cfg.get("split_dir"):
        out = Path(str(cfg["split_dir"]))
        for name, rows in held_out.items():
            atomic_write_json(out / f"{name}.json", rows)
        atomic_write_json(out / "train.json", train)
        atomic_write_json(out / "val.json", val)
        atomic_write_json(out / "split.json", manifest)
    return {"train": train, "val": val, "held_out": held_out}
