"""The OpenAI wire protocol of server.py: request parsing and validation, errors in OpenAI's shape, SSE framing.

Nothing here loads a model or imports torch or the web stack: every function takes the parsed JSON body and
answers with plain values, or raises APIError (HTTP status + OpenAI's {"error": {...}} body).
"""
import json
from dataclasses import replace

from utils.errors import UserError

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
OWNER = "alpaca-cot"


# ---- errors in OpenAI's shape --------------------------------------------------------------------------
class APIError(Exception):
    """A request error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status, message, param=None, code=None, type_="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self):
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message, type_="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def server_busy(waiting):
    return APIError(503, f"the server is busy ({waiting} requests are waiting); retry later", None,
                    "server_overloaded", "server_error")


def server_shutdown():
    return APIError(503, "the server is shutting down", None, "server_shutdown", "server_error")


def client_gone():
    return APIError(499, "the client closed the connection", None, "client_closed_request", "server_error")


def generation_failed(exc):
    return APIError(500, f"generation failed ({type(exc).__name__}: {exc})", None, None, "server_error")


# ---- typed fields ----------------------------------------------------------------------------------------
def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def number(body, name, lo, hi, lo_open=False):
    v = body.get(name)
    if v is None:
        return None
    if not _is_number(v):
        raise APIError(400, f"'{name}' must be a number, not {json.dumps(v)}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise APIError(400, f"'{name}' must be {'greater than' if lo_open else 'at least'} {lo} and at most {hi}, "
                            f"not {v}", name, "invalid_value")
    return float(v)


def integer(body, name, lo=None):
    v = body.get(name)
    if v is None:
        return None
    if not is_int(v):
        raise APIError(400, f"'{name}' must be an integer, not {json.dumps(v)}", name, "invalid_type")
    if lo is not None and v < lo:
        raise APIError(400, f"'{name}' must be at least {lo}, not {v}", name, "invalid_value")
    return v


def boolean(body, name):
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be true or false, not {json.dumps(v)}", name, "invalid_type")
    return bool(v)


def stop_strings(body):
    v = body.get("stop")
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(v) > 16:
        raise APIError(400, "'stop' takes at most 16 strings", "stop", "invalid_value")
    return [s for s in v if s] or None


def stream_flags(body):
    """(stream, include_usage) of a request."""
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(stream and options and boolean(options, "include_usage"))
    return stream, include_usage


# ---- the body ------------------------------------------------------------------------------------------
def parse_json(raw):
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


def model_entry(engine, body):
    model = body.get("model")
    if model is None:
        raise APIError(400, "you must provide a model parameter (GET /v1/models lists them)", "model",
                       "missing_required_parameter")
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model", "invalid_type")
    return engine.get(model)


def _content(m, i):
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is supported
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content may only hold text parts ({{\"type\": \"text\", "
                                    "\"text\": ...}})", f"messages[{i}].content", "invalid_type")
            texts.append(part["text"])
        return "\n".join(texts)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
    return content


def parse_messages(body):
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is a required property", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                       "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]",
                           "invalid_type")
        role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of system, user, assistant, not "
                                f"{json.dumps(m.get('role'))}", f"messages[{i}].role", "invalid_value")
        out.append({"role": role, "content": _content(m, i)})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must have role 'user' (the turn to answer)", "messages",
                       "invalid_value")
    return out


def chat_prompt_ids(entry, messages):
    """Token ids of a chat request: its messages (parse_messages) rendered with the entry's template."""
    try:
        return entry.template.prompt_ids(entry.tokenizer, messages)
    except UserError as exc:
        raise APIError(400, str(exc), "messages", "invalid_value") from None


def completion_prompt_ids(entry, body):
    """Token ids of a /v1/completions request: one prompt string (no template), or one list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if prompt is None:
        raise APIError(400, "'prompt' is a required property", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(is_int(t) and t >= 0 for t in prompt):
        ids = list(prompt)
    elif isinstance(prompt, str):
        ids = entry.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        raise APIError(400, "'prompt' must be a string (or one list of token ids); one prompt per request",
                       "prompt", "invalid_type")
    if not ids:
        raise APIError(400, "'prompt' is empty", "prompt", "invalid_value")
    if boolean(body, "echo"):
        raise APIError(400, "'echo' is not supported", "echo", "unsupported_parameter")
    if (integer(body, "best_of", 1) or 1) != 1:
        raise APIError(400, "only best_of=1 is supported", "best_of", "invalid_value")
    return ids


def sampling(engine, entry, body, n_prompt, stream):
    """(GenerationArguments, seed) of this request: the server's defaults overridden by the request's fields."""
    n = integer(body, "n", 1)
    if n is not None and n != 1:
        raise APIError(400, "only n=1 is supported", "n", "invalid_value")
    if body.get("logprobs") not in (None, False):
        raise APIError(400, "logprobs are not supported", "logprobs", "unsupported_parameter")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = integer(body, name, 1)
    temperature = number(body, "temperature", 0, 2)
    top_p = number(body, "top_p", 0, 1, lo_open=True)
    top_k = integer(body, "top_k", 0)
    seed = integer(body, "seed")
    defaults = engine.gen_defaults
    limit = entry.max_length
    if limit is not None and n_prompt >= limit:
        raise APIError(400, f"the prompt has {n_prompt} tokens but the model's context is {limit}",
                       "messages" if "messages" in body else "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = defaults.max_new_tokens if limit is None else min(defaults.max_new_tokens, limit - n_prompt)
    elif limit is not None and n_prompt + max_tokens > limit:
        raise APIError(400, f"the model's context is {limit} tokens, but {n_prompt} prompt tokens + {name} "
                            f"{max_tokens} exceed it; lower {name}", name, "context_length_exceeded")
    do_sample = defaults.do_sample if temperature is None else temperature > 0
    gen = replace(defaults, max_new_tokens=max_tokens, do_sample=do_sample,
                  temperature=temperature if temperature else defaults.temperature,
                  top_p=top_p if top_p is not None else defaults.top_p,
                  top_k=top_k if top_k is not None else defaults.top_k)
    if stream:
        gen = replace(gen, num_beams=1)  # transformers cannot stream beam search
    return gen, seed


# ---- answers -------------------------------------------------------------------------------------------
def usage(n_prompt, n_completion):
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def sse(obj):
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
