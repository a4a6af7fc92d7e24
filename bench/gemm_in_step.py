"""How fast the frozen weights' GEMMs run inside our training step, with torch's BLAS (MKL) and with numpy's OpenBLAS.

Run by hand, not in CI:

    .venv/bin/python bench/gemm_in_step.py              # embedded SmolLM2-135M, real CoT rows, 4 reps (~2 min)

The step is the one bench/train_ablation.py times for "ours (default)" (LoRA r8 on q_proj/v_proj, packing, logits at
trained positions, passes of 4 samples, fp32). Every frozen nn.Linear with >= 262,144 weights runs through one
autograd Function that times its forward GEMM (x @ W^T) and its backward GEMM (dY @ W; frozen weights need no weight
gradient) and counts their FLOPs. Three configurations run in turns on the same batches: torch's own nn.Linear
(untimed), the Function with torch.mm (MKL in the PyPI wheels) and the Function with numpy's matmul (numpy's bundled
OpenBLAS). Printed: tokens/s of each and the GFLOP/s of the timed GEMMs inside the step. OpenBLAS's worker threads
spin between calls and take the cores from torch's OpenMP threads, so this script sets OMP_WAIT_POLICY=PASSIVE and
OPENBLAS_THREAD_TIMEOUT=4 (before torch and numpy load; all three configurations run under them).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402  (the two variables above must be set before torch and numpy start their threads)
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TIMED = {"mkl": [0.0, 0], "openblas": [0.0, 0]}  # seconds, FLOPs


def timed_linear(torch, np):
    class Timed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, how):
            ctx.save_for_backward(weight)
            ctx.how = how
            return _gemm(x, weight.t(), how)

        @staticmethod
        def backward(ctx, grad):
            (weight,) = ctx.saved_tensors
            return _gemm(grad, weight, ctx.how), None, None

    def _gemm(x, w, how):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty(x2.shape[0], w.shape[1])
        t0 = time.perf_counter()
        if how == "openblas":
            np.matmul(x2.numpy(), w.numpy(), out=out.numpy())
        else:
            torch.mm(x2, w, out=out)
        TIMED[how][0] += time.perf_counter() - t0
        TIMED[how][1] += 2 * x2.shape[0] * w.shape[0] * w.shape[1]
        return out.view(*x.shape[:-1], w.shape[1])

    return Timed


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=4, help="batches of 8 per configuration")
    ap.add_argument("--n", type=int, default=64, help="rows to draw the batches from")
    ap.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m-instruct)")
    ap.add_argument("--min_weights", type=int, default=1 << 18, help="time the frozen linears with this many weights "
                    "or more (default 262,144: SmolLM2's q, o and MLP projections and its output layer)")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    import numpy as np
    import torch
    from train_ablation import build_workload

    from utils import packing

    run = build_workload(a.n, a.model, ["--bf16", "off"])[0]
    model, rows = run.trainer.model, run.train
    hf = model.get_base_model()
    pack = packing.PackingCollator(run.tokenizer.pad_token_id, 256, packing.attention_cost_per_position(hf.config))
    frozen = [m for m in hf.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad
              and m.bias is None and m.weight.numel() >= a.min_weights]
    timed = timed_linear(torch, np)
    model.train()

    def use(how):
        for m in frozen:
            if how == "torch":
                m.__dict__.pop("forward", None)
            else:
                m.forward = lambda x, m=m: timed.apply(x, m.weight, how)

    def step(samples, keep=None):
        trained = sum(sum(t != -100 for t in s["labels"][1:]) for s in samples)
        t0 = time.perf_counter()
        for i in range(0, len(samples), 4):
            batch = pack(samples[i:i + 4])
            batch.pop(packing.ROW_TOKENS, None)
            packing.selective_loss(model, batch, trained)[0].backward()
        seconds = time.perf_counter() - t0
        if keep is not None:
            keep.extend(p.grad.clone() for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)
        return seconds

    def gradients(how):  # the same dropout masks for both: same seed
        use(how)
        torch.manual_seed(0)
        step([rows[i] for i in range(8)], grads := [])
        return grads

    print(f"bench: {len(frozen)} frozen linear layers timed; {a.reps} batches of 8; torch {torch.__version__} "
          f"(threads {torch.get_num_threads()}), numpy {np.__version__}", flush=True)
    names = ["torch", "mkl", "openblas"]
    seconds, tokens = {n: 0.0 for n in names}, 0
    step([rows[i] for i in range(8)])  # warm-up
    diff = max((a - b).abs().max().item() for a, b in zip(gradients("torch"), gradients("openblas")))
    print(f"trained gradients, numpy (OpenBLAS) vs nn.Linear: max abs diff {diff:.1e}", flush=True)
    TIMED["openblas"][:] = [0.0, 0]
    for rep in range(a.reps):
        start = (rep * 8) % max(len(rows) - 8, 1)
        samples = [rows[i] for i in range(start, start + 8)]
        tokens += sum(len(s["input_ids"]) for s in samples)
        for how in names[rep % 3:] + names[:rep % 3]:  # rotate who goes first
            use(how)
            seconds[how] += step(samples)
    use("torch")
    report(seconds, tokens, a.reps)


def report(seconds, tokens, reps):
    labels = {"torch": "nn.Linear (torch)", "mkl": "timed, torch.mm (MKL)", "openblas": "timed, numpy (OpenBLAS)"}
    for how, label in labels.items():
        gemm = f"; its GEMMs {TIMED[how][0] / reps:.2f} s per step at " \
               f"{TIMED[how][1] / max(TIMED[how][0], 1e-9) / 1e9:.0f} GFLOP/s" if how in TIMED else ""
        print(f"{label:26s} {tokens / seconds[how]:7.1f} tokens/s, {seconds[how] / reps:.2f} s per step{gemm}")


if __name__ == "__main__":
    main()
