"""Multi-process training through Lightning (DDP, FSDP) for adapter-only runs.

What every rank shares, and who writes what (docs/multi_gpu.md):

* one run directory: Lightning's subprocess launcher restarts ``python run.py ...`` once per
  extra GPU and, for Hydra apps, adds ``hydra.run.dir=<the parent's run dir>``; ``SameRunDir``
  checks at setup that every rank resolved the same ``paths.output_dir`` (it fails fast on a
  launcher that did not, e.g. ``torchrun`` without an explicit ``hydra.run.dir``);
* training state: DDP averages gradients; FlyLoRA sums its selection counts over ranks before the
  bias update, routing statistics are summed over ranks when summarised, and the load-balancing
  loss uses the global batch (comol/adapters/gating.py), so all three equal a one-device run
  with the global batch;
* data order: ``global_order_sampler`` makes W processes with batch b see, step by step, the very
  rows one process with batch W·b sees (Lightning's own DistributedSampler would draw another order);
* writing: only global rank 0 writes config.yaml, the adapter, predictions and results.json.
  After ``fit`` the process group is closed (``finish_fit``): rank 0 evaluates alone, as a
  one-process job, and the other ranks return. Under FSDP the adapter is first gathered to rank 0
  and put into a freshly built, unsharded model there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy

from comol.training.sampler import ResumableSampler
from comol.errors import ConfigError

log = logging.getLogger(__name__)


def global_rank() -> int:
    """This process's global rank: from the process group once it exists, before that from the
    launcher's environment (RANK / LOCAL_RANK + NODE_RANK, as Lightning reads it); 0 when alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_global_zero() -> bool:
    return global_rank() == 0


def distributed() -> bool:
    """True while a torch.distributed process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_order_sampler(dataset, seed: int, trainer: L.Trainer | None = None) -> ResumableSampler:
    """A shuffling sampler whose global order does not depend on the number of processes.

    Every process draws the same permutation (seeded with ``seed``, reseeded each epoch by Lightning's
    ``set_epoch``) and rank r takes its entries r, r + W, r + 2W, ... So with W processes of batch b,
    the W micro-batches of step k are together exactly batch k of one process with batch W·b (up to
    the last, padded, batch of an epoch). Lightning keeps a DistributedSampler it is given."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    return ResumableSampler(dataset, seed, num_replicas=world, rank=rank)


class SameRunDir(L.Callback):
    """At setup, fail on every rank when the ranks resolved different run directories."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = str(Path(out_dir).resolve())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not distributed():
            return
        dirs: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(dirs, self.out_dir)
        if len(set(dirs)) > 1:
            raise ConfigError(f"ranks resolved different run directories {sorted(set(dirs))}: start every rank with "
                              f"the same hydra.run.dir=<dir> (Lightning's own launcher does this)")


class GatherFullAdapter(L.Callback):
    """Under FSDP, at the end of ``fit`` (all ranks, process group alive), collect the full adapter
    tensors on rank 0 (``state``: name -> CPU tensor, names as in the unwrapped model)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(trainer.strategy, FSDPStrategy) and any(
                type(c).__name__ == "BestAdapterKeeper" for c in trainer.callbacks):
            raise ConfigError("select_best is not supported with trainer=fsdp (its in-memory copies are FSDP "
                              "shards): use trainer=ddp, or select_best=null")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        from comol.adapters import is_adapter_name

        if not isinstance(trainer.strategy, FSDPStrategy):
            return
        full = trainer.strategy.lightning_module_state_dict()  # collective; full tensors on rank 0 only
        if trainer.is_global_zero:
            self.state = {k.removeprefix("model."): v.detach().cpu().clone() for k, v in full.items()
                          if is_adapter_name(k)}


class DistributedRun:
    """The pipeline's multi-process glue: ``callbacks`` for the Trainer, ``finish_fit`` after it."""

    def __init__(self, out_dir: str | Path):
        self.gather = GatherFullAdapter()
        self.callbacks: list[L.Callback] = [SameRunDir(out_dir), self.gather]

    def finish_fit(self, trainer: L.Trainer, model: nn.Module,
                   rebuild: Callable[[], nn.Module]) -> nn.Module | None:
        """Close the process group; return the model rank 0 evaluates with (``rebuild()`` with the
        gathered adapter loaded, when FSDP sharded it), or None on the other ranks."""
        if distributed():
            dist.barrier()
            dist.destroy_process_group()
        if not trainer.is_global_zero:
            return None
        if self.gather.state is None:
            return model
        fresh = rebuild()
        missing = set(self.gather.state) - set(fresh.state_dict())
        if missing:
            raise ConfigError(f"FSDP gathered adapter tensors the rebuilt model lacks: {sorted(missing)[:3]}")
        fresh.load_state_dict(self.gather.state, strict=False)
        return fresh


# -- FSDP: an auto-wrap policy that keeps the trainable adapter tensors in their own units ------------

class AdapterWrapPolicy(CustomPolicy):
    """FSDP units: every decoder layer (a class whose name ends in ``DecoderLayer``), every adapter
    module that wraps a frozen ``base_layer`` (its own trainable tensors only) and, inside it, that
    frozen base layer.

    So no unit mixes frozen and trainable parameters: FSDP allocates and reduce-scatters gradients
    for the adapter units only (torch's FSDP docs advise against mixed units even with
    ``use_orig_params=True``, which Lightning sets by default and which mixed units would need)."""

    def __init__(self, layer_suffixes: Iterable[str] = ("DecoderLayer",)):
        self.layer_suffixes = tuple(layer_suffixes)
        self._base_ids: set[int] = set()
        super().__init__(self._wrap)

    def _wrap(self, module: nn.Module) -> bool:
        # CustomPolicy visits modules parent-first: an adapter is seen before its base layer
        if id(module) in self._base_ids:
            return True
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module):
            own = [p for name, p in module.named_parameters() if not name.startswith("base_layer.")]
            if own and all(p.requires_grad for p in own) and not any(p.requires_grad for p in base.parameters()):
                self._base_ids.add(id(base))
                return True
        return type(module).__name__.endswith(self.layer_suffixes)


# -- gradient checkpointing ---------------------------------------------------------------------------

def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Hugging Face activation (gradient) checkpointing of the decoder layers, non-reentrant
    (torch.utils.checkpoint with ``use_reentrant=False``); transformers also makes the embedding output
    require grad (``enable_input_require_grads``). Training only: Hugging Face checkpoints the layers
    only while the model is in train mode. Adapters count each layer once per forward
    (AdapterContext.first_call), not again when backward re-runs it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
