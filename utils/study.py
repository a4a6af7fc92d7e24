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

Any task of the registry (utils/evals/) can be an eval entry. Its headline numbers (the table's columns) come from
the task module: headline(results) -> {column: value}, else HEADLINE (a results["metrics"] key or a tuple of keys);
the first column is the one plotted. Study-only keys of an entry: name (the result file's stem; default: the
task's own result name), exclude_train_data, baseline: false (skip this entry for the base models, e.g. a
pairwise entry with pairwise_base: true) and judge_server: true (use the study's judge, below).

    judge_server:                       # server.py flags: an OpenAI-compatible judge the study starts itself
      model_name_or_path: smollm2-135m-instruct
    eval:
      - {task: pairwise, data: [../shared/data/belle_eval/eval_set_dev.jsonl], limit: 20, judge_server: true}

The judge server starts (on a free 127.0.0.1 port, its log in OUTPUT_DIR/judge_server.log) when the first entry
that needs it runs, and stops when the study ends; its served name is the judge_model (default: the model's name).
OUTPUT_DIR gets results.csv, results.md and one plot, results.png: the loss curves (one line per cell) beside one
bar chart per eval entry (each cell's and base model's headline metric); loss_curves.png is the loss panel alone.
"""
import csv
import gc
import itertools
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from utils.errors import UserError, cli_main
from utils.run_dir import LOG_HISTORY_FILE, METRICS_FILE, read_meta, read_metrics

TOP_KEYS = {"output_dir", "train", "grid", "eval", "baseline", "title", "judge_server"}
ENTRY_KEYS = ("name", "exclude_train_data", "baseline", "judge_server")  # study-only keys of an eval entry
ROOT = Path(__file__).resolve().parents[1]
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
        raise UserError(f"study file {path} needs a 'grid' mapping of flag -> list of values (e.g. peft_type: "
                        "[lora, ia3])")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"study file {path}: grid '{key}' must be a non-empty list of values")
    evals = spec.get("eval") or []
    if not isinstance(evals, list) or not all(isinstance(e, dict) and e.get("task") for e in evals):
        raise UserError(f"study file {path}: 'eval' must be a list of evaluate.py settings, each with a 'task'")
    if not isinstance(spec.get("train") or {}, dict):
        raise UserError(f"study file {path}: 'train' must be a mapping of uniform_finetune.py flags")
    from utils.evals import TASKS

    for i, entry in enumerate(evals, 1):
        if entry["task"] not in TASKS:
            raise UserError(f"study file {path}: eval entry {i} has an unknown task '{entry['task']}'; tasks are: "
                            f"{', '.join(TASKS)}")
        if entry.get("judge_server") and not isinstance(spec.get("judge_server"), dict):
            raise UserError(f"study file {path}: eval entry {i} asks for judge_server but the study has no "
                            "'judge_server' mapping of server.py flags (e.g. judge_server: {model_name_or_path: "
                            "smollm2-135m-instruct})")
    if "judge_server" in spec and not isinstance(spec["judge_server"], dict):
        raise UserError(f"study file {path}: 'judge_server' must be a mapping of server.py flags")
    spec.setdefault("output_dir", f"outputs/study/{p.stem}")
    spec["eval_names"] = eval_names(evals)
    check_eval_entries(path, evals)
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


def _entry_settings(entry):
    return {k: v for k, v in entry.items() if k not in ENTRY_KEYS}


def eval_names(evals):
    """The result-file stem of each eval entry: its name, else the task's own result name (mc-1shot,
    lm_eval-<tasks>-0shot, ...); a repeated one gets -2, -3, ..."""
    from dataclasses import fields

    from utils.eval_args import EVAL_ARGS, EvalArguments
    from utils.evals import TASKS

    known = {f.name for f in fields(EvalArguments)}
    names = []
    for entry in evals:
        if entry.get("name"):
            name = _slug(entry["name"])
        else:
            module = TASKS[entry["task"]]
            name = entry["task"]
            if hasattr(module, "result_name"):
                settings = _listify(_entry_settings(entry), EVAL_ARGS)
                try:
                    name = module.result_name(EvalArguments(**{k: v for k, v in settings.items() if k in known}))
                except Exception:  # a bad value: check_eval_entries names it
                    pass
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def check_eval_entries(path, evals):
    """Parse every eval entry as evaluate.py flags before anything trains: an unknown or bad flag fails now."""
    from utils.eval_args import EVAL_ARGS, parse_eval_args

    with tempfile.TemporaryDirectory(prefix="study_check_") as tmp:
        for i, entry in enumerate(evals, 1):
            cfg = _write_yaml(Path(tmp) / f"entry{i}.yaml", _listify(_entry_settings(entry), EVAL_ARGS))
            try:
                parse_eval_args([str(cfg)])
            except UserError as exc:
                raise UserError(f"study file {path}: eval entry {i} ({entry['task']}): "
                                + str(exc).replace(str(cfg), "its settings")) from None


class JudgeServer:
    """server.py in a child process as the study's judge: started on first use, stopped by close()."""

    def __init__(self, flags, out_dir):
        self.flags, self.out_dir = dict(flags or {}), Path(out_dir)
        self.name = str(self.flags.get("served_name") or _slug(self.flags.get("model_name_or_path")
                                                               or "smollm2-135m-instruct"))
        self.proc = self._url = None

    def url(self):
        if self._url is None:
            self._start()
        return self._url

    def _start(self):
        import socket
        import urllib.request

        from utils.args import ModelArguments, ServeArguments, GenerationArguments

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        settings = {**self.flags, "served_name": self.name, "host": "127.0.0.1", "port": port}
        cfg = _write_yaml(self.out_dir / "judge_server.yaml",
                          _listify(settings, (ModelArguments, ServeArguments, GenerationArguments)))
        log_path = self.out_dir / "judge_server.log"
        print(f"study: starting the judge server ({self.name}) on port {port}; log in {log_path}")
        with open(log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), str(cfg)], cwd=str(ROOT),
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 900
        while True:
            if self.proc.poll() is not None:
                lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
                last = lines[-1] if lines else f"exit code {self.proc.returncode}"
                self.proc = None
                raise UserError(f"the study's judge server stopped before it served ({last}); fix the study's "
                                f"judge_server settings (log: {log_path})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                self.close()
                raise UserError(f"the study's judge server did not answer within 900 s (log: {log_path})")
            time.sleep(0.5)
        self._url = f"http://127.0.0.1:{port}/v1"

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = self._url = None


def evaluate_cell(entry, out_dir, lora_dir=None, base=None, train_data=None, seed=42, name=None, judge=None):
    """Run one eval entry for an adapter (lora_dir) or a base model (base flags); skipped when its result exists."""
    from utils.eval_args import EVAL_ARGS, parse_eval_args
    from utils.evaluation import run_eval

    name = name or eval_names([entry])[0]
    result_file = out_dir / f"{name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8")), False
    settings = _entry_settings(entry)
    if entry.get("exclude_train_data"):
        settings["exclude_data"] = list(dict.fromkeys(list(settings.get("exclude_data") or []) + train_data))
        settings["exclude_seed"] = seed
    if entry.get("judge_server"):
        if judge is None:
            raise UserError(f"eval entry '{name}' asks for judge_server but the study has no 'judge_server' settings")
        if not settings.get("judge_base_url"):  # an entry's own judge wins
            settings["judge_base_url"] = judge.url()
            settings.setdefault("judge_model", judge.name)
    settings.update({"output_dir": str(out_dir), "output": str(result_file)})
    if lora_dir:
        settings["lora_dir"] = str(lora_dir)
    else:
        settings.update({k: v for k, v in (base or {}).items() if v is not None})
    cfg = _write_yaml(out_dir / f"{name}.yaml", _listify(settings, EVAL_ARGS))
    model_args, eval_args, gen_args = parse_eval_args([str(cfg)])
    return run_eval(model_args, eval_args, gen_args, quiet=True), True


def headline(task, results):
    """{column: value}: the numbers a study table shows for one task, as its module declares them."""
    from utils.evals import TASKS

    module = TASKS.get(task)
    if module is not None and hasattr(module, "headline"):
        return dict(module.headline(results))
    keys = getattr(module, "HEADLINE", None)
    if keys is None:
        return {}
    metrics = results.get("metrics") or {}
    return {k: metrics.get(k) for k in ([keys] if isinstance(keys, str) else keys)}


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
    judge = JudgeServer(spec["judge_server"], out) if isinstance(spec.get("judge_server"), dict) else None
    try:
        histories, plotted = _run_cells(spec, out, train, grid_cells, seed, train_data, summary, judge)
    finally:
        if judge is not None:
            judge.close()
    write_results(out, summary["rows"], histories, plotted)
    print(f"study: {len(summary['trained'])} cells trained, {len(summary['evaluated'])} evaluations run, "
          f"{len(summary['skipped'])} skipped as done; results in {out}/results.md, results.csv, results.png")
    return summary


def _run_cells(spec, out, train, grid_cells, seed, train_data, summary, judge):
    histories, bases, plotted = {}, {}, {}
    entries = list(zip(spec.get("eval") or [], spec["eval_names"]))

    def add(row, entry, ename, res):
        cols = headline(entry["task"], res)
        row.update({f"{ename}: {k}": v for k, v in cols.items()})
        if cols:
            plotted.setdefault(ename, f"{ename}: {next(iter(cols))}")

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
        for entry, ename in entries:
            res, ran = evaluate_cell(entry, adapter / "eval", lora_dir=adapter, train_data=train_data, seed=seed,
                                     name=ename, judge=judge)
            (summary["evaluated"] if ran else summary["skipped"]).append(f"{name}/{ename}")
            add(row, entry, ename, res)
        summary["rows"].append(row)
        base = {k: all_flags.get(k) for k in BASE_KEYS}
        bases.setdefault(json.dumps(base, sort_keys=True), (meta["base_model"], base))
    base_entries = [(e, n) for e, n in entries if e.get("baseline", True)]
    if spec.get("baseline", True) and base_entries:
        for base_model, base in bases.values():
            name = "base-" + _slug(base_model) + (f"-{_slug(base['template'])}" if base.get("template") else "")
            row = {"cell": name, "base_model": base_model, "peft_type": "none (base model)"}
            for entry, ename in base_entries:
                res, ran = evaluate_cell(entry, out / "base" / name, base=base, train_data=train_data, seed=seed,
                                         name=ename, judge=judge)
                (summary["evaluated"] if ran else summary["skipped"]).append(f"{name}/{ename}")
                add(row, entry, ename, res)
            summary["rows"].insert(0, row)
    return histories, plotted


FIRST_COLUMNS = ["cell", "base_model", "model_type", "peft_type", "data", "trainable_params", "steps",
                 "train_runtime_s", "first_loss", "last_loss"]


def write_results(out, rows, histories, plotted=None):
    columns = [c for c in FIRST_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        columns += [c for c in r if c not in columns]
    with open(out / "results.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    plot_loss_curves(histories, out / "loss_curves.png")
    plot_results(rows, histories, plotted or {}, out / "results.png")
    print("\n".join(md))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_loss(ax, histories):
    for name, hist in histories.items():
        points = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 20 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=8)


def plot_loss_curves(histories, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_loss(ax, histories)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_results(rows, histories, plotted, path):
    """The study's plot: the training-loss curves, then per eval entry a bar per row (base models and cells) of
    its headline metric; a missing value is marked n/a."""
    plt = _pyplot()
    panels = 1 + len(plotted)
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    axes = [ax for line in axes for ax in line]
    _draw_loss(axes[0], histories)
    axes[0].set_title("training loss", fontsize=10)
    labels = [r["cell"] for r in rows]
    for ax, column in zip(axes[1:], plotted.values()):
        values = [r.get(column) for r in rows]
        heights = [v if _number(v) else 0 for v in values]
        bars = ax.bar(range(len(rows)), heights,
                      color=["#999999" if str(r.get("peft_type", "")).startswith("none") else "#4878d0" for r in rows])
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.3g}" if _number(v) else "n/a", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        if not any(_number(v) for v in values) or min(v for v in values if _number(v)) >= 0:
            ax.set_ylim(bottom=0, top=None if any(_number(v) and v > 0 for v in values) else 1)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(column, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[panels:]:
        ax.axis("off")
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
