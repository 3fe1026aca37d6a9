"""The LightningModule: optimises the adapted model's own ``outputs.loss`` (causal-LM cross-entropy + the
adapter's ``aux_loss_coeff`` x auxiliary routing loss, added by the adapter context: the same objective as
HF Trainer, TRL or a plain loop), AdamW + warmup schedule."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from comol.adapters import adapter_context, is_adapter_name
from comol.adapters.context import TOKEN_MASK_KWARG
from comol.errors import ConfigError


def compile_blocks(model: torch.nn.Module) -> int:
    """``trainer.compile=true``: compile every decoder block in place (``nn.Module.compile``: parameter names,
    hooks and checkpoints unchanged; one compiled graph reused by all blocks of a shape). Returns their count.
    docs/benchmarks.md says why the blocks and not the whole model or the adapter layers alone."""
    blocks = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not blocks:
        raise ConfigError(f"trainer.compile=true: {type(model).__name__} has no *DecoderLayer modules to compile")
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


class AdapterLM(L.LightningModule):
    """Trains only the adapter tensors of a wrapped Hugging Face causal LM."""

    def __init__(self, model: torch.nn.Module, optim: Mapping[str, Any], aux_loss_coeff: float | None = None,
                 routing_stats: bool = True, routing_stats_every: int = 1, compile: bool = False):
        super().__init__()
        self.model = model
        if compile:  # trainer.compile=true: regional compilation of the decoder blocks
            compile_blocks(model)
        #: the adapter context (context.py): padding mask, aux losses, routing statistics, step updates
        self.context = adapter_context(model)
        self.routing_stats = routing_stats
        self.routing_stats_every = max(int(routing_stats_every), 1)  # record one training batch in N
        self.optim_cfg = dict(optim)
        # the coefficient belongs to the model (its adapter config): a different one here would be a second objective
        if aux_loss_coeff is not None and float(aux_loss_coeff) != self.context.aux_loss_coeff:
            raise ConfigError(f"AdapterLM(aux_loss_coeff={aux_loss_coeff}) differs from the model's adapter.aux_loss_coeff="
                              f"{self.context.aux_loss_coeff}: the objective is the model's outputs.loss; leave it out")
        self.aux_loss_coeff = self.context.aux_loss_coeff
        self.strict_loading = False  # checkpoints hold adapter tensors only

    def forward(self, batch: Mapping[str, torch.Tensor]):
        # Nothing but the model call: the adapter context reads the attention mask from it. A packed batch
        # (comol/data/packing.py) brings position_ids instead and, with a padding tail, its token mask.
        extra = {k: batch[k] for k in ("position_ids", TOKEN_MASK_KWARG) if k in batch}
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                          labels=batch["labels"], **extra)

    def training_step(self, batch, batch_idx):
        out = self(batch)  # out.loss: LM loss + aux_loss_coeff x aux (the model's objective)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out["lm_loss"].detach(), prog_bar=True, batch_size=bs)
        aux = out.get("aux_loss")
        if aux is not None:
            self.log("train/aux_loss", aux.detach(), batch_size=bs)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return out.loss

    # -- routing statistics: recorded in one training batch in N, logged at that batch's step ----
    def on_fit_start(self) -> None:
        self.context.routing.enabled = False

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # recording costs a few small ops per routed module (launch-bound on a GPU): sample 1 batch in N
        self.context.routing.enabled = self.routing_stats and batch_idx % self.routing_stats_every == 0
        # the optimizer steps done before this forward: the step Lightning logs this batch's train/loss at
        self._routing_step = self.trainer.global_step

    def on_fit_end(self) -> None:
        self.context.routing.enabled = False
        self.context.routing.reset()

    def on_validation_start(self) -> None:
        self._routing_was, self.context.routing.enabled = self.context.routing.enabled, False

    def on_validation_end(self) -> None:
        self.context.routing.enabled = getattr(self, "_routing_was", False)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        routing = self.context.routing
        if not (self.routing_stats and routing.enabled):
            return
        stats = routing.summary()  # the one host sync, on the recorded batch only
        routing.reset()
        if stats:
            # to the loggers at the recorded step only (self.log would repeat the value at every later
            # logging step until the next record); callbacks still see the latest values
            self.log_dict(stats, on_step=True, on_epoch=False, logger=False, batch_size=batch["input_ids"].shape[0])
            for lg in self.loggers:
                lg.log_metrics(stats, step=self._routing_step)

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # Lightning would log validation metrics at the count of batches that stepped *before* this
        # one's step (global_step - 1 after a training batch): plot val/loss at the optimizer step whose
        # weights it measured ("step" is Lightning's key for the logging step)
        if not self.trainer.sanity_checking:
            self.log("step", float(self.trainer.global_step), on_step=False, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("no trainable parameters: the adapter injected nothing trainable")
        cfg = self.optim_cfg
        opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay", 0.0)),
                                betas=tuple(cfg.get("betas", (0.9, 0.999))))
        warmup = int(cfg.get("warmup_steps", 0))
        if cfg.get("schedule", "constant") == "cosine":
            sched = get_cosine_schedule_with_warmup(opt, warmup, max(int(self.trainer.estimated_stepping_batches), 1))
        else:
            sched = get_constant_schedule_with_warmup(opt, warmup)
        # state kept outside the optimizer (FlyLoRA's routing bias) updates after every optimizer step
        self.context.attach_optimizer(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep only adapter tensors: the frozen base is rebuilt from its config/hub id.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_name(k)}
