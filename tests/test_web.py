"""web.py: the Gradio chat demo - streaming generator, defaults, the script itself, and the UI in headless Chromium."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "tests" / "artifacts"
HANG_GUARD = 300  # seconds: a hang guard, never a speed check
QUESTION = "What is 2 + 3?"
# A random tiny model greedily repeats "\n" (an empty reply); a repetition penalty makes it say words.
GEN = dict(max_new_tokens=16, repetition_penalty=2.0)


def _words(text):
    return re.sub(r"[^A-Za-z0-9]", "", text)  # the same filter as in the page script below


@pytest.fixture(scope="module")
def web_adapter(tiny_llama_dir, tmp_path_factory):
    """A tiny LoRA adapter: 2 steps on a 16-row file, over the tiny random llama."""
    from uniform_finetune import main

    tmp = tmp_path_factory.mktemp("web")
    data = tmp / "data.json"
    data.write_text(json.dumps([{"instruction": "Add the numbers.", "input": f"{i} and {i + 3}",
                                 "output": f"The answer is {2 * i + 3}."} for i in range(16)]))
    out = tmp / "adapter"
    main(["--model_name_or_path", str(tiny_llama_dir), "--output_dir", str(out), "--data", str(data),
          "--max_steps", "2", "--per_gpu_train_batch_size", "2", "--cutoff_len", "128",
          "--learning_rate", "1e-2", "--save_steps", "1000"])
    return out


@pytest.fixture(scope="module")
def loaded(web_adapter):
    from utils.loader import load_for_inference

    return load_for_inference(str(web_adapter))


@pytest.fixture(scope="module")
def greedy_answer(loaded):
    from utils.args import GenerationArguments
    from utils.generation import generate_reply

    model, tok, tmpl, _ = loaded
    answer = generate_reply(model, tok, tmpl, [{"role": "user", "content": QUESTION}], GenerationArguments(**GEN))
    assert answer, "the tiny model's greedy answer is empty; the browser test needs a non-empty one"
    return answer


def test_stream_chat_yields_growing_text_ending_in_the_reply(loaded, greedy_answer):
    from utils.args import GenerationArguments
    from utils.web import stream_chat

    model, tok, tmpl, _ = loaded
    parts = list(stream_chat(model, tok, tmpl, [{"role": "user", "content": QUESTION}], GenerationArguments(**GEN)))
    assert len(parts) >= 3  # streamed piece by piece, then the final reply
    assert all(b.startswith(a) for a, b in zip(parts[:-2], parts[1:-1]))
    assert parts[-1] == greedy_answer == parts[-2].strip()


def test_closing_the_stream_stops_generation(loaded, monkeypatch):
    """Gradio closes the generator on Clear (or a closed page): the model stops at the next token."""
    import threading

    import utils.web as web
    from utils.args import GenerationArguments

    model, tok, tmpl, _ = loaded
    results, real = [], web.generate_ids
    monkeypatch.setattr(web, "generate_ids", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    lock = threading.Lock()
    stream = web.stream_chat(model, tok, tmpl, [{"role": "user", "content": QUESTION}],
                             GenerationArguments(max_new_tokens=400, repetition_penalty=2.0), lock)
    assert next(stream)
    stream.close()
    assert lock.acquire(timeout=300)  # the worker thread is done with the model
    assert results and results[0][2] < 400


def test_history_and_system_prompt_become_the_conversation():
    from utils.web import to_messages

    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}], "metadata": None},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    assert to_messages(history, " Be brief. ") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    assert to_messages(history[:1], "  ")[0] == {"role": "user", "content": "Hi"}


def test_defaults_bind_localhost_and_never_share(monkeypatch):
    import web
    from utils.args import parse_serve_args
    from utils.errors import UserError
    from utils.web import DEFAULT_PORT, launch

    _, serve, _ = parse_serve_args([], prog="web.py")
    assert serve.host == "127.0.0.1"
    assert not web._port_given([]) and web._port_given(["--port", "8000"]) and DEFAULT_PORT == 7860
    with pytest.raises(UserError):
        parse_serve_args(["--share"], prog="web.py")

    class Demo:
        def launch(self, **kw):
            self.kw = kw

    demo = Demo()
    launch(demo)
    assert demo.kw["server_name"] == "127.0.0.1" and demo.kw["server_port"] == 7860 and demo.kw["share"] is False


def test_web_py_serves_the_page(web_adapter):
    """The script itself: loads base + adapter, binds 127.0.0.1, the page config names the adapter."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", GRADIO_ANALYTICS_ENABLED="False")
    log = open(web_adapter.parent / "web_py.log", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "web.py"), "--lora_dir", str(web_adapter),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, config = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=HANG_GUARD) as res:
                    config = res.read().decode()
                break
            except OSError:
                time.sleep(1)
        log.seek(0)
        assert config is not None, f"web.py did not serve (exit code {proc.poll()}):\n{log.read()[-3000:]}"
        assert str(web_adapter) in config and "template" in config
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=HANG_GUARD)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def served_demo(loaded):
    from utils.args import GenerationArguments
    from utils.web import build_demo, launch

    model, tok, tmpl, info = loaded
    demo = build_demo(model, tok, tmpl, info, GenerationArguments(**GEN))
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", info
    finally:
        demo.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium; .ci/run does)")
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                    reason="the playwright package is absent: pip install -r requirements.txt")
def test_chat_in_headless_chromium(served_demo, greedy_answer):
    from playwright import sync_api

    url, info = served_demo
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            try:
                page.goto(url, timeout=300_000)
                page.wait_for_selector("#model-info", timeout=300_000)
            except sync_api.Error:  # one retry: a first load on a cold machine can be slow
                page.goto(url, timeout=300_000)
                page.wait_for_selector("#model-info", timeout=300_000)
            line = page.inner_text("#model-info")
            assert info["adapter"] in line and "llama" in line and info["template"] in line

            page.fill("#message textarea", QUESTION)
            page.click("#send")
            bot = page.locator('#chatbot [data-testid="bot"]').last
            page.wait_for_function(
                """([want]) => { const b = [...document.querySelectorAll('#chatbot [data-testid="bot"]')].pop();
                                  return b && b.innerText.replace(/[^A-Za-z0-9]/g, '') === want; }""",
                arg=[_words(greedy_answer)], timeout=300_000)
            assert bot.inner_text().strip()
            assert page.locator('#chatbot [data-testid="user"]').last.inner_text().strip() == QUESTION
            page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)

            page.click("#clear")
            page.wait_for_function("""() => !document.querySelector('#chatbot [data-testid="user"]')""",
                                   timeout=300_000)
        finally:
            browser.close()
    assert (ARTIFACTS / "web_chat.png").stat().st_size > 10_000
