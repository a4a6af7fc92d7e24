"""evaluate.py's runner: one task of the registry (utils/evals/) on one model -> OUTPUT.json and OUTPUT.md.

Per-item results are cached by each task, so a rerun resumes or costs nothing; the model loads only when some
item is not cached yet. Scoring functions live in utils/evals/scoring.py, the shared machinery in common.py.
"""
import json
import re
import time
from dataclasses import asdict, fields
from pathlib import Path

from utils.evals import TASKS, task_flags
from utils.evals.common import EvalContext, ModelHandle
from utils.evals.judge import Judge  # noqa: F401 (re-exported: tests and users patch evaluation.Judge)
from utils.evals.mc import mc_messages, read_mc_csv  # noqa: F401 (re-exported)
from utils.evals.scoring import (answers_match, extract_choice, extract_final_answer, letter_set,  # noqa: F401
                                 mc_correct, parse_judge_score)

ROOT = Path(__file__).resolve().parents[1]


def default_output_dir(model_args, eval_args):
    if eval_args.output_dir:
        return Path(eval_args.output_dir)
    if eval_args.lora_dir:
        return Path(eval_args.lora_dir) / "eval"
    from utils.models import EMBEDDED_ALIAS

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", (model_args.model_name_or_path or EMBEDDED_ALIAS).strip("/"))
    return ROOT / "outputs" / "eval" / name


def result_name(eval_args):
    module = TASKS[eval_args.task]
    return module.result_name(eval_args) if hasattr(module, "result_name") else eval_args.task


def _flags_of(module, eval_args):
    cls = task_flags(module)
    return cls(**{f.name: getattr(eval_args, f.name) for f in fields(cls)}) if cls else None


def check_task(model_args, eval_args, gen_args=None):
    """Everything about the task and the model that can be checked before any weight loads."""
    module = TASKS[eval_args.task]
    if hasattr(module, "check"):
        module.check(eval_args, _flags_of(module, eval_args), gen_args)
    ModelHandle(model_args, eval_args).check()


def run_eval(model_args, eval_args, gen_args, quiet=False):
    """Run one task; write <output>.json and <output>.md; return the results dict."""
    module = TASKS[eval_args.task]
    check_task(model_args, eval_args, gen_args)
    out_dir = default_output_dir(model_args, eval_args)
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = ModelHandle(model_args, eval_args)
    start = time.time()
    results = module.run(EvalContext(handle, eval_args, gen_args, _flags_of(module, eval_args), out_dir))
    results = {"task": eval_args.task, "model": handle.describe(), **results,
               "settings": {k: v for k, v in asdict(eval_args).items()
                            if v is not None and not k.startswith("judge_api")},
               "generation": asdict(gen_args), "runtime_s": round(time.time() - start, 2)}
    out_json = Path(eval_args.output) if eval_args.output else out_dir / f"{result_name(eval_args)}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    who = results["model"]["adapter"] or results["model"]["base_model"]
    md = f"# {eval_args.task}: {who}\n\n{results['table']}"
    out_json.with_suffix(".md").write_text(md, encoding="utf-8")
    if not quiet:
        print(md, end="")
        print(f"wrote {out_json} and {out_json.with_suffix('.md')}")
    return results
