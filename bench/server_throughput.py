"""server.py under concurrent clients: requests/s, completion tokens/s and latency at concurrency 1, 4, 8 and 16.

Run by hand, not in CI (tests/test_server.py runs a smoke run of it on a tiny model):

    .venv/bin/python bench/server_throughput.py                 # embedded SmolLM2-135M + a 10-step LoRA trained here
    .venv/bin/python bench/server_throughput.py --lora_dir saved_models/demo
    .venv/bin/python bench/server_throughput.py --models adapter,base      # alternate adapter and base requests

It starts `server.py --lora_dir ADAPTER --max_new_tokens M` in its own process, waits for /health, warms up, then
at each concurrency level C sends the same N chat requests (the bundled data/arith_sample.json questions, greedy,
max_tokens M) from C threads with the official `openai` client, one request at a time per thread; the levels run
in turns, --rounds times (c1 c4 c8 c16 c1 c4 c8 c16), so that a shared machine's drifts hit them alike. Per level:
requests/s, completion tokens/s (the `usage` of the answers), p50 / p95 latency, failures, the CPU time the server
process spent per request (less sensitive than wall time to other programs on the machine), the server's resident
memory (VmRSS) after the level. Ends with `server throughput c8/c1 = X.XX`. --json writes everything.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def train_adapter(out, steps):
    """A LoRA adapter on the embedded model (uniform_finetune.py defaults: the bundled arith_sample data)."""
    cmd = [sys.executable, str(ROOT / "uniform_finetune.py"), "--output_dir", str(out), "--max_steps", str(steps),
           "--learning_rate", "1e-3", "--per_gpu_train_batch_size", "4", "--logging_steps", "5",
           "--save_steps", "1000"]
    print(f"training the adapter: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, stdout=subprocess.DEVNULL)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port, log):
    cmd = [sys.executable, str(ROOT / "server.py"), "--lora_dir", f"adapter={args.lora_dir}", "--port", str(port),
           "--max_new_tokens", str(args.max_tokens), "--served_name", "base", *args.server_args]
    print(f"server: {' '.join(cmd[1:])}", flush=True)
    env = dict(ENV, OMP_NUM_THREADS=str(args.server_threads)) if args.server_threads else ENV
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server.py exited with {proc.returncode}; its log: {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server.py did not answer within 600 s; its log: {log.name}")


def cpu_seconds(pid):
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid):
    """(VmRSS, VmHWM) of a process in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS"), fields.get("VmHWM")


def questions(n):
    rows = json.loads((ROOT / "data" / "arith_sample.json").read_text(encoding="utf-8"))
    texts = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in rows]
    return [texts[i % len(texts)] for i in range(n)]


def run_level(url, models, prompts, concurrency, max_tokens):
    """Send every prompt from `concurrency` threads; per request (latency s, completion tokens) or an error."""
    import openai

    local = threading.local()

    def ask(i):
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=900)
        t0 = time.perf_counter()
        try:
            res = local.client.chat.completions.create(model=models[i % len(models)], temperature=0,
                                                       max_tokens=max_tokens,
                                                       messages=[{"role": "user", "content": prompts[i]}])
            return {"latency": time.perf_counter() - t0, "tokens": res.usage.completion_tokens,
                    "text": res.choices[0].message.content}
        except Exception as exc:  # noqa: BLE001 - counted as a failure
            return {"latency": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {exc}"}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(ask, range(len(prompts))))
    return time.perf_counter() - t0, results


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(level, wall, results, mem, cpu):
    """One level's numbers over all its rounds: wall and cpu are the rounds' sums, results all their requests."""
    ok = [r for r in results if "error" not in r]
    lat = [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": level, "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
            "wall_s": wall, "req_per_s": len(ok) / wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95), "server_cpu_s": cpu,
            "rss_mb": mem[0], "peak_rss_mb": mem[1],
            "errors": sorted({r["error"] for r in results if "error" in r})[:3]}


def measure(url, pid, a, levels, models):
    """Every level, --rounds times in turn (c1, c4, ..., c1, c4, ...: slow drifts of a shared machine hit every level
    alike); per level its summary and its answers."""
    run_level(url, models, questions(2), 1, a.max_tokens)  # warm-up
    acc = {level: {"wall": 0.0, "cpu": 0.0, "results": []} for level in levels}
    for round_ in range(a.rounds):
        for level in levels:
            n = a.n_top if level == max(levels) else a.n
            cpu0 = cpu_seconds(pid)
            wall, results = run_level(url, models, questions(n), level, a.max_tokens)
            acc[level]["wall"] += wall
            acc[level]["cpu"] += cpu_seconds(pid) - cpu0
            acc[level]["results"] += results
            failed = [r["error"] for r in results if "error" in r]
            print(f"round {round_ + 1} c{level}: {n} requests in {wall:.1f} s, {len(results) / wall:.2f} req/s, "
                  f"failed {len(failed)} {sorted(set(failed))[:2]}", flush=True)
    rows = [summarize(level, acc[level]["wall"], acc[level]["results"], memory_mb(pid), acc[level]["cpu"])
            for level in levels]
    return rows, {level: [r.get("text") for r in acc[level]["results"]] for level in levels}


def print_table(rows):
    print("| concurrency | requests | failed | wall s | req/s | completion tok/s | p50 latency s | p95 latency s | "
          "server CPU s / request | server RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['failed']} | {r['wall_s']:.1f} | {r['req_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
              f"{r['server_cpu_s'] / max(r['ok'], 1):.2f} | {r['rss_mb']:.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora_dir", help="adapter to serve (default: train one for --train_steps in a temp dir)")
    ap.add_argument("--train_steps", type=int, default=10)
    ap.add_argument("--levels", default="1,4,8,16", help="concurrency levels, comma-separated")
    ap.add_argument("--n", type=int, default=24, help="requests per level and round (default 24)")
    ap.add_argument("--n_top", type=int, default=64, help="requests at the highest level per round (default 64)")
    ap.add_argument("--rounds", type=int, default=2, help="times every level runs, in turns (default 2)")
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--models", default="adapter", help="model ids the requests cycle through: adapter, base")
    ap.add_argument("--server_args", default="", help="more server.py flags, e.g. '--max_batch_size 16'")
    ap.add_argument("--server_threads", type=int,
                    help="torch threads of the server (OMP_NUM_THREADS; default: torch's)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    a.server_args = a.server_args.split()
    levels = [int(x) for x in a.levels.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_server_"))
    if not a.lora_dir:
        a.lora_dir = str(tmp / "adapter")
        train_adapter(a.lora_dir, a.train_steps)
    info = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
               "unknown CPU")
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in info]
    print(f"bench: {cpu}, {os.cpu_count()} cores, {', '.join(flags) or 'no bf16 instructions'}; load average before "
          f"{os.getloadavg()[0]:.2f} (1 min)", flush=True)
    port, models = free_port(), a.models.split(",")
    url = f"http://127.0.0.1:{port}"
    with open(tmp / "server.log", "w") as log:
        proc = start_server(a, port, log)
        try:
            rows, answers = measure(url, proc.pid, a, levels, models)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)  # kept only when the server failed (its log is named then)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")
    print_table(rows)
    by = {r["concurrency"]: r for r in rows}
    base = answers[levels[0]]
    for level in levels[1:]:
        pairs = list(zip(answers[level], base)) if level != max(levels) else list(zip(answers[level], base))[:a.n]
        same = sum(x == y for x, y in pairs)
        print(f"c{level} answers equal to c{levels[0]}'s: {same}/{len(pairs)}")
    if 1 in by and 8 in by:
        print(f"p50 latency c8/c1 = {by[8]['p50_s'] / by[1]['p50_s']:.2f}")
        print(f"server throughput c8/c1 = {by[8]['req_per_s'] / by[1]['req_per_s']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": cpu, "levels": rows, "args": vars(a)}, indent=1))
    return rows


if __name__ == "__main__":
    main()
