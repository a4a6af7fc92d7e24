"""preference: preference accuracy and reward margins on held-out pairs (--data PAIRS), for an adapter or a base model.

Every pair is tokenized as the preference stages train it (utils/preference.py: the run's template, --cutoff_len,
answers with their end-of-turn token) and each answer is scored by the sum of its token log-probabilities:

    reward  (DPO's implicit reward)  beta * (log pi(chosen) - log ref(chosen))
                                     - beta * (log pi(rejected) - log ref(rejected))
    logp    (the model alone)        log pi(chosen) - log pi(rejected)
    norm    (per token, as SimPO)    log pi(chosen) / |chosen| - log pi(rejected) / |rejected|

A pair counts as preferred when its margin is > 0 (a tie is not). The mean loss per token of the chosen (and the
rejected) answers is reported too: the SFT loss on those answers, to see that preference training keeps it.
The reference of an adapter is the one its
training used: the base model (the adapter disabled; for full / freeze / bottleneck runs the base loaded alone),
or the --ref_adapter SFT adapter of a preference run. A base model has no reference: its `reward` row is empty
and `accuracy` is its `logp` accuracy, which is the number to compare an adapter's `logp` accuracy with.
"""
from dataclasses import dataclass, field
from typing import Optional

from utils.errors import UserError
from utils.evals.common import ItemCache, batches, digest, md_table, progress, sequence_logprobs

NAME = "preference"
ORDER = 5
SUMMARY = "preference accuracy and reward margins on pairs (--data PAIRS)"
HEADLINE = ("accuracy", "logp_accuracy", "chosen_loss")  # the study table's columns; the first is plotted
DEFAULT_BETA = 0.1


@dataclass
class Flags:
    pref_beta: Optional[float] = field(
        default=None, metadata={"gt": 0, "help": "preference: beta of the implicit reward margin (default: the run's "
                                                 "--beta, else 0.1); the accuracies do not depend on it."})


def check(eval_args, flags, gen_args=None):
    if not eval_args.data:
        raise UserError("--task preference needs --data (preference pairs: a file or e.g. hh_rlhf_pairs)")


def pair_items(eval_args):
    """[(source, example)] from --data, minus the pairs of --exclude_data, at most --limit per source."""
    from utils.preference import example_key, load_preference_data

    excluded = set()
    if eval_args.exclude_data:
        for examples, _ in load_preference_data(eval_args.exclude_data, "dpo", eval_args.exclude_seed):
            excluded |= {example_key(ex) for ex in examples}
    out, report = [], []
    for value in eval_args.data:
        for examples, stats in load_preference_data([value], "dpo", seed=eval_args.exclude_seed):
            kept = [ex for ex in examples if example_key(ex) not in excluded]
            n_excluded = len(examples) - len(kept)
            kept = kept[:eval_args.limit] if eval_args.limit else kept
            out += [(stats["source"], ex) for ex in kept]
            report.append({"source": stats["source"], "pairs": len(examples), "excluded": n_excluded,
                           "evaluated": len(kept), "rows_skipped": stats["skipped"]})
    if not out:
        raise UserError(f"no pairs left to evaluate in --data {' '.join(eval_args.data)} (after --exclude_data)")
    return out, report


def _reference(handle):
    """What an adapter is compared against: ('none' | 'disabled' | 'base' | 'ref_adapter', ref adapter dir)."""
    from utils.peft_methods import capability
    from utils.run_dir import read_meta

    if not handle.eval_args.lora_dir:
        return "none", None
    meta = read_meta(handle.eval_args.lora_dir)
    pref = meta.get("preference") or {}
    if pref.get("reference") == "ref_adapter" and pref.get("ref_adapter"):
        return "ref_adapter", pref["ref_adapter"]
    return ("disabled" if capability(meta["peft_type"], "loader") == "peft" else "base"), None


def _score(model, tokenizer, todo, batch_size, side_keys):
    """{key: {side: (sum of log-probs, tokens)}} for the items' encoded answers."""
    out = {}
    seqs = [(it["key"], side, it["row"]["prompt_ids"], it["row"][f"{side}_ids"]) for it in todo for side in side_keys]
    seqs.sort(key=lambda s: len(s[2]) + len(s[3]))
    bar = progress(len(seqs), 0, "preference")
    for batch in batches(seqs, batch_size):
        wanted = [(list(range(len(p) - 1, len(p) + len(a) - 1)), a) for _, _, p, a in batch]
        lps = sequence_logprobs(model, [p + a for _, _, p, a in batch], tokenizer.pad_token_id, wanted)
        for (key, side, p, a), lp in zip(batch, lps):
            out.setdefault(key, {})[side] = (sum(lp), len(a))
        bar.update(len(batch))
    bar.close()
    return out


def run(ctx):
    from utils.preference import Encoder, example_key
    from utils.run_dir import read_meta

    handle, eval_args = ctx.handle, ctx.eval_args
    items, report = pair_items(eval_args)
    opts = handle.run_options()
    reference, ref_dir = _reference(handle)
    beta = ctx.flags.pref_beta if ctx.flags and ctx.flags.pref_beta else None
    if beta is None and eval_args.lora_dir:
        beta = (read_meta(eval_args.lora_dir).get("preference") or {}).get("beta")
    beta = beta or DEFAULT_BETA
    fingerprint = digest({"task": "preference", "model": handle.identity(), "reference": [reference, ref_dir], **opts})
    cache = ItemCache(ctx.out_dir / "cache" / f"preference-{fingerprint}.jsonl")
    items = [{"key": example_key(ex), "source": source, "ex": ex} for source, ex in items]
    todo = [it for it in items if it["key"] not in cache]
    if todo:
        model, tokenizer, template, _ = handle.load()
        encoder = Encoder(tokenizer, template, opts["cutoff_len"], opts["cot_prompt"])
        scorable = []
        for it in todo:
            it["row"], why = encoder.encode(it["ex"])
            if it["row"] is None:
                cache.put({"key": it["key"], "source": it["source"], "dropped": why})
            else:
                scorable.append(it)
        sides = ("chosen", "rejected")
        policy = _score(model, tokenizer, scorable, eval_args.batch_size, sides)
        ref = _reference_scores(model, tokenizer, scorable, eval_args, handle, reference, ref_dir, sides)
        for it in scorable:
            rec = {"key": it["key"], "source": it["source"]}
            for side in sides:
                rec[side], rec[f"{side}_tokens"] = policy[it["key"]][side]
                if ref is not None:
                    rec[f"ref_{side}"] = ref[it["key"]][side][0]
            cache.put(rec)
    recs = [cache[it["key"]] for it in items]
    return _report(recs, report, opts, beta, reference)


def _reference_scores(model, tokenizer, todo, eval_args, handle, reference, ref_dir, sides):
    """The reference log-probs of the answers, or None when the model has no reference (a base model)."""
    if reference == "none":
        return None
    if reference == "disabled":
        with model.disable_adapter():
            return _score(model, tokenizer, todo, eval_args.batch_size, sides)
    if reference == "ref_adapter":
        from utils.peft_methods import load_adapter

        load_adapter(model, ref_dir, adapter_name="ref")
        model.set_adapter("ref")
        try:
            return _score(model, tokenizer, todo, eval_args.batch_size, sides)
        finally:
            model.set_adapter("default")
            model.delete_adapter("ref")
    from utils.loader import load_for_inference
    from utils.run_dir import read_meta

    meta = read_meta(eval_args.lora_dir)  # full / freeze / bottleneck: the base model, loaded on its own
    base, *_ = load_for_inference(model_name_or_path=handle.model_args.model_name_or_path or meta["base_model"],
                                  model_type=meta["model_type"], dtype=handle.model_args.dtype,
                                  trust_remote_code=bool(meta.get("trust_remote_code")),
                                  quant_bits=meta.get("quant_bits"))
    from utils import vocab

    base = vocab.prepare_base(base, meta)  # a run with --extend_vocab: the base resized and initialised as in training
    return _score(base, tokenizer, todo, eval_args.batch_size, sides)


def _measures(r, beta):
    out = {"logp": r["chosen"] - r["rejected"],
           "norm": r["chosen"] / r["chosen_tokens"] - r["rejected"] / r["rejected_tokens"]}
    if "ref_chosen" in r:
        out["reward"] = beta * ((r["chosen"] - r["ref_chosen"]) - (r["rejected"] - r["ref_rejected"]))
    return out


def _metrics(recs, beta, reference):
    scored = [r for r in recs if "dropped" not in r]
    out = {"pairs": len(recs), "scored": len(scored), "dropped_by_cutoff": len(recs) - len(scored)}
    for name in ("reward", "logp", "norm"):
        margins = [m[name] for m in (_measures(r, beta) for r in scored) if name in m]
        if not margins:
            out[f"{name}_accuracy"] = out[f"{name}_margin"] = out[f"{name}_ties"] = None
            continue
        out[f"{name}_accuracy"] = sum(m > 0 for m in margins) / len(margins)
        out[f"{name}_margin"] = sum(margins) / len(margins)
        out[f"{name}_ties"] = sum(m == 0 for m in margins)
    for side in ("chosen", "rejected"):  # the SFT loss (mean NLL per token) of each side's answers
        tokens = sum(r[f"{side}_tokens"] for r in scored)
        out[f"{side}_loss"] = -sum(r[side] for r in scored) / tokens if tokens else None
    out["accuracy"] = out["reward_accuracy"] if reference != "none" else out["logp_accuracy"]
    out["mean_margin"] = out["reward_margin"] if reference != "none" else out["logp_margin"]
    out["beta"], out["reference"] = beta, reference
    return out


def _report(recs, report, opts, beta, reference):
    if all("dropped" in r for r in recs):
        raise UserError(f"every pair's prompt fills --cutoff_len {opts['cutoff_len']}; raise it (--cutoff_len)")
    sources = {}
    for r in recs:
        sources.setdefault(r["source"], []).append(r)
    per = {s: _metrics(rs, beta, reference) for s, rs in sources.items()}
    metrics = _metrics(recs, beta, reference)
    words = {"reward": f"implicit reward vs reference (beta {beta:g})", "logp": "log-prob of the answer (model alone)",
             "norm": "log-prob per token (model alone)"}
    rows = []
    for name in ("reward", "logp", "norm"):
        if metrics[f"{name}_accuracy"] is None:
            rows.append([words[name], "-", "-", "-"])
        else:
            rows.append([words[name], metrics[f"{name}_accuracy"], metrics[f"{name}_margin"], metrics[f"{name}_ties"]])
    table = md_table(["margin chosen - rejected", "accuracy (margin > 0)", "mean margin", "ties"], rows)
    ref_words = {"none": "none (a base model: the reward row is empty)",
                 "disabled": "the base model (adapter disabled)",
                 "base": "the base model (loaded alone)", "ref_adapter": "the run's --ref_adapter"}
    if metrics["chosen_loss"] is not None:
        table += (f"\nloss per answer token (SFT loss): chosen {metrics['chosen_loss']:.4f}, rejected "
                  f"{metrics['rejected_loss']:.4f}\n")
    table += (f"\n{metrics['scored']} pairs scored ({metrics['dropped_by_cutoff']} dropped: the prompt fills "
              f"--cutoff_len {opts['cutoff_len']}); reference: {ref_words[reference]}\n")
    return {"metrics": metrics, "sources": per, "data": report, "options": opts, "table": table}
