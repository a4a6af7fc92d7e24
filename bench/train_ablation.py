"""What each fast path of the training step gives: one process, the same batches, configurations interleaved.

Run by hand, not in CI:

    .venv/bin/python bench/train_ablation.py             # embedded SmolLM2-135M, real CoT rows, 8 reps (~5 min)
    .venv/bin/python bench/train_ablation.py --reps 2    # shorter
    .venv/bin/python bench/train_ablation.py --compile   # + our path with torch.compile'd decoder layers

The model, LoRA (r=8, alpha 16, dropout 0.05 on q_proj/v_proj) and rows are built exactly as uniform_finetune.py
builds them (utils.train.build_run); then each configuration runs forward + backward of the same 8-sample batches,
one configuration after another within every rep (so slow drifts of the machine hit all of them alike). The
optimizer step is left out (the same tiny LoRA update for all). Reported: median seconds per 8-sample step and
useful (non-padding) tokens per second, relative to our default path.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COT = ROOT.parent / "shared" / "data" / "cot"

PER_SAMPLE = "per_sample_causal"  # the attention experiment below, registered only by this bench
# name: (packing, logits only at trained positions, bf16 autocast, attention while training, samples per pass)
BF16_CONFIGS = {
    "ours (default)": (True, True, True, "fp32_sdpa", 4),
    "whole batch per pass": (True, True, True, "fp32_sdpa", 8),
    "sdpa in bf16": (True, True, True, "sdpa", 4),
    "eager attention": (True, True, True, "eager", 4),
    "no packing (padded)": (False, True, True, "fp32_sdpa", 4),
    "full logits": (True, False, True, "fp32_sdpa", 4),
    "fp32 (no autocast)": (True, True, False, "sdpa", 4),
    "none of them": (False, False, False, "sdpa", 8),
}
# On a CPU without native bf16 (AVX512-BF16 / AMX) ours trains in fp32: autocast would be emulated, so the bf16
# rows are not measured there (they are printed as skipped).
FP32_CONFIGS = {
    "ours (default)": (True, True, False, "sdpa", 4),
    "whole batch per pass": (True, True, False, "sdpa", 8),
    "passes of 2": (True, True, False, "sdpa", 2),
    "sdpa in bf16": None,
    "eager attention": (True, True, False, "eager", 4),
    "per-sample attention": (True, True, False, PER_SAMPLE, 4),
    "no packing (padded)": (False, True, False, "sdpa", 4),
    "full logits": (True, False, False, "sdpa", 4),
    "fp32 (no autocast)": None,
    "none of them": (False, False, False, "sdpa", 8),
}
COMPILED = "torch.compile'd layers"


def per_sample_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Packed rows without a mask: one causal sdpa call per packed sample (positions restart at 0 where a sample
    starts), so the kernel skips the key blocks after each query block instead of masking a whole row x row square."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    pos = kwargs["position_ids"]
    rows = []
    for b in range(query.shape[0]):
        starts = (pos[b] == 0).nonzero().flatten().tolist() + [query.shape[2]]
        rows.append(torch.cat([sdpa(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                    dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=True)
                               for s, e in zip(starts, starts[1:]) if e > s], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def build_workload(n, model=None, extra=()):
    """(run, data specs): the ablation's workload built as uniform_finetune.py builds it (utils.train.build_run)."""
    from utils.args import parse_finetune_args
    from utils.train import build_run

    files = [COT / "creak_train.json", COT / "ecqa_train.json"]
    data = [f"{f}:{n // 2}" for f in files] if all(f.is_file() for f in files) else [f"arith_sample:{n}"]
    return build_run(*parse_finetune_args([
        "--data", *data, "--cutoff_len", "256", "--per_gpu_train_batch_size", "8", "--lora_r", "8", "--lora_alpha",
        "16", "--lora_dropout", "0.05", "--lora_target_modules", "q_proj", "v_proj", "--output_dir", tempfile.mkdtemp(),
        *(["--model_name_or_path", model] if model else []), *extra])), data


def attention_agreement(hf, batch, names):
    """(max abs difference, max abs value) of the logits of one packed batch under two attention implementations."""
    import torch

    logits = []
    hf.eval()
    with torch.no_grad():
        for name in names:
            hf.set_attn_implementation(name)
            logits.append(hf(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits)
    hf.train()
    return (logits[0] - logits[1]).abs().max().item(), logits[0].abs().max().item()


def register_per_sample():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PER_SAMPLE, per_sample_attention)
    AttentionMaskInterface.register(PER_SAMPLE, lambda *args, **kwargs: None)  # no mask: the calls are per sample
    return PER_SAMPLE


def main(argv=None):
    # long: the ablation's variants and their report read top to bottom
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=8, help="batches per configuration")
    ap.add_argument("--n", type=int, default=64, help="rows to draw the batches from")
    ap.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m-instruct)")
    ap.add_argument("--quick", action="store_true", help="smoke run on a tiny random llama")
    ap.add_argument("--compile", action="store_true",
                    help="add our path with every decoder layer under torch.compile (dynamic shapes); its compile "
                         "time is printed apart")
    a = ap.parse_args(argv)

    import torch

    from utils import packing
    from utils.peft_methods import cpu_has_bf16
    from utils.train import PadCollator

    if a.quick and not a.model:
        from train_throughput import quick_model

        a.model = str(quick_model(tempfile.mkdtemp()))
    configs = dict(BF16_CONFIGS if cpu_has_bf16() else FP32_CONFIGS)
    if a.compile:
        configs[COMPILED] = configs["ours (default)"]

    run, data = build_workload(a.n, a.model)
    model, rows, pad = run.trainer.model, run.train, run.tokenizer.pad_token_id
    hf = model.get_base_model()
    attention = {"fp32_sdpa": packing.register_fp32_sdpa(), "sdpa": "sdpa", "eager": "eager",
                 PER_SAMPLE: register_per_sample()}
    pack = packing.PackingCollator(pad, 256, packing.attention_cost_per_position(hf.config))
    padded = PadCollator(pad)
    model.train()

    layers = hf.model.layers

    def step(samples, cfg, compiled=False):
        packed, selective, bf16, attn, micro = cfg
        for layer in layers:  # nn.Module.compile() sets _compiled_call_impl; None is the eager call again
            layer._compiled_call_impl = compiled_calls[layer] if compiled else None
        hf.set_attn_implementation(attention[attn])
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        trained = sum(sum(t != -100 for t in s["labels"][1:]) for s in samples)
        t0 = time.perf_counter()
        for i in range(0, len(samples), micro):
            batch = (pack if packed else padded)(samples[i:i + micro])
            batch.pop(packing.ROW_TOKENS, None)
            with ctx:
                if selective:
                    loss = packing.selective_loss(model, batch, trained)[0]
                else:
                    out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
                    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
                    loss = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1),
                                                             reduction="sum") / trained
            loss.backward()
        seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return seconds

    names = [n for n, cfg in configs.items() if cfg is not None]
    times = {n: [] for n in names}
    useful = []
    print(f"bench: {len(rows)} rows of {' '.join(data)}; batches of 8; {a.reps} reps; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}", flush=True)
    step([rows[i] for i in range(8)], configs[names[0]])  # warm-up
    diff, size = attention_agreement(hf, pack([rows[i] for i in range(8)]), ["sdpa", attention[PER_SAMPLE]])
    print(f"per-sample causal attention vs sdpa with the packed mask: logits max abs diff {diff:.1e} (logits up to "
          f"{size:.1f})", flush=True)
    compiled_calls = {}
    if a.compile:
        for layer in layers:
            layer.compile(dynamic=True)
            compiled_calls[layer] = layer._compiled_call_impl
        t0 = time.perf_counter()
        step([rows[i] for i in range(8)], configs[COMPILED], compiled=True)
        print(f"{COMPILED}: the first step (compiling) took {time.perf_counter() - t0:.1f} s", flush=True)
    for rep in range(a.reps):
        start = (rep * 8) % max(len(rows) - 8, 1)
        samples = [rows[i] for i in range(start, start + 8)]
        useful.append(sum(len(s["input_ids"]) for s in samples))
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        for name in order:
            times[name].append(step(samples, configs[name], compiled=name == COMPILED))
    hf.set_attn_implementation("sdpa")
    tokens = sum(useful)
    base = tokens / sum(times[names[0]])
    print(f"{'configuration':24s} {'median s/step':>13s} {'tokens/s':>9s} {'vs ours':>8s}")
    for name in configs:
        if name not in times:
            print(f"{name:24s} skipped: this CPU has no native bf16 (AVX512-BF16 / AMX)")
            continue
        tps = tokens / sum(times[name])
        print(f"{name:24s} {statistics.median(times[name]):13.3f} {tps:9.1f} {tps / base:8.2f}")


if __name__ == "__main__":
    main()
