"""OpenAI-compatible HTTP API over one base model and its adapters (server.py).

    GET  /v1/models              the base model and every adapter
    POST /v1/chat/completions    messages -> answer, rendered with the template the adapter was trained with
    POST /v1/completions         a raw prompt string (no template) -> continuation
    GET  /health                 {"status": "ok"} (no API key needed)

Models. The base is loaded once. LoRA-family adapters (lora, dora, qlora, adalora, loha, lokr, ia3) are
attached to ONE PeftModel per PEFT tuner type, each under its own adapter name, and switched with
`set_adapter`; the base model is served by the same PeftModel inside `disable_adapter()`. Methods that
change the base itself or hook into it in ways PEFT cannot switch per request get their own loaded copy of
the base: full and freeze (they overwrite weights), our bottleneck adapters (sadapter_h, sadapter_p,
p_adapter: they wrap the modules in place), prompt learning (prefix, p_tuning, prompt: PEFT's multi-adapter
switching and disable_adapter go through other code paths for them) and vera (its shared projections tie
all adapters of a model to one configuration). Adapters trained on different bases are refused at start.

Concurrency. One worker thread runs every generation, one at a time, from a bounded queue; requests wait
there (beyond --max_queue: HTTP 503). The HTTP layer is async: handlers await the worker, and streamed
responses forward text as the worker produces it, so /v1/models and new requests are answered while a
generation runs, and adapter switching never interleaves with another request's generation.
"""
import asyncio
import hmac
import json
import queue
import sys
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

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


class _Cancelled(Exception):
    """The client went away before its request reached the worker."""


# ---- models ------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One servable model id: the base, or an adapter (shared PeftModel or its own loaded model)."""
    id: str
    model: Any
    tokenizer: Any
    template: Any
    peft_type: Optional[str] = None   # None for the base model
    adapter_dir: Optional[str] = None
    adapter_name: Optional[str] = None  # name inside a shared PeftModel (None: base, or a model of its own)
    shared: bool = False               # model is a shared PeftModel: switch with set_adapter / disable_adapter
    max_length: Optional[int] = None   # the model's context window (max_position_embeddings)
    created: int = field(default_factory=lambda: int(time.time()))


def parse_lora_value(value):
    """'NAME=DIR' or 'DIR' -> (model id, directory); the id defaults to the directory's name."""
    if "=" in value and not Path(value).exists():
        name, path = value.split("=", 1)
        if not name.strip() or not path.strip():
            raise UserError(f"--lora_dir '{value}' must be DIR or NAME=DIR with both parts non-empty")
        return name.strip(), path.strip()
    return Path(value).resolve().name or value, value


def _base_key(name):
    """Compare base models by identity: embedded aliases by alias, local paths by their real path."""
    from utils.models import EMBEDDED_NAMES

    alias = EMBEDDED_NAMES.get(str(name).lower())
    if alias:
        return f"embedded:{alias}"
    path = Path(name)
    return str(path.resolve()) if path.exists() else str(name)


def _default_base_id(name):
    path = Path(name)
    return path.resolve().name if path.exists() else str(name)


def _context_length(model):
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


class Engine:
    """The loaded models (one Entry per model id) and the single generation worker."""

    def __init__(self, entries, base_id, gen_defaults, max_queue=64, aliases=None):
        self.entries = {e.id: e for e in entries}
        self.base_id = base_id
        self.aliases = dict(aliases or {})
        self.gen_defaults = gen_defaults
        self.jobs = queue.Queue(maxsize=max(1, max_queue))
        self._stop = threading.Event()
        self._thread = None
        self._start_lock = threading.Lock()

    # -- lookup --------------------------------------------------------------------------------------
    def get(self, model_id):
        entry = self.entries.get(model_id) or self.entries.get(self.aliases.get(model_id, ""))
        if entry is None:
            raise APIError(404, f"The model `{model_id}` does not exist; available models: "
                                f"{', '.join(self.entries)}", "model", "model_not_found")
        return entry

    # -- worker --------------------------------------------------------------------------------------
    def start(self):
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._work, name="generation-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout=30):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:  # fail whatever still waits
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            job.put("error", APIError(503, "the server is shutting down", None, "server_shutdown", "server_error"))

    def submit(self, job):
        if self._thread is None or not self._thread.is_alive():
            self.start()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy ({self.jobs.maxsize} requests are waiting); retry later",
                           None, "server_overloaded", "server_error") from None

    def _work(self):
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if job.cancel.is_set():
                    raise _Cancelled()
                job.put("end", self.run(job))
            except _Cancelled:
                pass
            except UserError as exc:
                job.put("error", APIError(400, str(exc)))
            except Exception as exc:  # a failed generation must not take the worker down
                print(f"generation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                job.put("error", APIError(500, f"generation failed ({type(exc).__name__}: {exc})", None, None,
                                          "server_error"))

    def run(self, job):
        """Generate one answer in the worker thread: (text, finish_reason, completion_tokens)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from utils.generation import generate_ids, generation_kwargs

        class ClientGone(StoppingCriteria):  # stops generation when the client disconnects mid-stream
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), job.cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        entry = job.entry
        if job.seed is not None:
            torch.manual_seed(job.seed)
        kwargs = generation_kwargs(job.gen, entry.tokenizer, entry.template)
        kwargs["stopping_criteria"] = StoppingCriteriaList([ClientGone()])
        emit = None
        if job.mode is not None:
            emit = (lambda text: job.put("delta", text))
            if job.mode == "strip":
                emit = _Stripped(emit)
        context = nullcontext()
        if entry.shared:
            if entry.adapter_name is None:
                context = entry.model.disable_adapter()
            else:
                entry.model.set_adapter(entry.adapter_name)
        with context:
            return generate_ids(entry.model, entry.tokenizer, job.ids, kwargs, stream=emit, stop=job.stop)


class _Stripped:
    """Forward streamed text without leading and trailing whitespace, so that the concatenated stream
    equals the stripped answer of a non-streamed request."""

    def __init__(self, emit):
        self.emit, self.started, self.pending = emit, False, ""

    def __call__(self, text):
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        if body:
            self.emit(body)


def load_engine(model_args, serve_args, gen_args, log=print):
    """Load the base model once and every --lora_dir adapter; one Entry per model id.

    Adapters of methods whose preset says `shareable` attach to one PeftModel per (tuner, quantization) and are
    switched per request; the others get their own copy of the base.
    """
    from utils.loader import inference_bits, open_run
    from utils.models import EMBEDDED_ALIAS, get_spec, load_model, load_tokenizer, place_for_inference, resolve_model
    from utils.peft_methods import capability, check_quantization_available, load_adapter, requested_bits
    from utils.templates import pick_template

    base_bits = requested_bits(model_args)
    adapters = [parse_lora_value(v) for v in serve_args.lora_dir or []]
    ids = [a[0] for a in adapters]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise UserError(f"two --lora_dir values would both be served as '{dup}'; name them with NAME=DIR")
    runs = {name: open_run(path) for name, path in adapters}
    bits_of = {name: inference_bits(run, base_bits) for name, run in runs.items()}
    for bits in {base_bits, *bits_of.values()}:
        check_quantization_available(bits)
    trust = model_args.trust_remote_code or any(r.meta.get("trust_remote_code") for r in runs.values())
    if model_args.model_name_or_path:
        base = model_args.model_name_or_path
    elif adapters:
        first = adapters[0][0]
        base = runs[first].meta["base_model"]
        for name, _ in adapters[1:]:
            if _base_key(runs[name].meta["base_model"]) != _base_key(base):
                raise UserError(f"the adapters were trained on different base models ('{first}' on {base}, "
                                f"'{name}' on {runs[name].meta['base_model']}); start one server.py per base model")
    else:
        base = EMBEDDED_ALIAS
    model_type = model_args.model_type or (runs[adapters[0][0]].meta["model_type"] if adapters else None)
    path, _, mtype = resolve_model(base, model_type, trust)
    base_id = serve_args.served_name or _default_base_id(base)
    if base_id in ids:
        raise UserError(f"the base model and an adapter would both be served as '{base_id}'; rename the adapter "
                        "with NAME=DIR or the base with --served_name")

    entries, groups = [], {}  # groups: (PEFT tuner type, quantization bits) -> shared PeftModel
    for i, (name, adir) in enumerate(adapters):
        run, bits = runs[name], bits_of[name]
        tokenizer = load_tokenizer(adir, trust)
        shared = capability(run.peft_type, "shareable")
        internal = f"adapter{i}"
        if shared:
            key = (run.adapter_config.get("peft_type"), bits)
            if key not in groups:
                groups[key] = place_for_inference(load_model(path, model_args.dtype, trust, tokenizer.pad_token_id,
                                                             bits))
            model = groups[key] = load_adapter(groups[key], adir, adapter_name=internal)
        else:
            model = load_adapter(place_for_inference(load_model(path, model_args.dtype, trust, tokenizer.pad_token_id,
                                                                bits)), adir)
        entries.append(Entry(name, model, tokenizer, run.template, run.peft_type, str(adir),
                             internal if shared else None, shared, _context_length(model)))
        log(f"[model '{name}': adapter {adir} ({run.peft_type}), template {run.template.name}, "
            f"{'shares the base' if shared else 'own copy of the base'}]")

    tokenizer = load_tokenizer(path, trust)
    template = pick_template(serve_args.template, get_spec(mtype).template, tokenizer)
    host = next((m for (_, bits), m in groups.items() if bits == base_bits), None)
    if host is not None:
        base_entry = Entry(base_id, host, tokenizer, template, shared=True, max_length=_context_length(host))
    else:
        model = place_for_inference(load_model(path, model_args.dtype, trust, tokenizer.pad_token_id, base_bits))
        model.eval()
        base_entry = Entry(base_id, model, tokenizer, template, max_length=_context_length(model))
    log(f"[model '{base_id}': base {base} ({mtype}), template {template.name}]")
    aliases = {str(base): base_id} if str(base) != base_id else {}
    return Engine([base_entry] + entries, base_id, gen_args, serve_args.max_queue, aliases)


# ---- request parsing -------------------------------------------------------------------------------------
def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body, name, lo, hi, lo_open=False):
    v = body.get(name)
    if v is None:
        return None
    if not _is_number(v):
        raise APIError(400, f"'{name}' must be a number, not {json.dumps(v)}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise APIError(400, f"'{name}' must be {'greater than' if lo_open else 'at least'} {lo} and at most {hi}, "
                            f"not {v}", name, "invalid_value")
    return float(v)


def _integer(body, name, lo=None):
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise APIError(400, f"'{name}' must be an integer, not {json.dumps(v)}", name, "invalid_type")
    if lo is not None and v < lo:
        raise APIError(400, f"'{name}' must be at least {lo}, not {v}", name, "invalid_value")
    return v


def _boolean(body, name):
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be true or false, not {json.dumps(v)}", name, "invalid_type")
    return bool(v)


def _stop(body):
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


def parse_json(raw):
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


def _model_entry(engine, body):
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


@dataclass
class Job:
    entry: Entry
    ids: list
    gen: Any
    stop: Optional[list]
    seed: Optional[int]
    mode: Optional[str]  # None: no streaming; "raw": stream text as is; "strip": stream the stripped answer
    loop: Any = None
    events: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, kind, value):
        """Called from the worker thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody waits any more
            self.cancel.set()


def sampling(engine, entry, body, n_prompt, stream):
    """GenerationArguments for this request: the server's defaults overridden by the request's fields."""
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise APIError(400, "only n=1 is supported", "n", "invalid_value")
    if body.get("logprobs") not in (None, False):
        raise APIError(400, "logprobs are not supported", "logprobs", "unsupported_parameter")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 1)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, lo_open=True)
    top_k = _integer(body, "top_k", 0)
    seed = _integer(body, "seed")
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


def _usage(n_prompt, n_completion):
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- the app ---------------------------------------------------------------------------------------------
def create_app(serve_args=None, model_args=None, gen_args=None, engine=None, log=print):
    """The FastAPI app. Loads the models from the arguments unless a loaded Engine is passed."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from utils.args import GenerationArguments, ModelArguments, ServeArguments

    serve_args = serve_args or ServeArguments()
    owns_engine = engine is None
    if engine is None:
        engine = load_engine(model_args or ModelArguments(), serve_args, gen_args or GenerationArguments(), log)
    api_key = serve_args.api_key

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        if owns_engine:
            engine.stop()

    app = FastAPI(title="Alpaca-CoT OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine

    def error_response(exc):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse(error_body(f"invalid request: {exc.errors()}"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        print(f"internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    def authorize(request):
        if not api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "You didn't provide an API key; send it as 'Authorization: Bearer KEY'" if not auth
                           else "Incorrect API key provided", None, "invalid_api_key")

    def model_card(entry):
        card = {"id": entry.id, "object": "model", "created": entry.created, "owned_by": OWNER,
                "root": entry.adapter_dir or entry.id, "parent": None if entry.peft_type is None else engine.base_id}
        if entry.peft_type:
            card["peft_type"] = entry.peft_type
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(e) for e in engine.entries.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        return model_card(engine.get(model_id))

    async def start(entry, ids, gen, stop, seed, mode):
        job = Job(entry, ids, gen, stop, seed, mode, asyncio.get_running_loop(), asyncio.Queue())
        engine.submit(job)
        return job

    async def events(job):
        """(kind, value) events of a job until it ends; cancels the job if the client goes away."""
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "end":
                    return
        finally:
            job.cancel.set()  # no-op after the end; stops a generation whose client disconnected

    async def finish(job):
        deltas, end = [], None
        async for kind, value in events(job):
            if kind == "delta":
                deltas.append(value)
            else:
                end = value
        return "".join(deltas), end

    def stream_response(job, first, chunk, final, include_usage, n_prompt):
        async def body():
            try:
                if first is not None:
                    yield _sse(first)
                async for kind, value in events(job):
                    if kind == "delta":
                        yield _sse(chunk(value))
                    else:
                        _, reason, n_new = value
                        yield _sse(final(reason))
                        if include_usage:
                            yield _sse({**final(None), "choices": [], "usage": _usage(n_prompt, n_new)})
            except APIError as exc:
                yield _sse(exc.body())
            finally:
                job.cancel.set()  # the client went away (or the answer is complete): stop generating
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream_flags(body):
        stream = _boolean(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = bool(stream and options and _boolean(options, "include_usage"))
        return stream, include_usage

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = parse_json(await request.body())
        entry = _model_entry(engine, body)
        messages = parse_messages(body)
        stream, include_usage = stream_flags(body)
        try:
            ids = entry.template.prompt_ids(entry.tokenizer, messages)
        except UserError as exc:
            raise APIError(400, str(exc), "messages", "invalid_value") from None
        gen, seed = sampling(engine, entry, body, len(ids), stream)
        job = await start(entry, ids, gen, _stop(body), seed, "strip" if stream else None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": entry.id, "system_fingerprint": None}
        if stream:
            def chunk(text, reason=None, delta=None):
                return {**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"content": text} if delta is None else delta,
                                     "logprobs": None, "finish_reason": reason}]}

            return stream_response(job, chunk(None, delta={"role": "assistant", "content": ""}), chunk,
                                   lambda reason: chunk(None, reason, {}), include_usage, len(ids))
        _, (text, reason, n_new) = await finish(job)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason}],
                "usage": _usage(len(ids), n_new)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = parse_json(await request.body())
        entry = _model_entry(engine, body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if prompt is None:
            raise APIError(400, "'prompt' is a required property", "prompt", "missing_required_parameter")
        if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
            ids = list(prompt)  # token ids
        elif isinstance(prompt, str):
            ids = entry.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            raise APIError(400, "'prompt' must be a string (or one list of token ids); one prompt per request",
                           "prompt", "invalid_type")
        if not ids:
            raise APIError(400, "'prompt' is empty", "prompt", "invalid_value")
        for name in ("echo",):
            if _boolean(body, name):
                raise APIError(400, f"'{name}' is not supported", name, "unsupported_parameter")
        if (_integer(body, "best_of", 1) or 1) != 1:
            raise APIError(400, "only best_of=1 is supported", "best_of", "invalid_value")
        stream, include_usage = stream_flags(body)
        gen, seed = sampling(engine, entry, body, len(ids), True)
        job = await start(entry, ids, gen, _stop(body), seed, "raw")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": entry.id,
                "system_fingerprint": None}

        def choice(text, reason=None):
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

        if stream:
            return stream_response(job, None, choice, lambda reason: choice("", reason), include_usage, len(ids))
        text, (_, reason, n_new) = await finish(job)
        return {**choice(text, reason), "usage": _usage(len(ids), n_new)}

    return app


# ---- the command -----------------------------------------------------------------------------------------
def check_port(host, port):
    """Fail before loading any model when the address cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--host {host} is not an address of this machine ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or stop the "
                            "program that uses it") from None


def serve(model_args, serve_args, gen_args):
    """server.py: check the address, load the models, serve until Ctrl+C."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("server.py needs fastapi and uvicorn; run `pip install -r requirements.txt`") from None
    if not 0 < serve_args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, not {serve_args.port}")
    if serve_args.max_queue < 1:
        raise UserError(f"--max_queue must be at least 1, not {serve_args.max_queue}")
    check_port(serve_args.host, serve_args.port)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    app = create_app(serve_args, model_args, gen_args, log=log)
    if serve_args.host not in ("127.0.0.1", "localhost", "::1") and not serve_args.api_key:
        log(f"warning: serving on {serve_args.host} without --api_key: anyone who reaches this port can use the "
            "models")
    url = f"http://{serve_args.host}:{serve_args.port}"
    log(f"serving {', '.join(app.state.engine.entries)} on {url} (OpenAI base_url {url}/v1; Ctrl+C stops it)")
    uvicorn.run(app, host=serve_args.host, port=serve_args.port, log_level="info")
