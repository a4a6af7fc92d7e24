"""EleutherAI's lm-evaluation-harness on the model evaluate.py already holds (base + adapter, one load).

    python evaluate.py --task lm_eval --lm_eval_tasks cmmlu_local --data_dir ../shared/data/cmmlu --split dev
    python evaluate.py --task lm_eval --lm_eval_tasks gsm8k_local --data gsm8k --limit 50 --max_new_tokens 256
    python evaluate.py --task lm_eval --lm_eval_tasks my_task --lm_eval_include my_yaml_dir/

Shipped tasks (templates in data/lm_eval/, rendered at run time, because the data location is a flag):
- cmmlu_local, mmcu_local, ceval_local, mc_local: one task per subject CSV of --data_dir (<family>_<subject>) and a
  group over them. The CSVs are read by --task mc's own reader (every layout it knows) and written as JSONL docs
  into a temporary include directory, beside one small YAML per subject that `include`s the shipped template and
  names its data files by absolute path; lm-eval's TaskManager(include_path=...) indexes that directory.
- gsm8k_local: lm-eval's GSM8K task on the question/answer rows of --data.
Any other name is looked up in --lm_eval_include DIR (the user's own lm-eval YAMLs), then in lm-eval's own tasks.

The model goes to lm-eval as an object: lm-eval's HFLM wraps the loaded model and tokenizer. With --lm_eval_chat
template (the default) its chat rendering is our Template, the one the adapter was trained with (the tokenizer's
chat template, or alpaca, vicuna, ...), so an lm-eval prompt is the prompt every other script builds.
"""
import json
import logging
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Optional

import yaml

from utils.errors import UserError

NAME = "lm_eval"
SUMMARY = ("EleutherAI lm-evaluation-harness tasks on the loaded model + adapter: the shipped local CMMLU / MMCU / "
           "C-Eval / mc-prompt tasks (--data_dir) and GSM8K (--data), your own lm-eval YAMLs (--lm_eval_include), "
           "or any lm-eval task")

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "data" / "lm_eval"
# the shipped tasks (templates data/lm_eval/<name>.yaml): per subject of --data_dir, and on --data
MC_FAMILIES = ("cmmlu_local", "mmcu_local", "ceval_local", "mc_local")
GEN_FAMILIES = ("gsm8k_local",)
CHAT_MODES = ("template", "tokenizer", "none")
PIP_LINE = "lm-eval>=0.4.13,<0.5"


def headline(results):
    """The study table's columns (the first is plotted): the first metric of each requested task or group."""
    metrics = results["metrics"]
    names = (results.get("settings") or {}).get("lm_eval_tasks") or []
    keys = [next((k for k in metrics if k.startswith(f"{n}/") and not k.endswith("/n")), None) for n in names]
    keys = [k for k in keys if k] or [k for k in metrics if not k.endswith("/n")][:1]
    return {k: metrics[k] for k in keys}


@dataclass
class Flags:
    lm_eval_tasks: Optional[list[str]] = field(
        default=None, metadata={"help": "lm_eval: tasks or groups to run: the shipped cmmlu_local, mmcu_local, "
                                        "ceval_local, mc_local (with --data_dir; one subject: e.g. cmmlu_local_arts), "
                                        "gsm8k_local (with --data), tasks of --lm_eval_include, or any lm-eval task "
                                        "name or glob."})
    lm_eval_include: Optional[str] = field(
        default=None, metadata={"help": "lm_eval: a directory of your own lm-eval task YAMLs (lm-eval's "
                                        "--include_path); its tasks may override lm-eval's and ours."})
    lm_eval_chat: str = field(
        default="template", metadata={"help": "lm_eval: prompts through our template, the one the adapter was "
                                              "trained with (template), through the tokenizer's own chat template "
                                              "(tokenizer: lm-eval's apply_chat_template), or as plain text (none).",
                                      "choices": list(CHAT_MODES)})
    lm_eval_system: Optional[str] = field(
        default=None, metadata={"help": "lm_eval: a system instruction before every prompt (lm-eval's "
                                        "system_instruction)."})


# ==== doc text of the mc_local template (called by lm-eval through `!function`) ===========================
def _row(doc):
    return {"question": doc["question"], "options": {k: doc[k] for k in doc["letters"]}, "answer": doc["answer"]}


def mc_question_text(doc):
    """The question turn exactly as --task mc writes it at 0 shots: header, question, options."""
    from utils.evals.mc import mc_messages

    return mc_messages(_row(doc), [], doc["subject"], doc["multi"])[0]["content"]


def mc_shot_text(doc):
    """A solved example's question turn: the question and its options (mc_messages writes no header after a shot)."""
    from utils.evals.mc import mc_messages

    row = _row(doc)
    return mc_messages(row, [row], doc["subject"], doc["multi"])[-1]["content"]


# ==== rendering the shipped templates ======================================================================
def _family_of(name):
    """The shipped family a requested name belongs to ('cmmlu_local', 'cmmlu_local_arts'), or None."""
    for fam in list(MC_FAMILIES) + list(GEN_FAMILIES):
        if name == fam or name.startswith(fam + "_"):
            return fam
    return None


def _is_glob(name):
    return bool(re.search(r"[*?\[]", name))


def _choices(letters, multi):
    if not multi:
        return list(letters)
    return ["".join(c) for n in range(1, len(letters) + 1) for c in combinations(letters, n)]


def _mc_docs(rows, name):
    """JSONL docs of one subject file (see data/lm_eval/cmmlu_local.yaml for the fields)."""
    from utils.evals.mc import LETTERS

    multi = any(len(r["answer"]) > 1 for r in rows)
    width = max([len(r["options"]) for r in rows] + [4])
    docs = []
    for r in rows:
        letters = "".join(k for k in LETTERS if k in r["options"])
        choices = _choices(letters, multi)
        doc = {"question": r["question"], **{k: r["options"].get(k, "") for k in LETTERS[:width]},
               "answer": r["answer"], "letters": letters, "choices": choices, "label": choices.index(r["answer"]),
               "subject": name, "multi": multi}
        docs.append(doc)
    return docs


def _write_jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _render_mc(eval_args, root, families):
    """Per-subject data + task YAMLs + one group per family, from --data_dir (the layout --task mc reads)."""
    from utils.evals.mc import _mc_layout, load_groups, read_mc_csv

    test_files, shot_files, same = _mc_layout(eval_args)
    groups = load_groups(eval_args, list(test_files))
    shots = eval_args.shots or 0
    data, cache = root / "data", root / "hf_cache"
    subjects = {}
    for subject, path in test_files.items():
        rows, _ = read_mc_csv(path)
        if not rows:
            raise UserError(f"{path} has no usable rows (each needs a question, options and an answer letter)")
        name = groups[subject]["name"]
        files = {"test": str(data / "mc" / f"{subject}.test.jsonl")}
        _write_jsonl(Path(files["test"]), _mc_docs(rows, name))
        pool = len(rows) - 1  # shots from the same file: every other row
        if not same:
            shot_rows = read_mc_csv(shot_files[subject])[0] if shot_files[subject] else []
            pool = len(shot_rows)
            if shot_rows:
                files["dev"] = str(data / "mc" / f"{subject}.dev.jsonl")
                _write_jsonl(Path(files["dev"]), _mc_docs(shot_rows, name))
        if shots > pool:
            raise UserError(f"--shots {shots}: subject '{subject}' has only {pool} example(s) for shots in "
                            f"{shot_files[subject] or Path(eval_args.data_dir) / eval_args.shots_split}; "
                            "pass fewer --shots or another --shots_split")
        subjects[subject] = files
    for fam in families:
        names = []
        for subject, files in subjects.items():
            task = f"{fam}_{subject}"
            cfg = {"include": str(TEMPLATES / f"{fam}.yaml"), "task": task,
                   "dataset_kwargs": {"data_files": files, "cache_dir": str(cache)}}
            if "dev" not in files:
                cfg["fewshot_split"] = "test"  # shots from the same file: lm-eval never shows a question its own answer
            _dump(root / "tasks" / fam / f"{task}.yaml", cfg)
            names.append(task)
        agg = ["acc"] if fam == "mc_local" else ["acc", "acc_norm"]
        _dump(root / "tasks" / fam / f"_{fam}.yaml",
              {"group": fam, "task": names,
               "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True} for m in agg],
               "metadata": {"version": 1.0}})
    return list(subjects)


def _render_gsm8k(eval_args, root):
    from utils.data import iter_rows, resolve_sources

    docs = []
    for src in resolve_sources(eval_args.data):
        if src.count is not None:
            raise UserError(f"gsm8k_local reads whole files; use --limit instead of ':{src.count:g}' in --data")
        if not src.paths:
            raise UserError(f"gsm8k_local needs local files in --data; '{src.label}' is not one")
        for path in src.paths:
            for where, row, _ in iter_rows(Path(path)):
                if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                        or not isinstance(row.get("answer"), str):
                    raise UserError(f"{where}: gsm8k_local needs rows with 'question' and 'answer' strings "
                                    "(GSM8K's JSONL: the answer ends with '#### N')")
                docs.append({"question": row["question"], "answer": row["answer"]})
    if not docs:
        raise UserError(f"--data {' '.join(eval_args.data)} has no rows for gsm8k_local")
    path = root / "data" / "gsm8k.jsonl"
    _write_jsonl(path, docs)
    _dump(root / "tasks" / "gsm8k_local.yaml",
          {"include": str(TEMPLATES / "gsm8k_local.yaml"), "task": "gsm8k_local",
           "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(root / "hf_cache")}})


class _Env:
    """The rendered include directory and lm-eval's TaskManager over it (+ --lm_eval_include, + lm-eval's own)."""

    def __init__(self, eval_args, flags):
        self.tmp = tempfile.TemporaryDirectory(prefix="lm_eval_tasks_")
        self.checked = False
        try:
            self._render(eval_args, flags, Path(self.tmp.name))
        except BaseException:
            self.close()
            raise

    def _render(self, eval_args, flags, root):
        names = list(flags.lm_eval_tasks)
        wanted = {f for f in map(_family_of, names) if f}
        if any(map(_is_glob, names)):  # a pattern may match any shipped task that has its data
            wanted |= set(MC_FAMILIES) if eval_args.data_dir else set()
            wanted |= set(GEN_FAMILIES) if eval_args.data else set()
        mc = [f for f in MC_FAMILIES if f in wanted]
        if mc and not eval_args.data_dir:
            raise UserError(f"--lm_eval_tasks {mc[0]} needs --data_dir, a directory with one CSV per subject "
                            "(e.g. ../shared/data/cmmlu with --split dev)")
        if "gsm8k_local" in wanted and not eval_args.data:
            raise UserError("--lm_eval_tasks gsm8k_local needs --data, GSM8K-style question/answer rows "
                            "(e.g. --data gsm8k or ../shared/data/gsm8k/train.jsonl)")
        if mc:
            _render_mc(eval_args, root, mc)
        if "gsm8k_local" in wanted:
            _render_gsm8k(eval_args, root)
        self.paths = [root / "tasks"] + ([Path(flags.lm_eval_include)] if flags.lm_eval_include else [])
        (root / "tasks").mkdir(parents=True, exist_ok=True)
        self.manager = self._resolve(names)
        self.names = []  # the requested names, patterns expanded (lm-eval's loader takes names only)
        for n in names:
            for m in (sorted(self.manager.match_tasks([n])) if _is_glob(n) else [n]):
                if m not in self.names:
                    self.names.append(m)

    def _resolve(self, names):
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=[str(p) for p in self.paths], include_defaults=False)
        unknown = [n for n in names if not self._known(manager, n)]
        if not unknown:
            return manager
        if _family_of(unknown[0]):  # one of ours without its subject: no need to index lm-eval's own tasks
            raise UserError(_unknown_task(unknown[0], manager, self.paths[1:]))
        manager = TaskManager(include_path=[str(p) for p in self.paths])  # lm-eval's own tasks too (index: seconds)
        for n in names:
            if not self._known(manager, n):
                raise UserError(_unknown_task(n, manager, self.paths[1:]))
        return manager

    @staticmethod
    def _known(manager, name):
        return name in manager.all_tasks or bool(_is_glob(name) and manager.match_tasks([name]))

    def close(self):
        self.tmp.cleanup()


def _unknown_task(name, manager, include):
    import difflib

    fam = _family_of(name)
    if fam in MC_FAMILIES:
        some = sorted(t for t in manager.all_tasks if t.startswith(fam + "_"))[:3]
        return (f"--lm_eval_tasks: '{name}' is no subject of --data_dir (or --subjects); a subject's task is "
                f"{fam}_<file name>, e.g. {', '.join(some)}, and {fam} is the group of them all")
    shipped = list(MC_FAMILIES) + list(GEN_FAMILIES)
    close = difflib.get_close_matches(name, shipped, n=1) or difflib.get_close_matches(name, manager.all_tasks, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if include:
        where = f"a task of --lm_eval_include {include[0]} or one of lm-eval's own (`lm-eval ls tasks`)"
    else:
        where = "one of lm-eval's own (`lm-eval ls tasks`), or pass your own YAML directory with --lm_eval_include"
    return f"--lm_eval_tasks: unknown task '{name}'{hint}; name a shipped task ({', '.join(shipped)}), {where}"


_ENVS = {}


def _env_key(eval_args, flags):
    keys = ("data_dir", "data", "split", "shots_split", "subjects", "groups", "shots")
    return json.dumps([[getattr(eval_args, k, None) for k in keys], flags.lm_eval_tasks, flags.lm_eval_include],
                      default=str)


def _environment(eval_args, flags):
    """The rendered tasks of these flags: made by check(), reused by run(), removed when run() ends."""
    key = _env_key(eval_args, flags)
    if key not in _ENVS:
        _ENVS[key] = _Env(eval_args, flags)
    return _ENVS[key]


def _drop_environment(eval_args, flags):
    env = _ENVS.pop(_env_key(eval_args, flags), None)
    if env is not None:
        env.close()


# ==== check / run ============================================================================================
def result_name(eval_args):
    """lm_eval-<tasks>-<k>shot[-<chat>]: runs of other tasks, shots or chat modes do not overwrite each other."""
    from utils.evals.common import digest

    names = "+".join(eval_args.lm_eval_tasks or [])
    stem = re.sub(r"[^A-Za-z0-9_.+-]+", "_", names)
    if len(stem) > 60:
        stem = f"{stem[:40]}-{digest(names, 8)}"
    chat = getattr(eval_args, "lm_eval_chat", "template")
    return f"lm_eval-{stem}-{eval_args.shots}shot" + ("" if chat == "template" else f"-{chat}")


def check(eval_args, flags, gen_args=None):
    """Every user error before a model loads: lm-eval missing, bad flags, missing data, unknown or broken tasks."""
    if not flags.lm_eval_tasks:
        raise UserError("--task lm_eval needs --lm_eval_tasks NAME [NAME ...]: the shipped "
                        f"{', '.join(MC_FAMILIES)} (with --data_dir), gsm8k_local (with --data), or any lm-eval task")
    if flags.lm_eval_chat not in CHAT_MODES:
        raise UserError(f"--lm_eval_chat must be one of {', '.join(CHAT_MODES)}, not '{flags.lm_eval_chat}'")
    if flags.lm_eval_include and not Path(flags.lm_eval_include).is_dir():
        raise UserError(f"--lm_eval_include {flags.lm_eval_include} is not a directory of lm-eval task YAMLs")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"--task lm_eval needs EleutherAI's lm-eval: pip install '{PIP_LINE}'") from None
    _quiet_lm_eval()
    env = _environment(eval_args, flags)
    if not env.checked:
        try:
            _build_tasks(env, env.names)
        except BaseException:
            _drop_environment(eval_args, flags)
            raise
        env.checked = True


def _build_tasks(env, names):
    """Build the tasks once (YAML, data, metrics), so that a broken one fails here rather than after the model loads."""
    try:
        with _hf_evaluate_importable():
            loaded = env.manager.load(list(names))
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise UserError(f"lm-eval could not build --lm_eval_tasks {' '.join(names)}: {type(exc).__name__}: {first} "
                        "(a hub dataset needs the network; a local task needs its YAML and data files)") from None
    for name, task in loaded["tasks"].items():
        if getattr(task.config, "process_results", None) is not None:
            continue
        for metric, fn in getattr(task, "_metric_fn_list", {}).items():
            if fn is None:
                raise UserError(f"lm-eval task '{name}': metric '{metric}' is neither lm-eval's own nor loadable "
                                "from HF evaluate (which needs the network); use one of lm-eval's metrics")


def _is_root(entry):
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


@contextmanager
def _hf_evaluate_importable():
    """lm-eval imports HF's `evaluate` for the few metrics it lacks; from the repo root that import would find our
    evaluate.py instead. Inside this block it finds the installed package (lm-eval's own metrics never import it)."""
    mod = sys.modules.get("evaluate")
    ours = mod is not None and _is_root(Path(getattr(mod, "__file__", "") or "").parent)
    if mod is not None and not ours:
        yield
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    if ours:
        del sys.modules["evaluate"]
    try:
        yield
    finally:
        sys.path[:] = saved
        if ours and "evaluate" not in sys.modules:
            sys.modules["evaluate"] = mod


_NOISE = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model", "generation_kwargs:",
          "Overwriting default num_fewshot", "Using pre-initialized model")


class _DropNoise(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith(_NOISE)


def _quiet_lm_eval():
    """lm-eval's info logs off; its warnings stay, except those that only say we passed a model object."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name in ("lm_eval.models.huggingface", "lm_eval.evaluator"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())


def make_lm(model, tokenizer, template, chat, batch_size):
    """lm-eval's HFLM around the loaded objects; with chat='template' its chat rendering is our template."""
    from lm_eval.models.huggingface import HFLM

    class TemplateHFLM(HFLM):
        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            msgs = [{"role": m["role"], "content": m["content"]} for m in chat_history]
            prefix = ""
            if not add_generation_prompt and msgs and msgs[-1]["role"] == "assistant":
                prefix = msgs.pop()["content"]  # a gen_prefix: the answer continues from it
            text = ""
            for seg, trainable in template.segments(msgs, add_generation_prompt=True, tokenizer=tokenizer):
                text += seg
                if trainable and template.kind == "format" and tokenizer.eos_token:
                    text += tokenizer.eos_token  # Template.encode appends EOS after each answer of a format template
            return text + prefix

    cls = TemplateHFLM if chat == "template" else HFLM
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)  # the device is the model's own


def _gen_kwargs(gen_args):
    if gen_args is None:
        return None
    kw = {"max_gen_toks": gen_args.max_new_tokens, "do_sample": gen_args.do_sample}
    if gen_args.do_sample:
        kw.update(temperature=gen_args.temperature, top_p=gen_args.top_p, top_k=gen_args.top_k)
    else:
        kw["temperature"] = 0.0
    if gen_args.num_beams != 1:
        kw["num_beams"] = gen_args.num_beams
    if gen_args.repetition_penalty != 1.0:
        kw["repetition_penalty"] = gen_args.repetition_penalty
    return kw


def _cache_path(ctx):
    """lm-eval's own response cache (sqlite, keyed by each request: prompt, continuation, generation settings) for
    this model: a rerun, or a killed run restarted, asks the model only what it has not answered yet."""
    from utils.evals.common import digest

    ident = ctx.handle.identity() if hasattr(ctx.handle, "identity") else repr(ctx.handle)
    path = Path(ctx.out_dir) / "cache" / f"lm_eval-{digest({'task': NAME, 'model': ident})}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run(ctx):
    """Run the tasks through lm-eval's simple_evaluate; per-item records go to
    OUT_DIR/<result name>-samples/<task>.jsonl."""
    from lm_eval.evaluator import simple_evaluate

    eval_args, flags = ctx.eval_args, ctx.flags
    check(eval_args, flags, ctx.gen_args)
    env = _environment(eval_args, flags)
    try:
        model, tokenizer, template, _ = ctx.handle.load()
        chat = flags.lm_eval_chat
        lm = make_lm(model, tokenizer, template, chat, eval_args.batch_size)
        out_dir = Path(ctx.out_dir)
        cache = _cache_path(ctx)
        with _hf_evaluate_importable():
            results = simple_evaluate(
                model=lm, tasks=list(env.names), task_manager=env.manager, num_fewshot=eval_args.shots,
                limit=eval_args.limit, batch_size=eval_args.batch_size, log_samples=True, use_cache=str(cache),
                apply_chat_template=chat != "none", fewshot_as_multiturn=chat != "none",
                system_instruction=flags.lm_eval_system, gen_kwargs=_gen_kwargs(ctx.gen_args), bootstrap_iters=1000)
    finally:
        _drop_environment(eval_args, flags)
    samples = results.pop("samples", {}) or {}
    sample_dir = out_dir / f"{result_name(eval_args)}-samples"
    for task, recs in samples.items():
        _write_jsonl(sample_dir / f"{task}.jsonl", [_sample_record(r) for r in recs])
    safe = json.loads(json.dumps(results, default=_jsonable))
    metrics, rows = _metrics(safe)
    return {"metrics": metrics, "table": _table(rows), "lm_eval": safe,
            "samples": str(sample_dir) if samples else None}


def _jsonable(o):
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(o)


def _sample_record(r):
    """A compact per-item record: doc id, target, the scores or generation, the pick and the metric values."""
    rec = {"doc_id": r.get("doc_id"), "target": r.get("target")}
    args = r.get("arguments") or []
    if args and isinstance(args[0], (list, tuple)) and args[0]:
        rec["prompt"] = args[0][0]  # the context, as the model read it (chat template applied)
        if isinstance(args[0][1], str):
            rec["continuations"] = [a[1] for a in args]
    resps = r.get("filtered_resps")
    if resps and isinstance(resps[0], (list, tuple)) and len(resps[0]) == 2 and isinstance(resps[0][0], float):
        lls = [float(x[0]) for x in resps]
        rec["logliks"] = lls
        rec["pred"] = max(range(len(lls)), key=lls.__getitem__)
    else:
        rec["output"] = r.get("resps")
        rec["filtered"] = resps
    for k in ("acc", "acc_norm", "exact_match"):
        if k in r:
            rec[k] = r[k]
    if r.get("filter") is not None:
        rec["filter"] = r["filter"]
    return json.loads(json.dumps(rec, default=_jsonable))


def _metrics(res):
    """{"<task>/<metric>[/<filter>]": value, "<task>/n": items} for every task and group, and the table rows."""
    metrics, rows = {}, []
    n = {t: v.get("effective") for t, v in (res.get("n-samples") or {}).items()}
    for group, subtasks in (res.get("group_subtasks") or {}).items():
        if group not in n and subtasks and all(t in n for t in subtasks):
            n[group] = sum(n[t] for t in subtasks)
    for task, vals in (res.get("results") or {}).items():
        count = n.get(task)
        for key, value in vals.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}/{metric}" + ("" if filt in ("", "none") else f"/{filt}")
            metrics[name] = value
            stderr = vals.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            rows.append([task, metric + ("" if filt in ("", "none") else f" ({filt})"), value,
                         stderr if isinstance(stderr, (int, float)) else None, count])
        if count is not None:
            metrics[f"{task}/n"] = count
    return metrics, rows


def _table(rows):
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
