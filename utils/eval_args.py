"""Flags of evaluate.py: the common ones below, the judge's, and every task's own Flags (utils/evals/*.py),
combined into one EvalArguments dataclass; model and generation flags are shared with the other scripts."""
import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Optional

from utils.args import GenerationArguments, ModelArguments, parse
from utils.errors import UserError
from utils.evals import TASKS, task_flags
from utils.evals.judge import JudgeArguments


@dataclass
class CommonArguments:
    task: Optional[str] = field(
        default=None, metadata={"help": "The task: " + "; ".join(f"{n} ({m.SUMMARY})" for n, m in TASKS.items()) + ".",
                                "choices": list(TASKS)})
    study: Optional[str] = field(
        default=None, metadata={"help": "Run a study grid from this YAML instead of one task (same as "
                                        "`python -m utils.study FILE`)."})
    lora_dir: Optional[str] = field(
        default=None, metadata={"help": "Output directory of uniform_finetune.py (base model, model type and template "
                                        "come from it); omit to evaluate the base model."})
    template: Optional[str] = field(
        default=None, metadata={"help": "Template for a base model without --lora_dir (default: the model type's)."})
    data: Optional[list[str]] = field(
        default=None, metadata={"help": "cot / loss / belle / ...: one or more --data values as in uniform_finetune.py "
                                        "(registry names, files, SOURCE:N samples)."})
    data_dir: Optional[str] = field(
        default=None, metadata={"help": "mc: a benchmark directory with one CSV per subject, in split folders "
                                        "(DIR/test/*.csv, DIR/dev/*.csv) or directly in DIR."})
    split: str = field(default="test", metadata={"help": "mc: the split folder to evaluate."})
    shots: int = field(default=0, metadata={"min": 0, "max": 64, "help": "mc: k-shot examples per question, the first "
                                                                         "rows of the --shots_split file of the same "
                                                                         "subject (never the question itself)."})
    subjects: Optional[list[str]] = field(
        default=None, metadata={"help": "mc: evaluate only these subjects (file names without .csv)."})
    limit: Optional[int] = field(
        default=None, metadata={"min": 1, "help": "Evaluate at most N items per subject (mc) or per --data source."})
    batch_size: int = field(default=8, metadata={"min": 1, "max": 4096, "help": "Items per forward / generate call."})
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


def _combine(*classes):
    """One dataclass holding the fields of all these (a field name may appear only once)."""
    specs, seen = [], {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise TypeError(f"evaluate.py flag '{f.name}' is defined by both {seen[f.name]} and {cls.__module__}")
            seen[f.name] = cls.__module__
            kw = {"metadata": f.metadata}
            if f.default_factory is not MISSING:
                kw["default_factory"] = f.default_factory
            else:
                kw["default"] = f.default
            specs.append((f.name, f.type, field(**kw)))
    return dataclasses.make_dataclass("EvalArguments", specs)


_TASK_FLAGS = [task_flags(m) for m in TASKS.values() if task_flags(m) is not None]
EvalArguments = _combine(CommonArguments, JudgeArguments, *_TASK_FLAGS)
EvalArguments.__module__ = __name__
EVAL_ARGS = (ModelArguments, EvalArguments, GenerationArguments)


def parse_eval_args(argv=None):
    model, ev, gen = parse(EVAL_ARGS, argv, "evaluate.py")
    if ev.study:
        return model, ev, gen
    if not ev.task:
        raise UserError(f"evaluate.py needs --task ({', '.join(TASKS)}), or --study FILE for a study grid")
    return model, ev, gen
