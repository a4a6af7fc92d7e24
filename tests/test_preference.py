"""Preference stages (--stage dpo / orpo / kto / simpo on TRL's trainers): pair formats and their errors, prompts
equal to inference prompts, each stage's loss falls, the reference stays fixed, the adapter reloads in generate.py
and server.py, 2-process DDP for dpo, and evaluate.py --task preference."""
import json
import math
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_DATA, run_inprocess, start_server, stop_server

pytest.importorskip("trl")

HH = [
    ("What is 2 + 2?", "2 + 2 is 4.", "It is 5, I think."),
    ("Name a color.", "Blue.", "I will not tell you."),
    ("How do I boil an egg?", "Put it in boiling water for nine minutes.", "Throw it at the wall."),
    ("Say something kind.", "You are doing great today.", "No."),
]


def hh_row(question, chosen, rejected, history=""):
    head = f"{history}\n\nHuman: {question}\n\nAssistant:"
    return {"chosen": f"{head} {chosen}", "rejected": f"{head} {rejected}"}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [hh_row(*p) for p in HH]
    rows.append(hh_row("Now say bye.", "Bye, see you soon.", "Go away.", history="\n\nHuman: Say hi.\n\nAssistant: Hi!"))
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_args(model, data, out, stage, *extra):
    """4 steps on 4 pairs, one batch: every step sees the same pairs, so the logged losses compare."""
    return ["--stage", stage, "--model_name_or_path", str(model), "--data", f"{data}:4", "--output_dir", str(out),
            "--max_steps", "4", "--per_gpu_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--save_steps", "1000", "--bf16", "off", "--cutoff_len", "128", *extra]


def history(out, key="loss"):
    return [h[key] for h in json.loads((Path(out) / "log_history.json").read_text()) if key in h]


@pytest.fixture(scope="module")
def dpo_run(tiny_llama_dir, pairs_file, tmp_path_factory):
    from uniform_finetune import main

    out = tmp_path_factory.mktemp("dpo") / "run"
    main(train_args(tiny_llama_dir, pairs_file, out, "dpo"))
    return out


# ---- pair formats ------------------------------------------------------------------------------------------
def test_hh_transcripts_split_into_prompt_turns_and_final_answers():
    from utils.preference import convert_pair_row, detect_pair_format

    row = hh_row("Now say bye.", "Bye!", "No.", history="\n\nHuman: Say hi.\n\nAssistant: Hi!")
    assert detect_pair_format(row, "r") == "hh_pairs"
    [ex] = convert_pair_row(row, "hh_pairs", "r")
    assert [(m["role"], m["content"]) for m in ex["prompt"]] == [("user", "Say hi."), ("assistant", "Hi!"),
                                                                 ("user", "Now say bye.")]
    assert (ex["chosen"], ex["rejected"]) == ("Bye!", "No.")
    # answers that share their first words still split at the last answer cue
    [ex] = convert_pair_row(hh_row("Q?", "I think yes.", "I think no."), "hh_pairs", "r")
    assert (ex["chosen"], ex["rejected"]) == ("I think yes.", "I think no.")
    assert convert_pair_row(hh_row("Q?", "Same.", "Same."), "hh_pairs", "r") == \
        "the chosen and the rejected answer are the same"


def test_prompt_chosen_rejected_strings_and_message_lists():
    from utils.preference import convert_pair_row, detect_pair_format

    plain = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go.", "system": "Be nice."}
    ultra = {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go."}]}
    trl = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go."}]}
    implicit = {"chosen": ultra["chosen"], "rejected": ultra["rejected"]}
    alpaca = {"instruction": "Hi?", "input": "", "chosen": "Hello!", "rejected": "Go."}
    for row in (plain, ultra, trl, implicit, alpaca):
        assert detect_pair_format(row, "r") == "pairs"
        [ex] = convert_pair_row(row, "pairs", "r")
        assert (ex["prompt"][-1]["content"], ex["chosen"], ex["rejected"]) == ("Hi?", "Hello!", "Go.")
    [ex] = convert_pair_row(plain, "pairs", "r")
    assert ex["prompt"][0] == {"role": "system", "content": "Be nice.", "input": ""}


def test_ranked_outputs_give_every_ordered_pair_and_unpaired_rows_keep_labels():
    from utils.preference import convert_pair_row, detect_pair_format

    ranked = {"instruction": "Rank", "output": ["best", "middle", "worst"]}
    assert detect_pair_format(ranked, "r") == "ranked"
    pairs = [(ex["chosen"], ex["rejected"]) for ex in convert_pair_row(ranked, "ranked", "r")]
    assert pairs == [("best", "middle"), ("best", "worst"), ("middle", "worst")]
    kto = {"prompt": "Hi?", "completion": "Hello!", "label": True}
    assert detect_pair_format(kto, "r") == "unpaired"
    [ex] = convert_pair_row(kto, "unpaired", "r")
    assert ex["completion"] == "Hello!" and ex["label"] is True


BAD_ROWS = [
    ({"instruction": "x", "output": "y"}, "is not preference data (it has columns instruction, output); --stage dpo "
                                          "needs chosen/rejected hh-rlhf transcripts"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
     "share no prompt ending with '\\n\\nAssistant:'"),
    ({"chosen": "just text", "rejected": "other text"}, "are not hh-rlhf transcripts"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "field 'rejected' must be a string or a non-empty list"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "field 'chosen' must end with the assistant's answer"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}],
      "rejected": "b"}, "field 'chosen' continues another conversation than the prompt"),
    ({"instruction": "q", "output": ["only one"]}, "field 'output' must list at least two answers"),
    ({"prompt": "q", "completion": "a", "label": "maybe"}, "field 'label' must be true (a desirable answer) or false"),
]


@pytest.mark.parametrize("row,expected", BAD_ROWS)
def test_bad_pair_rows_are_one_sentence_naming_file_and_row(row, expected, tmp_path, tokenizer):
    from utils.errors import UserError
    from utils.preference import load_preference_data

    path = write_rows(tmp_path / "bad.jsonl", [row])
    with pytest.raises(UserError) as err:
        load_preference_data([str(path)], "dpo")
    msg = str(err.value)
    assert expected in msg and f"{path} line 1" in msg and "\n" not in msg


def test_bad_pair_file_on_the_command_line_exits_2_with_one_line(tmp_path, capsys):
    from uniform_finetune import main

    path = write_rows(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(SystemExit) as exc:
        main(["--stage", "dpo", "--data", str(path), "--dry_run", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: --stage dpo needs pairs, but") and "use --stage kto" in err


@pytest.mark.parametrize("flags,expected", [
    (["--stage", "sft", "--beta", "0.2"], "--beta applies to the preference stages"),
    (["--stage", "orpo", "--loss_type", "ipo"], "--loss_type applies to --stage dpo and kto"),
    (["--stage", "dpo", "--loss_type", "nope"], "--loss_type nope is not a dpo loss; TRL's dpo losses are: sigmoid"),
    (["--stage", "kto", "--ref_free"], "--ref_free applies to --stage dpo; kto needs its reference model"),
    (["--stage", "dpo", "--simpo_gamma", "1"], "--simpo_gamma applies to --stage simpo, not dpo"),
    (["--stage", "dpo", "--peft_type", "adalora"], "--peft_type adalora cannot train --stage dpo"),
    (["--stage", "dpo", "--packing", "on"], "--packing on applies to --stage sft"),
    (["--stage", "kto", "--per_gpu_train_batch_size", "1"], "--stage kto estimates its KL term"),
    (["--data", "hh_rlhf_pairs"], "--data hh_rlhf_pairs holds preference pairs (hh_pairs); train on them with --stage dpo"),
    (["--stage", "dpo", "--data", "arith_sample"], "--stage dpo needs preference data, but 'arith_sample' is alpaca"),
])
def test_impossible_stage_flags_are_refused_before_loading(flags, expected, tmp_path, tiny_llama_dir, pairs_file):
    from utils.args import parse_finetune_args
    from utils.errors import UserError
    from utils.train import build_run

    argv = ["--model_name_or_path", str(tiny_llama_dir), "--data", str(pairs_file), "--output_dir", str(tmp_path), *flags]
    with pytest.raises(UserError) as err:
        build_run(*parse_finetune_args(argv))
    assert expected in str(err.value)


# ---- tokenization: our template is the one source of prompts -------------------------------------------
def test_pair_tokens_are_the_inference_prompt_and_the_trained_answer(tokenizer):
    from utils.preference import Encoder
    from utils.templates import get_template

    for name in ("chat", "alpaca"):
        template = get_template(name, tokenizer)
        prompt = [{"role": "user", "content": "Say hi.", "input": ""}, {"role": "assistant", "content": "Hi!", "input": ""},
                  {"role": "user", "content": "Now say bye.", "input": ""}]
        row, _ = Encoder(tokenizer, template, 512).encode({"prompt": prompt, "chosen": "Bye!", "rejected": "No."})
        assert row["prompt_ids"] == template.prompt_ids(tokenizer, prompt)  # what generate.py / server.py send
        ids, labels = template.encode(tokenizer, prompt + [{"role": "assistant", "content": "Bye!"}])
        n, answer = len(row["prompt_ids"]), row["chosen_ids"]
        assert ids[:n] == row["prompt_ids"] and ids[n:n + len(answer)] == answer  # training = encode's tokens
        assert all(l != -100 for l in labels[n:n + len(answer)]) and all(l == -100 for l in labels[n + len(answer):])
        assert answer[-1] in template.stop_token_ids(tokenizer)  # the end-of-turn token is trained


def test_long_prompts_lose_their_oldest_turns_first(tokenizer):
    from utils.preference import Encoder
    from utils.templates import get_template

    template = get_template("chat", tokenizer)
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Question {i} " + "word " * 20},
                  {"role": "assistant", "content": f"Answer {i} " + "word " * 20}]
    prompt = turns + [{"role": "user", "content": "Last question?"}]
    row, info = Encoder(tokenizer, template, 128).encode({"prompt": prompt, "chosen": "Yes.", "rejected": "No."})
    assert info["turns_dropped"] > 0 and len(row["prompt_ids"]) <= 64
    text = tokenizer.decode(row["prompt_ids"])
    assert text.rstrip().endswith("Last question?<|im_end|>\n<|im_start|>assistant") and "Question 0" not in text


def test_dry_run_shows_one_pair_with_the_trained_spans(tiny_llama_dir, tmp_path, capsys):
    from uniform_finetune import main

    assert (SHARED_DATA / "hh_rlhf" / "harmless_base_pairs.jsonl").is_file()
    main(["--stage", "dpo", "--model_name_or_path", str(tiny_llama_dir), "--data", "hh_rlhf_pairs:6", "--dry_run",
          "--output_dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "(hh_pairs): 1500 rows -> 1500 pairs" in out and "6 used" in out
    chosen, rejected = out.split("--- chosen:\n")[1].split("--- rejected:\n")
    assert chosen.count("⟦") == chosen.count("⟧") == 1 and rejected.count("⟦") == 1
    assert chosen.split("⟦")[0] == rejected.split("⟦")[0]  # one prompt, two answers
    assert chosen.split("⟦")[1].split("⟧")[0].endswith("<|im_end|>")
    assert not (tmp_path / "o").exists()


# ---- training ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,extra", [("kto", ["--per_gpu_train_batch_size", "8"]), ("orpo", []), ("simpo", [])])
def test_each_stage_trains_and_its_loss_falls(stage, extra, tiny_llama_dir, pairs_file, tmp_path):
    from uniform_finetune import main

    main(train_args(tiny_llama_dir, pairs_file, tmp_path / stage, stage, *extra))
    losses = history(tmp_path / stage)
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    meta = json.loads((tmp_path / stage / "finetune_meta.json").read_text())
    assert meta["stage"] == stage and meta["preference"]["beta"] == {"kto": 0.1, "orpo": 0.1, "simpo": 2.0}[stage]
    assert meta["preference"]["reference"] == ("disabled" if stage == "kto" else "none")
    if stage == "simpo":
        assert meta["preference"]["simpo_gamma"] == 1.0  # gamma / beta = 0.5


def test_dpo_trains_and_writes_every_run_file(dpo_run):
    losses = history(dpo_run)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter: the policy is the reference
    assert len(losses) == 4 and losses[-1] < losses[0]
    for name in ("adapter_config.json", "adapter_model.safetensors", "template.json", "finetune_meta.json",
                 "metrics.json", "log_history.json", "loss.png", "tokenizer.json"):
        assert (dpo_run / name).is_file(), name
    assert not (dpo_run / "ref").exists()  # only the trained adapter is saved
    meta = json.loads((dpo_run / "finetune_meta.json").read_text())
    assert meta["stage"] == "dpo" and meta["preference"] == {
        "stage": "dpo", "beta": 0.1, "loss_type": "sigmoid", "ref_free": False, "ref_adapter": None,
        "reference": "disabled"}
    metrics = json.loads((dpo_run / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["last_rewards/accuracies"] == 1.0


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_reference_is_the_adapter_disabled_and_stays_fixed(tiny_llama_dir, pairs_file, tmp_path):
    import torch

    from utils.args import parse_finetune_args
    from utils.loader import load_for_inference
    from utils.train import build_run

    run = build_run(*parse_finetune_args(train_args(tiny_llama_dir, pairs_file, tmp_path / "r", "dpo")))
    model = run.trainer.model
    assert run.trainer.ref_model is None and list(model.peft_config) == ["default"]  # no copy of the weights
    ids = run.train[0]["prompt_ids"] + run.train[0]["chosen_ids"]
    with model.disable_adapter():
        ref_before = _logits(model, ids)
    policy_before = _logits(model, ids)
    run.trainer.train()
    with model.disable_adapter():
        ref_after = _logits(model, ids)
    assert torch.equal(ref_before, ref_after)  # the reference did not move
    assert not torch.allclose(policy_before, _logits(model, ids))  # the policy did
    base, *_ = load_for_inference(model_name_or_path=str(tiny_llama_dir))
    assert torch.allclose(_logits(base, ids), ref_after, atol=1e-5)  # and it is the base model


def test_full_weight_methods_use_reference_logps_precomputed_from_the_initial_model(tiny_llama_dir, pairs_file,
                                                                                   tmp_path):
    from utils.args import parse_finetune_args
    from utils.evals.preference import _score
    from utils.loader import load_for_inference
    from utils.train import build_run

    run = build_run(*parse_finetune_args(train_args(tiny_llama_dir, pairs_file, tmp_path / "f", "dpo",
                                                    "--peft_type", "freeze", "--num_trainable_layers", "1")))
    assert run.trainer.ref_model is None and run.meta["preference"]["reference"] == "precomputed"
    ds = run.trainer.train_dataset
    before = list(ds["ref_chosen_logps"])
    run.trainer.train()
    assert list(run.trainer.train_dataset["ref_chosen_logps"]) == before
    base, tok, *_ = load_for_inference(model_name_or_path=str(tiny_llama_dir))
    items = [{"key": i, "row": ds[i]} for i in range(len(ds))]
    ours = _score(base, tok, items, 8, ("chosen", "rejected"))  # evaluate.py's log-probs agree with TRL's
    assert [ours[i]["chosen"][0] for i in range(len(ds))] == pytest.approx(before, abs=1e-3)


def test_ref_adapter_starts_from_the_sft_adapter_which_stays_the_reference(tiny_llama_dir, pairs_file, tmp_path):
    import torch
    from safetensors.torch import load_file

    from uniform_finetune import main
    from utils.args import parse_finetune_args
    from utils.train import build_run, finish_run

    sft = tmp_path / "sft"
    main(["--model_name_or_path", str(tiny_llama_dir), "--data", "arith_sample:8", "--output_dir", str(sft),
          "--max_steps", "2", "--learning_rate", "1e-2", "--save_steps", "1000", "--bf16", "off", "--lora_dropout", "0"])
    args = parse_finetune_args(["--stage", "dpo", "--ref_adapter", str(sft), "--data", str(pairs_file), "--output_dir",
                                str(tmp_path / "dpo"), "--max_steps", "3", "--per_gpu_train_batch_size", "4",
                                "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "1000",
                                "--bf16", "off"])
    run = build_run(*args)
    model = run.trainer.model
    assert sorted(model.peft_config) == ["default", "ref"] and run.meta["base_model"] == str(tiny_llama_dir)
    sft_weights = load_file(sft / "adapter_model.safetensors")
    ref = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}
    assert ref and all(not p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    key = next(iter(sft_weights))
    assert torch.equal(sft_weights[key], ref[key.replace(".weight", ".ref.weight")])
    result = run.trainer.train()
    assert all(torch.equal(p, ref[n]) for n, p in model.named_parameters() if ".ref." in n)  # the reference is fixed
    finish_run(run, result, 1.0)
    losses = history(tmp_path / "dpo")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference: the SFT adapter
    saved = load_file(tmp_path / "dpo" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(sft_weights) and not torch.equal(saved[key], sft_weights[key])
    assert not (tmp_path / "dpo" / "ref").exists()
    assert json.loads((tmp_path / "dpo" / "template.json").read_text()) == json.loads((sft / "template.json").read_text())
    # evaluate.py compares the run against the same reference: the SFT adapter
    m = _eval(tmp_path / "ev", "--data", str(pairs_file), "--lora_dir", str(tmp_path / "dpo"))["metrics"]
    assert m["reference"] == "ref_adapter" and m["reward_accuracy"] is not None


def test_ref_free_dpo_needs_no_reference(tiny_llama_dir, pairs_file, tmp_path):
    from uniform_finetune import main

    main(train_args(tiny_llama_dir, pairs_file, tmp_path / "rf", "dpo", "--ref_free", "--data", str(pairs_file),
                    "--val_set_size", "1", "--per_gpu_train_batch_size", "4"))
    meta = json.loads((tmp_path / "rf" / "finetune_meta.json").read_text())
    assert meta["preference"]["reference"] == "none" and meta["preference"]["ref_free"] is True
    losses = history(tmp_path / "rf")
    assert losses[0] != pytest.approx(math.log(2), abs=1e-4) and losses[-1] < losses[0]  # margins of the policy alone
    metrics = json.loads((tmp_path / "rf" / "metrics.json").read_text())
    assert "eval_loss" in metrics and "eval_rewards/accuracies" in metrics and "eval_perplexity" not in metrics


# ---- the result loads where every adapter loads -------------------------------------------------------------
def test_dpo_adapter_reloads_in_generate_py(dpo_run):
    res = run_inprocess("generate.py", "--lora_dir", dpo_run, "--prompt", "Name a color.", "--max_new_tokens", "6")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"adapter: {dpo_run}" in res.stderr and "template: chat" in res.stderr


def test_dpo_adapter_is_served_by_server_py(dpo_run):
    pytest.importorskip("fastapi")
    from utils.args import GenerationArguments, ModelArguments, ServeArguments
    from utils.loader import load_for_inference
    from utils.server import create_app

    app = create_app(ServeArguments(lora_dir=[f"dpo={dpo_run}"]), ModelArguments(),
                     GenerationArguments(max_new_tokens=8), log=lambda m: None)
    server, thread, url = start_server(app)
    try:
        body = {"model": "dpo", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8,
                "temperature": 0}
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            answer = json.loads(resp.read())
    finally:
        stop_server(server, thread)
    assert answer["model"] == "dpo" and answer["choices"][0]["message"]["role"] == "assistant"
    from utils.generation import generate_ids, generation_kwargs

    model, tok, tmpl, _ = load_for_inference(str(dpo_run))
    ids = tmpl.prompt_ids(tok, [{"role": "user", "content": "Name a color."}])
    alone, _, _ = generate_ids(model, tok, ids, generation_kwargs(GenerationArguments(max_new_tokens=8), tok, tmpl))
    assert answer["choices"][0]["message"]["content"] == alone  # served = loaded alone


# ---- scale-out -----------------------------------------------------------------------------------------------
def test_two_gloo_processes_equal_one_process_for_dpo(tiny_llama_dir, pairs_file, tmp_path):
    from uniform_finetune import main

    common = ["--group_by_length", "false", "--max_steps", "2", "--lora_dropout", "0", "--data", f"{pairs_file}:8"]
    main(train_args(tiny_llama_dir, pairs_file, tmp_path / "one", "dpo", *common, "--per_gpu_train_batch_size", "4"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), str(ROOT / "uniform_finetune.py"),
                          *train_args(tiny_llama_dir, pairs_file, tmp_path / "two", "dpo", *common,
                                      "--per_gpu_train_batch_size", "2")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global 4 = 2 per device x 1 accumulation x 2 processes" in two.stdout
    a, b = history(tmp_path / "one"), history(tmp_path / "two")
    assert len(a) == len(b) == 2 and b == pytest.approx(a, abs=1e-5)
    for key in ("rewards/margins", "grad_norm"):
        assert history(tmp_path / "two", key) == pytest.approx(history(tmp_path / "one", key), rel=1e-3, abs=1e-6)


# ---- evaluate.py --task preference ---------------------------------------------------------------------------
def _eval(tmp_path, *flags):
    from utils.eval_args import parse_eval_args
    from utils.evaluation import run_eval

    return run_eval(*parse_eval_args(["--task", "preference", "--output_dir", str(tmp_path), *flags]), quiet=True)


def test_preference_task_scores_an_adapter_against_its_reference_and_a_base_alone(dpo_run, pairs_file,
                                                                                  tiny_llama_dir, tmp_path):
    trained = _eval(tmp_path / "a", "--data", str(pairs_file), "--lora_dir", str(dpo_run))["metrics"]
    assert trained["reference"] == "disabled" and trained["pairs"] == trained["scored"] == len(HH) + 1
    assert trained["accuracy"] == trained["reward_accuracy"] == 1.0 and trained["mean_margin"] > 0
    assert trained["beta"] == 0.1 and trained["chosen_loss"] > 0
    base = _eval(tmp_path / "b", "--data", str(pairs_file), "--model_name_or_path", str(tiny_llama_dir))
    m = base["metrics"]
    assert m["reference"] == "none" and m["reward_accuracy"] is None and m["accuracy"] == m["logp_accuracy"]
    assert "| implicit reward vs reference (beta 0.1) | - | - | - |" in base["table"]
    # DPO moved the policy's own preference towards the chosen answers
    assert trained["logp_margin"] > m["logp_margin"]
    # held-out pairs: --exclude_data removes the training sample
    held = _eval(tmp_path / "c", "--data", str(pairs_file), "--exclude_data", f"{pairs_file}:3", "--lora_dir",
                 str(dpo_run))
    assert held["metrics"]["pairs"] == len(HH) + 1 - 3 and held["data"][0]["excluded"] == 3


def test_preference_task_needs_pairs(tmp_path):
    from utils.errors import UserError

    with pytest.raises(UserError, match="--task preference needs --data"):
        _eval(tmp_path)
