"""Batch prediction over a dataset -> predictions.jsonl, written as it goes and resumable."""
import time
from pathlib import Path

from utils.errors import UserError
from utils.formats import split_conversation
from utils.jsonl import JsonlWriter, read_records

RESULT_FILE = "predictions.jsonl"


class _ById:
    """The rows already in predictions.jsonl, by row id (a `cache` for generate_missing)."""

    def __init__(self, path):
        self.writer = JsonlWriter(path)
        self.done = {rec["id"] for rec in read_records(path) if isinstance(rec.get("id"), int)}

    def __contains__(self, key):
        return key in self.done

    def put(self, rec):
        rec.pop("key", None)
        self.writer.write(rec)
        self.done.add(rec["id"])


def check_result_dir(result_dir):
    out_dir = Path(result_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--result_dir {result_dir} is a file; pass a directory (predictions.jsonl is written in it)")
    return out_dir


def run_predict(model_args, predict_args, gen_args):
    from tqdm import tqdm

    from utils.data import load_conversations
    from utils.generation import generate_missing, generation_kwargs
    from utils.loader import check_inference_args, load_from_args

    out_dir = check_result_dir(predict_args.result_dir)
    check_inference_args(model_args, predict_args.lora_dir)
    convs, _ = load_conversations([predict_args.data], for_training=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / RESULT_FILE
    results = _ById(out_path)
    already = len([i for i in range(len(convs)) if i in results])
    model, tokenizer, template, info = load_from_args(model_args, predict_args.lora_dir)
    items = []
    for i, msgs in enumerate(convs):
        if i in results:
            continue
        prompt, ref = split_conversation(msgs)
        items.append({"key": i, "prompt": prompt, "ref": ref, "ids": template.prompt_ids(tokenizer, prompt)})

    def record(it, text):
        rec = {"id": it["key"], "prompt": it["prompt"][-1]["content"], "prediction": text}
        if it["ref"] is not None:
            rec["reference"] = it["ref"]
        return rec

    bar = tqdm(total=len(convs), initial=already, unit="row", desc="predict")
    start = time.time()

    def progress(n):
        bar.update(n)
        bar.set_postfix(rows_per_s=f"{(bar.n - already) / max(time.time() - start, 1e-9):.2f}")

    generate_missing(items, results, model, tokenizer, generation_kwargs(gen_args, tokenizer, template),
                     predict_args.batch_size, record, progress)
    bar.close()
    print(f"wrote {out_path} ({len(convs)} rows; {already} were already done) with "
          f"{info['adapter'] or 'the base model'}")
    return out_path
