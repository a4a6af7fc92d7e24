"""OpenAI-compatible HTTP API over a base model and its adapters.

    python server.py --lora_dir saved_models/demo                          # http://127.0.0.1:8000/v1
    python server.py --lora_dir math=saved_models/a chat=saved_models/b --api_key KEY --port 8001
Binds 127.0.0.1 by default. To chat locally in a terminal, use generate.py instead.
"""
from utils.args import parse_serve_args
from utils.errors import cli_main


@cli_main
def main(argv=None):
    model_args, serve_args, gen_args = parse_serve_args(argv, prog="server.py")
    from utils.server import serve

    serve(model_args, serve_args, gen_args)


if __name__ == "__main__":
    main()
