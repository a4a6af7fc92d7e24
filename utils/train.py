"""Fine-tuning: data -> model + adapter -> HF Trainer -> adapter dir with everything inference needs.

`--stage sft` (the default) is instruction tuning here; `--stage dpo | orpo | kto | simpo` trains on preference
data with TRL's trainers (utils/preference.py); both share the checks, the run directory and finish_run.

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
from utils import vocab
from utils.distributed import check_distributed, full_weights
from utils.errors import UserError
from utils.models import EMBEDDED_ALIAS, get_spec, load_model, load_tokenizer, resolve_model
from utils.peft_methods import (attach_adapter, capability, check_dtype, check_gradient_checkpointing,
                                count_parameters, preset_params, quantization_bits, save_adapter, steps_for_run)
from utils.run_dir import PLOT_FILE, default_run_dir, write_run
from utils.templates import pick_template



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


def prepare_vocab_data(data_args, peft_args, tokenizer, template, seed):
    """prepare_data, with --extend_vocab applied to `tokenizer` first (in place): (train, val, report, VocabPlan or
    None). auto:N learns its tokens from the training rows as the old tokenizer renders them, then the data is
    tokenized again with the new tokens; the plan's savings are measured on the training rows."""
    if not peft_args.extend_vocab:
        return (*prepare_data(data_args, tokenizer, template, seed), None)

    def training_texts():  # auto:N only; called before the tokens are added
        first_train = prepare_data(data_args, tokenizer, template, seed)[0]
        return vocab.texts_of(first_train, tokenizer, vocab.LEARN_ROWS)

    plan = vocab.extend_tokenizer(tokenizer, peft_args.extend_vocab, training_texts, peft_args.new_token_init, seed)
    train, val, report = prepare_data(data_args, tokenizer, template, seed)
    vocab.measure(plan, tokenizer, vocab.texts_of(train, tokenizer, vocab.LEARN_ROWS))  # -> plan.savings
    return train, val, report, plan


def print_data_report(report, train, tokenizer):
    for s in report["sources"]:
        origin = f" from {s['origin']}" if s.get("origin") not in (None, s["source"]) else ""
        print(f"data: {s['source']}{origin} ({s.get('format')}): {s['rows']} rows, {s['kept']} kept, "
              f"{s['skipped']} skipped "
              f"(no answer or broken turn order), {s['used']} used, {s['dropped_by_cutoff']} dropped (no answer "
              "token within --cutoff_len)")
    print(f"data: {report['train']} train / {report['val']} validation examples")
    st = data_lib.length_stats(train)
    print(f"data: tokens per example min {st['min']} / p50 {st['p50']} / p90 {st['p90']} / p99 {st['p99']} / "
          f"max {st['max']}; {st['trained_tokens']} of {st['tokens']} tokens are trained")
    ex = train[0]
    print("example (the loss is computed only inside ⟦ ⟧):")
    print(data_lib.render_masked(tokenizer, ex["input_ids"], ex["labels"]))


BF16_LOSS_TOLERANCE = 0.02  # --bf16 auto keeps fp32 when the first batch's bf16 loss is further off than this


def decide_bf16(flag, cuda=False, cpu_bf16=False, weights_dtype="float32", quantized=False):
    """(autocast in bf16?, why) for --bf16 auto|on|off; `on` where it cannot work is an error, not a fallback."""
    def refuse(why):
        if flag == "on":
            raise UserError(f"--bf16 on: {why}; use --bf16 off (or auto)")
        return False, why

    if flag == "off":
        return False, "--bf16 off"
    if weights_dtype != "float32":
        return refuse(f"the weights are already {weights_dtype} (--dtype)")
    if quantized:
        return refuse("the base is quantized (its layers compute in their own dtype)")
    if cuda:
        import torch

        if flag == "on" and torch.cuda.is_bf16_supported():
            return True, "--bf16 on"
        return refuse("this GPU does not support bfloat16" if flag == "on" else
                      "on a GPU, --dtype auto already loads half-precision weights")
    if not cpu_bf16:
        return refuse("this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
    return True, "--bf16 on" if flag == "on" else "the CPU has native bfloat16 (AVX512-BF16 / AMX)"


def decide_micro_batch(flag, batch, cuda=False):
    """(samples per forward/backward pass, why) for --micro_batch_size auto|N and a per-device batch."""
    if flag != "auto":
        try:
            micro = int(flag)
        except ValueError:
            micro = 0
        if micro < 1 or batch % micro:
            raise UserError(f"--micro_batch_size {flag} must be auto or a positive divisor of "
                            f"--per_gpu_train_batch_size {batch}; use auto or one of "
                            f"{', '.join(str(d) for d in range(1, batch + 1) if batch % d == 0)}")
        return micro, f"--micro_batch_size {micro}"
    if cuda:
        return batch, "the whole batch per pass on a GPU"
    micro = batch
    while micro > 4 and micro % 2 == 0:
        micro //= 2
    return micro, "on CPU at most 4 samples per pass where the batch halves evenly (caps activation memory)"


def speed_plan(model, train, data_args, train_args, peft_type, pad_token_id, quant_bits):
    """Choose and verify the fast paths: packing (else length grouping), selective logits, bf16 autocast.

    Returns (plan dict for the metadata, collator, train dataset: with a `length` column when grouping,
    undo: callables that put the model back as it was, run after training).
    """
    import torch

    from utils import packing
    from utils.peft_methods import cpu_has_bf16

    plan, why, undo = {}, {}, []
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    plan["bf16"], why["bf16"] = decide_bf16(train_args.bf16, torch.cuda.is_available(), cpu_has_bf16(),
                                            str(dtype).replace("torch.", ""), bool(quant_bits))
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = hf_model.config
    plan["attention"] = getattr(config, "_attn_implementation", None)
    if plan["bf16"] and not torch.cuda.is_available() and plan["attention"] == "sdpa":
        # measured on this AVX512-BF16 CPU: sdpa's CPU flash kernel is slower in bf16 than in fp32, so under
        # autocast the attention runs in fp32 with grouped-query heads (+6% per step; packing._sdpa_fp32)
        fast = packing.register_fp32_sdpa()
        hf_model.set_attn_implementation(fast)
        if config._attn_implementation == fast:
            plan["attention"] = fast
            undo.append(lambda: hf_model.set_attn_implementation("sdpa"))
    plan["packing"], why["packing"] = _packing_check(model, data_args.packing, peft_type)
    coef = packing.attention_cost_per_position(config)

    def make_collator():
        return (packing.PackingCollator(pad_token_id, data_args.cutoff_len, coef) if plan["packing"]
                else PadCollator(pad_token_id))

    plan["selective_loss"], why["selective"] = False, f"{peft_type} keeps the model's own loss"
    if capability(peft_type, "selective_loss"):
        plan["selective_loss"], why["selective"] = packing.check_selective_loss(model)
    if plan["bf16"] and train_args.bf16 == "auto" and not _bf16_probe(model, train, make_collator(), plan, why):
        while undo:  # back to the model's own attention, and check packing again with it
            undo.pop()()
        plan["attention"] = config._attn_implementation
        plan["packing"], why["packing"] = _packing_check(model, data_args.packing, peft_type)
    group, auto_group = data_args.group_by_length, not plan["packing"] and data_args.packing == "auto"
    plan["group_by_length"] = bool(group) if group is not None else auto_group
    if plan["group_by_length"] and "length" not in train.column_names:
        import pyarrow.compute as pc

        train = train.add_column("length", pc.list_value_length(train.with_format("arrow")[:]["input_ids"]).to_pylist())
    plan["micro_batch"], why["micro"] = decide_micro_batch(train_args.micro_batch_size,
                                                           train_args.per_gpu_train_batch_size,
                                                           torch.cuda.is_available())
    plan["summary"] = _speed_summary(plan, why, data_args.cutoff_len, train_args.per_gpu_train_batch_size,
                                     bool(undo))
    return plan, make_collator(), train, undo


def _packing_check(model, packing_flag, peft_type):
    """(packing on?, why): --packing off / auto / on against the method's capability and the model's attention."""
    from utils import packing

    if packing_flag == "off":
        return False, "--packing off"
    if not capability(peft_type, "packing"):
        if packing_flag == "on":
            raise UserError(f"--packing on cannot be used with --peft_type {peft_type}: its virtual tokens / "
                            "key-value prefix own the positions and the attention mask; use --packing off")
        return False, f"{peft_type} prepends virtual tokens"
    ok, why = packing.check_packing(model)
    if not ok and packing_flag == "on":
        raise UserError(f"--packing on: this model's attention does not keep packed samples apart ({why}); "
                        "use --packing off")
    return ok, why


def _bf16_probe(model, train, collator, plan, why):
    """--bf16 auto: the first batch's loss in bf16 against fp32; False (and bf16 off, with the reason) when they are
    further apart than BF16_LOSS_TOLERANCE."""
    from utils import packing

    probe = collator([train[i] for i in range(min(len(train), 4))])
    fp32, bf16 = packing.batch_loss(model, probe), packing.batch_loss(model, probe, bf16=True)
    gap = abs(bf16 - fp32) / max(abs(fp32), 1e-6)
    plan["bf16_check"] = {"fp32_loss": round(fp32, 5), "bf16_loss": round(bf16, 5), "relative_gap": round(gap, 5)}
    if gap > BF16_LOSS_TOLERANCE:
        plan["bf16"], why["bf16"] = False, (f"first-batch loss {bf16:.4f} in bf16 vs {fp32:.4f} in fp32 is "
                                            f"{100 * gap:.1f}% apart (> {100 * BF16_LOSS_TOLERANCE:.0f}%)")
        return False
    why["bf16"] += f"; first-batch loss {bf16:.4f} vs {fp32:.4f} in fp32 ({100 * gap:.2f}% apart)"
    return True


def _speed_summary(plan, why, cutoff_len, batch, attention_swapped):
    """The one line the run prints (and the metadata keeps) about the fast paths chosen and why."""
    notes = [f"packing on (each batch's samples in rows of <= {cutoff_len} tokens, per-sample position_ids; "
             f"isolation checked: {why['packing']})" if plan["packing"] else f"packing off ({why['packing']})"]
    if plan["group_by_length"]:
        notes.append("length-grouped batches")
    notes.append("logits only at trained positions" if plan["selective_loss"] else f"full logits ({why['selective']})")
    notes.append(f"bf16 autocast {'on' if plan['bf16'] else 'off'} ({why['bf16']})")
    if plan["bf16"] and plan["attention"] != "sdpa" and attention_swapped:
        notes.append(f"attention: {plan['attention']} while training (sdpa's bf16 CPU kernel is slower)")
    if plan["micro_batch"] < batch:
        notes.append(f"each batch of {batch} runs as passes of {plan['micro_batch']} samples with summed gradients "
                     f"({why['micro']})")
    return "; ".join(notes)


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process():
    return int(os.environ.get("RANK", 0)) == 0


def _report_to(name):
    """Experiment trackers for the Trainer; wandb runs offline when no API key is configured."""
    if name in ("none", "", None):
        return []
    names = ["tensorboard", "wandb"] if name == "all" else [name]
    import importlib.util

    for n in names:
        pkg = "tensorboard" if n == "tensorboard" else "wandb"
        if importlib.util.find_spec(pkg) is None:
            raise UserError(f"--report_to {n} needs the {pkg} package; run `pip install {pkg}` or use --report_to none")
    if "wandb" in names and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        netrc = Path.home() / ".netrc"
        if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            os.environ["WANDB_MODE"] = "offline"
            print("wandb: no API key configured, logging offline (upload later with `wandb sync`)")
    return names


def _training_arguments(train_args, output_dir, has_val, speed=None, config_class=None, stage_kwargs=None):
    """TrainingArguments of a run; a preference stage passes its TRL config class and fields (beta, ...)."""
    import torch
    from transformers import TrainingArguments

    config_class = config_class or TrainingArguments
    extra = dict(stage_kwargs or {})
    if config_class is not TrainingArguments:  # TRL configs default to bf16 and gradient checkpointing on
        from dataclasses import fields

        names = {f.name for f in fields(config_class)}  # transformers 5.2x: gradient_ -> activation_checkpointing
        checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        extra.update({"bf16": bool(speed and speed.get("bf16")), checkpointing: train_args.gradient_checkpointing})
    if speed and speed.get("bf16"):
        extra["bf16"] = True  # autocast: fp32 weights, bf16 matmuls (on CPU through accelerate)
    if speed and speed.get("group_by_length"):
        extra.update(train_sampling_strategy="group_by_length", length_column_name="length")
    if train_args.gradient_checkpointing:
        extra.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if world_size() > 1 and not torch.cuda.is_available():
        extra["ddp_backend"] = "gloo"  # CPU processes talk over gloo (set only when distributed)
    if train_args.deepspeed:
        extra["deepspeed"] = train_args.deepspeed
    if train_args.fsdp or train_args.fsdp_config:
        extra.update(fsdp=True, fsdp_config=train_args.fsdp_config)
    batch = train_args.per_gpu_train_batch_size
    micro = (speed or {}).get("micro_batch") or batch  # passes of `micro` samples, gradients summed over the batch
    try:
        return config_class(
            output_dir=output_dir,
            per_device_train_batch_size=micro,
            per_device_eval_batch_size=micro,
            gradient_accumulation_steps=train_args.gradient_accumulation_steps * (batch // micro),
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
            report_to=_report_to(train_args.report_to),
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=torch.cuda.is_available(),
            include_num_input_tokens_seen="non_padding",
            **extra,
        )
    except ImportError as exc:  # e.g. --deepspeed without the deepspeed package
        raise UserError(f"{str(exc).splitlines()[0]}; install it or drop the option") from None


def plot_curves(log_history, path):
    """loss (train, validation), learning rate and gradient norm against the step, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(h["step"], h[k]) for h in log_history if k in h] for k in ("loss", "eval_loss", "learning_rate",
                                                                              "grad_norm")}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, keys, title in zip(axes, (("loss", "eval_loss"), ("learning_rate",), ("grad_norm",)),
                               ("loss", "learning rate", "gradient norm")):
        for k in keys:
            if series[k]:
                ax.plot(*zip(*series[k]), "o-" if k == "eval_loss" else "-",
                        label={"loss": "train", "eval_loss": "validation"}.get(k, k), markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_engines(train_args):
    """--deepspeed / --fsdp_config: the files exist and DeepSpeed is installed, before anything is loaded."""
    import importlib.util

    for flag in ("deepspeed", "fsdp_config"):
        value = getattr(train_args, flag)
        if value and not Path(value).is_file():
            raise UserError(f"--{flag} {value} does not exist; pass a JSON config such as configs/ds_zero2.json")
    if train_args.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError("--deepspeed needs the deepspeed package; run `pip install -r requirements-dist.txt` "
                        "or drop it")


RESUME_LATEST = ("latest", "true", "last")
RESUME_IF_EXISTS = "if_exists"


def resolve_resume(value, output_dir, say=print):
    """--resume_from_checkpoint: 'latest' -> the newest complete checkpoint (an error when there is none),
    'if_exists' -> that checkpoint or None (start fresh), a path -> itself."""
    from utils.trainer import latest_checkpoint

    if value is None:
        return None
    if value.lower() in RESUME_LATEST + (RESUME_IF_EXISTS,):
        found = latest_checkpoint(output_dir, say=say)
        if found is None and value.lower() != RESUME_IF_EXISTS:
            raise UserError(f"--resume_from_checkpoint: {output_dir} holds no complete checkpoint to resume from; "
                            "drop the flag to start fresh, or pass --resume_from_checkpoint if_exists (resume when "
                            "there is one, else start fresh)")
        if found is None:
            say(f"resume: no complete checkpoint in {output_dir} yet; starting from the beginning (if_exists)")
        return found
    if not (Path(value) / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {value} is not a complete checkpoint directory; pass a "
                        "checkpoint-N folder or the flag alone to take the latest in --output_dir")
    return value


def check_output_dir(value, model_type, peft_type):
    """--output_dir (or its default) can be a run directory: not a file, not inside a file, writable."""
    out = Path(value) if value else default_run_dir(model_type, peft_type)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"--output_dir {out}: {p} is a file, not a directory; pass a directory for the run")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {out}: {existing} is not writable; pass a directory you can write to")
    return out


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
    resume: str = None  # the checkpoint to resume from, if any
    before_save: object = None  # called with the Run before the adapter is saved (preference stages)


@dataclass
class Setup:
    """What every stage resolves before loading data: the checked method, model, tokenizer, template, output dir."""
    model_args: object
    path: Path
    model_type: str
    spec: object
    output_dir: Path
    tokenizer: object
    template: object
    quant_bits: int
    method_params: dict
    peft_type: str
    vocab_mechanism: str = None  # --extend_vocab: how the method trains the new rows (utils/vocab.py MECHANISMS)

    def describe(self):
        return (f"{self.model_args.model_name_or_path or EMBEDDED_ALIAS} ({self.model_type}) from {self.path}; "
                f"template: {self.template.name}; peft: {self.peft_type}")


def setup_run(model_args, data_args, peft_args, train_args, template=None):
    """Impossible combinations fail here, before anything is loaded; then the tokenizer and the template
    (`template` given: that one, e.g. the template of --ref_adapter's run)."""
    _, method_params = preset_params(peft_args)
    quant_bits = quantization_bits(model_args, peft_args)
    check_dtype(model_args.dtype)
    check_gradient_checkpointing(peft_args.peft_type, train_args.gradient_checkpointing)
    check_engines(train_args)
    check_distributed(model_args, peft_args, train_args, quant_bits)
    mechanism = vocab.check_request(peft_args.peft_type, peft_args.extend_vocab, peft_args.new_token_init,
                                    train_args.stage, train_args.weight_decay,
                                    engine="fsdp" if (train_args.fsdp or train_args.fsdp_config) else
                                    "deepspeed" if train_args.deepspeed else None)
    check_ref_vocab(train_args)
    decide_micro_batch(train_args.micro_batch_size, train_args.per_gpu_train_batch_size)
    path, _, model_type = resolve_model(model_args.model_name_or_path, model_args.model_type,
                                        model_args.trust_remote_code)
    spec = get_spec(model_type)
    output_dir = check_output_dir(train_args.output_dir, model_type, peft_args.peft_type)
    tokenizer = load_tokenizer(path, model_args.trust_remote_code)
    template = template or pick_template(data_args.template, spec.template, tokenizer, data_args.prompt_lang)
    return Setup(model_args, path, model_type, spec, output_dir, tokenizer, template, quant_bits, method_params,
                 peft_args.peft_type, mechanism)


def check_ref_vocab(train_args):
    """--ref_adapter of a run that extended its vocabulary: its base is a resized model (one sentence)."""
    ref = getattr(train_args, "ref_adapter", None)
    if not ref or not (Path(ref) / "finetune_meta.json").is_file():
        return  # a missing or damaged run is reported where it is opened
    from utils.run_dir import read_meta

    if vocab.extends(read_meta(ref)):
        raise UserError(f"--ref_adapter {ref} extended the vocabulary (--extend_vocab), so it does not fit the base "
                        f"model; merge it first (merge.py --lora_dir {ref} --merged_dir DIR) and pass "
                        "--model_name_or_path DIR instead")


def run_meta(setup, model_args, data_args, peft_args, train_args, trainable, total, report, global_batch, speed):
    """finetune_meta.json of a run (every stage)."""
    return {
        "base_model": model_args.model_name_or_path or EMBEDDED_ALIAS,
        "base_model_resolved": str(setup.path),
        "model_type": setup.model_type,
        "template": setup.template.name,
        "peft_type": peft_args.peft_type,
        "peft_params": setup.method_params,
        "quant_bits": setup.quant_bits,
        "data": data_args.data,
        "trainable_params": trainable,
        "total_params": total,
        "trust_remote_code": model_args.trust_remote_code,
        "dtype": model_args.dtype,
        "stage": train_args.stage,
        "arguments": {**asdict(model_args), **asdict(data_args), **asdict(peft_args), **asdict(train_args)},
        "data_report": report,
        "global_batch": global_batch,
        "world_size": world_size(),
        "speed": speed,
    }


def build_run(model_args, data_args, peft_args, train_args):
    """Check the arguments, load data, model and method; return a Run (None for --dry_run / --list_data)."""
    if data_args.list_data:
        print(data_lib.registry_table(), end="")
        return None
    if train_args.stage != "sft":  # dpo / orpo / kto / simpo: TRL's trainers on preference data
        from utils.preference import build_preference_run

        return build_preference_run(model_args, data_args, peft_args, train_args)
    from utils.preference import check_sft_data, check_sft_flags

    check_sft_flags(train_args)
    check_sft_data(data_args.data)
    setup = setup_run(model_args, data_args, peft_args, train_args)
    path, spec, tokenizer, template = setup.path, setup.spec, setup.tokenizer, setup.template
    output_dir, quant_bits = setup.output_dir, setup.quant_bits
    train, val, report, vocab_plan = prepare_vocab_data(data_args, peft_args, tokenizer, template, train_args.seed)
    main = is_main_process()  # under torchrun only rank 0 prints and writes files
    if main:
        print(f"model: {setup.describe()}")
        if vocab_plan is not None:
            print(vocab.describe(vocab_plan))
            print(f"vocab: {vocab.MECHANISMS[setup.vocab_mechanism]}")
        print_data_report(report, train, tokenizer)
    if data_args.dry_run:
        return None

    resume = resolve_resume(train_args.resume_from_checkpoint, output_dir, say=print if main else (lambda *a: None))
    model = load_model(path, model_args.dtype, model_args.trust_remote_code, tokenizer.pad_token_id, quant_bits)
    if vocab_plan is not None:  # resized and initialised before the method wraps any module
        vocab.resize_and_init(model, vocab_plan)
    total_steps = steps_for_run(len(train), train_args.per_gpu_train_batch_size, train_args.gradient_accumulation_steps,
                                train_args.epochs, train_args.max_steps, world_size())
    from transformers import set_seed

    set_seed(train_args.seed)  # adapter init (e.g. LoRA A) depends on --seed alone: runs are reproducible
    model, callbacks = attach_adapter(model, peft_args, spec, total_steps, train_args.gradient_checkpointing,
                                      vocab_plan)
    trainable, total, global_batch = report_scale(model, train_args, total_steps)

    from utils.packing import FastTrainer

    speed, collator, train, undo = speed_plan(model, train, data_args, train_args, peft_args.peft_type,
                                              tokenizer.pad_token_id, quant_bits)
    if main:
        print(f"speed: {speed['summary']}")
    trainer = FastTrainer(model=model, args=_training_arguments(train_args, str(output_dir), bool(val), speed),
                          train_dataset=train, eval_dataset=val or None, data_collator=collator, callbacks=callbacks)
    trainer.selective, trainer.after_train = speed["selective_loss"], undo
    add_throughput(trainer)
    meta = run_meta(setup, model_args, data_args, peft_args, train_args, trainable, total, report, global_batch, speed)
    if vocab_plan is not None:
        vocab.check_ranks(vocab_plan)  # under torchrun every process must have added the same tokens
        meta[vocab.META_KEY] = vocab_plan.to_meta()
    return Run((model_args, data_args, peft_args, train_args), trainer, model, tokenizer, template, train, val,
               report, meta, output_dir, resume)


def report_scale(model, train_args, total_steps):
    """(trainable parameters, all parameters, global batch), printed by rank 0 as every stage does."""
    trainable, total = count_parameters(model)
    global_batch = train_args.per_gpu_train_batch_size * train_args.gradient_accumulation_steps * world_size()
    if is_main_process():
        print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)")
        print(f"batch: global {global_batch} = {train_args.per_gpu_train_batch_size} per device x "
              f"{train_args.gradient_accumulation_steps} accumulation x {world_size()} processes; {total_steps} "
              "optimizer steps")
    return trainable, total, global_batch


def add_throughput(trainer):
    """The tokens/s callback (utils/trainer.py) on a Trainer of any stage; finish_run reads trainer.throughput."""
    from utils.trainer import ThroughputCallback

    trainer.throughput = ThroughputCallback(trainer.callback_handler)
    trainer.add_callback(trainer.throughput)


def finish_run(run, result, runtime):
    """Save adapter, tokenizer, template, metadata, metrics and the curves plot (rank 0 only)."""
    trainer, out = run.trainer, run.output_dir
    if run.val:
        evaluation = trainer.evaluate()  # every rank takes part in evaluation
        eval_loss = evaluation["eval_loss"]
    main = trainer.is_world_process_zero()
    if main and run.before_save is not None:
        run.before_save(run)
    with full_weights(run.model):  # every rank: ZeRO-3 / FSDP shards are gathered collectively
        if main:
            out.mkdir(parents=True, exist_ok=True)
            save_adapter(run.model, out, run.meta["peft_type"])
    if not main:
        return None
    run.tokenizer.save_pretrained(out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {"train_loss": result.training_loss, "first_logged_loss": losses[0] if losses else None,
               "last_logged_loss": losses[-1] if losses else None, "global_step": trainer.state.global_step,
               "epochs": trainer.state.epoch or 0, "runtime_s": round(runtime, 2),
               "tokens_seen": trainer.state.num_input_tokens_seen,
               "tokens_per_s": round(trainer.throughput.rate(trainer.state), 1) if trainer.throughput else None,
               "global_batch": run.meta["global_batch"],
               "trainable_params": run.meta["trainable_params"], "total_params": run.meta["total_params"]}
    if run.val:
        metrics["eval_loss"] = eval_loss
        if run.meta.get("stage", "sft") == "sft":
            metrics["eval_perplexity"] = math.exp(min(eval_loss, 50))
    if run.meta.get("stage", "sft") != "sft":
        from utils.preference import final_metrics

        metrics.update(final_metrics(trainer.state.log_history, evaluation if run.val else None))
    write_run(out, run.meta, run.template, metrics, trainer.state.log_history)
    plot_curves(trainer.state.log_history, out / PLOT_FILE)
    print(f"saved adapter, template and metadata to {out}/; loss {metrics['first_logged_loss']} -> "
          f"{metrics['last_logged_loss']} in {metrics['global_step']} steps, {runtime:.0f} s")
    return metrics


def run_finetune(model_args, data_args, peft_args, train_args):
    run = build_run(model_args, data_args, peft_args, train_args)
    if run is None:
        return None
    resume = run.resume
    if resume and is_main_process():
        step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
        print(f"resuming from {resume} (step {step})")
    start = time.time()
    result = run.trainer.train(resume_from_checkpoint=resume)
    finish_run(run, result, time.time() - start)
    return run.output_dir
