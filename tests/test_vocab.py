"""--extend_vocab (utils/vocab.py): new tokens, resized embeddings, which rows train, reload and merge.

The first part calls utils/vocab.py and utils/peft_methods.attach_adapter directly on tiny llamas (tied and untied
LM heads); the second goes through the real scripts (uniform_finetune.py with packing and under torchrun,
generate.py, merge.py, the loader, the server engine). Every fresh-process reload runs in ONE subprocess
(`fresh_logits`): a new interpreter per case would cost more than the cases themselves.
"""
import json
import re
import subprocess
import sys
import pytest

from conftest import ROOT, SHARED_DATA, run_inprocess

TOKENS = ["中国", "北京", "首都", "世界", "人民", "我们", "问题", "回答"]
TEXT = ["我们爱中国，北京是中国的首都。世界人民的问题。", "请回答下面的问题：中国的首都在哪里？"]
HANG_GUARD = 600  # seconds: a guard against a hung process, never a speed check


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "tokens.txt"
    path.write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    return path


def _tiny(path, tokenizer, tied):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untied_llama_dir(tmp_path_factory, tokenizer):
    """A tiny random llama whose LM head is its own matrix."""
    return _tiny(tmp_path_factory.mktemp("tiny_untied"), tokenizer, tied=False)


@pytest.fixture(scope="module")
def zh_rows(tmp_path_factory):
    """64 alpaca rows from BELLE's Chinese self-instruct seed tasks (read in place from ../shared/data)."""
    rows = []
    for line in (SHARED_DATA / "self_instruct" / "zh_seed_tasks.json").read_text(encoding="utf-8").splitlines():
        if line.strip():
            task = json.loads(line)
            inst = task["instances"][0]
            rows.append({"instruction": task["instruction"], "input": inst.get("input", ""), "output": inst["output"]})
    path = tmp_path_factory.mktemp("zh") / "zh_rows.json"
    path.write_text(json.dumps(rows[:64], ensure_ascii=False), encoding="utf-8")
    return path


def _model_dir(request, tied):
    return request.getfixturevalue("tiny_llama_dir" if tied else "untied_llama_dir")


# ---- flags and refusals ---------------------------------------------------------------------------------------------
def test_every_preset_says_how_it_extends_the_vocabulary():
    from utils import vocab
    from utils.peft_methods import CAPABILITIES, PEFT_TYPES, capability

    assert "vocab_extension" in CAPABILITIES
    for name in PEFT_TYPES:
        assert capability(name, "vocab_extension") in vocab.MECHANISMS, name
    assert vocab.mechanism("lora") == "trainable_tokens" and vocab.mechanism("loha") == "modules_to_save"


@pytest.mark.parametrize("kwargs, expected", [
    (dict(extend_vocab="auto:0"), "N in auto:N must be a positive whole number"),
    (dict(extend_vocab="auto:many"), "N in auto:N must be a positive whole number"),
    (dict(extend_vocab="no/such/tokens.txt"), "is neither auto:N nor an existing file"),
    (dict(extend_vocab="auto:8", new_token_init="zeros"), "--new_token_init zeros is not one of mean, random"),
    (dict(new_token_init="random"), "--new_token_init random applies to the rows --extend_vocab adds"),
    (dict(extend_vocab="auto:8", peft_type="prefix"), "own reference to the original word embedding"),
    (dict(extend_vocab="auto:8", peft_type="prompt"), "own reference to the original word embedding"),
    (dict(extend_vocab="auto:8", peft_type="sadapter_h"), "hold only the bottleneck modules"),
    (dict(extend_vocab="auto:8", stage="dpo"), "--extend_vocab cannot be used with --stage dpo"),
    (dict(extend_vocab="auto:8", peft_type="loha", weight_decay=0.01), "would shrink the old embedding rows"),
    (dict(extend_vocab="auto:8", peft_type="freeze", weight_decay=0.01), "would shrink the old embedding rows"),
    (dict(extend_vocab="auto:8", engine="fsdp"), "--extend_vocab cannot be used with --fsdp"),
    (dict(extend_vocab="auto:8", peft_type="loha", engine="deepspeed"), "DeepSpeed's optimizer (on flat partitions)"),
])
def test_impossible_combinations_are_one_sentence(kwargs, expected):
    from utils import vocab
    from utils.errors import UserError

    args = {**dict(peft_type="lora", extend_vocab=None, new_token_init="mean", stage="sft", weight_decay=0.0), **kwargs}
    with pytest.raises(UserError, match=re.escape(expected)) as err:
        vocab.check_request(args.pop("peft_type"), **args)
    assert "\n" not in str(err.value)
    if "peft_type" in kwargs:  # the sentence names the methods that can do it
        assert "lora" in str(err.value)


def test_workable_combinations_pass():
    from utils import vocab

    assert vocab.check_request("lora", None) is None
    assert vocab.check_request("lora", "auto:8", weight_decay=0.01) == "trainable_tokens"  # decays only new rows
    assert vocab.check_request("ia3", "auto:8") == "modules_to_save"
    assert vocab.check_request("full", "auto:8", weight_decay=0.01) == "weights"
    assert vocab.check_request("lora", "auto:8", engine="deepspeed") == "trainable_tokens"  # ZeRO-2/3 checked by hand


# ---- tokens -------------------------------------------------------------------------------------------------------
def test_new_tokens_encode_as_single_ids_and_decode_back(tokenizer, token_file):
    import copy

    from utils import vocab

    tok = copy.deepcopy(tokenizer)
    before = {t: len(tok.encode(t, add_special_tokens=False)) for t in TOKENS}
    assert all(n > 1 for n in before.values())  # the English-centred vocabulary splits each of them
    plan = vocab.extend_tokenizer(tok, str(token_file))
    assert plan.tokens == TOKENS and plan.first_id == len(tokenizer) and len(tok) == len(tokenizer) + len(TOKENS)
    for token, token_id in zip(TOKENS, plan.ids):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
        assert plan.pieces[plan.tokens.index(token)] == tokenizer.encode(token, add_special_tokens=False)
    for text in TEXT + ["mixed English 和中文 text, 北京 2024!"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert len(ids) < len(tokenizer.encode(text, add_special_tokens=False))


def test_tokens_already_known_are_skipped_and_a_file_of_only_those_is_refused(tokenizer, tmp_path):
    import copy

    from utils import vocab
    from utils.errors import UserError

    path = tmp_path / "t.txt"
    path.write_text("hello\n中国\n\n中国\n", encoding="utf-8")  # a known token, a duplicate and an empty line
    plan = vocab.extend_tokenizer(copy.deepcopy(tokenizer), str(path))
    assert plan.tokens == ["中国"] and plan.skipped == ["hello"]
    path.write_text("hello\n the\n", encoding="utf-8")
    with pytest.raises(UserError, match="every token is already one token of this tokenizer"):
        vocab.extend_tokenizer(copy.deepcopy(tokenizer), str(path))


def test_a_token_file_with_a_byte_order_mark_or_crlf_lines_reads_the_same(tokenizer, tmp_path):
    from utils import vocab
    from utils.errors import UserError

    plain, marked, gbk = tmp_path / "plain.txt", tmp_path / "bom.txt", tmp_path / "gbk.txt"
    plain.write_text("北京\n上海\n", encoding="utf-8")
    marked.write_bytes("\ufeff北京\r\n上海\r\n".encode("utf-8"))
    assert vocab.read_token_file(marked) == vocab.read_token_file(plain) == ["北京", "上海"]
    gbk.write_bytes("北京\n".encode("gbk"))
    with pytest.raises(UserError, match="is not UTF-8 text; save it as UTF-8"):
        vocab.read_token_file(gbk)


def _belle_texts():
    rows = [json.loads(line) for line in (SHARED_DATA / "belle_eval" / "eval_set_dev.jsonl").read_text(
        encoding="utf-8").splitlines() if line.strip()]
    return [r["question"] + "\n" + r["std_answer"] for r in rows]


def test_auto_learns_chinese_tokens_that_save_tokens_deterministically(tokenizer):
    import copy

    from utils import vocab

    texts = _belle_texts()
    train, held_out = texts[:200], texts[200:]
    learned = vocab.learn_tokens(train, tokenizer, 64)
    assert len(learned) == 64 and learned == vocab.learn_tokens(train, tokenizer, 64)
    assert all(vocab.CJK_RUN.fullmatch(t) for t in learned)
    assert all(sum(t in x for x in train) >= vocab.MIN_ROWS for t in learned)  # seen in several rows
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) > 1 for t in learned)
    tok = copy.deepcopy(tokenizer)
    plan = vocab.extend_tokenizer(tok, "auto:64", texts=lambda: train)
    assert plan.tokens == learned
    s = vocab.measure(plan, tok, held_out)  # on text it did not learn from
    assert s["tokens_after"] < s["tokens_before"] and s["tokens_per_char_after"] < s["tokens_per_char_before"]
    assert "fewer" in vocab.describe(plan) and "tokens per Chinese character" in vocab.describe(plan)


def test_auto_without_chinese_text_is_refused(tokenizer):
    import copy

    from utils import vocab
    from utils.errors import UserError

    with pytest.raises(UserError, match="found no Chinese text"):
        vocab.extend_tokenizer(copy.deepcopy(tokenizer), "auto:8", texts=["only English here"])


# ---- the model: resize, which rows train, reload, merge -------------------------------------------------------------
def _extended(model_dir, token_file, method="lora", init="mean"):
    """(model with the method attached, tokenizer, plan, embedding + head before attaching) the way build_run does it."""
    from utils import vocab
    from utils.args import PeftArguments
    from utils.models import get_spec, load_model, load_tokenizer
    from utils.peft_methods import attach_adapter

    tok = load_tokenizer(model_dir)
    plan = vocab.extend_tokenizer(tok, str(token_file), init=init)
    model = load_model(model_dir, "float32", False, tok.pad_token_id, 4 if method == "qlora" else None)
    vocab.resize_and_init(model, plan)
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    peft_args = PeftArguments(peft_type=method, num_trainable_layers=1 if method == "freeze" else None)
    model, _ = attach_adapter(model, peft_args, get_spec("llama"), 20, False, plan)
    return model, tok, plan, emb, head


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("init", ["mean", "random"])
def test_resize_keeps_old_rows_and_initialises_new_ones(request, token_file, tied, init):
    import torch

    from utils import vocab
    from utils.models import load_model, load_tokenizer

    model_dir = _model_dir(request, tied)
    old = load_model(model_dir, "float32")
    old_emb, old_head = old.get_input_embeddings().weight, old.get_output_embeddings().weight
    tok = load_tokenizer(model_dir)
    plan = vocab.extend_tokenizer(tok, str(token_file), init=init)
    model = vocab.resize_and_init(load_model(model_dir, "float32"), plan)
    n0, n1 = plan.first_id, plan.first_id + len(TOKENS)
    assert plan.rows % vocab.PAD_MULTIPLE == 0 and plan.rows >= len(tok) and plan.old_rows == old_emb.shape[0]
    assert model.config.vocab_size == plan.rows and plan.tied is tied
    for new, ref in ((model.get_input_embeddings().weight, old_emb), (model.get_output_embeddings().weight, old_head)):
        assert new.shape[0] == plan.rows and torch.equal(new[:n0], ref)  # old rows bit for bit
        assert torch.equal(new[n1:], ref.mean(0).expand(plan.rows - n1, -1))  # padding rows: the mean row
        if init == "mean":
            for i, p in enumerate(plan.pieces):
                assert torch.allclose(new[n0 + i], ref[p].mean(0), atol=1e-7)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    again = vocab.resize_and_init(load_model(model_dir, "float32"), vocab.VocabPlan.from_meta(
        {vocab.META_KEY: plan.to_meta()}))  # inference: the same rows from the run's metadata
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(again.get_output_embeddings().weight, model.get_output_embeddings().weight)


def test_a_base_of_another_size_is_refused(tiny_llama_dir, token_file):
    from utils import vocab
    from utils.errors import UserError
    from utils.models import load_model, load_tokenizer

    plan = vocab.extend_tokenizer(load_tokenizer(tiny_llama_dir), str(token_file))
    meta = {vocab.META_KEY: dict(plan.to_meta(), old_rows=1000, rows=1024)}
    with pytest.raises(UserError, match="the base model it was trained on"):
        vocab.prepare_base(load_model(tiny_llama_dir, "float32"), meta)


def _train_steps(model, tok, steps=3):
    import torch

    batch = tok(TEXT, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # the Trainer's default decay is 0 too
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return batch


def _effective(model):
    """(embedding, LM head) weights the model computes with: the method's rows folded in."""
    import copy

    merged = copy.deepcopy(model)
    merged = merged.merge_and_unload() if hasattr(merged, "merge_and_unload") else merged
    return merged.get_input_embeddings().weight.detach(), merged.get_output_embeddings().weight.detach()


def _base_params(model):
    """Every base weight outside the embedding / LM head, by a name that does not depend on the wrapping."""
    out = {}
    for name, p in model.named_parameters():
        if any(k in name for k in ("lora_", "hada_", "lokr_", "vera_", "ia3_", "token_adapter", "modules_to_save",
                                   "embed_tokens", "lm_head")):
            continue
        out[name.replace("base_model.model.", "").replace(".base_layer", "")] = p.detach().clone()
    return out


METHODS = [("lora", True), ("lora", False), ("dora", True), ("adalora", True), ("qlora", True), ("loha", True),
           ("loha", False), ("lokr", True), ("vera", True), ("ia3", False), ("freeze", True), ("freeze", False)]


def test_every_method_that_extends_is_trained_below():
    """A new preset that can extend the vocabulary joins METHODS (full trains every row: its own tests cover it)."""
    from utils import vocab
    from utils.peft_methods import PEFT_TYPES

    extending = {name for name in PEFT_TYPES if vocab.mechanism(name) != "no"} - {"full"}
    assert extending == {method for method, _ in METHODS}


@pytest.mark.parametrize("method, tied", METHODS)
def test_only_new_rows_and_the_adapter_change(request, token_file, method, tied):
    import torch

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    model, tok, plan, emb0, head0 = _extended(_model_dir(request, tied), token_file, method)
    base0 = _base_params(model)
    _train_steps(model, tok)
    emb, head = _effective(model)
    n0, n1 = plan.first_id, plan.first_id + len(TOKENS)
    for new, ref in ((emb, emb0), (head, head0)):
        assert torch.equal(new[:n0], ref[:n0]) and torch.equal(new[n1:], ref[n1:])  # old and padding rows
        assert bool((new[n0:n1] != ref[n0:n1]).any(dim=1).all())  # every new row trained
    assert (head.data_ptr() == emb.data_ptr()) is tied or method == "qlora"
    base = _base_params(model)
    if method == "freeze":  # its last layer trains; the other weights stay
        frozen = [k for k in base if ".layers.1." not in k]
        assert frozen and all(torch.equal(base[k], base0[k]) for k in frozen)
    else:
        assert base.keys() == base0.keys() and all(torch.equal(base[k], base0[k]) for k in base)


def _logits(model, tok):
    import torch

    batch = tok(TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


RELOAD_CASES = [("lora", True), ("lora", False), ("loha", True), ("ia3", False), ("freeze", True), ("full", True)]


@pytest.fixture(scope="module")
def direct_runs(request, token_file, tmp_path_factory):
    """Each RELOAD_CASES method trained 2 steps on an extended tiny llama and saved the way finish_run saves it:
    {case: (model, tokenizer, plan, trained logits, run dir with adapter + tokenizer + meta)}."""
    from utils import vocab
    from utils.peft_methods import save_adapter

    runs = {}
    for method, tied in RELOAD_CASES:
        base_dir = _model_dir(request, tied)
        model, tok, plan, _, _ = _extended(base_dir, token_file, method)
        _train_steps(model, tok, steps=2)
        out = tmp_path_factory.mktemp(f"direct_{method}_{tied}")
        save_adapter(model, out, method)
        tok.save_pretrained(out)
        (out / "meta.json").write_text(json.dumps({vocab.META_KEY: plan.to_meta(), "base": str(base_dir)}),
                                       encoding="utf-8")
        runs[method, tied] = (model, tok, plan, _logits(model, tok), out)
    return runs


FRESH = """
import json, sys, torch
sys.path.insert(0, {root!r})
from utils import vocab
from utils.loader import load_for_inference
from utils.models import load_model, load_tokenizer
from utils.peft_methods import load_adapter
out = {{}}
for name, adapter in {direct!r}.items():  # the hooks by hand: prepare_base, load_adapter, after_adapter
    meta = json.load(open(adapter + "/meta.json"))
    tok = load_tokenizer(adapter)
    model = load_model(meta["base"], "float32", False, tok.pad_token_id)
    model = vocab.after_adapter(load_adapter(vocab.prepare_base(model, meta), adapter), meta)
    with torch.no_grad():
        out[name] = model(**tok({text!r}, return_tensors="pt", padding=True)).logits
model, tok, _, info = load_for_inference({run!r}, dtype="float32")  # what every script uses
assert info["added_tokens"] == {n_tokens}, info
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
assert layers and all(m.merged for m in layers), "inference must not rebuild the embedding every forward pass"
with torch.no_grad():
    out["loader"] = model(**tok({text!r}, return_tensors="pt", padding=True)).logits
torch.save(out, {out!r})
"""


@pytest.fixture(scope="module")
def fresh_logits(direct_runs, extended_run, tmp_path_factory):
    """The logits of every saved run (direct_runs by hand, extended_run through utils/loader.py) computed in one
    fresh Python process: nothing of the training process's state (tokenizer, ties, hooks) can leak in."""
    import torch

    path = tmp_path_factory.mktemp("fresh") / "logits.pt"
    direct = {f"{m}-{t}": str(r[4]) for (m, t), r in direct_runs.items()}
    script = FRESH.format(root=str(ROOT), direct=direct, text=TEXT, run=str(extended_run[0]), n_tokens=len(TOKENS),
                          out=str(path))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(path)


@pytest.mark.parametrize("method, tied", RELOAD_CASES)
def test_reload_in_a_fresh_process_gives_identical_logits_and_merge_equals_base_plus_adapter(
        direct_runs, fresh_logits, tmp_path, method, tied):
    import torch
    from transformers import AutoModelForCausalLM

    model, tok, plan, trained, adapter = direct_runs[method, tied]
    if method == "lora":  # only the new rows and LoRA's matrices, not the whole resized embedding
        from safetensors import safe_open

        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            assert all("lora_" in k or "token_adapter" in k for k in f.keys())
    assert torch.equal(fresh_logits[f"{method}-{tied}"], trained)
    # merge: the adapter folded into the resized base, saved and loaded by plain transformers
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert plain.config.vocab_size == plan.rows
    assert torch.allclose(_logits(plain, tok), trained, atol=1e-5, rtol=0)


def test_random_init_is_reproducible(tiny_llama_dir, token_file):
    import torch

    a = _extended(tiny_llama_dir, token_file, "lora", init="random")[3]
    b = _extended(tiny_llama_dir, token_file, "lora", init="random")[3]
    assert torch.equal(a, b)


# ---- through the scripts --------------------------------------------------------------------------------------------
def _train_cli(model_dir, data, out, *extra):
    return run_inprocess("uniform_finetune.py", "--model_name_or_path", model_dir, "--data", data, "--output_dir", out,
                         "--max_steps", 2, "--per_gpu_train_batch_size", 2, "--cutoff_len", 96,
                         "--logging_steps", 1, "--save_steps", 1000, *extra)


def test_dry_run_reports_the_savings(tiny_llama_dir, zh_rows, tmp_path):
    res = run_inprocess("uniform_finetune.py", "--model_name_or_path", tiny_llama_dir, "--data", zh_rows,
                        "--extend_vocab", "auto:32", "--dry_run", "--output_dir", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "vocab: +32 tokens learned from the training data (auto:32)" in res.stdout
    assert "fewer" in res.stdout and "tokens per Chinese character" in res.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--peft_type", "prefix", "--extend_vocab", "auto:8"], "--extend_vocab cannot be used with --peft_type prefix"),
    (["--extend_vocab", "auto:0"], "N in auto:N must be a positive whole number"),
    (["--peft_type", "loha", "--weight_decay", "0.1", "--extend_vocab", "auto:8"], "would shrink the old"),
    (["--stage", "dpo", "--extend_vocab", "auto:8"], "--extend_vocab cannot be used with --stage dpo"),
])
def test_refused_before_the_model_loads(tiny_llama_dir, small_data, tmp_path, flags, expected, monkeypatch):
    import utils.models
    import utils.train

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(utils.train, "load_model", no_load)
    monkeypatch.setattr(utils.models, "load_model", no_load)
    res = run_inprocess("uniform_finetune.py", "--model_name_or_path", tiny_llama_dir, "--data", small_data,
                        "--output_dir", tmp_path / "out", *flags)
    assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def extended_run(tiny_llama_dir, zh_rows, token_file, tmp_path_factory):
    """A 2-step LoRA run with --extend_vocab FILE and --packing on, trained in this process; (run dir, logits of the
    trained model on TEXT)."""
    from utils.args import parse_finetune_args
    from utils.train import build_run, finish_run

    out = tmp_path_factory.mktemp("extended_run") / "adapter"
    args = parse_finetune_args(["--model_name_or_path", str(tiny_llama_dir), "--data", str(zh_rows), "--output_dir",
                                str(out), "--max_steps", "2", "--per_gpu_train_batch_size", "2", "--cutoff_len", "96",
                                "--logging_steps", "1", "--save_steps", "1000", "--extend_vocab", str(token_file),
                                "--packing", "on", "--learning_rate", "0.01"])
    run = build_run(*args)
    result = run.trainer.train()
    finish_run(run, result, 1.0)
    run.model.eval()
    return out, _logits(run.model, run.tokenizer), run.meta


def test_training_records_the_extension_and_saves_the_tokenizer(extended_run):
    from utils import vocab
    from utils.models import load_tokenizer

    out, _, meta = extended_run
    saved = json.loads((out / "finetune_meta.json").read_text(encoding="utf-8"))[vocab.META_KEY]
    assert saved["tokens"] == TOKENS and saved["mechanism"] == "trainable_tokens" and saved["rows"] % 64 == 0
    assert meta["speed"]["packing"] is True
    tok = load_tokenizer(out)
    assert [tok.encode(t, add_special_tokens=False) for t in TOKENS] == [[i] for i in vocab.VocabPlan(**saved).ids]


def test_loader_in_a_fresh_process_gives_the_trained_logits(extended_run, fresh_logits):
    import torch

    assert torch.equal(fresh_logits["loader"], extended_run[1])


def test_a_run_without_its_tokens_and_an_extended_reference_are_refused(extended_run, tokenizer):
    from types import SimpleNamespace

    from utils import vocab
    from utils.errors import UserError
    from utils.train import check_ref_vocab

    out, _, meta = extended_run
    with pytest.raises(UserError, match="lacks the 8 tokens its run added with --extend_vocab"):
        vocab.check_tokenizer(tokenizer, meta, out)  # the base's tokenizer instead of the run's
    with pytest.raises(UserError, match="merge it first"):
        check_ref_vocab(SimpleNamespace(ref_adapter=str(out)))  # --stage dpo --ref_adapter RUN


def test_generate_and_merge_load_the_extended_adapter(extended_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trained, _ = extended_run
    res = run_inprocess("generate.py", "--lora_dir", out, "--prompt", "中国的首都是哪里？", "--max_new_tokens", 8)
    assert res.returncode == 0, res.stderr
    res = run_inprocess("merge.py", "--lora_dir", out, "--merged_dir", tmp_path / "merged")
    assert res.returncode == 0, res.stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.encode("北京", add_special_tokens=False) == [tok.convert_tokens_to_ids("北京")]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert torch.allclose(_logits(plain, tok), trained, atol=1e-5, rtol=0)


def test_server_gives_an_extended_adapter_its_own_base(extended_run, tiny_lora_run):
    from utils.args import parse_serve_args
    from utils.serving.engine import load_engine

    out, trained, _ = extended_run
    args = parse_serve_args(["--lora_dir", f"zh={out}", f"plain={tiny_lora_run}"])
    engine = load_engine(args[0], args[1], args[2], log=lambda *a: None)
    zh, plain = engine.entries["zh"], engine.entries["plain"]
    assert not zh.shared and plain.shared and zh.model is not plain.model
    assert zh.tokenizer.encode("北京", add_special_tokens=False) == [zh.tokenizer.convert_tokens_to_ids("北京")]
    assert zh.model.get_input_embeddings().weight.shape[0] % 64 == 0


@pytest.mark.parametrize("method", ["loha", "freeze"])
def test_other_mechanisms_train_through_the_cli(tiny_llama_dir, zh_rows, token_file, tmp_path, method):
    """modules_to_save (loha) and freeze under the Trainer's own optimizer: the saved embedding's old and padding
    rows are as initialised bit for bit, every new row trained."""
    import torch
    from safetensors.torch import load_file

    from utils import vocab
    from utils.models import load_model

    res = _train_cli(tiny_llama_dir, zh_rows, tmp_path / "out", "--peft_type", method, "--extend_vocab", token_file,
                     "--learning_rate", "0.01", *(["--num_trainable_layers", "1"] if method == "freeze" else []))
    assert res.returncode == 0, res.stderr
    plan = vocab.VocabPlan(**json.loads((tmp_path / "out" / "finetune_meta.json").read_text())[vocab.META_KEY])
    init = vocab.resize_and_init(load_model(tiny_llama_dir, "float32"), plan).get_input_embeddings().weight
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    emb = next(v for k, v in saved.items() if "embed_tokens" in k)
    n0, n1 = plan.first_id, plan.first_id + len(TOKENS)
    assert emb.shape == init.shape and torch.equal(emb[:n0], init[:n0]) and torch.equal(emb[n1:], init[n1:])
    assert bool((emb[n0:n1] != init[n0:n1]).any(dim=1).all())  # every new row trained
    res = run_inprocess("generate.py", "--lora_dir", tmp_path / "out", "--prompt", "北京", "--max_new_tokens", 4)
    assert res.returncode == 0, res.stderr


def test_ddp_two_processes_learn_the_same_tokens(tiny_llama_dir, zh_rows, tmp_path):
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(ROOT / "uniform_finetune.py"), "--model_name_or_path", str(tiny_llama_dir),
           "--data", str(zh_rows), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
           "--per_gpu_train_batch_size", "2", "--cutoff_len", "96", "--save_steps", "1000", "--extend_vocab",
           "auto:16"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "out" / "finetune_meta.json").read_text(encoding="utf-8"))
    assert meta["world_size"] == 2 and len(meta["vocab_extension"]["tokens"]) == 16


def test_a_resumed_extended_run_ends_as_the_uninterrupted_one(tiny_llama_dir, zh_rows, token_file, tmp_path):
    """--resume_from_checkpoint on an --extend_vocab run: the same tokens at the same ids, the same final tensors."""
    import shutil

    from safetensors.torch import load_file

    extra = ("--extend_vocab", token_file, "--max_steps", 4, "--save_steps", 2, "--learning_rate", "0.01")
    assert _train_cli(tiny_llama_dir, zh_rows, tmp_path / "full", *extra).returncode == 0
    (tmp_path / "cut").mkdir()  # only the step-2 checkpoint survives the "interruption"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    res = _train_cli(tiny_llama_dir, zh_rows, tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest")
    assert res.returncode == 0, res.stderr
    assert "checkpoint-2" in res.stdout
    full, cut = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("full", "cut"))
    assert sorted(full) == sorted(cut) and all(full[k].equal(cut[k]) for k in full)
    meta = [json.loads((tmp_path / d / "finetune_meta.json").read_text())["vocab_extension"] for d in ("full", "cut")]
    assert meta[0] == meta[1]
