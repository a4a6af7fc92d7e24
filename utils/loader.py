"""The one loader of base model + adapter for inference: generate, predict, merge, server, web and evaluate.

With --lora_dir the base model, model type, template and tokenizer come from the run directory (utils/run_dir.py),
so the prompt at inference is token for token the prompt of training, and the run's own `trust_remote_code`
applies to config, tokenizer and weights alike. Quantization: a base trained quantized (qlora, --load_in_4bit /
--load_in_8bit) is loaded quantized again; --load_in_4bit / --load_in_8bit ask for it explicitly (for a base
model alone too); methods whose adapter replaces base weights refuse a quantized base with one sentence. A run that
extended the vocabulary (--extend_vocab) brings its tokenizer, and its base is resized and initialised as in
training before the adapter is attached (attach_run; utils/vocab.py).
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from utils import run_dir, vocab
from utils.errors import UserError
from utils.models import EMBEDDED_ALIAS, get_spec, load_model, load_tokenizer, place_for_inference, resolve_model
from utils.peft_methods import capability, check_quantization_available, load_adapter, requested_bits
from utils.templates import pick_template


@dataclass
class Run:
    """A finished run directory, read and checked (no weights loaded)."""
    path: Path
    meta: dict
    template: object
    adapter_config: dict

    @property
    def peft_type(self):
        return self.meta["peft_type"]


def open_run(lora_dir):
    """Read and check a run directory: metadata, template and adapter files (sizes and headers)."""
    path = Path(lora_dir)
    config = run_dir.check_adapter_dir(path)
    meta = run_dir.read_meta(path)
    template = run_dir.read_template(path)
    return Run(path, meta, template, config)


def attach_run(model, run, adapter_name=None):
    """The run's adapter on `model` (its base model, loaded): a run with --extend_vocab gets the resized embeddings
    first, and its trained rows written into them after (vocab.after_adapter; a no-op for other runs).
    adapter_name: a further adapter on a shared PeftModel (server.py), only for runs where shares_base is true."""
    model = vocab.prepare_base(model, run.meta)
    model = load_adapter(model, run.path, adapter_name=adapter_name)
    return vocab.after_adapter(model, run.meta)


def shares_base(run):
    """Whether server.py may attach this run's adapter to a base model shared with other adapters: the method's
    preset says `shareable` and the run kept the base's vocabulary (an extended run needs its own resized base)."""
    return bool(capability(run.peft_type, "shareable")) and not vocab.extends(run.meta)


def inference_bits(run, bits, keep_quantization=True):
    """The quantization a run is loaded with: the one asked for, else the one it was trained with."""
    if not keep_quantization:
        if bits:
            raise UserError(f"--load_in_{bits}bit cannot be used here: the base is reloaded in full precision to "
                            "merge the adapter into it; drop the flag")
        return None
    if run is None:
        return bits
    if bits and capability(run.peft_type, "quantized_base") == "none":
        raise UserError(f"--load_in_{bits}bit cannot be used with a {run.peft_type} adapter: it replaces or wraps "
                        "base weights, which must stay in full precision; drop the flag")
    return bits or run.meta.get("quant_bits")


def load_for_inference(lora_dir=None, model_name_or_path=None, model_type=None, template=None,
                       trust_remote_code=False, dtype="auto", keep_quantization=True, quant_bits=None):
    """(model, tokenizer, template, info): base + adapter from lora_dir, or a base model alone.

    quant_bits (4 / 8) loads the base quantized; a run trained quantized is loaded so again unless
    keep_quantization is False (merging).
    """
    run = open_run(lora_dir) if lora_dir else None
    bits = inference_bits(run, quant_bits, keep_quantization)
    if bits:
        check_quantization_available(bits)
    if run is not None:
        trust = trust_remote_code or bool(run.meta.get("trust_remote_code", False))
        base = model_name_or_path or run.meta["base_model"]
        path, _, mtype = resolve_model(base, run.meta["model_type"], trust)
        tokenizer = load_tokenizer(run.path, trust)  # the run's own: with the tokens --extend_vocab added
        vocab.check_tokenizer(tokenizer, run.meta, run.path)
        tmpl = run.template
        model = load_model(path, dtype, trust, tokenizer.pad_token_id, bits)
        model = attach_run(model, run)
        info = {"base_model": base, "model_type": mtype, "adapter": str(lora_dir), "template": tmpl.name,
                "peft_type": run.peft_type, "quant_bits": bits, "added_tokens": vocab.added_tokens(run.meta)}
    else:
        path, _, mtype = resolve_model(model_name_or_path, model_type, trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code)
        tmpl = pick_template(template, get_spec(mtype).template, tokenizer)
        model = load_model(path, dtype, trust_remote_code, tokenizer.pad_token_id, bits)
        info = {"base_model": model_name_or_path or EMBEDDED_ALIAS, "model_type": mtype, "adapter": None,
                "template": tmpl.name, "peft_type": None, "quant_bits": bits, "added_tokens": 0}
    place_for_inference(model).eval()
    return model, tokenizer, tmpl, info


def check_size(size, info):
    """The seed's --size (e.g. 7b) names the checkpoint size; ours come from the run or --model_name_or_path."""
    if size:
        print(f"note: --size {size} is accepted for Alpaca-CoT commands; the base model is {info['base_model']}",
              file=sys.stderr)


def load_from_args(model_args, lora_dir=None, template=None, keep_quantization=True):
    """load_for_inference from a script's ModelArguments (dtype, trust_remote_code, --load_in_4bit/8bit)."""
    loaded = load_for_inference(lora_dir, model_args.model_name_or_path, model_args.model_type, template,
                                model_args.trust_remote_code, model_args.dtype, keep_quantization,
                                requested_bits(model_args))
    check_size(getattr(model_args, "size", None), loaded[3])
    return loaded


def check_inference_args(model_args, lora_dir=None, keep_quantization=True):
    """Everything about the model that can be checked before any weight loads (scripts call it first)."""
    bits = requested_bits(model_args)
    run = open_run(lora_dir) if lora_dir else None
    bits = inference_bits(run, bits, keep_quantization)
    if bits:
        check_quantization_available(bits)
    return run
