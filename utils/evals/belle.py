"""belle: Belle-eval, answers judged by an LLM against the reference answers, per class (0-1 scores)."""
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from utils.errors import UserError
from utils.evals.common import ItemCache, digest, excluded_prompts, local_rows, md_table, progress, prompt_key
from utils.evals.judge import judge_from_args, run_all
from utils.evals.scoring import parse_judge_score

NAME = "belle"
ORDER = 3
SUMMARY = "Belle-eval with an LLM judge (--data, --judge_base_url, --judge_model)"
HEADLINE = "score"  # the study table's column and plotted metric (a results["metrics"] key)


@dataclass
class Flags:
    judge_prompts: Optional[str] = field(
        default=None, metadata={"help": "belle: per-class judge prompts (JSON lines with class, prompt). Default: "
                                        "eval_prompt.json beside the first --data file."})


def check(eval_args, flags, gen_args=None):
    if not eval_args.data:
        raise UserError("--task belle needs --data (Belle-eval rows: question, std_answer, class)")
    if eval_args.judge_base_url and not eval_args.judge_model:
        raise UserError("--judge_base_url needs --judge_model (the judge's model name at that endpoint)")


GENERIC_JUDGE_PROMPT = ("你需要通过参考标准答案，来对模型回答给出分数，满分为1分，最低分为0分。"
                        "请按照\"得分:\"这样的形式输出分数。"
                        "评价标准要求模型回答越接近标准答案分数越高。")


def _norm_class(name):
    return " ".join(str(name or "").replace("\xa0", " ").lower().split())


def load_judge_prompts(path):
    from utils.data import iter_rows

    path = Path(path)
    if not path.is_file():
        raise UserError(f"judge prompts file {path} does not exist; pass --judge_prompts (Belle's eval_prompt.json)")
    prompts = {}
    for where, row, _ in iter_rows(path):
        if not isinstance(row, dict) or "class" not in row or "prompt" not in row:
            raise UserError(f"{where} needs 'class' and 'prompt' fields")
        prompts[_norm_class(row["class"])] = row["prompt"]
    return prompts


def judge_message(prompt, question, std_answer, answer):
    """What the judge reads: Belle's class prompt, then the question, the reference answer and the model's answer."""
    return f"{prompt}\n\n问题：{question}\n\n标准回答：{std_answer}\n\n模型回答：{answer}"


def _belle_rows(eval_args):
    excluded = excluded_prompts(eval_args) if eval_args.exclude_data else set()

    def make_row(where, row, source, n):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise UserError(f"{where} needs a 'question' field (Belle-eval rows: question, std_answer, class)")
        if prompt_key([{"role": "user", "content": row["question"], "input": ""}]) in excluded:
            return None
        ref = row.get("std_answer", row.get("answer"))
        return {"source": source, "question": row["question"], "std_answer": str(ref or ""),
                "class": _norm_class(row.get("class") or "unknown")}

    return local_rows(eval_args, "belle", make_row)


def run(ctx):
    return run_belle(ctx.handle, ctx.eval_args, ctx.gen_args, ctx.out_dir)


def run_belle(handle, eval_args, gen_args, out_dir):
    rows, first_file = _belle_rows(eval_args)
    fingerprint = digest({"task": "belle", "model": handle.identity(), "gen": asdict(gen_args)})
    cache = ItemCache(out_dir / "cache" / f"belle-{fingerprint}.jsonl")
    for r in rows:
        r["key"] = digest([r["question"], r["std_answer"]])
    todo = [r for r in rows if r["key"] not in cache]
    bar = progress(len(rows), len(rows) - len(todo), "belle answers")
    if todo:
        from utils.generation import generate_missing, generation_kwargs

        model, tokenizer, template, _ = handle.load()
        for r in todo:
            r["ids"] = template.prompt_ids(tokenizer, [{"role": "user", "content": r["question"]}])
        generate_missing(todo, cache, model, tokenizer, generation_kwargs(gen_args, tokenizer, template),
                         eval_args.batch_size, lambda r, text: {"class": r["class"], "question": r["question"],
                                                                "answer": text}, bar.update)
    bar.close()
    answers = {r["key"]: cache[r["key"]]["answer"] for r in rows}
    if not eval_args.judge_base_url:
        print("no --judge_base_url: answers generated and cached; pass --judge_base_url and --judge_model to "
              "score them")
        return {"metrics": {"n": len(rows), "judged": 0, "score": None}, "classes": {},
                "table": "answers generated; no judge given\n"}
    prompts = load_judge_prompts(eval_args.judge_prompts or Path(first_file).parent / "eval_prompt.json")
    judge = judge_from_args(eval_args, "belle")
    jcache = ItemCache(out_dir / "cache" / "judge.jsonl")  # keyed by judge model + message: shared by every model
    jobs = []
    for r in rows:
        r["message"] = judge_message(prompts.get(r["class"], GENERIC_JUDGE_PROMPT), r["question"], r["std_answer"],
                                     answers[r["key"]])
        r["jkey"] = digest([eval_args.judge_model, r["message"]])
        if r["jkey"] not in jcache and r["jkey"] not in {j["jkey"] for j in jobs}:
            jobs.append(r)
    bar = progress(len(rows), len(rows) - len(jobs), "belle judge")

    def ask(r):
        text = judge(r["message"])
        jcache.put({"key": r["jkey"], "judge_model": eval_args.judge_model, "response": text,
                    "score": parse_judge_score(text)})
        bar.update(1)

    run_all(ask, jobs, eval_args.judge_workers)
    bar.close()
    recs = [{"class": r["class"], "score": parse_judge_score(jcache[r["jkey"]]["response"])} for r in rows]
    return _belle_report(recs, set(prompts))


def _belle_metrics(recs):
    scored = [r["score"] for r in recs if r["score"] is not None]
    return {"n": len(recs), "scored": len(scored), "no_score": len(recs) - len(scored),
            "score": sum(scored) / len(scored) if scored else None}


def _belle_report(recs, known_classes):
    classes = {}
    for r in recs:
        classes.setdefault(r["class"], []).append(r)
    per = {c: _belle_metrics(rs) for c, rs in sorted(classes.items())}
    metrics = _belle_metrics(recs)
    means = [m["score"] for m in per.values() if m["score"] is not None]
    metrics["class_average"] = sum(means) / len(means) if means else None
    metrics["judged"] = metrics["scored"] + metrics["no_score"]
    unknown = sorted(set(classes) - known_classes)
    rows = [[c, m["n"], m["score"], m["no_score"]] for c, m in per.items()]
    rows += [["**overall** (all answers)", metrics["n"], metrics["score"], metrics["no_score"]],
             ["**class average**", len(per), metrics["class_average"], ""]]
    return {"metrics": metrics, "classes": per, "classes_with_generic_prompt": unknown,
            "table": md_table(["class", "n", "score (0-1)", "judge answers without a score"], rows)}
