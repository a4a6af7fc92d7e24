"""Fine-tuning: data -> model + adapter -> HF Trainer -> adapter dir with everything inference needs.

The output directory holds the adapter, the tokenizer, `template.json` (the exact template used),
`finetune_meta.json` (base model, model_type, peft_type, data, arguments, parameter counts), a loss
curve (`loss.png`) and the final metrics (`metrics.json`).
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from utils import data as data_lib
from utils.errors import UserError
from utils.models import EMBEDDED_ALIAS, get_spec, load_model, load_tokenizer, resolve_model
from utils.peft_methods import (attach_adapter, check_dtype, check_gradient_checkpointing, count_parameters, preset_params, quantization_bits,
                                save_adapter, steps_for_run)
from utils.templates import get_template

META_FILE = "finetune_meta.json"
TEMPLATE_FILE = "template.json"


class PadCollator:
    """Right-pad a batch; padding gets attention 0 and label -100."""

    def __init__(self, pad_token_id):
        self.pad_token_id = pad_token_id

    def __call__(self, batch):
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def prepare_data(data_args, tokenizer, template, seed):
    """Tokenized (train, val) Datasets and a report: per-source counts, dropped rows, split sizes."""
    import datasets

    parts, sources, dropped = [], [], 0
    for ds, stats in data_lib.load_sources(data_args.data, for_training=True, seed=seed):
        tok, n_drop = data_lib.tokenize_dataset(ds, tokenizer, template, data_args.cutoff_len,
                                                data_args.train_on_inputs, data_args.cot_prompt)
        parts.append(tok)
        sources.append(dict(stats, dropped_by_cutoff=n_drop))
        dropped += n_drop
    examples = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(examples) == 0:
        raise UserError(f"every example lost all its answer tokens at --cutoff_len {data_args.cutoff_len}; raise it")
    train, val = data_lib.split(examples, data_args.val_set_size, seed)
    return train, val, {"sources": sources, "dropped_by_cutoff": dropped, "train": len(train), "val": len(val)}


def print_data_report(report, train, tokenizer):
    for s in report["sources"]:
        origin = f" from {s['origin']}" if s.get("origin") not in (None, s["source"]) else ""
        print(f"data: {s['source']}{origin} ({s.get('format')}): {s['rows']} rows, {s['kept']} kept, {s['skipped']} skipped "
              f"(no answer or broken turn order), {s['used']} used, {s['dropped_by_cutoff']} dropped (no answer "
              "token within --cutoff_len)")
    print(f"data: {report['train']} train / {report['val']} validation examples")
    st = data_lib.length_stats(train)
    print(f"data: tokens per example min {st['min']} / p50 {st['p50']} / p90 {st['p90']} / p99 {st['p99']} / "
          f"max {st['max']}; {st['trained_tokens']} of {st['tokens']} tokens are trained")
    ex = train[0]
    print("example (the loss is computed only inside ⟦ ⟧):")
    print(data_lib.render_masked(tokenizer, ex["input_ids"], ex["labels"]))


def _training_arguments(train_args, output_dir, has_val):
    import torch
    from transformers import TrainingArguments

    report_to = [] if train_args.report_to in ("none", "", None) else [train_args.report_to]
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=train_args.per_gpu_train_batch_size,
        per_device_eval_batch_size=train_args.per_gpu_train_batch_size,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        learning_rate=train_args.learning_rate,
        num_train_epochs=train_args.epochs,
        max_steps=train_args.max_steps,
        warmup_steps=train_args.warmup_steps,
        lr_scheduler_type=train_args.lr_scheduler_type,
        weight_decay=train_args.weight_decay,
        logging_steps=train_args.logging_steps,
        logging_first_step=True,
        save_steps=train_args.save_steps,
        save_total_limit=train_args.save_total_limit,
        eval_strategy="steps" if has_val else "no",
        eval_steps=(train_args.eval_steps or train_args.save_steps) if has_val else None,
        seed=train_args.seed,
        report_to=report_to,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if train_args.gradient_checkpointing else {}),
    )


def plot_loss(log_history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Run:
    """Everything a fine-tuning run is made of, before trainer.train() is called."""
    args: tuple
    trainer: object
    model: object
    tokenizer: object
    template: object
    train: list
    val: list
    report: dict
    meta: dict
    output_dir: Path


def build_run(model_args, data_args, peft_args, train_args):
    """Check the arguments, load data, model and method; return a Run (None for --dry_run / --list_data)."""
    if data_args.list_data:
        print(data_lib.registry_table(), end="")
        return None
    # Impossible combinations fail here, before anything is loaded.
    _, method_params = preset_params(peft_args)
    quant_bits = quantization_bits(model_args, peft_args)
    check_dtype(model_args.dtype)
    check_gradient_checkpointing(peft_args.peft_type, train_args.gradient_checkpointing)
    path, _, model_type = resolve_model(model_args.model_name_or_path, model_args.model_type,
                                        model_args.trust_remote_code)
    spec = get_spec(model_type)
    tokenizer = load_tokenizer(path, model_args.trust_remote_code)
    template = get_template(data_args.template or spec.template, tokenizer, data_args.prompt_lang)
    train, val, report = prepare_data(data_args, tokenizer, template, train_args.seed)
    print(f"model: {model_args.model_name_or_path or EMBEDDED_ALIAS} ({model_type}) from {path}; "
          f"template: {template.name}; peft: {peft_args.peft_type}")
    print_data_report(report, train, tokenizer)
    if data_args.dry_run:
        return None

    output_dir = Path(train_args.output_dir or f"saved_models/{model_type}_{peft_args.peft_type}")
    model = load_model(path, model_args.dtype, model_args.trust_remote_code, tokenizer.pad_token_id, quant_bits)
    total_steps = steps_for_run(len(train), train_args.per_gpu_train_batch_size, train_args.gradient_accumulation_steps,
                                train_args.epochs, train_args.max_steps, int(os.environ.get("WORLD_SIZE", 1)))
    model, callbacks = attach_adapter(model, peft_args, spec, total_steps, train_args.gradient_checkpointing)
    trainable, total = count_parameters(model)
    print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)")

    from transformers import Trainer

    trainer = Trainer(model=model, args=_training_arguments(train_args, str(output_dir), bool(val)),
                      train_dataset=train, eval_dataset=val or None,
                      data_collator=PadCollator(tokenizer.pad_token_id), callbacks=callbacks)
    meta = {
        "base_model": model_args.model_name_or_path or EMBEDDED_ALIAS,
        "base_model_resolved": str(path),
        "model_type": model_type,
        "template": template.name,
        "peft_type": peft_args.peft_type,
        "peft_params": method_params,
        "quant_bits": quant_bits,
        "data": data_args.data,
        "trainable_params": trainable,
        "total_params": total,
        "trust_remote_code": model_args.trust_remote_code,
        "dtype": model_args.dtype,
        "arguments": {**asdict(model_args), **asdict(data_args), **asdict(peft_args), **asdict(train_args)},
        "data_report": report,
    }
    return Run((model_args, data_args, peft_args, train_args), trainer, model, tokenizer, template, train, val,
               report, meta, output_dir)


def finish_run(run, result, runtime):
    """Save adapter, tokenizer, template, metadata, metrics and the loss plot into the output dir."""
    trainer, out = run.trainer, run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(run.model, out, run.meta["peft_type"])
    run.tokenizer.save_pretrained(out)
    (out / TEMPLATE_FILE).write_text(run.template.to_json(), encoding="utf-8")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    epochs_done = trainer.state.epoch or 0
    tokens = sum(map(len, run.train["input_ids"])) * epochs_done
    metrics = {"train_loss": result.training_loss, "first_logged_loss": losses[0] if losses else None,
               "last_logged_loss": losses[-1] if losses else None, "global_step": trainer.state.global_step,
               "epochs": epochs_done, "runtime_s": round(runtime, 2),
               "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
               "trainable_params": run.meta["trainable_params"], "total_params": run.meta["total_params"]}
    if run.val:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50))
    meta = dict(run.meta, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (out / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    plot_loss(trainer.state.log_history, out / "loss.png")
    print(f"saved adapter, template and metadata to {out}/; loss {metrics['first_logged_loss']} -> "
          f"{metrics['last_logged_loss']} in {metrics['global_step']} steps, {runtime:.0f} s")
    return metrics


def run_finetune(model_args, data_args, peft_args, train_args):
    run = build_run(model_args, data_args, peft_args, train_args)
    if run is None:
        return None
    start = time.time()
    result = run.trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
    finish_run(run, result, time.time() - start)
    return run.output_dir
