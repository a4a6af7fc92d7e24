"""Command-line arguments of every script, as dataclasses parsed by HfArgumentParser.

Flags keep the names of the Alpaca-CoT README (`--model_type`, `--data`, `--lora_r`,
`--per_gpu_train_batch_size`, `--epochs`, ...) so its commands keep working. Any script also takes a
YAML/JSON config file (`script.py config.yaml` or `--config config.yaml`); flags given on the command
line override the file. Unknown flags and unknown config keys are errors, never silently ignored.
"""
import argparse
import difflib
import json
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml

from utils.errors import UserError
from utils.models import EMBEDDED_ALIAS, MODEL_TYPES
from utils.peft_methods import PEFT_TYPES

DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # the seed's --compute_dtype values


def opt(default=None, help="", *, factory=None, **extra):
    """A flag: its default, its help text and optional checks (min / gt / max / lt / choices / aliases / example)."""
    meta = {"help": help, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelArguments:
    model_type: Optional[str] = field(
        default=None,
        metadata={"help": f"Model family: one of {', '.join(MODEL_TYPES)}. Inferred from the "
                          "checkpoint's config when omitted."})
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": f"Hub id or local directory of the base model. Default: the embedded "
                          f"SmolLM2-135M-Instruct ('{EMBEDDED_ALIAS}'), which needs no network."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow the checkpoint's own Python code to run (off by default)."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (fp32 on CPU, bf16/fp16 on GPU), float32, bfloat16, float16 (also "
                          "fp32, bf16, fp16; --compute_dtype is the Alpaca-CoT name of this flag).",
                  "choices": ["auto", "float32", "bfloat16", "float16", *DTYPE_ALIASES],
                  "aliases": ["--compute_dtype"]})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the frozen base in 8-bit (bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the frozen base in 4-bit NF4 (bitsandbytes); "
                                                                 "--peft_type qlora implies it."})
    size: Optional[str] = field(
        default=None, metadata={"help": "Alpaca-CoT's model size flag (e.g. 7b), accepted so its commands keep "
                                        "working; the checkpoint itself comes from --model_name_or_path or the run."})


@dataclass
class DataArguments:
    data: list[str] = field(
        default_factory=lambda: ["arith_sample"],
        metadata={"help": "One or more SOURCE[@FORMAT][:N] values: dataset or mix names from data/registry.yaml, "
                          "files (.json .jsonl .csv .parquet .json.gz), directories or hub dataset ids; :N samples "
                          "N rows (:0.3 a fraction). Default: the bundled arith_sample."})
    cutoff_len: int = field(
        default=256, metadata={"min": 8, "example": 256, "help": "Maximum tokens per training example."})
    val_set_size: float = field(
        default=0, metadata={"min": 0, "help": "Held-out rows for validation: a count (>= 1) or a fraction (< 1)."})
    template: Optional[str] = field(
        default=None,
        metadata={"help": "Prompt template (alpaca, vicuna, chatml, chat = the tokenizer's own chat "
                          "template). Default: the model type's template."})
    prompt_lang: str = field(
        default="en", metadata={"help": "Language of the template's fixed wording: en or zh (Chinese prompts).",
                                "choices": ["en", "zh"]})
    cot_prompt: bool = field(
        default=False, metadata={"help": "CoT*: append a think-first sentence (\"Let's think step by step.\" / "
                                         "\"先思考，再决定。\") to every instruction."})
    list_data: bool = field(default=False, metadata={"help": "Print the dataset registry and exit."})
    train_on_inputs: bool = field(
        default=False, metadata={"help": "Also compute the loss on prompt tokens (default: response only)."})
    dry_run: bool = field(
        default=False,
        metadata={"help": "Load and convert the data, print statistics and one rendered example with the "
                          "trained span marked, then exit."})
    packing: str = field(
        default="auto",
        metadata={"help": "Pack each batch's samples into rows of up to --cutoff_len tokens with per-sample position "
                          "ids (no padding between samples, no attention across them): auto (on when a check shows the "
                          "model keeps packed samples apart; not for prefix/p_tuning/prompt), on, off.",
                  "choices": ["auto", "on", "off"]})
    group_by_length: Optional[bool] = field(
        default=None,
        metadata={"help": "Batch samples of similar length together (less padding). Default: on only when --packing "
                          "auto finds packing unavailable."})


@dataclass
class PeftArguments:
    peft_type: str = field(
        default="lora", metadata={"help": f"Parameter-efficient method: one of {', '.join(PEFT_TYPES)}."})
    lora_r: Optional[int] = field(
        default=None, metadata={"min": 1, "example": 8, "help": "LoRA rank (preset default: 8)."})
    lora_alpha: Optional[float] = field(
        default=None, metadata={"gt": 0, "example": 16, "help": "LoRA alpha (preset default: 16)."})
    lora_dropout: Optional[float] = field(
        default=None, metadata={"min": 0, "lt": 1, "example": 0.05, "help": "LoRA dropout (preset default: 0.05)."})
    lora_target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Module names to adapt (LoRA family, IA3, bottleneck adapters). "
                                        "Default: the model type's targets."})
    num_virtual_tokens: Optional[int] = field(
        default=None, metadata={"min": 1, "example": 20, "help": "Virtual tokens of prefix / p_tuning / prompt "
                                                                 "(preset default: 20)."})
    bottleneck_size: Optional[int] = field(
        default=None, metadata={"min": 1, "example": 64, "help": "Hidden size of sadapter_h / sadapter_p / p_adapter "
                                                                 "(preset default: 64)."})
    adapter_non_linearity: Optional[str] = field(
        default=None, metadata={"help": "Bottleneck activation: relu, gelu, silu or tanh."})
    adapter_dropout: Optional[float] = field(
        default=None, metadata={"min": 0, "lt": 1, "example": 0.1, "help": "Dropout inside bottleneck adapters."})
    adapter_scaling: Optional[str] = field(
        default=None, metadata={"help": "Bottleneck output scale: a number, or 'learned' for a trained scalar."})
    num_trainable_layers: Optional[int] = field(
        default=None, metadata={"min": 1, "example": 2, "help": "freeze: train only the last N transformer layers "
                                                                "(preset default: 2)."})
    peft_options: Optional[list[str]] = field(
        default=None, metadata={"help": "Any other setting of the method's config as key=value "
                                        "(e.g. init_r=16 tinit=0.2 for adalora)."})
    extend_vocab: Optional[str] = field(
        default=None, metadata={"example": "auto:500",
                                "help": "Add tokens to the vocabulary and train their embedding rows besides the "
                                        "method: a UTF-8 file with one new token per line, or auto:N to learn the N "
                                        "Chinese characters / words that save the most tokens on the training data; "
                                        "the tokenizer is saved with the adapter (sft stage; not with prefix, "
                                        "p_tuning, prompt or the bottleneck adapters)."})
    new_token_init: str = field(
        default="mean", metadata={"help": "How the new rows start: mean (the mean of the rows of the pieces the old "
                                          "tokenizer splits the token into) or random (seeded normal noise at the "
                                          "old rows' scale).", "choices": ["mean", "random"]})


@dataclass
class TrainArguments:
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Where the adapter, metadata, plot and metrics go. "
                                        "Default: saved_models/<model_type>_<peft_type>."})
    per_gpu_train_batch_size: int = field(
        default=4, metadata={"min": 1, "example": 4, "help": "Batch size per device."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"min": 1, "example": 4, "help": "Batches per optimizer step."})
    micro_batch_size: str = field(
        default="auto",
        metadata={"help": "Samples per forward/backward pass: a batch runs as passes of this many samples whose "
                          "gradients add up to the whole batch's (same loss, same steps, less activation memory). "
                          "auto: on CPU, halve the batch while it is even and over 4; on GPU, the whole batch."})
    learning_rate: float = field(
        default=3e-4, metadata={"gt": 0, "max": 10, "example": "3e-4", "help": "Peak learning rate."})
    epochs: float = field(default=3, metadata={"help": "Training epochs (ignored when --max_steps > 0)."})
    max_steps: int = field(
        default=-1, metadata={"min": -1, "example": 100, "help": "Stop after this many optimizer steps (-1: use "
                                                                 "--epochs)."})
    warmup_steps: int = field(default=0, metadata={"min": 0, "example": 10, "help": "Linear warm-up steps."})
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "HF scheduler name (linear, cosine, constant, ...)."})
    weight_decay: float = field(default=0.0, metadata={"min": 0, "example": 0.01, "help": "AdamW weight decay."})
    logging_steps: int = field(default=10, metadata={"min": 1, "example": 10, "help": "Log the loss every N steps."})
    save_steps: int = field(
        default=200, metadata={"min": 1, "example": 200, "help": "Save a checkpoint every N steps."})
    save_total_limit: int = field(default=3, metadata={"min": 1, "example": 3, "help": "Keep at most N checkpoints."})
    eval_steps: Optional[int] = field(
        default=None, metadata={"min": 1, "example": 100, "help": "Evaluate every N steps (default: --save_steps)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    bf16: str = field(
        default="auto",
        metadata={"help": "bf16 autocast over fp32 weights: auto (on a CPU with AVX512-BF16/AMX when the first batch's "
                          "loss is within 2 percent of fp32), on, off (fp32).", "choices": ["auto", "on", "off"]})
    seed: int = field(default=42, metadata={"help": "Random seed (data order, init, split)."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "Resume from this checkpoint directory; with no value (or 'latest'), from the "
                                        "newest complete checkpoint in --output_dir (an error when there is none); "
                                        "'if_exists': resume when a complete checkpoint exists, else start fresh "
                                        "(for preemptible jobs)."})
    report_to: str = field(default="none", metadata={"help": "Experiment tracking: none, tensorboard, wandb (offline "
                                                             "when no API key is set) or all.",
                                                     "choices": ["none", "tensorboard", "wandb", "all"]})
    deepspeed: Optional[str] = field(
        default=None, metadata={"help": "DeepSpeed JSON config (e.g. configs/ds_zero2.json) for a torchrun launch; "
                                        "needs the deepspeed package (requirements-dist.txt); GPUs or CPU processes."})
    fsdp: bool = field(default=False, metadata={"help": "Shard the model with FSDP (settings in --fsdp_config)."})
    fsdp_config: Optional[str] = field(
        default=None, metadata={"help": "FSDP JSON config (e.g. configs/fsdp.json); giving it turns --fsdp on."})
    local_rank: int = field(
        default=-1, metadata={"help": "Set by `python -m torch.distributed.launch`; torchrun uses LOCAL_RANK instead."})
    stage: str = field(
        default="sft", metadata={"help": "Training stage: sft (instruction tuning, the default) or a preference stage "
                                         "on pairs: dpo, orpo, kto, simpo (TRL's trainers; see README).",
                                 "choices": ["sft", "dpo", "orpo", "kto", "simpo"]})
    beta: Optional[float] = field(
        default=None, metadata={"gt": 0, "help": "dpo / kto / simpo: the preference temperature beta; orpo: the weight "
                                                 "lambda of its odds-ratio term (defaults from the papers: dpo 0.1, "
                                                 "kto "
                                                 "0.1, orpo 0.1, simpo 2.0)."})
    loss_type: Optional[str] = field(
        default=None, metadata={"help": "dpo: TRL's DPO loss variant (sigmoid = DPO, ipo, hinge, robust, ...); kto: "
                                        "kto "
                                        "or apo_zero_unpaired (default: the stage's own loss)."})
    ref_free: bool = field(
        default=False, metadata={"help": "dpo: reference-free (the margin is the policy's alone; no reference "
                                         "forward)."})
    ref_adapter: Optional[str] = field(
        default=None, metadata={"help": "dpo / kto: start from this SFT adapter (a run directory); it is also the "
                                        "reference model."})
    simpo_gamma: Optional[float] = field(
        default=None, metadata={"min": 0, "help": "simpo: the target reward margin gamma (default 0.5 * beta, as in "
                                                  "the SimPO paper's gamma/beta = 0.5)."})


def _check_train(args):
    if args.max_steps == 0:
        raise UserError("--max_steps must be -1 (train for --epochs) or at least 1, not 0")
    if args.epochs < 0 or (args.max_steps < 0 and not args.epochs > 0):
        raise UserError(f"--epochs must be > 0 when --max_steps is not given, not {args.epochs:g}; e.g. --epochs 3 "
                        "(or --max_steps 100)")


TrainArguments.check = _check_train


def _check_peft(args):
    if args.extend_vocab is not None:
        from utils.vocab import parse_value

        parse_value(args.extend_vocab)  # auto:N with N >= 1, or an existing file


PeftArguments.check = _check_peft


# The seed's documented sampling settings (Alpaca-CoT README, "Inference Hyper-parameter Explanation").
GEN_PRESETS = {"seed": {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "no_repeat_ngram_size": 6,
                        "repetition_penalty": 1.8}}


@dataclass
class GenerationArguments:
    gen_preset: Optional[str] = field(
        default=None, metadata={"help": "Sampling preset: 'seed' = the Alpaca-CoT README's settings (do_sample, "
                                        "temperature 1.0, top_p 0.9, no_repeat_ngram_size 6, repetition_penalty "
                                        "1.8); flags given explicitly override it.", "choices": list(GEN_PRESETS)})
    max_new_tokens: int = field(default=256, metadata={"min": 1, "example": 256, "help": "Maximum tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"gt": 0, "example": 0.7, "help": "Sampling temperature."})
    top_p: float = field(
        default=1.0, metadata={"gt": 0, "max": 1, "example": 0.9, "help": "Nucleus sampling threshold."})
    top_k: int = field(default=50, metadata={"min": 0, "example": 50, "help": "Top-k sampling."})
    num_beams: int = field(default=1, metadata={"min": 1, "example": 4, "help": "Beam search width."})
    repetition_penalty: float = field(
        default=1.0, metadata={"gt": 0, "example": 1.1, "help": "Penalty for repeated tokens."})
    no_repeat_ngram_size: int = field(
        default=0, metadata={"min": 0, "example": 6, "help": "Forbid repeating n-grams of this size."})


@dataclass
class InferArguments:
    lora_dir: Optional[str] = field(
        default=None, metadata={"help": "Output directory of uniform_finetune.py; base model, model type and "
                                        "template are read from its metadata."})
    prompt: Optional[str] = field(default=None, metadata={"help": "Answer this prompt and exit "
                                                                   "(default: interactive chat)."})
    system: Optional[str] = field(default=None, metadata={"help": "System prompt."})
    template: Optional[str] = field(default=None, metadata={"help": "Template for a base model without "
                                                                     "--lora_dir (default: the model type's)."})
    data: Optional[list[str]] = field(
        default=None, metadata={"help": "Alpaca-CoT's `generate.py --data D --model_type T`: without --lora_dir, load "
                                        "the "
                                        "newest run under saved_models/ that `uniform_finetune.py --model_type T "
                                        "--data D` "
                                        "wrote (it says which)."})


@dataclass
class MergeArguments:
    lora_dir: str = field(default=None, metadata={"help": "Adapter directory written by uniform_finetune.py."})
    merged_dir: str = field(default=None, metadata={"help": "Where the standalone merged model is written."})


@dataclass
class PredictArguments:
    lora_dir: Optional[str] = field(default=None, metadata={"help": "Adapter directory (omit for the base model)."})
    data: str = field(default=None, metadata={"help": "Dataset name or file of prompts (rows may carry outputs)."})
    result_dir: str = field(default=None, metadata={"help": "Directory for predictions.jsonl."})
    batch_size: int = field(default=8, metadata={"min": 1, "example": 8, "help": "Prompts generated together."})


@dataclass
class ServeArguments:
    lora_dir: Optional[list[str]] = field(
        default=None, metadata={"help": "One or more adapter directories to serve; server.py takes several trained "
                                        "on one base, NAME=DIR sets the model id (default: the directory's name)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to bind (default: this machine only)."})
    port: int = field(
        default=8000, metadata={"min": 1, "max": 65535, "example": 8000, "help": "TCP port (web.py uses 7860 unless "
                                                                                 "--port is given)."})
    api_key: Optional[str] = field(default=None, metadata={"help": "Require this bearer token (server.py)."})
    served_name: Optional[str] = field(
        default=None, metadata={"help": "Model id of the base model (server.py; default: its alias or hub id, or "
                                        "the directory name of a local path)."})
    template: Optional[str] = field(
        default=None, metadata={"help": "Chat template of the base model (server.py; default: the model type's); "
                                        "adapters always use the template they were trained with."})
    max_queue: int = field(
        default=64, metadata={"min": 1, "example": 64, "help": "Requests that may wait for a free row of the running "
                                                               "batch; more get HTTP 503 (server.py)."})
    max_batch_size: int = field(
        default=8, metadata={"min": 1, "example": 8, "help": "Requests the generation worker decodes together, one "
                                                             "token each per forward pass; waiting requests join "
                                                             "between two steps (server.py)."})
    max_wait_ms: float = field(
        default=10, metadata={"min": 0, "example": 10, "help": "How long an idle worker lets its first request wait "
                                                               "for companions before it starts (server.py)."})
    prefix_cache_tokens: int = field(
        default=2048, metadata={"min": 0, "example": 2048,
                                "help": "Keep the keys and values of prompt starts that requests share (a system "
                                        "prompt, few-shot examples) and copy them in instead of computing them "
                                        "again, up to this many positions in all; 0: off (server.py)."})
    packed_weights: str = field(
        default="all", metadata={"choices": ["all", "head", "none"],
                                 "help": "CPU float32 models: run the linear layers (all), or only the output layer "
                                         "(head), through oneDNN with their weights packed once for "
                                         "--max_batch_size rows: faster decoding steps, one more copy of those "
                                         "weights in memory; none: torch's default GEMM (server.py)."})


def _to_bool(value):
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("yes", "true", "t", "y", "1", "on"):
        return True
    if str(value).lower() in ("no", "false", "f", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not '{value}'")


class _Parser(argparse.ArgumentParser):
    """argparse over our dataclasses (HfArgumentParser's conventions, without importing transformers):
    errors are one line and exit 2, no prefix abbreviations."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(**kwargs)
        self.dataclass_types = dataclass_types
        for dt in dataclass_types:
            hints = typing.get_type_hints(dt)
            for f in fields(dt):
                self._add(f, hints[f.name])

    def _add(self, f, hint):
        meta = dict(f.metadata)
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []) + meta.get("aliases", [])
        kwargs = {"help": meta.get("help", ""), "dest": f.name}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Union:  # Optional[X]
            hint = next(a for a in args if a is not type(None))
        if f.default_factory is not MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["default"] = None if f.default is MISSING else f.default
        if hint is bool:
            kwargs.update(type=_to_bool, nargs="?", const=True)
        elif typing.get_origin(hint) is list:
            kwargs.update(type=typing.get_args(hint)[0], nargs="+")
        else:
            kwargs["type"] = hint
        self.add_argument(*names, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (run with --help to see the valid flags)")


def _describe(meta):
    parts = []
    for key, words in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<")):
        if key in meta:
            parts.append(f"{words} {meta[key]}")
    return " and ".join(parts)


def check_ranges(obj):
    """Every flag with a range in its metadata (min / gt / max / lt) is checked: one sentence naming the flag."""
    for f in fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None or isinstance(value, (bool, str, list)) or not _describe(meta):
            continue
        bad = (("min" in meta and value < meta["min"]) or ("gt" in meta and value <= meta["gt"])
               or ("max" in meta and value > meta["max"]) or ("lt" in meta and value >= meta["lt"]))
        if bad:
            example = f"; e.g. --{f.name} {meta['example']}" if "example" in meta else ""
            raise UserError(f"--{f.name} must be {_describe(meta)}, not {value}{example}")


def _flag_names(parser):
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def _load_config(path):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist; pass the path of a YAML or JSON file")
    try:
        text = p.read_text(encoding="utf-8")
        cfg = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise UserError(f"config file {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'} "
                        f"({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(cfg, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    return cfg


def _coerce_config(parser, cfg, path):
    """Config-file values converted like the same flags on the command line (argparse does not convert defaults)."""
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in cfg.items():
        action = actions.get(key)
        if value is None or action is None or action.type is None:
            out[key] = value
            continue
        many = action.nargs == "+"
        values = value if isinstance(value, list) else [value]
        if not many and isinstance(value, list):
            raise UserError(f"config file {path}: '{key}' takes one value, not a list")
        try:
            conv = [v if isinstance(v, bool) and action.type is _to_bool else action.type(v) for v in values]
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            kind = getattr(action.type, "__name__", "value").replace("_to_bool", "true/false")
            raise UserError(f"config file {path}: '{key}' must be {'a list of ' if many else ''}{kind}, not "
                            f"{json.dumps(value, ensure_ascii=False, default=str)}") from None
        if action.choices is not None and any(c not in action.choices for c in conv):
            raise UserError(f"config file {path}: '{key}' must be one of {', '.join(map(str, action.choices))}, "
                            f"not {value}")
        out[key] = conv if many else conv[0]
    return out


def parse(dataclass_types, argv=None, prog=None):
    """Parse argv (default sys.argv[1:]) into instances of dataclass_types.

    A first positional argument ending in .yaml/.yml/.json, or `--config FILE`, supplies defaults that
    the other flags override.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(dataclass_types, prog=prog, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML or JSON file of flag values; flags override it.")
    config = None
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml", ".json")):
        config = argv.pop(0)
    for flag in ("--resume_from_checkpoint", "--resume-from-checkpoint"):  # a bare flag means "the latest"
        if flag in argv:
            i = argv.index(flag)
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                argv.insert(i + 1, "latest")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a file path")
        config = argv[i + 1]
        del argv[i:i + 2]
    if config:
        known = {f.name for dt in dataclass_types for f in fields(dt)}
        hintable = known - {"local_rank"}  # set by launchers, never what a user meant
        cfg = _load_config(config)
        unknown = [k for k in cfg if k not in known]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], hintable, n=1)
            raise UserError(f"config file {config} has an unknown key '{unknown[0]}'"
                            + (f"; did you mean '{hint[0]}'?" if hint else "; run with --help to see the valid keys"))
        parser.set_defaults(**_coerce_config(parser, cfg, config))
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        bad = remaining[0]
        names = [n for n in _flag_names(parser) if "local" not in n]
        hint = difflib.get_close_matches("--" + bad.lstrip("-").split("=")[0], names, n=1)
        msg = f"unknown argument '{bad}'"
        msg += f"; did you mean '{hint[0]}'?" if hint else "; run with --help to see the valid flags"
        raise UserError(msg)
    parsed = [dt(**{f.name: getattr(namespace, f.name) for f in fields(dt) if f.init}) for dt in dataclass_types]
    for obj in parsed:
        check_ranges(obj)
        if hasattr(obj, "check"):
            obj.check()
        if hasattr(obj, "dtype"):
            obj.dtype = DTYPE_ALIASES.get(obj.dtype, obj.dtype)
    for obj in parsed:
        if isinstance(obj, GenerationArguments) and obj.gen_preset:
            given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
            for key, value in GEN_PRESETS[obj.gen_preset].items():
                if key not in given:
                    setattr(obj, key, value)
    return parsed


def parse_finetune_args(argv=None):
    return parse(FINETUNE_ARGS, argv, "uniform_finetune.py")


def parse_merge_args(argv=None):
    model, merge = parse((ModelArguments, MergeArguments), argv, "merge.py")
    if not merge.lora_dir or not merge.merged_dir:
        raise UserError("merge.py needs --lora_dir (a finished run) and --merged_dir (where to write the model)")
    return model, merge


def parse_predict_args(argv=None):
    model, predict, gen = parse((ModelArguments, PredictArguments, GenerationArguments), argv, "predict.py")
    if not predict.data or not predict.result_dir:
        raise UserError("predict.py needs --data (a dataset name or file) and --result_dir (where to write "
                        "predictions)")
    return model, predict, gen


def parse_serve_args(argv=None, prog="server.py"):
    return parse((ModelArguments, ServeArguments, GenerationArguments), argv, prog)


def parse_generate_args(argv=None):
    return parse(GENERATE_ARGS, argv, "generate.py")


def flags_table(*dataclass_types):
    """Markdown table of the flags of some argument dataclasses (README is generated from it)."""
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for dt in dataclass_types:
        for f in fields(dt):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            default = " ".join(map(str, default)) if isinstance(default, list) else default
            rows.append(f"| `--{f.name}` | `{default}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows) + "\n"


FINETUNE_ARGS = (ModelArguments, DataArguments, PeftArguments, TrainArguments)
GENERATE_ARGS = (ModelArguments, InferArguments, GenerationArguments)
