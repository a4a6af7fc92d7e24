"""Instruction data: resolve --data, read files, convert rows to messages, tokenize with masking.

Every source becomes a list of conversations (lists of {"role", "content"} messages); the template
then renders and tokenizes them so that labels are -100 on every token outside an answer.
"""
import json
import random
from pathlib import Path

import yaml

from utils.errors import UserError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def registry():
    return yaml.safe_load((DATA_DIR / "registry.yaml").read_text(encoding="utf-8"))["datasets"]


def resolve_source(name):
    """A --data value -> (label, path, format)."""
    reg = registry()
    if name in reg:
        entry = reg[name]
        path = Path(entry["path"])
        path = path if path.is_absolute() else DATA_DIR / path
        if not path.is_file():
            raise UserError(f"dataset '{name}' is registered but {path} is missing; restore it or pass a file path")
        return name, path, entry.get("format", "alpaca")
    path = Path(name)
    if path.is_file():
        return name, path, "alpaca"
    raise UserError(f"--data '{name}' is neither a registered dataset ({', '.join(reg)}) nor an existing file; "
                    "pass a registry name or the path of a .json/.jsonl file")


def read_rows(path):
    """Rows of a .json (list of objects) or .jsonl file, with row numbers for error messages."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path} line {n} is not valid JSON ({exc.msg}); fix or remove that line") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file or use .jsonl") from None
    if not isinstance(rows, list):
        raise UserError(f"{path} must hold a JSON list of rows (or be a .jsonl file with one row per line)")
    return rows


def alpaca_to_messages(row, where, require_output=True):
    from utils.templates import alpaca_messages

    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object; alpaca rows look like "
                        '{"instruction": ..., "input": ..., "output": ...}')
    for key in ("instruction", "output") if require_output else ("instruction",):
        if key not in row:
            raise UserError(f"{where} has no '{key}' field (it has: {', '.join(row) or 'nothing'}); alpaca rows "
                            "need instruction, output and optionally input")
        if not isinstance(row[key], str):
            raise UserError(f"{where} field '{key}' must be a string, not {type(row[key]).__name__}")
    inp = row.get("input") or ""
    if not isinstance(inp, str):
        raise UserError(f"{where} field 'input' must be a string, not {type(inp).__name__}")
    out = row.get("output")
    if out is not None and not isinstance(out, str):
        raise UserError(f"{where} field 'output' must be a string, not {type(out).__name__}")
    return alpaca_messages(row["instruction"], inp, out)


CONVERTERS = {"alpaca": alpaca_to_messages}


def load_conversations(names, for_training=True):
    """Conversations from every --data source plus per-source statistics.

    For training, rows without an answer are skipped and counted; for prediction they are kept.
    """
    convs, stats = [], []
    for name in names:
        label, path, fmt = resolve_source(name)
        rows = read_rows(path)
        convert = CONVERTERS[fmt]
        kept = empty = 0
        for i, row in enumerate(rows):
            msgs = convert(row, f"{path} row {i + 1}", require_output=for_training)
            if for_training and not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
                empty += 1
                continue
            convs.append(msgs)
            kept += 1
        stats.append({"source": label, "path": str(path), "rows": len(rows), "kept": kept, "empty_output": empty})
    if not convs:
        raise UserError(f"no usable rows in --data {' '.join(names)}; every row had an empty output")
    return convs, stats


def tokenize_conversations(convs, tokenizer, template, cutoff_len, train_on_inputs=False):
    """Tokenize; truncate to cutoff_len; drop (and count) examples left with no trained token."""
    examples, dropped = [], 0
    for msgs in convs:
        ids, labels = template.encode(tokenizer, msgs, train_on_inputs=train_on_inputs)
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(l == -100 for l in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, dropped


def split(examples, val_set_size, seed):
    """Shuffle and hold out val_set_size rows (a count >= 1 or a fraction < 1)."""
    n_val = int(val_set_size) if val_set_size >= 1 else int(round(len(examples) * val_set_size))
    if n_val >= len(examples):
        raise UserError(f"--val_set_size {val_set_size} leaves no training rows out of {len(examples)}; lower it")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


def render_masked(tokenizer, input_ids, labels, open_mark="⟦", close_mark="⟧"):
    """Decode an example, wrapping every trained span in ⟦ ⟧, token by token."""
    out, inside, run = [], False, []

    def flush():
        if run:
            out.append(tokenizer.decode(run))
            run.clear()

    for tok, lab in zip(input_ids, labels):
        trained = lab != -100
        if trained != inside:
            flush()
            out.append(open_mark if trained else close_mark)
            inside = trained
        run.append(tok)
    flush()
    if inside:
        out.append(close_mark)
    return "".join(out)


def length_stats(examples):
    lengths = sorted(len(e["input_ids"]) for e in examples)
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    trained = sum(sum(1 for l in e["labels"] if l != -100) for e in examples)
    return {"examples": len(lengths), "tokens": sum(lengths), "trained_tokens": trained,
            "min": lengths[0], "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": lengths[-1]}
