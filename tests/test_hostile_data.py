"""Hostile training data (issue 18, "Bad data"): each bad file gives one line naming the file, the row (or line)
and the field, before any backbone is built; a huge row is cut to a character bound before it is tokenised."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from comol import ROOT
from comol.config import compose
from comol.data import SFTDataModule, encode_example
from comol.data.clip import char_bound, clip_row, longest_token_chars
from comol.data.prompts import build_prompt
from comol.errors import DataError
from comol.models.tokenizer import offline_tokenizer
from comol.pipeline import run
from comol.preflight import check_row_lengths, preflight

GOOD = {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5."}
DEEP = 200_000


def _list(*rows) -> bytes:
    return json.dumps(list(rows), indent=1, ensure_ascii=False).encode()


def _lines(*rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


# (case id, file name, bytes, expected substring after "<file>: ")
CASES = [
    ("input-int", "t.json", _list(GOOD, {**GOOD, "input": 7}), "row 1 field 'input' is a int, expected a string or null"),
    ("input-list", "t.json", _list({**GOOD, "input": ["a", "b"]}), "row 0 field 'input' is a list, expected a string"),
    ("input-dict-jsonl", "t.jsonl", _lines(GOOD, GOOD, {**GOOD, "input": {"x": 1}}), "row 2 field 'input' is a dict"),
    ("instruction-int", "t.json", _list({**GOOD, "instruction": 12}), "row 0 field 'instruction' is a int"),
    ("output-list", "t.json", _list(GOOD, {**GOOD, "output": ["x"]}), "row 1 field 'output' is a list"),
    ("output-null", "t.json", _list({**GOOD, "output": None}), "row 0 lacks 'output'"),
    ("row-string", "t.json", _list(GOOD, "just text"), "row 1 is a str, expected an object"),
    ("lone-surrogate", "t.json", b'[{"instruction": "a\\ud800b", "output": "c"}]',
     "row 0 field 'instruction' holds '\\ud800' at character 1 (a lone surrogate)"),
    ("bad-utf8-list", "t.json", _list(GOOD).replace(b"Add 2", b"Add \xff2"), "row 0 (line 3) is not valid UTF-8 (byte"),
    ("bad-utf8-second-row", "t.json", _list(GOOD, {**GOOD, "output": "caf\u00e9"}).replace("é".encode(), b"\xe9"),
     "row 1 (line 10) is not valid UTF-8"),
    ("bad-utf8-jsonl", "t.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a\xc3\x28", "output": "b"}\n',
     "line 2 is not valid UTF-8"),
    ("deep-list", "t.json", b"[" + json.dumps(GOOD).encode() + b",\n" + b"[" * DEEP + b"]" * DEEP + b"]",
     f"row 1 (line 2) nests JSON arrays/objects {DEEP + 1} levels deep, too deep to read"),
    ("deep-field", "t.json", b'[{"instruction": "a", "output": "b"},\n{"instruction": ' + b"[" * DEEP + b"]" * DEEP
     + b', "output": "x"}]', "row 1 (line 2) nests JSON arrays/objects"),
    ("deep-jsonl", "t.jsonl", _lines(GOOD) + b"{" * 1 + b'"a":' + b"[" * DEEP + b"]" * DEEP + b"}\n",
     f"line 2 nests JSON arrays/objects {DEEP + 1} levels deep"),
    ("empty-file", "t.json", b"", "holds no rows"),
    ("empty-list", "t.json", b"[]", "holds no rows"),
    ("blank-lines", "t.jsonl", b"\n\n  \n", "holds no rows"),
    ("not-json", "t.json", b"[{\"instruction\": }]", "not valid JSON"),
    ("object-not-rows", "t.json", b'{"instruction": "a"}', "row 0 lacks 'output'"),
]


@pytest.fixture
def no_backbone(monkeypatch):
    """Any attempt to build a backbone fails the test (and is counted)."""
    built = []

    def refuse(*args, **kwargs):
        built.append(args)
        raise AssertionError("a backbone was built before the data was checked")

    monkeypatch.setattr("comol.pipeline.load_backbone", refuse)
    return built


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("case,name,content,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_file_is_one_line_before_the_backbone(case, name, content, expected, split, tmp_path, no_backbone):
    bad = tmp_path / name
    bad.write_bytes(content)
    good = tmp_path / "good.json"
    good.write_text(json.dumps([GOOD]))
    files = {"train": good, "val": good, split: bad}
    cfg = compose(["dataset=math14k", "eval=none", "logger=none", f"dataset.train={files['train']}",
                   f"dataset.val={files['val']}", f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError) as err:
        run(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: ") and expected in msg, msg
    assert "\n" not in msg and len(msg) < 400
    assert no_backbone == [] and not (tmp_path / "run" / "adapter").exists()


class Spy:
    """A tokenizer that records the longest text it was asked to tokenise."""

    def __init__(self, tok):
        self._tok, self.longest = tok, 0

    def __call__(self, text, *args, **kwargs):
        texts = [text] if isinstance(text, str) else text
        self.longest = max([self.longest, *map(len, texts)])
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_a_10mb_row_is_cut_before_it_is_tokenised(tmp_path, monkeypatch):
    big = {"instruction": "Summarise.", "input": "word " * 2_000_000, "output": "ok " * 1_000_000}  # 10 MB + 3 MB
    path = tmp_path / "big.json"
    path.write_text(json.dumps([big, GOOD]))
    spy = Spy(offline_tokenizer())
    monkeypatch.setattr("comol.models.load_tokenizer", lambda *a, **k: spy)
    cfg = compose(["dataset=math14k", "eval=none", "logger=none", f"dataset.train={path}", "dataset.val=null",
                   "dataset.max_length=64", f"paths.output_dir={tmp_path / 'run'}"])
    checked = preflight(cfg)
    bound = char_bound(64, spy)
    assert bound == 65 * longest_token_chars(spy._tok) < 10_000
    assert any("cuts 1 of 2 train rows" in w for w in checked.warnings)
    dm = SFTDataModule(cfg.dataset, spy, splits=checked.splits)
    dm.setup()
    assert [len(f["input_ids"]) for f in dm.train_features] == [64, len(encode_example(GOOD, spy._tok, 64)["input_ids"])]
    assert spy.longest <= 2 * bound + 1000     # prompt template + cut instruction + cut input (preflight: + output)


@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_cut_rows_encode_exactly_like_the_whole_text(field):
    """Ordinary text cut at the bound gives the same first max_length ids as the whole text (the reference
    tokenises everything)."""
    tok = offline_tokenizer()
    text = " ".join(f"The {i}th apple costs {i * 7 % 13} coins, said Ann." for i in range(4000))   # ~180k chars
    row = {**GOOD, field: text}
    for max_length in (16, 100, 300):
        cut = clip_row(row, max_length, tok)
        assert len(cut[field]) == char_bound(max_length, tok) < len(text)
        prompt = tok(build_prompt(row))["input_ids"]
        whole = (prompt + tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max_length]
        assert encode_example(row, tok, max_length)["input_ids"] == whole


def test_short_rows_are_untouched_and_lengths_counted_as_before():
    tok = offline_tokenizer()
    assert clip_row(GOOD, 8, tok) is GOOD
    rows = [GOOD, {**GOOD, "output": "x y " * 50}]   # 200 characters: under the bound, cut by max_length
    assert clip_row(rows[1], 64, tok) is rows[1]
    longest = len(tok(build_prompt(rows[1]) + rows[1]["output"])["input_ids"]) + 1     # + EOS, counted uncut
    assert longest > 64 and check_row_lengths(rows, tok, 64) == (
        f"dataset.max_length=64 cuts 1 of 2 train rows (longest {longest} tokens with EOS); 0 of them lose their "
        f"whole answer")


def test_input_all_blank_beyond_the_bound_keeps_its_prompt_form():
    tok = offline_tokenizer()
    row = {**GOOD, "input": " " * 100_000 + "use integers"}
    assert encode_example(row, tok, 32)["input_ids"] == encode_example({**GOOD, "input": "use integers"}, tok, 32)["input_ids"]


@pytest.mark.slow
def test_hostile_file_on_the_command_line_is_one_error_line(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps([GOOD, {**GOOD, "input": [1, 2]}]))
    proc = subprocess.run([sys.executable, "run.py", "dataset=math14k", "eval=none", "logger=none",
                           f"dataset.train={bad}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}: row 1 field 'input' is a list, expected a string or null"
