"""Merge a LoRA-family adapter into its base model -> a standalone model directory (safetensors)."""
import shutil
from pathlib import Path

from utils.errors import UserError
from utils.generation import load_for_inference, read_meta
from utils.peft_methods import load_preset
from utils.train import TEMPLATE_FILE


def merge_adapter(lora_dir, merged_dir, model_name_or_path=None, trust_remote_code=False):
    meta = read_meta(lora_dir)
    preset = load_preset(meta["peft_type"])
    if not preset.get("mergeable", False):
        raise UserError(f"--peft_type {meta['peft_type']} adapters cannot be merged into the base weights; load "
                        "them with --lora_dir instead")
    out = Path(merged_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{merged_dir} exists and is not empty; pick a new --merged_dir")
    # The base is always reloaded in full precision for merging (never a quantized base).
    model, tokenizer, template, _ = load_for_inference(lora_dir, model_name_or_path, dtype="float32",
                                                       trust_remote_code=trust_remote_code, keep_quantization=False)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model  # full/freeze: weights already in
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copyfile(Path(lora_dir) / TEMPLATE_FILE, out / TEMPLATE_FILE)
    print(f"merged {lora_dir} into {meta['base_model']} -> {out}/")
    return out
