"""The PEFT method catalog: peft/<name>.yaml presets -> trainable methods on a model.

Presets are data (never .py files in peft/, which would shadow the upstream `peft` package). A preset's
`builder` says who builds it:
- `peft.<ConfigClass>`: upstream `peft`, unmodified (LoRA, QLoRA, DoRA, AdaLoRA, LoHa, LoKr, VeRA, IA3,
  prefix / p-tuning / prompt tuning);
- `bottleneck`: our own sequential / parallel bottleneck adapters (utils/bottleneck.py);
- `full` / `freeze`: plain weights (all of them, or the last N layers), saved as the trained tensors.
Every method is saved as adapter_config.json + adapter_model.safetensors and loaded back by
`load_adapter(model, dir)`, which every script uses.
"""
import copy
import functools
import json
import math
from pathlib import Path

import yaml

from utils.errors import UserError
from utils.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

PRESET_DIR = Path(__file__).resolve().parents[1] / "peft"
PEFT_TYPES = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
# What every preset declares about its method; read by training, merging and serving instead of lists of names.
CAPABILITIES = {
    "builder": "who builds it: peft.<ConfigClass> (upstream peft), bottleneck (utils/bottleneck.py), full or freeze",
    "loader": "how a saved adapter is attached: peft, bottleneck or weights (trained tensors copied into the base)",
    "mergeable": "merge.py can fold it into the base weights",
    "quantized_base": "4bit (always), optional (--load_in_4bit / --load_in_8bit) or none",
    "packing": "samples may be packed into one row (the method does not own positions or the attention mask)",
    "selective_loss": "its loss is the plain LM loss, so logits are computed at trained positions only",
    "prompt_learning": "it prepends virtual tokens or a key/value prefix",
    "shareable": "server.py serves its adapters from one loaded base, switched per request",
    "gradient_checkpointing": "--gradient_checkpointing works with it",
    "needs_gpu": "it cannot train on a CPU",
    "vocab_extension": "how --extend_vocab trains the new token rows: trainable_tokens (peft's "
                       "trainable_token_indices), modules_to_save (peft's trained embedding copy, old rows masked), "
                       "weights (the method's own saved weights) or no (refused); see utils/vocab.py",
}
# our flag -> preset key, for flags whose name differs from the config key
DIRECT_FLAGS = {"num_virtual_tokens": "num_virtual_tokens", "bottleneck_size": "bottleneck_size",
                "adapter_non_linearity": "non_linearity", "adapter_dropout": "dropout",
                "adapter_scaling": "scaling", "num_trainable_layers": "num_trainable_layers"}
GENERIC_FLAGS = ("lora_r", "lora_alpha", "lora_dropout")


@functools.lru_cache(maxsize=None)
def _read_preset(peft_type):
    return yaml.safe_load((PRESET_DIR / f"{peft_type}.yaml").read_text(encoding="utf-8"))


def load_preset(peft_type):
    """The preset of a method as a dict (a copy: callers may change it)."""
    if peft_type not in PEFT_TYPES:
        import difflib

        hint = difflib.get_close_matches(str(peft_type), PEFT_TYPES, n=1)
        raise UserError(f"unknown --peft_type '{peft_type}'; valid types are: {', '.join(PEFT_TYPES)}"
                        + (f"; did you mean '{hint[0]}'?" if hint else ""))
    return copy.deepcopy(_read_preset(peft_type))


def methods_with(**capabilities):
    """Names of the methods whose presets declare these capability values, e.g. methods_with(shareable=True)."""
    return [name for name in PEFT_TYPES
            if all(_read_preset(name).get(k) == v for k, v in capabilities.items())]


def capability(peft_type, key):
    return load_preset(peft_type)[key]


def _parse_options(options):
    out = {}
    for item in options or []:
        if "=" not in item:
            raise UserError(f"--peft_options '{item}' is not key=value; write e.g. --peft_options init_r=16")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def preset_params(peft_args):
    """The method's settings: preset defaults, overridden by flags, then by --peft_options."""
    preset = load_preset(peft_args.peft_type)
    params = dict(preset.get("defaults") or {})
    # flags this method understands: the preset's own mapping, plus the direct flags whose key it has
    mapping = {**{f: k for f, k in DIRECT_FLAGS.items() if k in params}, **(preset.get("flags") or {})}
    for flag in (*GENERIC_FLAGS, *DIRECT_FLAGS):
        value = getattr(peft_args, flag)
        if value is None:
            continue
        if flag not in mapping:
            raise UserError(f"--{flag} does not apply to --peft_type {peft_args.peft_type}; its settings are: "
                            f"{', '.join(params) or 'none'} (set them with --peft_options key=value)")
        params[mapping[flag]] = value
    if params.get("scaling") not in (None, "learned") and isinstance(params.get("scaling"), str):
        try:
            params["scaling"] = float(params["scaling"])
        except ValueError:
            raise UserError(f"--adapter_scaling must be a number or 'learned', not '{params['scaling']}'") from None
    params.update(_parse_options(peft_args.peft_options))
    return preset, params


def requested_bits(model_args):
    """4, 8 or None from --load_in_4bit / --load_in_8bit."""
    if getattr(model_args, "load_in_4bit", False) and getattr(model_args, "load_in_8bit", False):
        raise UserError("--load_in_4bit and --load_in_8bit exclude each other; pick one")
    return 4 if getattr(model_args, "load_in_4bit", False) else 8 if getattr(model_args, "load_in_8bit", False) \
        else None


def check_quantization_available(bits):
    import importlib.util

    if bits and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"--load_in_{bits}bit needs bitsandbytes; run `pip install bitsandbytes`")


def quantization_bits(model_args, peft_args):
    """4, 8 or None for training; impossible combinations fail here, before any model is loaded."""
    bits = requested_bits(model_args)
    mode = capability(peft_args.peft_type, "quantized_base")
    if mode == "4bit":
        if bits == 8:
            raise UserError(f"--peft_type {peft_args.peft_type} trains on a 4-bit base; drop --load_in_8bit "
                            "(or use --peft_type lora --load_in_8bit)")
        bits = 4
    if bits and mode == "none":
        raise UserError(f"--peft_type {peft_args.peft_type} cannot train a quantized base; drop "
                        f"--load_in_{bits}bit (or pick a LoRA-family method)")
    check_quantization_available(bits)
    return bits


def check_gradient_checkpointing(peft_type, enabled):
    if enabled and load_preset(peft_type).get("gradient_checkpointing", True) is False:
        raise UserError(f"--gradient_checkpointing cannot be used with --peft_type {peft_type}: transformers drops "
                        "the attention cache that holds the prefix inside checkpointed layers; use p_tuning or "
                        "prompt, or drop --gradient_checkpointing")


def check_dtype(dtype):
    """bf16/fp16 where the hardware lacks it is refused before loading."""
    import torch

    if dtype == "bfloat16":
        if torch.cuda.is_available():
            if not torch.cuda.is_bf16_supported():
                raise UserError("this GPU does not support bfloat16; use --dtype float16 or float32")
        elif not cpu_has_bf16():
            raise UserError("this CPU has no native bfloat16 (AVX512-BF16 or AMX); use --dtype float32")
    if dtype == "float16" and not torch.cuda.is_available():
        raise UserError("float16 training needs a GPU; on CPU use --dtype float32 (or bfloat16 where supported)")


def cpu_has_bf16():
    """Native bf16 on this CPU: AVX512-BF16 or AMX in /proc/cpuinfo, and PyTorch's kernels at AVX512 level (so
    ATEN_CPU_CAPABILITY=avx2 makes a machine behave like one without it, e.g. to reproduce CI on an AVX2 CPU)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # cannot tell: let torch decide
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    import torch

    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")


def linear_module_names(model):
    """Leaf names of the Linear layers inside the transformer blocks (not the LM head)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        if "lm_head" in full:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model, requested, spec):
    """Target module names: the flag's, else the model type's; each must exist in the model."""
    import torch

    available = linear_module_names(model)
    config_type = getattr(model.config, "model_type", None)
    targets = list(requested) if requested else list(spec.targets_for(config_type))
    if targets == ["auto"]:
        # inspect: the Linear layers inside attention blocks; a fused q/k/v projection, else query and value
        attn = sorted({full.rsplit(".", 1)[-1] for full, m in model.named_modules()
                       if ("attn" in full.lower() or "attention" in full.lower()) and "lm_head" not in full
                       and (isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt",
                                                                                          "Conv1D"))})
        fused = [n for n in attn if "qkv" in n.lower() or n in ("query_key_value", "W_pack", "c_attn")]
        qv = [n for n in attn if n in ("q_proj", "v_proj", "query", "value", "q", "v", "wq", "wv")]
        targets = fused or qv or attn or available
        available = sorted(set(available) | set(attn))  # GPT-2 style Conv1D projections count too
        if not targets:
            raise UserError("found no linear layers to adapt in this model; pass --lora_target_modules")
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(f"target module '{missing[0]}' is not in this model; its linear layers are: "
                        f"{', '.join(available)} (pass them with --lora_target_modules)")
    return targets


def _schedule_steps(params, total_steps):
    """AdaLoRA: total_step from the run; tinit/tfinal/deltaT given as fractions become step counts."""
    params["total_step"] = total_steps
    for key in ("tinit", "tfinal", "deltaT"):
        value = params.get(key)
        if isinstance(value, float) and value < 1:
            params[key] = max(1, int(value * total_steps))
    if params.get("tinit", 0) + params.get("tfinal", 0) >= total_steps:
        raise UserError(f"adalora needs more steps than tinit + tfinal ({params.get('tinit')} + "
                        f"{params.get('tfinal')}) but the run has {total_steps}; train longer or lower them "
                        "with --peft_options")


def build_peft_config(peft_type, params, model, spec, lora_target_modules=None, total_steps=None, vocab_plan=None):
    """The upstream peft config of a method; vocab_plan (--extend_vocab) adds the new token rows it trains."""
    import peft

    from utils.models import layout_for

    preset = load_preset(peft_type)
    cls_name = preset["builder"].split(".", 1)[1]
    cls = getattr(peft, cls_name)
    params = dict(params)
    if vocab_plan is not None:
        from utils import vocab

        params.update(vocab.peft_params(model, vocab_plan, preset["vocab_extension"]))
    fields = getattr(cls, "__dataclass_fields__", {})
    if not preset["prompt_learning"] and "target_modules" in fields and "target_modules" not in params:
        layout = layout_for(getattr(model.config, "model_type", None)) or {}
        if preset["builder"] == "peft.IA3Config" and "kv" in layout and not lora_target_modules:
            # IA3: rescale keys, values and the MLP output's input (the feed-forward module)
            params.update(target_modules=[*layout["kv"], layout["mlp_out"]], feedforward_modules=[layout["mlp_out"]])
        else:
            params["target_modules"] = resolve_targets(model, lora_target_modules, spec)
            if preset["builder"] == "peft.IA3Config":
                params.setdefault("feedforward_modules", [])
    if preset["builder"] == "peft.AdaLoraConfig":
        _schedule_steps(params, total_steps or 0)
    unknown = [k for k in params if k not in fields]
    if unknown:
        raise UserError(f"'{unknown[0]}' is not a setting of {cls_name} (--peft_type {peft_type}); valid "
                        f"settings include: {', '.join(sorted(k for k in fields if not k.startswith('_'))[:25])}")
    return cls(task_type=peft.TaskType.CAUSAL_LM, **params)


def transformer_layers(model):
    """The ModuleList of transformer blocks (the one whose length is num_hidden_layers)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise UserError("cannot find the transformer layers of this model for --peft_type freeze; use another method")


def attach_adapter(model, peft_args, spec, total_steps=None, gradient_checkpointing=False, vocab_plan=None):
    """Make `model` trainable with --peft_type; returns (model, callbacks for the Trainer).

    vocab_plan (--extend_vocab, utils/vocab.py): the model is already resized; the new token rows train too."""
    preset, params = preset_params(peft_args)
    builder = preset["builder"]
    callbacks = []
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if builder == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif builder == "freeze":
        for p in model.parameters():
            p.requires_grad_(False)
        name, layers = transformer_layers(model)
        k = int(params["num_trainable_layers"])
        if not 1 <= k <= len(layers):
            raise UserError(f"--num_trainable_layers must be between 1 and {len(layers)} for this model, not {k}")
        for layer in list(layers)[-k:]:
            for p in layer.parameters():
                p.requires_grad_(True)
    elif builder == "bottleneck":
        from utils.bottleneck import BottleneckConfig, add_bottleneck

        cfg = BottleneckConfig(adapter_type=peft_args.peft_type, target_modules=peft_args.lora_target_modules,
                               base_model_name_or_path=getattr(model.config, "_name_or_path", None), **params)
        model = add_bottleneck(model, cfg)
    else:
        from peft import get_peft_model

        config = build_peft_config(peft_args.peft_type, params, model, spec, peft_args.lora_target_modules,
                                   total_steps, vocab_plan)
        model = get_peft_model(model, config)
        if builder == "peft.AdaLoraConfig":
            callbacks.append(adalora_callback())
    if vocab_plan is not None:
        from utils import vocab

        vocab.after_attach(model, vocab_plan, preset["vocab_extension"], builder)
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still get gradients
    return model, callbacks


def adalora_callback():
    """AdaLoRA's rank reallocation, called after each optimizer step and before the gradients are zeroed."""
    from transformers import TrainerCallback

    class AdaLoraAllocator(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            peft_model = model
            while not hasattr(getattr(peft_model, "base_model", None), "update_and_allocate"):
                peft_model = peft_model.module  # unwrap DDP
            peft_model.base_model.update_and_allocate(state.global_step)

    return AdaLoraAllocator()


def count_parameters(model):
    """(trainable, total), counting 4-bit packed weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---- saving and loading --------------------------------------------------------------------------
def save_adapter(model, out_dir, peft_type):
    """Write adapter_config.json + adapter_model.safetensors for any method."""
    loader = capability(peft_type, "loader")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if loader == "bottleneck":
        from utils.bottleneck import save_bottleneck

        save_bottleneck(model, out)
    elif loader == "weights":
        from safetensors.torch import save_file

        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(out / ADAPTER_WEIGHTS))
        cfg = {"peft_type": peft_type, "library": "alpaca-cot weights", "tensors": len(tensors),
               "base_model_name_or_path": getattr(model.config, "_name_or_path", None)}
        (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    else:
        from utils import vocab

        # --extend_vocab: the new rows are in the adapter (trainable tokens / the embedding copy); without this peft
        # would also save the whole resized embedding, as it does for any resized vocabulary
        model.save_pretrained(out, **({"save_embedding_layers": False} if vocab.rows_in_adapter(model) else {}))


def adapter_loader(adapter_config):
    """How to attach a saved adapter: its adapter_config.json names our method (weights, bottleneck) or PEFT's."""
    peft_type = str(adapter_config.get("peft_type", ""))
    return capability(peft_type, "loader") if peft_type in PEFT_TYPES else "peft"


def load_adapter(model, adapter_dir, adapter_name=None):
    """Attach a saved adapter of any method (inference mode) to its base model; the files are checked first."""
    from utils.run_dir import check_adapter_dir

    config = check_adapter_dir(adapter_dir)
    loader = adapter_loader(config)
    if loader == "weights":
        from safetensors.torch import load_file

        tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
        params = dict(model.named_parameters())
        unknown = [k for k in tensors if k not in params]
        if unknown:
            raise UserError(f"{adapter_dir} holds weight '{unknown[0]}' that the base model lacks; it was trained "
                            "on another base (pass its --model_name_or_path)")
        import torch

        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v.to(params[k].dtype))
    elif loader == "bottleneck":
        from utils.bottleneck import load_bottleneck

        model = load_bottleneck(model, adapter_dir)
    else:
        from peft import PeftModel

        try:
            if isinstance(model, PeftModel) and adapter_name:  # one more adapter on a shared base (server.py)
                model.load_adapter(adapter_dir, adapter_name=adapter_name)
            else:
                model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name or "default")
        except (ValueError, RuntimeError, KeyError) as exc:
            raise UserError(f"the adapter in {adapter_dir} does not fit this base model "
                            f"({str(exc).splitlines()[0][:200]}); load it onto the base model it was trained on") \
                from None
    model.eval()
    return model


def steps_for_run(n_examples, batch_size, grad_accum, epochs, max_steps, world_size=1):
    """Optimizer steps the Trainer will take (AdaLoRA's schedule needs them up front)."""
    if max_steps and max_steps > 0:
        return max_steps
    batches = math.ceil(n_examples / (batch_size * world_size))
    per_epoch = max(1, batches // grad_accum)
    return max(1, math.ceil(per_epoch * epochs))


def methods_table():
    """The README's method table, generated from peft/*.yaml so it cannot drift."""
    rows = ["| peft_type | what it trains | default hyperparameters | mergeable | quantized base | GPU needed |",
            "|---|---|---|---|---|---|"]
    for name in PEFT_TYPES:
        p = load_preset(name)
        defaults = ", ".join(f"{k}={v}" for k, v in (p.get("defaults") or {}).items()) or "-"
        quant = {"4bit": "4-bit NF4 (always)", "optional": "optional (--load_in_4bit / --load_in_8bit)",
                 "none": "no"}[p.get("quantized_base", "optional")]
        rows.append(f"| `{name}` | {p['trains']} | {defaults} | {'yes' if p['mergeable'] else 'no'} | {quant} | "
                    f"{'yes' if p.get('needs_gpu') else 'no'} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(methods_table(), end="")
