"""ZeRO-3 with full fine-tuning, freeze and a bottleneck adapter saves complete tensors equal to one process's
(2 gloo CPU processes, runs from tests/distributed_runs.py), and the combinations no engine can train are refused in
one sentence before a model loads.
"""
import json
from types import SimpleNamespace

import pytest

from conftest import ROOT, run_inprocess
from distributed_runs import ADAPTER_TOL, LOSS_TOL, compare, needs, shared_runs, tensors


@pytest.fixture(scope="module")
def train(tmp_path_factory, tokenizer):
    return shared_runs(tmp_path_factory, tokenizer)


@pytest.mark.parametrize("method", ["full", "freeze", "sadapter_p"])
def test_zero3_saves_complete_tensors(method, train):
    """ZeRO-3 partitions every weight: the saved ones are gathered first (no zero-sized shards), and they are the
    tensors one process trains on the same global batch (plain DDP = one process: tests/test_scaleout.py)."""
    ref, out = train("single", method, 2), train("zero3", method, 2)
    saved = tensors(out)
    assert saved and all(t.numel() > 0 for t in saved.values())
    compare(ref, out, f"zero3 vs one process ({method}, {len(saved)} tensors)", LOSS_TOL, ADAPTER_TOL)


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
        needs("zero3")
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
