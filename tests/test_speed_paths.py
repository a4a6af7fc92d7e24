"""Fast training paths: packing keeps samples apart (loss, logits, no cross-attention), the packed run equals the
padded run, length grouping where packing is unavailable, the bf16 decision (the benchmarks' smoke runs:
tests/test_bench_smoke.py)."""
import os

import pytest

from utils.errors import UserError


def _rows(tokenizer, n=6, source="arith_sample"):
    from utils.data import load_conversations
    from utils.templates import get_template

    template = get_template("chat", tokenizer)
    convs, _ = load_conversations([f"{source}:{n}"], seed=3)
    rows = []
    for msgs in convs:
        ids, labels = template.encode(tokenizer, msgs)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)  # fp32
    model.eval()
    return model


def _logits(model, **batch):
    import torch

    batch = {k: v for k, v in batch.items() if k != "row_tokens"}
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def _spans(batch):
    """(row, start, length) of every real sample in the packed batch, from the restarting position ids."""
    spans = []
    for r in range(batch["position_ids"].shape[0]):
        pos = batch["position_ids"][r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        spans += [(r, s, e - s) for s, e in zip(starts, starts[1:]) if batch["labels"][r, s:e].ne(-100).any()]
    return spans


@pytest.fixture(scope="module", params=["tiny", "embedded"])
def packed_case(request, tiny_llama_dir, embedded_dir, tokenizer):
    """One packed batch of real variable-length samples, run packed and each sample alone (fp32, eval mode)."""
    import torch

    from utils.packing import PackingCollator, selective_loss

    model = _model(tiny_llama_dir if request.param == "tiny" else embedded_dir)
    rows = _rows(tokenizer, n=5)
    batch = PackingCollator(tokenizer.pad_token_id, 256)(rows)
    assert batch["input_ids"].shape[0] < len(rows)  # samples really share rows
    spans = _spans(batch)
    assert sorted(n for _, _, n in spans) == sorted(len(x["input_ids"]) for x in rows)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "row_tokens"}, use_cache=False)
        alone, total, count = [], 0.0, 0
        for r, s, n in spans:
            ids, labels = batch["input_ids"][r, s:s + n][None], batch["labels"][r, s:s + n][None]
            res = model(input_ids=ids, labels=labels)
            k = int(labels[:, 1:].ne(-100).sum())  # the targets the Trainer's num_items_in_batch counts
            alone.append(res.logits[0])
            total += res.loss.item() * k
            count += k
        selective = selective_loss(model, batch)[0].item()
    return {"model": model, "batch": batch, "spans": spans, "packed_loss": out.loss.item(), "logits": out.logits,
            "alone": alone, "weighted_mean": total / count, "selective": selective}


def test_packed_loss_equals_token_weighted_mean_of_unpacked(packed_case):
    assert packed_case["packed_loss"] == pytest.approx(packed_case["weighted_mean"], abs=1e-4)
    assert packed_case["selective"] == pytest.approx(packed_case["weighted_mean"], abs=1e-4)


def test_packed_logits_equal_each_sample_alone(packed_case):
    import torch

    for (r, s, n), alone in zip(packed_case["spans"], packed_case["alone"]):
        assert torch.allclose(packed_case["logits"][r, s:s + n], alone, atol=1e-4 * alone.abs().max().item())


def test_changing_one_packed_sample_leaves_the_others_alone(packed_case):
    import torch

    batch, spans, before = packed_case["batch"], packed_case["spans"], packed_case["logits"]
    r0, s0, n0 = next(sp for sp in spans if sum(r == sp[0] for r, _, _ in spans) > 1)  # first sample of a shared row
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][r0, s0 + 1:s0 + n0] = torch.randint(100, 1000, (n0 - 1,), generator=torch.Generator().manual_seed(0))
    after = _logits(packed_case["model"], **changed)
    assert not torch.allclose(after[r0, s0 + 1:s0 + n0], before[r0, s0 + 1:s0 + n0])
    for r, s, n in spans:
        if (r, s) == (r0, s0):
            continue
        assert torch.allclose(after[r, s:s + n], before[r, s:s + n], atol=1e-5 * before.abs().max().item()), (r, s, n)


def test_packing_check_refuses_models_that_leak(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, BloomConfig

    import utils.packing as packing

    assert packing.check_packing(_model(tiny_llama_dir))[0]
    torch.manual_seed(0)
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=500, hidden_size=32, n_layer=2, n_head=4))
    ok, why = packing.check_packing(bloom)  # ALiBi + its own mask from attention_mask: samples would see each other
    assert not ok and "changes" in why


def test_pack_rows_layout():
    from utils.packing import pack_rows

    lengths = [200, 60, 80, 120, 90, 100, 150, 70]
    rows = pack_rows(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    width = max(sum(lengths[i] for i in r) for r in rows)
    assert len(rows) * width < len(lengths) * max(lengths)  # less padding than padding to the longest
    assert pack_rows(lengths, 256) == rows  # deterministic
    assert pack_rows([50] * 4, 256, attn_coef=1e-3) == [[0], [1], [2], [3]]  # equal lengths: packing buys nothing
    assert pack_rows([300, 10], 256) == [[0], [1]]  # a sample longer than the row limit keeps a row of its own


def _build(model_dir, data, out, *extra):
    from utils.args import parse_finetune_args
    from utils.train import build_run

    return build_run(*parse_finetune_args([
        "--model_name_or_path", str(model_dir), "--data", data, "--output_dir", str(out), "--cutoff_len", "256",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "1000", *extra]))


def test_packed_run_equals_padded_run_and_counts_the_same_tokens(tiny_llama_dir, tmp_path, capsys):
    def train(packing):
        run = _build(tiny_llama_dir, "arith_sample:12", tmp_path / packing, "--packing", packing, "--bf16", "off",
                     "--per_gpu_train_batch_size", "4", "--epochs", "1", "--lora_dropout", "0")  # dropout masks follow shapes
        assert run.meta["speed"]["packing"] == (packing == "on")
        run.trainer.train()
        hist = run.trainer.state.log_history
        return ([h["loss"] for h in hist if "loss" in h], [h["grad_norm"] for h in hist if "grad_norm" in h],
                run.trainer.state.num_input_tokens_seen, run.trainer.state.global_step, sum(len(x) for x in run.train["input_ids"]))

    on, off = train("on"), train("off")
    assert on[0] == pytest.approx(off[0], abs=1e-4) and len(on[0]) == 3
    assert on[1] == pytest.approx(off[1], rel=1e-4)
    assert on[2] == off[2] == on[4]  # non-padding tokens: the packed rows' counts = the attention masks' sums
    assert on[3] == off[3] == 3 and "3 optimizer steps" in capsys.readouterr().out  # steps/epoch unchanged by packing


def test_length_grouping_where_packing_is_unavailable(tiny_llama_dir, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, BloomConfig

    path = tmp_path / "bloom"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4,
                                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    run = _build(path, "arith_sample:64", tmp_path / "o", "--bf16", "off", "--per_gpu_train_batch_size", "4",
                 "--max_steps", "1")
    speed = run.meta["speed"]
    assert not speed["packing"] and speed["group_by_length"] and "length-grouped" in speed["summary"]
    assert run.train["length"] == [len(x) for x in run.train["input_ids"]]  # precomputed once, not per step
    lengths = [n for b in run.trainer.get_train_dataloader() for n in b["attention_mask"].sum(1).tolist()]
    assert sorted(lengths) == sorted(run.train["length"])
    # HF's sampler: shuffled mega-batches of 4 batches (64 rows here), each sorted longest first
    for i in range(0, 64, 16):
        mega = lengths[i + (1 if i == 0 else 0):i + 16]  # the overall longest row is swapped to the very front
        assert mega == sorted(mega, reverse=True)
    with pytest.raises(UserError, match="does not keep packed samples apart"):
        _build(path, "arith_sample:16", tmp_path / "p", "--packing", "on", "--max_steps", "1")


def test_packing_refused_for_prompt_learning(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match="--packing on cannot be used with --peft_type prefix"):
        _build(tiny_llama_dir, "arith_sample:8", tmp_path / "o", "--packing", "on", "--peft_type", "prefix")
    run = _build(tiny_llama_dir, "arith_sample:8", tmp_path / "p", "--peft_type", "prompt", "--bf16", "off")
    assert not run.meta["speed"]["packing"] and not run.meta["speed"]["selective_loss"]
    run = _build(tiny_llama_dir, "arith_sample:8", tmp_path / "a", "--peft_type", "adalora", "--bf16", "off")
    assert run.meta["speed"]["packing"] and not run.meta["speed"]["selective_loss"]  # its loss has a penalty term


def test_bf16_decision():
    from utils.train import decide_bf16

    assert decide_bf16("auto", cpu_bf16=True)[0] is True
    assert decide_bf16("on", cpu_bf16=True)[0] is True
    assert decide_bf16("off", cpu_bf16=True) == (False, "--bf16 off")
    assert decide_bf16("auto", cpu_bf16=False) == (False, "this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
    with pytest.raises(UserError, match="no native bfloat16"):
        decide_bf16("on", cpu_bf16=False)
    assert decide_bf16("auto", cpu_bf16=True, weights_dtype="bfloat16")[0] is False
    assert decide_bf16("auto", cpu_bf16=True, quantized=True)[0] is False
    assert decide_bf16("auto", cuda=True, cpu_bf16=True)[0] is False  # GPUs get half-precision weights instead
    with pytest.raises(UserError):
        decide_bf16("on", cpu_bf16=True, quantized=True)


def test_bf16_auto_falls_back_when_the_loss_moves(tiny_llama_dir, tmp_path, monkeypatch):
    import utils.packing as packing
    import utils.peft_methods as peft_methods

    monkeypatch.setattr(peft_methods, "cpu_has_bf16", lambda: True)
    run = _build(tiny_llama_dir, "arith_sample:8", tmp_path / "a", "--max_steps", "1")
    assert run.meta["speed"]["bf16"] and run.trainer.args.bf16  # within tolerance on the first batch
    assert run.meta["speed"]["bf16_check"]["relative_gap"] <= 0.02
    monkeypatch.setattr(packing, "batch_loss", lambda model, batch, bf16=False: 1.05 if bf16 else 1.0)
    run = _build(tiny_llama_dir, "arith_sample:8", tmp_path / "b", "--max_steps", "1")
    assert not run.meta["speed"]["bf16"] and not run.trainer.args.bf16 and "5.0% apart" in run.meta["speed"]["summary"]
    run = _build(tiny_llama_dir, "arith_sample:8", tmp_path / "c", "--max_steps", "1", "--bf16", "on")
    assert run.trainer.args.bf16  # `on` is not second-guessed


@pytest.mark.skipif(os.environ.get("SKIP_BENCH_QUICK") == "1", reason="SKIP_BENCH_QUICK=1")
def test_micro_batch_decision():
    from utils.train import decide_micro_batch

    assert [decide_micro_batch("auto", b)[0] for b in (1, 4, 5, 8, 10, 12, 16)] == [1, 4, 5, 4, 5, 3, 4]
    assert decide_micro_batch("auto", 8, cuda=True)[0] == 8  # GPUs run the whole batch per pass
    assert decide_micro_batch("2", 8)[0] == 2 and decide_micro_batch("8", 8)[0] == 8
    for bad in ("3", "0", "16", "four"):
        with pytest.raises(UserError, match=f"--micro_batch_size {bad} must be auto or a positive divisor of "
                                            r"--per_gpu_train_batch_size 8; use auto or one of 1, 2, 4, 8"):
            decide_micro_batch(bad, 8)


def test_micro_batches_give_the_whole_batch_step(tiny_llama_dir, tmp_path):
    """Passes of 4 or 2 samples with summed gradients = one pass of 8: same losses, gradient norms, token counts."""
    def train(micro):
        run = _build(tiny_llama_dir, "arith_sample:24", tmp_path / micro, "--micro_batch_size", micro, "--bf16", "off",
                     "--per_gpu_train_batch_size", "8", "--epochs", "1", "--lora_dropout", "0")
        run.trainer.train()
        hist, args = run.trainer.state.log_history, run.trainer.args
        return ([h["loss"] for h in hist if "loss" in h], [h["grad_norm"] for h in hist if "grad_norm" in h],
                run.trainer.state.num_input_tokens_seen, run.trainer.state.global_step,
                (args.per_device_train_batch_size, args.gradient_accumulation_steps), run.meta["speed"]["summary"])

    whole, auto, two = train("8"), train("auto"), train("2")
    assert whole[4] == (8, 1) and auto[4] == (4, 2) and two[4] == (2, 4)
    assert "runs as passes of 4 samples" in auto[5] and "passes of" not in whole[5]
    for run in (auto, two):
        assert run[0] == pytest.approx(whole[0], abs=1e-5) and len(run[0]) == 3
        assert run[1] == pytest.approx(whole[1], rel=1e-4)
        assert run[2:4] == whole[2:4]


def test_fp32_attention_under_autocast_matches_fp32_sdpa_and_keeps_packed_samples_apart(tiny_llama_dir, tokenizer):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from utils.packing import FP32_SDPA, PackingCollator, _sdpa_fp32, register_fp32_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g) for h in (4, 2, 2))  # grouped-query heads
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, False
    ref = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _sdpa_fp32(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.25)[0]
    assert out.dtype == torch.float32
    assert torch.allclose(out, sdpa_attention_forward(module, q.bfloat16().float(), k.bfloat16().float(),
                                                      v.bfloat16().float(), None, scaling=0.25)[0], atol=1e-6)
    assert torch.allclose(out, ref, atol=0.05)  # only the bf16 rounding of q, k, v differs from fp32 sdpa

    model = _model(tiny_llama_dir)
    model.set_attn_implementation(register_fp32_sdpa())
    assert model.config._attn_implementation == FP32_SDPA
    batch = PackingCollator(tokenizer.pad_token_id, 256)(_rows(tokenizer, n=5))
    spans = _spans(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = _logits(model, **batch)
        for r, s, n in spans:
            alone = _logits(model, input_ids=batch["input_ids"][r, s:s + n][None])[0]
            assert torch.allclose(packed[r, s:s + n].float(), alone.float(), atol=0.05 * alone.abs().max().item())
        r0, s0, n0 = next(sp for sp in spans if sum(r == sp[0] for r, _, _ in spans) > 1)
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][r0, s0 + 1:s0 + n0] = torch.randint(100, 1000, (n0 - 1,), generator=g)
        after = _logits(model, **changed)
    assert not torch.allclose(after[r0, s0 + 1:s0 + n0], packed[r0, s0 + 1:s0 + n0])
    for r, s, n in spans:
        if (r, s) != (r0, s0):  # no other sample sees the change
            assert torch.allclose(after[r, s:s + n], packed[r, s:s + n], atol=1e-5 * packed.abs().max().item())
