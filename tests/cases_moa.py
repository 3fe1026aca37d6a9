"""Cases for the block-level adapters of the MoA paper: softmoa (token / instance), sparsemoa,
prompt, parallel_adapter, unipeft. They act on decoder blocks, so ``naive`` is None: the block
formula is checked against an independent re-implementation in tests/test_moa_adapters.py.

Exact no-ops at init: ``prompt`` (zero per-head gate) and any MoA configuration without the
parallel adapter (LoRA B = 0, prompt gate = 0). The parallel adapter (xavier gain 1e-4, biases 0)
is only a *near* no-op, so every case containing it checks its no-op within ``NEAR_NOOP_ATOL``.
"""

from adapter_cases import AdapterCase

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


def _shapes(config) -> dict[str, tuple[int, int]]:
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "down_proj": (config.intermediate_size, d)}


def block_count(*, r=0, targets=LORA_TARGETS, adapter_size=0, prompt_length=0, router=None, slots=0,
                hidden_mult=4, bias=True, threshold=False):
    """Expected trainable parameters, from the model config alone (independent of the adapter code)."""

    def count(model) -> int:
        c = model.config
        d, shapes = c.hidden_size, _shapes(c)
        per_layer = sum(r * (n + m) for n, m in (shapes[t] for t in targets)) if r else 0
        if adapter_size:
            per_layer += 2 * d * adapter_size + adapter_size + d
        if prompt_length:
            per_layer += prompt_length * d + c.num_attention_heads
        if router == "linear":
            per_layer += d * slots + (slots if bias else 0)
        elif router == "swiglu":
            h = slots * hidden_mult
            per_layer += 2 * d * h + h * slots + ((2 * h + slots) if bias else 0)
        if threshold:
            per_layer += d + 1
        return c.num_hidden_layers * per_layer

    return count


MICRO = {"r": 4, "adapter_size": 8, "prompt_length": 3}
#: logits change allowed at init when the parallel adapter is present (its init is tiny, not zero)
NEAR_NOOP_ATOL = 1e-5

CASES = [
    AdapterCase("softmoa", {"name": "softmoa", **MICRO}, noop_atol=NEAR_NOOP_ATOL,
                count_model=block_count(r=4, adapter_size=8, prompt_length=3, router="swiglu", slots=7)),
    AdapterCase("softmoa_instance_full",
                {"name": "softmoa", **MICRO, "router_level": "instance", "instance_pooling": "full", "router": "linear"},
                noop_atol=NEAR_NOOP_ATOL,
                count_model=block_count(r=4, adapter_size=8, prompt_length=3, router="linear", slots=7)),
    AdapterCase("softmoa_instance_causal_no_pa",  # no parallel adapter: an exact no-op at init
                {"name": "softmoa", **MICRO, "router_level": "instance", "parallel_adapter": False,
                 "router_input": "raw", "router_bias": False, "dropout": 0.0},
                count_model=block_count(r=4, prompt_length=3, router="swiglu", slots=6, bias=False)),
    AdapterCase("sparsemoa_ste", {"name": "sparsemoa", **MICRO, "threshold_mode": "ste"}, noop_atol=NEAR_NOOP_ATOL,
                count_model=block_count(r=4, adapter_size=8, router="swiglu", slots=6, threshold=True)),
    AdapterCase("sparsemoa_margin_prompt",
                {"name": "sparsemoa", **MICRO, "threshold_mode": "margin", "prompt_expert": True,
                 "target_modules": ["q_proj", "v_proj"], "max_threshold": 1.0},
                noop_atol=NEAR_NOOP_ATOL,
                count_model=block_count(r=4, targets=("q_proj", "v_proj"), adapter_size=8, prompt_length=3,
                                        router="swiglu", slots=4, threshold=True)),
    AdapterCase("prompt", {"name": "prompt", "prompt_length": 3},
                count_model=block_count(prompt_length=3)),
    AdapterCase("parallel_adapter", {"name": "parallel_adapter", "adapter_size": 8}, noop_atol=NEAR_NOOP_ATOL,
                count_model=block_count(adapter_size=8)),
    AdapterCase("unipeft", {"name": "unipeft", **MICRO}, noop_atol=NEAR_NOOP_ATOL,
                count_model=block_count(r=4, adapter_size=8, prompt_length=3, router="linear", slots=3)),
]
