"""Merge a LoRA adapter into its base model and save a standalone model that plain transformers loads.

    python merge.py --lora_dir saved_models/smollm_lora --merged_dir merged/smollm_arith
    python merge.py --model_type llama --size 7b --lora_dir xxx --merged_dir yyy     # Alpaca-CoT's form
"""
from utils.args import parse_merge_args
from utils.errors import cli_main


@cli_main
def main(argv=None):
    model_args, merge = parse_merge_args(argv)
    from utils.merging import merge_adapter

    merge_adapter(merge.lora_dir, merge.merged_dir, model_args.model_name_or_path, model_args.trust_remote_code,
                  model_args)


if __name__ == "__main__":
    main()
