"""Prompt template, tokenization/masking, left padding, truncation, row loading and toy_math."""

import json

import pytest

from comol.data import IGNORE_INDEX, collate_left, dataset_splits, encode_example, generate_toy_math, load_rows
from comol.data.prompts import build_prompt
from comol.errors import DataError
from comol.models.tokenizer import offline_tokenizer

ROW = {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5."}


def test_prompt_without_and_with_input():
    assert build_prompt(ROW) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:")
    with_input = build_prompt({**ROW, "input": "Use integers."})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n"
        "### Input:\nUse integers.\n\n### Response:")


def test_encode_appends_eos_and_masks_prompt_when_asked():
    tok = offline_tokenizer()
    full = encode_example(ROW, tok, max_length=512, train_on_prompt=True)
    assert full["input_ids"][-1] == tok.eos_token_id
    assert full["labels"] == full["input_ids"]
    assert tok.decode(full["input_ids"][:-1]) == build_prompt(ROW) + ROW["output"]
    masked = encode_example(ROW, tok, max_length=512, train_on_prompt=False)
    n_prompt = len(tok(build_prompt(ROW))["input_ids"])
    assert masked["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert masked["labels"][n_prompt:] == full["input_ids"][n_prompt:]
    assert tok.decode(masked["input_ids"][n_prompt:-1]) == ROW["output"]


def test_truncation_to_max_length():
    tok = offline_tokenizer()
    ex = encode_example(ROW, tok, max_length=10)
    assert len(ex["input_ids"]) == 10 and len(ex["labels"]) == 10


def test_left_padding_collate():
    batch = collate_left([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    # the first label of every row is ignored: no position of the row predicts it (only a pad would)
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]


def test_toy_math_is_deterministic_disjoint_and_well_formed():
    a, b = generate_toy_math(50, seed=7), generate_toy_math(50, seed=7)
    assert a == b and a != generate_toy_math(50, seed=8)
    for row in a:
        assert row["output"].endswith(f"The answer is {row['answer']}.")
        lhs = row["output"].split(" = ")[0]
        assert eval(lhs) == int(row["answer"])  # noqa: S307 - generated arithmetic only
    splits = dataset_splits({"source": "toy_math", "train_size": 300, "val_size": 20, "test_size": 30, "data_seed": 1})
    instr = [{r["instruction"] for r in splits[s]} for s in ("train", "val", "test")]
    assert len(instr[0]) == 300 and not (instr[0] & instr[1]) and not (instr[0] & instr[2]) and not (instr[1] & instr[2])


def test_load_rows_json_and_jsonl(tmp_path):
    p = tmp_path / "rows.json"
    p.write_text(json.dumps([ROW, ROW]))
    assert load_rows(str(p)) == [ROW, ROW]
    q = tmp_path / "rows.jsonl"
    q.write_text(json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n")
    assert len(load_rows(str(q))) == 2


def test_missing_file_and_bad_rows_name_file_and_row(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json does not exist"):
        load_rows(str(tmp_path / "nope.json"))
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([ROW, {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"bad\.json: row 1 lacks 'output'"):
        load_rows(str(p))
    p.write_text(json.dumps([{"output": "y"}]))
    with pytest.raises(DataError, match=r"row 0 lacks 'instruction'"):
        load_rows(str(p))
    q = tmp_path / "bad.jsonl"
    q.write_text(json.dumps(ROW) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_rows(str(q))


def test_real_math14k_validation_file_loads(shared_data):
    rows = load_rows(str(shared_data / "train" / "math_14k_validation.json"))
    assert len(rows) == 486 and sum("The answer is" in r["output"] for r in rows) == 480


def test_rows_without_any_target_token_are_dropped():
    from comol.data import SFTDataModule

    tok = offline_tokenizer()
    long_row = {"instruction": "word " * 200, "input": "", "output": "The answer is 1."}
    dm = SFTDataModule({"name": "t", "max_length": 64, "train_on_prompt": False, "batch_size": 2}, tok,
                       splits={"train": [ROW, long_row], "val": [long_row]})
    dm.setup()
    assert len(dm.train_features) == 1 and dm.val_features == []
    batch = next(iter(dm.train_dataloader()))
    assert (batch["labels"] != IGNORE_INDEX).any()
