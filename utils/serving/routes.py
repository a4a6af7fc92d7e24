"""The HTTP layer of server.py: a FastAPI app whose handlers parse a request (protocol.py), hand it to the engine's
worker as a Job (engine.py) and answer with JSON or with server-sent events.

    GET  /v1/models              the base model and every adapter
    POST /v1/chat/completions    messages -> answer, rendered with the template the adapter was trained with
    POST /v1/completions         a raw prompt string (no template) -> continuation
    GET  /health                 {"status": "ok"} (no API key needed)

The handlers are async: they await the worker's events, and streamed responses forward text as the worker
produces it, so /v1/models and new requests are answered while generations run. A client that goes away
(streamed or not) cancels its job: the worker drops it from the queue or the running batch at its next step.
"""
import asyncio
import hmac
import sys
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from utils.serving import protocol as p
from utils.serving.engine import Job, load_engine

router = APIRouter()


def create_app(serve_args=None, model_args=None, gen_args=None, engine=None, log=print):
    """The FastAPI app. Loads the models from the arguments unless a loaded Engine is passed."""
    from utils.args import GenerationArguments, ModelArguments, ServeArguments

    serve_args = serve_args or ServeArguments()
    owns_engine = engine is None
    if engine is None:
        engine = load_engine(model_args or ModelArguments(), serve_args, gen_args or GenerationArguments(), log)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        if owns_engine:
            engine.stop()

    app = FastAPI(title="Alpaca-CoT OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine, app.state.api_key = engine, serve_args.api_key
    app.add_exception_handler(p.APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(router)
    return app


# ---- errors ----------------------------------------------------------------------------------------------
async def api_error(request, exc):
    return JSONResponse(exc.body(), status_code=exc.status)


async def http_error(request, exc):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(p.error_body(message, "invalid_request_error", None, code), status_code=exc.status_code)


async def validation_error(request, exc):
    return JSONResponse(p.error_body(f"invalid request: {exc.errors()}"), status_code=400)


async def internal_error(request, exc):
    print(f"internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return JSONResponse(p.error_body("internal server error", "server_error"), status_code=500)


def engine_of(request):
    """The app's engine, once the request's API key (when the server has one) is checked."""
    api_key = request.app.state.api_key
    if api_key:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise p.APIError(401, "You didn't provide an API key; send it as 'Authorization: Bearer KEY'" if not auth
                             else "Incorrect API key provided", None, "invalid_api_key")
    return request.app.state.engine


# ---- models ----------------------------------------------------------------------------------------------
def model_card(engine, entry):
    card = {"id": entry.id, "object": "model", "created": entry.created, "owned_by": p.OWNER,
            "root": entry.adapter_dir or entry.id, "parent": None if entry.peft_type is None else engine.base_id}
    if entry.peft_type:
        card["peft_type"] = entry.peft_type
    return card


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(request: Request):
    engine = engine_of(request)
    return {"object": "list", "data": [model_card(engine, e) for e in engine.entries.values()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    engine = engine_of(request)
    return model_card(engine, engine.get(model_id))


# ---- jobs and their events ---------------------------------------------------------------------------------
def start_job(engine, entry, ids, gen, stop, seed, mode):
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


async def watch_disconnect(request, job):
    """Cancel the job when the client of a non-streamed request goes away (uvicorn answers receive() with
    http.disconnect then); the handler stops waiting too."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            job.events.put_nowait(("error", p.client_gone()))
            return


async def collect(job, request):
    """(the streamed text joined, the end event's (text, finish_reason, completion_tokens))."""
    deltas, end = [], None
    watcher = asyncio.create_task(watch_disconnect(request, job))
    try:
        async for kind, value in events(job):
            if kind == "delta":
                deltas.append(value)
            else:
                end = value
    finally:
        watcher.cancel()
    return "".join(deltas), end


def stream_response(job, first, chunk, final, include_usage, n_prompt):
    """Server-sent events: `first` (if any), chunk(text) per piece, final(reason), usage, [DONE]."""
    async def body():
        try:
            if first is not None:
                yield p.sse(first)
            async for kind, value in events(job):
                if kind == "delta":
                    yield p.sse(chunk(value))
                else:
                    _, reason, n_new = value
                    yield p.sse(final(reason))
                    if include_usage:
                        yield p.sse({**final(None), "choices": [], "usage": p.usage(n_prompt, n_new)})
        except p.APIError as exc:
            yield p.sse(exc.body())
        finally:
            job.cancel.set()  # the client went away (or the answer is complete): stop generating
        yield p.SSE_DONE

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- completions -----------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    engine = engine_of(request)
    body = p.parse_json(await request.body())
    entry = p.model_entry(engine, body)
    messages = p.parse_messages(body)
    stream, include_usage = p.stream_flags(body)
    ids = p.chat_prompt_ids(entry, messages)
    gen, seed = p.sampling(engine, entry, body, len(ids), stream)
    job = start_job(engine, entry, ids, gen, p.stop_strings(body), seed, "strip" if stream else None)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.id,
            "system_fingerprint": None}
    if stream:
        def chunk(text, reason=None, delta=None):
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": text} if delta is None else delta,
                                 "logprobs": None, "finish_reason": reason}]}

        return stream_response(job, chunk(None, delta={"role": "assistant", "content": ""}), chunk,
                               lambda reason: chunk(None, reason, {}), include_usage, len(ids))
    _, (text, reason, n_new) = await collect(job, request)
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}],
            "usage": p.usage(len(ids), n_new)}


@router.post("/v1/completions")
async def completions(request: Request):
    engine = engine_of(request)
    body = p.parse_json(await request.body())
    entry = p.model_entry(engine, body)
    ids = p.completion_prompt_ids(entry, body)
    stream, include_usage = p.stream_flags(body)
    gen, seed = p.sampling(engine, entry, body, len(ids), True)
    job = start_job(engine, entry, ids, gen, p.stop_strings(body), seed, "raw")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": entry.id, "system_fingerprint": None}

    def choice(text, reason=None):
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

    if stream:
        return stream_response(job, None, choice, lambda reason: choice("", reason), include_usage, len(ids))
    text, (_, reason, n_new) = await collect(job, request)
    return {**choice(text, reason), "usage": p.usage(len(ids), n_new)}
