"""server.py: the OpenAI-compatible API, driven with the official `openai` client (CPU, tiny models).

One server serves a tiny random llama base and three adapters trained here for 2 steps: lora and dora
(sharing one PeftModel) and sadapter_h (a bottleneck adapter, on its own copy of the base).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, run_script, start_server, stop_server

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

BASE_ID = "tiny-base"
MODEL_IDS = [BASE_ID, "lora", "math", "sadapter"]  # base, lora (dir name), dora (NAME=DIR), sadapter_h
ERROR_KEYS = {"message", "type", "param", "code"}


# ---- helpers ---------------------------------------------------------------------------------------------
def client(url, api_key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def raw(url, path, body=None, method=None, headers=None):
    """(status, parsed JSON) of one HTTP request; body bytes are sent as they are."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def served_tokens(text):
    from utils.models import embedded_model_dir, load_tokenizer

    return load_tokenizer(embedded_model_dir())(text, add_special_tokens=True)["input_ids"]


def chat(c, model, text, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    from uniform_finetune import main

    root = tmp_path_factory.mktemp("served")
    rows = [{"instruction": f"What is {i} + {i + 3}?", "input": "", "output": f"The answer is {2 * i + 3}."}
            for i in range(16)]
    data = root / "rows.json"
    data.write_text(json.dumps(rows))
    out = {}
    # a high learning rate, so that two steps make each adapter answer differently from the base
    for name, peft_type, lr in [("lora", "lora", "0.2"), ("dora_run", "dora", "0.2"), ("sadapter", "sadapter_h", "1e-2")]:
        out[name] = root / name
        main(["--model_name_or_path", str(tiny_llama_dir), "--data", str(data), "--peft_type", peft_type,
              "--output_dir", str(out[name]), "--max_steps", "2", "--per_gpu_train_batch_size", "4",
              "--cutoff_len", "96", "--learning_rate", lr, "--logging_steps", "1", "--save_steps", "1000"])
    return out


@pytest.fixture(scope="module")
def served(adapters):
    from utils.args import GenerationArguments, ModelArguments, ServeArguments
    from utils.server import create_app

    serve_args = ServeArguments(lora_dir=[str(adapters["lora"]), f"math={adapters['dora_run']}",
                                          str(adapters["sadapter"])], served_name=BASE_ID, template="vicuna")
    app = create_app(serve_args, ModelArguments(), GenerationArguments(max_new_tokens=16), log=lambda m: None)
    server, thread, url = start_server(app)
    yield url, app.state.engine
    stop_server(server, thread)


@pytest.fixture(scope="module")
def url(served):
    return served[0]


# ---- tests -----------------------------------------------------------------------------------------------
def test_models_lists_base_and_every_adapter(url, served):
    models = {m.id: m for m in client(url).models.list().data}
    assert sorted(models) == sorted(MODEL_IDS)
    assert models["math"].model_extra["peft_type"] == "dora" and models["math"].model_extra["parent"] == BASE_ID
    engine = served[1]
    # lora and dora share one PeftModel (and the base is served from it); sadapter_h has its own model
    assert engine.entries["lora"].model is engine.entries["math"].model is engine.entries[BASE_ID].model
    assert engine.entries["sadapter"].model is not engine.entries["lora"].model
    assert raw(url, "/v1/models/math")[1]["id"] == "math"


def test_chat_completion_per_model(url):
    c = client(url)
    answers = {m: chat(c, m, "What is 3 + 6?").choices[0].message.content for m in MODEL_IDS}
    assert all(answers.values()) and len(set(answers.values())) >= 3, answers  # the models really differ
    for model in MODEL_IDS:
        res = chat(c, model, "What is 3 + 6?", max_tokens=8)
        assert res.object == "chat.completion" and res.model == model and len(res.choices) == 1
        choice = res.choices[0]
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        assert res.usage.prompt_tokens > 5 and 1 <= res.usage.completion_tokens <= 8
        assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_served_answers_equal_standalone_loading(url, adapters, tiny_llama_dir):
    """Switching adapters inside the shared PeftModel gives what a model loaded alone gives."""
    from utils.args import GenerationArguments
    from utils.generation import generate_ids, generation_kwargs
    from utils.loader import load_for_inference

    messages = [{"role": "user", "content": "What is 4 + 7?"}]
    c = client(url)
    for model_id, lora_dir in [("math", adapters["dora_run"]), ("lora", adapters["lora"]), (BASE_ID, None)]:
        model, tok, tmpl, _ = load_for_inference(str(lora_dir) if lora_dir else None,
                                                 None if lora_dir else str(tiny_llama_dir),
                                                 template=None if lora_dir else "vicuna")
        kwargs = generation_kwargs(GenerationArguments(max_new_tokens=10), tok, tmpl)
        expected, reason, n = generate_ids(model, tok, tmpl.prompt_ids(tok, messages), kwargs)
        res = c.chat.completions.create(model=model_id, messages=messages, max_tokens=10, temperature=0)
        assert res.choices[0].message.content == expected, model_id
        assert (res.choices[0].finish_reason, res.usage.completion_tokens) == (reason, n)


def test_streamed_chat_equals_non_streamed(url):
    c = client(url)
    for model in ("lora", "sadapter"):
        full = chat(c, model, "Count to five.", max_tokens=16)
        chunks = list(chat(c, model, "Count to five.", max_tokens=16, stream=True,
                           stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
        pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(pieces) >= 2 and "".join(pieces) == full.choices[0].message.content != ""
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals == [full.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # the wire format: server-sent events ending with [DONE]
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "lora", "stream": True, "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "Hi"}]}).encode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completion_raw_prompt_and_stream(url):
    c = client(url)
    res = c.completions.create(model="lora", prompt="12 + 30 =", max_tokens=8, temperature=0)
    assert res.object == "text_completion" and res.choices[0].text.strip()
    assert res.choices[0].finish_reason in ("stop", "length")
    assert res.usage.prompt_tokens == len(served_tokens("12 + 30 =")) and res.usage.completion_tokens >= 1
    parts = list(c.completions.create(model="lora", prompt="12 + 30 =", max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == res.choices[0].text
    assert parts[-1].choices[0].finish_reason == res.choices[0].finish_reason


def test_stop_string_cuts_the_answer(url):
    c = client(url)
    full = c.completions.create(model=BASE_ID, prompt="Once upon a time", max_tokens=16, temperature=0)
    text = full.choices[0].text
    words = [w for w in text.split() if len(w) >= 2]
    if not words:
        pytest.skip(f"the random tiny model answered without a word to stop at: {text!r}")
    stop = words[len(words) // 2]
    cut = c.completions.create(model=BASE_ID, prompt="Once upon a time", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(url):
    c = client(url)
    a, b = (chat(c, "lora", "Tell me a story.", temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_bad_requests_get_openai_errors(url):
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": "lora"}, 400, "messages"),
        ({"model": "lora", "messages": "hi"}, 400, "messages"),
        ({"model": "lora", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"model": "lora", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({"model": "lora", "messages": msgs, "n": 2}, 400, "n"),
        ({"model": "lora", "messages": msgs, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "lora", "messages": msgs, "max_tokens": "8"}, 400, "max_tokens"),
        ({"model": "lora", "messages": msgs, "temperature": 5}, 400, "temperature"),
        ({"model": "lora", "messages": msgs, "stop": 3}, 400, "stop"),
        ({"model": "lora", "messages": msgs, "stream": "yes"}, 400, "stream"),
        ({"model": "lora", "messages": msgs + [{"role": "assistant", "content": "x"}]}, 400, "messages"),
        ({"messages": msgs}, 400, "model"),
        ({"model": "nope", "messages": msgs}, 404, "model"),
    ]
    for body, status, param in cases:
        got, payload = raw(url, "/v1/chat/completions", body)
        assert got == status, (body, payload)
        assert set(payload) == {"error"} and set(payload["error"]) == ERROR_KEYS, payload
        assert payload["error"]["param"] == param and payload["error"]["message"], (body, payload)
    for body, param in [({"model": "lora"}, "prompt"), ({"model": "lora", "prompt": 3}, "prompt"),
                        ({"model": "lora", "prompt": "x", "max_tokens": -1}, "max_tokens")]:
        got, payload = raw(url, "/v1/completions", body)
        assert got == 400 and payload["error"]["param"] == param, payload
    got, payload = raw(url, "/v1/nothing_here")
    assert got == 404 and set(payload["error"]) == ERROR_KEYS
    with pytest.raises(openai.BadRequestError) as err:
        chat(client(url), "lora", "hi", n=2)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"


def test_unknown_model_is_404(url):
    with pytest.raises(openai.NotFoundError) as err:
        chat(client(url), "gpt-4o", "hi")
    assert err.value.status_code == 404 and err.value.code == "model_not_found"


def test_concurrent_requests_equal_their_sequential_answers(url):
    c = client(url)
    jobs = [(MODEL_IDS[i % 4], f"What is {i} + {2 * i}?", i % 3 == 0) for i in range(8)]  # some streamed
    expected = [chat(c, model, text).choices[0].message.content for model, text, _ in jobs]
    assert len(set(expected)) >= 3  # mixed-up adapters would show
    results, errors = [None] * 8, []

    def ask(i):
        try:
            model, text, stream = jobs[i]
            cl = client(url)
            if stream:
                results[i] = "".join(ch.choices[0].delta.content or "" for ch in chat(cl, model, text, stream=True))
            else:
                results[i] = chat(cl, model, text).choices[0].message.content
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors and not any(t.is_alive() for t in threads)
    assert results == expected


def test_different_bases_are_refused(adapters, tmp_path):
    from utils.args import GenerationArguments, ModelArguments, ServeArguments
    from utils.errors import UserError
    from utils.server import load_engine

    other = tmp_path / "other"
    shutil.copytree(adapters["lora"], other)
    meta = json.loads((other / "finetune_meta.json").read_text())
    meta["base_model"] = "smollm2-135m-instruct"
    (other / "finetune_meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="trained on different base models"):
        load_engine(ModelArguments(), ServeArguments(lora_dir=[str(adapters["lora"]), str(other)]),
                    GenerationArguments())
    with pytest.raises(UserError, match="would both be served as 'lora'"):
        load_engine(ModelArguments(), ServeArguments(lora_dir=[str(adapters["lora"]), f"lora={other}"]),
                    GenerationArguments())


def test_full_queue_answers_503():
    from utils.args import GenerationArguments
    from utils.server import APIError, Engine

    engine = Engine([], "x", GenerationArguments(), max_queue=1)
    engine.start = lambda: None  # no worker: the queue stays full
    engine._thread = threading.current_thread()
    engine.jobs.put_nowait(object())
    with pytest.raises(APIError) as err:
        engine.submit(object())
    assert err.value.status == 503 and err.value.code == "server_overloaded"


def test_embedded_model_with_api_key():
    from utils.args import GenerationArguments, ModelArguments, ServeArguments
    from utils.server import create_app

    app = create_app(ServeArguments(api_key="sekrit"), ModelArguments(model_name_or_path="smollm2-135m-instruct"),
                     GenerationArguments(), log=lambda m: None)
    server, thread, url = start_server(app)
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            client(url, "wrong").models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        status, payload = raw(url, "/v1/models")  # no key at all
        assert status == 401 and set(payload["error"]) == ERROR_KEYS
        assert raw(url, "/health") == (200, {"status": "ok"})
        res = chat(client(url, "sekrit"), "smollm2-135m-instruct", "What is the capital of France?", max_tokens=8)
        assert res.choices[0].message.content.strip() and res.usage.completion_tokens <= 8
    finally:
        stop_server(server, thread)


def test_script_binds_localhost_by_default(tiny_llama_dir):
    from utils.args import parse_serve_args

    assert parse_serve_args([])[1].host == "127.0.0.1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--model_name_or_path", str(tiny_llama_dir),
                             "--port", str(port), "--max_new_tokens", "4"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, up = time.time() + 120, False
        while time.time() < deadline and proc.poll() is None and not up:
            try:
                up = raw(f"http://127.0.0.1:{port}", "/health")[0] == 200
            except OSError:
                time.sleep(0.3)
        assert up, proc.stdout.read() if proc.poll() is not None else "no answer on 127.0.0.1"
        models = raw(f"http://127.0.0.1:{port}", "/v1/models")[1]["data"]
        assert [m["id"] for m in models] == [tiny_llama_dir.name]
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"on http://127.0.0.1:{port} " in out


def test_port_in_use_is_one_sentence_and_exit_2(tiny_llama_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_script("server.py", "--model_name_or_path", tiny_llama_dir, "--port", port, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pick another "
                                  "--port or stop the program that uses it")


def test_server_module_imports_no_web_stack():
    code = "import sys, server; print(sorted(m for m in ('fastapi', 'uvicorn', 'torch') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
