"""Benchmarks: multiple choice (CMMLU / MMCU / C-Eval / MMLU), CoT / GSM8K answers, Belle-eval with an LLM judge,
held-out loss; or a whole study grid.

    python evaluate.py --task mc --data_dir ../shared/data/cmmlu --split dev --shots 1 --lora_dir saved_models/demo
    python evaluate.py --task cot --data gsm8k:100 --lora_dir saved_models/demo --max_new_tokens 256
    python evaluate.py --task belle --data ../shared/data/belle_eval/eval_set_dev.jsonl \
        --judge_base_url http://127.0.0.1:8000/v1 --judge_model gpt-4o-mini
    python evaluate.py --task loss --data my_heldout.json --lora_dir saved_models/demo
    python evaluate.py --task pairwise --lora_dir saved_models/demo --pairwise_base --data belle_eval.jsonl \
        --judge_base_url http://127.0.0.1:8000/v1 --judge_model judge
    python evaluate.py --task mt_bench --data ../shared/data/mt_bench/question.jsonl --lora_dir saved_models/demo \
        --judge_base_url https://api.openai.com/v1 --judge_model gpt-4o-mini
    python evaluate.py --study study/example.yaml
Results go to OUTPUT_DIR/<task>.json and .md; per-item results are cached, so a rerun resumes or costs nothing.
"""
from utils.errors import cli_main
from utils.eval_args import parse_eval_args


@cli_main
def main(argv=None):
    model_args, eval_args, gen_args = parse_eval_args(argv)
    if eval_args.study:
        from utils.study import run_study

        return run_study(eval_args.study)
    from utils.evaluation import run_eval

    return run_eval(model_args, eval_args, gen_args)


if __name__ == "__main__":
    main()
