"""cot: generate on CoT / GSM8K data, extract the final answer, compare it with the reference."""
from dataclasses import asdict

from utils.errors import UserError
from utils.evals.common import ItemCache, conversation_items, digest, md_table, progress, prompt_key
from utils.evals.scoring import answers_match, extract_final_answer
from utils.formats import split_conversation

NAME = "cot"
ORDER = 2
SUMMARY = "answer extraction on CoT / GSM8K data (--data)"
HEADLINE = ("accuracy", "parsable_rate")  # the study table's columns; the first is plotted


def check(eval_args, flags, gen_args=None):
    if not eval_args.data:
        raise UserError("--task cot needs --data (a dataset name or file)")


def run(ctx):
    return run_cot(ctx.handle, ctx.eval_args, ctx.gen_args, ctx.out_dir)


def run_cot(handle, eval_args, gen_args, out_dir):
    convs, report = conversation_items(eval_args)
    opts = handle.run_options()
    fingerprint = digest({"task": "cot", "model": handle.identity(), "gen": asdict(gen_args),
                           "cot_prompt": opts["cot_prompt"]})
    cache = ItemCache(out_dir / "cache" / f"cot-{fingerprint}.jsonl")
    items = []
    for source, msgs in convs:
        prompt, ref = split_conversation(msgs)
        items.append({"key": prompt_key(prompt) + digest(ref, 8), "source": source, "prompt": prompt, "ref": ref})
    todo = [it for it in items if it["key"] not in cache]
    bar = progress(len(items), len(items) - len(todo), "cot")
    if todo:
        from utils.formats import add_cot_prompt
        from utils.generation import generate_missing, generation_kwargs

        model, tokenizer, template, _ = handle.load()
        for it in todo:
            msgs = add_cot_prompt(it["prompt"]) if opts["cot_prompt"] else it["prompt"]
            it["ids"] = template.prompt_ids(tokenizer, msgs)
        generate_missing(todo, cache, model, tokenizer, generation_kwargs(gen_args, tokenizer, template),
                         eval_args.batch_size, lambda it, text: {"source": it["source"], "output": text,
                                                                 "prompt": it["prompt"][-1]["content"],
                                                                 "reference_text": it["ref"]}, bar.update)
    bar.close()
    recs = [score_cot(cache[it["key"]]) for it in items]
    return _cot_report(recs, report)


def score_cot(rec):
    """Score a cached generation (scoring is redone on every report, so a better extractor needs no new generation)."""
    pred = extract_final_answer(rec["output"])
    ref = extract_final_answer(rec["reference_text"]) or rec["reference_text"].strip()
    return dict(rec, answer=pred, reference=ref, parsable=pred is not None, correct=answers_match(pred, ref))


def _cot_metrics(recs):
    n = len(recs)
    parsable = [r for r in recs if r["parsable"]]
    return {"n": n, "accuracy": sum(r["correct"] for r in recs) / n, "parsable_rate": len(parsable) / n,
            "accuracy_of_parsable": (sum(r["correct"] for r in parsable) / len(parsable)) if parsable else None}


def _cot_report(recs, report):
    sources = {}
    for r in recs:
        sources.setdefault(r["source"], []).append(r)
    per = {s: _cot_metrics(rs) for s, rs in sources.items()}
    metrics = _cot_metrics(recs)
    rows = [[s, m["n"], m["accuracy"], m["parsable_rate"], m["accuracy_of_parsable"]] for s, m in per.items()]
    rows.append(["**all**", metrics["n"], metrics["accuracy"], metrics["parsable_rate"],
                 metrics["accuracy_of_parsable"]])
    samples = [{k: r[k] for k in ("source", "prompt", "output", "answer", "reference", "correct")} for r in recs[:5]]
    return {"metrics": metrics, "sources": per, "data": report, "samples": samples,
            "table": md_table(["source", "n", "accuracy", "parsable answers", "accuracy of parsable"], rows)}
