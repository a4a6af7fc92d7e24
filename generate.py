"""Talk to a base model or a fine-tuned adapter.

    python generate.py --lora_dir saved_models/smollm_lora --prompt "What is 12 + 30?"   # one answer
    python generate.py --lora_dir saved_models/smollm_lora                               # interactive chat
    python generate.py --model_name_or_path PATH                                         # base model only
"""
import sys

from utils.args import parse_generate_args
from utils.errors import cli_main


@cli_main
def main(argv=None):
    model_args, infer, gen = parse_generate_args(argv)
    from utils.generation import chat_loop, generate_reply, load_for_inference

    model, tokenizer, template, info = load_for_inference(
        infer.lora_dir, model_args.model_name_or_path, model_args.model_type, infer.template,
        model_args.trust_remote_code, model_args.dtype)
    print(f"[{info['base_model']} ({info['model_type']}), adapter: {info['adapter'] or 'none'}, "
          f"template: {info['template']}]", file=sys.stderr)
    if infer.prompt is None:
        chat_loop(model, tokenizer, template, gen, system=infer.system)
        return
    messages = ([{"role": "system", "content": infer.system}] if infer.system else [])
    messages.append({"role": "user", "content": infer.prompt})
    generate_reply(model, tokenizer, template, messages, gen, stream=lambda s: print(s, end="", flush=True))
    print()


if __name__ == "__main__":
    main()
