"""Cases for the mixture-of-LoRA baselines (docs/methods.md §2): MoLoRA, HydraLoRA, MoLA, MoLE, AdaMoLE,
FlyLoRA, DenseLoRA and CoMoL-sh.

The naive formulas below loop over tokens and experts and only read the module's tensors; they
share no code with comol.adapters (selection by Python sorting, GELU from erf, ...).
"""

import math

import torch

from adapter_cases import AdapterCase
from cases_core import naive_comol


def _softmax(v):
    e = torch.exp(v - v.max())
    return e / e.sum()


def _expert(mod, i, xt):
    """s · B_i A_i x for stacked experts."""
    return mod.scaling * (mod.adapter_B[i] @ (mod.adapter_A[i] @ xt))


def _mix(mod, x, weights_fn):
    """Per token: sum over experts with a weight dict {i: w_i} from weights_fn(probs, x_t)."""
    rows = []
    for t in range(x.shape[0]):
        p = _softmax(mod.adapter_router.weight @ x[t])
        out = torch.zeros(mod.out_features)
        for i, w in weights_fn(p, x[t]).items():
            out = out + w * _expert(mod, i, x[t])
        rows.append(out)
    return torch.stack(rows)


def naive_molora(mod, x):
    return _mix(mod, x, lambda p, xt: {i: p[i] for i in range(p.shape[0])})


def naive_hydralora(mod, x):
    rows = []
    for t in range(x.shape[0]):
        p = _softmax(mod.adapter_router.weight @ x[t])
        z = mod.adapter_A @ x[t]
        rows.append(sum(p[i] * mod.scaling * (mod.adapter_B[i] @ z) for i in range(p.shape[0])))
    return torch.stack(rows)


def _renorm(p, chosen):
    total = sum(p[i] for i in chosen)
    return {i: p[i] / total for i in chosen}


def naive_mola(mod, x):
    def weights(p, xt):
        order = sorted(range(p.shape[0]), key=lambda i: -p[i].item())
        return _renorm(p, order[: mod.top_k])
    return _mix(mod, x, weights)


def naive_mole(mod, x):
    def weights(p, xt):
        best = max(range(p.shape[0]), key=lambda i: p[i].item())
        chosen = sorted({i for i in range(p.shape[0]) if p[i].item() >= mod.threshold} | {best})
        return _renorm(p, chosen)
    return _mix(mod, x, weights)


def naive_adamole(mod, x):
    def weights(p, xt):
        logit = mod.adapter_threshold.weight[0] @ xt + mod.adapter_threshold.bias[0]
        tau = mod.tau_max / (1 + torch.exp(-logit))
        a = p - tau
        chosen = [i for i in range(p.shape[0]) if a[i].item() >= 0]
        total = sum(a[i] for i in chosen)
        if not chosen or total.item() == 0.0:
            return {}
        return {i: a[i] / total for i in chosen}
    return _mix(mod, x, weights)


def naive_flylora(mod, x):
    rows = []
    r, k = mod.adapter_A.shape[0], mod.top_k
    for t in range(x.shape[0]):
        a = mod.adapter_A @ x[t]
        score = [(a[j] + mod.adapter_router_bias[j]).item() for j in range(r)]
        keep = sorted(range(r), key=lambda j: -score[j])[:k]
        out = torch.zeros(mod.out_features)
        for j in keep:
            out = out + a[j] * mod.adapter_B[:, j]
        rows.append(mod.scaling * out)
    return torch.stack(rows)


def _gelu(v):
    return 0.5 * v * (1 + torch.erf(v / math.sqrt(2.0)))


def naive_denselora(mod, x):
    A, B, C = mod._shared.adapter_A, mod._shared.adapter_B, mod.adapter_C
    return torch.stack([mod.scaling * _gelu(B @ (C @ _gelu(A @ x[t]))) for t in range(x.shape[0])])


def moe_count(r, n_exp):
    return lambda n, m: n_exp * r * (n + m) + n_exp * n


def _adapted_by_type(model):
    from comol.adapters import AdapterLinear

    types: dict[str, list] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterLinear):
            types.setdefault(name.rsplit(".", 1)[-1], []).append(mod)
    return types


def layer_shared_count(r, per_module):
    """sum over projection types t of r (n_t + m_t) + sum over modules of per_module(n, m)."""
    def count(model):
        total = 0
        for mods in _adapted_by_type(model).values():
            total += r * (mods[0].in_features + mods[0].out_features)
            total += sum(per_module(m.in_features, m.out_features) for m in mods)
        return total
    return count


CASES = [
    AdapterCase("molora", {"name": "molora", "r": 4, "alpha": 8, "num_experts": 3, "dropout": 0.0},
                naive=naive_molora, count=moe_count(4, 3)),
    AdapterCase("hydralora", {"name": "hydralora", "r": 4, "alpha": 2, "num_experts": 3, "dropout": 0.0},
                naive=naive_hydralora, count=lambda n, m: 4 * n + 3 * 4 * m + 3 * n),
    AdapterCase("mola", {"name": "mola", "r": 4, "num_experts": 4, "top_k": 2, "dropout": 0.0,
                         "aux_loss_coeff": 0.01},
                naive=naive_mola, count=moe_count(4, 4)),
    AdapterCase("mola_top1", {"name": "mola", "r": 2, "alpha": 4, "num_experts": 3, "top_k": 1, "dropout": 0.0},
                naive=naive_mola, count=moe_count(2, 3), families=("qwen3",)),
    AdapterCase("mole", {"name": "mole", "r": 4, "num_experts": 4, "dropout": 0.0, "aux_loss_coeff": 0.01},
                naive=naive_mole, count=moe_count(4, 4)),
    AdapterCase("mole_high_threshold", {"name": "mole", "r": 4, "num_experts": 4, "threshold": 0.6, "dropout": 0.0},
                naive=naive_mole, count=moe_count(4, 4), families=("qwen3",)),
    AdapterCase("adamole", {"name": "adamole", "r": 4, "num_experts": 4, "dropout": 0.0, "aux_loss_coeff": 0.01},
                naive=naive_adamole, count=lambda n, m: 4 * 4 * (n + m) + 4 * n + n + 1),
    AdapterCase("adamole_tau", {"name": "adamole", "r": 4, "num_experts": 3, "tau_max": 0.4, "dropout": 0.0},
                naive=naive_adamole, count=lambda n, m: 3 * 4 * (n + m) + 3 * n + n + 1, families=("qwen3",)),
    AdapterCase("flylora", {"name": "flylora", "r": 8, "alpha": 16, "top_k": 2, "dropout": 0.0},
                naive=naive_flylora, count=lambda n, m: 8 * m),
    AdapterCase("denselora", {"name": "denselora", "r": 8, "alpha": 4, "dropout": 0.0},
                naive=naive_denselora, count_model=layer_shared_count(8, lambda n, m: 8 * 8)),
    AdapterCase("comol_sh", {"name": "comol_sh", "r": 4, "num_experts": 3, "dropout": 0.0},
                naive=naive_comol, count_model=layer_shared_count(4, lambda n, m: 3 * 4 * 4 + 3 * 4)),
    AdapterCase("comol_sh_nocr", {"name": "comol_sh", "r": 4, "num_experts": 5, "core_router": False,
                                  "dropout": 0.0}, naive=naive_comol,
                count_model=layer_shared_count(4, lambda n, m: 5 * 4 * 4 + 5 * n), families=("qwen3",)),
]
