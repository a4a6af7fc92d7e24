"""pairwise: two systems answer the same prompts; an LLM judge compares the answers in both orders.

    python evaluate.py --task pairwise --data ../shared/data/belle_eval/eval_set_dev.jsonl --limit 20 \
        --lora_dir saved_models/demo --judge_base_url http://127.0.0.1:8000/v1 --judge_model judge

System A is the evaluated model (--lora_dir, or the base model). System B is, by the first that applies:
--pairwise_reference FILE (outputs matched to the prompts by prompt text, e.g. an AlpacaEval outputs file),
--pairwise_lora_dir DIR (a second adapter, generated like A), --pairwise_base (A's base model without its adapter),
else the answers that the --data rows carry (Belle-eval's std_answer, an Alpaca output, ...; rows without one are
skipped and counted). A prompt that --pairwise_reference does not answer is an error.

Position bias: every prompt is judged twice, A's answer shown first and then B's answer shown first. Each order
gives A a score of 1 (A better), 0.5 (tie) or 0 (B better); the prompt's preference is the mean of the two. The
win rate is the mean preference over prompts (ties count half, as in AlpacaEval); a prompt is a win when its
preference is above 0.5, a loss below, a tie at 0.5, so a judge that always prefers the first answer shown yields
ties, not wins. A prompt with an unparsable verdict in either order is left out of the rates (and counted).
Identical answers are a tie without asking the judge.

Length: the report gives each side's mean answer length (characters, and tokens of the evaluated model's
tokenizer) and a length-controlled win rate: a logistic regression of the judge's per-order preference on
tanh(token length difference / its standard deviation) and the display position, with a weak Gaussian prior
(sd 5) on the coefficients; the LC win rate is the fitted probability at zero length difference and no position
effect (AlpacaEval 2's length control, in spirit, without per-instruction terms). It is None below MIN_LC_PROMPTS
judged prompts. It removes every preference that goes with length, deserved or not.
"""
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from utils.errors import UserError
from utils.evals.common import ItemCache, conversation_items, digest, md_table, progress, prompt_key
from utils.evals.judge import judge_from_args, run_all
from utils.formats import split_conversation

NAME = "pairwise"
ORDER = 6
SUMMARY = ("pairwise comparison with an LLM judge, both orders: the model against --pairwise_reference, "
           "--pairwise_lora_dir, --pairwise_base or the --data answers (win / tie / loss, length-controlled win rate)")
HEADLINE = "win_rate"
MIN_LC_PROMPTS = 20
PRIOR_SD = 5.0
PROMPT_KEYS = ("instruction", "prompt", "question")
OUTPUT_KEYS = ("output", "response", "answer", "std_answer")

JUDGE_PROMPT = """Two assistants, A and B, have each written a reply to the same user request. Decide which reply \
serves the user better.

Judge what matters to the user: whether the reply is correct, whether it does what was asked (language and format \
included), and whether it is clear and useful. Length is no merit in itself; extra text counts only if it helps. \
The order of the two replies tells you nothing, and neither do the names A and B.

[User request]
{question}
[End of user request]

[Reply A]
{answer_a}
[End of reply A]

[Reply B]
{answer_b}
[End of reply B]

Give your reasons in a few sentences. Then write your verdict on the last line, exactly one of: [[A]] when reply A \
is better, [[B]] when reply B is better, [[C]] when they are about equally good or equally bad."""


@dataclass
class Flags:
    pairwise_reference: Optional[str] = field(
        default=None, metadata={"help": "pairwise: system B's outputs, a JSONL / JSON file of {instruction (or prompt "
                                        "/ question)[, input], output (or response / answer)} matched to the --data "
                                        "prompts by text (AlpacaEval outputs files qualify)."})
    pairwise_lora_dir: Optional[str] = field(
        default=None, metadata={"help": "pairwise: system B is this adapter (a uniform_finetune.py output "
                                        "directory), generated with the same settings as A."})
    pairwise_base: bool = field(
        default=False, metadata={"help": "pairwise: system B is the base model of --lora_dir without its adapter."})


# ---- verdicts ------------------------------------------------------------------------------------------
_ECHO = re.compile(r"\[\[\s*[ABC]\s*\]\]\s*(?:if|when|for|means|=)(?![A-Za-z])", re.I)  # the instructions quoted back
_VERDICT = re.compile(r"\[\[\s*([ABC]|(?i:tie))\s*\]\]")
_LOOSE = re.compile(r"\[\s*([ABC])\s*\]|(?i:verdict|winner|better reply|answer)\s*(?i:is)?\s*[:：]?\s*[*\s]*"
                    r"(?i:reply\s+|assistant\s+)?\[?\s*([ABC]|(?i:tie))(?![A-Za-z])")


def parse_verdict(text):
    """"A", "B" or "C" (tie) from a judge answer, or None. The last [[X]] wins (a judge may reason first);
    "[[A]] if ..." quoted from the instructions is ignored; then "[A]" or "Verdict: A" (the last one)."""
    if not text:
        return None
    t = _ECHO.sub(" ", str(text))
    hits = _VERDICT.findall(t)
    if not hits:
        hits = [a or b for a, b in _LOOSE.findall(t)]
    if not hits:
        return None
    v = hits[-1].upper()
    return "C" if v == "TIE" else v


def order_score(verdict, a_first):
    """A's score in one order: 1 (A's answer better), 0.5 (tie), 0 (B's), None (no verdict)."""
    if verdict is None:
        return None
    if verdict == "C":
        return 0.5
    return 1.0 if (verdict == "A") == a_first else 0.0


# ---- the length-controlled win rate ----------------------------------------------------------------------
def length_controlled(records):
    """(lc_win_rate, length_coef, position_coef, note) from judged records {"scores": [ab, ba], "tokens_a", "tokens_b"}.

    Per order: logit P(A preferred) = b0 + bL * tanh(d / sd(d)) + bP * (+1 if A was shown first else -1), d the
    token length difference A - B, fitted by Newton's method on the (tie = 0.5) Bernoulli likelihood with a
    N(0, PRIOR_SD^2) prior on each coefficient. LC win rate = sigmoid(b0).
    """
    import numpy as np

    if len(records) < MIN_LC_PROMPTS:
        return None, None, None, f"needs at least {MIN_LC_PROMPTS} prompts judged in both orders (got {len(records)})"
    d = np.array([r["tokens_a"] - r["tokens_b"] for r in records], dtype=float)
    sd = d.std()
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    rows, y = [], []
    for xi, r in zip(x, records):
        for pos, s in zip((1.0, -1.0), r["scores"]):
            rows.append([1.0, xi, pos])
            y.append(s)
    X, y = np.array(rows), np.array(y)
    prior = np.eye(3) / PRIOR_SD ** 2
    theta = np.zeros(3)

    def objective(t):
        z = X @ t
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * t @ prior @ t)

    for _ in range(100):
        p = 1 / (1 + np.exp(-(X @ theta)))
        grad = X.T @ (p - y) + prior @ theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + prior
        step = np.linalg.solve(hess, grad)
        t, f0 = 1.0, objective(theta)
        while objective(theta - t * step) > f0 and t > 1e-6:  # step halving: the objective never rises
            t /= 2
        theta = theta - t * step
        if np.max(np.abs(t * step)) < 1e-9:
            break
    b0, bl, bp = (float(v) for v in theta)
    return float(1 / (1 + np.exp(-b0))), bl, bp, None


# ---- system B --------------------------------------------------------------------------------------------
def _norm(text):
    return " ".join(str(text).split())


def prompt_text(msgs):
    """The text a reference row is matched by: the last user turn (+ its input), whitespace normalised."""
    user = [m for m in msgs if m["role"] == "user"][-1]
    return _norm(user["content"] + (("\n\n" + user["input"]) if user.get("input") else ""))


def load_reference(path):
    """{normalised prompt text: output} from a JSONL / JSON file of {instruction|prompt|question[, input], output}."""
    from utils.data import iter_rows

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pairwise_reference {path} does not exist; pass a JSONL / JSON file of "
                        "{instruction, output} rows (system B's outputs)")
    out = {}
    for where, row, _ in iter_rows(path):
        prompt = next((row[k] for k in PROMPT_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        output = next((row[k] for k in OUTPUT_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        if prompt is None or output is None:
            raise UserError(f"{where} needs a prompt ('instruction', 'prompt' or 'question') and an output ('output', "
                            "'response' or 'answer') string field")
        if isinstance(row.get("input"), str) and row["input"]:
            prompt += "\n\n" + row["input"]
        key = _norm(prompt)
        if key in out and out[key] != output:
            raise UserError(f"{where}: the prompt '{key[:60]}' appears twice with different outputs; keep one output "
                            "per prompt in --pairwise_reference")
        out[key] = output
    if not out:
        raise UserError(f"--pairwise_reference {path} has no rows")
    return out


def _b_mode(flags):
    given = [name for name, on in (("--pairwise_reference", flags.pairwise_reference),
                                   ("--pairwise_lora_dir", flags.pairwise_lora_dir),
                                   ("--pairwise_base", flags.pairwise_base)) if on]
    if len(given) > 1:
        raise UserError(f"{given[0]} and {given[1]} both name system B; pass one of them")
    return {"--pairwise_reference": "reference", "--pairwise_lora_dir": "adapter",
            "--pairwise_base": "base"}.get(given[0] if given else None, "data")


def _items(eval_args):
    convs, report = conversation_items(eval_args, need_answer=False)
    items, seen = [], set()
    for source, msgs in convs:
        prompt, ref = split_conversation(msgs)
        key = prompt_key(prompt)
        if key in seen:
            continue
        seen.add(key)
        items.append({"key": key, "source": source, "prompt": prompt, "ref": ref, "text": prompt_text(prompt)})
    return items, report


def _missing_sentence(missing, total, where, fix):
    return (f"{where} has no output for {len(missing)} of the {total} prompts (the first: '{missing[0][:80]}'); "
            f"{fix}")


def _reference_outputs(items, flags, eval_args):
    if _b_mode(flags) == "reference":
        ref = load_reference(flags.pairwise_reference)
        missing = [it["text"] for it in items if it["text"] not in ref]
        if missing:
            raise UserError(_missing_sentence(missing, len(items), f"--pairwise_reference {flags.pairwise_reference}",
                                              "add them to the file or pass --data with only the prompts it answers"))
        return {it["key"]: ref[it["text"]] for it in items}
    if not any((it["ref"] or "").strip() for it in items):
        raise UserError(f"the --data rows ({' '.join(eval_args.data)}) have no answers to compare with; --task "
                        "pairwise needs system B: rows with answers, --pairwise_reference FILE, --pairwise_lora_dir "
                        "DIR or --pairwise_base")
    return {it["key"]: it["ref"] for it in items if (it["ref"] or "").strip()}  # rows without one: skipped, counted


def check(eval_args, flags, gen_args=None):
    if not eval_args.data:
        raise UserError("--task pairwise needs --data (the prompts: any --data format, e.g. Belle-eval or MT-bench "
                        "questions)")
    if eval_args.judge_base_url and not eval_args.judge_model:
        raise UserError("--judge_base_url needs --judge_model (the judge's model name at that endpoint)")
    mode = _b_mode(flags)
    if mode == "base" and not eval_args.lora_dir:
        raise UserError("--pairwise_base compares an adapter with its base model; pass --lora_dir (or use "
                        "--pairwise_lora_dir / --pairwise_reference for a base model)")
    if mode == "adapter":
        from utils.loader import open_run

        open_run(flags.pairwise_lora_dir)  # a damaged or unfinished run directory is one sentence, before any load
        if eval_args.lora_dir and Path(eval_args.lora_dir).resolve() == Path(flags.pairwise_lora_dir).resolve():
            raise UserError("--pairwise_lora_dir is the --lora_dir being evaluated; pass another adapter as system B")
    if mode in ("reference", "data"):
        items, _ = _items(eval_args)
        _reference_outputs(items, flags, eval_args)


def _b_handle(handle, flags):
    """The ModelHandle of system B (a second adapter, or A's base model)."""
    from utils.evals.common import ModelHandle
    from utils.run_dir import read_meta

    if _b_mode(flags) == "adapter":  # its own run's base model; dtype and quantization flags as for A
        model_args = replace(handle.model_args, model_name_or_path=None, model_type=None)
        return ModelHandle(model_args, replace(handle.eval_args, lora_dir=flags.pairwise_lora_dir))
    meta = read_meta(handle.eval_args.lora_dir)
    m = handle.model_args
    model_args = replace(m, model_name_or_path=m.model_name_or_path or meta["base_model"],
                         model_type=m.model_type or meta["model_type"],
                         trust_remote_code=m.trust_remote_code or bool(meta.get("trust_remote_code")))
    return ModelHandle(model_args, replace(handle.eval_args, lora_dir=None))


def _generate(handle, items, eval_args, gen_args, out_dir, label):
    """{item key: answer} of one system, generated where not cached (cache: pairwise-<fingerprint>.jsonl)."""
    from utils.generation import generate_missing, generation_kwargs

    fingerprint = digest({"task": "pairwise", "model": handle.identity(), "gen": asdict(gen_args)})
    cache = ItemCache(out_dir / "cache" / f"pairwise-{fingerprint}.jsonl")
    todo = [it for it in items if it["key"] not in cache]
    bar = progress(len(items), len(items) - len(todo), f"pairwise answers ({label})")
    if todo:
        model, tokenizer, template, _ = handle.load()
        jobs = [{"key": it["key"], "ids": template.prompt_ids(tokenizer, it["prompt"]), "text": it["text"]}
                for it in todo]
        generate_missing(jobs, cache, model, tokenizer, generation_kwargs(gen_args, tokenizer, template),
                         eval_args.batch_size, lambda job, text: {"prompt": job["text"], "output": text}, bar.update)
    bar.close()
    return {it["key"]: cache[it["key"]]["output"] for it in items}


def conversation_text(prompt):
    """The request as the judge reads it: the user turn, or the whole conversation when it has earlier turns."""
    def content(m):
        return m["content"] + (("\n\n" + m["input"]) if m.get("input") else "")

    if sum(1 for m in prompt if m["role"] != "system") == 1 and not any(m["role"] == "system" for m in prompt):
        return content(prompt[-1])
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {content(m)}" for m in prompt)


def judge_message(question, answer_a, answer_b):
    return JUDGE_PROMPT.format(question=question, answer_a=answer_a, answer_b=answer_b)


def run(ctx):
    eval_args, out_dir = ctx.eval_args, Path(ctx.out_dir)
    mode = _b_mode(ctx.flags)
    items, report = _items(eval_args)
    items, out_a, out_b, b_label, skipped = _answers(ctx, items, mode, out_dir)
    _set_answers(ctx.handle, items, out_a, out_b)
    if not eval_args.judge_base_url:
        print("no --judge_base_url: answers generated and cached; pass --judge_base_url and --judge_model to judge "
              "them")
        return _report(items, None, b_label, report, skipped)
    _judge(eval_args, items, out_dir)
    return _report(items, eval_args.judge_model, b_label, report, skipped)


def _answers(ctx, items, mode, out_dir):
    """(items, A's answers, B's answers, B's label, rows skipped): A generated, and B read (--pairwise_reference,
    --data) or generated (--pairwise_lora_dir, --pairwise_base) after A's model is released."""
    eval_args, flags, gen_args, handle = ctx.eval_args, ctx.flags, ctx.gen_args, ctx.handle
    b_label = {"reference": f"reference {flags.pairwise_reference}", "data": "the answers in --data",
               "adapter": f"adapter {flags.pairwise_lora_dir}", "base": "the base model"}[mode]
    skipped = 0
    if mode in ("reference", "data"):
        out_b = _reference_outputs(items, flags, eval_args)
        skipped = len(items) - len(out_b)
        if skipped:
            print(f"pairwise: {skipped} of the {len(items)} --data rows have no answer to compare with: skipped")
            items = [it for it in items if it["key"] in out_b]
        out_a = _generate(handle, items, eval_args, gen_args, out_dir, "A")
    else:
        out_a = _generate(handle, items, eval_args, gen_args, out_dir, "A")
        b_handle = _b_handle(handle, flags)
        if b_handle.identity() == handle.identity():
            raise UserError("system B is the same model as system A; pass another --pairwise_lora_dir")
        handle.release()
        out_b = _generate(b_handle, items, eval_args, gen_args, out_dir, "B")
        b_handle.release()
        b_label += f" ({b_handle.describe()['adapter'] or b_handle.describe()['base_model']})"
    return items, out_a, out_b, b_label, skipped


def _set_answers(handle, items, out_a, out_b):
    """Sets each item's answers "a", "b" and their lengths "tokens_a", "tokens_b" (the evaluated model's tokenizer)."""
    tokenizer = handle.tokenizer()
    for it in items:
        it["a"], it["b"] = out_a[it["key"]], out_b[it["key"]]
        it["tokens_a"], it["tokens_b"] = (len(tokenizer(t, add_special_tokens=False)["input_ids"])
                                          for t in (it["a"], it["b"]))


def _judge_jobs(items, jcache, judge_model):
    """Sets each item's "identical" and, when not, its two "messages" (A first, B first) and their "jkeys"; returns
    the (jkey, message) requests not yet in jcache, each once."""
    jobs, queued = [], set()
    for it in items:
        it["identical"] = _norm(it["a"]) == _norm(it["b"])
        if it["identical"]:
            continue
        q = conversation_text(it["prompt"])
        it["messages"] = [judge_message(q, it["a"], it["b"]), judge_message(q, it["b"], it["a"])]  # A first, B first
        it["jkeys"] = [digest([judge_model, m]) for m in it["messages"]]
        for jkey, message in zip(it["jkeys"], it["messages"]):
            if jkey not in jcache and jkey not in queued:
                queued.add(jkey)
                jobs.append((jkey, message))
    return jobs


def _judge(eval_args, items, out_dir):
    """Sets each item's "verdicts" and "scores" (both orders), the judge asked where not cached (cache/judge.jsonl)."""
    judge = judge_from_args(eval_args, "pairwise")
    jcache = ItemCache(out_dir / "cache" / "judge.jsonl")  # keyed by judge model + message: shared by every model
    jobs = _judge_jobs(items, jcache, eval_args.judge_model)
    bar = progress(2 * len(items), 2 * len(items) - len(jobs), "pairwise judge")

    def ask(job):
        jkey, message = job
        text = judge(message)
        jcache.put({"key": jkey, "judge_model": eval_args.judge_model, "response": text,
                    "verdict": parse_verdict(text)})
        bar.update(1)

    run_all(ask, jobs, eval_args.judge_workers)
    bar.close()
    for it in items:
        if it["identical"]:
            it["verdicts"], it["scores"] = ["C", "C"], [0.5, 0.5]
            continue
        it["verdicts"] = [parse_verdict(jcache[k]["response"]) for k in it["jkeys"]]
        it["scores"] = [order_score(it["verdicts"][0], True), order_score(it["verdicts"][1], False)]


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else None


def _report(items, judge_model, b_label, data_report, skipped=0):
    lengths = {"chars_a": _mean(len(it["a"]) for it in items), "chars_b": _mean(len(it["b"]) for it in items),
               "tokens_a": _mean(it["tokens_a"] for it in items), "tokens_b": _mean(it["tokens_b"] for it in items)}
    metrics = {"n": len(items), "judged": 0, "win_rate": None, **{f"avg_{k}": v for k, v in lengths.items()},
               "skipped_no_answer": skipped}
    rows_len = [["A (evaluated model)", lengths["chars_a"], lengths["tokens_a"]],
                ["B: " + b_label, lengths["chars_b"], lengths["tokens_b"]]]
    samples = [{"prompt": it["text"], "a": it["a"], "b": it["b"], "verdicts": it.get("verdicts")} for it in items[:5]]
    if judge_model is None:
        table = "answers generated; no judge given\n\n" + md_table(["system", "avg chars", "avg tokens"], rows_len)
        return {"metrics": metrics, "system_b": b_label, "data": data_report, "samples": samples, "table": table}
    judged = [it for it in items if None not in it["scores"]]
    prefs = [sum(it["scores"]) / 2 for it in judged]
    n = len(judged)
    wins, losses = sum(p > 0.5 for p in prefs), sum(p < 0.5 for p in prefs)
    decisive = [(v, first) for it in judged if not it["identical"] for v, first in zip(it["verdicts"], (True, False))
                if v in ("A", "B")]
    win_rate = _mean(prefs)
    stderr = None
    if n > 1:
        stderr = (sum((p - win_rate) ** 2 for p in prefs) / (n - 1) / n) ** 0.5
    lc, coef_len, coef_pos, lc_note = length_controlled(
        [{"scores": it["scores"], "tokens_a": it["tokens_a"], "tokens_b": it["tokens_b"]} for it in judged])
    metrics.update({
        "judged": n, "no_verdict": len(items) - n, "identical": sum(it["identical"] for it in items),
        "wins": wins, "ties": n - wins - losses, "losses": losses, "win_rate": win_rate, "win_rate_stderr": stderr,
        "win_share": wins / n if n else None, "tie_share": (n - wins - losses) / n if n else None,
        "loss_share": losses / n if n else None,
        "consistency": _mean(it["scores"][0] == it["scores"][1] for it in judged),
        "first_position_rate": _mean((v == "A") for v, _ in decisive),
        "lc_win_rate": lc, "lc_length_coef": coef_len, "lc_position_coef": coef_pos})
    rows = [["win rate (ties count half)", win_rate], ["win rate standard error", stderr],
            ["length-controlled win rate", lc if lc is not None else f"None ({lc_note})"],
            ["wins / ties / losses", f"{wins} / {n - wins - losses} / {losses}"],
            ["prompts judged in both orders", f"{n} of {len(items)}"],
            ["both orders agree", metrics["consistency"]],
            ["decisive verdicts for the answer shown first", metrics["first_position_rate"]],
            ["identical answers (a tie, not judged)", metrics["identical"]]]
    table = (f"System A (the evaluated model) against system B ({b_label}); judge: {judge_model}.\n\n"
             + md_table(["metric", "value"], rows) + "\n" + md_table(["system", "avg chars", "avg tokens"], rows_len))
    return {"metrics": metrics, "system_b": b_label, "judge_model": judge_model, "lc_note": lc_note,
            "data": data_report, "samples": samples, "table": table}
