"""The LightningModule: causal-LM cross-entropy + weighted auxiliary routing loss, AdamW + warmup schedule."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from comol.adapters import aux_loss, is_adapter_name
from comol.adapters.base import clear_aux_loss, set_token_mask
from comol.errors import ConfigError

SCHEDULES = ("constant", "cosine")


class AdapterLM(L.LightningModule):
    """Trains only the adapter tensors of a wrapped Hugging Face causal LM."""

    def __init__(self, model: torch.nn.Module, optim: Mapping[str, Any], aux_loss_coeff: float = 0.0):
        super().__init__()
        self.model = model
        self.optim_cfg = dict(optim)
        self.aux_loss_coeff = float(aux_loss_coeff)
        if self.optim_cfg.get("schedule", "constant") not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.optim_cfg.get('schedule')!r} is invalid: expected one of {SCHEDULES}")
        self.strict_loading = False  # checkpoints hold adapter tensors only

    def forward(self, batch: Mapping[str, torch.Tensor]):
        clear_aux_loss(self.model)
        # The padding mask stays set until the batch is done (not just this call): with gradient
        # checkpointing, layers are re-run during backward and must see the same mask.
        set_token_mask(batch["attention_mask"])
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    def training_step(self, batch, batch_idx):
        out = self(batch)
        loss = out.loss
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=bs)
        aux = aux_loss(self.model)
        if aux is not None:
            self.log("train/aux_loss", aux.detach(), batch_size=bs)
            if self.aux_loss_coeff > 0:
                loss = loss + self.aux_loss_coeff * aux
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        set_token_mask(None)

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        set_token_mask(None)

    def on_before_optimizer_step(self, optimizer) -> None:
        # State updates outside the optimizer (e.g. FlyLoRA's routing bias) run once per optimizer
        # step (after all micro-batches of a gradient-accumulation cycle), in training only.
        for module in self.model.modules():
            hook = getattr(module, "after_train_step", None)
            if callable(hook) and module is not self.model:
                hook()

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)

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
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep only adapter tensors: the frozen base is rebuilt from its config/hub id.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter_name(k)}
