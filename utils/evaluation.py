"""Benchmarks: multiple choice (mc), CoT / GSM8K answers (cot), Belle-eval with an LLM judge (belle), held-out loss.

The scoring functions come first: pure text -> answer functions, tested on hand-made cases. Then the tasks.
Every task works the same way: list the items, skip those already in the per-item cache
(OUTPUT_DIR/cache/<task>-<fingerprint>.jsonl, appended as items finish, so a killed run resumes and a rerun
costs nothing), run the rest in batches with a progress bar, then aggregate and write OUTPUT_DIR/<task>.json
plus a markdown table beside it. The model is loaded only when some item is not cached yet.
"""
import csv
import hashlib
import json
import math
import re
import threading
from dataclasses import asdict
from itertools import combinations
from pathlib import Path

import yaml

from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GROUPS_FILE = ROOT / "data" / "cmmlu_groups.yaml"
LETTERS = "ABCDEFGH"

# ==== scoring: text -> answer ==========================================================================
_FULLWIDTH = str.maketrans("ＡＢＣＤＥＦＧＨ（）：，．", "ABCDEFGH():,.")
_LETTER = r"[\(\[（【]?([A-H])[\)\]）】]?(?![A-Za-z])"
_SEP = r"\s*(?:,|，|、|;|；|/|&|和|与|及|以及|\band\b|\bor\b|\s)\s*"
_RUN = rf"{_LETTER}(?:{_SEP}{_LETTER})*"
_CUE = re.compile(r"(?:正确答案|答案|正确选项|选项|answers?)\s*(?:应该|应当|应)?\s*(?:is|are|:|：|是|为|选|选择)?"
                  r"\s*(?:选项|选择|选)?\s*[:：]?\s*", re.I)
_CHOOSE = re.compile(r"(?:选择|选)\s*")


def letter_set(text):
    """The letters of an answer field: "AC", "A,C", "A、C", "(B)" -> frozenset({"A", "C"}) / {"B"}."""
    return frozenset(re.findall(r"[A-H]", str(text or "").upper().translate(_FULLWIDTH)))


def mc_correct(pred, gold):
    """A multiple-choice answer is right only when its set of letters equals the gold set ("CA" == "AC"; "A" != "AC")."""
    return bool(pred) and letter_set(pred) == letter_set(gold)


_GLUED = re.compile(r"\s*([A-H]{2,8})(?![A-Za-z])")
_RUN_AT = re.compile(r"\s*" + _RUN)


def _letters_at(text, pos, allowed):
    """Option letters right at text[pos:]: "AC", "A and C", "(B)", "A、C"; None when there are none."""
    m = _GLUED.match(text, pos)
    if m:
        letters = set(m.group(1))
    else:
        m = _RUN_AT.match(text, pos)
        if not m:
            return None
        letters = set(re.findall(r"[A-H]", m.group(0)))
    letters &= set(allowed)
    return letters or None


def extract_choice(text, allowed="ABCD"):
    """The option letter(s) a generated answer picks, sorted ("B", "AC"), or None when it names none.

    Cues first ("答案是 B", "The answer is (C)", "Answer: A and C", "选B"; the last cue wins), then a letter
    that opens the answer ("B.", "(C) ..."), then a single parenthesised letter, then a single stand-alone
    option letter ("A" followed by a lowercase word is read as the article, not an option).
    """
    if not text:
        return None
    t = str(text).translate(_FULLWIDTH)
    found = None
    for cue in (_CUE, _CHOOSE):
        for m in cue.finditer(t):
            got = _letters_at(t, m.end(), allowed)
            if got:
                found = got
        if found:
            return "".join(sorted(found))
    opens = re.match(r"\s*[\(\[（【]?[A-H](?:[\)\]）】.．、:：,，\s]|$|[A-H]*(?![A-Za-z]))", t)
    article = re.match(r"\s*A\s+(?!and\b|or\b)[a-z]", t)  # "A cat ..." is the article, not option A
    got = _letters_at(t, 0, allowed) if opens and not article else None
    if got:
        return "".join(sorted(got))
    paren = set(re.findall(r"[\(（]([A-H])[\)）]", t)) & set(allowed)
    if len(paren) == 1:
        return paren.pop()
    bare = {m.group(1) for m in re.finditer(r"(?<![A-Za-z'])([A-H])(?![A-Za-z'])(?!\s+(?!and\b|or\b)[a-z])", t)} & set(allowed)
    return bare.pop() if len(bare) == 1 else None


_FINAL = re.compile(
    r"####\s*(?P<a>[^\n]*\w[^\n]*)"
    r"|(?<![A-Za-z])answer\s*(?:[:：]|\s+(?:is|was|would\s+be|will\s+be)\b\s*[:：]?)\s*(?:[-*•]\s+)?(?P<b>[^\n]*\w[^\n]*)"
    r"|(?:最终答案|答案)\s*(?:是|为|[:：])\s*(?P<c>[^\n]+)", re.I)


def _trim_answer(s):
    s = s.strip()
    s = re.split(r"\.(?=\s|$)|。", s, maxsplit=1)[0]  # end at the sentence's end
    s = s.strip().strip("*_`\"'“”‘’").strip()
    s = re.sub(r"[\s.。,，;；!！]+$", "", s)
    return s or None


def extract_final_answer(text):
    """The final answer a chain of thought states, or None when it states none.

    Understands the CoT collection's endings ("Therefore, the final answer is X.", "So the answer is X.",
    "The final answer: (C).", "The answer: yes."), GSM8K's "#### 72", "Answer: X" and "答案是 X"; the last one wins.
    """
    if not text:
        return None
    last = None
    for m in _FINAL.finditer(str(text)):
        got = _trim_answer(m.group("a") or m.group("b") or m.group("c") or "")
        if got:
            last = got
    return last


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def parse_number(text):
    """The (last) number in a short answer, tolerant to $, commas, units, %: "$1,000.50" -> 1000.5, "72.0 clips" -> 72."""
    if text is None:
        return None
    s = re.sub(r"(?<=\d)[,，](?=\d{3}(?!\d))", "", str(text))
    s = s.replace("−", "-")
    nums = _NUMBER.findall(s)
    if not nums:
        return None
    last = nums[-1].replace(" ", "")
    try:
        if "/" in last:
            a, b = last.split("/")
            return float(a) / float(b) if float(b) else None
        return float(last)
    except ValueError:
        return None


def _norm_text(s):
    s = str(s).lower().translate(_FULLWIDTH)
    s = re.sub(r"[\"'“”‘’`*_()\[\]（）【】.,，。:：;；!！?？]", " ", s)
    return " ".join(s.split())


def _is_numeric_answer(ref):
    return bool(re.search(r"\d", ref)) and len(re.sub(r"[\d\s.,$%/+\-€£¥]", "", ref)) <= 12


def answers_match(pred, ref):
    """Does the extracted answer equal the reference? Numbers numerically, option letters by letter, text normalised."""
    if pred is None or ref is None:
        return False
    pred, ref = str(pred).strip(), str(ref).strip()
    letter = re.fullmatch(r"[\(（]?([A-H])[\)）]?\.?", ref)
    if letter:
        m = re.match(r"\s*(?:option\s+)?[\(（]?([A-H])[\)）]?(?![A-Za-z])", pred, re.I)
        return bool(m) and m.group(1).upper() == letter.group(1)
    if _is_numeric_answer(ref):
        a, b = parse_number(pred), parse_number(ref)
        return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))
    p, r = _norm_text(pred), _norm_text(ref)
    if p == r:
        return True
    if r in ("yes", "no"):  # "yes, because ..." / "no." answer a yes/no question
        return p.split()[:1] == [r]
    return False


_SCORE = re.compile(r"(?:得分|分数|评分|score)\s*(?:为|是)?\s*[:：]?\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", re.I)


def parse_judge_score(text):
    """The score in a Belle judge answer ("得分: 0.8", "得分：1分。...", "得分: 8/10"), on Belle's 0-1 scale.

    None when the answer has no score, or one outside 0-1 (the prompts ask for 0-1; a guess would bias the mean).
    """
    if not text:
        return None
    m = _SCORE.search(str(text))
    if not m:
        return None
    value = float(m.group(1))
    if m.group(2):
        den = float(m.group(2))
        value = value / den if den else -1
    return value if 0 <= value <= 1 else None


# ==== shared machinery ==================================================================================
def _digest(obj, n=16):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:n]


class ItemCache:
    """Per-item results appended to a JSONL file as they finish; reread on the next run.

    A torn last line (a killed run) is dropped, so that item is simply done again.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.items = {}
        if self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                data = data[:data.rfind(b"\n") + 1]
                self.path.write_bytes(data)
            for line in data.decode("utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.items[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self._lock = threading.Lock()

    def __contains__(self, key):
        return key in self.items

    def __getitem__(self, key):
        return self.items[key]

    def put(self, rec):
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.items[rec["key"]] = rec


class ModelHandle:
    """The model under evaluation, loaded on first use (a fully cached rerun never loads it)."""

    def __init__(self, model_args, eval_args):
        self.model_args, self.eval_args = model_args, eval_args
        self._loaded = None

    def load(self):
        if self._loaded is None:
            from utils.generation import load_for_inference

            m, e = self.model_args, self.eval_args
            self._loaded = load_for_inference(e.lora_dir, m.model_name_or_path, m.model_type, e.template,
                                              m.trust_remote_code, m.dtype)
            self._loaded[0].eval()
        return self._loaded

    def identity(self):
        """What the results depend on: base, adapter (path and weights' size/time), template, dtype."""
        from utils.models import EMBEDDED_ALIAS

        m, e = self.model_args, self.eval_args
        ident = {"base": m.model_name_or_path or EMBEDDED_ALIAS, "model_type": m.model_type, "dtype": m.dtype,
                 "template": e.template}
        if e.lora_dir:
            d = Path(e.lora_dir)
            ident["adapter"] = str(d.resolve())
            for name in ("adapter_model.safetensors", "template.json"):
                if (d / name).is_file():
                    st = (d / name).stat()
                    ident[name] = [st.st_size, st.st_mtime_ns]
        return ident

    def describe(self):
        from utils.models import EMBEDDED_ALIAS

        m, e = self.model_args, self.eval_args
        if e.lora_dir:
            from utils.generation import read_meta

            meta = read_meta(e.lora_dir)
            return {"base_model": m.model_name_or_path or meta["base_model"], "adapter": str(e.lora_dir),
                    "peft_type": meta.get("peft_type")}
        return {"base_model": m.model_name_or_path or EMBEDDED_ALIAS, "adapter": None, "peft_type": None}

    def run_options(self):
        """Tokenization options of the training run (cutoff_len, train_on_inputs, cot_prompt), for the same masking."""
        opts = {"cutoff_len": 256, "train_on_inputs": False, "cot_prompt": False}
        if self.eval_args.lora_dir:
            from utils.generation import read_meta

            args = read_meta(self.eval_args.lora_dir).get("arguments", {})
            opts.update({k: args[k] for k in opts if k in args})
        if self.eval_args.cutoff_len:
            opts["cutoff_len"] = self.eval_args.cutoff_len
        return opts


def _progress(total, initial, desc):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="item", desc=desc, dynamic_ncols=True)


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _right_pad(seqs, pad_id):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _logits(model, seqs, pad_id):
    """Logits at every position of right-padded sequences: (batch, width, vocab)."""
    import torch

    ids, mask = _right_pad(seqs, pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits[:, -ids.shape[1]:]  # prompt-learning methods prepend virtual tokens


def _token_logprobs(row_logits, positions, targets):
    """log p(targets[i] | prefix) where row_logits[positions[i]] predicts it; only these rows are normalised."""
    import torch

    lp = row_logits[torch.tensor(positions, device=row_logits.device)].float()
    tgt = torch.tensor(targets, device=row_logits.device)
    return (lp.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(lp, dim=-1)).tolist()


def generate_batch(model, tokenizer, prompts, gen_kwargs):
    """Greedy/sampled answers for a batch of prompt token ids, left-padded like predict.py."""
    import torch

    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def _prompt_key(msgs):
    return _digest([[m["role"], m["content"], m.get("input") or ""] for m in msgs])


def _split_conversation(msgs):
    """(prompt messages up to the last user turn, the answer after it or None)."""
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    ref = msgs[last_user + 1]["content"] if last_user + 1 < len(msgs) else None
    return msgs[:last_user + 1], ref


def _excluded_prompts(eval_args):
    if not eval_args.exclude_data:
        return set()
    from utils.data import load_conversations

    convs, _ = load_conversations(eval_args.exclude_data, for_training=True, seed=eval_args.exclude_seed)
    return {_prompt_key(_split_conversation(c)[0]) for c in convs}


def _conversation_items(eval_args, need_answer=True):
    """[(source label, messages)] from --data, minus --exclude_data, at most --limit per source."""
    from utils.data import load_sources

    excluded = _excluded_prompts(eval_args)
    out, report = [], []
    for value in eval_args.data:
        for ds, stats in load_sources([value], for_training=need_answer):
            kept, skipped = [], 0
            for msgs in ds["messages"]:
                if _prompt_key(_split_conversation(msgs)[0]) in excluded:
                    skipped += 1
                    continue
                kept.append(msgs)
                if eval_args.limit and len(kept) >= eval_args.limit:
                    break
            out += [(stats["source"], m) for m in kept]
            report.append({"source": stats["source"], "rows": stats.get("used", len(ds)), "excluded": skipped,
                           "evaluated": len(kept)})
    if not out:
        raise UserError(f"no rows left to evaluate in --data {' '.join(eval_args.data)} (after --exclude_data)")
    return out, report


def _md_table(headers, rows):
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ==== mc: multiple choice ===============================================================================
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
            raise UserError(f"--subjects: '{unknown[0]}' has no file in {root}; subjects are: {', '.join(sorted(test))}")
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


_CJK = re.compile(r"[\u4e00-\u9fff]")


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
    zh = bool(_CJK.search(row["question"] + "".join(row["options"].values())))
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


def run_mc(handle, eval_args, gen_args, out_dir):
    test_files, shot_files, same = _mc_layout(eval_args)
    groups = load_groups(eval_args, list(test_files))
    fingerprint = _digest({"task": "mc", "model": handle.identity(), "method": eval_args.mc_method,
                           "shots": eval_args.shots, "split": eval_args.split, "shots_split": eval_args.shots_split,
                           "data_dir": str(Path(eval_args.data_dir).resolve()),
                           "gen": asdict(gen_args) if eval_args.mc_method == "generate" else None})
    cache = ItemCache(out_dir / "cache" / f"mc-{fingerprint}.jsonl")
    items, skipped = [], {}
    for subject, path in test_files.items():
        rows, skipped[subject] = read_mc_csv(path)
        if eval_args.limit:
            rows = rows[:eval_args.limit]
        shot_rows = rows_all = None
        if eval_args.shots:
            shot_rows, _ = read_mc_csv(shot_files[subject]) if shot_files[subject] else ([], 0)
            rows_all, _ = read_mc_csv(path) if same else (None, 0)
        multi = any(len(r["answer"]) > 1 for r in rows)
        for i, row in enumerate(rows):
            shots = []
            if eval_args.shots:
                pool = [r for j, r in enumerate(rows_all) if j != i] if same else shot_rows
                shots = pool[:eval_args.shots]
            items.append({"key": f"{subject}/{i}", "subject": subject, "row": row, "shots": shots, "multi": multi})
    todo = [it for it in items if it["key"] not in cache]
    bar = _progress(len(items), len(items) - len(todo), f"mc ({eval_args.mc_method}, {eval_args.shots}-shot)")
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
    for batch in _batches(single, batch_size):
        prompts = [template.prompt_ids(tokenizer, it["msgs"]) for it in batch]
        logits = _logits(model, prompts, tokenizer.pad_token_id)
        for b, (it, p) in enumerate(zip(batch, prompts)):
            opts = list(it["row"]["options"])
            scores = dict(zip(opts, _token_logprobs(logits[b], [len(p) - 1] * len(opts), [letter_ids[k] for k in opts])))
            pred = max(scores, key=scores.get)
            cache.put({"key": it["key"], "subject": it["subject"], "gold": it["row"]["answer"], "pred": pred,
                       "correct": mc_correct(pred, it["row"]["answer"]), "scores": {k: round(v, 4) for k, v in scores.items()}})
        bar.update(len(batch))
    for it in (it for it in todo if it["multi"]):
        # multi-answer subject: every non-empty subset of the options is a candidate answer, scored by its log-likelihood
        opts = sorted(it["row"]["options"])
        cands = ["".join(c) for n in range(1, len(opts) + 1) for c in combinations(opts, n)]
        seqs, runs = [], []
        for cand in cands:
            ids, run = _answer_tokens(template, tokenizer, it["msgs"], cand)
            seqs.append(ids)
            runs.append(run)
        scores = {}
        for start in range(0, len(cands), batch_size):
            logits = _logits(model, seqs[start:start + batch_size], tokenizer.pad_token_id)
            for b in range(logits.shape[0]):
                c = start + b
                scores[cands[c]] = sum(_token_logprobs(logits[b], [p - 1 for p in runs[c]], [seqs[c][p] for p in runs[c]]))
        pred = max(scores, key=scores.get)
        cache.put({"key": it["key"], "subject": it["subject"], "gold": it["row"]["answer"], "pred": pred,
                   "correct": mc_correct(pred, it["row"]["answer"])})
        bar.update(1)


def _mc_generate(todo, model, tokenizer, template, gen_args, batch_size, cache, bar):
    from utils.generation import generation_kwargs

    kwargs = generation_kwargs(gen_args, tokenizer, template)
    prompts = {it["key"]: template.prompt_ids(tokenizer, it["msgs"]) for it in todo}
    todo = sorted(todo, key=lambda it: len(prompts[it["key"]]))
    for batch in _batches(todo, batch_size):
        texts = generate_batch(model, tokenizer, [prompts[it["key"]] for it in batch], kwargs)
        for it, text in zip(batch, texts):
            cache.put({"key": it["key"], "subject": it["subject"], "gold": it["row"]["answer"], "output": text,
                       "options": "".join(it["row"]["options"])})
        bar.update(len(batch))


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
            "table": _md_table(["subject", "groups", "n", "accuracy"], rows)}


# ==== cot: answer extraction ============================================================================
def run_cot(handle, eval_args, gen_args, out_dir):
    convs, report = _conversation_items(eval_args)
    opts = handle.run_options()
    fingerprint = _digest({"task": "cot", "model": handle.identity(), "gen": asdict(gen_args),
                           "cot_prompt": opts["cot_prompt"]})
    cache = ItemCache(out_dir / "cache" / f"cot-{fingerprint}.jsonl")
    items = []
    for source, msgs in convs:
        prompt, ref = _split_conversation(msgs)
        items.append({"key": _prompt_key(prompt) + _digest(ref, 8), "source": source, "prompt": prompt, "ref": ref})
    todo = [it for it in items if it["key"] not in cache]
    bar = _progress(len(items), len(items) - len(todo), "cot")
    if todo:
        from utils.formats import add_cot_prompt
        from utils.generation import generation_kwargs

        model, tokenizer, template, _ = handle.load()
        kwargs = generation_kwargs(gen_args, tokenizer, template)
        for it in todo:
            msgs = add_cot_prompt(it["prompt"]) if opts["cot_prompt"] else it["prompt"]
            it["ids"] = template.prompt_ids(tokenizer, msgs)
        todo.sort(key=lambda it: len(it["ids"]))
        for batch in _batches(todo, eval_args.batch_size):
            texts = generate_batch(model, tokenizer, [it["ids"] for it in batch], kwargs)
            for it, text in zip(batch, texts):
                cache.put({"key": it["key"], "source": it["source"], "prompt": it["prompt"][-1]["content"],
                           "output": text, "reference_text": it["ref"]})
            bar.update(len(batch))
    bar.close()
    recs = [score_cot(cache[it["key"]]) for it in items]
    return _cot_report(recs, report)


def score_cot(rec):
    """Score a cached generation (scoring is redone on every report, so a better extractor needs no new generation)."""
    pred = extract_final_answer(rec["output"])
    ref = extract_final_answer(rec["reference_text"]) or rec["reference_text"].strip()
    return dict(rec, answer=pred, reference=ref, parsable=pred is not None, correct=answers_match(pred, ref))


def _cot_metrics(recs):
    n = len(recs)
    parsable = [r for r in recs if r["parsable"]]
    return {"n": n, "accuracy": sum(r["correct"] for r in recs) / n, "parsable_rate": len(parsable) / n,
            "accuracy_of_parsable": (sum(r["correct"] for r in parsable) / len(parsable)) if parsable else None}


def _cot_report(recs, report):
    sources = {}
    for r in recs:
        sources.setdefault(r["source"], []).append(r)
    per = {s: _cot_metrics(rs) for s, rs in sources.items()}
    metrics = _cot_metrics(recs)
    rows = [[s, m["n"], m["accuracy"], m["parsable_rate"], m["accuracy_of_parsable"]] for s, m in per.items()]
    rows.append(["**all**", metrics["n"], metrics["accuracy"], metrics["parsable_rate"], metrics["accuracy_of_parsable"]])
    samples = [{k: r[k] for k in ("source", "prompt", "output", "answer", "reference", "correct")} for r in recs[:5]]
    return {"metrics": metrics, "sources": per, "data": report, "samples": samples,
            "table": _md_table(["source", "n", "accuracy", "parsable answers", "accuracy of parsable"], rows)}


# ==== belle: LLM judge ==================================================================================
GENERIC_JUDGE_PROMPT = ("你需要通过参考标准答案，来对模型回答给出分数，满分为1分，最低分为0分。请按照\"得分:\"这样的形式输出分数。"
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


class Judge:
    """Chat completions from any OpenAI-compatible endpoint (the `openai` client when installed, else urllib)."""

    def __init__(self, base_url, model, api_key=None, max_tokens=256, timeout=120.0):
        import os

        self.base_url, self.model, self.max_tokens, self.timeout = base_url.rstrip("/"), model, max_tokens, timeout
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        try:
            from openai import OpenAI

            self._client = OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=timeout, max_retries=2)
        except ImportError:
            self._client = None

    def __call__(self, content):
        messages = [{"role": "user", "content": content}]
        try:
            if self._client is not None:
                resp = self._client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                            max_tokens=self.max_tokens)
                return resp.choices[0].message.content or ""
            return self._urllib(messages)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"the judge at {self.base_url} (model '{self.model}') failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}; check --judge_base_url, "
                            "--judge_model and --judge_api_key (answers so far are cached)") from None

    def _urllib(self, messages):
        import urllib.request

        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        req = urllib.request.Request(self.base_url + "/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        return data["choices"][0]["message"]["content"] or ""


def _belle_rows(eval_args):
    from utils.data import iter_rows, resolve_sources

    excluded = set()
    if eval_args.exclude_data:
        excluded = _excluded_prompts(eval_args)
    rows, first = [], None
    for src in resolve_sources(eval_args.data):
        if src.count is not None:
            raise UserError(f"--task belle reads whole files; use --limit instead of ':{src.count:g}'")
        if not src.paths:
            raise UserError(f"--task belle needs local files; '{src.label}' is not one")
        n = 0
        for path in src.paths:
            first = first or Path(path)
            for where, row, _ in iter_rows(Path(path)):
                if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                    raise UserError(f"{where} needs a 'question' field (Belle-eval rows: question, std_answer, class)")
                ref = row.get("std_answer", row.get("answer"))
                msgs = [{"role": "user", "content": row["question"], "input": ""}]
                if _prompt_key(msgs) in excluded:
                    continue
                if eval_args.limit and n >= eval_args.limit:
                    break
                rows.append({"source": src.label, "question": row["question"], "std_answer": str(ref or ""),
                             "class": _norm_class(row.get("class") or "unknown")})
                n += 1
    if not rows:
        raise UserError(f"no rows to evaluate in --data {' '.join(eval_args.data)}")
    return rows, first


def run_belle(handle, eval_args, gen_args, out_dir):
    rows, first_file = _belle_rows(eval_args)
    fingerprint = _digest({"task": "belle", "model": handle.identity(), "gen": asdict(gen_args)})
    cache = ItemCache(out_dir / "cache" / f"belle-{fingerprint}.jsonl")
    for r in rows:
        r["key"] = _digest([r["question"], r["std_answer"]])
    todo = [r for r in rows if r["key"] not in cache]
    bar = _progress(len(rows), len(rows) - len(todo), "belle answers")
    if todo:
        from utils.generation import generation_kwargs

        model, tokenizer, template, _ = handle.load()
        kwargs = generation_kwargs(gen_args, tokenizer, template)
        for r in todo:
            r["ids"] = template.prompt_ids(tokenizer, [{"role": "user", "content": r["question"]}])
        todo.sort(key=lambda r: len(r["ids"]))
        for batch in _batches(todo, eval_args.batch_size):
            texts = generate_batch(model, tokenizer, [r["ids"] for r in batch], kwargs)
            for r, text in zip(batch, texts):
                cache.put({"key": r["key"], "class": r["class"], "question": r["question"], "answer": text})
            bar.update(len(batch))
    bar.close()
    answers = {r["key"]: cache[r["key"]]["answer"] for r in rows}
    if not eval_args.judge_base_url:
        print("no --judge_base_url: answers generated and cached; pass --judge_base_url and --judge_model to score them")
        return {"metrics": {"n": len(rows), "judged": 0, "score": None}, "classes": {},
                "table": "answers generated; no judge given\n"}
    if not eval_args.judge_model:
        raise UserError("--judge_base_url needs --judge_model (the judge's model name at that endpoint)")
    prompts = load_judge_prompts(eval_args.judge_prompts or Path(first_file).parent / "eval_prompt.json")
    judge = Judge(eval_args.judge_base_url, eval_args.judge_model, eval_args.judge_api_key,
                  eval_args.judge_max_tokens, eval_args.judge_timeout)
    jcache = ItemCache(out_dir / "cache" / "judge.jsonl")  # keyed by judge model + message: shared by every model
    jobs = []
    for r in rows:
        r["message"] = judge_message(prompts.get(r["class"], GENERIC_JUDGE_PROMPT), r["question"], r["std_answer"],
                                     answers[r["key"]])
        r["jkey"] = _digest([eval_args.judge_model, r["message"]])
        if r["jkey"] not in jcache and r["jkey"] not in {j["jkey"] for j in jobs}:
            jobs.append(r)
    bar = _progress(len(rows), len(rows) - len(jobs), "belle judge")

    def ask(r):
        text = judge(r["message"])
        jcache.put({"key": r["jkey"], "judge_model": eval_args.judge_model, "response": text,
                    "score": parse_judge_score(text)})
        bar.update(1)

    if jobs:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, eval_args.judge_workers)) as pool:
            for fut in [pool.submit(ask, r) for r in jobs]:
                fut.result()
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
            "table": _md_table(["class", "n", "score (0-1)", "judge answers without a score"], rows)}


# ==== loss: held-out loss and perplexity ================================================================
def run_loss(handle, eval_args, gen_args, out_dir):
    convs, report = _conversation_items(eval_args)
    opts = handle.run_options()
    fingerprint = _digest({"task": "loss", "model": handle.identity(), **opts})
    cache = ItemCache(out_dir / "cache" / f"loss-{fingerprint}.jsonl")
    items = [{"key": _digest([[m["role"], m["content"], m.get("input") or ""] for m in msgs]), "source": source,
              "msgs": msgs} for source, msgs in convs]
    todo = [it for it in items if it["key"] not in cache]
    bar = _progress(len(items), len(items) - len(todo), "loss")
    if todo:
        from utils.formats import add_cot_prompt

        model, tokenizer, template, _ = handle.load()
        for it in todo:
            msgs = add_cot_prompt(it["msgs"]) if opts["cot_prompt"] else it["msgs"]
            ids, labels = template.encode(tokenizer, msgs, train_on_inputs=opts["train_on_inputs"])
            it["ids"], it["labels"] = ids[:opts["cutoff_len"]], labels[:opts["cutoff_len"]]
        todo.sort(key=lambda it: len(it["ids"]))
        for batch in _batches(todo, eval_args.batch_size):
            logits = _logits(model, [it["ids"] for it in batch], tokenizer.pad_token_id)
            for b, it in enumerate(batch):
                pos = [p for p in range(1, len(it["ids"])) if it["labels"][p] != -100]  # as training: shifted labels
                nll = -sum(_token_logprobs(logits[b], [p - 1 for p in pos], [it["labels"][p] for p in pos])) if pos else 0.0
                cache.put({"key": it["key"], "source": it["source"], "nll": nll, "tokens": len(pos)})
            bar.update(len(batch))
    bar.close()
    recs = [cache[it["key"]] for it in items]
    return _loss_report(recs, report, opts)


def _loss_metrics(recs):
    tokens = sum(r["tokens"] for r in recs)
    loss = sum(r["nll"] for r in recs) / tokens if tokens else None
    return {"rows": len(recs), "tokens": tokens, "loss": loss,
            "perplexity": math.exp(min(loss, 50)) if loss is not None else None,
            "dropped_no_answer_token": sum(1 for r in recs if not r["tokens"])}


def _loss_report(recs, report, opts):
    sources = {}
    for r in recs:
        sources.setdefault(r["source"], []).append(r)
    per = {s: _loss_metrics(rs) for s, rs in sources.items()}
    metrics = _loss_metrics(recs)
    rows = [[s, m["rows"], m["tokens"], m["loss"], m["perplexity"]] for s, m in per.items()]
    rows.append(["**all**", metrics["rows"], metrics["tokens"], metrics["loss"], metrics["perplexity"]])
    return {"metrics": metrics, "sources": per, "data": report, "options": opts,
            "table": _md_table(["source", "rows", "answer tokens", "loss (per token)", "perplexity"], rows)}


# ==== entry point ==========================================================================================
TASK_FUNCS = {"mc": run_mc, "cot": run_cot, "belle": run_belle, "loss": run_loss}


def default_output_dir(model_args, eval_args):
    if eval_args.output_dir:
        return Path(eval_args.output_dir)
    if eval_args.lora_dir:
        return Path(eval_args.lora_dir) / "eval"
    from utils.models import EMBEDDED_ALIAS

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", (model_args.model_name_or_path or EMBEDDED_ALIAS).strip("/"))
    return ROOT / "outputs" / "eval" / name


def result_name(eval_args):
    if eval_args.task == "mc":
        return f"mc-{eval_args.shots}shot" + ("-generate" if eval_args.mc_method == "generate" else "")
    return eval_args.task


def run_eval(model_args, eval_args, gen_args, quiet=False):
    """Run one task; write <output>.json and <output>.md; return the results dict."""
    import time

    out_dir = default_output_dir(model_args, eval_args)
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = ModelHandle(model_args, eval_args)
    start = time.time()
    results = TASK_FUNCS[eval_args.task](handle, eval_args, gen_args, out_dir)
    results = {"task": eval_args.task, "model": handle.describe(), **results,
               "settings": {k: v for k, v in asdict(eval_args).items() if v is not None and not k.startswith("judge_api")},
               "generation": asdict(gen_args), "runtime_s": round(time.time() - start, 2)}
    out_json = Path(eval_args.output) if eval_args.output else out_dir / f"{result_name(eval_args)}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    who = results["model"]["adapter"] or results["model"]["base_model"]
    md = f"# {eval_args.task}: {who}\n\n{results['table']}"
    out_json.with_suffix(".md").write_text(md, encoding="utf-8")
    if not quiet:
        print(md, end="")
        print(f"wrote {out_json} and {out_json.with_suffix('.md')}")
    return results
