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

from conftest import ROOT, run_script, start_server, stop_server, tiny_llama

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

BASE_ID = "tiny-base"
MODEL_IDS = [BASE_ID, "lora", "math", "sadapter"]  # base, lora (dir name), dora (NAME=DIR), sadapter_h
ERROR_KEYS = {"message", "type", "param", "code"}
HANG_GUARD = 300  # seconds: every timeout here guards against a hang, none is a speed check


# ---- helpers ---------------------------------------------------------------------------------------------
def client(url, api_key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=HANG_GUARD)


def raw(url, path, body=None, method=None, headers=None):
    """(status, parsed JSON) of one HTTP request; body bytes are sent as they are."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=HANG_GUARD) as resp:
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
    with urllib.request.urlopen(req, timeout=HANG_GUARD) as resp:
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
        t.join(timeout=HANG_GUARD)
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
        deadline, up = time.time() + HANG_GUARD, False
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
            out, _ = proc.communicate(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"on http://127.0.0.1:{port} " in out


def test_port_in_use_is_one_sentence_and_exit_2(tiny_llama_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_script("server.py", "--model_name_or_path", tiny_llama_dir, "--port", port)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pick another "
                                  "--port or stop the program that uses it")


def test_server_module_imports_no_web_stack():
    code = "import sys, server; print(sorted(m for m in ('fastapi', 'uvicorn', 'torch') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=HANG_GUARD)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# ---- batching (utils/serving/batcher.py): driven step by step, no threads, no timing ----------------------
def _job(entry, ids, gen, stop=None, seed=None, mode=None):
    """A Job whose events land in job.got (and set job.done at its end) instead of going to an event loop."""
    from utils.serving.engine import Job

    class Collected(Job):
        def put(self, kind, value):
            self.got.append((kind, value))
            if kind != "delta":
                self.done.set()

    job = Collected(entry, list(ids), gen, stop, seed, mode)
    job.got, job.done = [], threading.Event()
    return job


def _end(job):
    kinds = [k for k, _ in job.got if k != "delta"]
    assert kinds == ["end"], job.got
    return job.got[-1][1]


def _streamed(job):
    return "".join(v for k, v in job.got if k == "delta")


def _alone(entry, ids, gen, stop=None, stream=False):
    """What utils.generation.generate_ids answers for this one request ((text, reason, n), streamed pieces)."""
    from utils.generation import generate_ids, generation_kwargs

    pieces = []
    out = generate_ids(entry.model, entry.tokenizer, ids, generation_kwargs(gen, entry.tokenizer, entry.template),
                       stream=pieces.append if stream else None, stop=stop)
    return out, "".join(pieces)


def _ids(entry, text):
    return entry.template.prompt_ids(entry.tokenizer, [{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def tiny_entry(tokenizer):
    """A tiny random llama with untied embeddings and a wide init: unlike the tied fixture model, which repeats its
    last token, it answers every prompt differently, so mixed-up rows would show."""
    from utils.serving.batcher import plan_for
    from utils.serving.engine import Entry
    from utils.templates import pick_template

    model = tiny_llama(tokenizer, tie_word_embeddings=False, initializer_range=0.1).eval()
    entry = Entry("tiny", model, tokenizer, pick_template("vicuna", "vicuna", tokenizer), max_length=512)
    entry.plan = plan_for(entry)
    assert entry.plan.single is None and entry.plan.mode == "plain"
    return entry


@pytest.fixture(scope="module")
def packed_entry(tokenizer):
    """tiny_entry's kind of model with every linear layer run through oneDNN with its weight packed, as server.py
    runs a CPU float32 model (the tiny model's layers are all below the size limit, hence min_elements=0)."""
    from utils.serving.batcher import plan_for
    from utils.serving.engine import Entry
    from utils.serving.packed import pack_linears
    from utils.templates import pick_template

    model = tiny_llama(tokenizer, tie_word_embeddings=False, initializer_range=0.1).eval()
    assert pack_linears(model, "all", rows=8, min_elements=0) == 1 + 7 * model.config.num_hidden_layers
    entry = Entry("tiny", model, tokenizer, pick_template("vicuna", "vicuna", tokenizer), max_length=512)
    entry.plan = plan_for(entry)
    return entry


PROMPTS = ["Hi", "What is 2 + 2?", "Name three colors of the rainbow, please, and say why the sky is blue.",
           "Tell me a long story about a dragon who lived in the mountains, loved gold and feared the sea."]


def test_growing_kv_cache_equals_dynamic_cache_and_writes_in_place(tiny_entry):
    """The lanes' cache gives bit-identical logits to transformers' DynamicCache over a prefill and decoding steps;
    its steps write into the same buffer (no copy of the cache per step); keys the batcher replaces (rows leaving)
    are taken over with one copy."""
    import torch
    from transformers import DynamicCache

    from utils.serving.kvcache import GrowingCache

    model = tiny_entry.model
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    caches = [DynamicCache(), GrowingCache()]
    with torch.inference_mode():
        outs = [model(input_ids=ids, past_key_values=c, use_cache=True).logits for c in caches]
        assert torch.equal(outs[0], outs[1])
        pointers = set()
        for step in range(20):
            if step == 10:  # one row leaves, as the batcher does it: new tensors in place of the layer's views
                for c in caches:
                    for layer in c.layers:
                        layer.keys, layer.values = layer.keys[1:].clone(), layer.values[1:].clone()
                outs = [o[1:] for o in outs]
            nxt = outs[0][:, -1:].argmax(-1)
            outs = [model(input_ids=nxt, past_key_values=c, use_cache=True).logits for c in caches]
            assert torch.equal(outs[0], outs[1]), step
            pointers.add(caches[1].layers[0].keys.data_ptr())
    assert caches[1].layers[0].keys.shape == caches[0].layers[0].keys.shape
    assert len(pointers) <= 3  # the first buffer, one after the row left, at most one growth


def test_packed_linears_equal_the_plain_ones_and_follow_their_weights(tokenizer):
    """Linear layers run by oneDNN with packed weights give the plain logits (to float32 rounding) for 1 and 8 rows
    and for rows other than those they were packed for, keep the state dict, repack after an in-place change or a
    replacement of a weight, let gradients through the plain path; "head" packs the output layer only, "none"
    nothing; not applied to a bfloat16 model; a LoRA-wrapped layer keeps its wrapper and packs its base layer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from utils.serving.packed import pack_linears

    model = tiny_llama(tokenizer, tie_word_embeddings=False).eval()  # untied: doubling the head doubles the logits
    keys = set(model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]] * 8) + torch.arange(8)[:, None]
    with torch.inference_mode():
        plain = [model(input_ids=ids[:n]).logits for n in (1, 3, 8)]
    layers = 1 + 7 * model.config.num_hidden_layers
    assert pack_linears(model, "none") == 0 and pack_linears(model, "all") == 1  # small layers: only the head
    assert pack_linears(model, "all", rows=4, min_elements=0) == layers  # twice: still one packed forward each
    assert set(model.state_dict()) == keys
    with torch.inference_mode():
        for n, want in zip((1, 3, 8), plain):
            got = model(input_ids=ids[:n]).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
        torch.testing.assert_close(model(input_ids=ids[:1]).logits, 2 * plain[0], rtol=1e-5, atol=1e-5)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight / 2)  # replaced by another tensor
        torch.testing.assert_close(model(input_ids=ids[:1]).logits, plain[0], rtol=1e-5, atol=1e-5)
        layer = model.model.layers[0].mlp.down_proj
        layer.weight.zero_()  # a layer inside the model: its packed copy follows too
        zeroed = model(input_ids=ids[:1]).logits
        assert not torch.allclose(zeroed, plain[0], atol=1e-4)
    model.train()
    model(input_ids=ids[:1]).logits.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert layer.weight.grad is not None
    assert pack_linears(tiny_llama(tokenizer).to(torch.bfloat16), "all", min_elements=0) == 0
    head_only = tiny_llama(tokenizer, tie_word_embeddings=False)
    assert pack_linears(head_only, "head", min_elements=0) == 1 and "forward" in vars(head_only.lm_head)
    lora = get_peft_model(tiny_llama(tokenizer, tie_word_embeddings=False),
                          LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert pack_linears(lora, "head") == 0  # the output layer is LoRA's wrapper
    assert pack_linears(lora, "all", min_elements=0) == layers
    q = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" in vars(q.base_layer) and "forward" not in vars(q) and "forward" not in vars(q.lora_A.default)


def test_prefix_store_keeps_shared_starts_per_adapter_within_its_budget():
    """A start is kept once two prompts share at least MIN_TOKENS of it (never a whole prompt), found for prompts that
    all begin with it, per lane and adapter; the least recently used entries leave past the budget; 0 turns it off."""
    import torch

    from utils.serving.prefix import MIN_TOKENS, PrefixStore, columns_of, common_length

    def layers(i, n):  # one layer; its values say which prompt and how many positions they came from
        return [(torch.full((1, 1, n, 2), float(i)), torch.full((1, 1, n, 2), float(n)))]

    head = list(range(100, 100 + 12))
    a, b, c = head + [1, 2, 3], head + [4, 5], head[:6] + [9, 9, 9, 9, 9]
    store = PrefixStore(budget=30)
    assert common_length(a, b) == 12 and common_length(a, a[:3]) == 3 and common_length([], a) == 0
    store.learn("lane", "x", [a], layers)
    assert not store.entries  # nothing seen twice yet
    store.learn("lane", "x", [b], layers)  # shares 12 tokens with the recent a
    assert [e.tokens for e in store.entries.values()] == [tuple(head)]
    assert store.find("lane", "y", [a, b]) == (None, 0)  # another adapter: its own keys and values
    assert store.find("other lane", "x", [a]) == (None, 0)
    entry, n = store.find("lane", "x", [a, b, head + [7]])
    assert n == 12 and entry.tokens == tuple(head) and store.hits == 1 and store.saved == 36
    assert store.find("lane", "x", [head])[1] == 11  # the prompt's last token is always computed
    assert store.find("lane", "x", [a, c]) == (None, 0)  # c shares only 6 < MIN_TOKENS
    assert MIN_TOKENS == 8
    other = list(range(500, 520))
    store.learn("lane", "x", [other + [1], other + [2]], layers)  # 20 more positions: 32 > 30, the oldest leaves
    assert [e.tokens for e in store.entries.values()] == [tuple(other)] and store.held == 20
    assert PrefixStore(budget=0).find("lane", "x", [a])[0] is None
    off = PrefixStore(budget=0)
    off.learn("lane", "x", [a, b], layers)
    assert not off.entries
    # cache columns of a prompt's first positions: 3 from the store, the rest left-padded to width 5
    assert columns_of(3, 5, 6, 5).tolist() == [0, 1, 2, 5, 6]
    assert columns_of(0, 5, 4, 3).tolist() == [1, 2, 3]


def test_prompt_start_from_the_store_gives_the_logits_of_the_whole_prompt(tiny_entry):
    """Keys and values of a kept start copied into a fresh cache plus the rest of the prompt give the logits and the
    cache of a prefill of the whole prompt (float32 rounding); sequential requests through the engine hit the store
    from the third on and answer as if served alone."""
    import torch

    from utils.args import GenerationArguments
    from utils.serving.engine import Engine
    from utils.serving.kvcache import GrowingCache
    from utils.serving.prefix import Entry, row_layers, seed

    e = tiny_entry
    ids = _ids(e, PROMPTS[2])
    n = len(ids) // 2
    with torch.inference_mode():
        whole = GrowingCache()
        want = e.model(input_ids=torch.tensor([ids]), past_key_values=whole, use_cache=True).logits[:, -1]
        kept = Entry(tuple(ids[:n]), row_layers(whole, 0, torch.arange(n)))
        cache = GrowingCache()
        seed(cache, kept, n, 2)
        rest = torch.tensor([ids[n:]] * 2)
        got = e.model(input_ids=rest, past_key_values=cache, use_cache=True,
                      position_ids=torch.arange(n, len(ids)).expand(2, -1)).logits[:, -1]
    torch.testing.assert_close(got, want.expand(2, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.layers[0].keys[1:], whole.layers[0].keys, rtol=1e-5, atol=1e-5)
    gen = GenerationArguments(max_new_tokens=8)
    engine = Engine([e], "tiny", gen, max_batch_size=1)
    engine.start()
    try:
        for i, prompt in enumerate(PROMPTS):
            job = _job(e, _ids(e, prompt), gen)
            engine.submit(job)
            assert job.done.wait(HANG_GUARD)
            assert _end(job) == _alone(e, job.ids, gen)[0], prompt
    finally:
        engine.stop()
    assert engine.stats["prefills"] == len(PROMPTS)
    assert engine.stats["prefix_hits"] == len(PROMPTS) - 2  # the second request's start was kept for the rest
    assert engine.stats["prefix_saved"] >= 2 * 8


@pytest.mark.parametrize("which", ["tiny_entry", "packed_entry"])
def test_batched_greedy_answers_equal_each_request_alone(which, request):
    """Prompts of four lengths (left padding), own max_tokens, repetition_penalty / no_repeat_ngram_size, a stop
    string, streamed rows, and two requests that join the running batch three steps late (cache merge); on the
    plain model and on one whose linear layers run through oneDNN packed (server.py's CPU float32 path)."""
    from utils.args import GenerationArguments
    from utils.serving.batcher import Batcher

    e = request.getfixturevalue(which)
    gens = [GenerationArguments(max_new_tokens=6), GenerationArguments(max_new_tokens=12),
            GenerationArguments(max_new_tokens=9, repetition_penalty=1.3),
            GenerationArguments(max_new_tokens=16, no_repeat_ngram_size=2)]
    ids = [_ids(e, p) for p in PROMPTS]
    expected = [_alone(e, i, g)[0] for i, g in zip(ids, gens)]
    words = [w for w in _alone(e, ids[1], GenerationArguments(max_new_tokens=16))[0][0].split() if len(w) >= 3]
    stop = [words[len(words) // 2]]
    (stop_text, stop_reason, _), _ = _alone(e, ids[1], GenerationArguments(max_new_tokens=16), stop)
    (_, _, _), raw_pieces = _alone(e, ids[3], gens[1], stream=True)
    jobs = [_job(e, i, g) for i, g in zip(ids, gens)]
    jobs += [_job(e, ids[1], GenerationArguments(max_new_tokens=16), stop=stop),
             _job(e, ids[3], gens[1], mode="raw"), _job(e, ids[2], gens[2], mode="strip")]
    batcher = Batcher()
    batcher.admit([jobs[i] for i in (0, 2, 4, 5)])
    for _ in range(3):
        batcher.step()
    batcher.admit([jobs[i] for i in (1, 3, 6)])
    assert batcher.size >= 6 and len(batcher.lanes) == 1  # (the stop-string row may have ended already)
    while batcher.size:
        batcher.step()
    for job, want in zip(jobs, expected):
        assert _end(job) == want, (job.ids, want)
    assert batcher.prefixes.hits == 1  # the late joiners' system prompt came from the store
    assert _end(jobs[4])[:2] == (stop_text, stop_reason) and stop_reason == "stop"
    assert _streamed(jobs[5]) == raw_pieces and _end(jobs[5])[0] == raw_pieces.strip()
    assert _streamed(jobs[6]) == expected[2][0] and len([k for k, _ in jobs[6].got if k == "delta"]) >= 2
    assert batcher.stats["widest"] >= 6 and batcher.lanes == {}  # one forward served them all; caches freed


def test_sampling_rows_keep_their_own_seed_and_greedy_neighbours(tiny_entry):
    from utils.args import GenerationArguments
    from utils.serving.batcher import Batcher

    e = tiny_entry
    hot = GenerationArguments(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, top_k=0)
    greedy = GenerationArguments(max_new_tokens=10)
    ids = _ids(e, PROMPTS[1])
    jobs = [_job(e, ids, hot, seed=7), _job(e, _ids(e, PROMPTS[2]), greedy), _job(e, ids, hot, seed=7),
            _job(e, ids, hot, seed=8)]
    batcher = Batcher()
    batcher.admit(jobs)
    while batcher.size:
        batcher.step()
    assert _end(jobs[0]) == _end(jobs[2])  # the same seed in one batch: the same answer
    assert _end(jobs[0]) != _end(jobs[3])  # another seed: another answer (temperature 1.5 over 49k tokens)
    assert _end(jobs[1]) == _alone(e, _ids(e, PROMPTS[2]), greedy)[0]


def test_cancelled_row_leaves_the_batch(tiny_entry):
    from utils.args import GenerationArguments
    from utils.serving.batcher import Batcher

    e, gen = tiny_entry, GenerationArguments(max_new_tokens=12)
    ids = [_ids(e, p) for p in PROMPTS[:3]]
    jobs = [_job(e, i, gen) for i in ids]
    batcher = Batcher()
    batcher.admit(jobs)
    batcher.step()
    jobs[1].cancel.set()  # the client went away
    batcher.step()
    assert batcher.size == 2
    while batcher.size:
        batcher.step()
    assert jobs[1].got == []
    assert [_end(jobs[i]) for i in (0, 2)] == [_alone(e, ids[i], gen)[0] for i in (0, 2)]


def test_mixed_adapters_in_one_batch_equal_single_requests(served):
    """lora and the base share PEFT's mixed-adapter forward, dora (not allowed there) and sadapter_h (own model)
    get lanes of their own; every answer equals the single-request path on the same loaded model."""
    from utils.args import GenerationArguments
    from utils.serving.batcher import Batcher

    _, engine = served
    gen = GenerationArguments(max_new_tokens=10)
    plans = {m: engine.entries[m].plan for m in MODEL_IDS}
    assert plans["lora"].key == plans[BASE_ID].key and plans["lora"].mode == "mixed"
    assert plans["math"].mode == "switch" and plans["sadapter"].mode == "plain"
    asks = [(m, f"What is {i} + {2 * i}?") for i, m in enumerate(MODEL_IDS + MODEL_IDS)]
    jobs = [_job(engine.entries[m], _ids(engine.entries[m], q), gen) for m, q in asks]
    expected = [engine.run(_job(j.entry, j.ids, gen)) for j in jobs]
    assert len(set(t for t, _, _ in expected)) >= 3
    batcher = Batcher()
    batcher.admit(jobs[:4])
    batcher.step()
    batcher.admit(jobs[4:])
    assert len(batcher.lanes) == 3 and batcher.size == 8
    while batcher.size:
        batcher.step()
    assert [_end(j) for j in jobs] == expected
    # a third round, one model at a time: the template's start now comes from the store, kept per adapter
    kept = {adapter for _, adapter, _ in batcher.prefixes.entries}
    assert {"__base__", plans["lora"].adapter, plans["math"].adapter} <= kept
    for i, m in enumerate(MODEL_IDS):
        job = _job(engine.entries[m], _ids(engine.entries[m], f"What is {3 * i} - {i}?"), gen)
        batcher.admit([job])
        while batcher.size:
            batcher.step()
        assert _end(job) == engine.run(_job(job.entry, job.ids, gen)), m
    assert batcher.prefixes.hits == len(MODEL_IDS)


def test_worker_batches_waiting_requests_and_survives_errors(tiny_entry, monkeypatch):
    from utils.args import GenerationArguments
    from utils.serving import batcher as batcher_module
    from utils.serving.engine import Engine

    gen = GenerationArguments(max_new_tokens=8)
    engine = Engine([tiny_entry], "tiny", gen, max_queue=8, max_batch_size=4)
    ids = [_ids(tiny_entry, p) for p in PROMPTS]
    try:
        real = batcher_module.forward
        monkeypatch.setattr(batcher_module, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        failing = [_job(tiny_entry, i, gen) for i in ids]
        for job in failing:  # all wait before the worker starts: it admits them as one batch
            engine.jobs.put_nowait(job)
        engine.start()
        for job in failing:
            assert job.done.wait(HANG_GUARD)
            (kind, err), = job.got
            assert kind == "error" and err.status == 500 and "boom" in err.message and err.type == "server_error"
        monkeypatch.setattr(batcher_module, "forward", real)
        jobs = [_job(tiny_entry, i, gen) for i in ids + ids[:2]]
        for job in jobs[:4]:
            engine.jobs.put_nowait(job)
        for job in jobs[4:]:  # more than --max_batch_size: these wait for free rows
            engine.submit(job)
        for job in jobs:
            assert job.done.wait(HANG_GUARD)
        assert [_end(j) for j in jobs] == [_alone(tiny_entry, i, gen)[0] for i in ids + ids[:2]]
        assert engine.stats["widest"] == 4 and engine.stats["failed"] == 1
    finally:
        engine.stop()


def test_beam_search_and_prompt_learning_take_the_single_path(tiny_entry):
    from dataclasses import replace

    from utils.args import GenerationArguments
    from utils.serving.batcher import plan_for
    from utils.serving.engine import Engine

    gen = GenerationArguments(max_new_tokens=6, num_beams=2)
    engine = Engine([tiny_entry], "tiny", gen)
    ids = _ids(tiny_entry, PROMPTS[1])
    job = _job(tiny_entry, ids, gen)
    try:
        engine.submit(job)
        assert job.done.wait(HANG_GUARD)
        assert _end(job) == _alone(tiny_entry, ids, gen)[0] and engine.stats["single"] == 1
    finally:
        engine.stop()
    assert plan_for(replace(tiny_entry, peft_type="prefix")).single == "prompt learning adapter"


def test_sliding_window_models_take_the_single_path(tokenizer):
    from transformers import AutoModelForCausalLM, MistralConfig

    from utils.serving.batcher import plan_for
    from utils.serving.engine import Entry

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    entry = Entry("sliding", AutoModelForCausalLM.from_config(config), tokenizer, None)
    assert plan_for(entry).single == "sliding-window or hybrid cache"


def test_batching_flags_are_checked():
    from types import SimpleNamespace

    from utils.args import ServeArguments, parse_serve_args
    from utils.errors import UserError
    from utils.serving.engine import batching_limits

    assert batching_limits(ServeArguments()) == batching_limits(SimpleNamespace()) == (8, 10)  # the defaults
    assert batching_limits(parse_serve_args(["--max_batch_size", "3", "--max_wait_ms", "2.5"])[1]) == (3, 2.5)
    for flag, value, rule in [("--max_batch_size", "0", ">= 1"), ("--max_wait_ms", "-1", ">= 0")]:
        with pytest.raises(UserError, match=rf"^{flag} must be {rule}, not {value}"):
            parse_serve_args([flag, value])
    assert batching_limits(SimpleNamespace(max_batch_size=16, max_wait_ms=0)) == (16, 0)
    with pytest.raises(UserError, match=r"^--max_batch_size must be at least 1, not 0$"):
        batching_limits(SimpleNamespace(max_batch_size=0))
    with pytest.raises(UserError, match=r"^--max_wait_ms must be at least 0, not -1$"):
        batching_limits(SimpleNamespace(max_wait_ms=-1))


def test_throughput_bench_runs(adapters):
    """bench/server_throughput.py end to end on the tiny model (a smoke run: 1 and 8 clients, a few requests)."""
    cmd = [sys.executable, str(ROOT / "bench" / "server_throughput.py"), "--lora_dir", str(adapters["lora"]),
           "--levels", "1,8", "--n", "3", "--n_top", "8", "--rounds", "1", "--max_tokens", "4", "--models",
           "adapter,base"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=2 * HANG_GUARD,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("| 1 | 3 | 0 |") for line in lines) and any(line.startswith("| 8 | 8 | 0 |")
                                                                          for line in lines), res.stdout
    assert "c8 answers equal to c1's: 3/3" in lines and lines[-1].startswith("server throughput c8/c1 = ")


# ---- the worker behind HTTP: disconnects, a full queue, failures ------------------------------------------
def _open_request(url, path, body):
    """A POST sent on a socket of its own, left open (closing it is the client going away)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=HANG_GUARD)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _wait_for(condition, what):
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def gated(tiny_entry, monkeypatch):
    """A server on the tiny model, one batch row, one queue place, whose decoding steps wait until `release` is set
    or one of the step's requests is cancelled: what happens while a request runs does not depend on speed."""
    from utils.args import GenerationArguments, ServeArguments
    from utils.server import create_app
    from utils.serving.batcher import Lane
    from utils.serving.engine import Engine

    real, release = Lane.decode, threading.Event()

    def decode(lane):
        deadline = time.monotonic() + HANG_GUARD
        while not (release.is_set() or any(r.job.cancel.is_set() for r in lane.rows)) and time.monotonic() < deadline:
            time.sleep(0.005)
        return real(lane)

    monkeypatch.setattr(Lane, "decode", decode)
    engine = Engine([tiny_entry], "tiny", GenerationArguments(max_new_tokens=24), max_queue=1, max_batch_size=1)
    server, thread, url = start_server(create_app(ServeArguments(), engine=engine))
    try:
        yield url, engine, release
    finally:
        release.set()
        stop_server(server, thread)
        engine.stop()


def test_disconnects_cancel_and_a_full_queue_answers_503(gated):
    url, engine, release = gated
    stats = engine.stats
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 24}
    a = _open_request(url, "/v1/chat/completions", ask)  # not streamed
    _wait_for(lambda: stats["prefills"] == 1, "the first request to run")
    b = _open_request(url, "/v1/chat/completions", {**ask, "stream": True})
    _wait_for(lambda: engine.jobs.qsize() == 1, "the second request to wait")
    status, payload = raw(url, "/v1/chat/completions", ask)  # the batch row and the queue are taken
    assert status == 503 and set(payload["error"]) == ERROR_KEYS and payload["error"]["code"] == "server_overloaded"
    a.close()  # the non-streamed client goes away: its row leaves the batch, the waiting request runs
    _wait_for(lambda: stats["cancelled"] == 1 and stats["prefills"] == 2, "the first request to be cancelled")
    buf = b""
    while b"data: " not in buf:
        buf += b.recv(4096)
    assert buf.startswith(b"HTTP/1.1 200")
    d = _open_request(url, "/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 24})
    _wait_for(lambda: engine.jobs.qsize() == 1, "the third request to wait")
    d.close()  # gone while it waits: the worker skips it
    _wait_for(lambda: engine.jobs.queue[0].cancel.is_set(), "the waiting request to be cancelled")
    b.close()  # the streamed client goes away
    _wait_for(lambda: stats["cancelled"] == 3, "the other two requests to be cancelled")
    assert stats["prefills"] == 2 and stats["steps"] <= 4  # neither cancelled request ran on
    release.set()
    res = client(url).completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0)
    assert res.usage.completion_tokens >= 1 and stats["prefills"] == 3


def test_a_failing_worker_answers_500_and_serves_on(gated, monkeypatch):
    from utils.serving import batcher as batcher_module

    url, engine, release = gated
    release.set()
    real = batcher_module.forward

    def boom(plan, ids, *args):
        if ids.shape[1] == 1:  # decoding steps fail, prefills work (the streamed request has started)
            raise RuntimeError("boom")
        return real(plan, ids, *args)

    monkeypatch.setattr(batcher_module, "forward", boom)
    c = client(url)
    with pytest.raises(openai.InternalServerError) as err:
        chat(c, "tiny", "Hi", max_tokens=8)
    assert err.value.status_code == 500 and err.value.body["message"] == "generation failed (RuntimeError: boom)"
    with pytest.raises(openai.APIError, match=r"^generation failed \(RuntimeError: boom\)$"):
        list(chat(c, "tiny", "Hi", max_tokens=8, stream=True))
    monkeypatch.setattr(batcher_module, "forward", real)
    assert chat(c, "tiny", "Hi", max_tokens=8).usage.completion_tokens >= 1
    assert engine.stats["failed"] == 2
