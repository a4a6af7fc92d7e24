"""The fast data path gives exactly what the row-by-row path gives: Template.encode_batch == Template.encode token
for token (every template kind, real rows), tokenize_dataset (batched, in worker processes) == encode per row, the
streamed .json list == the whole-file parse (rows and error sentences), the Arrow length statistics == the Python
ones; large inputs show progress bars, small ones stay quiet. Nothing here is timed (see bench/data_throughput.py)."""
import copy
import gzip
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from utils import data as data_lib
from utils import templates as templates_lib
from utils.errors import UserError
from utils.templates import get_template

# Real rows: alpaca CoT (no input), code_alpaca (with input), gsm8k (qa), sharegpt (multi-turn, system),
# belle_eval and zh self-instruct (Chinese).
REAL = ["cot/creak_train.json:120", "cot/aqua_train.json:120", "code_alpaca/code_alpaca_2k.json:120",
        "gsm8k/train.jsonl:120", "sharegpt/dummy_conversation.json", "belle_eval/eval_set_dev.jsonl:120",
        "self_instruct/zh_seed_tasks.json:60"]

# Chat templates of other families' shapes (their turn markers are special tokens, as in the real ones).
OTHER_CHAT = {
    "header-style": ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                     "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                     "{% endif %}", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "turn-style": ("{{ '<bos>' }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else "
                   "m['role'] %}{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
                   ["<bos>", "<start_of_turn>", "<end_of_turn>"]),
}


@pytest.fixture(scope="module")
def real_convs():
    convs = []
    for rel in REAL:
        got, _ = data_lib.load_conversations([str(SHARED_DATA / rel)])
        convs += got
    return convs


def _prompts(convs):
    """Each conversation cut before its last answer: what inference encodes with add_generation_prompt."""
    out = []
    for msgs in convs:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append(msgs[:last])
    return out


def _tok_with_chat(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    source, specials = OTHER_CHAT[name]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = source
    return tok


@pytest.mark.parametrize("name,lang", [("alpaca", "en"), ("chatml", "en"), ("chat", "en"), ("vicuna", "en"),
                                       ("alpaca", "zh"), ("chat", "zh"), ("header-style", "en"),
                                       ("turn-style", "en")])
def test_encode_batch_equals_encode_on_real_rows(tokenizer, real_convs, name, lang):
    tok = _tok_with_chat(tokenizer, name) if name in OTHER_CHAT else tokenizer
    template = get_template("chat" if name in OTHER_CHAT else name, tok, lang)
    assert len(real_convs) > 600 and any(sum(m["role"] == "assistant" for m in c) > 1 for c in real_convs)
    for train_on_inputs in (False, True):
        expected = [template.encode(tok, m, train_on_inputs=train_on_inputs) for m in real_convs]
        got = []
        for i in range(0, len(real_convs), 100):
            got += template.encode_batch(tok, real_convs[i:i + 100], train_on_inputs=train_on_inputs)
        assert got == expected
    prompts = [p for p in _prompts(real_convs) if p]
    assert template.encode_batch(tok, prompts, add_generation_prompt=True) == [
        template.encode(tok, p, add_generation_prompt=True) for p in prompts]


@pytest.mark.parametrize("name", ["alpaca", "chatml", "vicuna"])
def test_encode_batch_with_a_bos_prefix(tokenizer, real_convs, name):
    """A tokenizer that adds BOS itself: format templates start every example with it, in both paths."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", bos)])
    template = get_template(name)
    assert template._prefix_ids(tok) == [bos]
    convs = real_convs[::5]
    got = template.encode_batch(tok, convs)
    assert got == [template.encode(tok, m) for m in convs]
    assert all(ids[0] == bos and labels[0] == -100 for ids, labels in got)


def test_token_ids_equals_the_tokenizer_call(tokenizer):
    texts = ["Hello world", " leading space", "trailing\n\n", "<|im_start|>user\nhi<|im_end|>\n", "中文的句子。",
             "tabs\tand  double  spaces", "a" * 3000, "<|endoftext|>"]
    want = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert templates_lib.token_ids(tokenizer, texts) == want
    assert templates_lib._DIRECT.get(tokenizer) is True  # the Rust backend is called directly for this one
    tok = copy.deepcopy(tokenizer)
    tok._tokenizer.enable_truncation(4)  # a backend left truncating: tokenizer(...) turns it off, so do we
    tok.split_special_tokens = True  # special-token text split into pieces, as tokenizer(...) does
    assert templates_lib.token_ids(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]
    assert templates_lib.token_ids(tok, texts) != want


def test_token_ids_falls_back_to_the_tokenizer_call(tokenizer, monkeypatch):
    tok = copy.deepcopy(tokenizer)
    templates_lib._DIRECT[tok] = False
    calls = []
    monkeypatch.setattr(templates_lib, "_direct_ids", lambda *a: calls.append(a))
    want = tokenizer(["one", "two"], add_special_tokens=False)["input_ids"]
    assert templates_lib.token_ids(tok, ["one", "two"]) == want
    assert calls == []


def test_a_bad_conversation_in_a_batch_raises_what_encode_raises(tokenizer):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for bad in ([{"role": "user", "content": 3}], [{"role": "assistant", "content": "first"}], []):
        for template in (get_template("chat", tokenizer), get_template("alpaca")):
            try:
                template.encode(tokenizer, bad)
            except Exception as exc:  # noqa: BLE001 - whatever encode raises, the batch raises too
                expected = (type(exc), str(exc))
            else:
                assert template.encode_batch(tokenizer, [good, bad]) == [template.encode(tokenizer, m)
                                                                         for m in (good, bad)]
                continue
            with pytest.raises(expected[0]) as got:
                template.encode_batch(tokenizer, [good, bad, good])
            assert str(got.value) == expected[1]


def _reference(convs, tokenizer, template, cutoff, train_on_inputs=False, cot=False):
    from utils.formats import add_cot_prompt

    out = []
    for msgs in convs:
        ids, labels = template.encode(tokenizer, add_cot_prompt(msgs) if cot else msgs, train_on_inputs=train_on_inputs)
        ids, labels = ids[:cutoff], labels[:cutoff]
        if any(l != -100 for l in labels):
            out.append((ids, labels))
    return out


@pytest.mark.parametrize("procs", [False, True])
def test_tokenize_dataset_equals_encode_per_row(tokenizer, real_convs, monkeypatch, procs):
    import datasets

    monkeypatch.setenv("ALPACA_COT_NUM_PROC", "2" if procs else "1")  # what a large input gets: a process per core
    ds = datasets.Dataset.from_dict({"messages": real_convs[:400]}, features=data_lib._features())
    for name, cutoff, cot in (("chat", 96, False), ("alpaca", 512, True)):
        template = get_template(name, tokenizer)
        tok, dropped = data_lib.tokenize_dataset(ds, tokenizer, template, cutoff, cot_prompt=cot)
        want = _reference(list(ds["messages"]), tokenizer, template, cutoff, cot=cot)
        assert list(zip(tok["input_ids"], tok["labels"])) == [(list(i), list(l)) for i, l in want]
        assert dropped == len(ds) - len(want) and (dropped > 0 or cutoff > 96)


def test_tokenize_conversations_equals_encode_per_row(tokenizer, real_convs):
    template = get_template("chat", tokenizer)
    examples, dropped = data_lib.tokenize_conversations(real_convs, tokenizer, template, 96, train_on_inputs=True)
    want = _reference(real_convs, tokenizer, template, 96, train_on_inputs=True)
    assert [(e["input_ids"], e["labels"]) for e in examples] == want and dropped == len(real_convs) - len(want)


def test_map_processes_only_for_large_inputs_and_idle_cores(monkeypatch):
    monkeypatch.delenv("ALPACA_COT_NUM_PROC", raising=False)

    def machine(cores, load):
        monkeypatch.setattr(data_lib, "_cores", lambda: cores)
        monkeypatch.setattr(data_lib.os, "getloadavg", lambda: (load, load, load))

    machine(2, 1.0)  # this process alone on two cores
    assert data_lib.map_procs(data_lib.PROCS_MIN_ROWS - 1) is None
    assert data_lib.map_procs(data_lib.PROCS_MIN_ROWS) == 2
    machine(2, 0.1)
    assert data_lib.map_procs(10 ** 7) == 2
    for load in (2.0, 4.5):  # the other core (or both) busy with other work: one process
        machine(2, load)
        assert data_lib.map_procs(10 ** 7) is None
    machine(1, 0.0)
    assert data_lib.map_procs(10 ** 7) is None
    machine(64, 1.0)
    assert data_lib.map_procs(10 ** 7) == data_lib.MAX_PROCS
    machine(64, 61.0)
    assert data_lib.map_procs(10 ** 7) == 4
    monkeypatch.setenv("ALPACA_COT_NUM_PROC", "3")  # set by hand: whatever the size and the load
    assert data_lib.map_procs(10) == 3
    monkeypatch.setenv("ALPACA_COT_NUM_PROC", "1")
    assert data_lib.map_procs(10 ** 7) is None
    for bad in ("0", "two", "-2"):
        monkeypatch.setenv("ALPACA_COT_NUM_PROC", bad)
        with pytest.raises(UserError, match=f"ALPACA_COT_NUM_PROC={bad} is not a number of processes"):
            data_lib.map_procs(10 ** 7)


def test_the_tokenization_cache_is_found_whatever_the_processes(tokenizer, real_convs, tmp_path, monkeypatch):
    """Cached by 2 processes (two part files), read back by a run that would use one, and the other way round."""
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in c]})
                           for c in real_convs[:120]))
    (ds, _), = data_lib.load_sources([str(f)])
    template = get_template("chat", tokenizer)
    monkeypatch.delenv("ALPACA_COT_NUM_PROC", raising=False)
    monkeypatch.setattr(data_lib, "PROCS_MIN_ROWS", 1)
    monkeypatch.setattr(data_lib, "_idle_cores", lambda: 2)
    two, _ = data_lib.tokenize_dataset(ds, tokenizer, template, 200)
    monkeypatch.setattr(data_lib, "_idle_cores", lambda: 1)
    one, _ = data_lib.tokenize_dataset(ds, tokenizer, template, 201, train_on_inputs=True)
    parts = sorted(Path(c["filename"]).name for c in two.cache_files)
    assert [p.split("_", 1)[1] for p in parts] == ["00000_of_00002.arrow", "00001_of_00002.arrow"]
    assert [Path(c["filename"]).name for c in one.cache_files] == [f"tokenized-{one._fingerprint}.arrow"]
    want = [(list(i), list(l)) for i, l in _reference(list(ds["messages"]), tokenizer, template, 200)]

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(templates_lib.Template, "encode_batch", boom)
    monkeypatch.setattr(data_lib, "_idle_cores", lambda: 1)
    again, _ = data_lib.tokenize_dataset(ds, tokenizer, template, 200)
    assert list(zip(again["input_ids"], again["labels"])) == want and again._fingerprint == two._fingerprint
    monkeypatch.setattr(data_lib, "_idle_cores", lambda: 2)
    again, _ = data_lib.tokenize_dataset(ds, tokenizer, template, 201, train_on_inputs=True)
    assert list(again["labels"]) == list(one["labels"]) and len(one) == len(ds)


def test_tokenization_is_cached(tokenizer, real_convs, tmp_path, monkeypatch):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in c]})
                           for c in real_convs[:50]))
    (ds, _), = data_lib.load_sources([str(f)])
    template = get_template("chat", tokenizer)
    first, _ = data_lib.tokenize_dataset(ds, tokenizer, template, 256)

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(templates_lib.Template, "encode_batch", boom)
    again, _ = data_lib.tokenize_dataset(ds, tokenizer, template, 256)
    assert list(again["input_ids"]) == list(first["input_ids"]) and len(first) == 50


# ---- the streamed .json list --------------------------------------------------------------------------
def _outcome(fn):
    try:
        return [(w, r, d) for w, r, d in fn()]
    except UserError as exc:
        return f"UserError: {exc}"


def _whole(path):
    """What the whole-file parse gives (rows, or the error sentence)."""
    def rows():
        with data_lib._open_text(path) as f:
            text = f.read()
        yield from data_lib._json_file_rows(path, text)
    return _outcome(rows)


TEXTS = {
    "plain": '[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]',
    "spaces": ' \n [\n  {"instruction": "a",\n "output": "b"} ,\n\n{"instruction": "c", "output": "d"}\n ]\n\n ',
    "empty": "[]",
    "empty spaced": "[ \n ]",
    "scalars": '[1, 23, 456, true, false, null, -7.5e3, "x", [1, [2]], {}]',
    "control chars": '[{"instruction": "tab\there", "output": "line\nbreak"}]',
    "bad escape": '[{"instruction": "C:\\Users\\x", "output": "ok"}, {"instruction": "a", "output": "\\d+"}]',
    "bad escape late": '[{"instruction": "a", "output": "b"}, {"instruction": "a\\q", "output": "b"}]',
    "unicode": '[{"instruction": "\\u4e2d\\u6587 中文 ✓", "output": "\\ud83d\\ude00"}]',
    "truncated": '[{"instruction": "a", "output": "b"}, {"instruction": "c", "out',
    "trailing comma": '[{"instruction": "x", "output": "y"},',
    "trailing comma closed": '[{"instruction": "x", "output": "y"},]',
    "missing comma": '[{"instruction": "x", "output": "y"} {"instruction": "x", "output": "y"}]',
    "extra data": '[{"instruction": "x", "output": "y"}] [1]',
    "only bracket": "[",
    "nested data key": '{"format": "alpaca", "data": [{"instruction": "x", "output": "y"}]}',
    "json lines as json": '{"instruction": "x", "output": "y"}\n{"instruction": "z", "output": "w"}\n',
    "object": '{"instruction": "x"}',
}


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 13, 64, 1 << 20])
def test_streamed_json_list_equals_the_whole_file_parse(tmp_path, monkeypatch, name, chunk):
    path = tmp_path / "rows.json"
    path.write_text(TEXTS[name], encoding="utf-8")
    want = _whole(path)
    monkeypatch.setattr(data_lib, "_CHUNK", chunk)
    assert _outcome(lambda: data_lib.iter_rows(path)) == want


def test_streamed_json_list_bom_and_gzip(tmp_path, monkeypatch):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    gz = tmp_path / "rows.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(rows, indent=2).encode()))
    monkeypatch.setattr(data_lib, "_CHUNK", 7)
    for path in (bom, gz):
        assert [r for _, r, _ in data_lib.iter_rows(path)] == rows


@pytest.mark.parametrize("rel", ["cot/creak_train.json", "sharegpt/dummy_conversation.json",
                                 "gpteacher/roleplay.json"])
def test_real_json_files_are_streamed_row_by_row(rel, monkeypatch):
    """The rows equal json.loads of the file, with the file read a small chunk at a time and the whole-file
    parse never used."""
    path = SHARED_DATA / rel
    want = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(want, dict):
        want = want["data"]

    def whole(*a):
        raise AssertionError("parsed whole")

    monkeypatch.setattr(data_lib, "_json_file_rows", whole)
    monkeypatch.setattr(data_lib, "_CHUNK", 4096)
    got = list(data_lib.iter_rows(path))
    assert [r for _, r, _ in got] == want
    assert got[-1][0] == f"{path} row {len(want)}"


def test_a_bad_escape_far_into_a_list_is_repaired_once(tmp_path, monkeypatch):
    """Rows before the damaged one are given as they stream; the rest come from the repairing parse, none twice."""
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)]
    text = json.dumps(rows)
    text = text.replace('"a20"', '"a\\d20"')  # \d is not a JSON escape; _loads doubles the backslash
    path = tmp_path / "rows.json"
    path.write_text(text)
    monkeypatch.setattr(data_lib, "_CHUNK", 16)
    got = [r for _, r, _ in data_lib.iter_rows(path)]
    assert len(got) == 30 and got[20]["output"] == "a\\d20" and got[:20] == rows[:20] and got[21:] == rows[21:]


# ---- the conversion cache (one Arrow file per source) ----------------------------------------------
@pytest.mark.parametrize("rel", ["cot/creak_train.json", "sharegpt/dummy_conversation.json",
                                 "gsm8k/train.jsonl", "code_alpaca/code_alpaca_2k.json"])
def test_converted_arrow_rows_equal_the_converter_rows(rel, tmp_path, monkeypatch):
    """The cached Dataset holds exactly the conversations _generate yields (written a few rows per batch here),
    with the same statistics; a second load reads the cache (no row is converted again) with the same
    fingerprint."""
    import datasets

    path = SHARED_DATA / rel
    monkeypatch.setattr(data_lib, "CONVERT_BATCH", 7)
    (ds, stats), = data_lib.load_sources([str(path)])
    want = list(data_lib._generate(json.dumps([str(path)]), None, None, None, False, True,
                                   str(tmp_path / "stats.json")))
    assert list(ds["messages"]) == [w["messages"] for w in want]
    assert ds.features == data_lib._features() and isinstance(ds, datasets.Dataset)
    assert {k: stats[k] for k in ("rows", "skipped", "format")} == {
        k: json.loads((tmp_path / "stats.json").read_text())[k] for k in ("rows", "skipped", "format")}

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(data_lib, "_generate", boom)
    (again, stats_again), = data_lib.load_sources([str(path)])
    assert again._fingerprint == ds._fingerprint and stats_again == stats and len(again) == len(ds)


def test_a_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    from utils.models import cache_dir

    monkeypatch.setattr(data_lib, "CONVERT_BATCH", 7)  # some batches are written before the bad row
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)] + [{"instruction": 5, "output": "x"}]
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    for _ in range(2):  # the same sentence again: nothing half-written was kept
        with pytest.raises(UserError, match="field 'instruction' must be a string"):
            data_lib.load_sources([str(f)])
    key = data_lib._source_key(data_lib.resolve_sources([str(f)])[0], True)
    assert not list((cache_dir() / "datasets").glob(f"conversations-{key}*"))
    f.write_text("\n".join(json.dumps(r) for r in rows[:30]))
    (ds, stats), = data_lib.load_sources([str(f)])
    assert len(ds) == 30 and stats["rows"] == 30


def test_the_conversion_fingerprint_follows_the_file(tmp_path):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    (first, _), = data_lib.load_sources([str(f)])
    (same, _), = data_lib.load_sources([str(f)])
    f.write_text(json.dumps([{"instruction": "a", "output": "c"}]))
    (changed, _), = data_lib.load_sources([str(f)])
    assert first._fingerprint == same._fingerprint != changed._fingerprint
    assert changed[0]["messages"][1]["content"] == "c"


# ---- statistics, split, progress ------------------------------------------------------------------
def test_length_stats_of_a_dataset_equal_the_python_count(tokenizer, real_convs):
    import datasets

    template = get_template("chat", tokenizer)
    ds = datasets.Dataset.from_dict({"messages": real_convs[:300]}, features=data_lib._features())
    tok, _ = data_lib.tokenize_dataset(ds, tokenizer, template, 128)
    parts = [tok, *data_lib.split(tok, 40, 3), tok.select(range(10, 200)), datasets.concatenate_datasets([tok, tok])]
    for part in parts:
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in part]
        assert data_lib.length_stats(part) == data_lib.length_stats(rows)


def test_handing_back_mapped_pages_keeps_the_data(tokenizer, real_convs, tmp_path):
    """Pages handed back are those of the Dataset's own mapped files: the data reads the same afterwards, and
    memory that is not such a mapping (a Python buffer) is left alone."""
    import ctypes

    import numpy as np

    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in c]})
                           for c in real_convs[:200]))
    (ds, _), = data_lib.load_sources([str(f)])
    tok, _ = data_lib.tokenize_dataset(ds, tokenizer, get_template("chat", tokenizer), 128)
    before = (list(ds["messages"]), list(tok["labels"]), data_lib.length_stats(tok))
    mapped = data_lib._MappedFiles([c["filename"] for c in ds.cache_files + tok.cache_files])
    assert mapped.ranges and mapped.madvise is not None
    mapped.release_all()
    own = np.arange(1 << 20, dtype=np.int64)  # 8 MB of this process's own memory
    mapped.release(own.ctypes.data, own.nbytes)
    blob = bytearray(b"x" * 100_000)
    mapped.release(ctypes.addressof((ctypes.c_char * len(blob)).from_buffer(blob)), len(blob))
    assert (own == np.arange(1 << 20)).all() and blob == bytearray(b"x" * 100_000)
    assert (list(ds["messages"]), list(tok["labels"]), data_lib.length_stats(tok)) == before
    assert data_lib._MappedFiles([]).ranges == [] and data_lib._MappedFiles([str(f)]).ranges == []


def test_split_is_deterministic_and_fingerprinted_by_its_inputs():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(100)], "labels": [[i] for i in range(100)]})
    a_train, a_val = data_lib.split(ds, 10, 1)
    b_train, b_val = data_lib.split(ds, 10, 1)
    c_train, _ = data_lib.split(ds, 10, 2)
    ids = lambda d: list(d["input_ids"])  # noqa: E731
    assert ids(a_train) == ids(b_train) and ids(a_val) == ids(b_val) and ids(a_train) != ids(c_train)
    assert a_train._fingerprint == b_train._fingerprint != c_train._fingerprint != a_val._fingerprint
    assert sorted(ids(a_train) + ids(a_val)) == ids(ds)


def test_progress_bars_only_for_large_inputs(tokenizer, tmp_path, monkeypatch, capsys):
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(300)]))
    template = get_template("chat", tokenizer)
    (ds, _), = data_lib.load_sources([str(f)])
    data_lib.tokenize_dataset(ds, tokenizer, template, 64)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(data_lib, "PROGRESS_MIN_BYTES", 1)
    monkeypatch.setattr(data_lib, "PROGRESS_MIN_ROWS", 1)
    f.write_text(json.dumps([{"instruction": f"q{i}", "output": f"b{i}"} for i in range(300)]))  # not cached
    (ds, _), = data_lib.load_sources([str(f)])
    data_lib.tokenize_dataset(ds, tokenizer, template, 64)
    err = capsys.readouterr().err
    assert "converting: 300 rows" in err and "rows/s" in err
    assert "tokenizing" in err and "300/300" in err and "examples/s" in err


def test_data_benchmark_smoke(tmp_path, capsys):
    """bench/data_throughput.py end to end on a few rows: it prints the ratio line and records every field (the
    figures themselves are not checked: no test depends on speed)."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("data_throughput", ROOT / "bench" / "data_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    results = bench.main(["--rows", "300", "--formats", "jsonl", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "data rows/s ours/tokenizer = " in printed and "second run (warm cache)" in printed
    (run,) = results["runs"]
    assert run["rows"] == 300 and run["peak_rss_mb"] > 0 and run["data_s"] > 0 and run["ratio"] > 0
    assert run["procs"] == 1  # 300 rows: tokenized in this one process
    assert json.loads(out.read_text())["runs"][0]["format"] == "jsonl"
