"""The generation loop: set up (or resume) a run, keep `--concurrency` batches of prompts in flight, parse and
filter each answer, append the kept rows to the output, keep the statistics file current; and `main`."""
import json
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

from utils.errors import UserError, cli_main
from utils.jsonl import read_records
from utils.openai_client import OpenAIClient, RequestFailed
from utils.self_instruct.args import SelfInstructArguments, validate
from utils.self_instruct.filters import RULES, InstructionFilter
from utils.self_instruct.pool import WorkerPool
from utils.self_instruct.prompts import PromptBuilder, detect_lang, load_seed_tasks, parse_items, prompt_header

# ---- files and statistics -------------------------------------------------------------------------

# counters a resumed run carries over from the statistics file of the runs before it
RESUMED = ("runs", "prompts", "requests", "retries", "failed_prompts", "responses", "truncated_responses", "items",
           "surplus", "elapsed_s")


def stats_path(output):
    out = Path(output)
    return out.with_name(out.name[:-len(".jsonl")] + ".stats.json")


def rejected_path(output):
    out = Path(output)
    return out.with_name(out.name[:-len(".jsonl")] + ".rejected.jsonl")


def read_output(path):
    """Rows already in the output; a killed run's torn last line is cut off first (utils.jsonl.repair_tail)."""
    rows = []
    for n, row in enumerate(read_records(path, strict=True), 1):
        if not isinstance(row.get("instruction"), str):
            raise UserError(f"{path} row {n} has no 'instruction'; it is not a self-instruct output, pass a new "
                            "--output")
        rows.append({"instruction": row["instruction"], "input": row.get("input") or "",
                     "output": row.get("output") or ""})
    return rows


def new_stats(args, lang, n_seeds):
    return {"target": args.num_instructions, "kept": 0, "kept_this_run": 0, "runs": 0, "seed_tasks": n_seeds,
            "lang": lang, "model": args.model, "base_url": args.base_url, "prompts": 0, "requests": 0, "retries": 0,
            "failed_prompts": 0, "responses": 0, "truncated_responses": 0, "items": 0,
            "rejected": {rule: 0 for rule in RULES}, "surplus": 0, "elapsed_s": 0.0}


def load_stats(args, lang, n_seeds, n_kept, path):
    """This run's statistics: the counters of the earlier runs when it resumes an output, else fresh ones."""
    stats = new_stats(args, lang, n_seeds)
    if n_kept and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            for key in RESUMED:
                stats[key] = old.get(key, 0)
            stats["rejected"].update({k: v for k, v in old.get("rejected", {}).items() if k in RULES})
        except (ValueError, AttributeError, TypeError):
            pass  # unreadable statistics: start them afresh, the rows are what count
    stats.update(kept=n_kept, runs=stats["runs"] + 1, target=args.num_instructions, lang=lang)
    return stats


def write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def format_stats(stats):
    rej = stats["rejected"]
    lines = [f"kept {stats['kept']}/{stats['target']} instructions ({stats['kept_this_run']} this run); "
             f"{stats['prompts']} prompts, {stats['responses']} responses, {stats['failed_prompts']} failed, "
             f"{stats['retries']} retries, {stats['truncated_responses']} truncated",
             f"parsed {stats['items']} items: kept {stats['kept']}, rejected {sum(rej.values())}"
             + "".join(f", {rule} {n}" for rule, n in rej.items() if n)
             + (f", surplus {stats['surplus']} (after the target was reached)" if stats["surplus"] else "")]
    return "\n".join(lines)


def make_client(args):
    return OpenAIClient(args.base_url, args.model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                        args.use_completions, args.request_timeout, args.max_retries, args.retry_delay,
                        {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens},
                        stop=[f"{args.num_tasks_per_prompt + 1}. Instruction"])


# ---- the loop -------------------------------------------------------------------------------------


class SelfInstructRun:
    """One run: the state its steps share. Construction checks the flags and files and resumes the output;
    `run()` generates until the output holds --num_instructions rows (or --max_prompts were sent)."""

    def __init__(self, args, client=None, log=print):
        validate(args)
        self.args, self.log = args, log
        self.seeds = load_seed_tasks(args.seed_tasks)
        self.lang = detect_lang(s["instruction"] for s in self.seeds) if args.lang == "auto" else args.lang
        header = prompt_header(args.prompt_file, self.lang)
        self.client = make_client(args) if client is None else client

        self.out_path, self.stats_path = Path(args.output), stats_path(args.output)
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.generated = read_output(self.out_path) if self.out_path.is_file() else []
        self.stats = load_stats(args, self.lang, len(self.seeds), len(self.generated), self.stats_path)
        self.base_requests, self.base_retries = self.stats["requests"], self.stats["retries"]

        self.filter = InstructionFilter(self.lang, args.similarity_threshold, args.min_words, args.max_words,
                                        args.blacklist_extra)
        for row in self.seeds + self.generated:
            self.filter.add(row["instruction"])
        self.build_prompt = PromptBuilder(header, self.seeds, self.generated, args.num_prompt_instructions,
                                          args.num_generated_in_prompt, args.num_tasks_per_prompt,
                                          random.Random(f"{args.seed}-{len(self.generated)}"))
        self.sent, self.consecutive_failures, self.last_error = 0, 0, None
        self.max_failures = max(3, args.concurrency * args.request_batch_size)
        self.start = time.time()
        self.out = self.rejected = self.bar = None  # open only while _generate runs

    def run(self):
        """Generate, log the statistics and return them."""
        args, n = self.args, len(self.generated)
        if n:
            self.log(f"resuming: {self.out_path} already holds {n} instructions")
        if n >= args.num_instructions:
            self.log(f"{self.out_path} already holds {n} >= --num_instructions {args.num_instructions}; nothing to do")
            write_json(self.stats_path, self.stats)
            return self.stats
        self._generate()
        self.log(format_stats(self.stats))
        if self.stats["kept"] < args.num_instructions:
            self.log(f"stopped after --max_prompts {args.max_prompts} with {self.stats['kept']}/"
                     f"{args.num_instructions} instructions; run the same command again to continue")
        self.log(f"wrote {self.out_path} (train on it: uniform_finetune.py --data {self.out_path}); "
                 f"statistics: {self.stats_path}")
        return self.stats

    def _generate(self):
        """Send, wait, handle, until nothing is left in flight. Whatever raises (a worker's error is re-raised
        by next_result) still closes the pool and writes the statistics so far."""
        from tqdm import tqdm

        self.start = time.time()
        pool = WorkerPool(self.client.complete, self.args.concurrency)
        self.bar = tqdm(total=self.args.num_instructions, initial=len(self.generated), unit="inst",
                        desc="self-instruct")
        try:
            with self.out_path.open("a", encoding="utf-8") as self.out, self._open_rejected() as self.rejected:
                while self._fill(pool):
                    self._handle_answer(pool.next_result())
                    self._checkpoint()
        finally:
            self.bar.close()
            pool.close()
            self._count_requests()
            self.stats["elapsed_s"] = round(self.stats["elapsed_s"] + time.time() - self.start, 2)
            write_json(self.stats_path, self.stats)

    def _open_rejected(self):
        if self.args.save_rejected:
            return rejected_path(self.args.output).open("a", encoding="utf-8")
        return nullcontext()  # self.rejected is None

    def _fill(self, pool):
        """Submit batches until --concurrency are in flight, the target is met or --max_prompts were sent;
        True while any batch is in flight (so next_result has one to wait for)."""
        args = self.args
        while (pool.pending < args.concurrency and self.stats["kept"] < args.num_instructions
               and (not args.max_prompts or self.sent < args.max_prompts)):
            n = args.request_batch_size if not args.max_prompts else min(args.request_batch_size,
                                                                         args.max_prompts - self.sent)
            pool.submit([self.build_prompt() for _ in range(n)])
            self.sent += n
            self.stats["prompts"] += n
        return pool.pending > 0

    def _handle_answer(self, answer):
        """One batch's results: [(text, finish_reason) or RequestFailed] per prompt."""
        for res in answer:
            if isinstance(res, RequestFailed):
                self.stats["failed_prompts"] += 1
                self.consecutive_failures, self.last_error = self.consecutive_failures + 1, res
            else:
                self.consecutive_failures = 0
                self._handle_response(*res)
        if self.rejected:
            self.rejected.flush()

    def _handle_response(self, text, finish_reason):
        stats = self.stats
        stats["responses"] += 1
        items = parse_items(text)
        stats["items"] += len(items)
        if finish_reason == "length":  # cut off: the last item is unfinished
            stats["truncated_responses"] += 1
            if items:
                self._reject(items.pop(), "truncated")
        for item in items:
            self._take(item)

    def _take(self, item):
        """Keep one parsed item (append it to the output) or reject it."""
        stats = self.stats
        if stats["kept"] >= self.args.num_instructions:
            stats["surplus"] += 1
            return
        reason, detail = self.filter.check(item)
        if reason:
            self._reject(item, reason, detail)
            return
        row = {"instruction": item["instruction"], "input": item["input"] or "", "output": item["output"].strip()}
        self.out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.out.flush()
        self.filter.add(row["instruction"])
        self.generated.append(row)
        stats["kept"] += 1
        stats["kept_this_run"] += 1
        self.bar.update(1)

    def _reject(self, item, reason, detail=None):
        self.stats["rejected"][reason] += 1
        if self.rejected:
            rec = dict(item, reason=reason, **({"detail": detail} if detail is not None else {}))
            self.rejected.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def _count_requests(self):
        self.stats["requests"] = self.base_requests + self.client.requests
        self.stats["retries"] = self.base_retries + self.client.retries

    def _checkpoint(self):
        """After each answer: the statistics file as of now, the progress bar; stop when prompts keep failing."""
        self._count_requests()
        run_time = time.time() - self.start
        write_json(self.stats_path, dict(self.stats, elapsed_s=round(self.stats["elapsed_s"] + run_time, 2)))
        self.bar.set_postfix(prompts=self.stats["prompts"], rejected=sum(self.stats["rejected"].values()),
                             refresh=False)
        if self.consecutive_failures >= self.max_failures:
            raise UserError(f"{self.consecutive_failures} prompts in a row failed (last error: {self.last_error}); "
                            f"check that {self.client.root} is up and serves --model {self.args.model}, then rerun "
                            "to continue")


def run_self_instruct(args, client=None, log=print):
    """Generate until the output holds args.num_instructions rows; returns the statistics dict."""
    return SelfInstructRun(args, client, log).run()


@cli_main
def main(argv=None):
    from utils.args import parse

    (args,) = parse((SelfInstructArguments,), argv, prog="python -m utils.self_instruct")
    run_self_instruct(args)
