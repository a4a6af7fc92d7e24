"""mc: multiple choice (CMMLU / MMCU / C-Eval / MMLU CSV layouts), by option log-likelihood or by generation."""
import csv
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Optional

import yaml

from utils.errors import UserError
from utils.evals.common import ItemCache, batches, digest, md_table, progress, sequence_logprobs
from utils.evals.scoring import extract_choice, letter_set, mc_correct
from utils.formats import CJK

NAME = "mc"
ORDER = 1
SUMMARY = "multiple choice (CMMLU / MMCU / C-Eval / MMLU CSV layouts, --data_dir)"
HEADLINE = "average"  # the study table's column(s) and plotted metric: results["metrics"] key(s)
ROOT = Path(__file__).resolve().parents[2]
GROUPS_FILE = ROOT / "data" / "cmmlu_groups.yaml"
LETTERS = "ABCDEFGH"


@dataclass
class Flags:
    shots_split: str = field(default="dev", metadata={"help": "mc: the split folder the shots come from."})
    groups: Optional[str] = field(
        default=None, metadata={"help": "mc: YAML of subject -> {name, groups} for per-group accuracy. Default: "
                                        "data/cmmlu_groups.yaml when it knows the subjects."})
    mc_method: str = field(
        default="loglik", metadata={"help": "mc: loglik (the option letter with the highest log-likelihood; no "
                                            "parsing) or generate (generate, then extract the letters).",
                                    "choices": ["loglik", "generate"]})


def check(eval_args, flags, gen_args=None):
    if not eval_args.data_dir:
        raise UserError("--task mc needs --data_dir, a directory with one CSV file per subject "
                        "(e.g. ../shared/data/cmmlu with --split dev)")
    _mc_layout(eval_args)


def result_name(eval_args):
    return f"mc-{eval_args.shots}shot" + ("-generate" if eval_args.mc_method == "generate" else "")


def read_mc_csv(path):
    """Rows {"question", "options": {letter: text}, "answer": "AC"} of one subject file.

    Layouts: CMMLU (`,Question,A,B,C,D,Answer`: header and an index column), C-Eval (`id,question,A,B,C,D,answer,...`),
    MMLU (no header: question,A,B,C,D,answer), MMCU-style multi-answer cells ("AC", "A,C"). Rows without a usable
    answer are skipped and counted.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{path} has no rows")
    head = [c.strip().lower() for c in rows[0]]
    if {"question", "题目", "answer", "答案"} & set(head):
        q = next((i for i, c in enumerate(head) if c in ("question", "题目")), None)
        a = next((i for i, c in enumerate(head) if c in ("answer", "答案")), None)
        opts = [(i, c.upper()) for i, c in enumerate(head) if len(c) == 1 and c.upper() in LETTERS]
        if q is None or a is None or len(opts) < 2:
            raise UserError(f"{path}: the header {rows[0]} needs a question column, option columns A, B, ... and an "
                            "answer column")
        body = rows[1:]
    else:
        n = len(rows[0])
        start = 1 if n >= 7 and rows[0][0].strip().isdigit() else 0  # an index column
        q, a = start, n - 1
        opts = [(i, LETTERS[k]) for k, i in enumerate(range(start + 1, n - 1))]
        if len(opts) < 2:
            raise UserError(f"{path}: rows need a question, at least two options and an answer (got {n} columns)")
        body = rows
    out, skipped = [], 0
    for r in body:
        if len(r) <= max(q, a, opts[-1][0]):
            skipped += 1
            continue
        options = {letter: r[i].strip() for i, letter in opts if r[i].strip()}
        gold = letter_set(r[a])
        if not gold or not gold <= set(options):
            skipped += 1
            continue
        out.append({"question": r[q].strip(), "options": options, "answer": "".join(sorted(gold))})
    return out, skipped


def _subject_files(folder, split):
    files = {}
    for p in sorted(Path(folder).glob("*.csv")):
        name = p.stem[:-len(split) - 1] if p.stem.endswith("_" + split) else p.stem
        files[name] = p
    return files


def _mc_layout(eval_args):
    """(subject -> test file, subject -> shots file or None, shots from the same file?)."""
    root = Path(eval_args.data_dir)
    if not root.is_dir():
        raise UserError(f"--data_dir {root} is not a directory")
    if (root / eval_args.split).is_dir():
        test = _subject_files(root / eval_args.split, eval_args.split)
    elif any(root.glob("*.csv")):
        test = _subject_files(root, eval_args.split)
    else:
        found = [p.name for p in root.iterdir() if p.is_dir()]
        raise UserError(f"--data_dir {root} has no split folder '{eval_args.split}' and no CSV files"
                        + (f"; it has {', '.join(sorted(found))}: pass one with --split" if found else ""))
    shots_dir = root / eval_args.shots_split
    same = (not shots_dir.is_dir()) or shots_dir.resolve() == (root / eval_args.split).resolve()
    shots = test if same else _subject_files(shots_dir, eval_args.shots_split)
    if eval_args.subjects:
        unknown = [s for s in eval_args.subjects if s not in test]
        if unknown:
            raise UserError(f"--subjects: '{unknown[0]}' has no file in {root}; subjects are: "
                            f"{', '.join(sorted(test))}")
        test = {s: test[s] for s in eval_args.subjects}
    if not test:
        raise UserError(f"--data_dir {root} has no subject CSV files")
    return test, {s: shots.get(s) for s in test}, same


def load_groups(eval_args, subjects):
    """subject -> {"name", "groups"}: --groups, else data/cmmlu_groups.yaml when it knows every subject."""
    path = Path(eval_args.groups) if eval_args.groups else GROUPS_FILE
    if not path.is_file():
        raise UserError(f"--groups {path} does not exist")
    table = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("subjects") or {}
    if not eval_args.groups and not set(subjects) <= set(table):
        table = {}
    return {s: {"name": (table.get(s) or {}).get("name") or s.replace("_", " "),
                "groups": list((table.get(s) or {}).get("groups") or [])} for s in subjects}


def _mc_text(row):
    return row["question"] + "\n" + "\n".join(f"{k}. {v}" for k, v in row["options"].items())


def _mc_header(name, zh, multi):
    if zh:
        kind = "多项选择题，请直接给出所有正确答案的选项" if multi else "单项选择题，请直接给出正确答案的选项"
        return f"以下是关于{name}的{kind}。\n\n"
    kind = "multiple-answer questions; answer with the letters of all correct options" if multi else \
        "multiple choice questions; answer with the letter of the correct option"
    return f"The following are {kind} about {name}.\n\n"


def mc_messages(row, shots, name, multi):
    """The conversation for one question: header, k solved examples as earlier turns, then the question."""
    zh = bool(CJK.search(row["question"] + "".join(row["options"].values())))
    header = _mc_header(name, zh, multi)
    msgs = []
    for shot in shots:
        msgs += [{"role": "user", "content": _mc_text(shot)}, {"role": "assistant", "content": shot["answer"]}]
    msgs.append({"role": "user", "content": _mc_text(row)})
    msgs[0] = dict(msgs[0], content=header + msgs[0]["content"])
    return msgs


def _trained_ids(template, tokenizer, msgs):
    """(full ids, trained positions) of a conversation ending with an answer: what its loss is computed on."""
    ids, labels = template.encode(tokenizer, msgs)
    return ids, [i for i, l in enumerate(labels) if l != -100]


def _answer_tokens(template, tokenizer, msgs, answer):
    """Token ids of `answer` as the template writes it after the prompt (end-of-turn token included)."""
    ids, pos = _trained_ids(template, tokenizer, msgs + [{"role": "assistant", "content": answer}])
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    n_prev = sum(1 for m in msgs[:last] if m["role"] == "assistant")
    # trained positions of earlier (shot) answers come first; the final answer's tokens are the last run
    runs, cur = [], []
    for p in pos:
        if cur and p != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(p)
    runs.append(cur)
    assert len(runs) >= n_prev + 1
    return ids, runs[-1]


def run(ctx):
    return run_mc(ctx.handle, ctx.eval_args, ctx.gen_args, ctx.out_dir)


def run_mc(handle, eval_args, gen_args, out_dir):
    test_files, shot_files, same = _mc_layout(eval_args)
    groups = load_groups(eval_args, list(test_files))
    fingerprint = digest({"task": "mc", "model": handle.identity(), "method": eval_args.mc_method,
                           "shots": eval_args.shots, "split": eval_args.split, "shots_split": eval_args.shots_split,
                           "data_dir": str(Path(eval_args.data_dir).resolve()),
                           "gen": asdict(gen_args) if eval_args.mc_method == "generate" else None})
    cache = ItemCache(out_dir / "cache" / f"mc-{fingerprint}.jsonl")
    items, skipped = [], {}
    for subject, path in test_files.items():
        rows, skipped[subject] = read_mc_csv(path)
        multi = any(len(r["answer"]) > 1 for r in rows)  # the whole subject decides, not the rows --limit keeps
        if eval_args.limit:
            rows = rows[:eval_args.limit]
        shot_rows = rows_all = None
        if eval_args.shots:
            shot_rows, _ = read_mc_csv(shot_files[subject]) if shot_files[subject] else ([], 0)
            rows_all, _ = read_mc_csv(path) if same else (None, 0)
        for i, row in enumerate(rows):
            shots = []
            if eval_args.shots:
                pool = [r for j, r in enumerate(rows_all) if j != i] if same else shot_rows
                shots = pool[:eval_args.shots]
            items.append({"key": f"{subject}/{i}", "subject": subject, "row": row, "shots": shots, "multi": multi})
    todo = [it for it in items if it["key"] not in cache]
    bar = progress(len(items), len(items) - len(todo), f"mc ({eval_args.mc_method}, {eval_args.shots}-shot)")
    if todo:
        model, tokenizer, template, _ = handle.load()
        for it in todo:
            it["msgs"] = mc_messages(it["row"], it["shots"], groups[it["subject"]]["name"], it["multi"])
        if eval_args.mc_method == "generate":
            _mc_generate(todo, model, tokenizer, template, gen_args, eval_args.batch_size, cache, bar)
        else:
            _mc_loglik(todo, model, tokenizer, template, eval_args.batch_size, cache, bar)
    bar.close()
    return _mc_report(items, cache, groups, skipped, eval_args)


def _mc_loglik(todo, model, tokenizer, template, batch_size, cache, bar):
    single = [it for it in todo if not it["multi"]]
    letter_ids = {}
    if single:
        probe = [{"role": "user", "content": "?"}]
        for letter in LETTERS:
            ids, run = _answer_tokens(template, tokenizer, probe, letter)
            letter_ids[letter] = ids[run[0]]
    single.sort(key=lambda it: len(it["row"]["question"]))
    for batch in batches(single, batch_size):
        prompts = [template.prompt_ids(tokenizer, it["msgs"]) for it in batch]
        opts = [list(it["row"]["options"]) for it in batch]
        wanted = [([len(p) - 1] * len(o), [letter_ids[k] for k in o]) for p, o in zip(prompts, opts)]
        for it, o, lps in zip(batch, opts, sequence_logprobs(model, prompts, tokenizer.pad_token_id, wanted)):
            scores = dict(zip(o, lps))
            pred = max(scores, key=scores.get)
            cache.put({"key": it["key"], "subject": it["subject"], "gold": it["row"]["answer"], "pred": pred,
                       "correct": mc_correct(pred, it["row"]["answer"]),
                       "scores": {k: round(v, 4) for k, v in scores.items()}})
        bar.update(len(batch))
    for it in (it for it in todo if it["multi"]):
        # multi-answer subject: every non-empty subset of the options is a candidate answer, scored by its
        # log-likelihood
        opts = sorted(it["row"]["options"])
        cands = ["".join(c) for n in range(1, len(opts) + 1) for c in combinations(opts, n)]
        seqs, runs = [], []
        for cand in cands:
            ids, run = _answer_tokens(template, tokenizer, it["msgs"], cand)
            seqs.append(ids)
            runs.append(run)
        scores = {}
        for start in range(0, len(cands), batch_size):
            chunk = range(start, min(start + batch_size, len(cands)))
            wanted = [([p - 1 for p in runs[c]], [seqs[c][p] for p in runs[c]]) for c in chunk]
            lps = sequence_logprobs(model, [seqs[c] for c in chunk], tokenizer.pad_token_id, wanted)
            for c, lp in zip(chunk, lps):
                scores[cands[c]] = sum(lp)
        pred = max(scores, key=scores.get)
        cache.put({"key": it["key"], "subject": it["subject"], "gold": it["row"]["answer"], "pred": pred,
                   "correct": mc_correct(pred, it["row"]["answer"])})
        bar.update(1)


def _mc_generate(todo, model, tokenizer, template, gen_args, batch_size, cache, bar):
    from utils.generation import generate_missing, generation_kwargs

    for it in todo:
        it["ids"] = template.prompt_ids(tokenizer, it["msgs"])
    generate_missing(todo, cache, model, tokenizer, generation_kwargs(gen_args, tokenizer, template), batch_size,
                     lambda it, text: {"subject": it["subject"], "gold": it["row"]["answer"], "output": text,
                                       "options": "".join(it["row"]["options"])}, bar.update)


def _acc(recs):
    return sum(r["correct"] for r in recs) / len(recs) if recs else None


def _mc_report(items, cache, groups, skipped, eval_args):
    by_subject = {}
    for it in items:
        rec = cache[it["key"]]
        if "output" in rec:  # generated: the letters are extracted again on every report
            pred = extract_choice(rec["output"], rec["options"])
            rec = dict(rec, pred=pred, correct=mc_correct(pred, rec["gold"]))
        by_subject.setdefault(it["subject"], []).append(rec)
    subjects = {}
    for s, recs in by_subject.items():
        subjects[s] = {"n": len(recs), "correct": sum(r["correct"] for r in recs), "accuracy": _acc(recs),
                       "groups": groups[s]["groups"], "skipped_rows": skipped[s]}
        if eval_args.mc_method == "generate":
            subjects[s]["parsable_rate"] = sum(r["pred"] is not None for r in recs) / len(recs)
    group_recs = {}
    for s, recs in by_subject.items():
        for g in groups[s]["groups"]:
            group_recs.setdefault(g, []).extend(recs)
    all_recs = [r for recs in by_subject.values() for r in recs]
    metrics = {"average": sum(v["accuracy"] for v in subjects.values()) / len(subjects), "overall": _acc(all_recs),
               "n": len(all_recs), "subjects": len(subjects)}
    if eval_args.mc_method == "generate":
        metrics["parsable_rate"] = sum(r["pred"] is not None for r in all_recs) / len(all_recs)
    rows = [[s, ", ".join(v["groups"]), v["n"], v["accuracy"]] for s, v in subjects.items()]
    rows += [[f"**{g}**", "group", len(recs), _acc(recs)] for g, recs in sorted(group_recs.items())]
    rows += [["**average** (mean over subjects)", "", len(all_recs), metrics["average"]],
             ["**overall** (all questions)", "", len(all_recs), metrics["overall"]]]
    return {"metrics": metrics, "subjects": subjects,
            "groups": {g: {"n": len(r), "accuracy": _acc(r)} for g, r in sorted(group_recs.items())},
            "table": md_table(["subject", "groups", "n", "accuracy"], rows)}
