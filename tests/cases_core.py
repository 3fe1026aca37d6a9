"""Cases for the adapters of the walking skeleton: LoRA and CoMoL (both routers, both mixing forms)."""

import torch

from adapter_cases import AdapterCase


def naive_lora(mod, x):
    s = mod.scaling
    return s * (x @ mod.adapter_A.T @ mod.adapter_B.T)


def naive_comol(mod, x):
    """Per-token loop of docs/methods.md §1: h - Wx = s·B·(sum_i g_i M_i)·(A x)."""
    A, B, M, Wg = mod.lora_A, mod.lora_B, mod.adapter_cores, mod.adapter_router.weight
    rows = []
    for t in range(x.shape[0]):
        z = A @ x[t]
        g = torch.softmax(Wg @ (z if mod.core_router else x[t]), dim=0)
        merged = sum(g[i] * M[i] for i in range(M.shape[0]))
        rows.append(mod.scaling * (B @ (merged @ z)))
    return torch.stack(rows)


def comol_count(r, n_exp, cr):
    return lambda n, m: r * (n + m) + n_exp * r * r + n_exp * (r if cr else n)


CASES = [
    AdapterCase("lora", {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, naive=naive_lora,
                count=lambda n, m: 4 * (n + m)),
    AdapterCase("comol", {"name": "comol", "r": 4, "num_experts": 3, "dropout": 0.0}, naive=naive_comol,
                count=comol_count(4, 3, True)),
    AdapterCase("comol_merged", {"name": "comol", "r": 4, "num_experts": 3, "dropout": 0.0, "mixing": "merged"},
                naive=naive_comol, count=comol_count(4, 3, True)),
    AdapterCase("comol_nocr", {"name": "comol", "r": 4, "alpha": 2, "num_experts": 5, "core_router": False,
                               "dropout": 0.0}, naive=naive_comol, count=comol_count(4, 5, False)),
    AdapterCase("comol_nocr_merged", {"name": "comol", "r": 4, "num_experts": 5, "core_router": False,
                                      "dropout": 0.0, "mixing": "merged"}, naive=naive_comol,
                count=comol_count(4, 5, False)),
]
