"""The Alpaca-CoT README's commands keep working, flag for flag, with the model path changed to a local tiny model.

Sections covered: Instruction Finetuning (single GPU, every family; multiple GPUs is tests/test_scaleout.py),
Inference, Parameter merging, Local chatting, Batch predicting, Web service building.
Families whose checkpoints run remote code (ChatGLM, MOSS, InternLM 1) or need a download (the mixes of the
collection) end in their one clear sentence here: no tiny stand-in exists offline.
"""
import json
import shutil

import pytest

from test_bad_input import _main

# The seed's "Single GPU" commands, verbatim but for the model path (and the data, where the seed's mix needs a
# download: the seed's own --data value is checked separately below).
SEED_TRAIN = {
    "llama": "--model_type llama --model_name_or_path {tiny} --data {data} --lora_target_modules q_proj v_proj "
             "--per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1",
    "bloom": "--model_type bloom --model_name_or_path {bloom} --data {data} --lora_target_modules query_key_value "
             "--per_gpu_train_batch_size 4 --learning_rate 3e-4 --epochs 1",
    "internlm": "--model_type llama --model_name_or_path {tiny} --data {data} --lora_target_modules q_proj v_proj "
                "--lora_r 32 --lora_alpha 32 --lora_dropout 0.1 --per_gpu_train_batch_size 1 --learning_rate 2e-5 "
                "--epochs 1 --compute_dtype=fp32",
}


@pytest.fixture(scope="module")
def tiny_bloom_dir(tmp_path_factory, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, BloomConfig

    path = tmp_path_factory.mktemp("tiny_bloom")
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", list(SEED_TRAIN))
def test_seed_finetune_commands_parse_and_prepare(family, tiny_llama_dir, tiny_bloom_dir, small_data, tmp_path,
                                                  capsys):
    argv = SEED_TRAIN[family].format(tiny=tiny_llama_dir, bloom=tiny_bloom_dir, data=small_data).split()
    _main("uniform_finetune")(argv + ["--output_dir", str(tmp_path / family), "--dry_run"])
    out = capsys.readouterr().out
    assert "example (the loss is computed only inside" in out and f"({'bloom' if family == 'bloom' else 'llama'})" in out


def test_seed_compute_dtype_is_the_dtype_flag():
    from utils.args import parse_finetune_args

    for value, dtype in (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"), ("float32", "float32")):
        assert parse_finetune_args([f"--compute_dtype={value}"])[0].dtype == dtype


@pytest.mark.parametrize("argv,expected", [
    ("--model_type chatglm --model_name_or_path THUDM/chatglm-6b --data alpaca-belle-cot --lora_target_modules "
     "query_key_value --lora_r 32 --lora_alpha 32 --lora_dropout 0.1 --per_gpu_train_batch_size 2 --learning_rate "
     "2e-5 --epochs 1", "--model_type chatglm runs code shipped with the checkpoint; pass --trust_remote_code"),
    ("---model_type moss --model_name_or_path fnlp/moss-moon-003-sft --data alpaca --lora_target_modules q_proj "
     "v_proj --per_gpu_train_batch_size 1 --learning_rate 3e-4 --epochs 3", "did you mean '--model_type'?"),
    ("--model_type internlm --model_name_or_path internlm/internlm-7b --data alpaca --lora_target_modules q_proj "
     "v_proj --lora_r 32 --lora_alpha 32 --lora_dropout 0.1 --per_gpu_train_batch_size 1 --learning_rate 2e-5 "
     "--epochs 1 --compute_dtype=fp32", "cannot find a model at 'internlm/internlm-7b'"),
])
def test_seed_remote_code_families_end_in_one_sentence(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        _main("uniform_finetune")(argv.split())
    assert info.value.code == 2 and expected in capsys.readouterr().err


def test_seed_mix_needs_a_download_and_says_which(tiny_llama_dir, capsys):
    with pytest.raises(SystemExit) as info:
        _main("uniform_finetune")(["--model_type", "llama", "--model_name_or_path", str(tiny_llama_dir),
                                   "--data", "alpaca-belle-cot", "--dry_run"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "is not available here" in err and "huggingface-cli download" in err


@pytest.fixture(scope="module")
def seed_runs(tiny_lora_run, tmp_path_factory):
    """saved_models/ as uniform_finetune.py --model_type llama --data alpaca-belle-cot would have left it."""
    root = tmp_path_factory.mktemp("seed_cwd")
    run = root / "saved_models" / "llama_lora"
    shutil.copytree(tiny_lora_run, run)
    meta = json.loads((run / "finetune_meta.json").read_text())
    (run / "finetune_meta.json").write_text(json.dumps(dict(meta, data=["alpaca-belle-cot"])))
    return root, run


def test_seed_inference_command(seed_runs, monkeypatch, capsys):
    """`python3 generate.py --data alpaca-belle-cot --model_type llama` (interactive; here stdin is at its end)."""
    root, run = seed_runs
    monkeypatch.chdir(root)
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    _main("generate")(["--data", "alpaca-belle-cot", "--model_type", "llama", "--max_new_tokens", "2"])
    captured = capsys.readouterr()
    assert "loading the newest matching run, saved_models/llama_lora" in captured.err
    assert "Chat with the model" in captured.out


def test_seed_merge_command(seed_runs, tmp_path, capsys):
    """`python3 merge.py --model_type llama --size 7b --lora_dir xxx --merged_dir yyy`."""
    _, run = seed_runs
    _main("merge")(["--model_type", "llama", "--size", "7b", "--lora_dir", str(run), "--merged_dir",
                    str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert "--size 7b is accepted" in capsys.readouterr().err


def test_seed_batch_predicting_command(seed_runs, small_data, tmp_path):
    """`python3 predict.py --model_type chatglm --size 6b --data for_dict_data --lora_dir xxx --result_dir yyy`."""
    _, run = seed_runs
    _main("predict")(["--model_type", "llama", "--size", "6b", "--data", str(small_data), "--lora_dir", str(run),
                      "--result_dir", str(tmp_path / "preds"), "--max_new_tokens", "2"])
    assert len((tmp_path / "preds" / "predictions.jsonl").read_text().splitlines()) == 16


def test_seed_local_chatting_command_serves(seed_runs):
    """`python3 server.py --model_type chatglm --size 6b --lora_dir xxx`: the same flags load the server's models."""
    from utils.args import parse_serve_args
    from utils.server import load_engine

    _, run = seed_runs
    model_args, serve, gen = parse_serve_args(["--model_type", "llama", "--size", "6b", "--lora_dir", str(run)])
    engine = load_engine(model_args, serve, gen, log=lambda m: None)
    assert set(engine.entries) >= {"llama_lora"}


def test_seed_web_service_command(seed_runs, monkeypatch):
    """`python3 web.py --model_type chatglm --size 6b --lora_dir xxx`: builds the demo (launching is stubbed)."""
    import utils.web as web

    _, run = seed_runs
    launched = {}
    monkeypatch.setattr(web, "launch", lambda demo, host, port: launched.update(host=host, port=port))
    _main("web")(["--model_type", "llama", "--size", "6b", "--lora_dir", str(run), "--port", "7899"])
    assert launched == {"host": "127.0.0.1", "port": 7899}
