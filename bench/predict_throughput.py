"""Batched prediction (predict.py's path) vs a per-sample `generate` loop: same prompts, same settings.

Run by hand, not in CI:

    .venv/bin/python bench/predict_throughput.py            # embedded SmolLM2-135M, 48 CoT prompts, batch 16
    .venv/bin/python bench/predict_throughput.py --quick    # smoke run on a tiny random llama

ours = `utils.prediction.run_predict` (what predict.py runs: length-sorted batches, left padding), timed end to end
including its model load, so the ratio is conservative; sequential = the same model, template, prompts and
generation settings (greedy, --max_new_tokens), one `model.generate` per prompt, model load not timed.
Also prints the cached model load time (a fresh process: tokenizer + weights from the safetensors cache), apart
from the time the process spends importing torch and transformers.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COT = ROOT.parent / "shared" / "data" / "cot"

LOAD_SNIPPET = """
import time
t0 = time.perf_counter()
import sys, json
sys.path.insert(0, {root!r})
import torch, transformers
transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase  # transformers' lazy import chain
from utils.models import load_model, load_tokenizer, resolve_model
t1 = time.perf_counter()
path, _, _ = resolve_model({model!r})
tok = load_tokenizer(path)
model = load_model(path, "auto", False, tok.pad_token_id)
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1}}))
"""


def cached_load_seconds(model, warm=True):
    """(seconds to import torch + transformers, seconds to load tokenizer + weights) in a fresh process, warm cache
    (warm=False: no warm-up process first, for the smoke run)."""
    code = LOAD_SNIPPET.format(root=str(ROOT), model=model)
    if warm:
        subprocess.run([sys.executable, "-c", code], capture_output=True)  # warm the OS file cache
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["import_s"], out["load_s"]


def main(argv=None):
    # long: the benchmark's steps read top to bottom
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny random llama, 16 prompts, 8 new tokens")
    ap.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m-instruct)")
    ap.add_argument("--n", type=int, default=None, help="prompts (default 48; --quick 16)")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default 64; --quick 8")
    a = ap.parse_args(argv)

    import torch

    from utils.args import GenerationArguments, ModelArguments, PredictArguments
    from utils.data import load_conversations
    from utils.generation import generation_kwargs
    from utils.loader import load_for_inference
    from utils.formats import split_conversation as _prompt_and_reference
    from utils.prediction import run_predict

    n = a.n or (16 if a.quick else 48)
    new = a.max_new_tokens or (8 if a.quick else 64)
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    if a.quick and not a.model:
        from bench.train_throughput import quick_model

        model = quick_model(tmp)
    else:
        model = a.model or "smollm2-135m-instruct"
    src = COT / "creak_train.json"
    data = f"{src}:{n}" if src.is_file() else f"arith_sample:{n}"
    gen = GenerationArguments(max_new_tokens=new)
    print(f"bench: model {model}; data {data}; batch {a.batch_size}; greedy, max_new_tokens {new}; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    import_s, load_s = cached_load_seconds(model, warm=not a.quick)
    print(f"model load (cached, fresh process): tokenizer + weights = {load_s:.2f} s, after importing torch + "
          f"transformers = {import_s:.2f} s (paid by any PyTorch program); {import_s + load_s:.2f} s in all")

    t0 = time.perf_counter()
    out = run_predict(ModelArguments(model_name_or_path=model),
                      PredictArguments(data=data, result_dir=str(tmp / "preds"), batch_size=a.batch_size), gen)
    ours_s = time.perf_counter() - t0
    ours = {json.loads(line)["id"]: json.loads(line)["prediction"] for line in Path(out).read_text().splitlines()}

    m, tok, template, _ = load_for_inference(model_name_or_path=model)
    convs, _ = load_conversations([data], for_training=False)
    kwargs = generation_kwargs(gen, tok, template)
    seq = {}
    t0 = time.perf_counter()
    for i, msgs in enumerate(convs):
        ids = torch.tensor([template.prompt_ids(tok, _prompt_and_reference(msgs)[0])])
        with torch.no_grad():
            row = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0]
        seq[i] = tok.decode(row[ids.shape[1]:], skip_special_tokens=True).strip()
    seq_s = time.perf_counter() - t0
    same = sum(ours.get(i) == seq[i] for i in seq)
    print(f"ours (predict.py batched, batch {a.batch_size}, load included): {len(ours)} rows in {ours_s:.1f} s = "
          f"{len(ours) / ours_s:.2f} rows/s")
    print(f"sequential (one generate per prompt, load excluded):        {len(seq)} rows in {seq_s:.1f} s = "
          f"{len(seq) / seq_s:.2f} rows/s")
    print(f"identical predictions: {same}/{len(seq)} (greedy; batched left padding can flip near-ties)")
    print(f"predict rows/s ours/sequential = {(len(ours) / ours_s) / (len(seq) / seq_s):.2f}")


if __name__ == "__main__":
    main()
