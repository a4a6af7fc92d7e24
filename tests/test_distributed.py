"""DeepSpeed ZeRO-2/3 and FSDP for real: 2 gloo CPU processes on a tiny llama train the steps one process trains.

Every training run is shared through the module-scoped `train` fixture. The reference is one process on the same
global batch, trained in the test's own process (2-process DDP equals it: tests/test_scaleout.py); plain DDP
stays the engine of the two-node test where DeepSpeed is absent. Each run logs every step and checkpoints every
SAVE steps, so the same runs also serve the kill -9 / resume tests. DeepSpeed tests skip where the package is
absent (CI installs requirements-dist.txt).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, free_port, run_inprocess, sample_rows_file, save_tiny_llama

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


def _needs(engine):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -r requirements-dist.txt)")


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _launcher(nproc=2, nodes=None, port=None):
    """python -m torch.distributed.run ... for one launch (nodes=(node_rank, nnodes) for a multi-node one)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port or free_port())]
    if nodes:
        cmd += ["--nnodes", str(nodes[1]), "--node_rank", str(nodes[0])]
    return cmd


def _train_args(model, data, out, engine, method, steps):
    batch = "8" if engine == "single" else "4"
    args = ["--model_name_or_path", str(model), "--data", str(data), "--output_dir", str(out), "--peft_type", method,
            "--cutoff_len", "256", "--per_gpu_train_batch_size", batch, "--learning_rate", "1e-3",
            "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", str(SAVE), "--bf16", "off",
            *ENGINES[engine]]
    return args + (["--lora_dropout", "0"] if method == "lora" else [])


def _check(res, what):
    assert res.returncode == 0, f"{what} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


def _losses(out):
    history = json.loads((Path(out) / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


def _tensors(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter_model.safetensors"))


def _max_diff(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    assert all(ta[k].shape == tb[k].shape for k in ta), {k: (ta[k].shape, tb[k].shape) for k in ta}
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def _compare(ref, out, what, loss_tol, adapter_tol):
    """Per-step losses and saved tensors of `out` against `ref`; prints the measured gaps (pytest -rP shows them)."""
    a, b = _losses(ref), _losses(out)
    assert len(b) == len(a) and b == pytest.approx(a, abs=loss_tol), (a, b)
    diff = _max_diff(ref, out)
    print(f"measured {what}: {len(a)} logged losses max abs diff {max(abs(x - y) for x, y in zip(a, b)):.1e}, "
          f"saved tensors max abs diff {diff:.1e}")
    assert diff <= adapter_tol


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    """A tiny random llama of our own (2 layers, hidden 64, tied embeddings) with the SmolLM2 tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("dist_llama"), tokenizer, seed=1)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return sample_rows_file(tmp_path_factory, 16)


@pytest.fixture(scope="module")
def train(tmp_path_factory, tiny_model, rows):
    """train(engine, method="lora", steps=STEPS) -> output dir of a 2-process run; each run happens once."""
    done = {}

    def run(engine, method="lora", steps=STEPS):
        key = (engine, method, steps)
        if key not in done:
            _needs(engine)
            out = tmp_path_factory.mktemp(f"{engine}_{method}_{steps}")
            args = _train_args(tiny_model, rows, out, engine, method, steps)
            if engine == "single":  # no new process: no second import of torch, transformers, peft
                from uniform_finetune import main

                main(args)
            else:
                res = subprocess.run([*_launcher(), str(ROOT / "uniform_finetune.py"), *args], capture_output=True,
                                     text=True, timeout=HANG_GUARD, env=_env(), cwd=ROOT)
                _check(res, f"{engine} {method}")
            done[key] = out
        return done[key]

    run.args = lambda out, engine, method="lora", steps=STEPS: _train_args(tiny_model, rows, out, engine, method, steps)
    return run


def _assert_engine_ran(out, engine, step=STEPS):
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


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp", "zero3_offload"])
def test_engine_trains_the_steps_of_one_process(engine, train):
    """2 processes under the engine train the steps one process trains on the same global batch (= plain DDP's,
    tests/test_scaleout.py)."""
    ref, out = train("single"), train(engine)
    _assert_engine_ran(out, engine)
    assert len(_losses(ref)) == STEPS
    _compare(ref, out, f"{engine} vs one process (lora)", LOSS_TOL, ADAPTER_TOL)


@pytest.mark.parametrize("method", ["full", "freeze", "sadapter_p"])
def test_zero3_saves_complete_tensors(method, train):
    """ZeRO-3 partitions every weight: the saved ones are gathered first (no zero-sized shards), and they are the
    tensors one process trains on the same global batch (plain DDP = one process: tests/test_scaleout.py)."""
    ref, out = train("single", method, 2), train("zero3", method, 2)
    tensors = _tensors(out)
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    _compare(ref, out, f"zero3 vs one process ({method}, {len(tensors)} tensors)", LOSS_TOL, ADAPTER_TOL)


def test_zero3_lora_reloads_in_generate_and_merges(train, tiny_model, tmp_path):
    out = train("zero3")
    res = run_inprocess("generate.py", "--lora_dir", out, "--prompt", "What is 2 + 3?", "--max_new_tokens", "4")
    _check(res, "generate.py")
    merged = tmp_path / "merged"
    _check(run_inprocess("merge.py", "--lora_dir", out, "--merged_dir", merged), "merge.py")
    from safetensors.torch import load_file

    base, folded, adapter = load_file(str(tiny_model / "model.safetensors")), load_file(
        str(merged / "model.safetensors")), _tensors(out)
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
    proc = subprocess.run([*_launcher(), str(killer), *args], capture_output=True, text=True, timeout=HANG_GUARD,
                          env=_env(), cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / f"checkpoint-{SAVE}" / "trainer_state.json").is_file()
    assert (out / ".staging" / f"checkpoint-{2 * SAVE}").is_dir() and not (out / f"checkpoint-{2 * SAVE}").exists()
    assert not (out / "adapter_model.safetensors").exists()
    res = subprocess.run([*_launcher(), str(ROOT / "uniform_finetune.py"), *args, "--resume_from_checkpoint"],
                         capture_output=True, text=True, timeout=HANG_GUARD, env=_env(), cwd=ROOT)
    _check(res, f"resume under {engine}")
    assert f"resuming from {out / f'checkpoint-{SAVE}'} (step {SAVE})" in res.stdout
    assert json.loads((out / "metrics.json").read_text())["global_step"] == STEPS
    _assert_engine_ran(out, engine)
    _compare(ref, out, f"{engine} killed + resumed vs uninterrupted", RESUME_TOL, RESUME_TOL)


def test_two_nodes_train_the_steps_of_one_launch(train, tmp_path):
    """Two launches (--nnodes 2, one process each) on this machine = one launch of two processes (ZeRO-3 where
    DeepSpeed is installed: its partitions then span the two "nodes"; else plain DDP)."""
    import importlib.util

    engine = "zero3" if importlib.util.find_spec("deepspeed") else "ddp"
    ref = train(engine)
    out, port = tmp_path / "two_nodes", free_port()
    args = train.args(out, engine)
    procs = [subprocess.Popen([*_launcher(1, (rank, 2), port), str(ROOT / "uniform_finetune.py"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
             for rank in (0, 1)]
    results = [(p.communicate(timeout=HANG_GUARD), p.returncode) for p in procs]
    for rank, ((stdout, stderr), rc) in enumerate(results):
        assert rc == 0, f"node {rank} failed:\n{stderr[-3000:]}"
    assert "saved adapter" in results[0][0][0] and "saved adapter" not in results[1][0][0]  # global rank 0 writes
    meta = json.loads((out / "finetune_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch"] == 8
    _assert_engine_ran(out, engine)
    _compare(ref, out, f"{engine} on 2 nodes x 1 vs 1 node x 2", LOSS_TOL, RESUME_TOL)


# ---- refused combinations: one sentence each, before the model is loaded ----------------------------------------
def _args(peft_type="lora", deepspeed=None, fsdp=False, fsdp_config=None):
    model = SimpleNamespace(load_in_4bit=False, load_in_8bit=False)
    peft = SimpleNamespace(peft_type=peft_type)
    train = SimpleNamespace(deepspeed=deepspeed and str(ROOT / "configs" / deepspeed), fsdp=fsdp,
                            fsdp_config=fsdp_config and str(fsdp_config))
    return model, peft, train


FSDP = {"fsdp": True, "fsdp_config": ROOT / "configs" / "fsdp.json"}


@pytest.mark.parametrize("kwargs,bits,expected", [
    ({"deepspeed": "ds_zero2.json", **FSDP}, None, "--deepspeed and --fsdp both shard the model and exclude each other"),
    (FSDP, 8, "--fsdp cannot wrap an 8-bit base"),
    ({"peft_type": "prefix", "deepspeed": "ds_zero3.json"}, None, "--peft_type prefix cannot train under ZeRO-3"),
    ({"peft_type": "prompt", "deepspeed": "ds_zero3_offload.json"}, None, "--peft_type prompt cannot train under ZeRO-3"),
    ({"peft_type": "p_tuning", **FSDP}, None, "--peft_type p_tuning cannot train under --fsdp"),
    ({"peft_type": "adalora", "deepspeed": "ds_zero2.json"}, None, "--peft_type adalora cannot train under --deepspeed"),
    ({"peft_type": "adalora", **FSDP}, None, "--peft_type adalora cannot train under --fsdp"),
])
def test_impossible_combinations_are_one_sentence(kwargs, bits, expected, monkeypatch):
    from utils.distributed import check_distributed
    from utils.errors import UserError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as err:
        check_distributed(*_args(**kwargs), bits)
    message = str(err.value)
    assert message.startswith(expected) and "; " in message and "\n" not in message  # one sentence: problem; fix


@pytest.mark.parametrize("kwargs,bits", [
    ({"deepspeed": "ds_zero3.json"}, None), ({"deepspeed": "ds_zero3_offload.json"}, None),
    ({"peft_type": "prefix", "deepspeed": "ds_zero2.json"}, None), ({"deepspeed": "ds_zero3.json"}, 4),
    ({"deepspeed": "ds_zero3.json"}, 8), (FSDP, 4), ({"peft_type": "vera", **FSDP}, None),
    ({"peft_type": "sadapter_p", **FSDP}, None), ({}, 8),
])
def test_workable_combinations_pass(kwargs, bits, monkeypatch):
    from utils.distributed import check_distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_distributed(*_args(**kwargs), bits)


def test_vera_with_fsdp_ram_efficient_loading_is_refused(tmp_path, monkeypatch):
    from utils.distributed import check_distributed
    from utils.errors import UserError

    cfg = dict(json.loads((ROOT / "configs" / "fsdp.json").read_text()), cpu_ram_efficient_loading=True)
    (tmp_path / "fsdp.json").write_text(json.dumps(cfg))
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="set \"cpu_ram_efficient_loading\": false"):
        check_distributed(*_args("vera", fsdp=True, fsdp_config=tmp_path / "fsdp.json"), None)


@pytest.mark.parametrize("flags,expected", [
    (["--fsdp", "--fsdp_config", ROOT / "configs" / "fsdp.json"], "--fsdp needs a distributed launcher"),
    (["--fsdp", "--deepspeed", ROOT / "configs" / "ds_zero3.json"], "--deepspeed and --fsdp both shard"),
])
def test_refused_before_the_model_loads(flags, expected, tmp_path):
    if "--deepspeed" in flags:
        _needs("zero3")
    res = run_inprocess("uniform_finetune.py", *flags, "--max_steps", "1", "--data", "arith_sample:8",
                     "--output_dir", tmp_path / "o", "--model_name_or_path", tmp_path / "no_such_model")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"error: {expected}" in res.stderr


def test_deepspeed_without_a_launcher_is_refused(monkeypatch):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -r requirements-dist.txt)")
    from utils.distributed import check_distributed
    from utils.errors import UserError

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="--deepspeed needs a distributed launcher; run `torchrun"):
        check_distributed(*_args(deepspeed="ds_zero3.json"), None)
