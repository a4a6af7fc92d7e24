"""Batch prediction over a dataset -> predictions.jsonl, written as it goes and resumable."""
import json
import time
from pathlib import Path

from utils.data import load_conversations
from utils.generation import generation_kwargs, load_for_inference


def _prompt_and_reference(msgs):
    """Everything up to the last user turn is the prompt; an answer after it is the reference."""
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    ref = msgs[last_user + 1]["content"] if last_user + 1 < len(msgs) else None
    return msgs[:last_user + 1], ref


def run_predict(model_args, predict_args, gen_args):
    import torch
    from tqdm import tqdm

    convs, _ = load_conversations([predict_args.data], for_training=False)
    out_dir = Path(predict_args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / "predictions.jsonl"
    done = set()
    if out_path.is_file():
        with out_path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError):
                    break  # a torn last line from a kill: it is rewritten below
        _truncate_torn_tail(out_path)
    model, tokenizer, template, info = load_for_inference(
        predict_args.lora_dir, model_args.model_name_or_path, model_args.model_type, None,
        model_args.trust_remote_code, model_args.dtype)
    todo = []
    for i, msgs in enumerate(convs):
        if i in done:
            continue
        prompt, ref = _prompt_and_reference(msgs)
        todo.append((i, prompt, ref, template.prompt_ids(tokenizer, prompt)))
    todo.sort(key=lambda t: len(t[3]))  # similar lengths share a batch: less padding
    kwargs = generation_kwargs(gen_args, tokenizer, template)
    pad = tokenizer.pad_token_id
    start, n_done = time.time(), 0
    bar = tqdm(total=len(convs), initial=len(done), unit="row", desc="predict")
    with out_path.open("a", encoding="utf-8") as f:
        for b in range(0, len(todo), predict_args.batch_size):
            batch = todo[b:b + predict_args.batch_size]
            width = max(len(t[3]) for t in batch)
            ids = torch.tensor([[pad] * (width - len(t[3])) + t[3] for t in batch])  # left padding
            mask = torch.tensor([[0] * (width - len(t[3])) + [1] * len(t[3]) for t in batch])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            for (i, prompt, ref, _), row in zip(batch, out):
                text = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
                rec = {"id": i, "prompt": prompt[-1]["content"], "prediction": text}
                if ref is not None:
                    rec["reference"] = ref
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            n_done += len(batch)
            bar.update(len(batch))
            bar.set_postfix(rows_per_s=f"{n_done / (time.time() - start):.2f}")
    bar.close()
    print(f"wrote {out_path} ({len(convs)} rows; {len(done)} were already done) with {info['adapter'] or 'the base model'}")
    return out_path


def _truncate_torn_tail(path):
    """Drop an incomplete last line left by a killed run."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])
