"""Prompt templates: ONE object renders a conversation for training and for inference.

A conversation is a list of messages {"role": "system"|"user"|"assistant", "content": str}.
A template turns it into segments (text, trainable); each segment is tokenized on its own and the ids
concatenated, so the prompt a model sees at inference is token-for-token the prompt it was trained on.

Two kinds:
- "format": fixed strings around each turn (alpaca, vicuna, chatml), EOS appended to each answer;
- "chat": the tokenizer's own Jinja chat template (`apply_chat_template`), stored verbatim.
The template used for training is written to `template.json` beside the adapter and read back by every
inference script, so there is never a second copy to drift.
"""
import json
import weakref
from dataclasses import asdict, dataclass
from typing import Optional

from utils.errors import UserError

ALPACA_SYSTEM_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")


@dataclass
class Template:
    name: str
    kind: str                               # "format" or "chat"
    system_format: str = "{content}"        # format kind: how a system prompt is written
    user_format: str = "{content}"          # format kind: a user turn, ending with the answer cue
    user_input_format: Optional[str] = None  # format kind: a user turn that carries a separate "input"
    assistant_format: str = "{content}"     # format kind: an answer (EOS is appended as a token)
    turn_separator: str = ""                # format kind: between an answer and the next user turn
    default_system: Optional[str] = None
    default_system_input: Optional[str] = None  # default system prompt when the first turn has an input
    chat_template: Optional[str] = None     # chat kind: the Jinja source

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Template":
        return cls(**json.loads(text))

    # ---- rendering -------------------------------------------------------------------------------
    def segments(self, messages, add_generation_prompt=False, tokenizer=None):
        """Return [(text, trainable)] for the conversation; trainable = an assistant answer."""
        _check_messages(messages, add_generation_prompt)
        if self.kind == "chat" or not self.user_input_format:
            messages = [_fold_input(m) for m in messages]
        if self.kind == "chat":
            return self._chat_segments(messages, add_generation_prompt, tokenizer)
        segs = []
        has_input = any(m.get("input") for m in messages if m["role"] == "user")
        default = self.default_system_input if has_input and self.default_system_input else self.default_system
        system = next((m["content"] for m in messages if m["role"] == "system"), default)
        if system:
            segs.append((self.system_format.format(content=system), False))
        answered = False
        for m in messages:
            if m["role"] == "user":
                fmt = self.user_input_format if m.get("input") else self.user_format
                text = fmt.format(content=m["content"], input=m.get("input", ""))
                segs.append(((self.turn_separator if answered else "") + text, False))
            elif m["role"] == "assistant":
                segs.append((self.assistant_format.format(content=m["content"]), True))
                answered = True
        return _merge(segs)

    def _render(self, tokenizer, messages, add_generation_prompt):
        try:
            return tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises template-defined errors (e.g. role order)
            raise UserError(f"the chat template of '{self.name}' rejected this conversation ({exc}); "
                            "check the roles or pick another --template") from None

    def _with_default_system(self, messages):
        if self.default_system and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.default_system}] + list(messages)
        return messages

    def _chat_segments(self, messages, add_generation_prompt, tokenizer, render=None):
        """`render(messages, add_generation_prompt)` gives the template's text (default: `_render`, one call each;
        encode_batch passes texts it rendered for many conversations at once)."""
        if tokenizer is None:
            raise ValueError("a chat template needs the tokenizer to render")
        if render is None:
            render = lambda msgs, gen: self._render(tokenizer, msgs, gen)  # noqa: E731
        messages = self._with_default_system(messages)
        segs, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(messages[:i], True)
            full = render(messages[:i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise UserError(f"the chat template of '{self.name}' rewrites earlier turns, so answers cannot "
                                "be masked turn by turn; pick a format template with --template")
            segs.append((prompt[len(done):], False))
            answer = full[len(prompt):]
            cut = _answer_end(answer, m["content"], tokenizer)
            segs.append((answer[:cut], True))
            if answer[cut:]:
                segs.append((answer[cut:], False))
            done = full
        if add_generation_prompt or not segs:
            prompt = render(messages, add_generation_prompt)
            if not prompt.startswith(done):
                raise UserError(f"the chat template of '{self.name}' rewrites earlier turns; pick another --template")
            segs.append((prompt[len(done):], False))
        return _merge(segs)

    # ---- tokenization ----------------------------------------------------------------------------
    def encode(self, tokenizer, messages, add_generation_prompt=False, train_on_inputs=False):
        """Return (input_ids, labels); labels are -100 on every token that is not part of an answer."""
        input_ids, labels = list(self._prefix_ids(tokenizer)), []
        labels = [-100] * len(input_ids)
        for text, trainable in self.segments(messages, add_generation_prompt, tokenizer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if trainable and self.kind == "format" and tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            input_ids += ids
            labels += ids if (trainable or train_on_inputs) else [-100] * len(ids)
        return input_ids, labels

    def encode_batch(self, tokenizer, conversations, add_generation_prompt=False, train_on_inputs=False):
        """[(input_ids, labels)] for many conversations: exactly `[encode(...) for each]`, faster.

        The same segments as encode() (a chat template renders every conversation's prompts in one
        apply_chat_template call per kind of prompt), and every segment of every conversation tokenized
        in one tokenizer call (the fast tokenizer spreads a batch over the cores); each segment is still
        tokenized on its own, so the ids are the ones encode() gets. A batch with a conversation that
        encode() rejects is encoded one by one, so the first bad conversation raises what encode() raises."""
        conversations = list(conversations)
        try:
            segs = self._segments_batch(conversations, add_generation_prompt, tokenizer)
        except Exception:
            return [self.encode(tokenizer, m, add_generation_prompt, train_on_inputs) for m in conversations]
        texts = [text for s in segs for text, _ in s if text]
        flat = iter(token_ids(tokenizer, texts) if texts else [])
        prefix = list(self._prefix_ids(tokenizer))
        eos = tokenizer.eos_token_id if self.kind == "format" else None
        out = []
        for s in segs:
            input_ids, labels = list(prefix), [-100] * len(prefix)
            for text, trainable in s:
                ids = next(flat) if text else []  # a fresh list per text
                if trainable and eos is not None:
                    ids.append(eos)
                input_ids += ids
                labels += ids if (trainable or train_on_inputs) else [-100] * len(ids)
            out.append((input_ids, labels))
        return out

    def _segments_batch(self, conversations, add_generation_prompt, tokenizer):
        """[segments(m, ...) for m in conversations], rendering a chat template once per kind of prompt."""
        if self.kind != "chat":
            return [self.segments(m, add_generation_prompt, tokenizer) for m in conversations]
        if tokenizer is None:
            raise ValueError("a chat template needs the tokenizer to render")
        prepared = []
        for messages in conversations:  # what segments() does before _chat_segments
            _check_messages(messages, add_generation_prompt)
            prepared.append(self._with_default_system([_fold_input(m) for m in messages]))
        # The prefixes _chat_segments renders: before each answer (with the generation prompt) and through it
        # (without), and the whole conversation when a generation prompt is asked for or nothing is answered.
        wanted = {True: [], False: []}
        for c, msgs in enumerate(prepared):
            answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            for i in answers:
                wanted[True].append((c, i))
                wanted[False].append((c, i + 1))
            if add_generation_prompt or not answers:
                wanted[add_generation_prompt].append((c, len(msgs)))
        rendered = {}
        for gen, keys in wanted.items():
            keys = [k for k in keys if k[1] > 0]  # an empty prefix is left to _render (it rejects it there)
            if keys:
                texts = self._render(tokenizer, [prepared[c][:n] for c, n in keys], gen)
                rendered.update(zip([(c, n, gen) for c, n in keys], texts))

        def renderer(c):
            def render(msgs, gen):
                key = (c, len(msgs), gen)
                return rendered[key] if key in rendered else self._render(tokenizer, msgs, gen)
            return render

        return [self._chat_segments(msgs, add_generation_prompt, tokenizer, render=renderer(c))
                for c, msgs in enumerate(prepared)]

    def prompt_ids(self, tokenizer, messages):
        """Token ids of the prompt for the next answer (the conversation must end with a user turn)."""
        return self.encode(tokenizer, messages, add_generation_prompt=True)[0]

    def stop_token_ids(self, tokenizer):
        """Tokens that end an answer: EOS plus the chat template's end-of-turn token."""
        stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if self.kind == "chat":
            msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
            answer = self.segments(msgs, tokenizer=tokenizer)
            tail = [t for t, trainable in answer if trainable][-1]
            after = tail[tail.rfind("y") + 1:]
            ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
            if ids and ids[0] not in stops:
                stops.append(ids[0])
        return stops

    def _prefix_ids(self, tokenizer):
        """BOS (or other leading specials) the tokenizer adds itself; chat templates write their own."""
        if self.kind == "chat":
            return []
        with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        n = len(with_sp) - len(without)
        return with_sp[:n] if n > 0 and with_sp[n:n + len(without)] == without else []


_DIRECT = weakref.WeakKeyDictionary()  # tokenizer -> whether its Rust backend may be called directly


def token_ids(tokenizer, texts):
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, each text on its own.

    For a plain transformers fast tokenizer this calls its Rust backend the way `tokenizer(...)` does
    (no truncation, no padding, its split_special_tokens), keeping only the ids and not computing character
    offsets: `tokenizer(...)` also tracks offsets and builds an attention mask and a dict per text (about a
    quarter of its time here). Any other tokenizer
    (a slow one, or a class that overrides how it encodes) goes through `tokenizer(...)`; so does one
    whose direct ids differed from `tokenizer(...)`'s on the first texts it was given (checked once)."""
    direct = _direct_ok(tokenizer)
    if direct is None:
        probe = texts[:64]
        try:
            direct = _direct_ids(tokenizer, probe) == tokenizer(probe, add_special_tokens=False)["input_ids"]
        except Exception:  # a transformers version whose internals differ: the plain call it is
            direct = False
        try:
            _DIRECT[tokenizer] = direct
        except TypeError:
            pass
    if direct:
        return _direct_ids(tokenizer, texts)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _direct_ok(tokenizer):
    """False where the backend must not be called directly, True where checked, None where not yet checked."""
    try:
        if tokenizer in _DIRECT:
            return _DIRECT[tokenizer]
    except TypeError:
        pass
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    plain = (isinstance(tokenizer, TokenizersBackend) and cls.__call__ is PreTrainedTokenizerBase.__call__
             and cls._encode_plus is TokenizersBackend._encode_plus
             and cls.set_truncation_and_padding is TokenizersBackend.set_truncation_and_padding
             and not hasattr(tokenizer, "_switch_to_input_mode"))
    return None if plain else False


def _direct_ids(tokenizer, texts):
    from transformers.utils import PaddingStrategy
    from transformers.tokenization_utils_base import TruncationStrategy

    tokenizer.set_truncation_and_padding(PaddingStrategy.DO_NOT_PAD, TruncationStrategy.DO_NOT_TRUNCATE, None, 0,
                                         None, None)
    backend = tokenizer._tokenizer
    if backend.encode_special_tokens != tokenizer.split_special_tokens:
        backend.encode_special_tokens = tokenizer.split_special_tokens
    # encode_batch_fast (tokenizers >= 0.20) gives the same ids without tracking offsets (about 15% faster)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False, is_pretokenized=False)]


def _check_messages(messages, add_generation_prompt):
    if not messages:
        raise UserError("a conversation is empty; each example needs at least one user message")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise UserError(f"a message {m!r} is malformed; messages need role system/user/assistant and "
                            "string content")
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise UserError("the conversation to answer must end with a user message")


def _answer_end(answer, content, tokenizer):
    """Index just past the answer content and its end-of-turn special token (what the model must learn)."""
    pos = answer.rfind(content) + len(content) if content else 0
    rest = answer[pos:]
    specials = sorted((s for s in tokenizer.all_special_tokens if s and rest.startswith(s)), key=len, reverse=True)
    if specials:
        return pos + len(specials[0])
    return len(answer.rstrip("\n ")) if rest.strip() == "" else len(answer)


def _fold_input(m):
    """Templates without an input slot get the input after the instruction, after a blank line."""
    if m.get("input"):
        return {"role": m["role"], "content": f"{m['content']}\n\n{m['input']}"}
    return {"role": m["role"], "content": m["content"]}


def _merge(segs):
    out = []
    for text, trainable in segs:
        if not text:
            continue
        if out and out[-1][1] == trainable:
            out[-1] = (out[-1][0] + text, trainable)
        else:
            out.append((text, trainable))
    return out


TEMPLATES = {
    "alpaca": Template(
        name="alpaca", kind="format", default_system=ALPACA_SYSTEM, default_system_input=ALPACA_SYSTEM_INPUT,
        system_format="{content}\n\n", user_format="### Instruction:\n{content}\n\n### Response:\n",
        user_input_format="### Instruction:\n{content}\n\n### Input:\n{input}\n\n### Response:\n",
        turn_separator="\n\n"),
    "vicuna": Template(
        name="vicuna", kind="format",
        default_system="A chat between a curious user and an artificial intelligence assistant. The assistant "
                       "gives helpful, detailed, and polite answers to the user's questions.",
        system_format="{content} ", user_format="USER: {content} ASSISTANT:", assistant_format=" {content}",
        turn_separator=" "),
    "chatml": Template(
        name="chatml", kind="format", system_format="<|im_start|>system\n{content}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant_format="{content}<|im_end|>", turn_separator="\n"),
}


ZH_SYSTEM = "你是一个乐于助人的助手。"
TEMPLATES.update({
    "alpaca_zh": Template(
        name="alpaca_zh", kind="format", default_system="下面是一条描述任务的指令。请写出恰当完成该请求的回答。",
        default_system_input="下面是一条描述任务的指令，以及一段提供更多背景的输入。请写出恰当完成该请求的回答。",
        system_format="{content}\n\n", user_format="### 指令：\n{content}\n\n### 回答：\n",
        user_input_format="### 指令：\n{content}\n\n### 输入：\n{input}\n\n### 回答：\n", turn_separator="\n\n"),
    "vicuna_zh": Template(
        name="vicuna_zh", kind="format",
        default_system="这是一段好奇的用户与人工智能助手之间的对话。助手会给出有帮助、详细且礼貌的回答。",
        system_format="{content} ", user_format="用户：{content} 助手：", assistant_format="{content}",
        turn_separator=" "),
})
TEMPLATES["chatml_zh"] = Template(**{**asdict(TEMPLATES["chatml"]), "name": "chatml_zh", "default_system": ZH_SYSTEM})


def get_template(name, tokenizer=None, lang="en"):
    """Template by name and prompt language; 'chat' captures the tokenizer's own chat template."""
    if name == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UserError("this tokenizer has no chat template; pass --template alpaca (or vicuna, chatml)")
        source = tokenizer.chat_template
        if isinstance(source, dict):
            source = source.get("default") or next(iter(source.values()))
        if lang == "zh":
            return Template(name="chat_zh", kind="chat", chat_template=source, default_system=ZH_SYSTEM)
        return Template(name="chat", kind="chat", chat_template=source)
    key = f"{name}_zh" if lang == "zh" and not name.endswith("_zh") else name
    if key not in TEMPLATES:
        names = ", ".join(["chat"] + [t for t in TEMPLATES if not t.endswith("_zh")])
        raise UserError(f"unknown --template '{name}'; valid templates are: {names} (Chinese wording: "
                        "--prompt_lang zh)")
    return TEMPLATES[key]


def pick_template(requested, default, tokenizer=None, lang="en"):
    """--template if given, else the model type's default; a default of 'chat' on a tokenizer without a chat
    template (base checkpoints such as Llama 2 or Gemma 3 270M) falls back to 'alpaca'."""
    if not requested and default == "chat" and not getattr(tokenizer, "chat_template", None):
        default = "alpaca"
    return get_template(requested or default, tokenizer, lang)


def alpaca_messages(instruction, input_text="", output=None, system=None):
    """A single alpaca row as messages; the input rides on the user turn (templates place it)."""
    msgs = [{"role": "system", "content": system}] if system else []
    user = {"role": "user", "content": instruction}
    if input_text:
        user["input"] = input_text
    msgs.append(user)
    if output is not None:
        msgs.append({"role": "assistant", "content": output})
    return msgs
