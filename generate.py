"""Talk to a base model or a fine-tuned adapter.

    python generate.py --lora_dir saved_models/smollm_lora --prompt "What is 12 + 30?"   # one answer
    python generate.py --lora_dir saved_models/smollm_lora                               # interactive chat
    python generate.py --model_name_or_path PATH                                         # base model only
    python generate.py --data alpaca-belle-cot --model_type llama                        # Alpaca-CoT's form
"""
import sys

from utils.args import parse_generate_args
from utils.errors import UserError, cli_main


def _seed_run(model_args, infer):
    """Alpaca-CoT's `generate.py --data D --model_type T`: the run that `uniform_finetune.py` wrote for them."""
    from utils.run_dir import RUNS_ROOT, find_run

    found = find_run(model_args.model_type, infer.data)
    if found is None:
        what = f"--data {' '.join(infer.data)}" + (f" --model_type {model_args.model_type}" if model_args.model_type
                                                   else "")
        raise UserError(f"no finished run under {RUNS_ROOT}/ was trained with {what}; train one with "
                        f"`uniform_finetune.py {what}` or pass --lora_dir")
    print(f"[--data {' '.join(infer.data)}: loading the newest matching run, {found}]", file=sys.stderr)
    return str(found)


@cli_main
def main(argv=None):
    model_args, infer, gen = parse_generate_args(argv)
    from utils.generation import chat_loop, generate_reply
    from utils.loader import check_inference_args, load_from_args

    lora_dir = infer.lora_dir or (_seed_run(model_args, infer) if infer.data else None)
    check_inference_args(model_args, lora_dir)
    model, tokenizer, template, info = load_from_args(model_args, lora_dir, infer.template)
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
