"""Instruction data: resolve --data, read files, convert rows to conversations, mix, tokenize with masking.

A --data value is `SOURCE[@FORMAT][:N]`:
- SOURCE: a registry name or mix (data/registry.yaml), a local file (.json, .jsonl, .csv, .parquet, .json.gz,
  .jsonl.gz), a directory (every such file in it), or a hub dataset id (user/name);
- @FORMAT: name the format instead of detecting it (see utils/formats.py);
- :N takes N rows (a seeded random sample; more than the source has repeats rows), :0.25 a fraction.
Conversion is cached on disk (an Arrow file per source, keyed by the files' size and mtime); so is
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


def split_spec(value, formats=FORMATS, unknown="unknown format '{fmt}'"):
    """SOURCE[@FORMAT][:N] -> (source, format or None, N or None); FORMAT must be one of `formats`."""
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
        if fmt not in formats:
            raise UserError(f"--data {value}: {unknown.format(fmt=fmt)}; formats are: {', '.join(formats)}")
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
        from utils import hub

        if not hub.reachable():  # no retries against a hub this machine cannot reach
            raise ConnectionError(hub.why_unreachable())
        return hf_hub_download(repo, filename, repo_type="dataset")
    except Exception as exc:  # offline, missing, gated: one sentence, not a traceback
        why = str(exc) if isinstance(exc, ConnectionError) else type(exc).__name__
        raise UserError(f"dataset '{name}' is not available here: {repo}/{filename} is not in the local hub cache "
                        f"and could not be downloaded ({why}); download it on a machine with a "
                        f"network (`huggingface-cli download --repo-type dataset {repo} {filename}`) or pass a "
                        "local file") from None


def resolve_sources(values):
    """Expand --data values (names, mixes, files, directories, hub ids) into Sources."""
    datasets, mixes = registry()
    out = []
    for value in values:
        name, fmt, count = split_spec(value)
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

    def read(self, size=-1):
        try:
            return self.f.read(size)
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


_CHUNK = 1 << 20  # characters of a .json list read at a time
_JSON_WS = re.compile(r"[ \t\n\r]*")


def _stream_json_list(path, f, buf):
    """Yield the rows of a JSON list one at a time, holding about a chunk of the text (not the whole file and all
    its parsed rows). Returns None when done, or the number of rows given when the text needs the repairs of
    _loads (a bad escape) or is not valid JSON: the caller then parses the whole file as before, for the rest of
    its rows or for its error. Raw control characters in strings are accepted here directly, as _loads does."""
    decode = json.JSONDecoder(strict=False).raw_decode
    ws = _JSON_WS.match
    state = {"buf": buf, "pos": ws(buf).end() + 1, "eof": False, "grow": _CHUNK}  # pos: just past "["

    def refill():  # keep the unread text, add the next chunk (larger each time the same row needs more)
        chunk = f.read(state["grow"])
        state.update(buf=state["buf"][state["pos"]:] + chunk, pos=0, eof=not chunk, grow=state["grow"] * 2)

    n = 0
    while True:  # at the start of a row (or of the "]" of an empty list)
        buf, eof = state["buf"], state["eof"]
        pos = state["pos"] = ws(buf, state["pos"]).end()
        if pos == len(buf) and not eof:
            refill()
            continue
        if n == 0 and buf.startswith("]", pos):
            end = pos + 1
            break
        try:
            row, end = decode(buf, pos)
        except json.JSONDecodeError as exc:  # a row cut at the end of the chunk, else one _loads must repair
            if not eof and (exc.msg.startswith("Unterminated string") or exc.pos >= len(buf) - 8):
                refill()
                continue
            return n
        after = ws(buf, end).end()
        if not eof and (after == len(buf) or (type(row) in (int, float) and len(buf) - end < 32
                                              and buf[after] not in ",]")):
            refill()  # what follows the row is not here yet (or a number may go on)
            continue
        if after == len(buf) or buf[after] not in ",]":
            return n
        n += 1
        yield f"{path} row {n}", row, None
        state.update(pos=after + 1, grow=_CHUNK)
        if buf[after] == "]":
            end = after + 1
            break
    rest = state["buf"][end:]
    while rest:  # nothing but whitespace may follow the list
        if rest.strip(" \t\n\r"):
            return n
        rest = f.read(_CHUNK)
    return None


def iter_rows(path):
    """Yield (where, row, declared_format) for every row of a file; where names file and row/line."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as f:
            yield from _iter_json_lines(path, f)
    elif name.endswith((".json", ".json.gz")):
        with _open_text(path) as f:
            head = f.read(_CHUNK)
            if head.lstrip(" \t\n\r").startswith("["):  # a list of rows: parsed one row at a time
                done = yield from _stream_json_list(path, f, head)
                if done is None:
                    return
                text = None
            else:
                done, text = 0, head + f.read()
        if text is None:  # a list that needs _loads' repairs, or is broken: read whole; the rows given are skipped
            with _open_text(path) as f:
                text = f.read()
        rows = _json_file_rows(path, text)
        for _ in range(done):
            next(rows, None)
        yield from rows
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


def _json_file_rows(path, text):
    """Rows of a whole .json text: a list, {"format": ..., "data": [...]}, or JSON lines saved as .json."""
    try:
        data = _loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines saved as .json
            yield from _iter_json_lines(path, text.splitlines())
            return
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file or use "
                        ".jsonl") from None
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
                        f"{str(exc).splitlines()[0][:150]}); check the id, or download it where a network "
                        "exists") from None
    for n, row in enumerate(ds, 1):
        yield f"{src.hub_dataset} row {n}", row, None


def _rows(paths, hub_dataset):
    if paths:
        for p in paths:
            yield from iter_rows(Path(p))
    else:
        yield from _iter_hub(Source(label=hub_dataset, hub_dataset=hub_dataset))


PROGRESS_MIN_BYTES = 8 << 20  # files at least this large (~20,000 alpaca rows) show a conversion progress bar


def _conversion_bar(paths):
    """A rows/s progress bar (stderr) for converting large files; None for small ones."""
    if sum(Path(p).stat().st_size for p in paths) < PROGRESS_MIN_BYTES:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="converting", unit=" rows", mininterval=1.0)


def _generate(paths_json, hub_dataset, fmt, columns, unescape, for_training, stats_file):
    """Yield {"messages": [...]} per kept row; write the source's statistics when done."""
    paths = json.loads(paths_json)  # a string, not a list: datasets would shard a list over several calls
    stats = {"rows": 0, "skipped": 0, "format": fmt, "skipped_because": {}}
    kept = 0
    bar = _conversion_bar(paths)
    for where, row, declared in _rows(paths, hub_dataset):
        if stats["format"] is None:
            stats["format"] = declared or detect_format(row, where)
        stats["rows"] += 1
        if bar is not None and stats["rows"] % 1000 == 0:
            bar.update(1000)
        msgs = convert_row(row, stats["format"], where, for_training, columns, index=stats["rows"] - 1,
                           unescape=unescape, skipped=stats["skipped_because"])
        if msgs is None:
            stats["skipped"] += 1
            continue
        kept += 1
        yield {"messages": msgs}
    if bar is not None:
        bar.update(stats["rows"] % 1000)
        bar.close()
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
    parts = [src.label, src.format, json.dumps(src.columns, sort_keys=True), src.unescape, for_training,
             src.hub_dataset, 2]  # 2: the cache's layout (one Arrow file per source)
    for p in src.paths:
        st = Path(p).stat()
        parts += [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _features():
    import datasets

    return datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                          "content": datasets.Value("string"),
                                                          "input": datasets.Value("string")})})


CONVERT_BATCH = 10_000  # converted rows written to Arrow at a time


def load_source(src, for_training=True):
    """(Dataset of {"messages"}, stats) for one source; converted once, then read from the Arrow cache.

    The rows are converted as they are read and written to an Arrow file CONVERT_BATCH rows at a time (pyarrow
    builds each batch in one call; memory holds one batch, not the file); later runs memory-map that file."""
    from utils.models import cache_dir

    key = _source_key(src, for_training)
    root = cache_dir() / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    stats_file = root / f"stats-{key}.json"
    arrow_file = root / f"conversations-{key}.arrow"
    if not arrow_file.is_file():
        _convert(dict(paths_json=json.dumps([str(p) for p in src.paths]), hub_dataset=src.hub_dataset,
                      fmt=src.format, columns=src.columns, unescape=src.unescape, for_training=for_training,
                      stats_file=str(stats_file)), arrow_file)
    ds = _open_arrow(arrow_file, key)
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {"rows": len(ds), "skipped": 0}
    return ds, dict(stats, source=src.label, kept=len(ds), origin=src.origin or src.label)


def _convert(gen_kwargs, arrow_file):
    """Write _generate's rows to `arrow_file` (an Arrow stream with the datasets features in its schema), through
    a temporary file renamed when complete: an interrupted conversion leaves no cache behind."""
    import pyarrow as pa

    schema = _features().arrow_schema
    tmp = arrow_file.with_name(f"{arrow_file.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            batch = []
            for example in _generate(**gen_kwargs):  # it writes the stats file when done
                batch.append(example)
                if len(batch) == CONVERT_BATCH:
                    writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
        os.replace(tmp, arrow_file)
    finally:
        tmp.unlink(missing_ok=True)


def _open_arrow(arrow_file, key):
    """The memory-mapped Dataset of a conversion, fingerprinted by its source key (files, sizes, mtimes, options):
    the tokenization cache of the same source is found again in the next run."""
    import datasets
    from datasets.table import MemoryMappedTable

    return datasets.Dataset(MemoryMappedTable.from_file(str(arrow_file)), fingerprint=f"conversations-{key}")


def sample_indices(total, count, seed, none_selected):
    """Seeded indices of N rows (>= 1) or a fraction (< 1) of `total`: more than there are gives whole copies plus a
    sample; none selected raises UserError(none_selected)."""
    n = int(round(total * count)) if count < 1 else int(count)
    if n == 0:
        raise UserError(none_selected)
    rng = random.Random(seed)
    if n <= total:
        return rng.sample(range(total), n)
    return list(range(total)) * (n // total) + rng.sample(range(total), n % total)


def _sample(ds, count, seed, label):
    if count is None:
        return ds
    return ds.select(sample_indices(len(ds), count, seed, f"--data {label}:{count} selects no rows out of {len(ds)}"))


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
# Inputs at least this large get a progress bar (rows/s) and, on a machine with several idle cores, one
# tokenizing process per idle core (below it, starting the processes costs more than they save).
PROGRESS_MIN_ROWS = 20_000
PROCS_MIN_ROWS = 50_000
MAX_PROCS = 8
SHARD_SUFFIX = "_{rank:05d}_of_{num_proc:05d}"  # the cache file of each process's part: name_00000_of_00002.arrow


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _idle_cores():
    """Cores not kept busy by other work: this process's cores less the 1-minute load average (which counts this
    process too), at least 1."""
    cores = _cores()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return cores
    return max(1, min(cores, round(cores - load) + 1))


def map_procs(rows):
    """Processes for tokenizing `rows` examples: one per idle core (up to MAX_PROCS) for large inputs, else None
    (one process, in which the fast tokenizer still spreads each batch over the cores). On a busy machine more
    processes than idle cores would only share the same cores, and each costs its start and memory.
    ALPACA_COT_NUM_PROC=N sets the number instead (1: always this one process)."""
    forced = os.environ.get("ALPACA_COT_NUM_PROC", "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise UserError(f"ALPACA_COT_NUM_PROC={forced} is not a number of processes; set it to 1 or more, or "
                            "unset it (one process per idle core)")
        return int(forced) if int(forced) > 1 else None
    procs = min(_idle_cores(), MAX_PROCS)
    return procs if rows >= PROCS_MIN_ROWS and procs > 1 else None


def _cached_layout(cache_file):
    """(True, procs) when the tokenization is cached at `cache_file` as one file (procs None) or as the parts of
    `procs` processes; (False, None) when it is not."""
    if cache_file.is_file():
        return True, None
    for part in sorted(cache_file.parent.glob(f"{cache_file.stem}_00000_of_*{cache_file.suffix}")):
        return True, int(part.stem.rsplit("_of_", 1)[1])
    return False, None


def _token_features():
    import datasets

    return datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                              "labels": datasets.List(datasets.Value("int32"))})


def tokenize_dataset(ds, tokenizer, template, cutoff_len, train_on_inputs=False, cot_prompt=False):
    """Map a {"messages"} Dataset to {"input_ids", "labels"}, cached; returns (dataset, dropped).

    Each batch of rows is encoded by template.encode_batch (the ids and labels of template.encode, one
    tokenizer call per batch); large inputs are split over one process per idle core and show a progress bar.
    A Dataset on disk (a converted source) keeps its tokenization beside it, found again by a later run however
    many processes made it."""
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else ""
    key = (ds._fingerprint, tokenizer.name_or_path, len(tokenizer), backend, template.to_json(), cutoff_len,
           train_on_inputs, cot_prompt, 3)
    fingerprint = hashlib.sha256(repr(key).encode()).hexdigest()[:16]

    files, read = [c["filename"] for c in ds.cache_files], {}

    def encode(batch):
        convs = [add_cot_prompt(m) for m in batch["messages"]] if cot_prompt else batch["messages"]
        out = {"input_ids": [], "labels": []}
        for ids, labels in template.encode_batch(tokenizer, convs, train_on_inputs=train_on_inputs):
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
            if labels.count(-100) < len(labels):  # no answer token left: drop (counted by the caller)
                out["input_ids"].append(ids)
                out["labels"].append(labels)
        if files:
            _hand_back(read, files)
        return out

    import datasets

    cache_file = (Path(ds.cache_files[0]["filename"]).parent / f"tokenized-{fingerprint}.arrow"
                  if ds.cache_files else None)
    cached, procs = _cached_layout(cache_file) if cache_file else (False, None)
    if not cached:
        procs = map_procs(len(ds))
    if cached or len(ds) < PROGRESS_MIN_ROWS:
        datasets.disable_progress_bars()
    try:
        with _quiet_fork_warning(procs):
            tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, new_fingerprint=fingerprint,
                               features=_token_features(), num_proc=procs, desc="tokenizing",
                               cache_file_name=str(cache_file) if cache_file else None, suffix_template=SHARD_SUFFIX)
    finally:
        datasets.enable_progress_bars()
    _MappedFiles(files).release_all()
    return tokenized, len(ds) - len(tokenized)


def _hand_back(read, files, every=16):
    """Every `every` batches, hand back this process's mapped pages of the conversations it has read (each is
    read once, in order): the memory of tokenizing stays the same however many rows there are."""
    read["batches"] = read.get("batches", 0) + 1
    if read["batches"] % every == 0:
        _MappedFiles(files).release_all()  # the mappings as they are now (each tokenizing process has its own)


@contextlib.contextmanager
def _quiet_fork_warning(procs):
    """Tokenizing processes are forked: the Rust tokenizer's threads are turned off in them (each process is one
    core's worth of work) without its warning about having been forked."""
    if not procs or "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def tokenize_conversations(convs, tokenizer, template, cutoff_len, train_on_inputs=False):
    """Tokenize; truncate to cutoff_len; drop (and count) examples left with no trained token."""
    examples, dropped, convs = [], 0, list(convs)
    encoded = (e for i in range(0, len(convs), 1000)
               for e in template.encode_batch(tokenizer, convs[i:i + 1000], train_on_inputs=train_on_inputs))
    for ids, labels in encoded:
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
    if hasattr(examples, "select"):  # fingerprinted by what makes the order (datasets would hash the whole order)
        def key(part):
            return hashlib.sha256(repr((examples._fingerprint, "split", len(examples), n_val, seed, part))
                                  .encode()).hexdigest()[:16]
        return (examples.select(order[n_val:], new_fingerprint=key("train")),
                examples.select(order[:n_val], new_fingerprint=key("val")))
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
    if hasattr(examples, "column_names"):  # a Dataset: counted on its Arrow columns, a batch at a time
        lengths, trained = _arrow_length_stats(examples)
    else:
        lengths = sorted(len(e["input_ids"]) for e in examples)
        trained = sum(sum(1 for l in e["labels"] if l != -100) for e in examples)
    at = lambda i: int(lengths[i])  # noqa: E731
    pct = lambda q: at(min(len(lengths) - 1, int(q * len(lengths))))  # noqa: E731
    return {"examples": len(lengths), "tokens": int(sum(lengths)) if isinstance(lengths, list) else int(lengths.sum()),
            "trained_tokens": int(trained), "min": at(0), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "max": at(-1)}


def _arrow_length_stats(ds, window=20_000):
    """(sorted lengths, trained tokens) of a tokenized Dataset, read from its Arrow labels column (offsets and
    values: no Python lists, and input_ids is never touched), rows window by window; the Dataset's row
    selection (a split) is applied to the per-row counts. The pages of the labels that this reads from the
    Dataset's memory-mapped files are handed back window by window (_MappedFiles), so counting a million rows
    does not leave their labels resident in this process."""
    import numpy as np

    mapped = _MappedFiles([c["filename"] for c in ds.cache_files])
    lengths, trained = [], []
    for chunk in ds.data.column("labels").chunks:
        offsets = chunk.offsets.to_numpy()  # into chunk.values, which a sliced chunk does not slice
        values = chunk.values
        data, width = values.buffers()[1], values.type.bit_width // 8
        for lo in range(0, len(chunk), window):
            off = offsets[lo:lo + window + 1].astype(np.int64)
            vals = values.slice(off[0], off[-1] - off[0]).to_numpy(zero_copy_only=False)
            cum = np.concatenate(([0], np.cumsum(vals != -100, dtype=np.int64)))
            lengths.append(np.diff(off))
            trained.append(cum[off[1:] - off[0]] - cum[off[:-1] - off[0]])
            del vals
            if data is not None:
                mapped.release(data.address + (values.offset + int(off[0])) * width, int(off[-1] - off[0]) * width)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    trained = np.concatenate(trained) if trained else np.zeros(0, dtype=np.int64)
    if ds._indices is not None:  # a selection of the table's rows (split, sample)
        rows = ds._indices.column(0).to_numpy()
        lengths, trained = lengths[rows], trained[rows]
    return np.sort(lengths), int(trained.sum())


class _MappedFiles:
    """Where this process maps the given files now (Linux: /proc/self/maps; elsewhere nothing is known or handed
    back). Pages of such a read-only file mapping that are handed back (MADV_DONTNEED) keep their data in the file
    and the page cache, and are read back from there if used again; they only stop counting in this process's
    memory. Use it at once: a mapping freed later could leave its addresses to other memory."""

    def __init__(self, files):
        import mmap

        want = {os.path.realpath(f) for f in files}
        self.ranges, self.madvise, self.page = [], None, mmap.PAGESIZE
        if not want or not hasattr(mmap, "MADV_DONTNEED"):
            return
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[5].rstrip("\n") in want and not fields[1].startswith("rw"):
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        self.ranges.append((lo, hi))
        except OSError:
            return
        if self.ranges:
            import ctypes

            madvise = ctypes.PyDLL(None).madvise  # called holding the GIL: no Python code frees a mapping meanwhile
            madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            self.madvise, self.dontneed = madvise, mmap.MADV_DONTNEED

    def release_all(self):
        for start, end in self.ranges:
            self.madvise(start, end - start, self.dontneed)

    def release(self, address, size):
        """Hand back the pages of [address, address + size) if it lies inside one of those mappings (the memory of
        a live buffer of the Dataset); memory anywhere else is never touched."""
        if self.madvise is None or size <= 0:
            return
        lo = address // self.page * self.page
        hi = -(-(address + size) // self.page) * self.page
        for start, end in self.ranges:
            if start <= lo and hi <= end:
                self.madvise(lo, hi - lo, self.dontneed)
                return


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
    mix_rows = ["", "| mix | datasets |", "|---|---|"]
    mix_rows += [f"| `{m}` | {', '.join(parts)} |" for m, parts in mixes.items()]
    return "\n".join(rows + (mix_rows if mixes else [])) + "\n"


if __name__ == "__main__":
    print(registry_table(), end="")
