"""Side-by-side training benchmark: our uniform_finetune path vs TRL's SFTTrainer, same work, same result.

Run by hand, not in CI (TRL comes with requirements.txt, for the preference stages):

    .venv/bin/python bench/train_throughput.py            # embedded SmolLM2-135M, real CoT data, ~15 min here
    .venv/bin/python bench/train_throughput.py --quick    # smoke run on a tiny random llama (about a minute)

Every system trains one epoch on the same rows (N samples of real, variable-length CoT data read in place from
../shared/data/cot/, tokenized once by our data layer with the same template, masking and --cutoff_len), with the
same LoRA (r=8, alpha=16, dropout 0.05 on q_proj/v_proj), optimizer (the Trainer's default AdamW), learning rate,
linear schedule, seed and effective batch. Systems:

- ours: `utils.train.build_run` + `trainer.train()` (exactly what uniform_finetune.py runs), default flags;
- trl_default: `trl.SFTTrainer` with its defaults, precision forced to fp32 (bf16=False) as TRL users on a CPU
  without bf16 get it; TRL's other defaults stay (gradient checkpointing on);
- trl_* variants (its best CPU settings, tried in round 1; the fastest is trl_best and is repeated): fp32 without
  gradient checkpointing, with plain padding, padding_free or length-grouped batches; on a CPU with native bf16
  (AVX512-BF16 / AMX) also bf16 autocast without gradient checkpointing, with plain padding, padding_free, packing
  (bfd; batch = packed rows chosen so a step holds about as many samples as the others') or length-grouped batches
  (on a CPU without it bf16 is emulated and slow, so those are left out unless --systems names them). Also
  measured, but not trl_best
  candidates: packing with 8 packed rows per step (a larger effective batch), and TRL with the fp32-under-autocast
  attention our path picks under bf16 on CPU (our code, not a TRL setting: shown to separate that gain).

Each run is its own subprocess (peak RSS = that process's ru_maxrss, from wait4); systems alternate across rounds.
Throughput = useful (non-padding) tokens of the epoch / wall time of `train()`. The held-out loss is computed
afterwards by one function for every system: same held-out rows, same labels, fp32, no autocast.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COT = ROOT.parent / "shared" / "data" / "cot"

TRL_VARIANTS = {  # name: SFTConfig overrides (on top of the common workload settings)
    "trl_default": {"bf16": False},
    "trl_fp32": {"bf16": False, "gradient_checkpointing": False},
    "trl_fp32_padding_free": {"bf16": False, "gradient_checkpointing": False, "padding_free": True, "max_length": None},
    "trl_fp32_group_by_length": {"bf16": False, "gradient_checkpointing": False,
                                 "train_sampling_strategy": "group_by_length"},
    "trl_bf16": {"bf16": True, "gradient_checkpointing": False},
    "trl_bf16_padding_free": {"bf16": True, "gradient_checkpointing": False, "padding_free": True,
                              "max_length": None},  # rows are already cut at --cutoff_len; TRL asks for None here
    "trl_bf16_packing": {"bf16": True, "gradient_checkpointing": False, "packing": True},
    "trl_bf16_packing_matched": {"bf16": True, "gradient_checkpointing": False, "packing": True},
    "trl_bf16_group_by_length": {"bf16": True, "gradient_checkpointing": False,
                                 "train_sampling_strategy": "group_by_length"},
    "trl_bf16_our_attention": {"bf16": True, "gradient_checkpointing": False},
}
# Not candidates for trl_best: packing with batch 8 *packed rows* trains ~2.3x the samples per step (fewer, larger
# steps: not the same effective batch); our attention is not a TRL setting but our choice applied to TRL.
NOT_BEST = {"trl_bf16_packing": "8 packed rows per step = a larger effective batch, fewer steps",
            "trl_bf16_our_attention": "TRL + the attention our path picks under bf16 on CPU (ours, not TRL's)"}


# ---- shared pieces -------------------------------------------------------------------------------
def load_rows(spec):
    """(tokenizer, template, train Dataset, held-out Dataset) through our data layer: the rows every system uses."""
    from utils.args import DataArguments
    from utils.models import get_spec, load_tokenizer, resolve_model
    from utils.templates import pick_template
    from utils.train import prepare_data

    path, _, model_type = resolve_model(spec["model"])
    tok = load_tokenizer(path)
    template = pick_template(None, get_spec(model_type).template, tok, "en")
    data_args = DataArguments(data=spec["data"], cutoff_len=spec["cutoff_len"], val_set_size=spec["heldout"])
    train, val, _ = prepare_data(data_args, tok, template, spec["seed"])
    return path, tok, train, val


def heldout_loss(model, rows, pad_token_id, batch_size=8):
    """Token-weighted next-token loss on the held-out rows (answer tokens only), fp32, eval mode, no autocast."""
    import torch

    from utils.train import PadCollator

    collate = PadCollator(pad_token_id)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        for i in range(0, len(rows), batch_size):
            batch = collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            assert logits.dtype == torch.float32, logits.dtype
            target = batch["labels"][:, 1:]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target[keep],
                                                       reduction="sum").item()
            count += int(keep.sum())
    return total / count


def _unwrapped(trainer):
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)  # drops the autocast wrapper


# ---- one system, in its own process ------------------------------------------------------------------
def worker(system, spec_path, out_path):
    # long: one timed training run of a candidate, its setup and measurement together
    import torch

    spec = json.loads(Path(spec_path).read_text())
    path, tok, train, val = load_rows(spec)
    tokens = sum(len(x) for x in train["input_ids"])
    out_dir = tempfile.mkdtemp(prefix=f"bench_{system}_")
    info = {}
    if system == "ours":
        from utils.args import parse_finetune_args
        from utils.train import build_run

        argv = ["--model_name_or_path", spec["model"], "--data", *spec["data"], "--val_set_size", str(spec["heldout"]),
                "--cutoff_len", str(spec["cutoff_len"]), "--per_gpu_train_batch_size", str(spec["batch"]),
                "--learning_rate", str(spec["lr"]), "--epochs", "1", "--seed", str(spec["seed"]),
                "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
                "--lora_target_modules", "q_proj", "v_proj", "--output_dir", out_dir,
                "--save_steps", "1000000", "--logging_steps", "1000000", *spec.get("ours_flags", [])]
        run = build_run(*parse_finetune_args(argv))
        assert sum(len(x) for x in run.train["input_ids"]) == tokens  # the very same rows as the other systems
        trainer = run.trainer
        info["speed"] = run.meta["speed"]["summary"]
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    else:
        from peft import LoraConfig
        from transformers import set_seed
        from trl import SFTConfig, SFTTrainer

        from utils.models import load_model

        model = load_model(path, "auto", False, tok.pad_token_id)
        if system == "trl_bf16_our_attention":
            from utils.packing import register_fp32_sdpa

            model.set_attn_implementation(register_fp32_sdpa())
        overrides = dict(TRL_VARIANTS[system])
        if system == "trl_bf16_packing_matched":  # packed rows per step ~ the samples per step of the other systems
            mean_len = tokens / len(train)
            overrides["per_device_train_batch_size"] = max(1, round(spec["batch"] * mean_len / spec["cutoff_len"]))
        overrides.setdefault("max_length", spec["cutoff_len"])
        overrides.setdefault("per_device_train_batch_size", spec["batch"])
        cfg = SFTConfig(output_dir=out_dir, learning_rate=spec["lr"],
                        num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0,
                        weight_decay=0.0, seed=spec["seed"], save_strategy="no", logging_steps=1000000, report_to=[],
                        use_cpu=True, dataloader_pin_memory=False, **overrides)
        info["settings"] = {k: getattr(cfg, k) for k in ("bf16", "gradient_checkpointing", "packing", "padding_free",
                                                         "train_sampling_strategy", "optim", "max_length",
                                                         "per_device_train_batch_size")}
        info["settings"]["attention"] = model.config._attn_implementation
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                 bias="none", task_type="CAUSAL_LM")
        set_seed(spec["seed"])
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok, peft_config=peft_config)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    info.update(system=system, tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall, steps=trainer.state.global_step,
                optim=str(trainer.args.optim), train_loss=next((h["train_loss"] for h in trainer.state.log_history
                                                                 if "train_loss" in h), None))
    info["heldout_loss"] = heldout_loss(_unwrapped(trainer), val, tok.pad_token_id)
    info["torch_threads"] = torch.get_num_threads()
    Path(out_path).write_text(json.dumps(info))


# ---- the driver ------------------------------------------------------------------------------------
def run_system(system, spec_path, tmp):
    out = Path(tmp) / f"{system}-{time.time_ns()}.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    log = open(Path(tmp) / f"{system}.log", "a")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", system, "--spec", str(spec_path), "--out", str(out)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0 or not out.is_file():
        tail = (Path(tmp) / f"{system}.log").read_text()[-3000:]
        raise SystemExit(f"{system} failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(out.read_text())
    res["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return res


def quick_model(tmp):
    """A tiny random llama with the embedded model's tokenizer, saved so the real from_pretrained path loads it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from utils.models import embedded_model_dir, load_tokenizer

    tok = load_tokenizer(embedded_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    path = Path(tmp) / "tiny_llama"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def torch_cuda():
    import torch

    return torch.cuda.is_available()


def mean(xs):
    return sum(xs) / len(xs)


def summarize(results, best_name):
    by = {}
    for r in results:
        by.setdefault(r["system"], []).append(r)
    rows = {}
    for name, rs in by.items():
        rows[name] = {"tokens_per_s": mean([r["tokens_per_s"] for r in rs]), "wall_s": mean([r["wall_s"] for r in rs]),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                      "heldout_loss": mean([r["heldout_loss"] for r in rs]),
                      "steps": rs[0]["steps"], "runs": len(rs), "tokens": rs[0]["tokens"],
                      "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs]}
    return rows


def main(argv=None):
    # long: the benchmark's candidates, alternation and report read top to bottom
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny random llama, few rows, one round")
    ap.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m-instruct)")
    ap.add_argument("--n", type=int, default=None, help="training rows (default 128; --quick 16)")
    ap.add_argument("--heldout", type=int, default=None, help="held-out rows (default 32; --quick 8)")
    ap.add_argument("--cutoff_len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="effective batch (per device, no accumulation)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2; --quick 1)")
    ap.add_argument("--systems", nargs="+", default=None,
                    help=f"subset of: ours {' '.join(TRL_VARIANTS)} (default: all)")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.spec, a.out)

    import importlib.util

    n = a.n or (16 if a.quick else 128)
    heldout = a.heldout or (8 if a.quick else 32)
    rounds = a.rounds or (1 if a.quick else 2)
    have_trl = importlib.util.find_spec("trl") is not None
    from utils.peft_methods import cpu_has_bf16

    native_bf16 = cpu_has_bf16() or torch_cuda()
    default = [s for s in TRL_VARIANTS if native_bf16 or "bf16" not in s]
    systems = a.systems or (["ours", *default] if have_trl else ["ours"])
    if not native_bf16 and not a.systems:
        print("note: no native bf16 on this CPU: TRL's bf16 settings are left out (emulated; name them with --systems)")
    if not have_trl and any(s != "ours" for s in systems):
        raise SystemExit("TRL is not installed: `.venv/bin/pip install trl` (it is not a dependency of the toolkit)")
    if not have_trl:
        print("note: TRL is not installed (`.venv/bin/pip install trl`); measuring ours only")
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    model = a.model or (quick_model(tmp) if a.quick else "smollm2-135m-instruct")
    files = [COT / "creak_train.json", COT / "ecqa_train.json"]
    if all(f.is_file() for f in files):
        data = [f"{files[0]}:{(n + heldout + 1) // 2}", f"{files[1]}:{(n + heldout) // 2}"]
    else:  # a checkout without ../shared/data: the bundled sample (still real variable-length rows, shorter)
        print(f"note: {COT} not found; using the bundled arith_sample")
        data = [f"arith_sample:{n + heldout}"]
    spec = {"model": model, "data": data, "cutoff_len": a.cutoff_len, "heldout": heldout, "batch": a.batch,
            "lr": a.lr, "seed": a.seed}
    spec_path = Path(tmp) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    import torch
    import transformers

    print(f"bench: model {model}; data {' '.join(data)}; cutoff {a.cutoff_len}; batch {a.batch}; lr {a.lr}; LoRA r=8 "
          f"q_proj/v_proj; 1 epoch; {rounds} round(s); torch {torch.__version__}, transformers "
          f"{transformers.__version__}"
          + (f", trl {__import__('trl').__version__}" if have_trl else ""))
    results = []

    def measure(name):
        start = time.time()
        r = run_system(name, spec_path, tmp)
        results.append(r)
        print(f"  round {rnd + 1}: {name:26s} {r['tokens_per_s']:7.1f} tok/s  {r['wall_s']:6.1f} s  "
              f"rss {r['peak_rss_mb']:6.0f} MB  held-out loss {r['heldout_loss']:.4f}  steps {r['steps']}  "
              f"({time.time() - start:.0f} s with start-up)", flush=True)
        return r

    trl_tried = [s for s in systems if s.startswith("trl_") and s != "trl_default" and s not in NOT_BEST]
    best = None
    for rnd in range(rounds):
        order = [s for s in systems if rnd == 0 or s in ("ours", "trl_default") or s == best]
        if rnd % 2:
            order = order[::-1]
        for name in order:
            measure(name)
        if rnd == 0 and trl_tried:
            first = {r["system"]: r for r in results}
            best = max(trl_tried, key=lambda s: first[s]["tokens_per_s"])
    rows = summarize(results, best)
    print()
    for name, r in rows.items():
        tag = " (= trl_best)" if name == best else (f" (not a trl_best candidate: {NOT_BEST[name]})" if name in NOT_BEST
                                                      else "")
        print(f"{name:26s} tokens/s {r['tokens_per_s']:7.1f}  wall {r['wall_s']:6.1f} s  peak RSS "
              f"{r['peak_rss_mb']:6.0f} MB  "
              f"held-out loss {r['heldout_loss']:.4f}  steps {r['steps']}  runs {r['runs']} "
              f"{r['all_tokens_per_s']}{tag}")
    if "ours" in rows and "trl_default" in rows:
        o, d = rows["ours"], rows["trl_default"]
        print(f"held-out loss ours/trl = {o['heldout_loss'] / d['heldout_loss']:.4f}; peak RSS ours/trl = "
              f"{o['peak_rss_mb'] / d['peak_rss_mb']:.2f}")
        if best:
            b = rows[best]
            print(f"held-out loss ours/trl_best = {o['heldout_loss'] / b['heldout_loss']:.4f}; peak RSS ours/trl_best "
                  f"= "
                  f"{o['peak_rss_mb'] / b['peak_rss_mb']:.2f}  (trl_best = {best})")
        if "trl_bf16_our_attention" in rows:
            ref = rows["trl_bf16_our_attention"]["tokens_per_s"]
            print(f"(for reference: ours/trl_bf16_our_attention = {o['tokens_per_s'] / ref:.2f})")
        print(f"train tokens/s ours/trl = {o['tokens_per_s'] / d['tokens_per_s']:.2f}")
        if best:
            print(f"ours/trl_best = {o['tokens_per_s'] / rows[best]['tokens_per_s']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"spec": spec, "results": results, "summary": rows, "trl_best": best},
                                           indent=1))
    return rows


if __name__ == "__main__":
    main()
