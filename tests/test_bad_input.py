"""Bad input of every kind ends in one clear sentence and exit code 2, never a traceback, before any work is lost.

Table-driven: each case is (script, arguments, the words the message must contain). The scripts' main() runs
in this process (fast: most checks fire before any weight loads); a few cases run as real subprocesses to check
the exit code and stderr end to end. Placeholders in arguments: {d} the case files, {tiny} a tiny random llama,
{run} a finished tiny LoRA run, {bad_*} damaged copies of it.
"""
import gzip
import importlib.util
import json
import shutil
import sys

import pytest

from conftest import ROOT, SHARED_DATA, run_script

SCRIPTS = {}


def _main(script):
    """The main() of a root script, imported by path (the root evaluate.py must not shadow anything here)."""
    if script not in SCRIPTS:
        if script == "self_instruct":
            from utils.self_instruct import main
        else:
            spec = importlib.util.spec_from_file_location(f"_script_{script}", ROOT / f"{script}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            main = module.main
        SCRIPTS[script] = main
    return SCRIPTS[script]


ROWS = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}] * 4

# (file name, bytes) written into {d}
FILES = {
    "empty.json": b"",
    "blank.jsonl": b"\n  \n\n",
    "truncated.json": b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "out',
    "badline.jsonl": b'{"instruction": "a", "output": "b"}\n{"instruction": oops}\n',
    "notgzip.json.gz": b'[{"instruction": "a", "output": "b"}]',
    "notparquet.parquet": b"PAR1 this is not parquet at all, just text pretending to be one",
    "cells.csv": b"instruction,output\na,b,c,d\n",
    "notobjects.json": b"[1, 2, 3]",
    "intoutput.json": b'[{"instruction": "x", "output": 3}]',
    "columns.json": b'[{"foo": 1, "bar": 2}]',
    "nullinstr.json": b'[{"instruction": null, "output": "b"}]',
    "order.jsonl": b'{"text": "\\n\\nAssistant: hi\\n\\nHuman: what?"}\n',
    "data.txt": b"instruction: a\noutput: b\n",
    "role.json": b'[{"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}]',
    "nocontent.json": b'[{"messages": [{"role": "user"}]}]',
    "binary.json": bytes(range(256)) * 4,
    "dict.json": b'{"rows": [1]}',
    "declared.json": b'{"format": "nosuch", "data": []}',
    "noanswer.json": b'[{"instruction": "a"}]',
    "list.yaml": b"- lora_r\n- 8\n",
    "broken.yaml": b"lora_r: [8\n",
    "typo.yaml": b"lora_rank: 4\n",
    "wrongtype.yaml": b"lora_r: eight\n",
    "range.yaml": b"lora_r: 0\n",
    "listval.yaml": b"learning_rate: [1, 2]\n",
    "a_file": b"not a directory",
    "empty_seeds.jsonl": b"",
}

CASES = [
    # ---- flags: every value range-checked before a model loads -------------------------------------------
    ("lora_r 0", "uniform_finetune", ["--lora_r", "0"], "--lora_r must be >= 1, not 0"),
    ("lora_r -1", "uniform_finetune", ["--lora_r", "-1"], "--lora_r must be >= 1, not -1"),
    ("lora_r text", "uniform_finetune", ["--lora_r", "eight"], "--lora_r"),
    ("lora_alpha 0", "uniform_finetune", ["--lora_alpha", "0"], "--lora_alpha must be > 0"),
    ("lora_dropout 1.5", "uniform_finetune", ["--lora_dropout", "1.5"], "--lora_dropout must be >= 0 and < 1"),
    ("learning_rate -1", "uniform_finetune", ["--learning_rate", "-1"], "--learning_rate must be > 0"),
    ("batch 0", "uniform_finetune", ["--per_gpu_train_batch_size", "0"], "--per_gpu_train_batch_size must be >= 1"),
    ("accumulation 0", "uniform_finetune", ["--gradient_accumulation_steps", "0"],
     "--gradient_accumulation_steps must be >= 1"),
    ("epochs 0", "uniform_finetune", ["--epochs", "0"], "--epochs must be > 0 when --max_steps is not given"),
    ("epochs -2", "uniform_finetune", ["--epochs", "-2", "--max_steps", "5"], "--epochs"),
    ("max_steps 0", "uniform_finetune", ["--max_steps", "0"], "--max_steps must be -1"),
    ("max_steps -7", "uniform_finetune", ["--max_steps", "-7"], "--max_steps must be >= -1"),
    ("cutoff_len 0", "uniform_finetune", ["--cutoff_len", "0"], "--cutoff_len must be >= 8"),
    ("val_set_size -1", "uniform_finetune", ["--val_set_size", "-1"], "--val_set_size must be >= 0"),
    ("warmup -5", "uniform_finetune", ["--warmup_steps", "-5"], "--warmup_steps must be >= 0"),
    ("save_steps 0", "uniform_finetune", ["--save_steps", "0"], "--save_steps must be >= 1"),
    ("logging_steps 0", "uniform_finetune", ["--logging_steps", "0"], "--logging_steps must be >= 1"),
    ("virtual tokens 0", "uniform_finetune", ["--peft_type", "prefix", "--num_virtual_tokens", "0"],
     "--num_virtual_tokens must be >= 1"),
    ("bottleneck 0", "uniform_finetune", ["--peft_type", "sadapter_h", "--bottleneck_size", "0"],
     "--bottleneck_size must be >= 1"),
    ("peft typo", "uniform_finetune", ["--peft_type", "lroa"], "did you mean 'lora'?"),
    ("model_type typo", "uniform_finetune", ["--model_type", "lama"], "unknown --model_type 'lama'"),
    ("stage", "uniform_finetune", ["--stage", "ppo"], "--stage"),
    ("bf16 value", "uniform_finetune", ["--bf16", "maybe"], "--bf16"),
    ("micro batch", "uniform_finetune", ["--per_gpu_train_batch_size", "4", "--micro_batch_size", "3"],
     "--micro_batch_size 3 must be auto or a positive divisor"),
    ("4 and 8 bit", "uniform_finetune", ["--load_in_4bit", "--load_in_8bit"], "exclude each other"),
    ("unknown flag", "uniform_finetune", ["---model_type", "llama"], "did you mean '--model_type'?"),
    ("deepspeed file", "uniform_finetune", ["--deepspeed", "{d}/missing.json"], "--deepspeed {d}/missing.json does "
                                                                                "not"),
    ("template", "uniform_finetune", ["--model_name_or_path", "{tiny}", "--template", "nosuch", "--dry_run"],
     "unknown --template 'nosuch'"),
    ("output_dir file", "uniform_finetune", ["--model_name_or_path", "{tiny}", "--output_dir", "{d}/a_file"],
     "{d}/a_file is a file, not a directory"),
    ("output_dir in file", "uniform_finetune", ["--model_name_or_path", "{tiny}", "--output_dir", "{d}/a_file/run"],
     "{d}/a_file is a file, not a directory"),
    ("resume nothing", "uniform_finetune", ["--model_name_or_path", "{tiny}", "--output_dir", "{d}/fresh_run",
                                            "--resume_from_checkpoint"], "{d}/fresh_run holds no complete checkpoint"),
    ("resume path", "uniform_finetune", ["--model_name_or_path", "{tiny}", "--resume_from_checkpoint", "{d}/nope"],
     "is not a complete checkpoint directory"),
    # ---- data files ---------------------------------------------------------------------------------------
    ("empty file", "uniform_finetune", ["--data", "{d}/empty.json"], "{d}/empty.json is empty"),
    ("blank jsonl", "uniform_finetune", ["--data", "{d}/blank.jsonl"], "{d}/blank.jsonl is empty"),
    ("truncated json", "uniform_finetune", ["--data", "{d}/truncated.json"], "{d}/truncated.json is not valid JSON"),
    ("bad jsonl line", "uniform_finetune", ["--data", "{d}/badline.jsonl"], "{d}/badline.jsonl line 2 is not valid "
                                                                            "JSON"),
    ("not gzip", "uniform_finetune", ["--data", "{d}/notgzip.json.gz"], "is not a readable gzip file"),
    ("truncated gzip", "uniform_finetune", ["--data", "{d}/truncated.json.gz"], "truncated or damaged"),
    ("not parquet", "uniform_finetune", ["--data", "{d}/notparquet.parquet"], "is not a readable Parquet file"),
    ("csv cells", "uniform_finetune", ["--data", "{d}/cells.csv"], "{d}/cells.csv line 2 has 4 cells"),
    ("not objects", "uniform_finetune", ["--data", "{d}/notobjects.json"], "row 1 is not a JSON object"),
    ("output int", "uniform_finetune", ["--data", "{d}/intoutput.json"], "field 'output' must be a string, not int"),
    ("unknown columns", "uniform_finetune", ["--data", "{d}/columns.json"], "cannot tell the format"),
    ("null instruction", "uniform_finetune", ["--data", "{d}/nullinstr.json"], "field 'instruction' is null"),
    ("turn order", "uniform_finetune", ["--data", "{d}/order.jsonl"], "turns out of order"),
    ("file type", "uniform_finetune", ["--data", "{d}/data.txt"], "unsupported file type"),
    ("empty dir", "uniform_finetune", ["--data", "{d}/emptydir"], "has no data files"),
    ("sharegpt role", "uniform_finetune", ["--data", "{d}/role.json"], "unknown role 'robot'"),
    ("messages content", "uniform_finetune", ["--data", "{d}/nocontent.json"], "needs a 'role' and a string 'content'"),
    ("binary", "uniform_finetune", ["--data", "{d}/binary.json"], "is not UTF-8 text"),
    ("json dict", "uniform_finetune", ["--data", "{d}/dict.json"], "must hold a JSON list of rows"),
    ("declared format", "uniform_finetune", ["--data", "{d}/declared.json"], "names an unknown format 'nosuch'"),
    ("no answers", "uniform_finetune", ["--data", "{d}/noanswer.json"], "has an answer to train on"),
    ("unknown @format", "uniform_finetune", ["--data", "{d}/noanswer.json@nosuch"], "unknown format 'nosuch'"),
    ("size 0", "uniform_finetune", ["--data", "arith_sample:0"], "the sample size after ':' must be positive"),
    ("registry typo", "uniform_finetune", ["--data", "arith_smaple"], "did you mean 'arith_sample'?"),
    ("missing data", "uniform_finetune", ["--data", "{d}/nowhere.json"], "is neither a registered dataset"),
    # ---- config files ---------------------------------------------------------------------------------------
    ("config missing", "uniform_finetune", ["--config", "{d}/nope.yaml"], "config file {d}/nope.yaml does not exist"),
    ("config syntax", "uniform_finetune", ["{d}/broken.yaml"], "is not valid YAML"),
    ("config key", "uniform_finetune", ["{d}/typo.yaml"], "unknown key 'lora_rank'; did you mean 'lora_r'?"),
    ("config type", "uniform_finetune", ["{d}/wrongtype.yaml"], "'lora_r' must be int, not \"eight\""),
    ("config range", "uniform_finetune", ["{d}/range.yaml"], "--lora_r must be >= 1, not 0"),
    ("config list", "uniform_finetune", ["{d}/list.yaml"], "must hold a mapping"),
    ("config list value", "uniform_finetune", ["{d}/listval.yaml"], "'learning_rate' takes one value"),
    # ---- model directories ----------------------------------------------------------------------------------
    ("model missing", "generate", ["--model_name_or_path", "./no/such/model", "--prompt", "hi"], "does not exist"),
    ("model config", "generate", ["--model_name_or_path", "{d}/badmodel", "--prompt", "hi"],
     "{d}/badmodel/config.json is damaged"),
    ("model no config", "generate", ["--model_name_or_path", "{d}/emptydir", "--prompt", "hi"], "has no config.json"),
    ("model is file", "generate", ["--model_name_or_path", "{d}/a_file", "--prompt", "hi"], "is a file"),
    # ---- adapter directories --------------------------------------------------------------------------------
    ("lora_dir missing", "generate", ["--lora_dir", "{d}/nope", "--prompt", "hi"], "is not a directory"),
    ("no adapter config", "generate", ["--lora_dir", "{d}/emptydir", "--prompt", "hi"], "has no adapter_config.json"),
    ("truncated weights", "generate", ["--lora_dir", "{bad_weights}", "--prompt", "hi"],
     "adapter_model.safetensors is damaged"),
    ("corrupt meta", "generate", ["--lora_dir", "{bad_meta}", "--prompt", "hi"], "finetune_meta.json is damaged"),
    ("empty meta", "generate", ["--lora_dir", "{empty_meta}", "--prompt", "hi"], "the file is empty"),
    ("corrupt template", "generate", ["--lora_dir", "{bad_template}", "--prompt", "hi"], "template.json is damaged"),
    ("corrupt adapter config", "generate", ["--lora_dir", "{bad_config}", "--prompt", "hi"],
     "adapter_config.json is damaged"),
    ("merge not mergeable", "merge", ["--lora_dir", "{prefix_meta}", "--merged_dir", "{d}/m1"], "cannot be merged"),
    ("merge into full dir", "merge", ["--lora_dir", "{run}", "--merged_dir", "{d}"], "is not an empty directory"),
    ("merge 4bit", "merge", ["--lora_dir", "{run}", "--merged_dir", "{d}/m2", "--load_in_4bit"],
     "reloaded in full precision"),
    ("merge args", "merge", ["--lora_dir", "{run}"], "needs --lora_dir"),
    ("seed size merge", "merge", ["--model_type", "llama", "--size", "7b", "--lora_dir", "{d}/nope",
                                  "--merged_dir", "{d}/m3"], "is not a directory"),
    # ---- generation -------------------------------------------------------------------------------------------
    ("max_new_tokens -5", "generate", ["--lora_dir", "{run}", "--prompt", "hi", "--max_new_tokens", "-5"],
     "--max_new_tokens must be >= 1, not -5"),
    ("temperature 0", "generate", ["--temperature", "0", "--prompt", "hi"], "--temperature must be > 0"),
    ("top_p 1.5", "generate", ["--top_p", "1.5", "--prompt", "hi"], "--top_p must be > 0 and <= 1"),
    ("num_beams 0", "generate", ["--num_beams", "0", "--prompt", "hi"], "--num_beams must be >= 1"),
    ("repetition 0", "generate", ["--repetition_penalty", "0", "--prompt", "hi"], "--repetition_penalty must be > 0"),
    ("seed data no run", "generate", ["--data", "nosuch_data", "--model_type", "llama", "--prompt", "hi"],
     "no finished run under saved_models/ was trained with --data nosuch_data"),
    ("gen preset", "generate", ["--gen_preset", "fast"], "--gen_preset"),
    # ---- predict --------------------------------------------------------------------------------------------
    ("predict no data", "predict", ["--result_dir", "{d}/p"], "predict.py needs --data"),
    ("predict result file", "predict", ["--data", "arith_sample", "--result_dir", "{d}/a_file"], "is a file"),
    ("predict batch 0", "predict", ["--data", "arith_sample", "--result_dir", "{d}/p", "--batch_size", "0"],
     "--batch_size must be >= 1"),
    ("predict bad adapter", "predict", ["--data", "arith_sample", "--result_dir", "{d}/p", "--lora_dir",
                                        "{bad_weights}"], "adapter_model.safetensors is damaged"),
    # ---- server / web ---------------------------------------------------------------------------------------
    ("server port", "server", ["--port", "70000"], "--port must be >= 1 and <= 65535"),
    ("server queue", "server", ["--max_queue", "0"], "--max_queue must be >= 1"),
    ("server dup names", "server", ["--lora_dir", "a={run}", "a={run}", "--port", "0"], "--port must be >= 1"),
    ("server bad adapter", "server", ["--lora_dir", "{bad_weights}"], "adapter_model.safetensors is damaged"),
    ("web two adapters", "web", ["--lora_dir", "{run}", "{run}"], "web.py chats with one adapter"),
    ("web api key", "web", ["--api_key", "k"], "--api_key is for server.py"),
    # ---- evaluate -------------------------------------------------------------------------------------------
    ("eval no task", "evaluate", [], "evaluate.py needs --task"),
    ("eval task", "evaluate", ["--task", "nosuch"], "--task"),
    ("eval mc dir", "evaluate", ["--task", "mc"], "--task mc needs --data_dir"),
    ("eval mc not dir", "evaluate", ["--task", "mc", "--data_dir", "{d}/a_file"], "is not a directory"),
    ("eval cot data", "evaluate", ["--task", "cot"], "--task cot needs --data"),
    ("eval loss data", "evaluate", ["--task", "loss"], "--task loss needs --data"),
    ("eval shots", "evaluate", ["--task", "mc", "--shots", "-1"], "--shots must be >= 0"),
    ("eval limit", "evaluate", ["--task", "cot", "--data", "arith_sample", "--limit", "0"], "--limit must be >= 1"),
    ("eval judge", "evaluate", ["--task", "belle", "--data", "{d}/noanswer.json", "--judge_base_url",
                                "http://127.0.0.1:9/v1"], "--judge_base_url needs --judge_model"),
    ("eval bad adapter", "evaluate", ["--task", "loss", "--data", "arith_sample", "--lora_dir", "{bad_meta}"],
     "finetune_meta.json is damaged"),
    # ---- self-instruct ----------------------------------------------------------------------------------------
    ("si flags", "self_instruct", [], "self-instruct needs --seed_tasks"),
    ("si url", "self_instruct", ["--seed_tasks", "{seeds}", "--output", "{d}/o.jsonl", "--base_url", "ftp://x",
                                 "--model", "m"], "must start with http://"),
    ("si seeds", "self_instruct", ["--seed_tasks", "{d}/empty_seeds.jsonl", "--output", "{d}/o.jsonl", "--base_url",
                                   "http://127.0.0.1:9/v1", "--model", "m"], "empty_seeds.jsonl"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_llama_dir, tiny_lora_run):
    d = tmp_path_factory.mktemp("bad")
    for name, data in FILES.items():
        (d / name).write_bytes(data)
    good = gzip.compress(json.dumps(ROWS).encode())
    (d / "truncated.json.gz").write_bytes(good[:len(good) // 2])
    (d / "emptydir").mkdir()
    (d / "badmodel").mkdir()
    (d / "badmodel" / "config.json").write_text("{not json")
    out = {"d": str(d), "tiny": str(tiny_llama_dir), "run": str(tiny_lora_run),
           "seeds": str(SHARED_DATA / "self_instruct" / "seed_tasks.jsonl")}

    def damaged(name, file, content):
        target = d / name
        shutil.copytree(tiny_lora_run, target)
        data = (target / file).read_bytes()
        (target / file).write_bytes(content(data))
        out[name] = str(target)

    damaged("bad_weights", "adapter_model.safetensors", lambda b: b[:len(b) // 2])
    damaged("bad_meta", "finetune_meta.json", lambda b: b[:len(b) // 3])
    damaged("empty_meta", "finetune_meta.json", lambda b: b"")
    damaged("bad_template", "template.json", lambda b: b"{")
    damaged("bad_config", "adapter_config.json", lambda b: b"[[")
    damaged("prefix_meta", "finetune_meta.json",
            lambda b: json.dumps(dict(json.loads(b), peft_type="prefix")).encode())
    return out


def _fill(value, places):
    return value.format(**places)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_and_exit_2(case, places, capsys):
    _, script, argv, expected = case
    argv = [_fill(a, places) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        _main(script)(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, err
    assert len(message[0]) < 600 and message[0].count("\n") == 0
    assert _fill(expected, places) in message[0], message[0]


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("script,argv,expected", [
    ("uniform_finetune.py", ["--lora_r", "0"], "error: --lora_r must be >= 1, not 0; e.g. --lora_r 8"),
    ("predict.py", ["--data", "arith_sample"], "error: predict.py needs --data"),
])
def test_real_processes_exit_2_without_traceback(script, argv, expected):
    res = run_script(script, *argv, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith(expected)


def test_generation_error_in_the_streaming_thread_ends_the_call(tiny_llama_dir, monkeypatch):
    """An error raised inside model.generate (which streams from a thread) reaches the caller; nothing waits."""
    from utils.generation import generate_ids
    from utils.loader import load_for_inference

    model, tok, tmpl, _ = load_for_inference(model_name_or_path=str(tiny_llama_dir))

    def broken(*args, **kwargs):
        raise RuntimeError("boom inside generate")

    monkeypatch.setattr(model, "generate", broken)
    ids = tmpl.prompt_ids(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(RuntimeError, match="boom inside generate"):
        generate_ids(model, tok, ids, {"max_new_tokens": 4}, stream=lambda s: None)
    with pytest.raises(RuntimeError, match="boom inside generate"):
        generate_ids(model, tok, ids, {"max_new_tokens": 4})


def test_a_failing_reader_stops_the_generation_thread(tiny_llama_dir):
    """When the consumer of the stream fails, generation stops and the thread is joined (no runaway worker)."""
    import threading

    from utils.generation import generate_ids
    from utils.loader import load_for_inference

    model, tok, tmpl, _ = load_for_inference(model_name_or_path=str(tiny_llama_dir))
    ids = tmpl.prompt_ids(tok, [{"role": "user", "content": "hi"}])

    def running():  # threads alive now; tqdm's monitor thread (TMonitor), started by any bar, excluded
        return {t for t in threading.enumerate() if type(t).__name__ != "TMonitor"}

    before = running()  # threads of earlier tests may end meanwhile: only threads this call started count

    def reader(text):
        raise BrokenPipeError("client went away")

    with pytest.raises(BrokenPipeError):
        generate_ids(model, tok, ids, {"max_new_tokens": 64, "min_new_tokens": 64, "eos_token_id": [],
                                       "pad_token_id": tok.pad_token_id}, stream=reader)
    assert not running() - before


@pytest.mark.parametrize("name,content,encoding", [
    ("bom.json", json.dumps(ROWS), "utf-8-sig"),
    ("bom.jsonl", "\n".join(json.dumps(r) for r in ROWS), "utf-8-sig"),
    ("bom.csv", "instruction,input,output\n" + "\n".join("Add 2 and 3.,,5" for _ in ROWS), "utf-8-sig"),
    ("gbk.json", json.dumps([{"instruction": "小明有三个苹果，又买了两个，一共几个？", "output": "一共五个。"}] * 3,
                            ensure_ascii=False), "gbk"),
])
def test_valid_files_with_a_bom_or_in_gbk_load(tmp_path, name, content, encoding):
    from utils.data import load_conversations

    path = tmp_path / name
    path.write_bytes(content.encode(encoding))
    convs, stats = load_conversations([str(path)])
    assert stats[0]["format"] == "alpaca" and len(convs) == (3 if "gbk" in name else 4)
    user = convs[0][0]["content"]
    assert not user.startswith("\ufeff") and ("苹果" in user if "gbk" in name else user == "Add 2 and 3.")


def test_null_output_rows_are_skipped_and_counted(tmp_path):
    from utils.data import load_conversations

    path = tmp_path / "null.json"
    path.write_text(json.dumps(ROWS + [{"instruction": "x", "input": "", "output": None}]))
    convs, stats = load_conversations([str(path)])
    assert len(convs) == 4 and stats[0]["skipped"] == 1 and stats[0]["skipped_because"] == {"no_answer": 1}


def test_resume_if_exists_starts_fresh_then_resumes(tiny_llama_dir, tmp_path, small_data):
    from utils.train import resolve_resume

    out = tmp_path / "run"
    said = []
    assert resolve_resume("if_exists", out, say=said.append) is None and "starting from the beginning" in said[0]
    ckpt = out / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    assert resolve_resume("if_exists", out) == str(ckpt) == resolve_resume("latest", out)


def test_predict_keeps_a_complete_last_row_without_newline(tiny_llama_dir, tmp_path, small_data):
    """A result file whose last row is complete but unterminated: the row counts as done and is kept."""
    from utils.args import parse_predict_args
    from utils.prediction import run_predict

    out = tmp_path / "preds"
    args = ["--model_name_or_path", str(tiny_llama_dir), "--data", str(small_data), "--result_dir", str(out),
            "--max_new_tokens", "2", "--batch_size", "8"]
    run_predict(*parse_predict_args(args))
    path = out / "predictions.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 16
    path.write_text("\n".join(lines[:10]), encoding="utf-8")  # the 10th row is complete, its newline is missing
    run_predict(*parse_predict_args(args))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(16))  # nothing lost, nothing twice
    assert rows[9] == json.loads(lines[9])


def test_generate_finds_the_seed_run_by_data_and_model_type(tiny_lora_run, tmp_path, monkeypatch, capsys):
    """Alpaca-CoT's `generate.py --data D --model_type T` loads the run uniform_finetune.py wrote for them."""
    runs = tmp_path / "saved_models"
    shutil.copytree(tiny_lora_run, runs / "llama_lora")
    monkeypatch.chdir(tmp_path)
    _main("generate")(["--data", "arith_sample:8", "--model_type", "llama", "--prompt", "hi", "--max_new_tokens", "2"])
    err = capsys.readouterr().err
    assert "loading the newest matching run, saved_models/llama_lora" in err and "adapter: saved_models/llama_lora" in err


def test_cli_main_turns_user_errors_into_exit_2(capsys):
    from utils.errors import UserError, cli_main

    @cli_main
    def fails():
        raise UserError("the sentence")

    with pytest.raises(SystemExit) as info:
        fails()
    assert info.value.code == 2 and capsys.readouterr().err == "error: the sentence\n"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
