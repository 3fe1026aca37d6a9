"""The adapter context: one explicit channel between whatever drives a model and its adapters.

``inject_adapter`` gives every adapted model one ``AdapterContext``, installed as a forward
pre-hook on the top-level model. At the start of each forward it records the ``attention_mask``
the caller passed (so routed adapters leave padding out of their losses and statistics) and opens
a new forward scope (aux losses of the previous forward are dropped). A packed batch
(comol/data/packing.py) has no attention mask: without padding every token is real (mask None);
with a padding tail its real-token mask comes as the keyword ``comol_token_mask``, which the hook
takes off the call before the model sees it. Adapter layers are bound
to it (``bind_context``) and talk to it only:

* ``token_mask(x)``: the padding mask flattened to the tokens of a layer input ``x``;
* ``add_aux_loss(loss)`` / ``aux_loss()``: auxiliary routing losses of the current forward;
* ``first_call(layer)``: False when a layer runs again inside one forward scope (gradient
  checkpointing re-runs layers during backward), so nothing is counted twice;
* ``on_optimizer_step(fn)``: state kept outside the optimizer (FlyLoRA's routing bias) is updated
  once per optimizer step. Nobody has to wire it: the first training forward registers a torch
  global optimizer step post-hook that runs the updates after each ``step()`` of any optimizer
  holding this model's trainable tensors (a plain loop, HF Trainer, TRL, Lightning, DDP alike).
  ``attach_optimizer(optimizer)`` ties them to one optimizer explicitly instead;
* ``routing``: routing statistics accumulated on the device (comol/adapters/routing_stats.py).

The training objective lives in the model's output: a forward hook on the top-level model adds
``aux_loss_coeff x aux`` to ``outputs.loss`` whenever the caller passed labels (as transformers'
MoE models do with ``router_aux_loss_coef``), and exposes the parts as ``outputs.lm_loss`` and
``outputs.aux_loss``. So every trainer that reads ``outputs.loss`` optimises the same objective.

So an adapted model driven by any loop behaves exactly as under the LightningModule, with no
module-global state. Every hook is kept as a handle; ``remove()`` takes them all off.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from comol.adapters.routing_stats import RoutingStats
from comol.errors import ComolError

CONTEXT_ATTR = "comol_adapter_context"
#: keyword of a packed batch's real-token mask [B, S] (comol/data/packing.py), consumed by the context
TOKEN_MASK_KWARG = "comol_token_mask"


class AdapterContext:
    """Forward-scoped state shared by the adapter layers of one model (see module docstring)."""

    def __init__(self, aux_loss_coeff: float = 0.0) -> None:
        #: weight of the summed auxiliary losses in the model's ``outputs.loss`` (the adapter config's)
        self.aux_loss_coeff = float(aux_loss_coeff)
        self.attention_mask: torch.Tensor | None = None  # [B, S] bool of the current forward
        self.forward_id = 0
        self.routing = RoutingStats()
        self._aux: list[torch.Tensor] = []
        self._layers: list[nn.Module] = []  # the bound layers: their "ran in this scope" flags are reset per scope
        self._step_hooks: list[Callable[[], None]] = []
        self._handles: list[RemovableHandle] = []
        self._attached: set[int] = set()  # id() of optimizers attached explicitly
        self._trainable: frozenset[int] = frozenset()  # id() of the model's trainable tensors
        self._owns: dict[int, bool] = {}  # id(optimizer) -> it holds one of those tensors
        self._watcher: int | None = None  # id(self) once the global step hook is registered (a deep copy re-registers)

    # -- installation -----------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Hook the top-level ``model`` and bind every adapter module found in it."""
        object.__setattr__(model, CONTEXT_ATTR, self)
        self.keep(model.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        self.keep(model.register_forward_hook(self._end_forward, with_kwargs=True))
        for name, module in model.named_modules():
            bind = getattr(type(module), "bind_context", None)
            if bind is not None and module is not model:
                bind(module, self, name)

    def keep(self, handle: RemovableHandle) -> RemovableHandle:
        """Keep a hook handle (adapters register their submodule hooks through this)."""
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook this context and its adapters registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._watcher = None

    # -- one forward scope ------------------------------------------------------------------
    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        packed = kwargs.pop(TOKEN_MASK_KWARG, None)
        mask = packed if packed is not None else kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.attention_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._new_scope()
        if module.training and torch.is_grad_enabled() and self._step_hooks and self._watcher != id(self):
            self._watch_optimizers(module)
        return args, kwargs

    def _end_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Put the whole objective in ``output.loss`` (LM loss + coeff x aux) when the model computed a loss."""
        if isinstance(output, dict):  # ModelOutput is an OrderedDict
            lm = output.get("loss")
            if not isinstance(lm, torch.Tensor):
                return output
            aux = self.aux_loss()
            output["lm_loss"] = lm
            if aux is not None:
                output["aux_loss"] = aux
                if self.aux_loss_coeff > 0:
                    weighted = self.aux_loss_coeff * aux.to(lm.dtype)
                    output["loss"] = lm + weighted
                    if isinstance(output.get("log_probs"), torch.Tensor) and isinstance(output.get("label_mask"), torch.Tensor):
                        fold_into_log_probs(output, weighted, kwargs.get("num_items_in_batch"))
            return output
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
            aux = self.aux_loss()  # return_dict=False with labels: (loss, logits, ...)
            if aux is not None and self.aux_loss_coeff > 0:
                return (output[0] + self.aux_loss_coeff * aux.to(output[0].dtype), *output[1:])
        return output

    @contextlib.contextmanager
    def masked(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Use ``mask`` [B, T] for calls made directly to adapter layers (not through the model)."""
        previous = self.attention_mask
        self.attention_mask = None if mask is None else mask.bool()
        self._new_scope()
        try:
            yield
        finally:
            self.attention_mask = previous

    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """[T] bool over the tokens of ``x`` [B, T, d] (True = real token), or None without a mask.

        With a KV cache the mask covers past + new tokens; the new ones are its last T columns.
        """
        mask = self.attention_mask
        if mask is None:
            return None
        if x.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            raise ComolError(
                f"adapter context: the model was called with attention_mask of shape {tuple(mask.shape)}, but an "
                f"adapter layer got input of shape {tuple(x.shape)}; call adapter layers through the model, or "
                f"wrap direct calls in `with context.masked(mask):`"
            )
        return mask[:, -x.shape[1]:].to(x.device).reshape(-1)

    def _new_scope(self) -> None:
        """Open a forward scope: no aux losses yet, no layer has run in it (outside any compiled region)."""
        self.forward_id += 1
        self._aux = []
        for layer in self._layers:   # outside any compiled region: skip nn.Module.__setattr__'s checks
            object.__setattr__(layer, "_comol_ran", False)

    def track(self, layer: nn.Module) -> None:
        """Reset ``layer``'s "ran in this scope" flag whenever a forward scope opens (``first_call``)."""
        self._layers.append(layer)

    def first_call(self, layer: nn.Module) -> bool:
        """True the first time ``layer`` runs in this forward scope (False for checkpoint re-runs).

        A per-layer flag, reset when a scope opens, rather than a table keyed by ``id(layer)`` or a
        comparison with ``forward_id``: under torch.compile those are constants the graph is guarded on,
        so every layer and every forward would compile anew (and fall back to eager at the recompile limit).
        A flag is the same False in every block: one compiled graph serves them all."""
        if layer._comol_ran:
            return False
        layer._comol_ran = True
        return True

    # -- auxiliary losses -------------------------------------------------------------------
    def add_aux_loss(self, loss: torch.Tensor) -> None:
        self._aux.append(loss)

    @property
    def aux_losses(self) -> tuple[torch.Tensor, ...]:
        """The auxiliary losses added in the current forward, one per routed module call."""
        return tuple(self._aux)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses of the current forward (fp32), or None if none."""
        return torch.stack([a.float() for a in self._aux]).sum() if self._aux else None

    # -- once per optimizer step ------------------------------------------------------------
    def on_optimizer_step(self, fn: Callable[[], None]) -> None:
        self._step_hooks.append(fn)

    def optimizer_step(self) -> None:
        for fn in self._step_hooks:
            fn()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run the adapters' per-step updates after every ``optimizer.step()`` of this optimizer (the
        automatic watch of the first training forward then leaves it alone: one update per step)."""
        self._attached.add(id(optimizer))
        return self.keep(optimizer.register_step_post_hook(lambda *_: self.optimizer_step()))

    def _watch_optimizers(self, model: nn.Module) -> None:
        """Register (once) a global optimizer step post-hook: after the ``step()`` of any optimizer that
        holds this model's trainable tensors and was not attached explicitly, run the per-step updates."""
        self._trainable = frozenset(id(p) for p in model.parameters() if p.requires_grad)
        self._owns = {}
        self._watcher = id(self)
        ref = weakref.ref(self)

        def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            ctx = ref()
            if ctx is not None and ctx._holds(optimizer):
                ctx.optimizer_step()

        self.keep(register_optimizer_step_post_hook(after_step))

    def _holds(self, optimizer: torch.optim.Optimizer) -> bool:
        key = id(optimizer)
        if key in self._attached:
            return False
        if key not in self._owns:
            self._owns[key] = any(id(p) in self._trainable for g in optimizer.param_groups for p in g["params"])
        return self._owns[key]


def fold_into_log_probs(output: dict, weighted_aux: torch.Tensor, num_items: Any) -> None:
    """TRL's SFTTrainer (its fused LM head) computes the loss from ``output.log_probs`` as
    ``-log_probs.sum() / n`` (n: ``num_items_in_batch`` when given, else ``label_mask.sum()``), not from
    ``output.loss``. Subtract ``n x weighted_aux`` from the first log-prob so that sum gives the same
    objective (LM loss + coeff x aux); per-token metrics (entropy, accuracy) are read from other fields."""
    log_probs = output["log_probs"]
    n = output["label_mask"].sum() if num_items is None else torch.as_tensor(num_items)
    n = n.to(device=log_probs.device, dtype=log_probs.dtype).clamp(min=1)
    first = torch.zeros_like(log_probs)
    first.view(-1)[0] = 1.0
    output["log_probs"] = log_probs - first * (n * weighted_aux.to(log_probs.dtype))


def adapter_context(model: nn.Module) -> AdapterContext:
    """The context of an adapted model (ComolError when no adapter was injected)."""
    ctx = getattr(model, CONTEXT_ATTR, None)
    if ctx is None:
        raise ComolError(f"{type(model).__name__} carries no adapter context: call comol.adapters.inject_adapter first")
    return ctx


def attach_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Public shortcut: ``adapter_context(model).attach_optimizer(optimizer)``."""
    return adapter_context(model).attach_optimizer(optimizer)


class ContextBound:
    """Mixin for adapter modules that use the context; unbound modules get a private one."""

    _context: AdapterContext | None = None
    _context_name: str = ""
    _comol_ran: bool = False   # ran in the current forward scope (AdapterContext.first_call)

    def bind_context(self, ctx: AdapterContext, name: str) -> None:
        object.__setattr__(self, "_context", ctx)
        object.__setattr__(self, "_context_name", name)
        ctx.track(self)
        for handle in getattr(self, "hooks", ()):  # submodule hooks: removed with the context
            ctx.keep(handle)
        self.on_bind(ctx)

    def on_bind(self, ctx: AdapterContext) -> None:
        """Subclass hook (e.g. register a per-optimizer-step update)."""

    @property
    def context(self) -> AdapterContext:
        if self._context is None:   # an unbound layer: a private context whose scopes are its own
            ctx = AdapterContext()
            ctx.track(self)
            object.__setattr__(self, "_context", ctx)
        return self._context
