"""Evaluation tasks: one module per task in this package, found by discovery (adding a task = adding one file).

A task module defines
    NAME = "mc"                 the --task value
    SUMMARY = "..."             one line for --help and README
    ORDER = 1                   its place in listings (optional)
    Flags                       a dataclass of its own flags (optional; names unique across tasks)
    check(eval_args, flags, gen_args)  raise UserError for bad flags before any model loads (optional)
    run(ctx) -> dict            the results: {"metrics": {...}, "table": "<markdown>", ...}; ctx is EvalContext
    result_name(eval_args)      the results file's stem (optional; default NAME)
    HEADLINE = "pass@1"         the study table's column(s): a results["metrics"] key or a tuple of keys (the first
                                is plotted); or headline(results) -> {column: value}
evaluate.py's flags, the study runner and README's tables read TASKS.
"""
import importlib
import pkgutil

NOT_TASKS = {"common", "judge", "scoring"}


def _discover():
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name in NOT_TASKS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            found.append(module)
    found.sort(key=lambda m: (getattr(m, "ORDER", 100), m.NAME))
    return {m.NAME: m for m in found}


TASKS = _discover()


def task_flags(module):
    """The task's Flags dataclass, or None."""
    return getattr(module, "Flags", None)
