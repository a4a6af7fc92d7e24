"""Every --peft_type: trains (trainable tensors change, frozen ones do not), saves, reloads in a fresh
process to identical logits, generates; AdaLoRA reallocates ranks; quantized bases train on CPU."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_inprocess, run_script
from utils.errors import UserError
from utils.peft_methods import PEFT_TYPES

PROBE = ("Add the numbers.", "12 and 30")
RELOAD_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from utils.loader import load_for_inference
from utils.templates import alpaca_messages
out = {{}}
for name, path in {dirs!r}.items():
    model, tok, tmpl, _ = load_for_inference(path)
    ids = torch.tensor([tmpl.prompt_ids(tok, alpaca_messages(*{probe!r}))])
    with torch.no_grad():
        out[name] = model(input_ids=ids).logits[0, -2:].tolist()
print(json.dumps(out))
"""


def finetune_args(model_dir, data, out, peft_type, *extra, steps=3):
    from utils.args import parse_finetune_args

    return parse_finetune_args(["--model_name_or_path", str(model_dir), "--data", str(data), "--peft_type", peft_type,
                                "--max_steps", str(steps), "--per_gpu_train_batch_size", "2", "--learning_rate", "1e-2",
                                "--output_dir", str(out), "--save_steps", "1000", "--logging_steps", "1",
                                "--cutoff_len", "96", *extra])


def train_and_snapshot(args):
    """Train through the real Trainer path; return (run, parameters before training)."""
    import torch

    from utils.train import build_run, finish_run

    run = build_run(*args)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    result = run.trainer.train()
    finish_run(run, result, 1.0)
    torch.manual_seed(0)
    return run, before


def probe_logits(run):
    import torch

    from utils.templates import alpaca_messages

    run.model.eval()
    ids = torch.tensor([run.template.prompt_ids(run.tokenizer, alpaca_messages(*PROBE))])
    with torch.no_grad():
        return run.model(input_ids=ids).logits[0, -2:]


def changes(run, before):
    """(trainable names, trainable tensors left unchanged, frozen tensors that changed)."""
    import torch

    params = dict(run.model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    same = [n for n in trainable if torch.equal(params[n].detach(), before[n])]
    moved = [n for n, p in params.items() if not p.requires_grad and not torch.equal(p.detach(), before[n])]
    return trainable, same, moved


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, small_data, tmp_path_factory):
    """Each method trained 3 steps on the tiny llama: name -> (run, changes, logits)."""
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for name in PEFT_TYPES:
        run, before = train_and_snapshot(finetune_args(tiny_llama_dir, small_data, root / name, name))
        # checked right after training: bitsandbytes repacks 4-bit weights for CPU inference on the first forward
        out[name] = (run, changes(run, before), probe_logits(run))
    return out


@pytest.mark.parametrize("name", PEFT_TYPES)
def test_trainable_change_frozen_do_not(trained, name):
    run, (trainable, same, moved), _ = trained[name]
    assert trainable, "nothing was trainable"
    assert same == [] and moved == []
    meta = json.loads((run.output_dir / "finetune_meta.json").read_text())
    assert meta["peft_type"] == name and 0 < meta["trainable_params"] <= meta["total_params"]
    if name not in ("full",):
        assert meta["trainable_params"] < meta["total_params"]
    assert (run.output_dir / "adapter_config.json").is_file()
    assert (run.output_dir / "adapter_model.safetensors").is_file()


def test_every_method_reloads_in_a_fresh_process_to_identical_logits(trained):
    import torch

    dirs = {name: str(run.output_dir) for name, (run, _, _) in trained.items()}
    code = RELOAD_SCRIPT.format(root=str(ROOT), dirs=dirs, probe=PROBE)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    fresh = json.loads(res.stdout.strip().splitlines()[-1])
    for name, (_, _, logits) in trained.items():
        if name == "adalora":  # saving prunes masked ranks away: same function, another summation order
            assert torch.allclose(torch.tensor(fresh[name]), logits, atol=1e-6, rtol=0), name
        else:
            assert torch.equal(torch.tensor(fresh[name]), logits), name


@pytest.mark.parametrize("name", PEFT_TYPES)
def test_generate_in_process(trained, name, capsys):
    from generate import main

    run = trained[name][0]
    main(["--lora_dir", str(run.output_dir), "--prompt", "What is 2 + 2?", "--max_new_tokens", "4"])
    captured = capsys.readouterr()
    assert f"adapter: {run.output_dir}" in captured.err and captured.out.endswith("\n")


@pytest.mark.parametrize("name", ["prefix", "sadapter_h", "qlora"])
def test_generate_script(trained, name):
    res = run_inprocess("generate.py", "--lora_dir", trained[name][0].output_dir, "--prompt", "Hi", "--max_new_tokens", "4")
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("name", ["prefix", "p_tuning", "prompt"])
def test_prompt_learning_batch_prediction(trained, name, tmp_path):
    from utils.args import GenerationArguments, ModelArguments, PredictArguments
    from utils.prediction import run_predict

    rows = [{"instruction": "Hi" + " there" * i, "input": "", "output": "x"} for i in range(5)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    out = run_predict(ModelArguments(), PredictArguments(lora_dir=str(trained[name][0].output_dir), data=str(data),
                                                         result_dir=str(tmp_path / "p"), batch_size=4),
                      GenerationArguments(max_new_tokens=3))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == list(range(5))


@pytest.mark.parametrize("name", ["p_tuning", "prompt", "lora", "sadapter_p", "ia3"])
def test_gradient_checkpointing(tiny_llama_dir, small_data, tmp_path, name):
    import torch

    run, before = train_and_snapshot(finetune_args(tiny_llama_dir, small_data, tmp_path / name, name,
                                                   "--gradient_checkpointing", steps=2))
    changed = [n for n, p in run.model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert changed


def test_adalora_reallocates_rank(tiny_llama_dir, small_data, tmp_path):
    from transformers import TrainerCallback

    from utils.train import build_run, finish_run

    args = finetune_args(tiny_llama_dir, small_data, tmp_path / "ada", "adalora", "--peft_options", "init_r=6",
                         "target_r=2", "tinit=2", "tfinal=2", "deltaT=1", steps=10)
    run = build_run(*args)
    config = run.model.peft_config["default"]
    assert config.total_step == 10 and (config.tinit, config.tfinal, config.deltaT) == (2, 2, 1)
    patterns = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rp = config.rank_pattern
            patterns.append(None if rp is None else {k: int(sum(v)) for k, v in rp.items()})

    run.trainer.add_callback(Record())
    finish_run(run, run.trainer.train(), 1.0)
    assert patterns[0] is None  # tinit: no allocation yet
    later = [p for p in patterns if p]
    assert later, "update_and_allocate never produced a rank pattern"
    assert sum(later[-1].values()) < 6 * len(later[-1])  # the budget shrank from init_r
    assert len({json.dumps(p, sort_keys=True) for p in later}) >= 2 or len(set(later[-1].values())) > 1
    saved = json.loads((run.output_dir / "adapter_config.json").read_text())
    assert saved["rank_pattern"]


@pytest.mark.parametrize("extra,layer", [((), "Linear4bit"), (("--load_in_8bit",), "Linear8bitLt")])
def test_quantized_base_trains_on_cpu(tiny_llama_dir, small_data, tmp_path, extra, layer):
    import torch

    peft_type = "qlora" if not extra else "lora"
    run, before = train_and_snapshot(finetune_args(tiny_llama_dir, small_data, tmp_path / "q", peft_type, *extra))
    assert any(type(m).__name__ == layer for m in run.model.modules())
    changed = [n for n, p in run.model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert changed and all("lora_" in n for n in changed)
    assert json.loads((run.output_dir / "finetune_meta.json").read_text())["quant_bits"] == (8 if extra else 4)


def test_merge_refuses_non_mergeable(trained, tmp_path):
    res = run_script("merge.py", "--lora_dir", trained["prefix"][0].output_dir, "--merged_dir", tmp_path / "m")
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: --peft_type prefix adapters cannot be merged into the base weights; "
                                  "load them with --lora_dir instead")


@pytest.mark.parametrize("name", ["dora", "freeze", "qlora"])
def test_merge_equals_adapter(trained, name, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from utils.loader import load_for_inference
    from utils.merging import merge_adapter
    from utils.templates import alpaca_messages

    run = trained[name][0]
    merge_adapter(str(run.output_dir), str(tmp_path / "m"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    model, tok, tmpl, _ = load_for_inference(str(run.output_dir), keep_quantization=False)
    ids = torch.tensor([tmpl.prompt_ids(tok, alpaca_messages(*PROBE))])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--peft_type", "full", "--load_in_4bit"], "--peft_type full cannot train a quantized base; drop --load_in_4bit"),
    (["--peft_type", "qlora", "--load_in_8bit"], "--peft_type qlora trains on a 4-bit base; drop --load_in_8bit"),
    (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit and --load_in_8bit exclude each other; pick one"),
    (["--peft_type", "prefix", "--lora_r", "8"], "--lora_r does not apply to --peft_type prefix"),
    (["--peft_type", "lora", "--num_virtual_tokens", "8"], "--num_virtual_tokens does not apply to --peft_type lora"),
    (["--peft_type", "magic"], "unknown --peft_type 'magic'; valid types are: adalora,"),
    (["--dtype", "float16"], "float16 training needs a GPU"),
    (["--peft_options", "init_r"], "--peft_options 'init_r' is not key=value"),
    (["--peft_type", "prefix", "--gradient_checkpointing"],
     "--gradient_checkpointing cannot be used with --peft_type prefix: transformers drops the attention cache"),
])
def test_impossible_combinations_fail_before_loading(argv, message):
    res = run_inprocess("uniform_finetune.py", *argv, "--model_name_or_path", "/nonexistent/model")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert message in res.stderr  # the model path does not exist: the check ran before any loading


def test_bf16_refused_without_hardware_support(monkeypatch):
    from utils import peft_methods

    monkeypatch.setattr(peft_methods, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="this CPU has no native bfloat16"):
        peft_methods.check_dtype("bfloat16")


def test_help_lists_every_method():
    out = run_script("uniform_finetune.py", "--help").stdout.replace("\n", " ")
    for name in ["lora", "qlora", "adalora", "prefix", "p_tuning", "prompt", "ia3", "dora", "loha", "lokr", "vera",
                 "full", "freeze", "sadapter_h", "sadapter_p", "p_adapter"]:
        assert name in PEFT_TYPES and name in out, name


def test_readme_method_table_is_generated_from_presets():
    from utils.peft_methods import methods_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert methods_table() in readme


def test_every_preset_declares_every_capability():
    """A method's capabilities are data in its preset; code reads them instead of lists of method names."""
    from utils.peft_methods import CAPABILITIES, load_preset, methods_with

    for name in PEFT_TYPES:
        preset = load_preset(name)
        missing = [k for k in CAPABILITIES if k not in preset]
        assert not missing, f"peft/{name}.yaml lacks {missing}"
        assert preset["loader"] in ("peft", "bottleneck", "weights")
        assert preset["quantized_base"] in ("4bit", "optional", "none")
        for key in ("mergeable", "packing", "selective_loss", "prompt_learning", "shareable", "gradient_checkpointing",
                    "needs_gpu"):
            assert isinstance(preset[key], bool), (name, key)
        assert not (preset["prompt_learning"] and preset["packing"]), name  # virtual tokens own the positions
    assert methods_with(loader="bottleneck") == ["p_adapter", "sadapter_h", "sadapter_p"]
    assert set(methods_with(prompt_learning=True)) == {"prefix", "p_tuning", "prompt"}


def test_no_module_keeps_its_own_list_of_method_names():
    import re

    names = "|".join(PEFT_TYPES)
    pattern = re.compile(rf"[\(\[{{]\s*\"({names})\"\s*,\s*\"({names})\"")
    offenders = [str(p) for p in (ROOT / "utils").rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"hand-kept lists of method names in {offenders}; declare a capability in peft/*.yaml"
