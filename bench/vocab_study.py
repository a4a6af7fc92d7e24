"""--extend_vocab on Chinese data: tokens per character, held-out loss per character, generation characters/s.

Run by hand, not in CI (about 15 minutes on 2 CPU cores):

    .venv/bin/python bench/vocab_study.py                      # embedded SmolLM2-135M-Instruct, 50 steps each
    .venv/bin/python bench/vocab_study.py --steps 10 --quick   # smoke run (fewer held-out rows and prompts)

Data (read in place from ../shared/data, written as alpaca JSON to --work_dir, never into the repository):
train = the 175 Chinese self-instruct seed tasks + Belle-eval questions 0-199 with their reference answers +
CMMLU dev questions (question + options -> "C. <option>") of the subjects not held out; held out = Belle-eval
200-299 and the CMMLU dev questions of every 5th subject.

Two LoRA runs through uniform_finetune.py with the same budget (the same steps, batch, learning rate and rows):
without and with `--extend_vocab auto:N`. Reported:
- tokens per Chinese character of the held-out text (its runs of Chinese encoded alone) and tokens per held-out
  example, base tokenizer vs the extended one;
- held-out loss per CHARACTER of the answers (the first 50 Belle-eval and 30 CMMLU held-out rows): the summed
  negative log-likelihood (nats) of each answer and its end-of-turn token, divided by the answer's characters - the
  same quantity whatever the tokenizer, unlike the loss per token; for the base model, both trained runs and the
  extended model before training (its new rows as initialised);
- generation speed: model.generate (greedy, KV cache: generate.py's loop) producing the first 120 characters of
  held-out Belle answers, each step forced to the reference token, so both models produce the same text:
  characters per second of wall time, prompt included; plus free greedy answers (characters/s and their share of
  Han characters).
"""
import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def _rows_from_seeds():
    rows = []
    for line in (DATA / "self_instruct" / "zh_seed_tasks.json").read_text(encoding="utf-8").splitlines():
        if line.strip():
            task = json.loads(line)
            inst = task["instances"][0]
            rows.append({"instruction": task["instruction"], "input": inst.get("input", ""), "output": inst["output"]})
    return rows


def _rows_from_belle():
    rows = [json.loads(line) for line in (DATA / "belle_eval" / "eval_set_dev.jsonl").read_text(
        encoding="utf-8").splitlines() if line.strip()]
    return [{"instruction": r["question"], "input": "", "output": r["std_answer"]} for r in rows]


def _rows_from_cmmlu(held_out):
    """CMMLU dev questions as alpaca rows; held_out=True: every 5th subject, else the others."""
    rows = []
    for i, path in enumerate(sorted((DATA / "cmmlu" / "dev").glob("*.csv"))):
        if (i % 5 == 0) != held_out:
            continue
        with path.open(encoding="utf-8") as f:
            for r in csv.DictReader(f):
                options = "\n".join(f"{k}. {r[k]}" for k in "ABCD")
                rows.append({"instruction": f"{r['Question']}\n{options}", "input": "",
                             "output": f"{r['Answer']}. {r[r['Answer']]}"})
    return rows


def build_data(work_dir):
    belle = _rows_from_belle()
    train = _rows_from_seeds() + belle[:200] + _rows_from_cmmlu(held_out=False)
    held = belle[200:] + _rows_from_cmmlu(held_out=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "zh_train.json"
    path.write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")
    return path, train, held, belle[200:]


def _messages(row, with_answer=True):
    from utils.templates import alpaca_messages

    return alpaca_messages(row["instruction"], row.get("input", ""), row["output"] if with_answer else None)


def tokens_per_char(tokenizer, texts):
    from utils import vocab

    runs = [m.group() for t in texts for m in vocab.CJK_RUN.finditer(t)]
    chars = sum(vocab.han_chars(r) for r in runs)
    run_tokens = sum(len(x) for x in tokenizer(runs, add_special_tokens=False)["input_ids"])
    all_tokens = sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return {"han_chars": chars, "tokens_per_han_char": round(run_tokens / chars, 4),
            "tokens_per_text": round(all_tokens / len(texts), 1)}


def loss_per_char(model, tokenizer, template, rows):
    """(nats per answer character, nats per answer token, answer tokens, answer characters) over rows."""
    import torch

    nll, tokens, chars = 0.0, 0, 0
    model.eval()
    for row in rows:
        ids, labels = template.encode(tokenizer, _messages(row))
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1].float()
        target = torch.tensor(labels[1:])
        keep = target != -100
        nll += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        tokens += int(keep.sum())
        chars += len(row["output"])
    return {"nats_per_char": round(nll / chars, 4), "nats_per_token": round(nll / tokens, 4),
            "answer_tokens": tokens, "answer_chars": chars}


def forced_decoding_speed(model, tokenizer, template, rows, chars):
    """Characters per second when model.generate (greedy, KV cache, one token per step: generate.py's loop)
    produces the first `chars` characters of each reference answer: a logits processor forces the reference token
    at every step, so both tokenizers produce the SAME text and only the number of steps and the prompt length
    differ. Includes the prompt's prefill."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __init__(self, ids, start):
            self.ids, self.start = ids, start

        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.ids[input_ids.shape[1] - self.start]] = 0
            return forced

    def run(row):
        prompt = template.prompt_ids(tokenizer, _messages(row, False))
        answer = tokenizer(row["output"][:chars], add_special_tokens=False)["input_ids"]
        x = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=len(answer),
                                 min_new_tokens=len(answer), do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 logits_processor=LogitsProcessorList([Force(answer, len(prompt))]))
        seconds = time.perf_counter() - start
        assert out[0, len(prompt):].tolist() == answer
        return seconds, len(answer), len(row["output"][:chars]), len(prompt)

    run(rows[0])  # warm-up
    seconds = steps = n_chars = prompt_tokens = 0
    for row in rows:
        s, n, c, p = run(row)
        seconds, steps, n_chars, prompt_tokens = seconds + s, steps + n, n_chars + c, prompt_tokens + p
    return {"chars_per_s": round(n_chars / seconds, 2), "tokens_per_s": round(steps / seconds, 2),
            "chars": n_chars, "decoding_steps": steps, "prompt_tokens": prompt_tokens, "seconds": round(seconds, 2),
            "prompts": len(rows)}


def free_generation(model, tokenizer, template, rows, max_new_tokens):
    """Greedy answers (generate.py's path): characters/s and the share of Han characters in what was produced."""
    from utils import vocab
    from utils.args import GenerationArguments
    from utils.generation import generate_reply

    gen = GenerationArguments(max_new_tokens=max_new_tokens)
    chars = han = 0
    seconds, samples = 0.0, []
    for row in rows:
        start = time.perf_counter()
        text = generate_reply(model, tokenizer, template, _messages(row, False), gen)
        seconds += time.perf_counter() - start
        chars, han = chars + len(text), han + vocab.han_chars(text)
        samples.append(text[:60])
    return {"chars_per_s": round(chars / seconds, 2), "han_share": round(han / max(chars, 1), 3),
            "seconds": round(seconds, 2), "prompts": len(rows), "first_answers": samples[:3]}


def step_cost(rows, meta, base_tok, ext_tok, template, reps, cutoff_len):
    """Seconds of one forward + backward (the training step without the optimizer) of the same rows: plain LoRA vs
    LoRA + the run's trainable tokens, interleaved rep by rep (slow drifts of a shared machine hit both alike);
    bf16 autocast and logits only at trained positions where uniform_finetune.py uses them on this CPU."""
    import contextlib
    import statistics

    import torch

    from utils import packing, vocab
    from utils.args import PeftArguments
    from utils.models import embedded_model_dir, get_spec, load_model
    from utils.peft_methods import attach_adapter, cpu_has_bf16
    from utils.train import PadCollator

    setups = {}
    for name, tok in (("plain", base_tok), ("extended", ext_tok)):
        model = load_model(embedded_model_dir(), "float32", False, tok.pad_token_id)
        plan = vocab.VocabPlan.from_meta(meta) if name == "extended" else None
        if plan is not None:
            vocab.resize_and_init(model, plan)
        model, _ = attach_adapter(model, PeftArguments(), get_spec("llama"), vocab_plan=plan)
        encoded = [template.encode(tok, _messages(r)) for r in rows]
        batch = PadCollator(tok.pad_token_id)([{"input_ids": i[:cutoff_len], "labels": la[:cutoff_len]}
                                               for i, la in encoded])
        setups[name] = (model.train(), batch)
    bf16 = cpu_has_bf16()
    times = {name: [] for name in setups}
    for _ in range(reps + 1):  # the first rep warms up
        for name, (model, batch) in setups.items():
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            start = time.perf_counter()
            with ctx:
                loss = packing.selective_loss(model, batch)[0]
            loss.backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    out = {}
    for name, (_, batch) in setups.items():
        median = statistics.median(times[name][1:])
        out[name] = {"s_per_step": round(median, 3), "tokens": int(batch["attention_mask"].sum()), "bf16": bf16}
    out["extended_over_plain"] = round(out["extended"]["s_per_step"] / out["plain"]["s_per_step"], 3)
    return out


def train(data, out, args, extra=()):
    from utils.args import parse_finetune_args
    from utils.train import run_finetune

    flags = ["--data", str(data), "--output_dir", str(out), "--max_steps", str(args.steps),
             "--per_gpu_train_batch_size", str(args.batch), "--cutoff_len", str(args.cutoff_len), "--learning_rate",
             str(args.lr), "--warmup_steps", "5", "--logging_steps", "10", "--save_steps", "100000", "--seed", "42",
             *extra]
    start = time.time()
    run_finetune(*parse_finetune_args(flags))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"train_s": round(time.time() - start, 1), "tokens_seen": metrics["tokens_seen"],
            "first_logged_loss": metrics["first_logged_loss"], "last_logged_loss": metrics["last_logged_loss"]}


def machine():
    info = {"python": platform.python_version()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
        info["bf16_flags"] = sorted({f for f in ("avx512_bf16", "amx_bf16") if f in cpu})
    except (OSError, StopIteration):
        pass
    info["cores"] = os.cpu_count()
    info["load_average"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return info


def main(argv=None):
    # long: the study's steps (data, two runs, tokens, loss, speed, report) read top to bottom
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps of each run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cutoff_len", type=int, default=384)
    ap.add_argument("--extend", default="auto:1000", help="--extend_vocab value of the extended run")
    ap.add_argument("--gen_prompts", type=int, default=6, help="held-out Belle questions answered for speed")
    ap.add_argument("--gen_chars", type=int, default=120, help="characters of each reference answer decoded")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="free generation (greedy) length")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training and the loss")
    ap.add_argument("--gen_threads", type=int, default=1, help="torch threads while generating (one step of a "
                    "small model is faster on 1 thread of a loaded machine)")
    ap.add_argument("--work_dir", default="/tmp/vocab_study")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--loss_rows", type=int, nargs=2, default=[50, 30], metavar=("BELLE", "CMMLU"),
                    help="held-out rows scored for the loss: the first BELLE Belle-eval and CMMLU rows")
    ap.add_argument("--quick", action="store_true", help="10 + 10 held-out rows for the loss, 2 prompts")
    ap.add_argument("--step_reps", type=int, default=6, help="interleaved forward+backward timings per model")
    ap.add_argument("--reuse", action="store_true", help="keep the finished runs in --work_dir, train the others "
                    "(e.g. a copy of the plain run next to a new --extend)")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from utils import vocab
    from utils.loader import load_for_inference, open_run
    from utils.models import embedded_model_dir, load_model, load_tokenizer

    work = Path(a.work_dir)
    data, train_rows, held, belle_held = build_data(work)
    if a.quick:
        a.loss_rows, a.gen_prompts = [10, 10], 2
    n_belle = len(belle_held)
    loss_rows = belle_held[:a.loss_rows[0]] + held[n_belle:n_belle + a.loss_rows[1]]
    result = {"machine": machine(), "settings": {k: v for k, v in vars(a).items() if k != "json"},
              "rows": {"train": len(train_rows), "held_out": len(held), "loss_rows": len(loss_rows)}}
    print(f"data: {len(train_rows)} training rows, {len(held)} held out; {result['machine']}")

    runs = {"plain": work / "plain", "extended": work / "extended"}
    clock = time.time()
    result["train"] = {}
    for name, extra in (("plain", ()), ("extended", ("--extend_vocab", a.extend))):
        if a.reuse and (runs[name] / "metrics.json").is_file():
            continue
        shutil.rmtree(runs[name], ignore_errors=True)
        result["train"][name] = train(data, runs[name], a, extra)
    print(f"[trained in {time.time() - clock:.0f} s]", flush=True)
    meta = json.loads((runs["extended"] / "finetune_meta.json").read_text(encoding="utf-8"))
    plan = vocab.VocabPlan.from_meta(meta)
    result["vocab"] = {"added": len(plan.tokens), "rows": plan.rows, "mechanism": plan.mechanism,
                       "first_tokens": plan.tokens[:20], "training_savings": plan.savings}

    base_tok = load_tokenizer(embedded_model_dir())
    ext_tok = load_tokenizer(runs["extended"])
    texts = [r["instruction"] + "\n" + r["output"] for r in held]
    result["tokens"] = {"base": tokens_per_char(base_tok, texts), "extended": tokens_per_char(ext_tok, texts)}

    template = open_run(runs["plain"]).template
    losses = {}
    base = load_model(embedded_model_dir(), "float32", False, base_tok.pad_token_id)
    losses["base model"] = loss_per_char(base, base_tok, template, loss_rows)
    init = vocab.prepare_base(load_model(embedded_model_dir(), "float32", False, ext_tok.pad_token_id), meta)
    losses["extended, before training"] = loss_per_char(init, ext_tok, template, loss_rows)
    del base, init
    speed, free = {}, {}
    gen_rows = [r for r in belle_held if len(r["output"]) >= a.gen_chars and vocab.han_chars(r["output"][:a.gen_chars])
                > a.gen_chars // 2][:a.gen_prompts]  # answers mostly in Chinese, long enough
    for name, path in runs.items():
        model, tok, tmpl, _ = load_for_inference(str(path), dtype="float32")
        torch.set_num_threads(a.threads)
        losses[f"{name} LoRA, {a.steps} steps"] = loss_per_char(model, tok, tmpl, loss_rows)
        print(f"[{name}: loss done at {time.time() - clock:.0f} s]", flush=True)
        torch.set_num_threads(a.gen_threads)
        speed[name] = forced_decoding_speed(model, tok, tmpl, gen_rows, a.gen_chars)
        free[name] = free_generation(model, tok, tmpl, gen_rows, a.max_new_tokens)
        print(f"[{name}: generation done at {time.time() - clock:.0f} s]", flush=True)
        del model
    result["held_out_loss"], result["generation"], result["free_generation"] = losses, speed, free
    torch.set_num_threads(a.threads)
    result["step_cost"] = step_cost(train_rows[175:179], meta, base_tok, ext_tok, template, a.step_reps, a.cutoff_len)
    print(f"[step cost done at {time.time() - clock:.0f} s]", flush=True)
    result["machine"]["load_average_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    print(json.dumps(result, ensure_ascii=False, indent=1))
    t, g = result["tokens"], result["generation"]
    print("\n| | base tokenizer | extended (+%d tokens) |" % len(plan.tokens))
    print("|---|---|---|")
    print(f"| tokens per Chinese character (held out) | {t['base']['tokens_per_han_char']} | "
          f"{t['extended']['tokens_per_han_char']} |")
    print(f"| tokens per held-out example | {t['base']['tokens_per_text']} | {t['extended']['tokens_per_text']} |")
    print(f"| generation characters/s (the same {a.gen_chars}-character answers) | {g['plain']['chars_per_s']} | "
          f"{g['extended']['chars_per_s']} |")
    print(f"| decoding steps for them | {g['plain']['decoding_steps']} | {g['extended']['decoding_steps']} |")
    print(f"| generation tokens/s | {g['plain']['tokens_per_s']} | {g['extended']['tokens_per_s']} |")
    c = result["step_cost"]
    print(f"| training forward+backward, the same 4 rows (s) | {c['plain']['s_per_step']} | "
          f"{c['extended']['s_per_step']} |")
    print(f"| tokens of those rows | {c['plain']['tokens']} | {c['extended']['tokens']} |")
    print("\n| model | held-out nats per character | nats per token | answer tokens |")
    print("|---|---|---|---|")
    for name, v in losses.items():
        print(f"| {name} | {v['nats_per_char']} | {v['nats_per_token']} | {v['answer_tokens']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
