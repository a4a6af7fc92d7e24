"""Tests for the self-written arithmetic sample dataset (utils/sample_data.py)."""

import json
import re
from pathlib import Path

import pytest

from utils.sample_data import final_answer, main, make_samples

ROOT = Path(__file__).resolve().parents[1]
DATA_FILE = ROOT / "data" / "arith_sample.json"

MAX_EN_WORDS = 60
MAX_ZH_CHARS = 120

INT_RE = re.compile(r"\d+")
# A flat arithmetic expression followed by "= N", e.g. "4 × 8 + 1 = 33".
EQUATION_RE = re.compile(r"(?<!\d)(?<![\d×+\-] )(\d+(?: [+\-×] \d+)+) = (\d+)")


def _is_chinese(row):
    text = row["instruction"] + row["input"] + row["output"]
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _operands(row):
    return [int(x) for x in INT_RE.findall(row["instruction"] + " " + row["input"])]


def _expected(kind, nums):
    """Recompute the answer from the numbers stated in the question."""
    if kind == "add":
        assert len(nums) == 2, nums
        return nums[0] + nums[1]
    if kind == "sub":
        assert len(nums) == 2 and nums[0] > nums[1], nums
        return nums[0] - nums[1]
    if kind == "mul":
        assert len(nums) == 2, nums
        assert 10 <= max(nums) <= 99 and 2 <= min(nums) <= 9, nums
        return nums[0] * nums[1]
    if kind == "change":
        assert len(nums) == 3, nums
        bill = max(nums)
        rest = list(nums)
        rest.remove(bill)
        assert bill > rest[0] * rest[1], nums
        return bill - rest[0] * rest[1]
    if kind == "total":
        assert len(nums) == 4, nums
        return nums[0] * nums[1] + nums[2] * nums[3]
    raise AssertionError(f"unknown kind {kind!r}")


@pytest.fixture(scope="module")
def rows():
    return make_samples(400, 0)


@pytest.fixture(scope="module")
def rows_with_answers():
    return make_samples(400, 0, with_answers=True)


def test_committed_file_matches_generator(rows):
    text = DATA_FILE.read_text(encoding="utf-8")
    assert json.loads(text) == rows
    assert text == json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    assert len(rows) == 400


def test_main_writes_same_file(tmp_path, capsys):
    out = tmp_path / "sub" / "arith.json"
    main(["--n", "400", "--seed", "0", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == DATA_FILE.read_text(encoding="utf-8")
    assert "400" in capsys.readouterr().out


def test_row_format(rows):
    for row in rows:
        assert list(row) == ["instruction", "input", "output"]
        assert all(isinstance(v, str) for v in row.values())
        assert row["instruction"].strip() and row["output"].strip()
        lines = row["output"].split("\n")
        assert 2 <= len(lines) - 1 <= 4, row  # 2-4 steps + final-answer line
        if _is_chinese(row):
            assert re.fullmatch(r"答案是 \d+。", lines[-1]), row
        else:
            assert re.fullmatch(r"The answer is \d+\.", lines[-1]), row
    assert sum(1 for r in rows if r["input"]) >= 40  # input sometimes used
    assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)


def test_with_answers_only_adds_keys(rows, rows_with_answers):
    stripped = [{k: r[k] for k in ("instruction", "input", "output")} for r in rows_with_answers]
    assert stripped == rows


def test_answers_are_correct(rows_with_answers):
    kinds = set()
    for row in rows_with_answers:
        expected = _expected(row["kind"], _operands(row))
        assert final_answer(row["output"]) == expected, row
        assert row["answer"] == expected, row
        kinds.add(row["kind"])
    assert kinds == {"add", "sub", "mul", "change", "total"}
    assert sum(1 for r in rows_with_answers if r["kind"] == "add") >= 50


def test_every_equation_in_outputs_is_correct(rows):
    checked = 0
    for row in rows:
        for expr, value in EQUATION_RE.findall(row["output"]):
            assert eval(expr.replace("×", "*")) == int(value), (expr, value, row)
            checked += 1
    assert checked >= 2 * len(rows)


def test_language_mix(rows):
    zh = sum(1 for r in rows if _is_chinese(r))
    share = zh / len(rows)
    assert 0.35 <= share <= 0.65
    assert 0.35 <= 1 - share <= 0.65


def test_instruction_variety(rows):
    for zh in (False, True):
        shapes = {INT_RE.sub("#", r["instruction"]) for r in rows if _is_chinese(r) == zh}
        assert len(shapes) >= 15


def test_determinism():
    assert make_samples(50, 7) == make_samples(50, 7)
    assert make_samples(50, 7) != make_samples(50, 8)
    assert make_samples(400, 0) != make_samples(400, 1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_length_limits(seed):
    for row in make_samples(400, seed):
        if _is_chinese(row):
            assert len(row["instruction"] + row["input"] + row["output"]) <= MAX_ZH_CHARS, row
        else:
            words = " ".join((row["instruction"], row["input"], row["output"])).split()
            assert len(words) <= MAX_EN_WORDS, row


def test_final_answer_parsing():
    assert final_answer("Ones: 7 + 8 = 15.\nThe answer is 85.") == 85
    assert final_answer("个位：7 + 8 = 15。\n答案是 85。") == 85
    assert final_answer("The answer is 7.\n") == 7
    assert final_answer("The answer is 85") is None
    assert final_answer("The answer is 85.\nMore text.") is None
    assert final_answer("") is None
