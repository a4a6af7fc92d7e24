"""The data layer: every real file converts and tokenizes, masks are right token by token, mixes and sample
sizes add up, caching works, and bad input gives the promised sentences."""
import gzip
import json

import pytest

from conftest import ROOT, SHARED_DATA, run_inprocess
from utils import data as data_lib
from utils.errors import UserError
from utils.formats import add_cot_prompt, convert_row
from utils.templates import get_template

# (path under ../shared/data, format, trainable?)
REAL_FILES = [
    ("cot/aqua_train.json", "alpaca", True), ("cot/creak_train.json", "alpaca", True),
    ("cot/ecqa_train.json", "alpaca", True), ("cot/qasc_train.json", "alpaca", True),
    ("cot/sensemaking_train.json", "alpaca", True), ("cot/strategyqa_train.json", "alpaca", True),
    ("gsm8k/train.jsonl", "qa", True), ("code_alpaca/code_alpaca_2k.json", "alpaca", True),
    ("gpteacher/roleplay.json", "alpaca", True), ("sharegpt/dummy_conversation.json", "sharegpt", True),
    ("belle_eval/eval_set_dev.jsonl", "qa", True), ("self_instruct/seed_tasks.jsonl", "self_instruct", True),
    ("self_instruct/zh_seed_tasks.json", "self_instruct", True), ("cmmlu/dev", "mc", True),
    ("instinwild/user_1.jsonl", "prompt_only", False), ("instinwild/user_2.jsonl", "prompt_only", False),
    ("instinwild/user_3.jsonl", "prompt_only", False), ("mt_bench/question.jsonl", "prompt_only", False),
]
# Not instruction data, so not listed: mt_bench/judge_prompts.jsonl, belle_eval/eval_prompt.json (judge prompts)
# and self_instruct/prompt.txt (the generation prompt).


@pytest.mark.parametrize("rel,fmt,trainable", REAL_FILES)
def test_every_real_file_loads_converts_and_tokenizes(rel, fmt, trainable, tokenizer):
    (ds, stats), = data_lib.load_sources([str(SHARED_DATA / rel)], for_training=trainable)
    assert stats["format"] == fmt and stats["rows"] == stats["kept"] + stats["skipped"] and len(ds) == stats["kept"]
    assert stats["kept"] >= 0.6 * stats["rows"]
    template = get_template("chat", tokenizer)
    sample = ds.select(range(min(40, len(ds))))
    if trainable:
        tok, dropped = data_lib.tokenize_dataset(sample, tokenizer, template, cutoff_len=512)
        assert len(tok) + dropped == len(sample) and len(tok) > 0
        for ids, labels in zip(tok["input_ids"], tok["labels"]):
            assert len(ids) == len(labels) <= 512 and labels[0] == -100 and any(l != -100 for l in labels)
    else:
        for msgs in sample["messages"]:
            assert msgs[-1]["role"] == "user"
            assert template.prompt_ids(tokenizer, msgs)


def _trained_text(tokenizer, ids, labels):
    """The text of each trained span, in order."""
    spans, cur = [], []
    for t, l in zip(ids, labels):
        if l != -100:
            cur.append(t)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    if cur:
        spans.append(tokenizer.decode(cur))
    return spans


def _expected_labels(tokenizer, msgs):
    """Independent reference built from apply_chat_template on growing prefixes of the conversation."""
    labels, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs[:i + 1], tokenize=False)
        labels += [-100] * len(tokenizer(prompt[len(done):], add_special_tokens=False)["input_ids"])
        answer = tokenizer(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        labels += answer
        labels += [-100] * len(tokenizer(full[len(prompt) + len(m["content"]) + len("<|im_end|>"):],
                                         add_special_tokens=False)["input_ids"])
        done = full
    return labels


@pytest.mark.parametrize("rel", ["sharegpt/dummy_conversation.json", "code_alpaca/code_alpaca_2k.json"])
def test_labels_token_by_token_against_apply_chat_template(rel, tokenizer):
    convs, _ = data_lib.load_conversations([str(SHARED_DATA / rel)])
    template = get_template("chat", tokenizer)
    multi = [c for c in convs if sum(m["role"] == "assistant" for m in c) >= 2]
    for msgs in (multi[:5] if "sharegpt" in rel else convs[:5]):
        plain = [{"role": m["role"], "content": m["content"] if not m["input"] else f"{m['content']}\n\n{m['input']}"}
                 for m in msgs]
        ids, labels = template.encode(tokenizer, msgs)
        full = tokenizer.apply_chat_template(plain, tokenize=False)
        assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]
        assert labels == _expected_labels(tokenizer, plain)
        answers = [m["content"] + "<|im_end|>" for m in plain if m["role"] == "assistant"]
        assert _trained_text(tokenizer, ids, labels) == answers


def test_messages_format_labels(tokenizer, tmp_path):
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                          {"role": "assistant", "content": "6"}]}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    convs, stats = data_lib.load_conversations([str(f)])
    assert stats[0]["format"] == "messages"
    ids, labels = get_template("chat", tokenizer).encode(tokenizer, convs[0])
    plain = [{"role": m["role"], "content": m["content"]} for m in convs[0]]
    assert labels == _expected_labels(tokenizer, plain)
    assert _trained_text(tokenizer, ids, labels) == ["4<|im_end|>", "6<|im_end|>"]


# Hand-written chat templates of other families' shapes (turn markers are special tokens, as in the real ones).
OTHER_TEMPLATES = {
    "header-style": ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                     "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' "
                     "}}{% endfor %}{% if add_generation_prompt %}"
                     "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
                     ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "turn-style": ("{{ '<bos>' }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
                   "{{ '<start_of_turn>' + role + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
                   ["<bos>", "<start_of_turn>", "<end_of_turn>"]),
}


@pytest.mark.parametrize("name", ["smollm2", *OTHER_TEMPLATES])
def test_rendering_equals_apply_chat_template_token_for_token(name, embedded_dir):
    """Every prompt (what inference feeds the model) equals apply_chat_template token for token; so does the
    whole conversation where the tokenizer does not merge a prompt's trailing whitespace into the answer."""
    from utils.models import load_tokenizer

    tok = load_tokenizer(embedded_dir)
    if name != "smollm2":
        source, specials = OTHER_TEMPLATES[name]
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template = source
    template = get_template("chat", tok)
    convs, _ = data_lib.load_conversations([str(SHARED_DATA / "sharegpt/dummy_conversation.json")])
    for msgs in convs[:20]:
        plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
        ids, labels = template.encode(tok, msgs)
        first = plain.index(next(m for m in plain if m["role"] == "assistant"))
        assert template.prompt_ids(tok, msgs[:first]) == tok.apply_chat_template(
            plain[:first], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        for i, m in enumerate(plain):
            if m["role"] == "assistant":  # every turn: training sees exactly the prompt that inference builds
                prompt = template.prompt_ids(tok, msgs[:i])
                assert ids[:len(prompt)] == prompt
        assert tok.decode(ids) == tok.apply_chat_template(plain, tokenize=False)
        if name == "smollm2":
            assert ids == tok.apply_chat_template(plain, tokenize=True, return_dict=True)["input_ids"]
        trained = _trained_text(tok, ids, labels)
        assert len(trained) == sum(m["role"] == "assistant" for m in plain)


def test_sample_sizes_and_oversampling():
    out = data_lib.load_sources(["arith_sample:100", "arith_sample:0.5", "arith_sample:1000"], seed=1)
    assert [len(ds) for ds, _ in out] == [100, 200, 1000]
    a = data_lib.load_sources(["arith_sample:100"], seed=1)[0][0]["messages"]
    b = data_lib.load_sources(["arith_sample:100"], seed=2)[0][0]["messages"]
    assert a == out[0][0]["messages"] and a != b


def test_registry_mixes_resolve_to_their_parts():
    datasets, mixes = data_lib.registry()
    assert mixes, "the registry defines the seed's named mixes"
    for mix, parts in mixes.items():
        assert all(p in datasets for p in parts), mix


def test_local_mix_sizes(tmp_path, monkeypatch):
    reg = {"datasets": {"a": {"path": str(tmp_path / "a.json"), "format": "alpaca"},
                        "b": {"local": [str(SHARED_DATA / "gsm8k/train.jsonl")], "format": "qa"}},
           "mixes": {"a-b": ["a", "b"]}}
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": str(i), "output": "x"} for i in range(7)]))
    monkeypatch.setattr(data_lib, "registry", lambda: (reg["datasets"], reg["mixes"]))
    out = data_lib.load_sources(["a-b"])
    assert [s["source"] for _, s in out] == ["a", "b"] and [len(d) for d, _ in out] == [7, 7473]
    assert [len(d) for d, _ in data_lib.load_sources(["a", "b:50"])] == [7, 50]
    with pytest.raises(UserError, match="a sample size applies to one dataset, not to the mix 'a-b'"):
        data_lib.load_sources(["a-b:10"])


def test_file_types_directory_and_explicit_format(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]
    (tmp_path / "d").mkdir()
    with gzip.open(tmp_path / "d" / "x.json.gz", "wt") as f:
        json.dump(rows, f)
    (tmp_path / "d" / "y.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d" / "z.csv").write_text("instruction,input,output\nq,,a\nr,,b\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "w.parquet")
    (ds, st), = data_lib.load_sources([str(tmp_path / "d")])
    assert len(ds) == 4 + 4 + 2 + 4 and st["format"] == "alpaca"
    (tmp_path / "qa.json").write_text(json.dumps([{"question": "1+1?", "answer": "2"}]))
    assert data_lib.load_sources([str(tmp_path / "qa.json") + "@qa:3"])[0][0].num_rows == 3
    (tmp_path / "named.json").write_text(json.dumps({"format": "qa", "data": [{"question": "a", "answer": "b"}]}))
    assert data_lib.load_sources([str(tmp_path / "named.json")])[0][1]["format"] == "qa"


@pytest.mark.parametrize("row,fmt,expected", [
    ({"question": "Tom has 2+3 apples?", "answer": "He has 2+3 = <<2+3=5>>5.\n#### 5"}, "qa",
     [("user", "Tom has 2+3 apples?"), ("assistant", "He has 2+3 = 5.\nThe answer is 5.")]),
    ({"text": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you"}, "transcript",
     [("user", "Hi there"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "See you")]),
    ({"text": "[|Human|] Hi [|AI|] Hello"}, "transcript", [("user", "Hi"), ("assistant", "Hello")]),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]},
     "sharegpt", [("system", "S"), ("user", "U"), ("assistant", "A")]),
    ({"instruction": "I", "input": "X", "output": "O", "history": [["h1", "a1"]]}, "alpaca",
     [("user", "h1"), ("assistant", "a1"), ("user", "I"), ("assistant", "O")]),
    ({"instruction": "Human: hi\nAssistant: hello\nHuman: how are you?\nAssistant:", "input": "", "output": "fine"},
     "alpaca", [("user", "hi"), ("assistant", "hello"), ("user", "how are you?"), ("assistant", "fine")]),
    ({"Question": "Q?", "A": "x", "B": "y", "C": "z", "D": "w", "Answer": "B"}, "mc",
     [("user", "Q?\nA. x\nB. y\nC. z\nD. w"), ("assistant", "B")]),
])
def test_converters(row, fmt, expected):
    from utils.formats import detect_format

    assert detect_format(row, "row") == fmt
    msgs = convert_row(row, fmt, "row")
    assert [(m["role"], m["content"]) for m in msgs] == expected


def test_broken_turn_order_is_skipped_and_counted(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                                {"from": "gpt", "value": "c"}]},
                             {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "c"}]}]))
    (ds, st), = data_lib.load_sources([str(f)])
    assert (st["rows"], st["kept"], st["skipped"]) == (2, 1, 1)


def test_cot_formatter_and_cot_prompt():
    row = {"question": "Is 7 prime?", "rationale": "7 has no divisors but 1 and 7.", "answer": "yes"}
    outs = [convert_row(row, "cot_raw", "r", index=i) for i in range(4)]
    assert len({o[0]["content"] for o in outs}) == 4  # several FLAN-style templates
    assert all("yes" in o[1]["content"] and "7 has no divisors" in o[1]["content"] for o in outs)
    en = add_cot_prompt([{"role": "user", "content": "What is 2+2?", "input": ""}])
    zh = add_cot_prompt([{"role": "user", "content": "二加二等于几？", "input": ""}])
    assert en[0]["content"] == "What is 2+2? Let's think step by step."
    assert zh[0]["content"] == "二加二等于几？先思考，再决定。"


def test_alpaca_cot_collection_newlines_can_be_unescaped():
    row = {"instruction": "Q\\nOptions:\\n(A) 1", "input": "", "output": "R\\nThe final answer: (A)."}
    assert convert_row(row, "alpaca", "r", unescape=True)[0]["content"] == "Q\nOptions:\n(A) 1"


def test_chinese_prompt_wording(tokenizer):
    from utils.templates import alpaca_messages

    text = "".join(t for t, _ in get_template("alpaca", lang="zh").segments(alpaca_messages("加法", "1 和 2", "3")))
    assert "### 指令：\n加法" in text and "### 输入：\n1 和 2" in text and "### 回答：\n" in text
    segs = get_template("chat", tokenizer, lang="zh").segments([{"role": "user", "content": "你好"}], True, tokenizer)
    assert "你是一个乐于助人的助手。" in segs[0][0]


def test_conversion_is_cached_and_invalidated_on_change(tmp_path, monkeypatch):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert len(data_lib.load_sources([str(f)])[0][0]) == 1

    def boom(path):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(data_lib, "iter_rows", boom)
    assert len(data_lib.load_sources([str(f)])[0][0]) == 1  # from the cache
    monkeypatch.undo()
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    assert len(data_lib.load_sources([str(f)])[0][0]) == 2


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
    assert data_lib.render_masked(tokenizer, ids, [-100] + ids[1:]) == "a⟦ b c⟧"


@pytest.mark.parametrize("content,message", [
    ('[{"instruction": "x", "output": 3}]', "row 1 field 'output' must be a string, not int"),
    ('[{"instruction": "x", "output": "y"},', "is not valid JSON (line 1: Expecting value)"),
    ('{"instruction": "x"}', "must hold a JSON list of rows"),
    ('[{"foo": 1, "bar": 2}]', "cannot tell the format of {path} row 1: it has columns bar, foo; accepted formats are"),
    ('[{"conversations": [{"from": "robot", "value": "x"}]}]', "row 1 turn 1 has an unknown role 'robot'"),
    ('[{"instruction": "a"}]', "none of the 1 rows of {path} (prompt_only format) has an answer to train on"),
])
def test_bad_files_give_one_clear_sentence(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    res = run_inprocess("uniform_finetune.py", "--data", bad, "--dry_run")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert message.format(path=bad) in res.stderr and str(bad) in res.stderr


def test_bad_jsonl_line_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2 is not valid JSON"):
        data_lib.load_conversations([str(bad)])


@pytest.mark.parametrize("value,message", [
    ("no_such_set", "--data 'no_such_set' is neither a registered dataset or mix nor an existing file or directory"),
    ("arith_sample@yaml", "unknown format 'yaml'"),
    ("arith_sample:0", "the sample size after ':' must be positive"),
])
def test_bad_data_values(value, message):
    with pytest.raises(UserError, match=message):
        data_lib.load_sources([value])


def test_hub_file_offline_gives_a_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="is not available here: QingyiSi/Alpaca-CoT/x.json is not in the local hub "
                                        "cache"):
        data_lib._registry_source("x", {"hub": {"repo": "QingyiSi/Alpaca-CoT", "file": "x.json"}}, None, None)


def test_empty_outputs_are_skipped_and_counted(tmp_path):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([{"instruction": "a", "output": ""}, {"instruction": "b", "output": "c"}]))
    convs, stats = data_lib.load_conversations([str(f)])
    assert len(convs) == 1 and stats[0]["skipped"] == 1


@pytest.mark.parametrize("spec", ["arith_sample", str(SHARED_DATA / "gsm8k/train.jsonl") + ":50",
                                  str(SHARED_DATA / "sharegpt/dummy_conversation.json") + ":50",
                                  str(SHARED_DATA / "cmmlu/dev") + ":50",
                                  str(SHARED_DATA / "self_instruct/seed_tasks.jsonl") + ":50"])
def test_dry_run_prints_stats_and_marked_example(spec, capsys):
    from uniform_finetune import main

    main(["--data", spec, "--dry_run", "--cot_prompt"])
    out = capsys.readouterr().out
    assert "rows," in out and "kept" in out and "dropped (no answer token within --cutoff_len)" in out
    assert "tokens per example min" in out and "⟦" in out and "⟧" in out


def test_list_data(capsys):
    from uniform_finetune import main

    main(["--list_data"])
    out = capsys.readouterr().out
    assert "| `arith_sample` | 400 |" in out and "available here" in out


def test_readme_registry_table_is_generated():
    assert data_lib.registry_table(available=False) in (ROOT / "README.md").read_text(encoding="utf-8")


def test_an_unreachable_hub_is_one_sentence_without_retries(monkeypatch, tmp_path):
    """No network: the local hub cache is asked, the network download never (it would retry for ~25 s)."""
    import huggingface_hub

    from utils import hub
    from utils.models import resolve_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    networked = []
    real = huggingface_hub.hf_hub_download

    def download(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            networked.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert not hub.reachable() and hub.cache_only("someone/model") and not hub.cache_only(tmp_path)
    with pytest.raises(UserError, match=r"could not be downloaded \(hub.invalid cannot be reached from here\)"):
        data_lib._registry_source("x", {"hub": {"repo": "QingyiSi/Alpaca-CoT", "file": "x.json"}}, None, None)
    assert networked == []
    with pytest.raises(UserError, match="cannot find a model at 'someone/model'"):
        resolve_model("someone/model")
