"""Training-step time and peak memory of adapters on one backbone, measured side by side in one process.

    python -m comol.tools.bench                       # LoRA r16, CoMoL r16 N=8/64, naive CoMoL N=8/64
    python -m comol.tools.bench --all                 # + every adapter preset in conf/adapter
    python -m comol.tools.bench --hidden 1024 --layers 4 --batch 4 --seq 256
    python -m comol.tools.bench --routing             # only: CoMoL step time, routing statistics on vs off
    python -m comol.tools.bench --compile             # LoRA / CoMoL eager vs compiled blocks vs compiled adapters
    python -m comol.tools.bench --pipeline            # whole training steps vs PEFT + HF Trainer (pipeline_bench.py)
    python -m comol.tools.bench --generate --model smollm2_135m   # eval generate loop tokens/s (generation_bench.py)

Step = forward + backward + AdamW step on a random-init Qwen3 built from the given architecture.
A second table times one adapted Linear alone (forward + backward), where the adapter's own cost is
not diluted by the backbone.
Timings are interleaved (one step of each variant per round) and the median is reported, so
machine noise hits every variant alike. ``--routing`` times CoMoL training steps with the routing statistics on
(``adapter_context(model).routing.enabled``, recorded every step, never read) against the same model
with them off, interleaved in one process, and prints the ratio per recorded step and amortised over
``routing_stats_every`` steps, as training records them (target: <= 1.02 amortised).
Peak memory: on CUDA, ``torch.cuda.max_memory_allocated``;
on CPU, the peak of the allocator timeline recorded by the PyTorch profiler for one step
(parameters, gradients, optimizer state and activations). Ratios are relative to LoRA.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import OmegaConf

from comol.adapters import adapter_context, count_parameters, inject_adapter
from comol.config import adapter_preset
from comol.adapters.base import AdapterLinear
from comol.adapters.comol import CoMoLConfig, CoMoLLinear
from comol.models import load_backbone
from comol.models.lit_module import compile_blocks
from comol.tools import generation_bench
from comol.tools.pipeline_bench import add_arguments, host_memory_note, run_pipeline
from comol.training.host_memory import keep_freed_memory


class NaiveCoMoLLinear(CoMoLLinear):
    """CoMoL as the official code computes it: a [tokens, N, r, r] stack of gated cores, then a sum."""

    def mix(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        stack = g.to(z.dtype)[:, :, None, None] * self.adapter_cores[None]      # [T, N, r, r]
        merged = stack.sum(dim=1)                                               # [T, r, r]
        return torch.bmm(merged, z.unsqueeze(-1)).squeeze(-1)


class NaiveCoMoLConfig(CoMoLConfig):
    def make_layer(self, base, module_name):
        return NaiveCoMoLLinear(base, self)


@dataclass
class Variant:
    label: str
    inject: Callable[[torch.nn.Module], None]


def _adapter(values: dict) -> Callable[[torch.nn.Module], None]:
    return lambda model: inject_adapter(model, values)


def _naive(r: int, n_exp: int) -> Callable[[torch.nn.Module], None]:
    cfg = NaiveCoMoLConfig(**adapter_preset("comol", {"r": r, "num_experts": n_exp}))
    return lambda model: inject_adapter(model, cfg)


def default_variants() -> list[Variant]:
    return [
        Variant("lora r16", _adapter({"name": "lora", "r": 16})),
        Variant("comol r16 N8", _adapter({"name": "comol", "r": 16, "num_experts": 8})),
        Variant("comol r16 N64", _adapter({"name": "comol", "r": 16, "num_experts": 64})),
        Variant("naive comol r16 N8", _naive(16, 8)),
        Variant("naive comol r16 N64", _naive(16, 64)),
    ]


def compile_adapter_layers(model: torch.nn.Module) -> int:
    """The alternative to ``trainer.compile=true`` measured by ``--compile``: every adapter layer (its frozen
    Linear and its adapter) compiled in place instead of every decoder block."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLinear)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _compiled(inject: Callable[[torch.nn.Module], None], how: Callable[[torch.nn.Module], int]):
    return lambda model: (inject(model), how(model))


def compile_variants() -> list[Variant]:
    """LoRA and CoMoL N=8 eager, with compiled decoder blocks (trainer.compile=true) and compiled adapter layers."""
    out = []
    for label, values in (("lora r16", {"name": "lora", "r": 16}),
                          ("comol r16 N8", {"name": "comol", "r": 16, "num_experts": 8})):
        out += [Variant(label, _adapter(values)),
                Variant(f"{label} compiled blocks", _compiled(_adapter(values), compile_blocks)),
                Variant(f"{label} compiled adapters", _compiled(_adapter(values), compile_adapter_layers))]
    return out


def preset_variants() -> list[Variant]:
    """Every adapter preset in conf/adapter with its YAML defaults (the paper's settings)."""
    from comol.config import compose
    from comol.params import adapter_presets

    out = []
    for name in adapter_presets():
        values = OmegaConf.to_container(compose([f"adapter={name}"]).adapter, resolve=True)
        out.append(Variant(f"{name} (preset)", _adapter(values)))
    return out


def backbone(args) -> tuple[torch.nn.Module, int]:
    cfg = {"name": "bench", "family": args.family, "hub_id": None, "tokenizer": "offline", "dtype": "float32",
           "init_seed": 0, "arch": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
                                    "num_kv_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
                                    "intermediate_size": args.mlp or 3 * args.hidden, "vocab_size": args.vocab,
                                    "max_position_embeddings": max(args.seq, 512)}}
    model, _ = load_backbone(cfg, device=args.device)
    return model, model.config.vocab_size


class Runner:
    def __init__(self, model: torch.nn.Module, batch: dict, device: str):
        self.model, self.batch, self.device = model.train(), batch, device
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(self) -> None:
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def peak_memory(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return cpu_peak_bytes(self.step)


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes alive during ``fn`` according to the profiler's allocator timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(max(sum(row) for row in sizes))


def measure(args, variants: list[Variant]) -> list[dict]:
    base, vocab = backbone(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    runners, rows = [], []
    for v in variants:
        model = copy.deepcopy(base)
        v.inject(model)
        runners.append(Runner(model, batch, args.device))
        rows.append({"variant": v.label, "trainable": count_parameters(model)[0], "times": []})
    for r in runners:  # warm-up (allocator, autograd graph caches)
        for _ in range(args.warmup):
            r.step()
    for _ in range(args.steps):
        for r, row in zip(runners, rows):
            row["times"].append(r.timed_step())
    for r, row in zip(runners, rows):
        row["step_ms"] = 1000 * statistics.median(row["times"])
        row["peak_mib"] = r.peak_memory() / 2**20
    return rows


TARGETS = [  # (variant, reference, quantity, bound, description)
    ("comol r16 N8", "lora r16", "step_ms", 1.10, "CoMoL N=8 step time <= 1.10 x LoRA"),
    ("comol r16 N8", "lora r16", "peak_mib", 1.05, "CoMoL N=8 peak memory <= 1.05 x LoRA"),
    ("comol r16 N64", "lora r16", "step_ms", 1.15, "CoMoL N=64 step time <= 1.15 x LoRA"),
    ("naive comol r16 N8", "comol r16 N8", "step_ms", 1.5, "naive / CoMoL N=8 step time >= 1.5"),
    ("naive comol r16 N64", "comol r16 N64", "step_ms", 2.5, "naive / CoMoL N=64 step time >= 2.5"),
]


def report(rows: list[dict], args) -> str:
    by = {r["variant"]: r for r in rows}
    ref = by.get("lora r16", rows[0])
    lines = [f"backbone: {args.family} hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
             f"mlp={args.mlp or 3 * args.hidden}; batch {args.batch} x {args.seq} tokens; device {args.device}; "
             f"median of {args.steps} interleaved steps; {host_memory_note(args)}", "",
             "| variant | trainable | step ms | x LoRA | peak MiB | x LoRA |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable'] / 1e6:.3f}M | {r['step_ms']:.1f} | "
                     f"{r['step_ms'] / ref['step_ms']:.3f} | {r['peak_mib']:.1f} | {r['peak_mib'] / ref['peak_mib']:.3f} |")
    lines.append("")
    for var, refname, key, bound, desc in TARGETS:
        if var in by and refname in by:
            ratio = by[var][key] / by[refname][key]
            ok = ratio >= bound if desc.split()[0] == "naive" else ratio <= bound
            lines.append(f"{'PASS' if ok else 'FAIL'}  {desc}: measured {ratio:.3f}")
    return "\n".join(lines)


def measure_layer(args, variants: list[Variant]) -> list[dict]:
    """Forward + backward of one adapted Linear (hidden -> hidden) on batch x seq tokens: the adapter's own
    cost without the backbone around it (the base matmul is included, as in the model)."""

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(args.hidden, args.hidden, bias=False)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch * args.seq, args.hidden, generator=g).to(args.device).requires_grad_(True)
    rows, mods = [], []
    for v in variants:
        torch.manual_seed(0)
        one = One().to(args.device)
        try:
            v.inject(one)
        except Exception:  # noqa: BLE001 - block-level adapters have no single Linear to time
            continue
        one.q_proj.base_layer.requires_grad_(False)
        mods.append(one.q_proj.train())
        rows.append({"variant": v.label, "times": []})

    def step(mod):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            out = mod(x)
        out.float().sum().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for mod in mods:
        for _ in range(args.warmup):
            step(mod)
    for _ in range(args.steps * 3):
        for mod, row in zip(mods, rows):
            row["times"].append(step(mod))
    for row in rows:
        row["step_ms"] = 1000 * statistics.median(row["times"])
    return rows


def layer_report(rows: list[dict], args) -> str:
    by = {r["variant"]: r for r in rows}
    ref = by.get("lora r16", rows[0])
    lines = [f"one adapted Linear {args.hidden} -> {args.hidden}, {args.batch * args.seq} tokens, forward + backward:",
             "", "| variant | ms | x LoRA |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['step_ms']:.2f} | {r['step_ms'] / ref['step_ms']:.3f} |" for r in rows]
    for n_exp in (8, 64):
        fast, naive = by.get(f"comol r16 N{n_exp}"), by.get(f"naive comol r16 N{n_exp}")
        if fast and naive:
            lines.append(f"naive / CoMoL N={n_exp} (layer): {naive['step_ms'] / fast['step_ms']:.2f}x")
    return "\n".join(lines)


ROUTING_VARIANTS = [("comol r16 N8", {"name": "comol", "r": 16, "num_experts": 8}),
                    ("comol r16 N64", {"name": "comol", "r": 16, "num_experts": 64})]
ROUTING_BOUND = 1.02


class _TimedRecord:
    """Wraps ``RoutingStats.record`` of one model and sums the wall time spent inside it (CPU: ops are
    synchronous, so this is the statistics' own forward cost; on CUDA it is only the launch cost)."""

    def __init__(self, stats) -> None:
        self.total, self._record = 0.0, stats.record
        stats.record = self

    def __call__(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        self._record(*args, **kwargs)
        self.total += time.perf_counter() - start


def measure_routing(args) -> list[dict]:
    """CoMoL step time with routing statistics off and on: two identical adapted models, interleaved.

    Per step: wall time and process CPU time (``time.process_time``, all threads; less sensitive than
    wall time to other processes on a shared machine), and the time spent inside ``RoutingStats.record``.
    """
    base, vocab = backbone(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows = []
    for label, values in ROUTING_VARIANTS:
        pair_models = []
        for _ in range(2):  # the same adapter twice (same seed): statistics off / on
            torch.manual_seed(0)
            pair_models.append(copy.deepcopy(base))
            inject_adapter(pair_models[-1], values)
        off, on = (Runner(m, batch, args.device) for m in pair_models)
        stats = adapter_context(on.model).routing
        stats.enabled = True
        for r in (off, on):
            for _ in range(args.warmup):
                r.step()
        timer = _TimedRecord(stats)
        wall: dict[str, list[float]] = {"off": [], "on": []}
        cpu: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(args.steps):
            pair = (("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off))  # alternate the order
            for key, r in pair:
                c0 = time.process_time()
                wall[key].append(r.timed_step())
                cpu[key].append(time.process_time() - c0)
        modules = len(stats.loads())
        med = {f"{k}_{kind}": 1000 * statistics.median(d[k]) for kind, d in (("ms", wall), ("cpu_ms", cpu))
               for k in ("off", "on")}
        rows.append({"variant": label, **med, "ratio": med["on_ms"] / med["off_ms"],
                     "cpu_ratio": med["on_cpu_ms"] / med["off_cpu_ms"], "modules": modules,
                     "record_ms": 1000 * timer.total / args.steps})
    return rows


def routing_report(rows: list[dict], args) -> str:
    lines = [f"routing statistics overhead: {args.family} hidden={args.hidden} layers={args.layers}; batch "
             f"{args.batch} x {args.seq} tokens; device {args.device}; median of {args.steps} interleaved steps; "
             f"{host_memory_note(args)}", "",
             "| variant | routed modules | off ms | on ms | on / off (wall) | off CPU ms | on CPU ms | on / off (CPU) "
             "| in record() ms/step | record / step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['modules']} | {r['off_ms']:.1f} | {r['on_ms']:.1f} | {r['ratio']:.4f} | "
              f"{r['off_cpu_ms']:.1f} | {r['on_cpu_ms']:.1f} | {r['cpu_ratio']:.4f} | {r['record_ms']:.2f} | "
              f"{100 * r['record_ms'] / r['off_ms']:.2f}% |" for r in rows]
    lines.append("")
    every = args.routing_every
    for r in rows:  # training records one batch in `every` (routing_stats_every): the cost per step is amortised
        amortised = 1 + (r["ratio"] - 1) / every
        ok = amortised <= ROUTING_BOUND
        lines.append(f"{'PASS' if ok else 'FAIL'}  {r['variant']} routing statistics overhead <= "
                     f"{100 * (ROUTING_BOUND - 1):.0f}% of step time (wall, routing_stats_every={every}): measured "
                     f"{100 * (amortised - 1):+.2f}% ({100 * (r['ratio'] - 1):+.2f}% on a recorded step)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3", choices=["qwen3", "llama"])
    p.add_argument("--routing-every", type=int, default=10,
                   help="training records routing statistics on one batch in N (conf: routing_stats_every)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=None, help="MLP width (default 3 x hidden)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the offline tokenizer's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--all", action="store_true", help="add every adapter preset of conf/adapter")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-model", action="store_true", help="only the single-layer measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--routing", action="store_true",
                   help="only the routing-statistics overhead: CoMoL steps with statistics on vs off")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's allocator as it is (by default a CPU bench keeps freed host memory for reuse, "
                        "as a CPU fit does: trainer.reuse_host_memory)")
    add_arguments(p)
    generation_bench.add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = args.pipeline or args.device == "cpu"
    args.reuse_host_memory = cpu and not args.default_malloc and keep_freed_memory()
    if args.pipeline:
        return run_pipeline(args)
    if args.generate:
        return generation_bench.run_generation(args)
    if args.routing:
        print(routing_report(measure_routing(args), args))
        return 0
    if args.compile:   # whole steps only: the compiled units are decoder blocks / adapter layers of a model
        print(report(measure(args, compile_variants()), args))
        return 0
    variants = default_variants() + (preset_variants() if args.all else [])
    if not args.skip_model:
        print(report(measure(args, variants), args))
        print()
    print(layer_report(measure_layer(args, variants), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
