"""What every evaluation task shares: the model handle, the per-item cache, batching and the data helpers.

A task is one module in utils/evals/ (see __init__.py). It lists its items, skips those already in the per-item
cache (OUTPUT_DIR/cache/<task>-<fingerprint>.jsonl, appended as items finish, so a killed run resumes and a
rerun costs nothing), runs the rest in batches with a progress bar, then aggregates. The model is loaded only
when some item is not cached yet.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.formats import split_conversation
from utils.jsonl import JsonlWriter, read_records


@dataclass
class EvalContext:
    """What a task's run(ctx) gets: the model handle, the flags, generation settings and where to write."""
    handle: Any
    eval_args: Any      # every evaluate.py flag (common, judge and every task's)
    gen_args: Any       # GenerationArguments
    flags: Any          # the task's own Flags (a view of eval_args), or None
    out_dir: Path


def digest(obj, n=16):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:n]


class ItemCache:
    """Per-item results appended to a JSONL file as they finish, keyed by "key"; reread on the next run.

    A torn last line (a killed run) is dropped, so that item is simply done again.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.items = {rec["key"]: rec for rec in read_records(self.path) if "key" in rec}
        self._writer = JsonlWriter(self.path)

    def __contains__(self, key):
        return key in self.items

    def __getitem__(self, key):
        return self.items[key]

    def put(self, rec):
        self._writer.write(rec)
        self.items[rec["key"]] = rec


class ModelHandle:
    """The model under evaluation, loaded on first use (a fully cached rerun never loads it)."""

    def __init__(self, model_args, eval_args):
        self.model_args, self.eval_args = model_args, eval_args
        self._loaded = None

    def check(self):
        """What can fail before any weight loads (the run directory, quantization flags)."""
        from utils.loader import check_inference_args

        check_inference_args(self.model_args, self.eval_args.lora_dir)

    def load(self):
        if self._loaded is None:
            from utils.loader import load_from_args

            self._loaded = load_from_args(self.model_args, self.eval_args.lora_dir, self.eval_args.template)
        return self._loaded

    def release(self):
        """Free the model (another system is loaded next); its tokenizer stays for tokenizer()."""
        import gc

        if self._loaded is not None:
            self._tokenizer = self._loaded[1]
            self._loaded = None
            gc.collect()

    def tokenizer(self):
        """The evaluated model's tokenizer; only the tokenizer is loaded when the model is not needed."""
        if self._loaded is not None:
            return self._loaded[1]
        if getattr(self, "_tokenizer", None) is None:
            from utils.models import load_tokenizer, resolve_model
            from utils.run_dir import read_meta

            m, lora_dir = self.model_args, self.eval_args.lora_dir
            if lora_dir:
                trust = m.trust_remote_code or bool(read_meta(lora_dir).get("trust_remote_code"))
                self._tokenizer = load_tokenizer(lora_dir, trust)
            else:
                path, _, _ = resolve_model(m.model_name_or_path, m.model_type, m.trust_remote_code)
                self._tokenizer = load_tokenizer(path, m.trust_remote_code)
        return self._tokenizer

    def identity(self):
        """What the results depend on: base, adapter (path and weights' size/time), template, dtype."""
        from utils.models import EMBEDDED_ALIAS
        from utils.run_dir import ADAPTER_WEIGHTS, TEMPLATE_FILE

        m, e = self.model_args, self.eval_args
        ident = {"base": m.model_name_or_path or EMBEDDED_ALIAS, "model_type": m.model_type, "dtype": m.dtype,
                 "template": e.template}
        if m.load_in_4bit or m.load_in_8bit:
            ident["quant"] = 4 if m.load_in_4bit else 8
        if e.lora_dir:
            d = Path(e.lora_dir)
            ident["adapter"] = str(d.resolve())
            for name in (ADAPTER_WEIGHTS, TEMPLATE_FILE):
                if (d / name).is_file():
                    st = (d / name).stat()
                    ident[name] = [st.st_size, st.st_mtime_ns]
        return ident

    def describe(self):
        from utils.models import EMBEDDED_ALIAS
        from utils.run_dir import read_meta

        m, e = self.model_args, self.eval_args
        if e.lora_dir:
            meta = read_meta(e.lora_dir)
            return {"base_model": m.model_name_or_path or meta["base_model"], "adapter": str(e.lora_dir),
                    "peft_type": meta.get("peft_type")}
        return {"base_model": m.model_name_or_path or EMBEDDED_ALIAS, "adapter": None, "peft_type": None}

    def run_options(self):
        """Tokenization options of the training run (cutoff_len, train_on_inputs, cot_prompt), for the same masking."""
        from utils.run_dir import read_meta

        opts = {"cutoff_len": 256, "train_on_inputs": False, "cot_prompt": False}
        if self.eval_args.lora_dir:
            args = read_meta(self.eval_args.lora_dir).get("arguments", {})
            opts.update({k: args[k] for k in opts if k in args})
        if getattr(self.eval_args, "cutoff_len", None):
            opts["cutoff_len"] = self.eval_args.cutoff_len
        return opts


def progress(total, initial, desc):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="item", desc=desc, dynamic_ncols=True)


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def right_pad(seqs, pad_id):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def sequence_logprobs(model, seqs, pad_id, wanted):
    """log p(target | prefix) for each sequence's wanted (positions, targets), positions[i] being the position whose
    logits predict targets[i]: a list of lists. The sequences run right-padded in one forward; the LM head runs only
    at the positions some sequence needs (`logits_to_keep`) where the model takes that, e.g. one position per
    sequence for a multiple-choice letter, instead of (batch x width x vocab) logits."""
    import torch

    ids, mask = right_pad(seqs, pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    union = sorted({p for positions, _ in wanted for p in positions})
    kwargs, column = {}, None
    if union and _keeps_logits(model):
        kwargs["logits_to_keep"] = torch.tensor(union, device=model.device)
        column = {p: i for i, p in enumerate(union)}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
    if column is None:
        logits = logits[:, -ids.shape[1]:]  # prompt-learning methods prepend virtual tokens
    return [token_logprobs(logits[b], [column[p] for p in positions] if column else positions, targets)
            for b, (positions, targets) in enumerate(wanted)]


def _keeps_logits(model):
    """Whether the model's forward takes logits_to_keep as a tensor of positions (transformers' causal LMs) at the
    input's own positions (not after prompt learning's virtual tokens)."""
    import inspect

    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def token_logprobs(row_logits, positions, targets):
    """log p(targets[i] | prefix) where row_logits[positions[i]] predicts it; only these rows are normalised."""
    import torch

    if not positions:
        return []
    lp = row_logits[torch.tensor(positions, device=row_logits.device)].float()
    tgt = torch.tensor(targets, device=row_logits.device)
    return (lp.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(lp, dim=-1)).tolist()


def prompt_key(msgs):
    return digest([[m["role"], m["content"], m.get("input") or ""] for m in msgs])


def excluded_prompts(eval_args):
    if not eval_args.exclude_data:
        return set()
    from utils.data import load_conversations

    convs, _ = load_conversations(eval_args.exclude_data, for_training=True, seed=eval_args.exclude_seed)
    return {prompt_key(split_conversation(c)[0]) for c in convs}


def conversation_items(eval_args, need_answer=True):
    """[(source label, messages)] from --data, minus --exclude_data, at most --limit per source."""
    from utils.data import load_sources

    excluded = excluded_prompts(eval_args)
    out, report = [], []
    for value in eval_args.data:
        for ds, stats in load_sources([value], for_training=need_answer):
            kept, skipped = [], 0
            for msgs in ds["messages"]:
                if prompt_key(split_conversation(msgs)[0]) in excluded:
                    skipped += 1
                    continue
                kept.append(msgs)
                if eval_args.limit and len(kept) >= eval_args.limit:
                    break
            out += [(stats["source"], m) for m in kept]
            report.append({"source": stats["source"], "rows": stats.get("used", len(ds)), "excluded": skipped,
                           "evaluated": len(kept)})
    if not out:
        raise UserError(f"no rows left to evaluate in --data {' '.join(eval_args.data)} (after --exclude_data)")
    return out, report


def local_rows(eval_args, task, make_row, what="rows to evaluate"):
    """The rows of --data's local files for a task that reads whole files, and the first file (for messages).

    make_row(where, row, source label, index in the source) checks one row (a UserError naming `where` for a bad
    one) and returns the item, or None to skip it; --limit counts the items of each source."""
    from utils.data import iter_rows, resolve_sources

    rows, first = [], None
    for src in resolve_sources(eval_args.data):
        if src.count is not None:
            raise UserError(f"--task {task} reads whole files; use --limit instead of ':{src.count:g}'")
        if not src.paths:
            raise UserError(f"--task {task} needs local files; '{src.label}' is not one")
        n = 0
        for path in src.paths:
            first = first or Path(path)
            for where, row, _ in iter_rows(Path(path)):
                item = make_row(where, row, src.label, n)
                if item is None:
                    continue
                if eval_args.limit and n >= eval_args.limit:
                    break
                rows.append(item)
                n += 1
    if not rows:
        raise UserError(f"no {what} in --data {' '.join(eval_args.data)}")
    return rows, first


def md_table(headers, rows):
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
