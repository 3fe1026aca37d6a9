"""Building blocks of the block-level adapters of the MoA paper (docs/methods.md §3).

They hook into transformers' Llama / Qwen3 decoder layers without forking the modeling files:

* ``GatedLoraLinear`` replaces a targeted ``nn.Linear`` (q/k/v/o/down_proj):
  ``h = W x + g · s · B A Drop(x)``.
* ``ParallelAdapter`` (``layer.mlp.adapter_pa``): a forward hook on ``layer.mlp`` adds
  ``g · PA(u)``, ``PA(u) = U · SiLU(D u + b_D) + b_U``, u = the MLP input (post-attention
  normed hidden state). D, U xavier-uniform with gain 1e-4, biases 0 (near, not exact, no-op).
* ``PromptExpert`` (``layer.self_attn.adapter_prompt``): P learnable prompt vectors; keys and
  values through the *frozen* k/v projections (and k_norm where the model has one, no rotary);
  the model's own queries (captured at q_proj, then q_norm + rotary) attend to them with a
  separate softmax; a zero-initialised per-head gate; the result ``g · prompt_out`` is added to
  the o_proj input. Exact no-op at init.
* ``BlockRouter`` (``layer.adapter_moa``): reads the block input, computes one weight per expert
  slot (fp32, autocast off) and hands it to the experts (``expert.route_weight``) for the duration
  of the block's forward.

Gate passing: every expert has a ``route_weight`` attribute, a tensor broadcastable to its
output ([B, T, 1] token level, [B, 1, 1] whole-sequence level) or None (= ungated, weight 1:
the stand-alone ``prompt`` and ``parallel_adapter`` methods). The router sets it in a forward
pre-hook on ``self_attn`` (the first expert consumer) and clears it in a forward hook on
``mlp`` (the last one). All hooks sit on submodules that the decoder layer calls inside its
``forward``: transformers' gradient checkpointing re-runs ``forward`` (not the layer's own hooks)
during backward, so the replay recomputes the same weights.

Adapter parameters are fp32 whatever the backbone dtype (like ``AdapterLinear``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from comol.adapters.base import ADAPTER_PREFIX, AdapterLinear, kaiming_uniform_
from comol.adapters.context import AdapterContext, ContextBound
from comol.adapters.gating import fp32_linear
from comol.errors import ComolError, ConfigError
from comol.adapters.base import TOKEN_ROUTED, NoWeightDelta

ROUTER_KINDS = ("linear", "swiglu")
ROUTER_INPUTS = ("normed", "raw")
ROUTER_LEVELS = ("token", "instance")
INSTANCE_POOLINGS = ("causal", "full")
THRESHOLD_MODES = ("hard", "ste", "margin")


# --- helpers -------------------------------------------------------------------------------

def frozen_linear(module: nn.Module) -> nn.Linear:
    """The innermost frozen ``nn.Linear`` of a (possibly adapter-wrapped) projection."""
    while not isinstance(module, nn.Linear) and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def adapter_input(x: torch.Tensor) -> torch.Tensor:
    """Cast to fp32 for the adapter path unless autocast is on (it recasts the matmuls itself)."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(torch.float32)


def apply_route_weight(y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return y if weight is None else y * weight


def _factory(module: nn.Module) -> dict[str, Any]:
    return {"device": next(module.parameters()).device, "dtype": torch.float32}


def _has_path(root: nn.Module, path: str) -> bool:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


# --- locating decoder blocks ----------------------------------------------------------------

def decoder_layers(model: nn.Module, adapter: str) -> list[nn.Module]:
    """The decoder layers of a Llama/Qwen3-style model (the ``nn.ModuleList`` named ``layers``)."""
    lists = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] == "layers"]
    if len(lists) != 1 or len(lists[0]) == 0:
        raise ConfigError(
            f"adapter {adapter!r} acts on decoder blocks, but model class {type(model).__name__} has no single "
            f"`layers` list of decoder layers (supported: Llama/Qwen3-style decoder layers)"
        )
    return list(lists[0])


def check_block_support(model: nn.Module, layer: nn.Module, required: list[str], adapter: str,
                        needs_rope: bool = False) -> None:
    """ConfigError naming the model class and the missing submodules/attributes, if any."""
    missing = [p for p in required if not _has_path(layer, p)]
    if not missing and needs_rope:
        attn = layer.self_attn
        if not callable(getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)):
            missing.append(f"apply_rotary_pos_emb in {type(attn).__module__}")
    if missing:
        raise ConfigError(
            f"adapter {adapter!r} is not supported on model class {type(model).__name__}: its decoder layer "
            f"{type(layer).__name__} lacks {', '.join(missing)} (supported: Llama/Qwen3-style decoder layers)"
        )


# --- experts ---------------------------------------------------------------------------------

class GatedLoraLinear(AdapterLinear):
    """LoRA on a frozen Linear whose update is scaled by the router weight of its slot."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__(base_layer)
        kw = self.factory_kwargs()
        self.scaling = scaling
        self.adapter_A = nn.Parameter(kaiming_uniform_(torch.empty(r, self.in_features, **kw)))
        self.adapter_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.adapter_dropout = nn.Dropout(dropout)
        self.route_weight: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        raise NoWeightDelta(TOKEN_ROUTED)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(self.adapter_dropout(x), self.adapter_A), self.adapter_B) * self.scaling
        return apply_route_weight(y, self.route_weight)


class ParallelAdapter(ContextBound, nn.Module):
    """PA(u) = U · SiLU(D u + b_D) + b_U added to the MLP output; lives at ``mlp.adapter_pa``."""

    def __init__(self, mlp: nn.Module, hidden_size: int, adapter_size: int):
        super().__init__()
        kw = _factory(mlp)
        self.down = nn.Linear(hidden_size, adapter_size, **kw)
        self.up = nn.Linear(adapter_size, hidden_size, **kw)
        for lin in (self.down, self.up):
            nn.init.xavier_uniform_(lin.weight, gain=1e-4)
            nn.init.zeros_(lin.bias)
        self.route_weight: torch.Tensor | None = None
        self.hooks = [mlp.register_forward_hook(self._add)]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.up(F.silu(self.down(adapter_input(u))))

    def _add(self, mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + apply_route_weight(self(args[0]), self.route_weight).to(output.dtype)


class PromptExpert(ContextBound, nn.Module):
    """P prompt vectors attended by the layer's queries; lives at ``self_attn.adapter_prompt``."""

    def __init__(self, attn: nn.Module, length: int):
        super().__init__()
        kw = _factory(attn)
        q, k = frozen_linear(attn.q_proj), frozen_linear(attn.k_proj)
        self.head_dim = int(attn.head_dim)
        self.num_heads = q.out_features // self.head_dim
        self.num_kv_heads = k.out_features // self.head_dim
        self.prompts = nn.Parameter(torch.randn(length, q.in_features, **kw))  # like nn.Embedding's N(0, 1)
        self.head_gate = nn.Parameter(torch.zeros(self.num_heads, **kw))
        self.route_weight: torch.Tensor | None = None
        object.__setattr__(self, "_attn", attn)  # back-reference, not a submodule
        self._rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")
        self._queries: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        self.hooks = [attn.register_forward_pre_hook(self._capture_rotary, with_kwargs=True),
                      attn.q_proj.register_forward_hook(self._capture_queries),
                      attn.o_proj.register_forward_pre_hook(self._add)]

    # hooks
    def _capture_rotary(self, attn: nn.Module, args: tuple, kwargs: dict) -> None:
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise ComolError(f"prompt expert: {type(attn).__name__} was called without position_embeddings")
        self._cos_sin = pe

    def _capture_queries(self, q_proj: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._queries = output

    def _add(self, o_proj: nn.Module, args: tuple) -> tuple:
        x = args[0]
        queries, (cos, sin) = self._queries, self._cos_sin
        self._queries = self._cos_sin = None
        y = apply_route_weight(self.attend(queries, cos, sin), self.route_weight)
        return (x + y.to(x.dtype), *args[1:])

    def prompt_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prompts, [heads, P, head_dim] each (KV heads repeated for GQA)."""
        attn, hd = self._attn, self.head_dim
        k_lin, v_lin = frozen_linear(attn.k_proj), frozen_linear(attn.v_proj)
        p = self.prompts
        keys = F.linear(p.to(k_lin.weight.dtype), k_lin.weight, k_lin.bias).view(len(p), self.num_kv_heads, hd)
        if hasattr(attn, "k_norm"):
            keys = attn.k_norm(keys)
        values = F.linear(p.to(v_lin.weight.dtype), v_lin.weight, v_lin.bias).view(len(p), self.num_kv_heads, hd)
        groups = self.num_heads // self.num_kv_heads
        return (keys.transpose(0, 1).repeat_interleave(groups, dim=0),
                values.transpose(0, 1).repeat_interleave(groups, dim=0))

    def attend(self, queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """gate_h · softmax(q_h K_h^T · scaling) V_h for every head, flattened to [B, T, heads·head_dim]."""
        attn = self._attn
        b, t = queries.shape[:2]
        q = queries.view(b, t, self.num_heads, self.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q, _ = self._rope(q.transpose(1, 2), q.transpose(1, 2), cos, sin)  # [B, H, T, hd]
        keys, values = self.prompt_keys_values()
        q, keys, values = adapter_input(q), adapter_input(keys), adapter_input(values)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * attn.scaling  # [B, H, T, P]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out = torch.matmul(probs * self.head_gate.view(1, -1, 1, 1).to(values.dtype), values)
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)


# --- router ------------------------------------------------------------------------------

class Router(nn.Module):
    """Logits for K expert slots: Linear (d -> K) or SwiGLU ``w2(SiLU(w1 u) ⊙ w3 u)`` with hidden h.

    fp32 parameters; evaluated in fp32 with autocast off. SwiGLU biases start at zero; the
    Linear router keeps PyTorch's default init (both as in the MoA code).
    """

    def __init__(self, d: int, k: int, kind: str, hidden: int, bias: bool, device: torch.device):
        super().__init__()
        kw = {"device": device, "dtype": torch.float32}
        self.kind = kind
        if kind == "linear":
            self.proj = nn.Linear(d, k, bias=bias, **kw)
        else:
            self.w1 = nn.Linear(d, hidden, bias=bias, **kw)
            self.w3 = nn.Linear(d, hidden, bias=bias, **kw)
            self.w2 = nn.Linear(hidden, k, bias=bias, **kw)
            if bias:
                for lin in (self.w1, self.w2, self.w3):
                    nn.init.zeros_(lin.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        with torch.autocast(u.device.type, enabled=False):
            u = u.float()
            if self.kind == "linear":
                return fp32_linear(u, self.proj.weight, self.proj.bias)
            hidden = F.silu(fp32_linear(u, self.w1.weight, self.w1.bias)) * fp32_linear(u, self.w3.weight, self.w3.bias)
            return fp32_linear(hidden, self.w2.weight, self.w2.bias)


def select_by_threshold(w: torch.Tensor, tau: torch.Tensor, mode: str) -> torch.Tensor:
    """Sparse MoA selection: expert i is kept on a token when w_i >= tau(x).

    hard:   w_i · 1[w_i >= tau]  (official code: tau gets no gradient)
    ste:    same forward; backward treats 1[w_i >= tau] as (w_i - tau) (straight-through), so tau learns
    margin: (w_i - tau) · 1[w_i >= tau]  (the threshold enters the weight itself)
    """
    hard = (w >= tau).to(w.dtype)
    if mode == "hard":
        return w * hard
    if mode == "ste":
        soft = w - tau
        return w * (hard + soft - soft.detach())
    return (w - tau) * hard


def padding_mask(u: torch.Tensor, attn_kwargs: dict, past_len: int, ctx: AdapterContext | None = None) -> torch.Tensor:
    """[B, T] bool, True for real (non-padding) tokens of the block input ``u`` [B, T, d].

    Order of preference: the model's ``AdapterContext`` (the attention mask the model was called
    with), then the layer's attention mask (2D [B, kv], or a 4D bool/additive mask whose
    diagonal entry says whether a token may attend to itself — padding may not), else all True.
    """
    b, t = u.shape[:2]
    flat = ctx.token_mask(u) if ctx is not None else None
    if flat is not None:
        return flat.view(b, t)
    mask = attn_kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] == b:
        if mask.dim() == 2 and mask.shape[1] >= t:
            return mask[:, -t:].bool()
        if mask.dim() == 4 and mask.shape[-2] == t and mask.shape[-1] >= past_len + t:
            idx = torch.arange(t, device=mask.device)
            diag = mask[:, 0, idx, past_len + idx]
            return diag if diag.dtype == torch.bool else diag == 0
    return torch.ones(b, t, dtype=torch.bool, device=u.device)


class BlockRouter(ContextBound, nn.Module):
    """Per-block router (``layer.adapter_moa``): sigmoid weight per expert slot from the block input.

    ``level="token"``: one weight vector per token. ``level="instance"``: one per sequence
    position computed from the mean of the block input over non-padding tokens — the prefix
    up to that position (``pooling="causal"``, no look-ahead, identical with and without the KV
    cache) or the whole sequence seen so far (``pooling="full"``, one vector per sequence; in
    teacher-forced training every position then sees the future tokens' mean).
    With a threshold (Sparse MoA): tau(x) = max_threshold · sigmoid(w_t·x + b_t), see
    ``select_by_threshold``.
    """

    def __init__(self, layer: nn.Module, experts: list[tuple[nn.Module, int]], num_slots: int, *, kind: str,
                 hidden_mult: int, bias: bool, router_input: str, level: str, pooling: str,
                 max_threshold: float | None = None, threshold_mode: str = "hard"):
        super().__init__()
        d = layer.input_layernorm.weight.shape[-1]
        device = next(layer.parameters()).device
        self.router = Router(d, num_slots, kind, num_slots * hidden_mult, bias, device)
        self.threshold = nn.Linear(d, 1, device=device, dtype=torch.float32) if max_threshold is not None else None
        self.max_threshold, self.threshold_mode = max_threshold, threshold_mode
        self.router_input, self.level, self.pooling = router_input, level, pooling
        object.__setattr__(self, "_experts", list(experts))  # references, not submodules
        self._raw_input: torch.Tensor | None = None
        #: instance level with a KV cache: (sum [B, d], count [B, 1], tokens seen) of the pooled prefix
        self._prefix: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._layer_idx = getattr(layer.self_attn, "layer_idx", None)
        self.hooks = [layer.self_attn.register_forward_pre_hook(self._route, with_kwargs=True),
                      layer.mlp.register_forward_hook(self._clear)]
        if router_input == "raw":
            self.hooks.append(layer.input_layernorm.register_forward_pre_hook(self._stash_raw))

    # hooks
    def _stash_raw(self, norm: nn.Module, args: tuple) -> None:
        self._raw_input = args[0]

    def _route(self, attn: nn.Module, args: tuple, kwargs: dict) -> None:
        normed = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        u = self._raw_input if self.router_input == "raw" else normed
        # the decoder layer passes its KV cache as `cache` (transformers >= 5.2x) or `past_key_values` (before)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past_len = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past_len = int(cache.get_seq_length(self._layer_idx or 0))
        weights = self.weights(u, kwargs, past_len, caching=cache is not None)
        routing = self.context.routing
        if routing.enabled and self.context.first_call(self):
            per_token = weights.shape[1] == u.shape[1]
            mask = padding_mask(u, kwargs, past_len, self.context).reshape(-1) if per_token else None
            routing.record(self._context_name, weights.reshape(-1, weights.shape[-1]), mask,
                           selected=(weights > 0) if self.threshold is not None else None)
        for module, slot in self._experts:
            module.route_weight = weights[..., slot:slot + 1]

    def _clear(self, mlp: nn.Module, args: tuple, output: Any) -> None:
        for module, _ in self._experts:
            module.route_weight = None
        self._raw_input = None

    # routing
    def weights(self, u: torch.Tensor, attn_kwargs: dict | None = None, past_len: int = 0,
                caching: bool = False) -> torch.Tensor:
        """Expert weights [B, T, K] (token / causal instance) or [B, 1, K] (full instance), fp32."""
        with torch.autocast(u.device.type, enabled=False):
            x = u.float()
            if self.level == "instance":
                x = self.pool(x, padding_mask(u, attn_kwargs or {}, past_len, self.context), past_len, caching)
            w = torch.sigmoid(self.router(x))
            if self.threshold is not None:
                tau = self.max_threshold * torch.sigmoid(fp32_linear(x, self.threshold.weight, self.threshold.bias))
                w = select_by_threshold(w, tau, self.threshold_mode)
            return w

    def pool(self, x: torch.Tensor, valid: torch.Tensor, past_len: int, caching: bool) -> torch.Tensor:
        """Mean of ``x`` over valid tokens: per-position prefix mean (causal) or sequence mean (full).

        With a KV cache, the sums of the tokens already seen are carried over from the previous call
        of this layer (detached: the cache serves generation); a cache this router did not see raises.
        """
        b = x.shape[0]
        m = valid.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
        if past_len > 0:
            if self._prefix is None or self._prefix[2] != past_len or self._prefix[0].shape[0] != b:
                seen = None if self._prefix is None else self._prefix[2]
                raise ComolError(
                    f"instance-level router: the KV cache holds {past_len} tokens but this router saw {seen}; "
                    f"instance statistics can only continue a cache built by this model in the same order"
                )
            prev_sum, prev_cnt = self._prefix[0], self._prefix[1]
        else:
            prev_sum, prev_cnt = x.new_zeros(b, x.shape[-1]), x.new_zeros(b, 1)
        if self.pooling == "causal":
            sums = prev_sum.unsqueeze(1) + (x * m).cumsum(dim=1)
            counts = prev_cnt.unsqueeze(1) + m.cumsum(dim=1)
        else:
            sums = (prev_sum + (x * m).sum(dim=1)).unsqueeze(1)
            counts = (prev_cnt + m.sum(dim=1)).unsqueeze(1)
        if caching:
            self._prefix = (sums[:, -1].detach(), counts[:, -1].detach(), past_len + x.shape[1])
        return sums / counts.clamp_min(1.0)


def attach(parent: nn.Module, attr: str, module: nn.Module) -> nn.Module:
    """Register ``module`` as ``parent.<attr>`` (an ``adapter_`` name, so it is trained and saved)."""
    assert attr.startswith(ADAPTER_PREFIX), attr
    if hasattr(parent, attr):
        raise ConfigError(f"{type(parent).__name__} already carries {attr}: inject one block-level adapter per model")
    parent.add_module(attr, module)
    return module

