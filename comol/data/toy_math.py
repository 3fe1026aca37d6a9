"""Deterministic, seeded arithmetic word problems in the Alpaca row format.

Each row is {"instruction", "input": "", "output", "answer"}; outputs show the working and end in
"The answer is N." like math_14k, so the default run needs no files and is scored like GSM8K.
"""

from __future__ import annotations

import random

from comol.errors import ConfigError

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jin", "Kai", "Lea"]
ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps", "cards", "eggs", "marbles", "plums"]


def _problem(rng: random.Random, max_operand: int) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(("add", "sub", "mul"))
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if kind == "add":
        q = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
        ans, work = a + b, f"{a} + {b} = {a + b}"
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        ans, work = a - b, f"{a} - {b} = {a - b}"
    else:
        q = f"{name} fills {a} bags with {b} {item} each. How many {item} are in the bags?"
        ans, work = a * b, f"{a} * {b} = {a * b}"
    return {"instruction": q, "input": "", "output": f"{work}. The answer is {ans}.", "answer": str(ans)}


def generate_toy_math(n: int, seed: int = 0, max_operand: int = 9, exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct problems from a seeded RNG (same seed -> same rows), skipping ``exclude`` instructions."""
    if n < 0:
        raise ConfigError(f"dataset.train_size/val_size/test_size={n} is invalid: expected >= 0")
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ConfigError(f"dataset.max_operand={max_operand} is too small for {n} distinct toy_math problems")
        row = _problem(rng, max_operand)
        if row["instruction"] in seen:
            continue
        seen.add(row["instruction"])
        rows.append(row)
    return rows


def toy_math_splits(n_train: int, n_val: int, n_test: int, seed: int = 0, max_operand: int = 9) -> dict[str, list[dict]]:
    """Disjoint train/val/test splits (no instruction appears in two splits)."""
    rows = generate_toy_math(n_train + n_val + n_test, seed=seed, max_operand=max_operand)
    return {
        "train": rows[:n_train],
        "val": rows[n_train:n_train + n_val],
        "test": rows[n_train + n_val:],
    }
