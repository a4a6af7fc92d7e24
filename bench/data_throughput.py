"""Data preparation: `uniform_finetune.py --dry_run` on a large file vs the fast tokenizer alone, same texts.

Run by hand, not in CI:

    .venv/bin/python bench/data_throughput.py                  # 200,000 rows as .json and .jsonl, all cores
    .venv/bin/python bench/data_throughput.py --cores 1        # everything pinned to one core
    .venv/bin/python bench/data_throughput.py --big            # also the 1,000,000-row .jsonl (memory target;
                                                               # its ratio uses the tokenizer rate of --rows)
    .venv/bin/python bench/data_throughput.py --rows 20000 --formats json   # a quick look
    .venv/bin/python bench/data_throughput.py --num_proc 2     # two tokenizing processes, however busy the machine

Input: the real CoT rows of ../shared/data/cot/*.json (alpaca format, read in place), repeated to --rows rows and
written to a temporary directory as a JSON list (.json) and as JSON lines (.jsonl).

ours: `uniform_finetune.py --dry_run --data FILE` (the embedded SmolLM2-135M-Instruct and its chat template unless
--template / --model_name_or_path say otherwise) in a fresh process with a fresh data cache (ALPACA_COT_CACHE points
to a temporary directory; the converted model is linked in, not rebuilt): reading, conversion, rendering,
tokenization with masking, split and the length statistics, plus the process's start-up (imports, tokenizer load).
Measured: wall time; peak RSS of the largest process (ru_maxrss from wait4) and the peak summed PSS of the whole
process tree (sampled from /proc, so tokenizing worker processes count, shared pages once); then the same command
again on the warm cache (the second run), with the start-up alone (imports) timed apart.

tokenizer alone: the same tokenizer on the same texts (each conversation rendered by the same template, in this
process, not timed), `tokenizer(texts, add_special_tokens=False)` in batches of 1,000, all rows once.

The dry run tokenizes in one process per idle core (the 1-minute load average tells how many the other work on
the machine keeps busy; one process below 50,000 rows), or --num_proc N; the line of each run says how many it used.

--cores N pins this process and its children to N cores (sched_setaffinity) and sets RAYON_NUM_THREADS=N for the
Rust tokenizer, so both sides get the same cores. Prints `data rows/s ours/tokenizer = X.XX` per file type.
"""
import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COT = ROOT.parent / "shared" / "data" / "cot"


def _pin(cores):
    """Pin this process (and what it starts) to `cores` cores; before tokenizers starts its thread pool."""
    if not cores:
        return sorted(os.sched_getaffinity(0))
    allowed = sorted(os.sched_getaffinity(0))
    if cores > len(allowed):
        sys.exit(f"error: --cores {cores}: only {len(allowed)} cores are available here")
    os.sched_setaffinity(0, allowed[:cores])
    os.environ["RAYON_NUM_THREADS"] = str(cores)
    return allowed[:cores]


def cpu_description():
    info = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    have = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2") if f in flags]
    return name, have


def build_inputs(rows, formats, where):
    """The CoT rows repeated to `rows` rows, written as .json and/or .jsonl; {suffix: path}."""
    base = []
    for f in sorted(COT.glob("*.json")):
        base += json.loads(f.read_text(encoding="utf-8"))
    out = {}
    if "json" in formats:
        path = where / f"cot_{rows}.json"
        with open(path, "w", encoding="utf-8") as f:
            f.write("[")
            for i, row in enumerate(itertools.islice(itertools.cycle(base), rows)):
                f.write(("," if i else "") + json.dumps(row, ensure_ascii=False))
            f.write("]")
        out["json"] = path
    if "jsonl" in formats:
        path = where / f"cot_{rows}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in itertools.islice(itertools.cycle(base), rows):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        out["jsonl"] = path
    return out, len(base)


# ---- measuring a child process ---------------------------------------------------------------------
def _tree(pid):
    """pid and all its descendants (from /proc)."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _pss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd, env, log, cwd=ROOT):
    """(wall s, peak RSS MB of the largest process, peak summed PSS MB of the tree, rc, CPU s) of one command."""
    with open(log, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=err, stderr=subprocess.STDOUT)
        peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], sum(_pss_kb(p) for p in _tree(proc.pid)))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, peak[0] / 1024, proc.returncode, usage.ru_utime + usage.ru_stime


# uniform_finetune.py run as __main__ with two of its functions timed (prepare_data: read, convert, tokenize,
# split; print_data_report: the length statistics and the example); the times go to stderr as one JSON line.
TIMED = """
import json, resource, runpy, sys, time
sys.path.insert(0, {root!r})
import utils.train as T
spent = {{}}
def cpu():  # this process and its (finished) worker processes
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime
def timed(name, fn):
    def run(*a, **k):
        t, c = time.perf_counter(), cpu()
        try:
            return fn(*a, **k)
        finally:
            spent[name] = spent.get(name, 0) + time.perf_counter() - t
            spent[name + "_cpu"] = spent.get(name + "_cpu", 0) + cpu() - c
    return run
T.prepare_data = timed("prepare_data", T.prepare_data)
T.print_data_report = timed("report", T.print_data_report)
sys.argv = ["uniform_finetune.py"] + {args!r}
try:
    runpy.run_path("uniform_finetune.py", run_name="__main__")
finally:
    print("TIMES " + json.dumps(spent), file=sys.stderr, flush=True)
"""


def _procs(log):
    """Tokenizing processes the dry run used (datasets names them in its progress bar), 1 without that mark."""
    found = re.search(r"tokenizing \(num_proc=(\d+)\)", Path(log).read_text(errors="replace"))
    return int(found.group(1)) if found else 1


def _times(log):
    lines = [line for line in Path(log).read_text(errors="replace").splitlines() if line.startswith("TIMES ")]
    return json.loads(lines[-1][6:]) if lines else {}


# ---- the tokenizer alone ---------------------------------------------------------------------------
def tokenizer_alone(path, model, template_name, cache, batch=1000):
    """(rows, seconds, CPU seconds) of the fast tokenizer on the rendered texts of every row of `path`."""
    import utils.data
    from utils.models import get_spec, load_tokenizer, resolve_model
    from utils.templates import pick_template

    mpath, _, model_type = resolve_model(model)
    tok = load_tokenizer(mpath)
    template = pick_template(template_name, get_spec(model_type).template, tok)
    saved = os.environ.get("ALPACA_COT_CACHE"), utils.data.PROGRESS_MIN_BYTES
    os.environ["ALPACA_COT_CACHE"], utils.data.PROGRESS_MIN_BYTES = str(cache), float("inf")  # own cache, quiet
    try:
        (ds, _), = utils.data.load_sources([str(path)])  # converted once more here: not timed
    finally:
        if saved[0] is None:
            os.environ.pop("ALPACA_COT_CACHE", None)
        else:
            os.environ["ALPACA_COT_CACHE"] = saved[0]
        utils.data.PROGRESS_MIN_BYTES = saved[1]
    texts = []
    for start in range(0, len(ds), batch):
        convs = ds[start:start + batch]["messages"]
        texts += ["".join(t for t, _ in segs) for segs in template._segments_batch(convs, False, tok)]
    tok(texts[:batch], add_special_tokens=False)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(texts), batch):
        tok(texts[start:start + batch], add_special_tokens=False)
    return len(texts), time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    # long: the benchmark's steps (build input, time ours, time the tokenizer, report) read top to bottom
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the input (default 200,000)")
    ap.add_argument("--formats", nargs="+", default=["json", "jsonl"], choices=["json", "jsonl"])
    ap.add_argument("--big", action="store_true", help="also run the 1,000,000-row .jsonl (peak RSS target 1.5 GB)")
    ap.add_argument("--cores", type=int, default=None, help="pin everything to this many cores (default: all)")
    ap.add_argument("--num_proc", type=int, default=None,
                    help="tokenizing processes of the dry run (ALPACA_COT_NUM_PROC; default: one per idle core)")
    ap.add_argument("--model_name_or_path", default=None, help="default: the embedded smollm2-135m-instruct")
    ap.add_argument("--template", default=None, help="default: the model type's template")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (inputs, caches, logs)")
    ap.add_argument("--checkout", default=None, help="time the dry run of another checkout of this project (e.g. an "
                                                     "older commit, for an A/B); the tokenizer side stays this one")
    a = ap.parse_args(argv)

    cores = _pin(a.cores)
    checkout = Path(a.checkout).resolve() if a.checkout else ROOT
    name, flags = cpu_description()
    print(f"cpu: {name} ({', '.join(flags) or 'no avx2'}); {len(cores)} of {os.cpu_count()} cores used; "
          f"load average {os.getloadavg()[0]:.2f} (1 min) before", flush=True)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from utils.models import cache_dir

    models = cache_dir() / "models"
    work = Path(tempfile.mkdtemp(prefix="data_bench_"))
    results = {"cpu": name, "flags": flags, "cores": len(cores), "checkout": str(checkout), "runs": []}
    try:
        plan = [(a.rows, a.formats)] + ([(1_000_000, ["jsonl"])] if a.big and a.rows != 1_000_000 else [])
        for rows, formats in plan:
            inputs, distinct = build_inputs(rows, formats, work)
            sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in inputs.values())
            print(f"input: {rows:,} rows ({distinct:,} distinct CoT rows repeated): {sizes}", flush=True)
            for fmt, path in inputs.items():
                cache = work / f"cache-{fmt}-{rows}"
                cache.mkdir()
                if models.is_dir():
                    (cache / "models").symlink_to(models)
                env = dict(os.environ, ALPACA_COT_CACHE=str(cache), PYTHONUNBUFFERED="1")
                if a.num_proc:
                    env["ALPACA_COT_NUM_PROC"] = str(a.num_proc)
                args = ["--dry_run", "--data", str(path)]
                args += ["--model_name_or_path", a.model_name_or_path] if a.model_name_or_path else []
                args += ["--template", a.template] if a.template else []
                cmd = [sys.executable, "-c", TIMED.format(root=str(checkout), args=args)]
                load = os.getloadavg()[0]
                wall, rss, pss, rc, cpu = run_measured(cmd, env, work / f"{fmt}-{rows}.log", checkout)
                if rc != 0:
                    print((work / f"{fmt}-{rows}.log").read_text()[-3000:])
                    sys.exit(f"error: the dry run on {path.name} failed (rc {rc})")
                first = _times(work / f"{fmt}-{rows}.log")
                wall2, _, _, _, _ = run_measured(cmd, env, work / f"{fmt}-{rows}-again.log", checkout)
                second = _times(work / f"{fmt}-{rows}-again.log")
                data_s = first.get("prepare_data", 0) + first.get("report", 0)
                data_cpu = first.get("prepare_data_cpu", 0) + first.get("report_cpu", 0)
                data2_s = second.get("prepare_data", 0) + second.get("report", 0)
                run = {"rows": rows, "format": fmt, "bytes": path.stat().st_size, "wall_s": wall, "cpu_s": cpu,
                       "rows_per_s": rows / wall, "data_s": data_s, "data_cpu_s": data_cpu,
                       "data_rows_per_s": rows / data_s if data_s else None, "peak_rss_mb": rss,
                       "peak_tree_pss_mb": pss, "load_before": load, "second_run_s": wall2,
                       "second_run_data_s": data2_s, "times": first, "times_again": second,
                       "procs": _procs(work / f"{fmt}-{rows}.log")}
                results["runs"].append(run)
                print(f"ours .{fmt} ({rows:,} rows): {wall:.1f} s = {rows / wall:,.0f} rows/s end to end (data work "
                      f"{data_s:.1f} s = {rows / max(data_s, 1e-9):,.0f} rows/s; the rest is start-up: imports, "
                      f"tokenizer load); CPU {cpu:.1f} s in all, {data_cpu:.1f} s in the data work; "
                      f"{run['procs']} tokenizing process{'es' if run['procs'] > 1 else ''}; load {load:.2f} before",
                      flush=True)
                print(f"  peak RSS {rss:,.0f} MB (largest process), {pss:,.0f} MB (PSS summed over all its processes, "
                      f"sampled); second run (warm cache) {wall2:.1f} s, of which data work {data2_s:.2f} s",
                      flush=True)
            if results.get("tokenizer"):  # the 1,000,000-row run: the same rows repeated, so the same per-row rate
                tok = results["tokenizer"][0]
                n, secs, tok_cpu = tok["rows"], tok["s"], tok["cpu_s"]
                print(f"tokenizer alone: the rate measured on the {n:,} rows above ({n / secs:,.0f} rows/s, "
                      f"{n / tok_cpu:,.0f} rows per CPU-second; the same CoT rows repeated)", flush=True)
            else:
                tok_cache = work / f"cache-tokenizer-{rows}"  # its own conversion cache, not the user's
                tok_cache.mkdir()
                if models.is_dir():
                    (tok_cache / "models").symlink_to(models)
                load = os.getloadavg()[0]
                n, secs, tok_cpu = tokenizer_alone(next(iter(inputs.values())), a.model_name_or_path, a.template,
                                                   tok_cache)
                results["tokenizer"] = [{"rows": n, "s": secs, "cpu_s": tok_cpu, "rows_per_s": n / secs,
                                         "load_before": load}]
                print(f"tokenizer alone ({n:,} rendered texts, batches of 1,000): {secs:.1f} s = {n / secs:,.0f} "
                      f"rows/s; CPU {tok_cpu:.1f} s; load {load:.2f} before", flush=True)
            for run in results["runs"]:
                if run["rows"] == rows:
                    run["ratio"] = run["rows_per_s"] / (n / secs)
                    run["data_ratio"] = (run["data_rows_per_s"] or 0) / (n / secs)
                    run["cpu_ratio"] = (rows * tok_cpu / n) / run["data_cpu_s"] if run["data_cpu_s"] else None
                    print(f"data rows/s ours/tokenizer = {run['ratio']:.2f}  (.{run['format']}, {rows:,} rows, "
                          f"{len(cores)} core{'s' if len(cores) > 1 else ''}, end to end; data work alone "
                          f"{run['data_ratio']:.2f}; rows per CPU-second {run['cpu_ratio'] or 0:.2f})")
        print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    finally:
        if a.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
