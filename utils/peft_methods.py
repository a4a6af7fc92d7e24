"""The PEFT method catalog: peft/<name>.yaml presets -> adapters on a model.

Presets are data (never .py files in peft/, which would shadow the upstream `peft` package). Upstream
`peft` builds everything it has; this module maps our flags onto its configs, attaches adapters for
training and loads them back for inference. One `load_adapter(...)` is used by every script.
"""
from pathlib import Path

import yaml

from utils.errors import UserError

PRESET_DIR = Path(__file__).resolve().parents[1] / "peft"
PEFT_TYPES = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(peft_type):
    path = PRESET_DIR / f"{peft_type}.yaml"
    if peft_type not in PEFT_TYPES or not path.is_file():
        raise UserError(f"unknown --peft_type '{peft_type}'; valid types are: {', '.join(PEFT_TYPES)}")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def linear_module_names(model):
    """Leaf names of the Linear layers inside the transformer blocks (not the LM head)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in full:
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model, requested, spec):
    """Target module names: the flag's, else the model type's; each must exist in the model."""
    available = linear_module_names(model)
    targets = list(requested) if requested else list(spec.lora_targets)
    if targets == ["auto"]:
        attn = [n for n in available if n in ("q_proj", "v_proj", "query_key_value", "c_attn", "W_pack", "qkv_proj")]
        targets = attn or available
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(f"target module '{missing[0]}' is not in this model; its linear layers are: "
                        f"{', '.join(available)} (pass them with --lora_target_modules)")
    return targets


def build_peft_config(peft_args, model, spec):
    from peft import LoraConfig, TaskType

    preset = load_preset(peft_args.peft_type)
    params = dict(preset.get("defaults", {}))
    for flag, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        if getattr(peft_args, flag) is not None:
            params[key] = getattr(peft_args, flag)
    params["target_modules"] = resolve_targets(model, peft_args.lora_target_modules, spec)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, **params)


def attach_adapter(model, peft_args, spec):
    """Wrap model for training with the method of --peft_type; returns the trainable model."""
    from peft import get_peft_model

    config = build_peft_config(peft_args, model, spec)
    return get_peft_model(model, config)


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_adapter(model, adapter_dir):
    """Attach a saved adapter (inference mode) to its base model."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} has no adapter_config.json; pass the --output_dir of a finished "
                        "uniform_finetune.py run")
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model
