"""One objective and one adapter state wherever the adapted model is trained: Lightning (AdapterLM), a plain
loop, HF ``Trainer`` and TRL ``SFTTrainer`` read ``outputs.loss`` (LM loss + aux_loss_coeff x aux), per-step
state (FlyLoRA's routing bias) updates after each optimizer step with no wiring, and ``save_pretrained`` /
``Trainer.save_model`` write the comol adapter format."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import fresh_micro_model
from comol.adapters import inject_adapter, load_adapter
from comol.errors import ComolError
from comol.models.lit_module import AdapterLM

STEPS, LR, ROWS, LENGTH = 5, 1e-2, 4, 16
ROUTED = {
    "mola": {"name": "mola", "r": 4, "num_experts": 4, "top_k": 2, "dropout": 0.0, "aux_loss_coeff": 0.5},
    "adamole": {"name": "adamole", "r": 4, "num_experts": 4, "dropout": 0.0, "aux_loss_coeff": 0.5},
}
FLYLORA = {"name": "flylora", "r": 8, "top_k": 2, "dropout": 0.0, "bias_lr": 0.01}


def rows(vocab: int, identical: bool = False) -> list[dict]:
    """Equal-length rows (no padding: every trainer collates them alike), labels = input_ids."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (1 if identical else ROWS, LENGTH), generator=g).repeat(ROWS if identical else 1, 1)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def adapted(adapter: dict):
    torch.manual_seed(0)
    model, tok = fresh_micro_model("qwen3")
    inject_adapter(model, adapter)
    with torch.no_grad():  # non-zero B: every path (and the router gradients) matters from step 1
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.train(), tok  # Lightning keeps each module's mode: start every trainer in training mode


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "adapter_" in n}


def collate(batch: list[dict]) -> dict:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def train_lightning(model, data) -> dict:
    lit = AdapterLM(model, {"lr": LR, "warmup_steps": 0}, routing_stats=False)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(lit, DataLoader(data, batch_size=ROWS, collate_fn=collate))
    return adapter_tensors(model)


def train_plain(model, data) -> dict:
    """The README's plain loop: model(**batch).loss, backward, step; nothing else."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    batch = collate(data)
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return adapter_tensors(model)


def hf_args(cls, tmp_path, **extra):
    return cls(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=ROWS, learning_rate=LR,
               lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, optim="adamw_torch",
               weight_decay=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
               disable_tqdm=True, **extra)


def train_hf(model, data, tmp_path) -> dict:
    from transformers import Trainer, TrainingArguments

    Trainer(model=model, args=hf_args(TrainingArguments, tmp_path, remove_unused_columns=False),
            train_dataset=data, data_collator=collate).train()
    return adapter_tensors(model)


def train_trl(model, tok, data, tmp_path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in data])
    args = hf_args(SFTConfig, tmp_path, max_length=None, packing=False, bf16=False, gradient_checkpointing=False)
    SFTTrainer(model=model, args=args,  # SFTConfig defaults to bf16 + checkpointing; Lightning here runs fp32
               train_dataset=ds, processing_class=tok).train()
    return adapter_tensors(model)


def assert_close_tensors(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        diff = (got[name].float() - want[name].float()).abs().max().item()
        assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol}"


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_output_loss_is_lm_loss_plus_weighted_aux(name):
    model, tok = adapted(ROUTED[name])
    batch = collate(rows(len(tok)))
    out = model.train()(**batch)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_loss, rtol=0, atol=0)
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
    torch.testing.assert_close(out.lm_loss, plain)  # the LM part is the model's own cross-entropy
    out = model.eval()(**batch)
    assert out.loss is out.lm_loss and "aux_loss" not in out  # evaluation: no routing loss
    out = model.train()(input_ids=batch["input_ids"])  # no labels: no loss, nothing to change
    assert out.loss is None


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_hf_trainer_and_trl_end_equal_to_lightning(name, tmp_path):
    """5 steps of MoLA / AdaMoLE (aux_loss_coeff 0.5): every adapter tensor within 1e-5 of the Lightning run.
    Without the aux term in outputs.loss, HF Trainer and TRL end ~1e-2 away (the router trains differently)."""
    model, tok = adapted(ROUTED[name])
    data = rows(len(tok))
    want = train_lightning(copy.deepcopy(model), data)
    start = adapter_tensors(model)
    assert max((want[n] - start[n]).abs().max().item() for n in want if "router" in n) > 1e-3  # the routers moved
    assert_close_tensors(train_plain(copy.deepcopy(model), data), want, 1e-5)
    assert_close_tensors(train_hf(copy.deepcopy(model), data, tmp_path / "hf"), want, 1e-5)
    assert_close_tensors(train_trl(copy.deepcopy(model), tok, data, tmp_path / "trl"), want, 1e-5)


def test_flylora_bias_updates_under_hf_trainer_and_trl_like_the_plain_loop(tmp_path):
    """No attach_optimizer, no callback: the routing bias moves under every trainer, bitwise as in the plain loop
    (identical rows: batch order cannot matter)."""
    model, tok = adapted(FLYLORA)
    data = rows(len(tok), identical=True)
    plain = train_plain(copy.deepcopy(model), data)
    biases = [n for n in plain if n.endswith("adapter_router_bias")]
    assert len(biases) == 10 and all(plain[n].abs().sum() > 0 for n in biases)
    lit = train_lightning(copy.deepcopy(model), data)
    hf = train_hf(copy.deepcopy(model), data, tmp_path / "hf")
    trl = train_trl(copy.deepcopy(model), tok, data, tmp_path / "trl")
    for got in (lit, hf, trl):
        for n in biases:
            assert torch.equal(got[n], plain[n]), n
        assert_close_tensors(got, plain, 1e-5)


def test_one_update_per_step_when_attached_explicitly():
    """attach_optimizer (what AdapterLM does) and the automatic watch never both update the bias."""
    from comol.adapters import attach_optimizer

    model, tok = adapted(FLYLORA)
    data = rows(len(tok), identical=True)
    auto = train_plain(copy.deepcopy(model), data)
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    attach_optimizer(m, opt)
    batch = collate(data)
    for _ in range(STEPS):
        m(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, t in adapter_tensors(m).items():
        assert torch.equal(t, auto[n]), n


def test_trainer_save_model_writes_a_loadable_comol_adapter(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from comol.adapters.inject import CONFIG_FILE, SHA_KEY, WEIGHTS_FILE, read_adapter_config

    model, tok = adapted(ROUTED["mola"])
    data = rows(len(tok))
    trainer = Trainer(model=model, args=hf_args(TrainingArguments, tmp_path / "run", remove_unused_columns=False),
                      train_dataset=data, data_collator=collate)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    meta = read_adapter_config(out)
    assert meta["adapter"]["name"] == "mola" and meta[SHA_KEY]
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()  # no full checkpoint
    fresh, _ = fresh_micro_model("qwen3")
    load_adapter(fresh, out)
    batch = collate(data)
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, model(**batch).logits)
    with pytest.raises(Exception) as info:  # transformers finds no model there: an error, not a broken model
        AutoModelForCausalLM.from_pretrained(str(out))
    assert not isinstance(info.value, ComolError)


def test_save_pretrained_of_a_folded_model_is_a_plain_checkpoint(tmp_path):
    from comol.adapters.merge import fold_adapter

    model, _ = fresh_micro_model("qwen3")
    inject_adapter(model, {"name": "lora", "r": 2})
    fold_adapter(model)
    model.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "config.json").is_file() and (tmp_path / "full" / "model.safetensors").is_file()
