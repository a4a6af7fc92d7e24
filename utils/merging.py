"""Merge a LoRA-family adapter into its base model -> a standalone model directory (safetensors).

A run with --extend_vocab merges into its resized base: the model written has the new tokens' trained rows in its
embedding (and LM head) and the extended tokenizer, so plain transformers loads it as any other model.
"""
import shutil
from pathlib import Path

from utils import vocab
from utils.errors import UserError
from utils.peft_methods import capability
from utils.run_dir import TEMPLATE_FILE


def check_merge(lora_dir, merged_dir, model_args=None):
    """Everything that can fail before the base model loads."""
    from utils.loader import check_inference_args, open_run

    run = open_run(lora_dir)
    if not capability(run.peft_type, "mergeable"):
        raise UserError(f"--peft_type {run.peft_type} adapters cannot be merged into the base weights; load "
                        "them with --lora_dir instead")
    out = Path(merged_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{merged_dir} exists and is not an empty directory; pick a new --merged_dir")
    if model_args is not None:
        check_inference_args(model_args, lora_dir, keep_quantization=False)
    return run


def merge_adapter(lora_dir, merged_dir, model_name_or_path=None, trust_remote_code=False, model_args=None):
    from utils.loader import check_size, load_for_inference

    run = check_merge(lora_dir, merged_dir, model_args)
    out = Path(merged_dir)
    # The base is always reloaded in full precision for merging (never a quantized base).
    model, tokenizer, template, info = load_for_inference(lora_dir, model_name_or_path, dtype="float32",
                                                          trust_remote_code=trust_remote_code, keep_quantization=False)
    check_size(getattr(model_args, "size", None), info)
    # full / freeze: the trained weights are already in the model
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    plan = vocab.VocabPlan.from_meta(run.meta)
    if plan is not None:  # --extend_vocab: the resized embeddings (new rows trained) and the extended tokenizer
        vocab.check_merged(merged, tokenizer, plan)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copyfile(Path(lora_dir) / TEMPLATE_FILE, out / TEMPLATE_FILE)
    print(f"merged {lora_dir} into {run.meta['base_model']} -> {out}/")
    if plan is not None:
        print(f"vocabulary: {len(tokenizer):,} tokens ({len(plan.tokens)} added by --extend_vocab), "
              f"{plan.rows:,} embedding rows")
    return out
