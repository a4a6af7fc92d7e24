"""DeepSpeed ZeRO-2/3 and FSDP for real: 2 gloo CPU processes on a tiny llama train the steps one process trains,
resume after kill -9, span two "nodes" and reload in generate.py / merge.py. The runs are shared within this module
(tests/distributed_runs.py); ZeRO-3 with other methods and the refused combinations: tests/test_distributed_methods.py.
"""
import json
import signal
import subprocess

import pytest

from conftest import ROOT, free_port, run_inprocess
from distributed_runs import (HANG_GUARD, LOSS_TOL, RESUME_TOL, SAVE, STEPS, ADAPTER_TOL, assert_engine_ran, check,
                              compare, env, launcher, losses, shared_runs, tensors)


@pytest.fixture(scope="module")
def train(tmp_path_factory, tokenizer):
    return shared_runs(tmp_path_factory, tokenizer)


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp", "zero3_offload"])
def test_engine_trains_the_steps_of_one_process(engine, train):
    """2 processes under the engine train the steps one process trains on the same global batch (= plain DDP's,
    tests/test_scaleout.py)."""
    ref, out = train("single"), train(engine)
    assert_engine_ran(out, engine)
    assert len(losses(ref)) == STEPS
    compare(ref, out, f"{engine} vs one process (lora)", LOSS_TOL, ADAPTER_TOL)


def test_zero3_lora_reloads_in_generate_and_merges(train, tmp_path):
    out, tiny_model = train("zero3"), train.model
    res = run_inprocess("generate.py", "--lora_dir", out, "--prompt", "What is 2 + 3?", "--max_new_tokens", "4")
    check(res, "generate.py")
    merged = tmp_path / "merged"
    check(run_inprocess("merge.py", "--lora_dir", out, "--merged_dir", merged), "merge.py")
    from safetensors.torch import load_file

    base, folded, adapter = load_file(str(tiny_model / "model.safetensors")), load_file(
        str(merged / "model.safetensors")), tensors(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    name = "model.layers.0.self_attn.q_proj"
    a = next(v for k, v in adapter.items() if f"{name}.lora_A" in k)
    b = next(v for k, v in adapter.items() if f"{name}.lora_B" in k)
    expected = base[f"{name}.weight"] + (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
    assert (folded[f"{name}.weight"] - expected).abs().max().item() < 1e-6
    assert (b @ a).abs().max().item() > 0  # the merge added something trained


KILLER = """
import os, runpy, sys
import psutil
sys.path.insert(0, {root!r})
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == {name!r}:  # checkpoint written by every rank, not yet published
        launcher = psutil.Process(os.getppid())
        for proc in [launcher, *launcher.children(recursive=True)]:  # kill -9 the whole job, this rank last
            if proc.pid != os.getpid():
                proc.kill()
        psutil.Process().kill()
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_kill_9_after_a_checkpoint_then_resume(engine, train, tmp_path):
    """Killed (-9, every process) while the checkpoint after checkpoint-SAVE is written; the resumed run
    ignores that half-written one, resumes from checkpoint-SAVE and ends where the uninterrupted run ended."""
    ref = train(engine)
    out = tmp_path / "run"
    killer = tmp_path / "kill_at_publish.py"
    killer.write_text(KILLER.format(root=str(ROOT), script=str(ROOT / "uniform_finetune.py"),
                                    name=f"checkpoint-{2 * SAVE}"))
    args = train.args(out, engine)
    proc = subprocess.run([*launcher(), str(killer), *args], capture_output=True, text=True, timeout=HANG_GUARD,
                          env=env(), cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / f"checkpoint-{SAVE}" / "trainer_state.json").is_file()
    assert (out / ".staging" / f"checkpoint-{2 * SAVE}").is_dir() and not (out / f"checkpoint-{2 * SAVE}").exists()
    assert not (out / "adapter_model.safetensors").exists()
    res = subprocess.run([*launcher(), str(ROOT / "uniform_finetune.py"), *args, "--resume_from_checkpoint"],
                         capture_output=True, text=True, timeout=HANG_GUARD, env=env(), cwd=ROOT)
    check(res, f"resume under {engine}")
    assert f"resuming from {out / f'checkpoint-{SAVE}'} (step {SAVE})" in res.stdout
    assert json.loads((out / "metrics.json").read_text())["global_step"] == STEPS
    assert_engine_ran(out, engine)
    compare(ref, out, f"{engine} killed + resumed vs uninterrupted", RESUME_TOL, RESUME_TOL)


def test_two_nodes_train_the_steps_of_one_launch(train, tmp_path):
    """Two launches (--nnodes 2, one process each) on this machine = one launch of two processes (ZeRO-3 where
    DeepSpeed is installed: its partitions then span the two "nodes"; else plain DDP)."""
    import importlib.util

    engine = "zero3" if importlib.util.find_spec("deepspeed") else "ddp"
    ref = train(engine)
    out, port = tmp_path / "two_nodes", free_port()
    args = train.args(out, engine)
    procs = [subprocess.Popen([*launcher(1, (rank, 2), port), str(ROOT / "uniform_finetune.py"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
             for rank in (0, 1)]
    results = [(p.communicate(timeout=HANG_GUARD), p.returncode) for p in procs]
    for rank, ((stdout, stderr), rc) in enumerate(results):
        assert rc == 0, f"node {rank} failed:\n{stderr[-3000:]}"
    assert "saved adapter" in results[0][0][0] and "saved adapter" not in results[1][0][0]  # global rank 0 writes
    meta = json.loads((out / "finetune_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch"] == 8
    assert_engine_ran(out, engine)
    compare(ref, out, f"{engine} on 2 nodes x 1 vs 1 node x 2", LOSS_TOL, RESUME_TOL)
