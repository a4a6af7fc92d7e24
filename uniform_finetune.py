"""Fine-tune a causal LM on instruction data with a parameter-efficient method.

    python uniform_finetune.py --model_type llama --model_name_or_path PATH --data alpaca-belle-cot \
        --peft_type lora --lora_target_modules q_proj v_proj --per_gpu_train_batch_size 4 --epochs 1

With no flags it tunes the embedded SmolLM2-135M-Instruct on the bundled sample data.
A YAML/JSON config file may replace the flags: `python uniform_finetune.py config.yaml [--flag value ...]`.
"""
from utils.args import parse_finetune_args
from utils.errors import cli_main


@cli_main
def main(argv=None):
    args = parse_finetune_args(argv)
    from utils.distributed import shut_down
    from utils.train import run_finetune

    run_finetune(*args)
    shut_down()


if __name__ == "__main__":
    main()
