"""OpenAI-compatible HTTP API over one base model and its adapters (server.py); the layers live in utils/serving/.

    GET  /v1/models              the base model and every adapter
    POST /v1/chat/completions    messages -> answer, rendered with the template the adapter was trained with
    POST /v1/completions         a raw prompt string (no template) -> continuation
    GET  /health                 {"status": "ok"} (no API key needed)

Request parsing and errors: utils/serving/protocol.py. Models and the generation worker, which batches concurrent
requests step by step: utils/serving/engine.py and batcher.py. The FastAPI app: utils/serving/routes.py.
"""
import sys

from utils.errors import UserError
from utils.serving.engine import Engine, Entry, Job, load_engine, parse_lora_value
from utils.serving.protocol import APIError, error_body

__all__ = ["APIError", "Engine", "Entry", "Job", "check_port", "create_app", "error_body", "load_engine",
           "parse_lora_value", "serve"]


def create_app(serve_args=None, model_args=None, gen_args=None, engine=None, log=print):
    """The FastAPI app (utils/serving/routes.py). Loads the models from the arguments unless a loaded Engine is
    passed."""
    from utils.serving.routes import create_app as _create_app

    return _create_app(serve_args, model_args, gen_args, engine, log)


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
    """server.py: check the address and the flags, load the models, serve until Ctrl+C."""
    from utils.serving.engine import batching_limits

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("server.py needs fastapi and uvicorn; run `pip install -r requirements.txt`") from None
    if not 0 < serve_args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, not {serve_args.port}")
    if serve_args.max_queue < 1:
        raise UserError(f"--max_queue must be at least 1, not {serve_args.max_queue}")
    batching_limits(serve_args)
    check_port(serve_args.host, serve_args.port)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    app = create_app(serve_args, model_args, gen_args, log=log)
    if serve_args.host not in ("127.0.0.1", "localhost", "::1") and not serve_args.api_key:
        log(f"warning: serving on {serve_args.host} without --api_key: anyone who reaches this port can use the "
            "models")
    url = f"http://{serve_args.host}:{serve_args.port}"
    log(f"serving {', '.join(app.state.engine.entries)} on {url} (OpenAI base_url {url}/v1; Ctrl+C stops it)")
    uvicorn.run(app, host=serve_args.host, port=serve_args.port, log_level="info")
