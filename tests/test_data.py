"""The data layer: sources, conversion, masking statistics, and the promised error sentences."""
import json

import pytest

from conftest import SHARED_DATA, run_script
from utils import data as data_lib
from utils.errors import UserError
from utils.templates import get_template


def test_sample_dataset_is_registered_and_loads():
    convs, stats = data_lib.load_conversations(["arith_sample"])
    assert len(convs) == 400 and stats[0]["kept"] == 400
    assert convs[0][-1]["role"] == "assistant"


def test_real_alpaca_file_loads(tokenizer):
    path = SHARED_DATA / "code_alpaca" 
    files = sorted(path.glob("*.json"))
    assert files, "../shared/data/code_alpaca is missing"
    convs, stats = data_lib.load_conversations([str(files[0])])
    assert stats[0]["rows"] == stats[0]["kept"] + stats[0]["empty_output"] and convs
    examples, dropped = data_lib.tokenize_conversations(convs[:50], tokenizer, get_template("chat", tokenizer), 256)
    assert len(examples) + dropped == 50
    assert all(any(l != -100 for l in e["labels"]) and len(e["input_ids"]) <= 256 for e in examples)


def test_cutoff_drops_examples_without_answer_tokens(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    examples, dropped = data_lib.tokenize_conversations([long_prompt, short], tokenizer,
                                                        get_template("alpaca"), cutoff_len=64)
    assert dropped == 1 and len(examples) == 1


def test_val_split_sizes():
    ex = [{"input_ids": [i], "labels": [i]} for i in range(100)]
    assert [len(p) for p in data_lib.split(ex, 10, 0)] == [90, 10]
    assert [len(p) for p in data_lib.split(ex, 0.25, 0)] == [75, 25]
    with pytest.raises(UserError, match="leaves no training rows"):
        data_lib.split(ex, 100, 0)


def test_render_masked_marks_trained_span(tokenizer):
    ids = tokenizer("a b c", add_special_tokens=False)["input_ids"]
    labels = [-100] + ids[1:]
    assert data_lib.render_masked(tokenizer, ids, labels) == "a⟦ b c⟧"


@pytest.mark.parametrize("content,message", [
    ('[{"instruction": "x"}]', "row 1 has no 'output' field (it has: instruction); alpaca rows need instruction, output and optionally input"),
    ('[{"instruction": "x", "output": 3}]', "row 1 field 'output' must be a string, not int"),
    ('[{"instruction": "x", "output": "y"},', "is not valid JSON (line 1: Expecting value)"),
    ('{"instruction": "x"}', "must hold a JSON list of rows"),
])
def test_bad_files_give_one_clear_sentence(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    res = run_script("uniform_finetune.py", "--data", bad, "--dry_run")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert message in res.stderr and str(bad) in res.stderr


def test_bad_jsonl_line_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2 is not valid JSON"):
        data_lib.load_conversations([str(bad)])


def test_unknown_data_name():
    with pytest.raises(UserError, match="neither a registered dataset .*arith_sample.* nor an existing file"):
        data_lib.load_conversations(["no_such_set"])


def test_empty_outputs_are_skipped_and_counted(tmp_path):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([{"instruction": "a", "output": ""}, {"instruction": "b", "output": "c"}]))
    convs, stats = data_lib.load_conversations([str(f)])
    assert len(convs) == 1 and stats[0]["empty_output"] == 1


def test_dry_run_prints_stats_and_marked_example():
    res = run_script("uniform_finetune.py", "--dry_run")
    assert res.returncode == 0, res.stderr
    assert "arith_sample: 400 rows, 400 kept" in res.stdout
    assert "tokens per example min" in res.stdout and "⟦" in res.stdout and "⟧" in res.stdout
