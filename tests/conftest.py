import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

# Under pytest-xdist (`make test` runs `pytest -n auto`, one test file per worker at a time) the workers share the
# cores: each worker, and every process it starts, gets its share of torch's threads instead of all of them (set
# before torch is imported; oversubscribed OpenMP threads spin against each other).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def run_script(script, *args, timeout=600, cwd=ROOT):
    """Run one of the project's scripts in a fresh Python process; returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


_MAINS = {}


def run_inprocess(script, *args):
    """run_script's result (returncode, stdout, stderr) for a script's main() run in this process: the same exit
    code and messages without the cost of a new Python process (and its imports)."""
    import contextlib
    import importlib.util
    import io
    from types import SimpleNamespace

    if script not in _MAINS:
        spec = importlib.util.spec_from_file_location(f"_main_{Path(script).stem}", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MAINS[script] = module.main
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _MAINS[script](list(map(str, args)))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded SmolLM2-135M-Instruct, converted and cached as safetensors."""
    from utils.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from utils.models import load_tokenizer

    return load_tokenizer(embedded_dir)


def tiny_llama(tokenizer, seed=0, **config):
    """A tiny random llama (2 layers, hidden 64, tied embeddings unless config says otherwise) for `tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**settings, **config}))


def save_tiny_llama(path, tokenizer, seed=0, **config):
    """tiny_llama(...) saved with the tokenizer into `path`; returns `path`."""
    tiny_llama(tokenizer, seed, **config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_dir, tokenizer):
    """A tiny random llama (2 layers, hidden 64) with the SmolLM2 tokenizer, saved to disk."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer)


def sample_rows_file(tmp_path_factory, n):
    """The first n rows of the project's sample data, written to a fresh file; returns its path."""
    rows = json.loads((ROOT / "data" / "arith_sample.json").read_text(encoding="utf-8"))[:n]
    path = tmp_path_factory.mktemp("data") / "rows.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """The first 16 rows of the project's sample data, as a file (fast training runs)."""
    return sample_rows_file(tmp_path_factory, 16)


@pytest.fixture(scope="session")
def tiny_lora_run(tiny_llama_dir, tmp_path_factory):
    """A finished 2-step LoRA run on the tiny llama (trained in this process): a run directory for tests that
    only read one."""
    from uniform_finetune import main

    out = tmp_path_factory.mktemp("tiny_lora_run") / "adapter"
    main(["--model_name_or_path", str(tiny_llama_dir), "--output_dir", str(out), "--max_steps", "2",
          "--per_gpu_train_batch_size", "2", "--cutoff_len", "64", "--logging_steps", "1", "--save_steps", "1000",
          "--data", "arith_sample:8"])
    return out


def free_port():
    """A TCP port on 127.0.0.1 that is free now (for a process the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app):
    """Run an ASGI app with uvicorn in a background thread on a free 127.0.0.1 port; (server, thread, url)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def stop_server(server, thread):
    server.should_exit = True
    thread.join(timeout=300)
    assert not thread.is_alive(), "the server did not shut down"
