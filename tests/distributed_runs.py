"""The 2-process training runs that tests/test_distributed*.py share, and how they compare them.

Each test module gets its own `train` (module-scoped): train(engine, method="lora", steps=STEPS) runs once per key
and returns its output dir. The reference ("single") is one process on the same global batch, trained in the test's
own process (2-process DDP equals it: tests/test_scaleout.py). Each run logs every step and checkpoints every SAVE
steps, so the same runs also serve the kill -9 / resume tests. DeepSpeed runs skip where the package is absent (CI
installs requirements-dist.txt).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, sample_rows_file, save_tiny_llama

STEPS, SAVE = 6, 3  # optimizer steps of the shared runs; a checkpoint every SAVE steps
LOSS_TOL = 1e-5  # per-step logged loss, engine vs plain DDP
ADAPTER_TOL = 1e-5  # max abs difference of the saved tensors, engine vs plain DDP (measured <= 2.4e-6)
RESUME_TOL = 1e-6  # killed + resumed vs uninterrupted, same engine
HANG_GUARD = 600  # seconds; a guard against a hung collective, never a speed check

ENGINES = {
    "single": [],  # one process, in the test's own process, with the global batch (2 x 4): no launcher
    "ddp": [],
    "zero2": ["--deepspeed", str(ROOT / "configs" / "ds_zero2.json")],
    "zero3": ["--deepspeed", str(ROOT / "configs" / "ds_zero3.json")],
    "zero3_offload": ["--deepspeed", str(ROOT / "configs" / "ds_zero3_offload.json")],
    "fsdp": ["--fsdp", "--fsdp_config", str(ROOT / "configs" / "fsdp.json")],
}


def needs(engine):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -r requirements-dist.txt)")


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def launcher(nproc=2, nodes=None, port=None):
    """python -m torch.distributed.run ... for one launch (nodes=(node_rank, nnodes) for a multi-node one)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port or free_port())]
    if nodes:
        cmd += ["--nnodes", str(nodes[1]), "--node_rank", str(nodes[0])]
    return cmd


def train_args(model, data, out, engine, method, steps):
    batch = "8" if engine == "single" else "4"
    args = ["--model_name_or_path", str(model), "--data", str(data), "--output_dir", str(out), "--peft_type", method,
            "--cutoff_len", "256", "--per_gpu_train_batch_size", batch, "--learning_rate", "1e-3",
            "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", str(SAVE), "--bf16", "off",
            *ENGINES[engine]]
    return args + (["--lora_dropout", "0"] if method == "lora" else [])


def check(res, what):
    assert res.returncode == 0, f"{what} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


def losses(out):
    history = json.loads((Path(out) / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


def tensors(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter_model.safetensors"))


def max_diff(a, b):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    assert all(ta[k].shape == tb[k].shape for k in ta), {k: (ta[k].shape, tb[k].shape) for k in ta}
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def compare(ref, out, what, loss_tol, adapter_tol):
    """Per-step losses and saved tensors of `out` against `ref`; prints the measured gaps (pytest -rP shows them)."""
    a, b = losses(ref), losses(out)
    assert len(b) == len(a) and b == pytest.approx(a, abs=loss_tol), (a, b)
    diff = max_diff(ref, out)
    print(f"measured {what}: {len(a)} logged losses max abs diff {max(abs(x - y) for x, y in zip(a, b)):.1e}, "
          f"saved tensors max abs diff {diff:.1e}")
    assert diff <= adapter_tol


def shared_runs(tmp_path_factory, tokenizer):
    """train(engine, method="lora", steps=STEPS) -> output dir of a run on a tiny random llama of our own (2 layers,
    hidden 64, tied embeddings, the SmolLM2 tokenizer; `train.model`); each run happens once."""
    model = save_tiny_llama(tmp_path_factory.mktemp("dist_llama"), tokenizer, seed=1)
    rows = sample_rows_file(tmp_path_factory, 16)
    done = {}

    def run(engine, method="lora", steps=STEPS):
        key = (engine, method, steps)
        if key not in done:
            needs(engine)
            out = tmp_path_factory.mktemp(f"{engine}_{method}_{steps}")
            args = train_args(model, rows, out, engine, method, steps)
            if engine == "single":  # no new process: no second import of torch, transformers, peft
                from uniform_finetune import main

                main(args)
            else:
                res = subprocess.run([*launcher(), str(ROOT / "uniform_finetune.py"), *args], capture_output=True,
                                     text=True, timeout=HANG_GUARD, env=env(), cwd=ROOT)
                check(res, f"{engine} {method}")
            done[key] = out
        return done[key]

    run.model = model
    run.args = lambda out, engine, method="lora", steps=STEPS: train_args(model, rows, out, engine, method, steps)
    return run


def assert_engine_ran(out, engine, step=STEPS):
    """The checkpoint proves the engine really sharded (accelerate alone would silently fall back to DDP)."""
    ckpt = Path(out) / f"checkpoint-{step}"
    if engine.startswith("zero"):
        import torch

        shards = sorted((ckpt / f"global_step{step}").glob("zero_pp_rank_*_optim_states.pt"))
        assert len(shards) == 2, shards
        state = torch.load(shards[1], map_location="cpu", weights_only=False)["optimizer_state_dict"]
        assert int(state["zero_stage"]) == (2 if engine == "zero2" else 3)
        assert state["partition_count"] in (2, [2])
    elif engine == "fsdp":
        assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp",
                                                                                            "__1_0.distcp"]
    else:
        assert not list(ckpt.glob("global_step*")) and not (ckpt / "pytorch_model_fsdp_0").exists()
