"""Shared generation: greedy streaming equals non-streaming, stop strings, finish reasons, the seed preset,
and predict.py surviving a real kill -9."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def tiny_base(tiny_llama_dir):
    from utils.loader import load_for_inference

    return load_for_inference(model_name_or_path=str(tiny_llama_dir))


def _kwargs(tok, tmpl, n=24):
    from utils.args import GenerationArguments
    from utils.generation import generation_kwargs

    return generation_kwargs(GenerationArguments(max_new_tokens=n), tok, tmpl)


def test_stream_equals_plain_and_stop_strings(tiny_base):
    from utils.generation import generate_ids

    model, tok, tmpl, _ = tiny_base
    ids = tmpl.prompt_ids(tok, [{"role": "user", "content": "Tell me a story."}])
    text, reason, n = generate_ids(model, tok, ids, _kwargs(tok, tmpl))
    pieces = []
    streamed, reason2, n2 = generate_ids(model, tok, ids, _kwargs(tok, tmpl), stream=pieces.append)
    assert streamed == text and "".join(pieces).strip() == text and (reason2, n2) == (reason, n)
    assert reason in ("stop", "length") and 0 < n <= 24
    words = text.split()
    if len(words) >= 3:  # a stop string cuts the answer before it, in both modes
        stop = words[2]
        cut, r, _ = generate_ids(model, tok, ids, _kwargs(tok, tmpl), stop=[stop])
        pieces = []
        cut2, _, _ = generate_ids(model, tok, ids, _kwargs(tok, tmpl), stream=pieces.append, stop=[stop])
        assert cut == text[:text.find(stop)].strip() == cut2 and stop not in "".join(pieces) and r == "stop"


def test_length_finish_reason(tiny_base):
    from utils.generation import generate_ids

    model, tok, tmpl, _ = tiny_base
    kw = _kwargs(tok, tmpl, n=2)
    kw["eos_token_id"] = [-1]  # never stops on its own
    _, reason, n = generate_ids(model, tok, tmpl.prompt_ids(tok, [{"role": "user", "content": "Hi"}]), kw)
    assert (reason, n) == ("length", 2)


def test_seed_preset_and_explicit_override():
    from utils.args import GEN_PRESETS, parse_generate_args

    _, _, gen = parse_generate_args(["--gen_preset", "seed", "--repetition_penalty", "1.1"])
    assert gen.do_sample and gen.top_p == GEN_PRESETS["seed"]["top_p"] and gen.no_repeat_ngram_size == 6
    assert gen.repetition_penalty == 1.1


def test_predict_resumes_after_kill_9(tiny_llama_dir, tmp_path):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": str(i)} for i in range(120)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "preds" / "predictions.jsonl"
    cmd = [sys.executable, str(ROOT / "predict.py"), "--model_name_or_path", str(tiny_llama_dir), "--data", str(data),
           "--result_dir", str(tmp_path / "preds"), "--batch_size", "2", "--max_new_tokens", "24"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.is_file() and len(out.read_bytes().splitlines()) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "predict.py finished before it could be killed; make the job longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(out.read_bytes().splitlines())
    assert 6 <= before < 120
    # the resumed run only has to finish the rows: short answers in big batches keep the test fast
    res = subprocess.run(cmd[:-4] + ["--batch_size", "32", "--max_new_tokens", "2"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == list(range(120))  # none lost, none twice
    assert f"{before}" in res.stdout or "already done" in res.stdout
