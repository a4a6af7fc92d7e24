"""Instruction data: resolve --data, read files, convert rows to conversations, mix, tokenize with masking.

A --data value is `SOURCE[@FORMAT][:N]`:
- SOURCE: a registry name or mix (data/registry.yaml), a local file (.json, .jsonl, .csv, .parquet, .json.gz,
  .jsonl.gz), a directory (every such file in it), or a hub dataset id (user/name);
- @FORMAT: name the format instead of detecting it (see utils/formats.py);
- :N takes N rows (a seeded random sample; more than the source has repeats rows), :0.25 a fraction.
Conversion is cached on disk (datasets' Arrow cache, keyed by the files' size and mtime); so is
tokenization (keyed by the data, tokenizer, template and options).
"""
import contextlib
import csv
import difflib
import gzip
import hashlib
import io
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from utils.errors import UserError
from utils.formats import CJK, FORMATS, SKIP_REASONS, add_cot_prompt, convert_row, detect_format

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data"
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".json.gz", ".jsonl.gz")


def registry():
    reg = yaml.safe_load((DATA_DIR / "registry.yaml").read_text(encoding="utf-8"))
    return reg.get("datasets") or {}, reg.get("mixes") or {}


@dataclass
class Source:
    label: str
    paths: list = field(default_factory=list)   # local files
    hub_dataset: str = None                     # a hub dataset id read with datasets.load_dataset
    format: str = None
    columns: dict = None
    unescape: bool = False
    count: float = None                         # N rows (>= 1) or a fraction (< 1)
    origin: str = None                          # where a registry dataset was found (local copy or hub)


def _split_spec(value):
    name, count = value, None
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            count = float(tail)
        except ValueError:
            pass
        else:
            name = head
            if count <= 0:
                raise UserError(f"--data {value}: the sample size after ':' must be positive")
    fmt = None
    if "@" in name:
        name, fmt = name.rsplit("@", 1)
        if fmt not in FORMATS:
            raise UserError(f"--data {value}: unknown format '{fmt}'; formats are: {', '.join(FORMATS)}")
    return name, fmt, count


def _files_in(path):
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise UserError(f"directory {path} has no data files ({', '.join(SUFFIXES)})")
        return files
    return [path]


def _registry_source(name, entry, fmt, count):
    """A registry entry: local copies first (project data/, then `local` paths), else the hub file."""
    src = Source(label=name, format=fmt or entry.get("format"), columns=entry.get("columns"),
                 unescape=bool(entry.get("unescape_newlines")), count=count)
    candidates = ([DATA_DIR / entry["path"]] if entry.get("path") else [])
    candidates += [(ROOT / p).resolve() for p in entry.get("local") or []]
    for c in candidates:
        if c.exists():
            src.paths = _files_in(c)
            src.origin = os.path.relpath(c, ROOT)
            return src
    hub = entry.get("hub")
    if not hub:
        raise UserError(f"dataset '{name}' has no local copy ({', '.join(map(str, candidates))}); restore it or "
                        "pass a file path")
    files = hub["file"] if isinstance(hub["file"], list) else [hub["file"]]
    src.paths = [Path(_hub_file(name, hub["repo"], f)) for f in files]
    src.origin = f"hub {hub['repo']}"
    return src


def _hub_file(name, repo, filename):
    from huggingface_hub import hf_hub_download

    try:  # the local hub cache first: no network round trip when the file is already here
        return hf_hub_download(repo, filename, repo_type="dataset", local_files_only=True)
    except Exception:
        pass
    try:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise ConnectionError("HF_HUB_OFFLINE is set")
        return hf_hub_download(repo, filename, repo_type="dataset")
    except Exception as exc:  # offline, missing, gated: one sentence, not a traceback
        raise UserError(f"dataset '{name}' is not available here: {repo}/{filename} is not in the local hub cache "
                        f"and could not be downloaded ({type(exc).__name__}); download it on a machine with a "
                        f"network (`huggingface-cli download --repo-type dataset {repo} {filename}`) or pass a "
                        "local file") from None


def resolve_sources(values):
    """Expand --data values (names, mixes, files, directories, hub ids) into Sources."""
    datasets, mixes = registry()
    out = []
    for value in values:
        name, fmt, count = _split_spec(value)
        if name in datasets:
            out.append(_registry_source(name, datasets[name], fmt, count))
        elif name in mixes:
            if count is not None:
                raise UserError(f"--data {value}: a sample size applies to one dataset, not to the mix '{name}'; "
                                f"write its parts ({' '.join(mixes[name])}) with sizes instead")
            out += [_registry_source(part, datasets[part], fmt, None) for part in mixes[name]]
        elif Path(name).exists():
            out.append(Source(label=name, paths=_files_in(Path(name)), format=fmt, count=count))
        elif name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith(SUFFIXES):
            out.append(Source(label=name, hub_dataset=name, format=fmt, count=count))
        else:
            hint = difflib.get_close_matches(name, [*datasets, *mixes], n=1)
            if hint:
                raise UserError(f"--data '{name}' is not a registered dataset or mix; did you mean '{hint[0]}'? "
                                "(see `python -m utils.data` for the registry)")
            raise UserError(f"--data '{name}' is neither a registered dataset or mix nor an existing file or "
                            "directory; see `python -m utils.data` for the registry, or pass a file path")
    return out


# ---- reading ----------------------------------------------------------------------------------------
_SAMPLE = 1 << 16  # bytes read to decide a file's encoding


def _raw(path):
    """A binary stream of the file's bytes (gunzipped for .gz), with a clear error for a file that is not gzip."""
    if not path.name.endswith(".gz"):
        return open(path, "rb", buffering=_SAMPLE)
    f = gzip.open(path, "rb")
    try:
        f.peek(1)
    except (OSError, EOFError) as exc:
        f.close()
        raise UserError(f"{path} is not a readable gzip file ({exc}); compress it with gzip or drop the .gz "
                        "suffix") from None
    return f


def _encoding(path, sample):
    """utf-8 (a BOM is dropped); GB18030 for Chinese files saved in GBK / GB2312; otherwise one clear sentence."""
    import codecs

    if not sample.strip():
        raise UserError(f"{path} is empty; pass a file with data rows")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
        return "utf-8-sig"
    except UnicodeDecodeError as exc:
        bad = exc
    try:
        text = codecs.getincrementaldecoder("gb18030")().decode(sample, final=False)
    except UnicodeDecodeError:
        text = ""
    if CJK.search(text):
        if str(path) not in _NOTED:
            _NOTED.add(str(path))
            print(f"note: {path} is not UTF-8; reading it as GB18030 (GBK), the usual encoding of Chinese files "
                  "saved on Windows", file=sys.stderr)
        return "gb18030"
    raise UserError(f"{path} is not UTF-8 text (byte 0x{sample[bad.start]:02x} at offset {bad.start} is invalid) "
                    "and not GBK either; save it as UTF-8") from None


_NOTED = set()


@contextlib.contextmanager
def _open_text(path):
    """The file as text, its encoding detected from its first bytes (see _encoding); .gz is decompressed."""
    raw = _raw(path)
    try:
        encoding = _encoding(path, raw.peek(_SAMPLE)[:_SAMPLE] if hasattr(raw, "peek") else b"")
        with io.TextIOWrapper(raw, encoding=encoding, newline="") as f:
            yield _Checked(f, path)
    finally:
        raw.close()


class _Checked:
    """Iterate / read a text stream, turning a decoding error or a truncated .gz into one sentence."""

    def __init__(self, f, path):
        self.f, self.path = f, path

    def _fail(self, exc):
        if isinstance(exc, UnicodeDecodeError):
            raise UserError(f"{self.path} is not valid {self.f.encoding} text further in ({exc.reason}); save the "
                            "whole file as UTF-8") from None
        raise UserError(f"{self.path} is truncated or damaged ({exc}); copy it again") from None

    def read(self):
        try:
            return self.f.read()
        except (UnicodeDecodeError, EOFError, OSError) as exc:
            self._fail(exc)

    def __iter__(self):
        it = iter(self.f)
        while True:
            try:
                line = next(it)
            except StopIteration:
                return
            except (UnicodeDecodeError, EOFError, OSError) as exc:
                self._fail(exc)
            yield line


_BAD_ESCAPE = re.compile(r'\\(?!["\\/bfnrtu])')


def _loads(text):
    """json.loads that also accepts raw control characters and lone backslashes (common in scraped data)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if "control character" in exc.msg:
            return _loads_lenient(text)
        if "escape" not in exc.msg:
            raise
        return _loads_lenient(_BAD_ESCAPE.sub(r"\\\\", text))


def _loads_lenient(text):
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        if "escape" in exc.msg:
            return json.loads(_BAD_ESCAPE.sub(r"\\\\", text), strict=False)
        raise


def _iter_json_lines(path, lines, max_join=20):
    """JSON lines; a record broken over several lines by a raw newline inside a string is joined back."""
    pending, start = "", 0
    for n, line in enumerate(lines, 1):
        if not pending and not line.strip():
            continue
        if not pending:
            start = n
        pending += line
        try:
            row = _loads(pending)
        except json.JSONDecodeError as exc:
            if exc.msg.startswith("Unterminated string") and n - start < max_join:
                continue
            raise UserError(f"{path} line {start} is not valid JSON ({exc.msg}); fix or remove that line") from None
        pending = ""
        yield f"{path} line {start}", row, None
    if pending:
        raise UserError(f"{path} line {start} is not valid JSON (the file ends inside a record); fix that line")


def iter_rows(path):
    """Yield (where, row, declared_format) for every row of a file; where names file and row/line."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as f:
            yield from _iter_json_lines(path, f)
    elif name.endswith((".json", ".json.gz")):
        with _open_text(path) as f:
            text = f.read()
        try:
            data = _loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines saved as .json
                yield from _iter_json_lines(path, text.splitlines())
                return
            raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file or use .jsonl") from None
        declared = None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            declared = data.get("format")  # a file may name its own format: {"format": ..., "data": [...]}
            if declared is not None and declared not in FORMATS:
                raise UserError(f"{path} names an unknown format '{declared}'; formats are: {', '.join(FORMATS)}")
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{path} must hold a JSON list of rows (or be a .jsonl file with one row per line)")
        for n, row in enumerate(data, 1):
            yield f"{path} row {n}", row, declared
    elif name.endswith(".csv"):
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            try:
                for n, row in enumerate(reader, 2):
                    if None in row:  # more cells than header columns
                        raise UserError(f"{path} line {n} has {len(reader.fieldnames) + len(row[None])} cells but "
                                        f"the header names {len(reader.fieldnames)} columns; quote cells that hold "
                                        "commas")
                    yield f"{path} line {n}", row, None
            except csv.Error as exc:
                raise UserError(f"{path} line {reader.line_num} is not valid CSV ({exc}); fix that line") from None
    elif name.endswith(".parquet"):
        yield from _parquet_rows(path)
    else:
        raise UserError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")


def _parquet_rows(path):
    import pyarrow
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; pass a file with data rows")
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1000)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield f"{path} row {n}", row, None
    except (pyarrow.ArrowInvalid, pyarrow.ArrowIOError, OSError) as exc:
        raise UserError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0][:150]}); write it with "
                        "pandas.to_parquet / pyarrow, or use .json / .jsonl / .csv") from None


def _iter_hub(src):
    try:
        import datasets

        ds = datasets.load_dataset(src.hub_dataset, split="train")
    except Exception as exc:
        raise UserError(f"cannot load hub dataset '{src.hub_dataset}' ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:150]}); check the id, or download it where a network exists") from None
    for n, row in enumerate(ds, 1):
        yield f"{src.hub_dataset} row {n}", row, None


def _rows(paths, hub_dataset):
    if paths:
        for p in paths:
            yield from iter_rows(Path(p))
    else:
        yield from _iter_hub(Source(label=hub_dataset, hub_dataset=hub_dataset))


def _generate(paths_json, hub_dataset, fmt, columns, unescape, for_training, stats_file):
    """Yield {"messages": [...]} per kept row; write the source's statistics when done."""
    paths = json.loads(paths_json)  # a string, not a list: datasets would shard a list over several calls
    stats = {"rows": 0, "skipped": 0, "format": fmt, "skipped_because": {}}
    kept = 0
    for where, row, declared in _rows(paths, hub_dataset):
        if stats["format"] is None:
            stats["format"] = declared or detect_format(row, where)
        stats["rows"] += 1
        msgs = convert_row(row, stats["format"], where, for_training, columns, index=stats["rows"] - 1,
                           unescape=unescape, skipped=stats["skipped_because"])
        if msgs is None:
            stats["skipped"] += 1
            continue
        kept += 1
        yield {"messages": msgs}
    name = ", ".join(paths) or hub_dataset
    if stats["rows"] == 0:
        raise UserError(f"{name} has no rows")
    if kept == 0:
        why = stats["skipped_because"]
        if why and "no_answer" not in why:
            reasons = ", ".join(f"{n} with {SKIP_REASONS[r]}" for r, n in why.items())
            raise UserError(f"none of the {stats['rows']} rows of {name} ({stats['format']} format) can be used: "
                            f"{reasons}; fix the rows' turns")
        raise UserError(f"none of the {stats['rows']} rows of {name} ({stats['format']} format) has an answer to "
                        "train on; use predict.py for prompt-only data, or check the output column")
    Path(stats_file).write_text(json.dumps(stats))


def _source_key(src, for_training):
    """Identity of a source's conversion: files (path, size, mtime), format and options."""
    parts = [src.label, src.format, json.dumps(src.columns, sort_keys=True), src.unescape, for_training, src.hub_dataset]
    for p in src.paths:
        st = Path(p).stat()
        parts += [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _features():
    import datasets

    return datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                          "content": datasets.Value("string"),
                                                          "input": datasets.Value("string")})})


def load_source(src, for_training=True):
    """(Dataset of {"messages"}, stats) for one source; converted once, then read from datasets' cache."""
    import datasets

    from utils.models import cache_dir

    key = _source_key(src, for_training)
    root = cache_dir() / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    stats_file = root / f"stats-{key}.json"
    kwargs = {"paths_json": json.dumps([str(p) for p in src.paths]), "hub_dataset": src.hub_dataset, "fmt": src.format,
              "columns": src.columns, "unescape": src.unescape, "for_training": for_training,
              "stats_file": str(stats_file)}
    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_generator(_generate, gen_kwargs=kwargs, features=_features(), cache_dir=str(root))
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):
            raise
        raise UserError(f"{src.label} has no rows to use; check the file") from None
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    finally:
        datasets.enable_progress_bars()
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {"rows": len(ds), "skipped": 0}
    return ds, dict(stats, source=src.label, kept=len(ds), origin=src.origin or src.label)


def _sample(ds, count, seed, label):
    if count is None:
        return ds
    total = len(ds)
    n = int(round(total * count)) if count < 1 else int(count)
    if n == 0:
        raise UserError(f"--data {label}:{count} selects no rows out of {total}")
    rng = random.Random(seed)
    idx = rng.sample(range(total), n) if n <= total else list(range(total)) * (n // total) + rng.sample(range(total), n % total)
    return ds.select(idx)  # more than the source has: whole copies plus a sample


def load_sources(values, for_training=True, seed=42):
    """[(Dataset of {"messages"}, stats)] for every --data value, sampled as asked."""
    out = []
    for src in resolve_sources(values):
        ds, stats = load_source(src, for_training)
        ds = _sample(ds, src.count, seed, src.label)
        out.append((ds, dict(stats, used=len(ds))))
    if sum(len(ds) for ds, _ in out) == 0:
        raise UserError(f"no usable rows in --data {' '.join(values)}; every row lacked an answer")
    return out


def load_conversations(values, for_training=True, seed=42, cot_prompt=False):
    """Conversations (lists of messages) from every --data value, plus per-source statistics."""
    convs, stats = [], []
    for ds, st in load_sources(values, for_training, seed):
        got = ds["messages"]
        convs += [add_cot_prompt(c) for c in got] if cot_prompt else got
        stats.append(st)
    return convs, stats


# ---- tokenization ---------------------------------------------------------------------------------
def tokenize_dataset(ds, tokenizer, template, cutoff_len, train_on_inputs=False, cot_prompt=False):
    """Map a {"messages"} Dataset to {"input_ids", "labels"}, cached; returns (dataset, dropped)."""
    fingerprint = hashlib.sha256(repr((ds._fingerprint, tokenizer.name_or_path, len(tokenizer),
                                       tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else "",
                                       template.to_json(), cutoff_len, train_on_inputs, cot_prompt, 2)).encode()).hexdigest()[:16]

    def encode(batch):
        out = {"input_ids": [], "labels": []}
        for msgs in batch["messages"]:
            if cot_prompt:
                msgs = add_cot_prompt(msgs)
            ids, labels = template.encode(tokenizer, msgs, train_on_inputs=train_on_inputs)
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
            if any(l != -100 for l in labels):  # no answer token left: drop (counted by the caller)
                out["input_ids"].append(ids)
                out["labels"].append(labels)
        return out

    import datasets

    datasets.disable_progress_bars()
    try:
        tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, new_fingerprint=fingerprint)
    finally:
        datasets.enable_progress_bars()
    return tokenized, len(ds) - len(tokenized)


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
    """Shuffle and hold out val_set_size rows (a count >= 1 or a fraction < 1); works on lists and Datasets."""
    n_val = int(val_set_size) if val_set_size >= 1 else int(round(len(examples) * val_set_size))
    if n_val >= len(examples):
        raise UserError(f"--val_set_size {val_set_size} leaves no training rows out of {len(examples)}; lower it")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if hasattr(examples, "select"):
        return examples.select(order[n_val:]), examples.select(order[:n_val])
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


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
    ids = examples["input_ids"] if hasattr(examples, "column_names") else [e["input_ids"] for e in examples]
    labels = examples["labels"] if hasattr(examples, "column_names") else [e["labels"] for e in examples]
    lengths = sorted(len(i) for i in ids)
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    trained = sum(sum(1 for l in lab if l != -100) for lab in labels)
    return {"examples": len(lengths), "tokens": sum(lengths), "trained_tokens": trained,
            "min": lengths[0], "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": lengths[-1]}


# ---- the registry listing -------------------------------------------------------------------------
def availability(entry):
    for p in ([DATA_DIR / entry["path"]] if entry.get("path") else []) + [ROOT / p for p in entry.get("local") or []]:
        if p.exists():
            return f"local ({os.path.relpath(p, ROOT)})"
    hub = entry.get("hub")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            files = hub["file"] if isinstance(hub["file"], list) else [hub["file"]]
            if all(isinstance(try_to_load_from_cache(hub["repo"], f, repo_type="dataset"), str) for f in files):
                return "hub cache"
        except Exception:
            pass
        return "download needed"
    return "missing"


def registry_table(available=True):
    """Markdown table of the registry; `available` adds where each dataset can be read on this machine."""
    datasets, mixes = registry()
    head = "| name | rows | lang | task | gen | format | source |" + (" available here |" if available else "")
    rows = [head, "|" + "---|" * head.count(" |")]
    for name, e in datasets.items():
        hub = e.get("hub")
        files = hub and (hub["file"] if isinstance(hub["file"], list) else [hub["file"]])
        where = f"data/{e['path']}" if e.get("path") else (f"{hub['repo']}: {', '.join(files)}" if hub else "-")
        rows.append(f"| `{name}` | {e.get('size', '?')} | {e.get('lang', '')} | {e.get('task', '')} | "
                    f"{e.get('gen', '')} | {e.get('format', 'detected')} | {where} |"
                    + (f" {availability(e)} |" if available else ""))
    mix_rows = ["", "| mix | datasets |", "|---|---|"] + [f"| `{m}` | {', '.join(parts)} |" for m, parts in mixes.items()]
    return "\n".join(rows + (mix_rows if mixes else [])) + "\n"


if __name__ == "__main__":
    print(registry_table(), end="")
