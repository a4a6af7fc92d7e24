"""Batch prediction: answer every row of a dataset file and write RESULT_DIR/predictions.jsonl.

    python predict.py --lora_dir saved_models/smollm_lora --data my_prompts.json --result_dir preds/
Re-running with the same arguments resumes where a killed run stopped.
"""
from utils.args import parse_predict_args
from utils.errors import cli_main


@cli_main
def main(argv=None):
    args = parse_predict_args(argv)
    from utils.prediction import run_predict

    run_predict(*args)


if __name__ == "__main__":
    main()
