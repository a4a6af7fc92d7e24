"""Gradio chat demo over a base model and an adapter: multi-turn, streaming, sampling controls.

    python web.py --lora_dir saved_models/demo                  # http://127.0.0.1:7860
    python web.py --model_name_or_path PATH --port 7861         # a base model alone
Binds 127.0.0.1 by default (--host 0.0.0.0 to open it to the network); never creates a public share link.
"""
import os
import sys

from utils.args import parse_serve_args
from utils.errors import UserError, cli_main

WEB_DEFAULT_PORT = 7860  # Gradio's usual port; server.py keeps the shared default 8000


def _port_given(argv):
    """True when --port is on the command line or in the config file (else web.py uses 7860)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--port" or a.startswith("--port=") for a in argv):
        return True
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml", ".json")):
        config = config or argv[0]
    if config:
        from utils.args import _load_config

        return "port" in _load_config(config)
    return False


@cli_main
def main(argv=None):
    model_args, serve, gen = parse_serve_args(argv, prog="web.py")
    if serve.api_key:
        raise UserError("--api_key is for server.py; web.py has no login, so keep it on 127.0.0.1")
    if serve.lora_dir and len(serve.lora_dir) > 1:
        raise UserError("web.py chats with one adapter; pass a single --lora_dir (server.py serves several)")
    port = serve.port if _port_given(argv) else WEB_DEFAULT_PORT

    from utils.loader import check_inference_args, load_from_args
    from utils.server import check_port
    from utils.web import build_demo, launch

    lora_dir = serve.lora_dir[0] if serve.lora_dir else None
    if lora_dir and "=" in lora_dir and not os.path.exists(lora_dir):
        lora_dir = lora_dir.split("=", 1)[1]  # server.py's NAME=DIR form; the name is not used here
    check_inference_args(model_args, lora_dir)
    check_port(serve.host, port)
    model, tokenizer, template, info = load_from_args(model_args, lora_dir, serve.template)
    print(f"[{info['base_model']} ({info['model_type']}), adapter: {info['adapter'] or 'none'}, "
          f"template: {info['template']}]", file=sys.stderr)
    demo = build_demo(model, tokenizer, template, info, gen)
    if serve.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {serve.host} makes the demo reachable from other machines; it has no login",
              file=sys.stderr)
    print(f"web demo on http://{serve.host}:{port} (Ctrl+C stops it)", file=sys.stderr)
    launch(demo, serve.host, port)


if __name__ == "__main__":
    main()
