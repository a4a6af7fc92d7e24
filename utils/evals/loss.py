"""loss: held-out loss and perplexity with the training run's masking (answer tokens only)."""
import math
from dataclasses import dataclass, field
from typing import Optional

from utils.errors import UserError
from utils.evals.common import (ItemCache, batches, conversation_items, digest, md_table, progress,
                                sequence_logprobs)

NAME = "loss"
ORDER = 4
SUMMARY = "held-out loss and perplexity (--data)"
HEADLINE = ("loss", "perplexity")  # the study table's columns; the first is plotted


@dataclass
class Flags:
    cutoff_len: Optional[int] = field(
        default=None, metadata={"min": 8, "help": "loss: maximum tokens per example (default: the run's --cutoff_len, "
                                                  "else 256)."})


def check(eval_args, flags, gen_args=None):
    if not eval_args.data:
        raise UserError("--task loss needs --data (a dataset name or file)")


def run(ctx):
    return run_loss(ctx.handle, ctx.eval_args, ctx.gen_args, ctx.out_dir)


def run_loss(handle, eval_args, gen_args, out_dir):
    convs, report = conversation_items(eval_args)
    opts = handle.run_options()
    fingerprint = digest({"task": "loss", "model": handle.identity(), **opts})
    cache = ItemCache(out_dir / "cache" / f"loss-{fingerprint}.jsonl")
    items = [{"key": digest([[m["role"], m["content"], m.get("input") or ""] for m in msgs]), "source": source,
              "msgs": msgs} for source, msgs in convs]
    todo = [it for it in items if it["key"] not in cache]
    bar = progress(len(items), len(items) - len(todo), "loss")
    if todo:
        from utils.formats import add_cot_prompt

        model, tokenizer, template, _ = handle.load()
        for it in todo:
            msgs = add_cot_prompt(it["msgs"]) if opts["cot_prompt"] else it["msgs"]
            ids, labels = template.encode(tokenizer, msgs, train_on_inputs=opts["train_on_inputs"])
            it["ids"], it["labels"] = ids[:opts["cutoff_len"]], labels[:opts["cutoff_len"]]
        todo.sort(key=lambda it: len(it["ids"]))
        for batch in batches(todo, eval_args.batch_size):
            wanted = []
            for it in batch:
                pos = [p for p in range(1, len(it["ids"])) if it["labels"][p] != -100]  # as training: shifted labels
                wanted.append(([p - 1 for p in pos], [it["labels"][p] for p in pos]))
            lps = sequence_logprobs(model, [it["ids"] for it in batch], tokenizer.pad_token_id, wanted)
            for it, lp in zip(batch, lps):
                cache.put({"key": it["key"], "source": it["source"], "nll": -sum(lp, 0.0), "tokens": len(lp)})
            bar.update(len(batch))
    bar.close()
    recs = [cache[it["key"]] for it in items]
    return _loss_report(recs, report, opts)


def _loss_metrics(recs):
    tokens = sum(r["tokens"] for r in recs)
    loss = sum(r["nll"] for r in recs) / tokens if tokens else None
    return {"rows": len(recs), "tokens": tokens, "loss": loss,
            "perplexity": math.exp(min(loss, 50)) if loss is not None else None,
            "dropped_no_answer_token": sum(1 for r in recs if not r["tokens"])}


def _loss_report(recs, report, opts):
    sources = {}
    for r in recs:
        sources.setdefault(r["source"], []).append(r)
    per = {s: _loss_metrics(rs) for s, rs in sources.items()}
    metrics = _loss_metrics(recs)
    rows = [[s, m["rows"], m["tokens"], m["loss"], m["perplexity"]] for s, m in per.items()]
    rows.append(["**all**", metrics["rows"], metrics["tokens"], metrics["loss"], metrics["perplexity"]])
    return {"metrics": metrics, "sources": per, "data": report, "options": opts,
            "table": md_table(["source", "rows", "answer tokens", "loss (per token)", "perplexity"], rows)}
