"""Whole-training-step throughput: this platform (padded / packed / compiled) against PEFT + the HF Trainer.

    python -m comol.tools.bench --pipeline                                   # tiny_qwen3, math_14k validation rows
    python -m comol.tools.bench --pipeline --model smollm2_135m --rows 96 --batch 8 --rounds 3
    python -m comol.tools.bench --pipeline --padding-ratios                  # computed/real of every bundled split
    python -m comol.tools.bench --pipeline --save bench.json                 # rates for sweeps --estimate

Each variant trains the same rows (the bundled math_14k validation split, tokenised as training does) in
the same order, the same batch, fp32, AdamW, gradient clipping 1.0:

* ``<adapter> padded``: ``AdapterLM`` driven by a ``lightning.Trainer`` (conf/trainer/cpu.yaml), left-padded
  batches from ``SFTDataModule`` — the path ``run.py`` takes;
* ``<adapter> packed``: the same with ``dataset.packing=true`` (budget ``batch x max_length`` real tokens);
* ``<adapter> compiled``: padded, with ``trainer.compile=true`` (``--compile``; compilation happens in the
  warm-up fit and is not timed);
* ``peft lora``: PEFT ``LoraConfig`` (same r, alpha, dropout, target modules) trained by
  ``transformers.Trainer`` with ``DataCollatorForSeq2Seq`` — what a user would run instead.

A *round* runs every variant once for ``--steps`` optimizer steps (a fresh trainer each time, the model
kept); a step's time is the wall time between the starts of consecutive steps (data loading, collation,
forward, backward, optimizer step, logging), the first step of a fit not counted. Rounds interleave the
variants, so machine noise hits them alike; the median over rounds is reported. Throughput is *real*
(non-padding) tokens per second. Ratios are against ``lora padded``.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from comol.adapters import inject_adapter
from comol.config import compose
from comol.data.datamodule import BIN_ROWS, SFTDataModule, encode_example
from comol.data.loading import load_rows
from comol.data.packing import pack_bins, pack_rows, padding_ratio, real_tokens
from comol.eval.eval_files import require_data_dir
from comol.models import load_backbone
from comol.models.lit_module import AdapterLM
from comol.training.callbacks import lightning_trainer_node
from comol.training.progress import ProgressLog
from comol.training.sampler import LengthGroupedSampler, ResumableSampler, row_permutation

SPLITS = {"math_14k": "train/math_14k_validation.json", "commonsense_15k": "train/commonsense_15k_validation.json",
          "codealpaca20k": "train/codealpaca20k_validation.json"}


def data_file(name: str) -> Path:
    return Path(require_data_dir()) / SPLITS[name]


def load_model(name: str):
    cfg = OmegaConf.to_container(compose([f"model={name}"]).model, resolve=True)
    return load_backbone(cfg)


# -- padding ratios -----------------------------------------------------------------------------------

def padding_ratios(tokenizer, batch: int, max_length: int, seed: int = 0) -> list[dict]:
    """Computed / real tokens of each bundled split: random padded batches, length-grouped batches, packs."""
    out = []
    for name in SPLITS:
        rows = load_rows(str(data_file(name)))
        lengths = [len(encode_example(r, tokenizer, max_length)["input_ids"]) for r in rows]
        order = row_permutation(len(lengths), seed)
        padded = [order[i:i + batch] for i in range(0, len(order), batch)]
        grouped_order = list(LengthGroupedSampler(lengths, seed, group=batch * 50))
        grouped = [grouped_order[i:i + batch] for i in range(0, len(grouped_order), batch)]
        packs = pack_rows(lengths, order, batch * max_length)
        bin_packs = pack_bins(lengths, order, batch * max_length, BIN_ROWS * max_length)
        out.append({"split": name, "rows": len(rows), "mean_tokens": sum(lengths) / len(lengths),
                    "padded": padding_ratio(lengths, padded), "grouped": padding_ratio(lengths, grouped),
                    "packed_bins": padding_ratio(lengths, bin_packs, layout="bins", width=BIN_ROWS * max_length),
                    "packed_flat": padding_ratio(lengths, packs, layout="flat")})
    return out


def padding_report(rows: list[dict], args) -> str:
    lines = [f"computed / real tokens, batch {args.batch}, max_length {args.max_length}, {args.model} tokenizer",
             f"{'split':18s} {'rows':>5s} {'tokens/row':>10s} {'padded':>7s} {'grouped':>8s} {'packed bins':>12s} "
             f"{'packed flat':>12s}"]
    for r in rows:
        lines.append(f"{r['split']:18s} {r['rows']:5d} {r['mean_tokens']:10.1f} {r['padded']:7.3f} {r['grouped']:8.3f} "
                     f"{r['packed_bins']:12.3f} {r['packed_flat']:12.3f}")
    return "\n".join(lines)


# -- the timed variants -------------------------------------------------------------------------------

class StepClock:
    """Wall time between consecutive step starts and real tokens per step (first step of each fit dropped)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.faults: list[int] = []   # minor page faults of the process per step (host memory faulted in again)
        self._faults_at = 0
        self._last: float | None = None
        self._pending: int | None = None
        self._first = True

    def new_fit(self) -> None:
        self._last, self._pending, self._first = None, None, True

    def step_start(self, tokens: int) -> None:
        now, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if self._last is not None and self._pending is not None:
            if not self._first:    # a fit's first step carries the trainer's and data loader's start-up
                self.times.append(now - self._last)
                self.tokens.append(self._pending)
                self.faults.append(faults - self._faults_at)
            self._first = False
        self._last, self._pending, self._faults_at = now, tokens, faults

    def count(self, tokens: int) -> None:
        """Set the real tokens of the step that started last (when they are known only after its start)."""
        self._pending = tokens

    def finish(self) -> None:
        self.step_start(0)   # closes the last step
        self._last = None

    def rate(self, start: int = 0) -> float:
        return sum(self.tokens[start:]) / max(sum(self.times[start:]), 1e-9)


class OursVariant:
    """AdapterLM + lightning.Trainer on SFTDataModule (padded, packed or compiled)."""

    def __init__(self, label: str, base, tok, rows, adapter: dict, args, packing: bool = False, compile: bool = False):
        self.label, self.clock, self.args = label, StepClock(), args
        self.model = copy.deepcopy(base).train()
        cfg = inject_adapter(self.model, adapter)
        self.lit = AdapterLM(self.model, {"lr": 1e-4, "warmup_steps": 0}, aux_loss_coeff=cfg.aux_loss_coeff,
                             routing_stats=True, routing_stats_every=10, compile=compile)
        ds = {"name": "bench", "source": "files", "max_length": args.max_length, "train_on_prompt": True,
              "batch_size": args.batch, "packing": packing, "num_workers": 0}
        self.datamodule = SFTDataModule(ds, tok, seed=0, splits={"train": rows, "val": []})
        clock = self.clock

        class Clock(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                clock.step_start(int(real_tokens(batch)))

        self.callback = Clock

    def fit(self, steps: int) -> None:
        tcfg = lightning_trainer_node(OmegaConf.to_container(compose(["trainer=cpu"]).trainer, resolve=True))
        tcfg.update(max_steps=steps, enable_progress_bar=False, enable_model_summary=False, val_check_interval=None,
                    limit_val_batches=0, log_every_n_steps=10)
        trainer: L.Trainer = instantiate(tcfg, logger=False, callbacks=[self.callback(), ProgressLog(1e9)],
                                         enable_checkpointing=False, default_root_dir=self.args.tmp)
        self.clock.new_fit()
        trainer.fit(self.lit, datamodule=self.datamodule)
        self.clock.finish()


class PeftVariant:
    """PEFT LoRA trained by transformers.Trainer (DataCollatorForSeq2Seq), the same rows in the same order."""

    def __init__(self, label: str, base, tok, rows, adapter: dict, args, order: list[int]):
        # only this variant needs them: peft is optional (the `real` extra), and transformers' Trainer pulls in
        # its integrations, which print to stdout on import when WANDB_MODE=offline (`bench --help` stays clean)
        import peft
        from transformers import DataCollatorForSeq2Seq

        self.label, self.clock, self.args = label, StepClock(), args
        lcfg = peft.LoraConfig(r=adapter["r"], lora_alpha=adapter["alpha"], lora_dropout=adapter["dropout"],
                               target_modules=list(adapter["target_modules"]), bias="none", task_type="CAUSAL_LM")
        self.model = peft.get_peft_model(copy.deepcopy(base).train(), lcfg)
        feats = [encode_example(r, tok, args.max_length) for r in rows]
        self.features = [{**feats[i], "attention_mask": [1] * len(feats[i]["input_ids"])} for i in order]
        self.collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

    def fit(self, steps: int) -> None:
        from torch.utils.data import SequentialSampler
        from transformers import Trainer, TrainerCallback, TrainingArguments

        variant = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                variant.clock.step_start(0)

        class OrderedTrainer(Trainer):
            def _get_train_sampler(self, *a, **k):   # the platform's order, given by the row order
                return SequentialSampler(self.train_dataset)

            def training_step(self, model, inputs, *a, **k):
                # the batch this step trains on: the Trainer's data loader collates one batch ahead, so
                # neither the collate function nor on_step_begin sees it
                variant.clock.count(int(inputs["attention_mask"].sum()))
                return super().training_step(model, inputs, *a, **k)

        targs = TrainingArguments(output_dir=self.args.tmp, per_device_train_batch_size=self.args.batch, max_steps=steps,
                                  learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                                  logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                                  dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False, seed=0)
        trainer = OrderedTrainer(model=self.model, args=targs, train_dataset=self.features, data_collator=self.collate,
                                 callbacks=[Clock()])
        self.clock.new_fit()
        trainer.train()
        self.clock.finish()


def build_variants(args, base, tok, rows: list[dict]) -> list[Any]:
    """The variants ``--adapters`` / ``--compile`` / ``--no-packed`` / ``--no-peft`` name, on copies of ``base``."""
    feats = [encode_example(r, tok, args.max_length) for r in rows]
    order = list(ResumableSampler(feats, 0))   # the padded path's epoch-0 order, for PEFT's sequential sampler
    lora = {"name": "lora", "r": args.r, "alpha": float(args.r), "dropout": 0.1,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}
    variants: list[Any] = []
    for name in args.adapters.split(","):
        adapter = lora if name == "lora" else {"name": name, "r": args.r, "num_experts": args.experts,
                                               "dropout": 0.1, "target_modules": lora["target_modules"]}
        variants.append(OursVariant(f"{name} padded", base, tok, rows, adapter, args))
        if not args.no_packed:
            variants.append(OursVariant(f"{name} packed", base, tok, rows, adapter, args, packing=True))
        if args.compile:
            variants.append(OursVariant(f"{name} compiled", base, tok, rows, adapter, args, compile=True))
    if not args.no_peft:
        variants.append(PeftVariant("peft lora + HF Trainer", base, tok, rows, lora, args, order))
    return variants


def measure_pipeline(args) -> tuple[list[dict], Any]:
    base, tok = load_model(args.model)
    rows = load_rows(str(data_file("math_14k")))[:args.rows]
    variants = build_variants(args, base, tok, rows)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    for v in variants:   # warm-up fit (compilation, allocator, first-step costs): not timed
        v.fit(2)
        v.clock.times.clear()
        v.clock.tokens.clear()
    per_round: dict[str, list[float]] = {v.label: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            n = len(v.clock.times)
            v.fit(args.steps + 1)
            per_round[v.label].append(sum(v.clock.tokens[n:]) / max(sum(v.clock.times[n:]), 1e-9))
    out = []
    for v in variants:
        rates = per_round[v.label]
        step_times = v.clock.times
        out.append({"variant": v.label, "tokens_per_s": statistics.median(rates), "rounds": rates,
                    "step_s": statistics.median(step_times) if step_times else float("nan"),
                    "tokens_per_step": statistics.median(v.clock.tokens) if v.clock.tokens else 0,
                    "faults_per_step": statistics.median(v.clock.faults) if v.clock.faults else 0})
    return out, tok


def host_memory_note(args) -> str:
    """How the bench's process allocates host memory (``--default-malloc``; trainer.reuse_host_memory)."""
    return "host memory kept for reuse" if getattr(args, "reuse_host_memory", False) else "glibc's default allocator"


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's rate / b's rate in the same round (the two ran minutes apart at most)."""
    return statistics.median(x / y for x, y in zip(a["rounds"], b["rounds"]))


def pipeline_report(rows: list[dict], args) -> str:
    ref = next((r for r in rows if r["variant"] == "lora padded"), rows[0])
    lines = [f"pipeline: {args.model}, {args.rows} math_14k validation rows, batch {args.batch}, max_length "
             f"{args.max_length}, fp32, {args.rounds} rounds x {args.steps} steps, torch threads "
             f"{torch.get_num_threads()}, {host_memory_note(args)}",
             f"{'variant':26s} {'real tok/s':>10s} {'x lora padded':>13s} {'step s':>7s} {'real tok/step':>13s} "
             f"{'page faults/step':>16s}"]
    for r in rows:
        lines.append(f"{r['variant']:26s} {r['tokens_per_s']:10.1f} {r['tokens_per_s'] / ref['tokens_per_s']:13.3f} "
                     f"{r['step_s']:7.3f} {r['tokens_per_step']:13.0f} {r['faults_per_step']:16.0f}")
    by = {r["variant"]: r for r in rows}
    pairs = [("lora padded", "peft lora + HF Trainer", "our LoRA / PEFT+Trainer tokens/s"),
             ("lora packed", "lora padded", "packed / padded LoRA tokens/s")]
    for name in args.adapters.split(","):
        if name != "lora":
            for mode in ("padded", "packed"):
                pairs.append((f"lora {mode}", f"{name} {mode}", f"{name} / LoRA time per real token ({mode})"))
    lines.append("ratios: median over rounds of the ratio within each round")
    for a, b, text in pairs:
        if a in by and b in by:
            lines.append(f"{text}: {paired_ratio(by[a], by[b]):.3f}")
    return "\n".join(lines)


def save_rates(rows: list[dict], args, path: str) -> None:
    rates = {}
    for r in rows:
        name, _, mode = r["variant"].partition(" ")
        if name == "peft":
            rates["peft_lora"] = r["tokens_per_s"]
            continue
        rates[f"{name}/{mode}"] = r["tokens_per_s"]
        if mode == "padded":
            rates[name] = r["tokens_per_s"]
    Path(path).write_text(json.dumps({"model": args.model, "batch": args.batch, "max_length": args.max_length,
                                      "device": "cpu", "threads": torch.get_num_threads(), "tokens_per_s": rates,
                                      "measured": rows}, indent=1))


def add_arguments(p) -> None:
    g = p.add_argument_group("--pipeline")
    g.add_argument("--pipeline", action="store_true", help="whole training steps, padded/packed/compiled vs PEFT+Trainer")
    g.add_argument("--model", default="tiny_qwen3", help="model preset (tiny_qwen3, tiny_llama, smollm2_135m)")
    g.add_argument("--rows", type=int, default=64, help="math_14k validation rows trained on")
    g.add_argument("--max-length", type=int, default=300)
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--adapters", default="lora,comol", help="comma list: lora first (the reference)")
    g.add_argument("--r", type=int, default=16)
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--compile", action="store_true",
                   help="with --pipeline: add the trainer.compile=true variants; without: LoRA and CoMoL eager vs "
                        "compiled decoder blocks vs compiled adapter layers")
    g.add_argument("--no-packed", action="store_true")
    g.add_argument("--no-peft", action="store_true")
    g.add_argument("--padding-ratios", action="store_true", help="only: computed/real tokens of the bundled splits")
    g.add_argument("--save", default=None, help="write the rates as JSON (for sweeps --estimate --tokens-per-s FILE)")


def run_pipeline(args) -> int:
    if args.padding_ratios:
        _, tok = load_model(args.model)
        print(padding_report(padding_ratios(tok, args.batch, args.max_length), args))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        rows, _ = measure_pipeline(args)
    print(pipeline_report(rows, args))
    if args.save:
        save_rates(rows, args, args.save)
        print(f"saved {args.save}")
    return 0
