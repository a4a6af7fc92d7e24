"""Row formats -> one internal conversation form: a list of messages {"role", "content", "input"}.

Roles are system / user / assistant; "input" is the optional second field of an Alpaca row (templates
with an input slot place it; the others append it to the instruction). Every converter raises a
UserError naming the file, row and field for a malformed row, and returns None for a row to skip
(an empty answer), which the caller counts.

Formats (two-line examples in README):
- alpaca      {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- qa          {"question", "answer"} (GSM8K: "<<48/2=24>>" calculator notes removed, "#### N" -> "The answer is N.")
- sharegpt    {"conversations": [{"from": human|gpt|system, "value"}], "system"?}  (Vicuna)
- messages    {"messages": [{"role", "content"}]}  (OpenAI)
- transcript  {"text": "\\n\\nHuman: ... \\n\\nAssistant: ..."}  (hh-rlhf, baize "[|Human|] ... [|AI|]")
- cot_raw     {"question", "rationale", "answer", "options"?}  rendered with FLAN-style CoT templates
- mc          {"Question", "A", "B", "C", "D", "Answer"}  (MMCU / CMMLU / C-Eval CSV rows; the answer is the letter)
- self_instruct {"instruction", "instances": [{"input", "output"}]}  (Alpaca / BELLE seed tasks: one row per instance)
- prompt_only {"instruction"} or {"prompt"} or {"turns": [...]}  (for prediction: no answer; MT-bench uses turns)
"""
import re

from utils.errors import UserError

FORMATS = ("alpaca", "qa", "sharegpt", "messages", "transcript", "cot_raw", "mc", "self_instruct", "prompt_only")
ANSWER_KEYS = ("answer", "std_answer", "response")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}
COT_SENTENCE = {"en": "Let's think step by step.", "zh": "先思考，再决定。"}
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")  # CJK ideographs (extension A, unified, compatibility)

# FLAN-style chain-of-thought templates (our own wording): (instruction, output) per template.
COT_TEMPLATES = [
    ("{question}{options}\nLet's think step by step.", "{rationale}\nTherefore, the final answer is {answer}."),
    ("Question: {question}{options}\nThink it through first, then answer.", "{rationale} So the answer is {answer}."),
    ("{question}{options}\nExplain your reasoning before giving the answer.", "Reasoning: {rationale}\nAnswer: "
                                                                              "{answer}."),
    ("Answer the following question with a short chain of reasoning.\n{question}{options}",
     "{rationale}\nThe final answer: {answer}."),
]


def msg(role, content, input_text=""):
    return {"role": role, "content": content, "input": input_text}


def _text(row, key, where, required=True):
    if key in row and row[key] is None and required:
        raise UserError(f"{where} field '{key}' is null; give it a string")
    if key not in row or row[key] is None:
        if required:
            raise UserError(f"{where} has no '{key}' field (it has: {', '.join(map(str, row)) or 'nothing'})")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{where} field '{key}' must be a string, not {type(value).__name__}")
    return value


def detect_format(row, where):
    """Guess the format from a row's columns."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object but {type(row).__name__}; rows must be objects")
    keys = set(row)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"question", "rationale", "answer"} <= keys:
        return "cot_raw"
    if "question" in keys and keys & set(ANSWER_KEYS):
        return "qa"
    if {"question", "a", "b"} <= {k.lower() for k in keys if isinstance(k, str)}:
        return "mc"
    if "instruction" in keys and "instances" in keys:
        return "self_instruct"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if keys & {"text", "chosen"} and any(isinstance(row.get(k), str) and _TURN.search(row[k] or "")
                                         for k in ("text", "chosen")):
        return "transcript"
    if keys & {"instruction", "prompt", "turns"}:
        return "prompt_only"
    raise UserError(f"cannot tell the format of {where}: it has columns {', '.join(map(str, sorted(keys)))}; accepted "
                    f"formats are {', '.join(FORMATS)} (see README), or name one with --data FILE@FORMAT")


def _remap(row, columns):
    """Apply a registry column mapping {our_name: their_name}."""
    if not columns:
        return row
    out = dict(row)
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
    return out


def alpaca(row, where, for_training):
    instruction = _text(row, "instruction", where)
    output = _text(row, "output", where, required=for_training and row.get("output", "") is not None)
    input_text = _text(row, "input", where, required=False)
    msgs = [msg("system", _text(row, "system", where, required=False))] if row.get("system") else []
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise UserError(f"{where} field 'history' must be a list of [user, assistant] pairs")
    for user, assistant in history:
        msgs += [msg("user", str(user)), msg("assistant", str(assistant))]
    if _TURN.match(instruction) and "Assistant:" in instruction:
        # BELLE multiturn layout: the instruction is a "Human: ...\nAssistant: ...\nHuman: ..." transcript
        turns = transcript({"text": instruction}, where, False)
        if turns:
            msgs += turns[:-1]
            instruction = turns[-1]["content"] if turns[-1]["role"] == "user" else instruction
    msgs.append(msg("user", instruction, input_text))
    if "output" in row and row["output"] is not None:
        msgs.append(msg("assistant", output))
    return msgs


_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def qa(row, where, for_training):
    question = _text(row, "question", where)
    key = next((k for k in ANSWER_KEYS if k in row), "answer")
    answer = _text(row, key, where, required=for_training)
    msgs = [msg("user", question)]
    if answer:
        answer = _CALC.sub("", answer)
        answer = _FINAL.sub(lambda m: f"\nThe answer is {m.group(1)}.", answer).strip()
        msgs.append(msg("assistant", answer))
    return msgs


def sharegpt(row, where, for_training):
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise UserError(f"{where} field 'conversations' must be a list of {{from, value}} turns")
    msgs = [msg("system", row["system"])] if isinstance(row.get("system"), str) and row["system"] else []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise UserError(f"{where} turn {i + 1} needs 'from' and 'value' fields")
        role = ROLE_ALIASES.get(str(t["from"]).lower())
        if role is None:
            raise UserError(f"{where} turn {i + 1} has an unknown role '{t['from']}'; use human, gpt or system")
        msgs.append(msg(role, str(t["value"])))
    return _check_alternation(msgs)


def messages(row, where, for_training):
    turns = row.get("messages")
    if not isinstance(turns, list):
        raise UserError(f"{where} field 'messages' must be a list of {{role, content}} messages")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t or not isinstance(t.get("content"), str):
            raise UserError(f"{where} message {i + 1} needs a 'role' and a string 'content'")
        role = ROLE_ALIASES.get(str(t["role"]).lower())
        if role is None:
            raise UserError(f"{where} message {i + 1} has an unknown role '{t['role']}'; use system, user or assistant")
        msgs.append(msg(role, t["content"]))
    return _check_alternation(msgs)


_TURN = re.compile(r"((?:^|\n)\s*(?:Human|Assistant)\s*:|\[\|Human\|\]|\[\|AI\|\])")


def transcript(row, where, for_training):
    key = "text" if isinstance(row.get("text"), str) else "chosen"
    text = _text(row, key, where)
    parts = _TURN.split(text)
    msgs = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if "Human" in marker else "assistant"
        content = content.strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] += "\n" + content
        else:
            msgs.append(msg(role, content))
    if not msgs:
        raise UserError(f"{where} field '{key}' has no 'Human:'/'Assistant:' turns")
    if msgs[0]["role"] == "assistant":
        return None  # a transcript opens with the human's turn: this one is out of order (skipped, counted)
    while msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()  # a trailing empty "Assistant:" is a prompt for prediction
    return _check_alternation(msgs)


def cot_raw(row, where, for_training, index=0):
    question = _text(row, "question", where)
    rationale = _text(row, "rationale", where, required=for_training)
    answer = _text(row, "answer", where, required=for_training)
    options = row.get("options") or ""
    if isinstance(options, list):
        options = "\nOptions:\n" + "\n".join(f"- {o}" for o in options)
    elif options:
        options = "\n" + str(options)
    instruction, output = COT_TEMPLATES[index % len(COT_TEMPLATES)]
    msgs = [msg("user", instruction.format(question=question, options=options))]
    if answer:
        msgs.append(msg("assistant", output.format(rationale=rationale.strip(), answer=answer.strip())))
    return msgs


def mc(row, where, for_training):
    """A multiple-choice row: the question with lettered options; the answer is the letter (or letters)."""
    low = {k.lower(): v for k, v in row.items() if isinstance(k, str)}
    question = low.get("question")
    if not isinstance(question, str) or not question:
        raise UserError(f"{where} has no 'Question' text")
    letters = [c for c in "ABCDEFGH" if c.lower() in low and low[c.lower()] not in (None, "")]
    options = "\n".join(f"{c}. {low[c.lower()]}" for c in letters)
    msgs = [msg("user", f"{question}\n{options}")]
    answer = str(low.get("answer") or "").strip()
    if answer:
        msgs.append(msg("assistant", answer))
    return msgs


def self_instruct(row, where, for_training):
    """An Alpaca/BELLE seed task: the instruction with its first instance."""
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise UserError(f"{where} field 'instances' must be a list of {{input, output}} objects")
    first = instances[0]
    return alpaca({"instruction": row.get("instruction"), "input": first.get("input") or "",
                   "output": first.get("output")}, where, for_training)


def prompt_only(row, where, for_training):
    if isinstance(row.get("turns"), list) and row["turns"]:
        return [msg("user", str(row["turns"][0]))]  # MT-bench: the first turn (later turns need the answer)
    key = "instruction" if "instruction" in row else "prompt"
    return [msg("user", _text(row, key, where), _text(row, "input", where, required=False))]


def _check_alternation(msgs):
    """Drop leading assistant turns; None (skip, counted) when roles do not alternate user/assistant."""
    body = [m for m in msgs if m["role"] != "system"]
    while body and body[0]["role"] == "assistant":
        msgs.remove(body.pop(0))
    for a, b in zip(body, body[1:]):
        if a["role"] == b["role"]:
            return None
    return msgs


CONVERTERS = {"alpaca": alpaca, "qa": qa, "sharegpt": sharegpt, "messages": messages, "transcript": transcript,
              "cot_raw": cot_raw, "mc": mc, "self_instruct": self_instruct, "prompt_only": prompt_only}


SKIP_REASONS = {"turn_order": "turns out of order (roles must alternate user / assistant)",
                "no_user": "no user turn", "no_answer": "no answer (an empty or null output)"}


def convert_row(row, fmt, where, for_training=True, columns=None, index=0, unescape=False, skipped=None):
    """Row -> messages, or None when the row has to be skipped (no answer to train on, broken turn order); the
    reason (a SKIP_REASONS key) is counted in the `skipped` dict when one is given."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object but {type(row).__name__}; rows must be objects")
    row = _remap(row, columns)
    if unescape:  # the Alpaca-CoT CoT files store newlines as a literal backslash-n
        row = {k: v.replace("\\n", "\n") if isinstance(v, str) else v for k, v in row.items()}
    if fmt == "cot_raw":
        msgs = cot_raw(row, where, for_training, index)
    else:
        msgs = CONVERTERS[fmt](row, where, for_training)
    reason = None
    if msgs is None:
        reason = "turn_order"
    elif not any(m["role"] == "user" for m in msgs):
        reason = "no_user"
    elif for_training and not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        reason = "no_answer"
    if reason is None:
        return msgs
    if skipped is not None:
        skipped[reason] = skipped.get(reason, 0) + 1
    return None


def split_conversation(msgs):
    """(the prompt: messages up to the last user turn, the answer after it or None)."""
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    ref = msgs[last_user + 1]["content"] if last_user + 1 < len(msgs) else None
    return msgs[:last_user + 1], ref


def add_cot_prompt(msgs):
    """The seed's CoT* option: append a think-first sentence to every user turn, in the turn's language."""
    out = []
    for m in msgs:
        if m["role"] == "user":
            lang = "zh" if CJK.search(m["content"] + m.get("input", "")) else "en"
            m = dict(m, content=f"{m['content'].rstrip()} {COT_SENTENCE[lang]}" if lang == "en"
                     else f"{m['content'].rstrip()}{COT_SENTENCE[lang]}")
        out.append(m)
    return out
