"""The empirical-study runner: train a grid of cells with one budget, evaluate each the same way, tabulate, plot.

    python -m utils.study study/example.yaml        (or: python evaluate.py --study study/example.yaml)

The YAML (paths relative to the directory you run from):
    output_dir: outputs/study/example   # default: outputs/study/<yaml name>
    train:                              # uniform_finetune.py flags shared by every cell: the same budget
      max_steps: 30
      learning_rate: 1.0e-3
    grid:                               # flag -> values; every combination is one cell
      peft_type: [lora, ia3]
      data: [arith_sample, "gsm8k:200"] # a value may itself be a list (several sources in one cell)
      model_name_or_path: [smollm2-135m-instruct]
    eval:                               # evaluate.py flags, one entry per task; every cell gets the same
      - {task: loss, data: [arith_sample], limit: 50}
      - {task: cot, data: [gsm8k], limit: 20, max_new_tokens: 128, exclude_train_data: true}
    baseline: true                      # also evaluate each base model (no adapter) the same way (default)

`exclude_train_data: true` in an eval entry passes every cell's training --data as --exclude_data (with the
training seed), so every model is scored on the same rows, none of which any cell trained on.
Each cell trains into OUTPUT_DIR/cells/<cell>/adapter (the cell's flags are written to train.yaml there, its loss
log to log_history.json) and evaluates into adapter/eval. A cell whose metrics.json and log_history.json exist is not
trained again, an evaluation whose result file exists is not run again: a rerun skips everything done.
OUTPUT_DIR gets results.csv, results.md and loss_curves.png (one line per cell).
"""
import csv
import gc
import itertools
import json
import re
import sys
import time
from pathlib import Path

import yaml

from utils.errors import UserError, cli_main
from utils.run_dir import LOG_HISTORY_FILE, METRICS_FILE, read_meta, read_metrics

TOP_KEYS = {"output_dir", "train", "grid", "eval", "baseline", "title"}
BASE_KEYS = ("model_name_or_path", "model_type", "template", "trust_remote_code", "dtype")  # what makes a base model


def _slug(value):
    """A short file-name-safe label: "../shared/data/gsm8k/train.jsonl:40" -> "train-40", [a, b] -> "a+b"."""
    if isinstance(value, (list, tuple)):
        return "+".join(_slug(v) for v in value)
    name, count = str(value), ""
    m = re.fullmatch(r"(.+):(\d+(?:\.\d+)?)", name)
    if m:
        name, count = m.group(1), "-" + m.group(2)
    name = re.sub(r"\.(jsonl?|csv|parquet)(\.gz)?$", "", name.rstrip("/").split("/")[-1])
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name + count).strip("_") or "x"


def load_study(path):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"study file {path} does not exist; pass the path of a study YAML (see study/example.yaml)")
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"study file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"study file {path} must hold a mapping (output_dir, train, grid, eval)")
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise UserError(f"study file {path} has an unknown key '{unknown[0]}'; keys are: {', '.join(sorted(TOP_KEYS))}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"study file {path} needs a 'grid' mapping of flag -> list of values (e.g. peft_type: [lora, ia3])")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"study file {path}: grid '{key}' must be a non-empty list of values")
    evals = spec.get("eval") or []
    if not isinstance(evals, list) or not all(isinstance(e, dict) and e.get("task") for e in evals):
        raise UserError(f"study file {path}: 'eval' must be a list of evaluate.py settings, each with a 'task'")
    if not isinstance(spec.get("train") or {}, dict):
        raise UserError(f"study file {path}: 'train' must be a mapping of uniform_finetune.py flags")
    spec.setdefault("output_dir", f"outputs/study/{p.stem}")
    return spec


def cells(spec):
    """[(name, flags)] for every combination of the grid; names keep only the values that vary."""
    grid = spec["grid"]
    keys = list(grid)
    out, seen = [], set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        flags = dict(zip(keys, combo))
        varying = [_slug(flags[k]) for k in keys if len(grid[k]) > 1] or [_slug(flags[k]) for k in keys]
        name = "__".join(varying)
        while name in seen:
            name += "_"
        seen.add(name)
        out.append((name, flags))
    return out


def _listify(flags, dataclass_types):
    """A single value for a list flag (data: gsm8k) becomes a one-item list, as on the command line."""
    from dataclasses import fields

    list_flags = {f.name for dt in dataclass_types for f in fields(dt) if "list" in str(f.type)}
    return {k: [v] if k in list_flags and not isinstance(v, (list, tuple)) and v is not None else v
            for k, v in flags.items()}


def _write_yaml(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def train_cell(cell_dir, flags):
    """Train one cell in this process; returns its metrics. The loss log goes to log_history.json."""
    from utils.args import FINETUNE_ARGS, parse_finetune_args
    from utils.train import build_run, finish_run

    adapter = cell_dir / "adapter"
    cfg = _write_yaml(cell_dir / "train.yaml", _listify({**flags, "output_dir": str(adapter)}, FINETUNE_ARGS))
    args = parse_finetune_args([str(cfg)])
    run = build_run(*args)
    if run is None:
        raise UserError(f"{cfg}: dry_run / list_data make no adapter; remove them from the study's train settings")
    start = time.time()
    result = run.trainer.train()
    metrics = finish_run(run, result, time.time() - start)
    (cell_dir / LOG_HISTORY_FILE).write_text(json.dumps(run.trainer.state.log_history, indent=1), encoding="utf-8")
    del run, result
    gc.collect()
    return metrics


def _eval_name(entry):
    if entry.get("name"):
        return _slug(entry["name"])
    if entry["task"] == "mc":
        return f"mc-{entry.get('shots', 0)}shot" + ("-generate" if entry.get("mc_method") == "generate" else "")
    return entry["task"]


def evaluate_cell(entry, out_dir, lora_dir=None, base=None, train_data=None, seed=42):
    """Run one eval entry for an adapter (lora_dir) or a base model (base flags); skipped when its result exists."""
    from utils.eval_args import EVAL_ARGS, parse_eval_args
    from utils.evaluation import run_eval

    name = _eval_name(entry)
    result_file = out_dir / f"{name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8")), False
    settings = {k: v for k, v in entry.items() if k not in ("name", "exclude_train_data")}
    if entry.get("exclude_train_data"):
        settings["exclude_data"] = list(dict.fromkeys(list(settings.get("exclude_data") or []) + train_data))
        settings["exclude_seed"] = seed
    settings.update({"output_dir": str(out_dir), "output": str(result_file)})
    if lora_dir:
        settings["lora_dir"] = str(lora_dir)
    else:
        settings.update({k: v for k, v in (base or {}).items() if v is not None})
    cfg = _write_yaml(out_dir / f"{name}.yaml", _listify(settings, EVAL_ARGS))
    model_args, eval_args, gen_args = parse_eval_args([str(cfg)])
    return run_eval(model_args, eval_args, gen_args, quiet=True), True


def _headline(task, results):
    """The numbers a study table shows for one task."""
    m = results["metrics"]
    if task == "mc":
        return {"acc": m.get("average")}
    if task == "cot":
        return {"acc": m.get("accuracy"), "parsable": m.get("parsable_rate")}
    if task == "belle":
        return {"score": m.get("score")}
    if task == "loss":
        return {"loss": m.get("loss"), "ppl": m.get("perplexity")}
    return {}


def _data_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def run_study(path):
    """Run (or resume) a study; returns {"rows", "trained", "evaluated", "skipped", "output_dir"}."""
    spec = load_study(path)
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    train = dict(spec.get("train") or {})
    grid_cells = cells(spec)
    seed = int(train.get("seed", 42))
    train_data = []
    for _, flags in grid_cells:
        for d in _data_list({**train, **flags}.get("data", ["arith_sample"])):
            if d not in train_data:
                train_data.append(d)
    summary = {"rows": [], "trained": [], "evaluated": [], "skipped": [], "output_dir": str(out)}
    histories = {}
    bases = {}
    for name, flags in grid_cells:
        all_flags = {**train, **flags}
        cell_dir = out / "cells" / name
        adapter = cell_dir / "adapter"
        if (adapter / METRICS_FILE).is_file() and (cell_dir / LOG_HISTORY_FILE).is_file():
            print(f"study: cell {name}: trained already, skipped")
            summary["skipped"].append(name)
        else:
            print(f"study: cell {name}: training ({', '.join(f'{k}={v}' for k, v in flags.items())})")
            train_cell(cell_dir, all_flags)
            summary["trained"].append(name)
        metrics = read_metrics(adapter)
        histories[name] = json.loads((cell_dir / LOG_HISTORY_FILE).read_text(encoding="utf-8"))
        meta = read_meta(adapter)
        row = {"cell": name, "base_model": meta["base_model"], "model_type": meta["model_type"],
               "peft_type": meta["peft_type"], "data": " ".join(meta["data"]),
               "trainable_params": meta["trainable_params"], "steps": metrics["global_step"],
               "train_runtime_s": metrics["runtime_s"], "first_loss": metrics["first_logged_loss"],
               "last_loss": metrics["last_logged_loss"]}
        for entry in spec.get("eval") or []:
            res, ran = evaluate_cell(entry, adapter / "eval", lora_dir=adapter, train_data=train_data, seed=seed)
            (summary["evaluated"] if ran else summary["skipped"]).append(f"{name}/{_eval_name(entry)}")
            row.update({f"{_eval_name(entry)}: {k}": v for k, v in _headline(entry["task"], res).items()})
        summary["rows"].append(row)
        base = {k: all_flags.get(k) for k in BASE_KEYS}
        bases.setdefault(json.dumps(base, sort_keys=True), (meta["base_model"], base))
    if spec.get("baseline", True) and spec.get("eval"):
        for base_model, base in bases.values():
            name = "base-" + _slug(base_model) + (f"-{_slug(base['template'])}" if base.get("template") else "")
            row = {"cell": name, "base_model": base_model, "peft_type": "none (base model)"}
            for entry in spec["eval"]:
                res, ran = evaluate_cell(entry, out / "base" / name, base=base, train_data=train_data, seed=seed)
                (summary["evaluated"] if ran else summary["skipped"]).append(f"{name}/{_eval_name(entry)}")
                row.update({f"{_eval_name(entry)}: {k}": v for k, v in _headline(entry["task"], res).items()})
            summary["rows"].insert(0, row)
    write_results(out, summary["rows"], histories)
    print(f"study: {len(summary['trained'])} cells trained, {len(summary['evaluated'])} evaluations run, "
          f"{len(summary['skipped'])} skipped as done; results in {out}/results.md, results.csv, loss_curves.png")
    return summary


FIRST_COLUMNS = ["cell", "base_model", "model_type", "peft_type", "data", "trainable_params", "steps", "train_runtime_s",
                 "first_loss", "last_loss"]


def write_results(out, rows, histories):
    columns = [c for c in FIRST_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        columns += [c for c in r if c not in columns]
    with open(out / "results.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    plot_loss_curves(histories, out / "loss_curves.png")
    print("\n".join(md))


def plot_loss_curves(histories, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, hist in histories.items():
        points = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 20 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@cli_main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__)
        if argv and argv[0] in ("-h", "--help"):
            return None
        raise UserError("usage: python -m utils.study STUDY.yaml")
    return run_study(argv[0])


if __name__ == "__main__":
    main()
