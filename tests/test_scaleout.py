"""Scale-out and robustness: torchrun on gloo equals one process, accumulation invariance, kill -9 and resume,
half-written checkpoints ignored, tensorboard / wandb offline logs, shipped DeepSpeed/FSDP configs."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_inprocess, sample_rows_file


@pytest.fixture(scope="module")
def rows32(tmp_path_factory):
    return sample_rows_file(tmp_path_factory, 32)


def _args(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--data", str(data), "--output_dir", str(out), "--cutoff_len", "256",
            "--lora_dropout", "0", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "1000", "--bf16", "off", *extra]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _history(out, key="loss"):
    return [h[key] for h in json.loads((Path(out) / "log_history.json").read_text()) if key in h]


def test_two_gloo_processes_equal_one_process_with_double_batch(tiny_llama_dir, rows32, tmp_path):
    steps = ["--max_steps", "3"]
    one = run_inprocess("uniform_finetune.py",
                        *_args(tiny_llama_dir, rows32, tmp_path / "one", "--per_gpu_train_batch_size", "8", *steps))
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          str(ROOT / "uniform_finetune.py"),
                          *_args(tiny_llama_dir, rows32, tmp_path / "two", "--per_gpu_train_batch_size", "4", *steps)],
                         capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, abs=1e-4)  # same rows per step (sharded, not duplicated), same init (--seed)
    assert _history(tmp_path / "two", "grad_norm") == pytest.approx(_history(tmp_path / "one", "grad_norm"), rel=1e-4)
    assert "global 8 = 4 per device x 1 accumulation x 2 processes" in two.stdout
    assert two.stdout.count("parameters:") == 1  # only rank 0 prints
    meta = json.loads((tmp_path / "two" / "finetune_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch"] == 8


SHUT_DOWN = """
import sys, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from utils.distributed import shut_down
dist.init_process_group("gloo")
shut_down()
shut_down()  # a second call (or a run that never started a group) does nothing
print("rank left:", not dist.is_initialized(), flush=True)
"""


def test_a_distributed_run_ends_its_process_group(tmp_path):
    """shut_down (called by uniform_finetune.py after training) leaves on every rank and destroys the group."""
    script = tmp_path / "shut_down.py"
    script.write_text(SHUT_DOWN)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), str(script), str(ROOT)],
                         capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("rank left: True") == 2


def test_torch_distributed_launch_passes_local_rank(tiny_llama_dir, rows32, tmp_path):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "1", "--master_port",
                          "29534", str(ROOT / "uniform_finetune.py"),
                          *_args(tiny_llama_dir, rows32, tmp_path / "launch", "--max_steps", "1")],
                         capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "launch" / "adapter_model.safetensors").is_file()


def test_accumulation_invariance(tiny_llama_dir, rows32, tmp_path):
    from utils.args import parse_finetune_args
    from utils.train import build_run

    def losses(out, *extra):
        run = build_run(*parse_finetune_args(_args(tiny_llama_dir, rows32, out, "--max_steps", "3", *extra)))
        run.trainer.train()
        return [h["loss"] for h in run.trainer.state.log_history if "loss" in h]

    a = losses(tmp_path / "a", "--per_gpu_train_batch_size", "4", "--gradient_accumulation_steps", "1")
    b = losses(tmp_path / "b", "--per_gpu_train_batch_size", "1", "--gradient_accumulation_steps", "4")
    assert b == pytest.approx(a, abs=1e-4)


KILL_AT_PUBLISH = """
import os, runpy, signal, sys
sys.path.insert(0, {root!r})
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == {name!r}:  # this checkpoint is written but not yet published
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_kill_9_then_resume_reaches_the_same_final_step(tiny_llama_dir, rows32, tmp_path):
    """kill -9 while checkpoint-15 is being written (after checkpoint-10 is complete); the resumed run ignores the
    half-written checkpoints, resumes from step 10 and ends at the last step."""
    out = tmp_path / "run"
    args = _args(tiny_llama_dir, rows32, out, "--max_steps", "20", "--save_steps", "5", "--save_total_limit", "2",
                 "--per_gpu_train_batch_size", "2", "--logging_steps", "5")
    killer = tmp_path / "kill_at_publish.py"
    script = str(ROOT / "uniform_finetune.py")
    killer.write_text(KILL_AT_PUBLISH.format(root=str(ROOT), script=script, name="checkpoint-15"))
    proc = subprocess.run([sys.executable, str(killer), *args], capture_output=True, text=True, timeout=900,
                          env=_env(), cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "checkpoint-10" / "trainer_state.json").is_file() and not (out / "checkpoint-15").exists()
    assert not (out / "adapter_model.safetensors").exists()
    # a half-written checkpoint (as if killed while saving without staging) must be ignored too
    (out / "checkpoint-999").mkdir()
    (out / "checkpoint-999" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    res = subprocess.run([sys.executable, script, *args, "--resume_from_checkpoint"], capture_output=True, text=True,
                         timeout=900, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ignoring" in res.stdout and "checkpoint-999" in res.stdout and "it is incomplete" in res.stdout
    assert f"resuming from {out / 'checkpoint-10'} (step 10)" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 20
    assert (out / "adapter_model.safetensors").is_file()
    kept = sorted(p.name for p in out.glob("checkpoint-*") if p.name != "checkpoint-999")
    assert len(kept) <= 2  # --save_total_limit


def test_latest_checkpoint_picks_complete_ones(tmp_path):
    from utils.trainer import latest_checkpoint

    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    said = []
    assert latest_checkpoint(tmp_path, say=said.append) == str(tmp_path / "checkpoint-10")
    assert said and "checkpoint-15" in said[0]
    assert latest_checkpoint(tmp_path / "missing") is None


def test_bad_resume_path_is_one_sentence(tmp_path):
    from conftest import run_inprocess

    res = run_inprocess("uniform_finetune.py", "--resume_from_checkpoint", tmp_path, "--max_steps", "1",
                     "--data", "arith_sample:8", "--output_dir", tmp_path / "o")
    assert res.returncode == 2
    assert "is not a complete checkpoint directory" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_trackers_write_their_files(tracker, tiny_llama_dir, rows32, tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec(tracker) is None:
        pytest.skip(f"{tracker} is not installed")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    from uniform_finetune import main

    main(_args(tiny_llama_dir, rows32, tmp_path / "out", "--max_steps", "2", "--report_to", tracker))
    if tracker == "tensorboard":
        events = list(tmp_path.rglob("events.out.tfevents.*"))
    else:
        assert os.environ.get("WANDB_MODE") == "offline"
        events = list((tmp_path / "wandb_dir").rglob("*.wandb"))
    assert events, f"no {tracker} files written"


def test_curves_png_has_loss_lr_and_grad_norm(tmp_path):
    from utils.train import plot_curves

    history = [{"step": i, "loss": 2.0 / i, "learning_rate": 1e-3 * (1 - i / 10), "grad_norm": 0.5} for i in range(1, 9)]
    history.append({"step": 8, "eval_loss": 0.4})
    plot_curves(history, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000


@pytest.mark.parametrize("name,stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3), ("ds_zero3_offload.json", 3)])
def test_deepspeed_configs_parse(name, stage):
    cfg = json.loads((ROOT / "configs" / name).read_text())
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_accumulation_steps"] == "auto"
    if "offload" in name:
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_fsdp_config_is_accepted_by_training_arguments(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=str(ROOT / "configs" / "fsdp.json"),
                             use_cpu=True)
    assert args.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_deepspeed_without_the_package_is_one_sentence(tmp_path):
    import importlib.util

    from conftest import run_inprocess

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    res = run_inprocess("uniform_finetune.py", "--deepspeed", ROOT / "configs" / "ds_zero2.json", "--max_steps", "1",
                     "--data", "arith_sample:8", "--output_dir", tmp_path / "o", "--model_name_or_path", "/nonexistent")
    assert res.returncode == 2 and "Traceback" not in res.stderr  # refused before the (missing) model is looked at
    assert "--deepspeed needs the deepspeed package" in res.stderr
