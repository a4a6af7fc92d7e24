"""Flags of evaluate.py (its own dataclass; model and generation flags are shared with the other scripts)."""
from dataclasses import dataclass, field
from typing import Optional

from utils.args import GenerationArguments, ModelArguments, parse
from utils.errors import UserError

TASKS = ("mc", "cot", "belle", "loss")


@dataclass
class EvalArguments:
    task: Optional[str] = field(
        default=None, metadata={"help": "mc (multiple choice, CMMLU / MMCU / C-Eval / MMLU CSV layouts), cot (answer "
                                        "extraction on CoT / GSM8K data), belle (Belle-eval with an LLM judge) or loss "
                                        "(held-out loss and perplexity).", "choices": list(TASKS)})
    study: Optional[str] = field(
        default=None, metadata={"help": "Run a study grid from this YAML instead of one task (same as "
                                        "`python -m utils.study FILE`)."})
    lora_dir: Optional[str] = field(
        default=None, metadata={"help": "Output directory of uniform_finetune.py (base model, model type and template "
                                        "come from it); omit to evaluate the base model."})
    template: Optional[str] = field(
        default=None, metadata={"help": "Template for a base model without --lora_dir (default: the model type's)."})
    data: Optional[list[str]] = field(
        default=None, metadata={"help": "cot / loss / belle: one or more --data values as in uniform_finetune.py "
                                        "(registry names, files, SOURCE:N samples)."})
    data_dir: Optional[str] = field(
        default=None, metadata={"help": "mc: a benchmark directory with one CSV per subject, in split folders "
                                        "(DIR/test/*.csv, DIR/dev/*.csv) or directly in DIR."})
    split: str = field(default="test", metadata={"help": "mc: the split folder to evaluate."})
    shots: int = field(default=0, metadata={"help": "mc: k-shot examples per question, the first rows of the "
                                                    "--shots_split file of the same subject (never the question itself)."})
    shots_split: str = field(default="dev", metadata={"help": "mc: the split folder the shots come from."})
    subjects: Optional[list[str]] = field(
        default=None, metadata={"help": "mc: evaluate only these subjects (file names without .csv)."})
    groups: Optional[str] = field(
        default=None, metadata={"help": "mc: YAML of subject -> {name, groups} for per-group accuracy. Default: "
                                        "data/cmmlu_groups.yaml when it knows the subjects."})
    mc_method: str = field(
        default="loglik", metadata={"help": "mc: loglik (the option letter with the highest log-likelihood; no "
                                            "parsing) or generate (generate, then extract the letters).",
                                    "choices": ["loglik", "generate"]})
    limit: Optional[int] = field(
        default=None, metadata={"help": "Evaluate at most N items per subject (mc) or per --data source."})
    batch_size: int = field(default=8, metadata={"help": "Items per forward / generate call."})
    cutoff_len: Optional[int] = field(
        default=None, metadata={"help": "loss: maximum tokens per example (default: the run's --cutoff_len, else 256)."})
    exclude_data: Optional[list[str]] = field(
        default=None, metadata={"help": "cot / loss / belle: skip rows whose prompt is in these --data values (e.g. "
                                        "the training data: the rows left are held out)."})
    exclude_seed: int = field(
        default=42, metadata={"help": "Seed of the SOURCE:N samples in --exclude_data (the training --seed)."})
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Results and the per-item cache (cache/*.jsonl, reused on rerun). Default: "
                                        "LORA_DIR/eval, or outputs/eval/<model> for a base model."})
    output: Optional[str] = field(
        default=None, metadata={"help": "Results JSON path (a .md table is written beside it). Default: "
                                        "OUTPUT_DIR/<task>.json."})
    judge_base_url: Optional[str] = field(
        default=None, metadata={"help": "belle: base URL of an OpenAI-compatible API for the judge, e.g. "
                                        "http://127.0.0.1:8000/v1 (without it only the answers are generated)."})
    judge_model: Optional[str] = field(default=None, metadata={"help": "belle: the judge's model name."})
    judge_api_key: Optional[str] = field(
        default=None, metadata={"help": "belle: API key of the judge endpoint (default: $OPENAI_API_KEY, else none)."})
    judge_prompts: Optional[str] = field(
        default=None, metadata={"help": "belle: per-class judge prompts (JSON lines with class, prompt). Default: "
                                        "eval_prompt.json beside the first --data file."})
    judge_max_tokens: int = field(default=256, metadata={"help": "belle: maximum tokens of a judge answer."})
    judge_workers: int = field(default=4, metadata={"help": "belle: judge requests in flight at once."})
    judge_timeout: float = field(default=120.0, metadata={"help": "belle: seconds to wait for one judge answer."})


EVAL_ARGS = (ModelArguments, EvalArguments, GenerationArguments)


def parse_eval_args(argv=None):
    model, ev, gen = parse(EVAL_ARGS, argv, "evaluate.py")
    if ev.study:
        return model, ev, gen
    if not ev.task:
        raise UserError("evaluate.py needs --task (mc, cot, belle or loss), or --study FILE for a study grid")
    if ev.task == "mc" and not ev.data_dir:
        raise UserError("--task mc needs --data_dir, a directory with one CSV file per subject "
                        "(e.g. ../shared/data/cmmlu with --split dev)")
    if ev.task != "mc" and not ev.data:
        raise UserError(f"--task {ev.task} needs --data (a dataset name or file)")
    if ev.shots < 0 or ev.batch_size < 1 or (ev.limit is not None and ev.limit < 1):
        raise UserError("--shots must be >= 0, --batch_size and --limit >= 1")
    return model, ev, gen
