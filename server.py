"""OpenAI-compatible HTTP API over a base model and its adapters (issue 6: in progress).

    python server.py --lora_dir saved_models/smollm_lora [--host 127.0.0.1] [--port 8000]
Binds 127.0.0.1 by default. Until it is complete, use generate.py for local chatting.
"""
from utils.args import parse_serve_args
from utils.errors import UserError, cli_main


@cli_main
def main(argv=None):
    parse_serve_args(argv, prog="server.py")
    raise UserError("server.py is not implemented yet; chat locally with `python generate.py --lora_dir DIR`")


if __name__ == "__main__":
    main()
