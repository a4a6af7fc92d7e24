"""Self-instruct: grow instruction data from seed tasks with any OpenAI-compatible model (Alpaca's recipe).

    python -m utils.self_instruct --seed_tasks seed_tasks.jsonl --output generated.jsonl \\
        --base_url http://127.0.0.1:8000/v1 --model NAME --num_instructions 1000

One round: sample k examples (seed tasks, and instructions kept so far) -> write them as a numbered
instruction / input / output list under a header that asks for more tasks -> the model continues the
list -> parse its numbered items -> filter them (length, blacklist, bad start, empty output, exact
duplicate, ROUGE-L similarity to every instruction kept so far, seeds included) -> append the kept ones
to the output as alpaca JSON lines ({"instruction", "input", "output"}), which `--data` reads.
Several prompts are in flight at once (threads); failed requests are retried with exponential backoff;
a rerun of the same command continues where the last one stopped.
"""
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Optional

from utils.errors import UserError, cli_main
from utils.openai_client import OpenAIClient, RequestFailed, api_root  # noqa: F401 (used by tests)

# ---- flags ----------------------------------------------------------------------------------------


@dataclass
class SelfInstructArguments:
    seed_tasks: str = field(
        default=None, metadata={"help": "Seed tasks: Alpaca's seed_tasks.jsonl layout ({instruction, instances: "
                                        "[{input, output}]}, BELLE's Chinese seeds too) or alpaca rows "
                                        "({instruction, input, output}). Required."})
    output: str = field(
        default=None, metadata={"help": "Output .jsonl of {instruction, input, output} rows, appended as they are "
                                        "kept; rerunning continues it. Statistics go to OUT.stats.json. Required."})
    base_url: str = field(
        default=None, metadata={"help": "OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (our "
                                        "server.py) or https://api.openai.com/v1. Required."})
    model: str = field(default=None, metadata={"help": "Model name sent to the endpoint. Required."})
    api_key: Optional[str] = field(
        default=None, metadata={"help": "Bearer token for the endpoint (default: $OPENAI_API_KEY, else none)."})
    num_instructions: int = field(
        default=100, metadata={"help": "Stop when the output holds this many instructions (resumed rows count)."})
    lang: str = field(
        default="auto", metadata={"help": "Language of the tasks: en, zh (Chinese header, character-level ROUGE, "
                                          "Chinese blacklist) or auto (zh when most seed instructions are Chinese).",
                                  "choices": ["auto", "en", "zh"]})
    prompt_file: Optional[str] = field(
        default=None, metadata={"help": "Text file with your own prompt header (e.g. Alpaca's prompt.txt); "
                                        "'{num_tasks}' in it is replaced. Default: our built-in header."})
    num_tasks_per_prompt: int = field(
        default=20, metadata={"help": "Length of the task list the header asks for (examples included)."})
    num_prompt_instructions: int = field(
        default=3, metadata={"help": "Examples shown in each prompt (k)."})
    num_generated_in_prompt: int = field(
        default=1, metadata={"help": "How many of the k examples are instructions generated so far (when there are "
                                     "any); the rest are seed tasks."})
    use_completions: bool = field(
        default=False, metadata={"help": "Use /completions (a base model continues the list) instead of "
                                         "/chat/completions."})
    request_batch_size: int = field(
        default=1, metadata={"help": "Prompts per batch: one /completions request carries them all (Alpaca sent 5); "
                                     "with chat each prompt is its own request, sent one after the other."})
    concurrency: int = field(default=4, metadata={"help": "Batches in flight at once (threads)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    max_tokens: int = field(default=3072, metadata={"help": "Maximum tokens per response."})
    request_timeout: float = field(default=120.0, metadata={"help": "Seconds to wait for one response."})
    max_retries: int = field(
        default=5, metadata={"help": "Retries of a request after a timeout, a connection error, HTTP 408/409/429 "
                                     "or 5xx, with exponential backoff."})
    retry_delay: float = field(
        default=1.0, metadata={"help": "First backoff delay in seconds; it doubles on each retry (at most 60 s)."})
    similarity_threshold: float = field(
        default=0.7, metadata={"help": "Reject an instruction whose ROUGE-L F1 with any kept or seed instruction "
                                       "is at least this."})
    min_words: int = field(default=3, metadata={"help": "Reject instructions shorter than this many words "
                                                        "(characters for Chinese)."})
    max_words: int = field(default=150, metadata={"help": "Reject instructions longer than this many words "
                                                          "(characters for Chinese)."})
    blacklist_extra: Optional[list[str]] = field(
        default=None, metadata={"help": "More words that reject an instruction containing them."})
    max_prompts: int = field(
        default=0, metadata={"help": "Send at most this many prompts in this run (0: no limit); a rerun continues."})
    save_rejected: bool = field(
        default=False, metadata={"help": "Also write rejected items with their reason to OUT.rejected.jsonl."})
    seed: int = field(default=42, metadata={"help": "Random seed of the example sampling."})


# ---- seeds and prompts ----------------------------------------------------------------------------

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

HEADERS = {
    "en": (
        "You are helping to build a training set of tasks for an AI assistant. Come up with {num_tasks} new and "
        "varied tasks. Each task has an instruction, an input and an output, and a language model will later be "
        "asked to carry out the instruction.\n\n"
        "Rules:\n"
        "1. Vary the wording: do not open many instructions with the same verb.\n"
        "2. Mix the forms: some instructions are requests in the imperative, others are direct questions.\n"
        "3. Mix the kinds of task: open-ended writing, brainstorming, classification, rewriting and editing, "
        "extraction, reasoning, arithmetic, code, advice and more.\n"
        "4. A text-only model must be able to do every task: nothing to draw, no pictures, audio or video to make "
        "or look at, and no actions in the world such as setting an alarm or browsing a website.\n"
        "5. Write each instruction in English, in one or two sentences.\n"
        "6. When a task needs an input, give a concrete, realistic one (never a placeholder) of at most about 100 "
        "words. When it needs none, write <noinput> as its input.\n"
        "7. The output is a correct, helpful answer to the instruction and its input, in under 100 words.\n"
        "8. Keep exactly the numbered layout of the examples and separate the tasks with ###.\n\n"
        "List of {num_tasks} tasks:"),
    "zh": (
        "你正在帮助为一个 AI 助手编写训练用的任务。请想出 {num_tasks} 个新的、多样的任务。每个任务包含指令"
        "（Instruction）、输入（Input）和输出（Output），之后会让一个语言模型来完成这些指令。\n\n"
        "要求：\n"
        "1. 措辞要多样：不要让很多指令以同一个动词开头。\n"
        "2. 句式要多样：有的指令是祈使句，有的是直接提问。\n"
        "3. 任务类型要多样：开放式写作、头脑风暴、分类、改写与润色、信息抽取、推理、算术、编程、建议等。\n"
        "4. 每个任务都必须能由只处理文字的模型完成：不要求画画，不要求生成或查看图片、音频、视频，"
        "也不要求在现实中执行动作（例如设置闹钟、打开网页）。\n"
        "5. 指令用中文书写，一到两句话。\n"
        "6. 需要输入的任务，请给出具体、真实的输入（不要用占位符），不超过约 150 字；不需要输入时，输入写 <noinput>。\n"
        "7. 输出要正确、有用地完成指令和输入，不超过约 150 字。\n"
        "8. 严格保持示例的编号格式，任务之间用 ### 分隔。\n\n"
        "{num_tasks} 个任务的列表："),
}


def load_seed_tasks(path):
    """[{instruction, input, output}] from a seed file (self_instruct or alpaca rows, JSON or JSON lines)."""
    from utils.data import iter_rows

    p = Path(path)
    if not p.is_file():
        raise UserError(f"seed file {path} does not exist; pass --seed_tasks with Alpaca's seed_tasks.jsonl "
                        "or your own")
    seeds = []
    for where, row, _ in iter_rows(p):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise UserError(f"{where} has no 'instruction' string; seed tasks are {{instruction, instances: "
                            f"[{{input, output}}]}} or {{instruction, input, output}} rows")
        if "instances" in row:
            inst = row["instances"]
            if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
                raise UserError(f"{where} field 'instances' must be a list of {{input, output}} objects")
            first = inst[0]
        else:
            first = row
        seeds.append({"instruction": row["instruction"].strip(), "input": str(first.get("input") or "").strip(),
                      "output": str(first.get("output") or "").strip()})
    if not seeds:
        raise UserError(f"seed file {path} has no tasks")
    return seeds


def detect_lang(instructions):
    """'zh' when most instructions contain Chinese characters, else 'en'."""
    instructions = list(instructions)
    zh = sum(1 for t in instructions if CJK.search(t))
    return "zh" if instructions and zh * 2 >= len(instructions) else "en"


def encode_prompt(header, examples, num_tasks):
    """Header + numbered examples (Alpaca layout, <noinput> for an empty input) + the next item's opening."""
    parts = [header.replace("{num_tasks}", str(num_tasks)).rstrip() + "\n"]
    for i, ex in enumerate(examples, 1):
        instruction = re.sub(r"\s+", " ", ex["instruction"]).strip().rstrip(":")
        parts.append(f"###\n{i}. Instruction: {instruction}\n{i}. Input:\n{ex['input'].strip() or '<noinput>'}\n"
                     f"{i}. Output:\n{ex['output'].strip()}\n")
    parts.append(f"###\n{len(examples) + 1}. Instruction:")
    return "".join(parts)


# ---- parsing model outputs ------------------------------------------------------------------------

_LABEL = {"instruction": "instruction", "指令": "instruction", "input": "input", "输入": "input",
          "output": "output", "输出": "output"}
# "4. Instruction:", "**4. Instruction:**", "4) Input:", "Output：", "4、输出：" at the start of a line
_MARK = re.compile(r"^[ \t>#*_]*(?:\d{1,3}[ \t]*[.):、]?[ \t*_]*)?(instruction|input|output|指令|输入|输出)"
                   r"[ \t*_]*[:：][ \t*_]*", re.IGNORECASE | re.MULTILINE)
_SEPARATOR = re.compile(r"^[ \t]*(?:#{2,}|-{3,})[ \t]*$", re.MULTILINE)
_NOINPUT = re.compile(r"<\s*no[ _-]?input\s*>\.?|<?无输入>?|none\.?", re.IGNORECASE)
_NOOUTPUT = re.compile(r"<\s*no[ _-]?output\s*>\.?", re.IGNORECASE)


def _clean(text):
    text = _SEPARATOR.sub("", text)
    return text.strip().rstrip("#").strip()


def parse_items(text):
    """All numbered items of a response, in order: dicts with instruction, input, output (None when absent).

    Tolerant: markdown bold, missing numbers, full-width colons, Chinese labels, chat preambles before the
    first item (ignored), and a completion that starts inside an instruction (the text before the first
    Input/Output label is that instruction). Text without any label yields [].
    """
    marks = list(_MARK.finditer(text or ""))
    items, current = [], None
    for n, m in enumerate(marks):
        label = _LABEL[m.group(1).lower()]
        end = marks[n + 1].start() if n + 1 < len(marks) else len(text)
        value = _clean(text[m.end():end])
        if n == 0 and label != "instruction" and _clean(text[:m.start()]):
            current = {"instruction": _clean(text[:m.start()]), "input": None, "output": None}
            items.append(current)
        if label == "instruction" or current is None or current[label] is not None:
            current = {"instruction": None, "input": None, "output": None}
            items.append(current)
        current[label] = value
    for item in items:
        if item["instruction"] is not None:
            item["instruction"] = re.sub(r"\s+", " ", item["instruction"]).strip()
        if item["input"] is not None and _NOINPUT.fullmatch(item["input"].strip()):
            item["input"] = ""
        if item["output"] is not None and _NOOUTPUT.fullmatch(item["output"].strip()):
            item["output"] = ""
    return items


def parse_response(text, finish_reason=None):
    """Items of one response; the last one is dropped when the response was cut off (finish_reason 'length')."""
    items = parse_items(text)
    if finish_reason == "length" and items:
        items.pop()
    return items


# ---- filters --------------------------------------------------------------------------------------

BLACKLIST = {
    # tasks a text model cannot do (Alpaca's list)
    "en": ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
           "plot", "go to", "video", "audio", "music", "flowchart", "diagram"],
    "zh": ["图片", "图像", "照片", "图表", "图形", "示意图", "流程图", "思维导图", "地图", "文件", "画出", "画一",
           "绘制", "视频", "音频", "音乐", "录音", "前往"],
}
BAD_STARTS = {
    "en": ["write a program", "as an ai", "i'm sorry", "i am sorry", "sorry", "i cannot", "i can't"],
    "zh": ["编写一个程序", "写一个程序", "编写程序", "写程序", "作为一个ai", "作为ai", "作为人工智能", "抱歉",
           "对不起", "我无法", "我不能"],
}
RULES = ("malformed", "truncated", "too_short", "too_long", "blacklist", "bad_start", "empty_output", "duplicate",
         "similar")


class CharTokenizer:
    """rouge-score tokenizer for Chinese: every CJK character is a token, latin words and numbers are tokens,
    punctuation and spaces are dropped."""

    _TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[a-z0-9]+")

    def tokenize(self, text):
        return self._TOKEN.findall(text.lower())


def rouge_tokenizer(lang):
    """The rouge-score tokenizer used for similarity: its default one for English, characters for Chinese."""
    from rouge_score import tokenizers

    if lang == "zh":
        return type("RougeCharTokenizer", (CharTokenizer, tokenizers.Tokenizer), {})()
    return tokenizers.DefaultTokenizer(use_stemmer=False)


def rouge_l(a, b, lang="en"):
    """ROUGE-L F1 of two texts with rouge-score's scorer (reference implementation for tests)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=rouge_tokenizer(lang)).score(a, b)["rougeL"].fmeasure


class SimilarityIndex:
    """ROUGE-L against every instruction added so far, exact but fast for tens of thousands of them.

    ROUGE-L F1 = 2 * LCS / (len_a + len_b), and the LCS is at most the multiset overlap of the two token
    lists. An inverted index (token -> instructions and counts) gives that overlap for all instructions at
    once (numpy); rouge-score's own `_score_lcs` then runs only on the few whose bound reaches the
    threshold, best bound first. Decisions are identical to scoring every pair.
    """

    def __init__(self, threshold, lang="en"):
        self.threshold = threshold
        self.tokenizer = rouge_tokenizer(lang)
        self.texts, self.tokens = [], []
        self.lengths = array("i")
        self.postings = {}  # token -> (array of instruction ids, array of counts)

    def __len__(self):
        return len(self.texts)

    def tokenize(self, text):
        return self.tokenizer.tokenize(text)

    def add(self, text, tokens=None):
        tokens = self.tokenize(text) if tokens is None else tokens
        idx = len(self.texts)
        self.texts.append(text)
        self.tokens.append(tokens)
        self.lengths.append(len(tokens))
        for tok, count in Counter(tokens).items():
            ids, counts = self.postings.setdefault(tok, (array("i"), array("i")))
            ids.append(idx)
            counts.append(count)

    def find_similar(self, text, tokens=None):
        """(score, text) of the most similar instruction scoring >= threshold, or None."""
        import numpy as np
        from rouge_score.rouge_scorer import _score_lcs

        tokens = self.tokenize(text) if tokens is None else tokens
        if not tokens or not self.texts:
            return None
        id_parts, weight_parts = [], []
        for tok, count in Counter(tokens).items():
            posting = self.postings.get(tok)
            if posting is not None:
                id_parts.append(np.frombuffer(posting[0], dtype=np.int32))
                weight_parts.append(np.minimum(np.frombuffer(posting[1], dtype=np.int32), count))
        if not id_parts:
            return None
        overlap = np.bincount(np.concatenate(id_parts), weights=np.concatenate(weight_parts),
                              minlength=len(self.texts))
        bound = 2.0 * overlap / (len(tokens) + np.frombuffer(self.lengths, dtype=np.int32))
        candidates = np.flatnonzero(bound >= self.threshold - 1e-9)
        best = None
        for i in candidates[np.argsort(-bound[candidates], kind="stable")]:
            if best is not None and bound[i] <= best[0]:
                break
            score = _score_lcs(self.tokens[i], tokens).fmeasure
            if score >= self.threshold and (best is None or score > best[0]):
                best = (score, self.texts[int(i)])
        return best


def _word_pattern(words):
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE) if words else None


class InstructionFilter:
    """Alpaca's filters, each a method that returns the reason to reject (or None); `check` runs them in the
    order of RULES and `add` registers a kept instruction (duplicate set and similarity index)."""

    def __init__(self, lang="en", similarity_threshold=0.7, min_words=3, max_words=150, blacklist_extra=()):
        self.lang = lang
        self.min_words, self.max_words = min_words, max_words
        words = BLACKLIST["en"] + (BLACKLIST["zh"] if lang == "zh" else []) + list(blacklist_extra or ())
        self.blacklist_words = [w for w in words if not CJK.search(w)]
        self.blacklist_chars = [w for w in words if CJK.search(w)]
        self._blacklist_re = _word_pattern(self.blacklist_words)
        self.bad_starts = BAD_STARTS["en"] + (BAD_STARTS["zh"] if lang == "zh" else [])
        self.index = SimilarityIndex(similarity_threshold, lang)
        self.seen = set()

    @staticmethod
    def key(instruction):
        return " ".join(instruction.lower().split())

    def count_words(self, text):
        return len(CharTokenizer().tokenize(text)) if self.lang == "zh" else len(text.split())

    def length(self, instruction):
        n = self.count_words(instruction)
        return "too_short" if n < self.min_words else "too_long" if n > self.max_words else None

    def blacklisted(self, instruction):
        """The blacklisted word the instruction contains, or None."""
        if self._blacklist_re is not None:
            m = self._blacklist_re.search(instruction)
            if m:
                return m.group(0)
        return next((w for w in self.blacklist_chars if w in instruction), None)

    def bad_start(self, instruction):
        first = instruction[:1]
        if not first.isalpha() or (self.lang == "en" and not first.isascii()):
            return True  # punctuation, a digit, a list marker or (English) a non-latin letter
        low = instruction.lower()
        return any(low.startswith(s) for s in self.bad_starts)

    def duplicate(self, instruction):
        return self.key(instruction) in self.seen

    def similar(self, instruction, tokens=None):
        return self.index.find_similar(instruction, tokens)

    def check(self, item):
        """(reason, detail) for a rejected item, (None, None) for a keeper."""
        instruction, output = item.get("instruction"), item.get("output")
        if not instruction or output is None:
            return "malformed", None
        reason = self.length(instruction)
        if reason:
            return reason, self.count_words(instruction)
        word = self.blacklisted(instruction)
        if word:
            return "blacklist", word
        if self.bad_start(instruction):
            return "bad_start", instruction[:20]
        if not output.strip():
            return "empty_output", None
        if self.duplicate(instruction):
            return "duplicate", None
        hit = self.similar(instruction)
        if hit:
            return "similar", {"rouge_l": round(hit[0], 4), "similar_to": hit[1]}
        return None, None

    def add(self, instruction):
        self.seen.add(self.key(instruction))
        self.index.add(instruction)


# ---- the loop -------------------------------------------------------------------------------------

def stats_path(output):
    out = Path(output)
    return out.with_name(out.name[:-len(".jsonl")] + ".stats.json")


def rejected_path(output):
    out = Path(output)
    return out.with_name(out.name[:-len(".jsonl")] + ".rejected.jsonl")


def _validate(args):
    missing = [f"--{k}" for k in ("seed_tasks", "output", "base_url", "model") if not getattr(args, k)]
    if missing:
        raise UserError(f"self-instruct needs --seed_tasks FILE, --output FILE.jsonl, --base_url URL and --model NAME "
                        f"(missing: {' '.join(missing)})")
    if not args.output.endswith(".jsonl"):
        raise UserError(f"--output {args.output} must end in .jsonl (JSON lines, which --data reads)")
    checks = [(args.num_instructions >= 1, "--num_instructions must be at least 1"),
              (args.num_prompt_instructions >= 1, "--num_prompt_instructions must be at least 1"),
              (args.num_tasks_per_prompt > args.num_prompt_instructions,
               "--num_tasks_per_prompt must be larger than --num_prompt_instructions (the examples are part of "
               "the list)"),
              (args.num_generated_in_prompt >= 0, "--num_generated_in_prompt must be 0 or more"),
              (args.concurrency >= 1, "--concurrency must be at least 1"),
              (args.request_batch_size >= 1, "--request_batch_size must be at least 1"),
              (args.max_retries >= 0, "--max_retries must be 0 or more"),
              (args.max_prompts >= 0, "--max_prompts must be 0 (no limit) or more"),
              (0 < args.similarity_threshold <= 1, "--similarity_threshold must be in (0, 1]"),
              (0 <= args.min_words <= args.max_words, "--min_words must be between 0 and --max_words"),
              (args.max_tokens >= 1, "--max_tokens must be at least 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _read_output(path):
    """Rows already in the output; a torn last line (a killed run) is cut off first."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {n} is not valid JSON; fix or remove that line, or pass a new "
                                "--output") from None
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
                raise UserError(f"{path} line {n} has no 'instruction'; it is not a self-instruct output, pass a "
                                "new --output")
            rows.append({"instruction": row["instruction"], "input": row.get("input") or "",
                         "output": row.get("output") or ""})
    return rows


def _new_stats(args, lang, n_seeds):
    return {"target": args.num_instructions, "kept": 0, "kept_this_run": 0, "runs": 0, "seed_tasks": n_seeds,
            "lang": lang, "model": args.model, "base_url": args.base_url, "prompts": 0, "requests": 0, "retries": 0,
            "failed_prompts": 0, "responses": 0, "truncated_responses": 0, "items": 0,
            "rejected": {rule: 0 for rule in RULES}, "surplus": 0, "elapsed_s": 0.0}


def _write_json(path, obj):
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


def run_self_instruct(args, client=None, log=print):
    """Generate until the output holds args.num_instructions rows; returns the statistics dict."""
    from tqdm import tqdm

    _validate(args)
    seeds = load_seed_tasks(args.seed_tasks)
    lang = detect_lang(s["instruction"] for s in seeds) if args.lang == "auto" else args.lang
    if args.prompt_file:
        if not Path(args.prompt_file).is_file():
            raise UserError(f"--prompt_file {args.prompt_file} does not exist")
        header = Path(args.prompt_file).read_text(encoding="utf-8")
    else:
        header = HEADERS[lang]
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if client is None:
        client = OpenAIClient(args.base_url, args.model, api_key, args.use_completions, args.request_timeout,
                              args.max_retries, args.retry_delay,
                              {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens},
                              stop=[f"{args.num_tasks_per_prompt + 1}. Instruction"])

    out_path, st_path = Path(args.output), stats_path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    generated = _read_output(out_path) if out_path.is_file() else []
    stats = _new_stats(args, lang, len(seeds))
    if generated and st_path.is_file():
        try:
            old = json.loads(st_path.read_text(encoding="utf-8"))
            for key in ("runs", "prompts", "requests", "retries", "failed_prompts", "responses",
                        "truncated_responses", "items", "surplus", "elapsed_s"):
                stats[key] = old.get(key, 0)
            stats["rejected"].update({k: v for k, v in old.get("rejected", {}).items() if k in RULES})
        except (ValueError, AttributeError, TypeError):
            pass  # unreadable statistics: start them afresh, the rows are what count
    stats.update(kept=len(generated), runs=stats["runs"] + 1, target=args.num_instructions, lang=lang)
    base_requests, base_retries = stats["requests"], stats["retries"]

    filt = InstructionFilter(lang, args.similarity_threshold, args.min_words, args.max_words, args.blacklist_extra)
    for row in seeds + generated:
        filt.add(row["instruction"])
    if generated:
        log(f"resuming: {out_path} already holds {len(generated)} instructions")
    if len(generated) >= args.num_instructions:
        log(f"{out_path} already holds {len(generated)} >= --num_instructions {args.num_instructions}; nothing to do")
        _write_json(st_path, stats)
        return stats

    rng = random.Random(f"{args.seed}-{len(generated)}")
    k = args.num_prompt_instructions

    def build_prompt():
        n_gen = min(args.num_generated_in_prompt, len(generated), k)
        n_seed = min(k - n_gen, len(seeds))
        n_gen = min(k - n_seed, len(generated))
        examples = rng.sample(seeds, n_seed) + rng.sample(generated, n_gen)
        rng.shuffle(examples)
        return encode_prompt(header, examples, args.num_tasks_per_prompt)

    jobs, results = Queue(), Queue()

    def worker():
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                results.put(client.complete(job))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                results.put(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    rejected_file = rejected_path(args.output).open("a", encoding="utf-8") if args.save_rejected else None
    start, in_flight, sent, consecutive_failures, last_error = time.time(), 0, 0, 0, None
    max_failures = max(3, args.concurrency * args.request_batch_size)
    bar = tqdm(total=args.num_instructions, initial=len(generated), unit="inst", desc="self-instruct")
    try:
        with out_path.open("a", encoding="utf-8") as out:
            while True:
                while (in_flight < args.concurrency and stats["kept"] < args.num_instructions
                       and (not args.max_prompts or sent < args.max_prompts)):
                    n = args.request_batch_size if not args.max_prompts else min(args.request_batch_size,
                                                                                 args.max_prompts - sent)
                    jobs.put([build_prompt() for _ in range(n)])
                    in_flight, sent = in_flight + 1, sent + n
                    stats["prompts"] += n
                if in_flight == 0:
                    break
                answer = results.get()
                in_flight -= 1
                if isinstance(answer, BaseException):
                    raise answer
                for res in answer:
                    if isinstance(res, RequestFailed):
                        stats["failed_prompts"] += 1
                        consecutive_failures, last_error = consecutive_failures + 1, res
                        continue
                    consecutive_failures = 0
                    stats["responses"] += 1
                    text, finish_reason = res
                    items = parse_items(text)
                    stats["items"] += len(items)
                    if finish_reason == "length":
                        stats["truncated_responses"] += 1
                        if items:
                            dropped = dict(items.pop(), reason="truncated")
                            stats["rejected"]["truncated"] += 1
                            if rejected_file:
                                rejected_file.write(json.dumps(dropped, ensure_ascii=False) + "\n")
                    for item in items:
                        if stats["kept"] >= args.num_instructions:
                            stats["surplus"] += 1
                            continue
                        reason, detail = filt.check(item)
                        if reason:
                            stats["rejected"][reason] += 1
                            if rejected_file:
                                rec = dict(item, reason=reason, **({"detail": detail} if detail is not None else {}))
                                rejected_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
                            continue
                        row = {"instruction": item["instruction"], "input": item["input"] or "",
                               "output": item["output"].strip()}
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        out.flush()
                        filt.add(row["instruction"])
                        generated.append(row)
                        stats["kept"] += 1
                        stats["kept_this_run"] += 1
                        bar.update(1)
                if rejected_file:
                    rejected_file.flush()
                stats["requests"] = base_requests + client.requests
                stats["retries"] = base_retries + client.retries
                run_time = time.time() - start
                _write_json(st_path, dict(stats, elapsed_s=round(stats["elapsed_s"] + run_time, 2)))
                bar.set_postfix(prompts=stats["prompts"], rejected=sum(stats["rejected"].values()), refresh=False)
                if consecutive_failures >= max_failures:
                    raise UserError(f"{consecutive_failures} prompts in a row failed (last error: {last_error}); check "
                                    f"that {client.root} is up and serves --model {args.model}, then rerun to continue")
    finally:
        bar.close()
        for _ in threads:
            jobs.put(None)
        if rejected_file:
            rejected_file.close()
        stats["requests"] = base_requests + client.requests
        stats["retries"] = base_retries + client.retries
        stats["elapsed_s"] = round(stats["elapsed_s"] + time.time() - start, 2)
        _write_json(st_path, stats)
    log(format_stats(stats))
    if stats["kept"] < args.num_instructions:
        log(f"stopped after --max_prompts {args.max_prompts} with {stats['kept']}/{args.num_instructions} "
            "instructions; run the same command again to continue")
    log(f"wrote {out_path} (train on it: uniform_finetune.py --data {out_path}); statistics: {st_path}")
    return stats


@cli_main
def main(argv=None):
    from utils.args import parse

    (args,) = parse((SelfInstructArguments,), argv, prog="python -m utils.self_instruct")
    run_self_instruct(args)


if __name__ == "__main__":
    main()
