"""Bottleneck adapters (utils/bottleneck.py): SadapterH, SadapterP, P-adapter on tiny llama and gpt_neox models."""
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import yaml

from conftest import ROOT
from utils.bottleneck import (ParallelAdapterLayer, SequentialAdapterLayer, BottleneckConfig, adapter_modules,
                              add_bottleneck, bottleneck_state_dict, is_bottleneck_dir, load_bottleneck,
                              save_bottleneck)
from utils.errors import UserError

VOCAB = 1000
LAYERS = 2
ARCHS = ("llama", "gpt_neox")
# (adapter_type, parallel_site)
VARIANTS = (("sadapter_h", "mlp"), ("sadapter_p", "mlp"), ("p_adapter", "mlp"), ("p_adapter", "attn"))
CASES = [(arch, t, site) for arch in ARCHS for t, site in VARIANTS]
CASE_IDS = [f"{arch}-{t}-{site}" if t == "p_adapter" else f"{arch}-{t}" for arch, t, site in CASES]

# where the adapters must sit, per layer: (module path, wrapper class)
PLACEMENT = {
    "llama": {
        ("sadapter_h", "mlp"): [("model.layers.{i}.self_attn.o_proj", SequentialAdapterLayer),
                                ("model.layers.{i}.mlp.down_proj", SequentialAdapterLayer)],
        ("sadapter_p", "mlp"): [("model.layers.{i}.mlp.down_proj", SequentialAdapterLayer)],
        ("p_adapter", "mlp"): [("model.layers.{i}.mlp", ParallelAdapterLayer)],
        ("p_adapter", "attn"): [("model.layers.{i}.self_attn", ParallelAdapterLayer)],
    },
    "gpt_neox": {
        ("sadapter_h", "mlp"): [("gpt_neox.layers.{i}.attention.dense", SequentialAdapterLayer),
                                ("gpt_neox.layers.{i}.mlp.dense_4h_to_h", SequentialAdapterLayer)],
        ("sadapter_p", "mlp"): [("gpt_neox.layers.{i}.mlp.dense_4h_to_h", SequentialAdapterLayer)],
        ("p_adapter", "mlp"): [("gpt_neox.layers.{i}.mlp", ParallelAdapterLayer)],
        ("p_adapter", "attn"): [("gpt_neox.layers.{i}.attention", ParallelAdapterLayer)],
    },
}


def tiny_config(arch):
    from transformers import GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    return GPTNeoXConfig(**common)


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """Each tiny base model saved with save_pretrained, so tests load it the real way."""
    from transformers import AutoModelForCausalLM

    dirs = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"tiny_{arch}")
        AutoModelForCausalLM.from_config(tiny_config(arch)).save_pretrained(path)
        dirs[arch] = path
    return dirs


def load_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokens(batch=2, length=12, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def config_for(adapter_type, site, **kwargs):
    kwargs.setdefault("bottleneck_size", 8)
    return BottleneckConfig(adapter_type=adapter_type, parallel_site=site, **kwargs)


def train_steps(model, steps=4, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for step in range(steps):
        ids = tokens(seed=100 + step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("arch,adapter_type,site", CASES, ids=CASE_IDS)
def test_zero_init_equals_base_exactly(base_dirs, arch, adapter_type, site):
    model = load_base(base_dirs[arch])
    ids = tokens()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        add_bottleneck(model, config_for(adapter_type, site, dropout=0.1))
        model.eval()
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("arch,adapter_type,site", CASES, ids=CASE_IDS)
def test_adapter_placement(base_dirs, arch, adapter_type, site):
    model = add_bottleneck(load_base(base_dirs[arch]), config_for(adapter_type, site))
    expected = {path.format(i=i): cls for i in range(LAYERS) for path, cls in PLACEMENT[arch][(adapter_type, site)]}
    wrappers = adapter_modules(model)
    assert {name: type(m) for name, m in wrappers.items()} == expected
    per_layer = {"sadapter_h": 2, "sadapter_p": 1, "p_adapter": 1}[adapter_type]
    assert len(wrappers) == per_layer * LAYERS
    # only adapter parameters train: down/up weight and bias per adapter
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)
    assert len(trainable) == 4 * len(wrappers)
    assert model.bottleneck_config.adapter_type == adapter_type
    assert model.bottleneck_config.target_modules  # resolved from the per-architecture table


# ------------------------------------------------------------------------------------------ training, save, reload


@pytest.fixture(scope="module")
def trained(base_dirs, tmp_path_factory):
    """Every case trained a few steps (learned scaling, dropout on) and saved; parameters before/after kept."""
    results = {}
    for arch, adapter_type, site in CASES:
        model = load_base(base_dirs[arch])
        base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
        add_bottleneck(model, config_for(adapter_type, site, scaling="learned", dropout=0.1))
        adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}
        train_steps(model)
        out = tmp_path_factory.mktemp(f"adapter_{arch}_{adapter_type}_{site}")
        save_bottleneck(model, out)
        with torch.no_grad():
            logits = model(input_ids=tokens(seed=7)).logits
        results[(arch, adapter_type, site)] = dict(model=model, base_before=base_before, adapter_before=adapter_before,
                                                   dir=out, logits=logits)
    return results


@pytest.mark.parametrize("arch,adapter_type,site", CASES, ids=CASE_IDS)
def test_training_changes_only_adapters(trained, arch, adapter_type, site):
    run = trained[(arch, adapter_type, site)]
    params = dict(run["model"].named_parameters())
    adapter_names = [n for n in params if ".adapter." in n]
    assert set(adapter_names) == set(run["adapter_before"])
    for name in adapter_names:
        assert params[name].requires_grad
        assert not torch.equal(params[name], run["adapter_before"][name]), f"{name} did not change"
    # the learned scale is a trainable scalar parameter that moved away from 1.0
    scales = [n for n in adapter_names if n.endswith(".adapter.scale")]
    assert len(scales) == len(adapter_modules(run["model"]))
    assert all(params[n].shape == () and params[n].item() != 1.0 for n in scales)
    # every base parameter is frozen and bit-identical (its name now runs through the wrapper's `base`)
    base_after = {n.replace(".base.", "."): p for n, p in params.items() if ".adapter." not in n}
    assert set(base_after) == set(run["base_before"])
    for name, before in run["base_before"].items():
        assert not base_after[name].requires_grad
        assert torch.equal(base_after[name], before), f"base parameter {name} changed"


def test_saved_files_hold_only_adapter_tensors(trained):
    from safetensors import safe_open

    for (arch, adapter_type, site), run in trained.items():
        directory = run["dir"]
        assert is_bottleneck_dir(directory)
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["peft_type"] == adapter_type and config["library"] == "alpaca-cot bottleneck"
        assert config["parallel_site"] == site and config["scaling"] == "learned"
        with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert keys == set(bottleneck_state_dict(run["model"]))
        assert all(".adapter." in k for k in keys)
        assert len(keys) == 5 * len(adapter_modules(run["model"]))  # down/up weight+bias, scale


def test_not_a_bottleneck_dir(base_dirs, tmp_path):
    assert not is_bottleneck_dir(base_dirs["llama"])
    assert not is_bottleneck_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert not is_bottleneck_dir(tmp_path)


RELOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from utils.bottleneck import load_bottleneck

    jobs = json.loads(open(sys.argv[2]).read())
    ids = load_file(sys.argv[3])["ids"]
    out = {}
    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
        model = load_bottleneck(model, job["adapter"])
        assert not model.training
        with torch.no_grad():
            out[job["key"]] = model(input_ids=ids).logits.contiguous()
    save_file(out, sys.argv[4])
""")


def test_reload_in_new_process_gives_identical_logits(trained, base_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    jobs = [dict(key="-".join(case), base=str(base_dirs[case[0]]), adapter=str(run["dir"]))
            for case, run in trained.items()]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "reload.py").write_text(RELOAD_SCRIPT)
    save_file({"ids": tokens(seed=7)}, str(tmp_path / "ids.safetensors"))
    proc = subprocess.run([sys.executable, str(tmp_path / "reload.py"), str(ROOT), str(tmp_path / "jobs.json"),
                           str(tmp_path / "ids.safetensors"), str(tmp_path / "logits.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = load_file(str(tmp_path / "logits.safetensors"))
    for case, run in trained.items():
        assert torch.equal(reloaded["-".join(case)], run["logits"]), f"{case}: reloaded logits differ"


# ------------------------------------------------------------------------------------------ generate, checkpointing


@pytest.mark.parametrize("arch,adapter_type,site", CASES, ids=CASE_IDS)
def test_generate_with_adapters(base_dirs, arch, adapter_type, site):
    torch.manual_seed(3)
    model = add_bottleneck(load_base(base_dirs[arch]), config_for(adapter_type, site, init="normal", scaling=4.0))
    model.eval()
    prompt = tokens(batch=1, length=6, seed=5)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, uncached)  # the KV cache and its kwargs pass through the wrappers


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("arch,adapter_type,site", CASES, ids=CASE_IDS)
def test_gradient_checkpointing(base_dirs, arch, adapter_type, site, reentrant):
    ids = tokens()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(4)
        model = add_bottleneck(load_base(base_dirs[arch]), config_for(adapter_type, site, init="normal"))
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert set(plain) == set(checkpointed)
    for name, grad in checkpointed.items():
        assert grad is not None and grad.abs().sum() > 0, f"no gradient for {name}"
        torch.testing.assert_close(grad, plain[name], rtol=1e-4, atol=1e-6)


def test_hf_trainer_trains_adapters(base_dirs, tmp_path):
    from transformers import Trainer, TrainingArguments

    class Random(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = tokens(batch=1, length=16, seed=200 + i)[0]
            return {"input_ids": ids, "labels": ids}

    model = add_bottleneck(load_base(base_dirs["llama"]), config_for("sadapter_h", "mlp", scaling="learned"))
    before = {k: v.clone() for k, v in bottleneck_state_dict(model).items()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Random()).train()
    after = bottleneck_state_dict(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------ config, presets, errors


def test_config_round_trip_and_validation():
    config = BottleneckConfig(adapter_type="p_adapter", bottleneck_size=16, non_linearity="gelu", dropout=0.1,
                              scaling="learned", init="normal", target_modules=["mlp"], parallel_site="attn",
                              base_model_name_or_path="x")
    data = {**config.to_dict(), "peft_type": "p_adapter", "library": "alpaca-cot bottleneck"}
    assert BottleneckConfig.from_dict(json.loads(json.dumps(data))) == config
    for bad in (dict(adapter_type="houlsby"), dict(non_linearity="swish"), dict(init="xavier"),
                dict(parallel_site="both"), dict(scaling="big"), dict(bottleneck_size=0), dict(dropout=1.5)):
        with pytest.raises(UserError):
            BottleneckConfig(**bad)
    with pytest.raises(UserError, match="unknown bottleneck config key 'r'"):
        BottleneckConfig.from_dict({"adapter_type": "sadapter_p", "r": 8})


@pytest.mark.parametrize("name", ["sadapter_h", "sadapter_p", "p_adapter"])
def test_presets(name):
    lora = yaml.safe_load((ROOT / "peft" / "lora.yaml").read_text())
    preset = yaml.safe_load((ROOT / "peft" / f"{name}.yaml").read_text())
    assert {"name", "description", "builder", "trains", "mergeable", "needs_gpu", "defaults"} <= set(preset)
    assert set(preset) <= set(lora)  # the same shape as the LoRA preset
    assert preset["name"] == name and preset["builder"] == "bottleneck"
    assert preset["mergeable"] is False and preset["needs_gpu"] is False
    config = BottleneckConfig(adapter_type=name, **preset["defaults"])
    assert config.bottleneck_size == 64 and config.init == "zero"
    assert ("parallel_site" in preset["defaults"]) == (name == "p_adapter")
    assert not list((ROOT / "peft").glob("*.py"))


def test_unknown_model_type_without_targets():
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS,
                       num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError) as err:
        add_bottleneck(model, BottleneckConfig(adapter_type="sadapter_h"))
    message = str(err.value)
    assert message == ("bottleneck adapters have no default target modules for model type 'opt'; pass "
                       "target_modules explicitly with the names of the modules to wrap, such as o_proj and down_proj")
    # explicit targets work on the same model
    add_bottleneck(model, BottleneckConfig(adapter_type="sadapter_h", bottleneck_size=8,
                                           target_modules=["out_proj", "fc2"]))
    assert len(adapter_modules(model)) == 2 * LAYERS


def test_missing_target_module(base_dirs):
    with pytest.raises(UserError, match="bottleneck target module 'c_proj' is not in this model"):
        add_bottleneck(load_base(base_dirs["llama"]), BottleneckConfig(target_modules=["c_proj"]))


def test_mismatched_adapter_directory(trained, base_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    source = trained[("llama", "sadapter_p", "mlp")]["dir"]

    def variant(name, edit_tensors=None, edit_config=None):
        target = tmp_path / name
        shutil.copytree(source, target)
        if edit_tensors:
            tensors = load_file(str(target / "adapter_model.safetensors"))
            edit_tensors(tensors)
            save_file(tensors, str(target / "adapter_model.safetensors"))
        if edit_config:
            config = json.loads((target / "adapter_config.json").read_text())
            edit_config(config)
            (target / "adapter_config.json").write_text(json.dumps(config))
        return target

    missing = variant("missing", edit_tensors=lambda t: t.pop("model.layers.1.mlp.down_proj.adapter.up.weight"))
    extra = variant("extra", edit_tensors=lambda t: t.update({"model.layers.0.mlp.adapter.up.weight": torch.zeros(1)}))
    shape = variant("shape", edit_config=lambda c: c.update(bottleneck_size=16))
    expectations = {
        missing: "misses 'model.layers.1.mlp.down_proj.adapter.up.weight'",
        extra: "has the unexpected tensor 'model.layers.0.mlp.adapter.up.weight'",
        shape: "has a wrong shape for 'model.layers.0.mlp.down_proj.adapter.down.bias'",
    }
    for directory, what in expectations.items():
        with pytest.raises(UserError) as err:
            load_bottleneck(load_base(base_dirs["llama"]), directory)
        assert str(err.value) == (f"the adapter in {directory} does not match this base model "
                                  f"(adapter_model.safetensors {what}); load it onto the base model it was trained on")
    # a llama adapter on a gpt_neox base: its target modules do not exist there
    with pytest.raises(UserError, match="bottleneck target module 'down_proj' is not in this model"):
        load_bottleneck(load_base(base_dirs["gpt_neox"]), source)
    # not an adapter directory at all
    with pytest.raises(UserError, match="holds no bottleneck adapter"):
        load_bottleneck(load_base(base_dirs["llama"]), base_dirs["llama"])
