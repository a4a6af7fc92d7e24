"""Seed tasks and prompts (Alpaca's numbered instruction / input / output list under a header), and parsing
the numbered items back out of a model's answer."""
import re
from pathlib import Path

from utils.errors import UserError
from utils.formats import CJK

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


def prompt_header(prompt_file, lang):
    """The header of every prompt: the text of --prompt_file, else our built-in one for the language."""
    if not prompt_file:
        return HEADERS[lang]
    if not Path(prompt_file).is_file():
        raise UserError(f"--prompt_file {prompt_file} does not exist")
    return Path(prompt_file).read_text(encoding="utf-8")


class PromptBuilder:
    """Prompts of k examples: seed tasks, and up to `n_generated` of the instructions kept so far (`generated`
    is the caller's list, read as it grows), in a random order from `rng`."""

    def __init__(self, header, seeds, generated, k, n_generated, num_tasks, rng):
        self.header, self.seeds, self.generated = header, seeds, generated
        self.k, self.n_generated, self.num_tasks, self.rng = k, n_generated, num_tasks, rng

    def __call__(self):
        n_gen = min(self.n_generated, len(self.generated), self.k)
        n_seed = min(self.k - n_gen, len(self.seeds))
        n_gen = min(self.k - n_seed, len(self.generated))
        examples = self.rng.sample(self.seeds, n_seed) + self.rng.sample(self.generated, n_gen)
        self.rng.shuffle(examples)
        return encode_prompt(self.header, examples, self.num_tasks)


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
