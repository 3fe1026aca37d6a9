"""Loading and validating evaluation files; locating the bundled data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comol.eval import eval_files
from comol.eval.eval_files import (
    COMMONSENSE_SETS,
    MATH_SETS,
    commonsense_file,
    humaneval_file,
    load_eval_rows,
    load_humaneval,
    math_file,
    default_data_dir,
    require_data_dir,
)

REPO = Path(__file__).resolve().parents[1]


def test_data_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("COMOL_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("COMOL_DATA_DIR")
    assert default_data_dir() == REPO / "data"
    assert (REPO / "data" / "eval" / "math" / "gsm8k.json").is_file()


def test_installed_wheel_reads_data_from_the_working_dir(monkeypatch, tmp_path):
    """Without a checkout around the package (no run.py beside it) the data dir is ./data, never a
    folder that merely sits next to the installed package (site-packages/data)."""
    import comol as ef

    monkeypatch.delenv("COMOL_DATA_DIR", raising=False)
    site = tmp_path / "site-packages"
    (site / "data").mkdir(parents=True)
    monkeypatch.setattr(ef, "ROOT", site)
    monkeypatch.chdir(tmp_path)
    assert default_data_dir() == tmp_path / "data"


def test_missing_data_dir_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("COMOL_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*set COMOL_DATA_DIR"):
        require_data_dir()


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "gsm8k.json"
    with pytest.raises(FileNotFoundError, match=r"evaluation file .*gsm8k\.json does not exist"):
        load_eval_rows(path)


def _rows(n_bad: int | None, drop: str, fields=("instruction", "input", "output", "answer")):
    rows = [{f: f"{f}{i}" for f in fields} for i in range(3)]
    if n_bad is not None:
        del rows[n_bad][drop]
    return rows


def test_json_list_row_lacking_answer(tmp_path):
    path = tmp_path / "AddSub.json"
    path.write_text(json.dumps(_rows(1, "answer")))
    with pytest.raises(ValueError) as err:
        load_eval_rows(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: row 1 lacks 'answer'")
    assert "\n" not in msg


def test_jsonl_row_lacking_answer(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(2, "answer")))
    with pytest.raises(ValueError, match=r"rows\.jsonl: row 2 lacks 'answer'"):
        load_eval_rows(path)


def test_valid_rows_and_custom_required(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(_rows(None, "")))
    assert len(load_eval_rows(path)) == 3
    with pytest.raises(ValueError, match=r"row 0 lacks 'label'"):
        load_eval_rows(path, required=("instruction", "label"))


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "answer": "1"}\n{not json}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        load_eval_rows(path)
    path = tmp_path / "notalist.json"
    path.write_text('[{"instruction": "a", "answer": "1"}, 3]')
    with pytest.raises(ValueError, match=r"notalist\.json: row 1 is a int"):
        load_eval_rows(path)


def _problems():
    return [
        {"task_id": f"HumanEval/{i}", "prompt": "def f():\n", "entry_point": "f",
         "canonical_solution": "    return 1\n", "test": "def check(c):\n    assert c() == 1\n"}
        for i in range(3)
    ]


def test_humaneval_row_lacking_entry_point(tmp_path):
    probs = _problems()
    del probs[2]["entry_point"]
    path = tmp_path / "humaneval.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in probs))
    with pytest.raises(ValueError, match=r"humaneval\.jsonl: row 2 lacks 'entry_point'"):
        load_humaneval(path)


def test_humaneval_canonical_solution_optional_and_duplicates(tmp_path):
    probs = _problems()
    del probs[0]["canonical_solution"]
    path = tmp_path / "he.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in probs))
    assert [p["task_id"] for p in load_humaneval(path)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    probs[2]["task_id"] = "HumanEval/1"
    path.write_text("".join(json.dumps(p) + "\n" for p in probs))
    with pytest.raises(ValueError, match=r"row 2 repeats task_id 'HumanEval/1'"):
        load_humaneval(path)


ROW_COUNTS = {
    "AddSub": 395, "AQuA": 254, "gsm8k": 1319, "MultiArith": 600, "SingleEq": 508, "SVAMP": 1000,
    "boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267,
    "ARC-Challenge": 1172, "ARC-Easy": 2376, "openbookqa": 500,
}


def test_real_files_load_with_documented_counts(data_dir):
    for name in MATH_SETS:
        assert len(load_eval_rows(math_file(name, data_dir))) == ROW_COUNTS[name], name
    for name in COMMONSENSE_SETS:
        assert len(load_eval_rows(commonsense_file(name, data_dir))) == ROW_COUNTS[name], name
    problems = load_humaneval(humaneval_file(data_dir))
    assert len(problems) == 164
    assert all(p["canonical_solution"] for p in problems)


def test_default_paths_follow_data_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(eval_files, "default_data_dir", lambda: tmp_path)
    assert math_file("gsm8k") == tmp_path / "eval" / "math" / "gsm8k.json"
    assert commonsense_file("boolq") == tmp_path / "eval" / "commonsense" / "boolq.json"
    assert humaneval_file() == tmp_path / "eval" / "code" / "humaneval.jsonl"
