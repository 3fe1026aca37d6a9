"""Tokens per second of the evaluation generate loop (``comol.eval.generate.generate_responses``), variants side by side.

    python -m comol.tools.bench --generate --model smollm2_135m                        # math/gsm8k, 32 prompts, 64 new tokens
    python -m comol.tools.bench --generate --model smollm2_135m --set commonsense/boolq --prompts 64
    python -m comol.tools.bench --generate --model smollm2_135m --batch-sizes 1,8,16,32,64 --adapter lora

The backbone is loaded once and, as evaluation runs adapted models, an adapter preset is injected
(``--adapter``, default ``comol``; ``none``: the bare backbone). The prompts are the first ``--prompts`` rows
of one evaluation set (``--set <eval config>/<set>``, read and formatted by that config's eval task, as
``run.py`` evaluates them), decoded greedily with ``--max-new-tokens``. Variants:

* ``batch B``: ``eval.batch_size=B``, prompts sorted by length (what evaluation does), dynamic KV cache;
* ``batch D unsorted``: the eval config's batch size D, prompts in file order;
* ``batch D static``: batch size D, sorted, ``cache_implementation="static"`` (a preallocated cache;
  transformers compiles the forward for it only on accelerators, so on the CPU it runs uncompiled).

A *round* runs every variant once over all prompts (the order of the variants rotating from round to
round); the median wall time of ``generate_responses`` over the rounds is reported, after one untimed
warm-up call per variant. Throughput: generated tokens (each sequence up to and including its first EOS,
the padding after it not counted) per second. Prompt padding: computed / real prompt tokens of the
batches. Ratios are against the eval config's default (batch D sorted, dynamic cache). ``same texts``:
the prompts whose greedy text equals the default's. A second table gives the prompt padding of the whole
set for each batch size, sorted and unsorted (tokenizer only).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from comol.adapters import inject_adapter
from comol.config import adapter_preset, compose
from comol.errors import ConfigError
from comol.eval.generate import GenerationStats, generate_responses
from comol.eval.tasks import EvalTask, build_task
from comol.tools.pipeline_bench import load_model

GREEDY = {"do_sample": False, "num_samples": 1}


@dataclass(frozen=True)
class GenVariant:
    label: str
    batch_size: int
    sort_by_length: bool = True
    cache_implementation: str | None = None     # None: the dynamic cache

    def run(self, model, tok, prompts: list[str], max_new_tokens: int) -> tuple[list[str], GenerationStats]:
        stats = GenerationStats()
        out = generate_responses(model, tok, prompts, max_new_tokens, GREEDY, batch_size=self.batch_size,
                                 desc=self.label, sort_by_length=self.sort_by_length,
                                 cache_implementation=self.cache_implementation, stats=stats)
        return [o[0] for o in out], stats


def make_variants(batch_sizes: list[int], default_batch: int, static: bool = True) -> list[GenVariant]:
    """``batch B`` for each size (the default's size first), then the default unsorted and with a static cache."""
    sizes = [default_batch] + [b for b in dict.fromkeys(batch_sizes) if b != default_batch]
    out = [GenVariant(f"batch {b}", b) for b in sizes]
    out.append(GenVariant(f"batch {default_batch} unsorted", default_batch, sort_by_length=False))
    if static:
        out.append(GenVariant(f"batch {default_batch} static", default_batch, cache_implementation="static"))
    return out


def eval_task_and_set(spec: str) -> tuple[EvalTask, str]:
    """``<eval config>/<set>`` (e.g. ``math/gsm8k``) -> (the config's task object, the set name)."""
    name, _, set_name = spec.partition("/")
    if not name or not set_name:
        raise ConfigError(f"--set={spec!r} is invalid: expected <eval config>/<set>, e.g. math/gsm8k")
    task = build_task(OmegaConf.to_container(compose([f"eval={name}"]).eval, resolve=True))
    if set_name not in task.cfg.sets:
        raise ConfigError(f"--set={spec!r}: eval={name} has no set {set_name!r}: expected one of "
                          f"{', '.join(task.cfg.sets)}")
    return task, set_name


def set_prompts(task: EvalTask, set_name: str, limit: int | None = None) -> list[str]:
    """The prompts of one set as the task builds them (its file, its prompt template), the first ``limit``."""
    rows = task.read_set(set_name, task.set_path(str(task.cfg.sets[set_name])))
    return [task.prompt(r) for r in rows[:limit]]


def prompt_padding(tok, prompts: list[str], batch_size: int, sort_by_length: bool) -> float:
    """Computed / real prompt tokens of the left-padded batches ``generate_responses`` would build."""
    lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if sort_by_length else list(range(len(prompts)))
    padded = sum(len(b) * max(lengths[i] for i in b)
                 for b in (order[s:s + batch_size] for s in range(0, len(order), batch_size)))
    return padded / max(sum(lengths), 1)


def measure_generation(model, tok, prompts: list[str], variants: list[GenVariant], max_new_tokens: int,
                       rounds: int, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Time each variant over all prompts, interleaved rounds; a variant that fails is reported, not timed.
    ``progress`` receives one line per timed call."""
    rows = [{"variant": v, "times": [], "texts": None, "stats": None, "error": None} for v in variants]
    for row in rows:   # warm-up, untimed; also checks that the variant runs here
        v = row["variant"]
        try:
            v.run(model, tok, prompts[:v.batch_size], min(max_new_tokens, 4))
        except Exception as e:  # noqa: BLE001 - e.g. a cache implementation this transformers/device lacks
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    live = [row for row in rows if row["error"] is None]
    for r in range(rounds):
        for row in live[r % len(live):] + live[:r % len(live)]:
            start = time.perf_counter()
            texts, stats = row["variant"].run(model, tok, prompts, max_new_tokens)
            row["times"].append(time.perf_counter() - start)
            row["texts"], row["stats"] = texts, stats
            if progress:
                progress(f"round {r + 1}/{rounds} {row['variant'].label}: {row['times'][-1]:.1f} s, "
                         f"{stats.new_tokens} new tokens")
    for row in live:
        row["seconds"] = statistics.median(row["times"])
        row["tokens_per_s"] = row["stats"].new_tokens / row["seconds"]
    return rows


def generation_report(rows: list[dict], header: str) -> str:
    ok = [r for r in rows if r["error"] is None]
    ref = ok[0]
    lines = [header, "", "| variant | batch | sorted | KV cache | new tokens | prompt padding | s (median) | tokens/s "
             "| x default | same texts as default |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        v, st = r["variant"], r["stats"]
        same = sum(a == b for a, b in zip(r["texts"], ref["texts"]))
        lines.append(f"| {v.label}{' (default)' if r is ref else ''} | {v.batch_size} | "
                     f"{'yes' if v.sort_by_length else 'no'} | {v.cache_implementation or 'dynamic'} | {st.new_tokens} | "
                     f"{st.prompt_padding_ratio:.3f} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / ref['tokens_per_s']:.3f} | {same}/{len(ref['texts'])} |")
    for r in rows:
        if r["error"] is not None:
            lines.append(f"{r['variant'].label}: not measured, it fails here ({r['error']})")
    return "\n".join(lines)


def padding_table(tok, prompts: list[str], batch_sizes: list[int], what: str) -> str:
    lines = [f"prompt padding (computed / real prompt tokens) of the whole {what}, {len(prompts)} prompts:", "",
             "| batch | sorted by length | file order |", "|---:|---:|---:|"]
    for b in sorted(set(batch_sizes)):
        lines.append(f"| {b} | {prompt_padding(tok, prompts, b, True):.3f} | {prompt_padding(tok, prompts, b, False):.3f} |")
    return "\n".join(lines)


def add_arguments(p) -> None:
    g = p.add_argument_group("--generate (also uses --model, --rounds, --device, --threads)")
    g.add_argument("--generate", action="store_true", help="tokens/s of the evaluation generate loop: batch size, "
                                                            "length sorting, static vs dynamic KV cache")
    g.add_argument("--set", default="math/gsm8k", help="<eval config>/<set> whose prompts are generated")
    g.add_argument("--prompts", type=int, default=32, help="the first N rows of the set")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--batch-sizes", default="1,8,16,32", help="comma list of eval.batch_size values")
    g.add_argument("--adapter", default="comol", help="adapter preset injected before generating (none: bare backbone)")
    g.add_argument("--no-static", action="store_true", help="leave out the static KV cache variant")


def run_generation(args) -> int:
    task, set_name = eval_task_and_set(args.set)
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes={args.batch_sizes!r} is invalid: expected a comma list of integers") from None
    if not sizes or min(sizes) < 1 or args.prompts < 1 or args.max_new_tokens < 1 or args.rounds < 1:
        raise ConfigError(f"--batch-sizes={args.batch_sizes!r} --prompts={args.prompts} --max-new-tokens="
                          f"{args.max_new_tokens} --rounds={args.rounds}: expected positive integers")
    model, tok = load_model(args.model)
    if args.adapter != "none":
        inject_adapter(model, {"name": args.adapter, **adapter_preset(args.adapter)})
    model.to(args.device).eval()
    all_prompts = set_prompts(task, set_name)
    prompts = all_prompts[:args.prompts]
    variants = make_variants(sizes, task.cfg.batch_size, static=not args.no_static)
    rows = measure_generation(model, tok, prompts, variants, args.max_new_tokens, args.rounds,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))
    header = (f"generation: {args.model} + {args.adapter} adapter, {len(prompts)} prompts of {args.set} "
              f"(eval={task.name} prompt), greedy, max_new_tokens {args.max_new_tokens}, "
              f"{str(next(model.parameters()).dtype).removeprefix('torch.')}, {next(model.parameters()).device}, torch threads {torch.get_num_threads()}, median of {args.rounds} "
              f"interleaved rounds")
    print(generation_report(rows, header))
    print()
    print(padding_table(tok, all_prompts, sizes, f"{args.set} set"))
    return 0
