"""mt_bench: MT-bench single-answer grading. The model answers both turns of each question (the second with the
first turn and its own answer in the history); an LLM judge rates each turn 1-10 with the judge prompts that
come with the data (judge_prompts.jsonl: single-v1, single-math-v1 and their -multi-turn forms).

    python evaluate.py --task mt_bench --data ../shared/data/mt_bench/question.jsonl --max_new_tokens 512 \
        --lora_dir saved_models/demo --judge_base_url http://127.0.0.1:8000/v1 --judge_model judge

Questions of the REFERENCE_CATEGORIES (math, reasoning, coding) that carry a "reference" are graded with the
reference-guided prompts (single-math-v1*: the reference answer is shown to the judge); the others with the
general ones. The rating is the last "[[x]]" of the judge's answer (else the last "Rating: x"); one outside 1-10,
or none, leaves that turn unscored (counted). The score is the mean over every scored turn (as MT-bench reports
it), with per-turn and per-category means beside it.
"""
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from utils.errors import UserError
from utils.evals.common import ItemCache, batches, digest, local_rows, md_table, progress
from utils.evals.judge import judge_from_args, run_all

NAME = "mt_bench"
ORDER = 7
SUMMARY = "MT-bench: two-turn answers rated 1-10 per turn by an LLM judge with the data's judge prompts (--data)"
HEADLINE = "score"
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
PROMPT_NAMES = {(1, False): "single-v1", (1, True): "single-math-v1", (2, False): "single-v1-multi-turn",
                (2, True): "single-math-v1-multi-turn"}


@dataclass
class Flags:
    mt_bench_judge_prompts: Optional[str] = field(
        default=None, metadata={"help": "mt_bench: the judge prompts (JSON lines with name, system_prompt, "
                                        "prompt_template). Default: judge_prompts.jsonl beside the first --data file."})


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_LOOSE = re.compile(r"rating\s*[:：]?\s*\[?\s*(\d+(?:\.\d+)?)", re.I)


def parse_rating(text):
    """The 1-10 rating of a judge answer ("Rating: [[7]]", "[[8.5]]"), or None (none, or out of range)."""
    if not text:
        return None
    hits = _RATING.findall(str(text)) or _RATING_LOOSE.findall(str(text))
    if not hits:
        return None
    value = float(hits[-1])
    return value if 1 <= value <= 10 else None


def load_judge_prompts(path):
    """{name: {"system_prompt", "prompt_template"}} of the four single-answer prompts."""
    from utils.data import iter_rows

    path = Path(path)
    if not path.is_file():
        raise UserError(f"MT-bench judge prompts {path} do not exist; pass --mt_bench_judge_prompts (MT-bench's "
                        "judge_prompts.jsonl)")
    prompts = {}
    for where, row, _ in iter_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) \
                or not isinstance(row.get("prompt_template"), str):
            raise UserError(f"{where} needs 'name' and 'prompt_template' string fields")
        prompts[row["name"]] = {"system_prompt": str(row.get("system_prompt") or ""),
                                "prompt_template": row["prompt_template"]}
    missing = [n for n in PROMPT_NAMES.values() if n not in prompts]
    if missing:
        raise UserError(f"{path} lacks the judge prompt '{missing[0]}'; MT-bench's judge_prompts.jsonl has "
                        f"{', '.join(PROMPT_NAMES.values())}")
    return prompts


def _questions(eval_args):
    def make_row(where, row, source, n):
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not 1 <= len(turns) <= 2 or not all(isinstance(t, str) for t in turns):
            raise UserError(f"{where} needs 'turns', a list of one or two strings (MT-bench's question.jsonl)")
        ref = row.get("reference")
        return {"id": str(row.get("question_id", f"{source}#{n}")), "category": str(row.get("category") or "unknown"),
                "turns": turns, "reference": [str(r) for r in ref] if isinstance(ref, list) else []}

    return local_rows(eval_args, "mt_bench", make_row, "questions")


def check(eval_args, flags, gen_args=None):
    if not eval_args.data:
        raise UserError("--task mt_bench needs --data (MT-bench's question.jsonl, e.g. "
                        "../shared/data/mt_bench/question.jsonl)")
    if eval_args.judge_base_url and not eval_args.judge_model:
        raise UserError("--judge_base_url needs --judge_model (the judge's model name at that endpoint)")
    _, first = _questions(eval_args)
    if eval_args.judge_base_url:
        load_judge_prompts(flags.mt_bench_judge_prompts or first.parent / "judge_prompts.jsonl")


def _fill(template, values, name):
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"MT-bench judge prompt '{name}' has a placeholder this task does not fill ({exc}); use "
                        "MT-bench's judge_prompts.jsonl") from None


def judge_request(prompts, q, turn, answers):
    """(prompt name, system prompt, user message) that grade `turn` (1 or 2) of question q."""
    need = 1 if turn == 1 else 2
    with_ref = q["category"] in REFERENCE_CATEGORIES and len(q["reference"]) >= need
    name = PROMPT_NAMES[(turn, with_ref)]
    if turn == 1:
        values = {"question": q["turns"][0], "answer": answers[0]}
        if with_ref:
            values["ref_answer_1"] = q["reference"][0]
    else:
        values = {"question_1": q["turns"][0], "question_2": q["turns"][1], "answer_1": answers[0],
                  "answer_2": answers[1]}
        if with_ref:
            values.update(ref_answer_1=q["reference"][0], ref_answer_2=q["reference"][1])
    p = prompts[name]
    return name, p["system_prompt"], _fill(p["prompt_template"], values, name)


def run(ctx):
    eval_args, out_dir = ctx.eval_args, Path(ctx.out_dir)
    questions, first = _questions(eval_args)
    _answer(ctx, questions, out_dir)
    if not eval_args.judge_base_url:
        print("no --judge_base_url: answers generated and cached; pass --judge_base_url and --judge_model to grade "
              "them")
        return {"metrics": {"n": len(questions), "judged": 0, "score": None}, "categories": {},
                "table": "answers generated; no judge given\n"}
    prompts = load_judge_prompts(ctx.flags.mt_bench_judge_prompts or first.parent / "judge_prompts.jsonl")
    grades = _grade(eval_args, questions, prompts, out_dir)
    return _report(questions, grades, eval_args.judge_model)


def _answer(ctx, questions, out_dir):
    """Sets q["answers"]: both turns of each question, generated where not cached (cache: mt_bench-<fingerprint>.jsonl;
    turn 1 of every question first, then turn 2 with turn 1's cached answer in the history)."""
    eval_args, gen_args, handle = ctx.eval_args, ctx.gen_args, ctx.handle
    fingerprint = digest({"task": "mt_bench", "model": handle.identity(), "gen": asdict(gen_args)})
    cache = ItemCache(out_dir / "cache" / f"mt_bench-{fingerprint}.jsonl")
    for q in questions:
        q["key"] = f"{q['id']}:{digest(q['turns'], 8)}"
    total = sum(len(q["turns"]) for q in questions)
    done = sum(f"{q['key']}:t{t}" in cache for q in questions for t in range(1, len(q["turns"]) + 1))
    bar = progress(total, done, "mt_bench answers")
    loaded = None
    for turn in (1, 2):
        todo = [q for q in questions if len(q["turns"]) >= turn and f"{q['key']}:t{turn}" not in cache]
        if not todo:
            continue
        if loaded is None:
            from utils.generation import generate_batch, generation_kwargs

            loaded = handle.load()
            model, tokenizer, template, _ = loaded
            kwargs = generation_kwargs(gen_args, tokenizer, template)
        _set_prompt_ids(todo, turn, cache, tokenizer, template)
        todo.sort(key=lambda q: len(q["ids"]))
        for batch in batches(todo, eval_args.batch_size):
            texts = generate_batch(model, tokenizer, [q["ids"] for q in batch], kwargs)
            for q, text in zip(batch, texts):
                cache.put({"key": f"{q['key']}:t{turn}", "question_id": q["id"], "category": q["category"],
                           "turn": turn, "answer": text})
            bar.update(len(batch))
    bar.close()
    for q in questions:
        q["answers"] = [cache[f"{q['key']}:t{t}"]["answer"] for t in range(1, len(q["turns"]) + 1)]


def _set_prompt_ids(todo, turn, cache, tokenizer, template):
    """Sets q["ids"]: the prompt of `turn` (turn 2: turn 1, its cached answer and the second question)."""
    for q in todo:
        msgs = [{"role": "user", "content": q["turns"][0]}]
        if turn == 2:
            msgs += [{"role": "assistant", "content": cache[f"{q['key']}:t1"]["answer"]},
                     {"role": "user", "content": q["turns"][1]}]
        q["ids"] = template.prompt_ids(tokenizer, msgs)


def _judge_jobs(prompts, questions, jcache, judge_model):
    """(jobs, grades): the (jkey, system, message) requests not yet in jcache (each once), and one grade per turn."""
    jobs, queued, grades = [], set(), []
    for q in questions:
        for turn in range(1, len(q["turns"]) + 1):
            name, system, message = judge_request(prompts, q, turn, q["answers"])
            jkey = digest([judge_model, system, message])
            grades.append({"id": q["id"], "category": q["category"], "turn": turn, "prompt": name, "jkey": jkey})
            if jkey not in jcache and jkey not in queued:
                queued.add(jkey)
                jobs.append((jkey, system, message))
    return jobs, grades


def _grade(eval_args, questions, prompts, out_dir):
    """The grades of every turn, the judge asked where its answer is not cached (cache/judge.jsonl)."""
    judge = judge_from_args(eval_args, "mt_bench")
    jcache = ItemCache(out_dir / "cache" / "judge.jsonl")  # keyed by judge model + the exact messages
    jobs, grades = _judge_jobs(prompts, questions, jcache, eval_args.judge_model)
    bar = progress(len(grades), len(grades) - len(jobs), "mt_bench judge")

    def ask(job):
        jkey, system, message = job
        text = judge(message, system)
        jcache.put({"key": jkey, "judge_model": eval_args.judge_model, "response": text, "score": parse_rating(text)})
        bar.update(1)

    run_all(ask, jobs, eval_args.judge_workers)
    bar.close()
    for g in grades:
        g["score"] = parse_rating(jcache[g.pop("jkey")]["response"])
    return grades


def _stats(grades):
    scored = [g["score"] for g in grades if g["score"] is not None]
    return {"n": len(grades), "scored": len(scored), "score": sum(scored) / len(scored) if scored else None}


def _report(questions, grades, judge_model):
    def turn_mean(gs, t):
        return _stats([g for g in gs if g["turn"] == t])["score"]

    cats = {}
    for g in grades:
        cats.setdefault(g["category"], []).append(g)
    per = {c: {"questions": len({g["id"] for g in gs}), "turn_1": turn_mean(gs, 1), "turn_2": turn_mean(gs, 2),
               "score": _stats(gs)["score"]} for c, gs in cats.items()}
    overall = _stats(grades)
    metrics = {"n": len(questions), "judged": len(grades), "scored": overall["scored"],
               "no_score": len(grades) - overall["scored"], "score": overall["score"],
               "turn_1": turn_mean(grades, 1), "turn_2": turn_mean(grades, 2),
               "reference_guided": sum(g["prompt"].startswith("single-math") for g in grades)}
    rows = [[c, m["questions"], m["turn_1"], m["turn_2"], m["score"]] for c, m in per.items()]
    rows.append(["**all**", len(questions), metrics["turn_1"], metrics["turn_2"], metrics["score"]])
    table = (f"Judge: {judge_model}; ratings 1-10; {metrics['no_score']} of {len(grades)} turns without a rating.\n\n"
             + md_table(["category", "questions", "turn 1", "turn 2", "score"], rows))
    return {"metrics": metrics, "categories": per, "grades": grades, "table": table}
