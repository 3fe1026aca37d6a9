"""Real-tokenizer correctness on SmolLM2-135M-Instruct (pad == eos == <|im_end|>): the prompt boundary,
EOS appended and learned, left padding, generation stopping at EOS, max_length vs the context length."""

from __future__ import annotations

import json

import pytest
import torch

from comol.data import IGNORE_INDEX, SFTDataModule, collate_left, encode_example
from comol.data.prompts import build_prompt
from comol.errors import ConfigError
from comol.eval.generate import decoding_config, generate_responses

GREEDY = {"do_sample": False, "num_samples": 1}


def _rows(data_dir, *names, limit=None):
    rows = []
    for sub, name in names:
        rows += json.loads((data_dir / "eval" / sub / f"{name}.json").read_text())[:limit]
    return rows


def test_smollm2_pads_with_eos(smollm2):
    _, tok = smollm2
    # the case the pipeline must survive: no pad token distinct from EOS in SmolLM2's vocabulary
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2
    assert tok.padding_side == "left" and tok.model_max_length == 8192


def test_training_prompt_tokens_are_the_evaluation_prompt_tokens(smollm2, data_dir):
    _, tok = smollm2
    rows = _rows(data_dir, *[("commonsense", n) for n in ("boolq", "piqa", "social_i_qa", "winogrande",
                                                            "ARC-Challenge", "ARC-Easy", "openbookqa")],
                 *[("math", n) for n in ("gsm8k", "AQuA", "SVAMP")], limit=300)
    prompts = [build_prompt(r) for r in rows]
    eval_ids = tok(prompts)["input_ids"]  # what generation feeds the model (same call, same special tokens)
    joint = tok([p + r["output"] for p, r in zip(prompts, rows)])["input_ids"]
    merged_across = 0
    for row, want, whole in zip(rows, eval_ids, joint):
        ex = encode_example(row, tok, max_length=10_000)
        assert ex["input_ids"][:len(want)] == want, row["instruction"][:80]
        merged_across += whole != ex["input_ids"][:-1]
    # on these files the boundary never merges, so the construction equals the paper's joint tokenization
    assert merged_across == 0
    assert tok.convert_ids_to_tokens(eval_ids[0][-3:]) == ["###", "ĠResponse", ":"]


def test_boundary_holds_where_joint_tokenization_would_merge(smollm2):
    _, tok = smollm2
    row = {"instruction": "Say it", "input": "", "output": ": yes"}  # '::' is one token in SmolLM2
    prompt_ids = tok(build_prompt(row))["input_ids"]
    assert tok(build_prompt(row) + row["output"])["input_ids"][:len(prompt_ids)] != prompt_ids
    ex = encode_example(row, tok, max_length=512)
    assert ex["input_ids"][:len(prompt_ids)] == prompt_ids
    assert tok.decode(ex["input_ids"][:-1]) == build_prompt(row) + row["output"]


def test_eos_is_appended_and_learned_with_pad_equal_to_eos(smollm2, data_dir):
    model, tok = smollm2
    rows = _rows(data_dir, ("commonsense", "boolq"))[:1] + _rows(data_dir, ("commonsense", "piqa"))[:1]
    feats = [encode_example(r, tok, max_length=512, train_on_prompt=False) for r in rows]
    for f in feats:
        assert f["input_ids"][-1] == tok.eos_token_id and f["labels"][-1] == tok.eos_token_id
    short, long_ = sorted(range(2), key=lambda i: len(feats[i]["input_ids"]))
    batch = collate_left(feats, tok.pad_token_id)
    n_pad = len(feats[long_]["input_ids"]) - len(feats[short]["input_ids"])
    assert n_pad > 0
    assert batch["input_ids"][short, :n_pad].eq(tok.eos_token_id).all()  # pads are EOS ids ...
    assert batch["labels"][short, :n_pad].eq(IGNORE_INDEX).all()         # ... masked by position,
    assert batch["labels"][:, -1].eq(tok.eos_token_id).all()             # the real EOS keeps its label
    # the loss the model trains on includes the EOS targets: compare with a naive masked cross-entropy
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    terms = [-torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b in range(2) for t in range(labels.shape[1])
             if labels[b, t] != IGNORE_INDEX]
    assert len(terms) == sum(sum(l != IGNORE_INDEX for l in f["labels"][1:]) for f in feats)
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_left_padding_leaves_the_real_tokens_unchanged(smollm2):
    model, tok = smollm2
    texts = ["### Instruction:\nName a colour.\n\n### Response:", "Hi"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1  # padded on the left
    with torch.no_grad():
        padded = model(**batch).logits
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    n = alone.shape[1]
    torch.testing.assert_close(padded[1, -n:], alone[0], atol=1e-4, rtol=1e-4)


def test_generation_stops_at_eos(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                     add_generation_prompt=True)
    enc = tok([prompt], return_tensors="pt")
    gen_cfg = decoding_config(GREEDY, 40, tok)
    with torch.no_grad():
        out = model.generate(**enc, generation_config=gen_cfg)[0, enc["input_ids"].shape[1]:].tolist()
    assert out[-1] == tok.eos_token_id and out.count(tok.eos_token_id) == 1 and len(out) < 40, out
    (text,) = generate_responses(model, tok, [prompt], 40, GREEDY)[0]
    assert text == tok.decode(out[:-1]) and "<|im_end|>" not in text


def test_max_length_is_checked_against_the_context_length(smollm2):
    _, tok = smollm2
    row = {"instruction": "q", "input": "", "output": "a"}
    dm = SFTDataModule({"name": "t", "max_length": 8193, "train_on_prompt": True, "batch_size": 1}, tok,
                       splits={"train": [row], "val": []})
    with pytest.raises(ConfigError, match="max_length=8193.*context length is 8192"):
        dm.setup()
    SFTDataModule({"name": "t", "max_length": 8192, "train_on_prompt": True, "batch_size": 1}, tok,
                  splits={"train": [row], "val": []}).setup()
