"""End to end: train a few steps, reload the adapter in a fresh process, generate, merge."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_inprocess

PROBE = ("Add the numbers.", "12 and 30")

LOGITS_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from utils.loader import load_for_inference
from utils.templates import alpaca_messages
model, tok, tmpl, _ = load_for_inference({lora!r})
ids = torch.tensor([tmpl.prompt_ids(tok, alpaca_messages(*{probe!r}))])
with torch.no_grad():
    print(json.dumps(model(input_ids=ids).logits[0, -3:].tolist()))
"""


def _finetune(model_dir, out, *extra):
    from uniform_finetune import main

    main(["--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_steps", "3",
          "--per_gpu_train_batch_size", "2", "--cutoff_len", "128", "--logging_steps", "1",
          "--learning_rate", "1e-2", "--save_steps", "1000", *extra])


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run") / "adapter"
    _finetune(tiny_llama_dir, out, "--val_set_size", "8")
    return out


def test_outputs_and_metadata(tiny_run, tiny_llama_dir):
    for name in ["adapter_config.json", "adapter_model.safetensors", "template.json", "finetune_meta.json",
                 "loss.png", "metrics.json", "tokenizer.json"]:
        assert (tiny_run / name).is_file(), name
    meta = json.loads((tiny_run / "finetune_meta.json").read_text())
    assert meta["base_model"] == str(tiny_llama_dir) and meta["model_type"] == "llama"
    assert meta["peft_type"] == "lora" and meta["template"] == "chat" and meta["data"] == ["arith_sample"]
    assert 0 < meta["trainable_params"] < meta["total_params"]
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and "eval_loss" in metrics


def test_lora_weights_trained(tiny_run):
    from safetensors.torch import load_file

    weights = load_file(tiny_run / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    assert any("q_proj" in k for k in weights) and any("v_proj" in k for k in weights)


def test_adapter_reloads_in_fresh_process_to_identical_logits(tiny_run):
    import torch

    from utils.loader import load_for_inference
    from utils.templates import alpaca_messages

    model, tok, tmpl, _ = load_for_inference(str(tiny_run))
    ids = torch.tensor([tmpl.prompt_ids(tok, alpaca_messages(*PROBE))])
    with torch.no_grad():
        here = model(input_ids=ids).logits[0, -3:]
    base_model, *_ = load_for_inference(model_name_or_path=json.loads(
        (tiny_run / "finetune_meta.json").read_text())["base_model"])
    with torch.no_grad():
        base = base_model(input_ids=ids).logits[0, -3:]
    assert not torch.allclose(here, base)  # the adapter changes the output
    code = LOGITS_SCRIPT.format(root=str(ROOT), lora=str(tiny_run), probe=PROBE)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    there = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    assert torch.equal(here, there)


def test_generate_uses_the_training_template_byte_for_byte(tiny_run, tokenizer):
    from utils.loader import load_for_inference
    from utils.templates import get_template

    _, _, tmpl, _ = load_for_inference(str(tiny_run))
    trained_with = get_template("chat", tokenizer)
    assert tmpl.to_json().encode() == (tiny_run / "template.json").read_bytes() == trained_with.to_json().encode()


def test_generate_script_answers(tiny_run):
    res = run_inprocess("generate.py", "--lora_dir", tiny_run, "--prompt", "What is 3 + 4?", "--max_new_tokens", "8")
    assert res.returncode == 0, res.stderr
    assert res.stdout  # a random tiny model may answer in whitespace; the embedded-model test checks words
    assert "adapter: " + str(tiny_run) in res.stderr and "template: chat" in res.stderr


def test_generate_chat_mode_clear_and_exit(tiny_run):
    from utils.args import GenerationArguments
    from utils.generation import chat_loop
    from utils.loader import load_for_inference

    model, tok, tmpl, _ = load_for_inference(str(tiny_run))
    lines, said = iter(["hello", "/clear", "again", "/exit", "never read"]), []
    chat_loop(model, tok, tmpl, GenerationArguments(max_new_tokens=4), read=lambda _: next(lines),
              write=lambda *a, **k: said.append("".join(map(str, a))))
    assert "(history cleared)" in said and said.count("assistant> ") == 2


def test_merged_model_equals_base_plus_adapter(tiny_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from utils.loader import load_for_inference
    from utils.templates import alpaca_messages

    res = run_inprocess("merge.py", "--lora_dir", tiny_run, "--merged_dir", tmp_path / "merged")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers
    model, tok, tmpl, _ = load_for_inference(str(tiny_run))
    ids = torch.tensor([tmpl.prompt_ids(tok, alpaca_messages(*PROBE))])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_predict_writes_and_resumes(tiny_run, tmp_path):
    rows = [{"instruction": f"What is {i} + 1?", "input": "", "output": str(i + 1)} for i in range(5)]
    rows.append({"instruction": "Name a colour.", "input": ""})  # prompt-only row
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "preds"
    args = ["--lora_dir", tiny_run, "--data", data, "--result_dir", out, "--max_new_tokens", "4", "--batch_size", "4"]
    assert run_inprocess("predict.py", *args).returncode == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    keep = lines[:2]
    (out / "predictions.jsonl").write_text("\n".join(keep) + "\n" + lines[2][:10])  # a killed run's torn tail
    assert run_inprocess("predict.py", *args).returncode == 0
    recs = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == list(range(6))
    assert recs[:2] == [json.loads(l) for l in keep]
    assert sum("reference" in r for r in recs) == 5


def test_embedded_model_trains_and_answers(tmp_path):
    out = tmp_path / "embedded"
    _finetune("smollm2-135m-instruct", out, "--learning_rate", "1e-3")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["train_loss"] > 0
    meta = json.loads((out / "finetune_meta.json").read_text())
    assert meta["model_type"] == "smollm" and meta["base_model"] == "smollm2-135m-instruct"
    res = run_inprocess("generate.py", "--lora_dir", out, "--prompt", "What is 10 + 5?", "--max_new_tokens", "24")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
