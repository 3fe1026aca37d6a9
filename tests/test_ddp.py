"""Multi-process training on CPU (gloo): a 2-process DDP run equals a 1-process run with the doubled
batch (adapter tensors, balancing loss, routing statistics); gradient checkpointing changes nothing; the
FSDP wrap policy never mixes frozen and trainable tensors in one unit; an end-to-end
`run.py trainer=ddp_cpu` run shares one run dir and writes once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from comol import ROOT
from comol.adapters import adapter_context, adapter_state_dict, inject_adapter
from comol.adapters.routing_stats import RoutingStats
from comol.config import compose
from comol.data.datamodule import collate_left
from comol.models import load_backbone
from comol.models.lit_module import AdapterLM
from comol.training.callbacks import lightning_trainer_node
from comol.training.distributed import AdapterWrapPolicy, global_order_sampler
from tests.conftest import micro_model_cfg

ARCH = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
        "intermediate_size": 64}
ADAPTERS = {  # dropout 0 everywhere: the two runs must draw no random numbers that could differ
    "comol": {"name": "comol", "r": 4, "alpha": 4, "num_experts": 4, "dropout": 0.0},
    "flylora": {"name": "flylora", "r": 8, "alpha": 8, "top_k": 2, "bias_lr": 0.01, "dropout": 0.0},
    "mola": {"name": "mola", "r": 4, "alpha": 4, "num_experts": 4, "top_k": 2, "dropout": 0.0,
             "aux_loss_coeff": 0.05},
}
PER_RANK_BATCH, STEPS, SEQ = 2, 3, 12
#: tolerance of the DDP == one process comparison of adapter tensors after STEPS AdamW steps at lr 1e-2.
#: Only the order of fp32 additions differs (largest differences seen: 3.6e-6 CoMoL, 2.3e-5 MoLA on one
#: element of 512); Adam divides by sqrt(v), so an element whose gradient is ~0 can turn rounding noise into
#: a step of up to ~lr. A real mismatch (another data split, local FlyLoRA counts, local balancing loss)
#: moves tensors by ~lr = 1e-2, 100x this tolerance.
ATOL = 1e-4
AUX_RTOL = 1e-6  # the logged MoLA balancing loss (~20): seen equal to 1e-7 relative
#: the routing summary of the last step (and the expert loads behind it), rank 0 of 2 vs one process:
#: seen equal to 5e-7 (the weights differ by rounding only); rank 0's own half of the batch moves
#: loads by ~1e-2 and the max/min load ratios by far more
ROUTING_RTOL, ROUTING_ATOL = 1e-4, 1e-5


def _rows(n: int, vocab: int) -> list[dict]:
    """Equal-length rows (no padding: every rank averages its loss over the same number of tokens)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (n, SEQ), generator=g).tolist()
    return [{"input_ids": r, "labels": r} for r in ids]


class _Data(L.LightningDataModule):
    """Shuffled as SFTDataModule shuffles (global_order_sampler): the two ranks' micro-batches of
    step k together are exactly the rows of the one-process batch k."""

    def __init__(self, rows, batch_size, pad_id):
        super().__init__()
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id

    def train_dataloader(self):
        return DataLoader(self.rows, batch_size=self.batch_size, collate_fn=lambda b: collate_left(b, self.pad_id),
                          sampler=global_order_sampler(self.rows, 3, self.trainer))


def _adapted(adapter: dict, **model_kw):
    model, tok = load_backbone({**micro_model_cfg(**ARCH), **model_kw})
    inject_adapter(model, dict(adapter))
    return model, tok


_summary = RoutingStats.summary


def _summary_and_loads(self: RoutingStats, per_module: bool = True) -> dict[str, float]:
    """RoutingStats.summary plus each module's expert loads (``routing/<module>/load/<i>``, and
    ``gate_mass/<i>`` for top-k routers), read from the same accumulators once they are summed over ranks."""
    out = _summary(self, per_module)
    for module, kinds in self.loads().items():
        for kind, values in kinds.items():
            out.update({f"routing/{module}/{kind}/{i}": v for i, v in enumerate(values)})
    return out


def _fit(adapter: dict, devices: int) -> tuple[dict, float | None, dict[str, float]]:
    """Train STEPS steps on `devices` CPU processes (trainer=ddp_cpu, forked) with a global batch of
    2 x PER_RANK_BATCH rows; return rank 0's adapter tensors, its aux loss of the last step and its
    routing summary of the last step (with the expert loads, see _summary_and_loads)."""
    torch.manual_seed(0)
    model, tok = _adapted(adapter)
    lit = AdapterLM(model, {"lr": 1e-2, "warmup_steps": 0}, aux_loss_coeff=adapter.get("aux_loss_coeff", 0.0),
                    routing_stats=True)
    data = _Data(_rows(2 * PER_RANK_BATCH * STEPS, len(tok)), 2 * PER_RANK_BATCH // devices, tok.pad_token_id)
    overrides = ["trainer=ddp_cpu", f"trainer.devices={devices}", f"trainer.max_steps={STEPS}",
                 "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
    cfg = compose(overrides)
    strategy = instantiate(cfg.trainer.strategy, start_method="fork") if devices > 1 else "auto"
    trainer_cfg = {k: v for k, v in lightning_trainer_node(cfg.trainer).items() if k != "strategy"}
    trainer = instantiate(trainer_cfg, strategy=strategy, logger=False, limit_val_batches=0)
    with mock.patch.object(RoutingStats, "summary", _summary_and_loads):  # the forked ranks inherit it
        trainer.fit(lit, datamodule=data)
    # ddp_fork: Lightning loads rank 0's final weights and callback metrics back into this process
    aux = trainer.callback_metrics.get("train/aux_loss")
    routing = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("routing/")}
    return adapter_state_dict(model), None if aux is None else float(aux), routing


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_two_process_ddp_equals_one_process_with_doubled_batch(name):
    adapter = ADAPTERS[name]
    one, aux_one, routing_one = _fit(adapter, devices=1)
    two, aux_two, routing_two = _fit(adapter, devices=2)
    torch.manual_seed(0)
    start, _ = _adapted(adapter)
    initial = adapter_state_dict(start)
    assert set(one) == set(two) and one
    moved = [k for k in one if not torch.equal(one[k], initial[k])]
    assert moved, "training changed no adapter tensor: the comparison would prove nothing"
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=ATOL, msg=lambda m: f"{name} {key}: {m}")
    if name == "flylora":  # the routing bias moved, identically: counts were summed over both ranks first
        biases = [k for k in one if k.endswith("adapter_router_bias")]
        assert biases and any(one[k].abs().sum() > 0 for k in biases)
    if name == "mola":  # the load-balancing loss of the global batch, on every rank
        assert aux_one is not None and aux_two is not None
        assert aux_two == pytest.approx(aux_one, rel=AUX_RTOL)
    # rank 0 logs the routing summary of the global batch: the accumulators were summed over both ranks
    assert set(routing_two) == set(routing_one)
    assert "routing/mean_entropy" in routing_one and any(k.endswith("/entropy") for k in routing_one)
    assert any("/load/" in k for k in routing_one)
    assert routing_two == pytest.approx(routing_one, rel=ROUTING_RTOL, abs=ROUTING_ATOL)


class _NoDist:
    """torch.distributed as seen by code that must not find the process group."""

    @staticmethod
    def is_available():
        return True

    @staticmethod
    def is_initialized():
        return False


def test_negative_controls_rank_local_statistics_break_the_equality(monkeypatch):
    """Without summing over ranks (FlyLoRA counts, MoLA balancing statistics) the same comparison fails:
    the test above can fail. (The forked ranks inherit the patches.)"""
    import comol.adapters.flylora as flylora
    import comol.adapters.gating as routing

    one, _, _ = _fit(ADAPTERS["flylora"], devices=1)
    monkeypatch.setattr(flylora, "dist", _NoDist)
    two, _, _ = _fit(ADAPTERS["flylora"], devices=2)
    biases = [k for k in one if k.endswith("adapter_router_bias")]
    assert max(float((two[k] - one[k]).abs().max()) for k in biases) > 100 * ATOL

    _, aux_one, _ = _fit(ADAPTERS["mola"], devices=1)
    monkeypatch.setattr(routing, "training_world_size", lambda: 1)
    _, aux_two, _ = _fit(ADAPTERS["mola"], devices=2)
    assert abs(aux_two - aux_one) > 1e3 * AUX_RTOL * abs(aux_one)


@pytest.mark.parametrize("name", ["comol", "mola"])
def test_negative_control_rank_local_routing_statistics_differ(name, monkeypatch):
    """Without RoutingStats._all_reduce rank 0 summarises its own half of each global batch: its expert
    loads and entropies are not the one-process ones, so the routing comparison above can fail.
    CoMoL: soft gates (loads are gate means); MoLA: top-k selection (loads are selection shares)."""
    _, _, one = _fit(ADAPTERS[name], devices=1)
    monkeypatch.setattr(RoutingStats, "_all_reduce", lambda self: None)  # the forked ranks inherit it
    _, _, local = _fit(ADAPTERS[name], devices=2)
    assert set(local) == set(one)
    assert local != pytest.approx(one, rel=ROUTING_RTOL, abs=ROUTING_ATOL)
    for kind in ("/load/", "/entropy"):  # seen: loads by 0.03 (CoMoL) / 0.11 (MoLA), entropies by 7e-3 / 9e-3
        keys = [k for k in one if kind in k]
        assert keys and max(abs(local[k] - one[k]) for k in keys) > 100 * ROUTING_ATOL, kind


class _FakeTrainer:
    def __init__(self, world, rank):
        self.world_size, self.global_rank = world, rank


@pytest.mark.parametrize("world", [2, 3])
def test_global_order_sampler_splits_each_one_process_batch_over_ranks(world):
    n, b = 30, 2
    for epoch in (0, 1):
        samplers = [global_order_sampler(range(n), 5, _FakeTrainer(world, r)) for r in range(world)]
        one = global_order_sampler(range(n), 5)
        for s in (*samplers, one):
            s.set_epoch(epoch)
        single = list(one)
        assert sorted(single) == list(range(n))
        per_rank = [list(s) for s in samplers]
        for k in range(n // (world * b)):
            union = sorted(i for r in range(world) for i in per_rank[r][k * b:(k + 1) * b])
            assert union == sorted(single[k * world * b:(k + 1) * world * b])
    assert single != list(range(n))  # shuffled


def test_local_aux_loss_differs_from_global_so_the_mola_check_can_fail():
    """The Switch loss of each half-batch differs from that of the whole batch (it is not linear),
    so without the global-batch statistics the DDP value above would not match."""
    from comol.adapters.gating import load_balancing_loss

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(8, 4, generator=g), -1)
    sel = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(2, -1).indices, True)
    whole = load_balancing_loss(probs, sel)
    halves = (load_balancing_loss(probs[0::2], sel[0::2]) + load_balancing_loss(probs[1::2], sel[1::2])) / 2
    assert abs(float(whole - halves)) > 1e-3


# -- gradient checkpointing -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mola", "flylora"])
def test_gradient_checkpointing_switch_leaves_loss_grads_and_counts_unchanged(name):
    adapter = ADAPTERS[name]
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, tok = _adapted(adapter, gradient_checkpointing=ckpt)
        assert model.is_activation_checkpointing == ckpt
        model.train()
        batch = collate_left(_rows(4, len(tok)), tok.pad_token_id)
        out = model(**batch)
        ctx = adapter_context(model)
        aux = ctx.aux_loss()
        loss = out.loss + (0.05 * aux if aux is not None else 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        counts = [m.adapter_step_counts.clone() for m in model.modules() if hasattr(m, "adapter_step_counts")]
        results.append((loss.item(), grads, counts, len(ctx.aux_losses)))
    (l0, g0, c0, n0), (l1, g1, c1, n1) = results
    assert l1 == pytest.approx(l0, abs=1e-6) and n0 == n1
    assert any(g.abs().sum() > 0 for g in g0.values())
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)
    for a, b in zip(c0, c1):  # checkpoint re-runs are not counted a second time
        assert torch.equal(a, b)


# -- FSDP wrap policy -----------------------------------------------------------------------------

def _innermost_unit(name: str, units: set[str]) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:i])
        if prefix in units:
            return prefix
    return ""


@pytest.mark.parametrize("name", ["comol", "mola", "flylora"])
def test_fsdp_policy_never_mixes_frozen_and_trainable_or_dtypes(name):
    model, _ = _adapted(ADAPTERS[name])
    for mod in model.modules():  # a bf16 base with fp32 adapters, as on GPUs
        if not any(p.requires_grad for p in mod.parameters(recurse=False)):
            mod.to(torch.bfloat16) if not list(mod.children()) else None
    chosen = AdapterWrapPolicy()._run_policy(model, set(), {})
    units = {n for n, m in model.named_modules() if m in chosen and n}
    assert any(n.endswith("base_layer") for n in units) and any(n.endswith("q_proj") for n in units)
    groups: dict[str, set] = {}
    for pname, p in model.named_parameters():
        groups.setdefault(_innermost_unit(pname, units), set()).add((p.requires_grad, p.dtype))
    for unit, kinds in groups.items():
        assert len(kinds) == 1, f"unit {unit!r} mixes {kinds}"
    assert any(k == {(True, torch.float32)} for k in groups.values())


# -- end to end: python run.py trainer=ddp_cpu ----------------------------------------------------

@pytest.mark.slow
def test_run_py_ddp_cpu_shares_one_run_dir_and_rank_zero_writes_once(tmp_path):
    logs = tmp_path / "logs"
    arch = [f"model.arch.{k}={v}" for k, v in ARCH.items()]
    cmd = [sys.executable, "run.py", "trainer=ddp_cpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
           "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "logger=none", "adapter=flylora",
           "adapter.r=8", "adapter.top_k=2", "dataset.train_size=16", "dataset.val_size=4", "dataset.batch_size=2",
           "dataset.max_length=64", "eval.limit=2", "eval.max_new_tokens=4", f"paths.log_dir={logs}", *arch]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PL_DISABLE_FORK": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = [p for p in (logs / "train" / "runs").iterdir()]
    assert len(run_dirs) == 1, run_dirs  # rank 1 used rank 0's dir (hydra.run.dir from Lightning's launcher)
    run_dir = run_dirs[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train/steps"] == 2 and "eval/math/toy_math/acc" in results
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # the checkpoint save is collective: rank 0 writes it, no rank leaves a temporary file
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert len((run_dir / "predictions" / "toy_math.jsonl").read_text().splitlines()) == 2
    assert proc.stdout.count("results (") == 2  # both ranks finished; only rank 0 evaluated
