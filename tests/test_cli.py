"""Every script answers --help; unknown flags and bad config keys exit 2 with one clear sentence."""
import pytest

from conftest import run_inprocess, run_script

SCRIPTS = ["uniform_finetune.py", "generate.py", "merge.py", "predict.py", "server.py", "web.py", "evaluate.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    res = run_script(script, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and "--model_name_or_path" in res.stdout


def test_finetune_help_lists_seed_flags():
    out = run_script("uniform_finetune.py", "--help").stdout
    for flag in ["--model_type", "--data", "--peft_type", "--lora_r", "--lora_alpha", "--lora_dropout",
                 "--lora_target_modules", "--per_gpu_train_batch_size", "--gradient_accumulation_steps",
                 "--learning_rate", "--epochs", "--cutoff_len", "--val_set_size", "--output_dir",
                 "--resume_from_checkpoint", "--report_to", "--max_steps", "--save_steps", "--seed", "--dry_run"]:
        assert flag in out, flag


def test_unknown_flag_is_an_error():
    # The seed's README itself has this typo; Alpaca-CoT silently ignored it.
    res = run_inprocess("uniform_finetune.py", "---model_type", "llama")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: unknown argument '---model_type'; did you mean '--model_type'?"


def test_abbreviated_flag_is_not_accepted():
    res = run_inprocess("uniform_finetune.py", "--lora_targ", "q_proj", "--dry_run")
    assert res.returncode == 2
    assert "unknown argument '--lora_targ'" in res.stderr and "Traceback" not in res.stderr


def test_bad_value_is_one_line():
    res = run_inprocess("uniform_finetune.py", "--lora_r", "eight")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "invalid int value: 'eight'" in res.stderr


def test_unknown_model_type_lists_valid_ones():
    res = run_inprocess("uniform_finetune.py", "--model_type", "gpt5", "--dry_run")
    assert res.returncode == 2
    assert "unknown --model_type 'gpt5'; valid types are:" in res.stderr and "llama" in res.stderr


def test_config_file_and_override(tmp_path):
    from utils.args import parse_finetune_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora_r: 4\nlearning_rate: 0.001\ndata: [arith_sample]\nlora_target_modules: [q_proj, k_proj]\n")
    model, data, peft, train = parse_finetune_args([str(cfg), "--lora_r", "16"])
    assert peft.lora_r == 16 and train.learning_rate == 0.001 and data.data == ["arith_sample"]
    assert peft.lora_target_modules == ["q_proj", "k_proj"]
    _, _, peft2, _ = parse_finetune_args(["--config", str(cfg)])
    assert peft2.lora_r == 4


def test_config_unknown_key(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora_rank: 4\n")
    res = run_inprocess("uniform_finetune.py", cfg)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: config file {cfg} has an unknown key 'lora_rank'; did you mean 'lora_r'?"


def test_server_binds_localhost_by_default():
    from utils.args import parse_serve_args

    _, serve, _ = parse_serve_args([])
    assert serve.host == "127.0.0.1"


@pytest.mark.parametrize("group", ["FINETUNE_ARGS", "GENERATE_ARGS"])
def test_readme_documents_every_flag(group):
    import utils.args as args_mod
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert args_mod.flags_table(*getattr(args_mod, group)) in readme
