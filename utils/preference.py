"""Preference training: `--stage dpo | orpo | kto | simpo` on preference data, with TRL's trainers.

Our data layer and templates stay the one source of prompts: every pair is tokenized here with the run's
Template (prompt ids = `template.prompt_ids(history)`, each answer = the tokens `Template.encode` trains for it,
end-of-turn token included), so the prompt of a preference run is token for token the prompt generate.py and
server.py build. TRL's trainers get those ids and compute the losses; they do not tokenize anything.

Stages and the TRL 1.16 class behind each (losses are TRL's, not re-implemented here):
    dpo    trl.DPOTrainer                  Rafailov et al. 2023; --loss_type picks TRL's variant (sigmoid = DPO,
                                           ipo, ...)
    kto    trl.KTOTrainer                  Ethayarajh et al. 2024; unpaired data (paired data is split in two)
    orpo   trl.experimental ORPOTrainer    Hong et al. 2024; reference-free, NLL + lambda * odds-ratio term
    simpo  trl.experimental CPOTrainer     Meng et al. 2024; loss_type="simpo", cpo_alpha=0 (length-normalised
                                           reward, target margin gamma, no reference)

The reference model (dpo, kto):
- LoRA-family and prompt-learning methods (PEFT adapters): the same PeftModel with the adapter disabled, i.e. the
  base model; no second copy of the weights is held. TRL copies a PeftModel's adapter into a frozen "ref" adapter;
  for a fresh adapter that copy is deleted again (a fresh LoRA-family adapter starts equal to the base).
- `--ref_adapter RUN`: the policy starts from that SFT adapter and the reference is its frozen copy ("ref").
- full / freeze / bottleneck adapters (nothing to disable): the reference log-probs of the initial model are
  computed over the whole training set before the first step (TRL's precompute_ref_log_probs), so no second
  copy is held either; this costs one forward pass over the data up front.
- `--ref_free` (dpo): no reference; the margin is the policy's alone.

Pair formats (detected per source, or named with --data FILE@FORMAT):
    hh_pairs  {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: A", "rejected": "... \\n\\nAssistant: B"}  (Anthropic
              hh-rlhf: full transcripts sharing a prefix, split into the prompt turns and the two final answers)
    pairs     {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages, "system"?}
              (UltraFeedback / TRL style; `instruction` (+ `input`) or `question` may replace `prompt`; message
              lists may repeat the prompt before the answer, or carry the whole conversation with no `prompt`)
    ranked    {"instruction" | "prompt", "input"?, "output": [best, ..., worst]}  (every ordered pair i < j)
    unpaired  {"prompt", "completion", "label": true | false}  (KTO; --stage kto also takes the paired formats)
"""
import hashlib
import json
import math
import re
from dataclasses import replace
from pathlib import Path

from utils.errors import UserError

STAGES = ("dpo", "orpo", "kto", "simpo")
PAIR_FORMATS = ("hh_pairs", "pairs", "ranked", "unpaired")
# defaults from the papers: DPO beta 0.1; KTO beta 0.1; ORPO lambda 0.1; SimPO beta 2.0 with gamma / beta = 0.5
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
SIMPO_GAMMA_RATIO = 0.5
# TRL 1.16's DPO loss variants (DPOConfig.loss_type) and KTO losses (KTOConfig.loss_type)
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
REFERENCE_STAGES = ("dpo", "kto")  # the stages whose loss compares against a reference model
PROMPT_KEYS = ("prompt", "instruction", "question")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
FORMATS_HELP = ("chosen/rejected hh-rlhf transcripts (hh_pairs), prompt/chosen/rejected (pairs), an instruction "
                "with a ranked output list (ranked), or prompt/completion/label rows (unpaired, for kto)")


def msg(role, content, input_text=""):
    return {"role": role, "content": content, "input": input_text}


# ---- pair formats ---------------------------------------------------------------------------------------
def detect_pair_format(row, where, stage="dpo"):
    """The pair format of a row, from its columns."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object but {type(row).__name__}; rows must be objects")
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        if keys & set(PROMPT_KEYS) or not isinstance(row["chosen"], str):
            return "pairs"
        return "hh_pairs"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if isinstance(row.get("output", row.get("outputs")), list) and keys & set(PROMPT_KEYS):
        return "ranked"
    raise UserError(f"{where} is not preference data (it has columns {', '.join(map(str, sorted(keys)))}); "
                    f"--stage {stage} needs {FORMATS_HELP}; see README, or name the format with --data FILE@FORMAT")


def _string(row, key, where):
    value = row.get(key)
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise UserError(f"{where} field '{key}' must be a string, not {what}")
    return value


def _message_list(value, where, key):
    """A list of {role, content} (or ShareGPT {from, value}) messages -> our messages."""
    from utils.formats import ROLE_ALIASES

    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} field '{key}' must be a string or a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise UserError(f"{where} field '{key}' message {i} is not an object with 'role' and 'content'")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if ROLE_ALIASES.get(str(role).lower()) is None or not isinstance(content, str):
            raise UserError(f"{where} field '{key}' message {i} needs a role (system, user or assistant) and a "
                            "string content")
        out.append(msg(ROLE_ALIASES[str(role).lower()], content))
    return out


def _prompt(row, where):
    """The prompt messages of a row: 'prompt' (text or messages), or 'instruction' (+ 'input'), or 'question'."""
    key = next(k for k in PROMPT_KEYS if k in row)
    value = row[key]
    if key == "instruction":
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            raise UserError(f"{where} field 'input' must be a string")
        msgs = [msg("user", _string(row, key, where), inp)]
    elif isinstance(value, str):
        msgs = [msg("user", value)]
    else:
        msgs = _message_list(value, where, key)
    system = row.get("system")
    if isinstance(system, str) and system and not any(m["role"] == "system" for m in msgs):
        msgs = [msg("system", system)] + msgs
    if msgs[-1]["role"] != "user":
        raise UserError(f"{where} field '{key}' must end with a user message (the turn the answers reply to)")
    return msgs


def _same(a, b):
    def strip(msgs):
        return [(m["role"], m["content"].strip()) for m in msgs if m["role"] != "system"]
    return strip(a) == strip(b)


def _answer(row, key, prompt, where):
    """(context messages or None, answer text) of a 'chosen' / 'rejected' / 'completion' value."""
    value = row.get(key)
    if isinstance(value, str):
        return None, value
    msgs = _message_list(value, where, key)
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where} field '{key}' must end with the assistant's answer")
    context = msgs[:-1]
    if prompt is not None and context and not _same(context, prompt):
        raise UserError(f"{where} field '{key}' continues another conversation than the prompt; give the answer "
                        "alone or the prompt messages followed by it")
    return context, msgs[-1]["content"]


def _pairs(row, where):
    prompt = _prompt(row, where) if any(k in row for k in PROMPT_KEYS) else None
    (c_ctx, chosen), (r_ctx, rejected) = _answer(row, "chosen", prompt, where), _answer(row, "rejected", prompt, where)
    if prompt is None:
        if not c_ctx or not r_ctx:
            raise UserError(f"{where} has no 'prompt': 'chosen' and 'rejected' must then be whole conversations "
                            "(message lists ending with the answer)")
        if not _same(c_ctx, r_ctx):
            raise UserError(f"{where}: 'chosen' and 'rejected' continue different conversations; they must share "
                            "every message before the answer")
        prompt = c_ctx
        if prompt[-1]["role"] != "user":
            raise UserError(f"{where}: the conversation before the answers must end with a user message")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]


def _hh_pairs(row, where):
    chosen, rejected = _string(row, "chosen", where), _string(row, "rejected", where)
    if HH_ASSISTANT not in "\n\n" + chosen or HH_ASSISTANT not in "\n\n" + rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are not hh-rlhf transcripts (\\n\\nHuman: ... "
                        "\\n\\nAssistant: ...); for plain answers give a 'prompt' column too")
    if not chosen.startswith("\n\n"):
        chosen, rejected = "\n\n" + chosen, "\n\n" + rejected
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)  # the last answer cue inside the shared prefix
    if cut < 0:
        raise UserError(f"{where}: 'chosen' and 'rejected' share no prompt ending with '\\n\\nAssistant:'; both must "
                        "be the same conversation with different final answers")
    start = cut + len(HH_ASSISTANT)
    answers = chosen[start:], rejected[start:]
    if any(HH_HUMAN in a for a in answers):
        return "the transcripts differ before their last answer"
    from utils.formats import transcript

    prompt = transcript({"text": chosen[:start]}, where, False)
    if not prompt or prompt[-1]["role"] != "user":
        return "the turns do not alternate Human / Assistant"
    return [{"prompt": prompt, "chosen": answers[0].strip(), "rejected": answers[1].strip()}]


def _ranked(row, where):
    key = "output" if "output" in row else "outputs"
    outputs = row[key]
    if len(outputs) < 2 or not all(isinstance(o, str) for o in outputs):
        raise UserError(f"{where} field '{key}' must list at least two answers (strings), best first")
    prompt = _prompt(row, where)
    return [{"prompt": prompt, "chosen": outputs[i], "rejected": outputs[j]}
            for i in range(len(outputs)) for j in range(i + 1, len(outputs))]


def _unpaired(row, where):
    prompt = _prompt(row, where) if any(k in row for k in PROMPT_KEYS) else None
    if prompt is None:
        raise UserError(f"{where} needs a 'prompt' beside 'completion' and 'label'")
    _, completion = _answer(row, "completion", prompt, where)
    label = row.get("label")
    if isinstance(label, str) and label.lower() in ("true", "false"):
        label = label.lower() == "true"
    if label not in (True, False, 0, 1):
        raise UserError(f"{where} field 'label' must be true (a desirable answer) or false, not {label!r}")
    return [{"prompt": prompt, "completion": completion, "label": bool(label)}]


CONVERTERS = {"hh_pairs": _hh_pairs, "pairs": _pairs, "ranked": _ranked, "unpaired": _unpaired}


def convert_pair_row(row, fmt, where, columns=None):
    """A row -> a list of examples ({prompt, chosen, rejected} or {prompt, completion, label}), or the reason
    (a string) it is skipped."""
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a JSON object but {type(row).__name__}; rows must be objects")
    if columns:
        row = dict(row, **{ours: row[theirs] for ours, theirs in columns.items() if theirs in row})
    out = CONVERTERS[fmt](row, where)
    if isinstance(out, str):
        return out
    kept = [ex for ex in out if "completion" in ex or ex["chosen"].strip() != ex["rejected"].strip()]
    if not kept:
        return "the chosen and the rejected answer are the same"
    return kept


# ---- reading --------------------------------------------------------------------------------------------
def split_value(value):
    """SOURCE[@FORMAT][:N] with a pair format -> (source, format or None, N or None)."""
    from utils.data import split_spec

    return split_spec(value, PAIR_FORMATS, "'{fmt}' is not a preference format")


def sample(examples, count, seed, label):
    """N examples (a seeded sample; more than there are repeats them) or a fraction; the order of data.py's :N."""
    from utils.data import sample_indices

    if count is None:
        return examples
    total = len(examples)
    return [examples[i] for i in sample_indices(total, count, seed,
                                                f"--data {label}:{count:g} selects no pairs out of {total}")]


def load_source_examples(src, fmt, stage):
    """(examples, stats) of one resolved data source."""
    from utils import data as data_lib
    from utils.formats import FORMATS

    fmt = fmt or src.format
    if fmt in FORMATS:
        raise UserError(f"--stage {stage} needs preference data, but '{src.label}' is {fmt} instruction data; use a "
                        f"preference source ({FORMATS_HELP}), e.g. --data hh_rlhf_pairs, or --stage sft")
    stats = {"source": src.label, "origin": src.origin or src.label, "rows": 0, "skipped": 0,
             "skipped_because": {}, "format": fmt}
    examples = []
    for where, row, _ in data_lib._rows(src.paths, src.hub_dataset):
        if stats["format"] is None:
            stats["format"] = detect_pair_format(row, where, stage)
        stats["rows"] += 1
        got = convert_pair_row(row, stats["format"], where, src.columns)
        if isinstance(got, str):
            stats["skipped"] += 1
            stats["skipped_because"][got] = stats["skipped_because"].get(got, 0) + 1
            continue
        examples += got
    name = ", ".join(map(str, src.paths)) or src.hub_dataset
    if stats["rows"] == 0:
        raise UserError(f"{name} has no rows")
    if not examples:
        raise UserError(f"none of the {stats['rows']} rows of {name} gives a preference pair "
                        f"({'; '.join(stats['skipped_because'])}); check the file")
    unpaired = stats["format"] == "unpaired"
    if unpaired and stage != "kto":
        raise UserError(f"--stage {stage} needs pairs, but {name} holds unpaired prompt/completion/label rows; use "
                        "--stage kto for them, or give chosen/rejected pairs")
    # KTO learns from single answers: each pair gives a desirable and an undesirable one
    if stage == "kto" and not unpaired:
        examples = [dict(prompt=ex["prompt"], completion=ex[side], label=side == "chosen")
                    for ex in examples for side in ("chosen", "rejected")]
    stats["examples"] = len(examples)
    return examples, stats


def load_preference_data(values, stage, seed=42):
    """[(examples, stats)] for every --data value (registry names, mixes, files, hub ids; @FORMAT and :N)."""
    from utils import data as data_lib

    out = []
    for value in values:
        name, fmt, count = split_value(value)
        sources = data_lib.resolve_sources([name])
        if count is not None and len(sources) > 1:
            raise UserError(f"--data {value}: a sample size applies to one dataset, not to a mix; write its parts "
                            "with sizes instead")
        for src in sources:
            examples, stats = load_source_examples(src, fmt, stage)
            examples = sample(examples, count, seed, name)
            out.append((examples, dict(stats, used=len(examples))))
    return out


def example_key(ex):
    """Identity of an example (prompt, answers, label): --exclude_data matches on it."""
    prompt = [[m["role"], m["content"], m.get("input") or ""] for m in ex["prompt"]]
    rest = [ex["chosen"], ex["rejected"]] if "chosen" in ex else [ex["completion"], ex["label"]]
    return hashlib.sha256(json.dumps([prompt, rest], ensure_ascii=False).encode()).hexdigest()[:16]


# ---- tokenization -----------------------------------------------------------------------------------------
class Encoder:
    """Prompt and answer token ids with the run's template (what generate.py sends, what training scores)."""

    def __init__(self, tokenizer, template, cutoff_len, cot_prompt=False):
        self.tokenizer, self.template, self.cutoff_len, self.cot_prompt = tokenizer, template, cutoff_len, cot_prompt

    def prompt_ids(self, prompt):
        return self.template.prompt_ids(self.tokenizer, prompt)

    def answer_ids(self, prompt, answer, prompt_ids=None):
        """The tokens Template.encode trains for `answer` after `prompt` (its end-of-turn token included)."""
        prompt_ids = self.prompt_ids(prompt) if prompt_ids is None else prompt_ids
        ids, labels = self.template.encode(self.tokenizer, prompt + [msg("assistant", answer)])
        if ids[:len(prompt_ids)] != prompt_ids:
            raise UserError(f"the template '{self.template.name}' renders the prompt differently when an answer "
                            "follows, so answers cannot be cut from it; pick another --template")
        trained = [i for i, lab in enumerate(labels[len(prompt_ids):]) if lab != -100]
        return ids[len(prompt_ids):len(prompt_ids) + trained[-1] + 1] if trained else []

    def _fit(self, prompt):
        """(prompt messages, prompt ids, turns dropped): earlier exchanges are dropped from the start while the
        prompt takes more than half of --cutoff_len (the last user turn always stays)."""
        ids, dropped = self.prompt_ids(prompt), 0
        while len(ids) > self.cutoff_len // 2:
            body = [i for i, m in enumerate(prompt) if m["role"] != "system"]
            if len(body) < 3:  # only the last user turn is left
                break
            drop = set(body[:2])  # the oldest user turn and its answer
            prompt = [m for i, m in enumerate(prompt) if i not in drop]
            ids, dropped = self.prompt_ids(prompt), dropped + 1
        return prompt, ids, dropped

    def encode(self, ex):
        """Token ids of one example, fitted to --cutoff_len; (row, None) or (None, the reason it is dropped)."""
        from utils.formats import add_cot_prompt

        prompt = add_cot_prompt(ex["prompt"]) if self.cot_prompt else ex["prompt"]
        full_ids = self.prompt_ids(prompt)
        sides = ("chosen", "rejected") if "chosen" in ex else ("completion",)
        answers = {s: self.answer_ids(prompt, ex[s], full_ids) for s in sides}
        if not all(answers.values()):
            return None, "an answer has no token to train (empty answer)"
        longest = max(len(a) for a in answers.values())
        trimmed = 0
        if len(full_ids) + longest > self.cutoff_len:
            prompt, full_ids, trimmed = self._fit(prompt)
        room = self.cutoff_len - len(full_ids)
        if room < 1:
            return None, "the prompt alone fills --cutoff_len"
        cut = {s: a[:room] for s, a in answers.items()}
        if "chosen" in ex and cut["chosen"] == cut["rejected"]:
            return None, "the answers are the same within --cutoff_len"
        row = {"prompt_ids": full_ids, **{f"{s}_ids": cut[s] for s in sides}}
        if "label" in ex:
            row["label"] = ex["label"]
        info = {"turns_dropped": trimmed, "truncated": any(len(cut[s]) < len(answers[s]) for s in sides)}
        return row, info


def tokenize(examples, encoder):
    """(rows of token ids, report): the dropped examples are counted by reason."""
    rows, dropped, trimmed, truncated = [], {}, 0, 0
    for ex in examples:
        row, info = encoder.encode(ex)
        if row is None:
            dropped[info] = dropped.get(info, 0) + 1
            continue
        rows.append(row)
        trimmed += info["turns_dropped"] > 0
        truncated += info["truncated"]
    return rows, {"dropped": dropped, "earlier_turns_dropped": trimmed, "answers_truncated": truncated}


def prepare_data(data_args, train_args, tokenizer, template):
    """Tokenized (train, val) Datasets and a report."""
    import datasets

    from utils import data as data_lib

    encoder = Encoder(tokenizer, template, data_args.cutoff_len, data_args.cot_prompt)
    rows, sources, dropped = [], [], {}
    report = {"sources": sources, "earlier_turns_dropped": 0, "answers_truncated": 0}
    for examples, stats in load_preference_data(data_args.data, train_args.stage, train_args.seed):
        got, rep = tokenize(examples, encoder)
        rows += got
        sources.append(dict(stats, dropped_by_cutoff=sum(rep["dropped"].values())))
        for k, v in rep["dropped"].items():
            dropped[k] = dropped.get(k, 0) + v
        report["earlier_turns_dropped"] += rep["earlier_turns_dropped"]
        report["answers_truncated"] += rep["answers_truncated"]
    report["dropped"] = dropped
    if not rows:
        raise UserError(f"no preference example is left at --cutoff_len {data_args.cutoff_len} "
                        f"({'; '.join(dropped)}); raise --cutoff_len")
    train, val = data_lib.split(rows, data_args.val_set_size, train_args.seed)
    if train_args.stage == "kto" and len({r["label"] for r in train}) < 2:
        raise UserError("--stage kto needs desirable and undesirable answers (label true and false) in the "
                        "training data; it has only one kind")
    report.update(train=len(train), val=len(val))
    def to_ds(rs):
        return datasets.Dataset.from_list(rs) if rs else None
    return to_ds(train), to_ds(val), report


def print_data_report(report, train, tokenizer, stage):
    from utils import data as data_lib

    unit = "answers" if stage == "kto" else "pairs"
    for s in report["sources"]:
        origin = f" from {s['origin']}" if s.get("origin") not in (None, s["source"]) else ""
        why = "; ".join(f"{n} {k}" for k, n in s["skipped_because"].items())
        print(f"data: {s['source']}{origin} ({s['format']}): {s['rows']} rows -> {s['examples']} {unit}, "
              f"{s['skipped']} rows skipped{f' ({why})' if why else ''}, {s['used']} used, "
              f"{s['dropped_by_cutoff']} dropped at --cutoff_len")
    why = "; ".join(f"{n}: {k}" for k, n in report["dropped"].items())
    print(f"data: {report['train']} train / {report['val']} validation {unit}; {report['earlier_turns_dropped']} "
          f"prompts lost earlier turns to fit --cutoff_len, {report['answers_truncated']} had answers truncated"
          + (f"; dropped: {why}" if why else ""))
    lengths = sorted(len(r["prompt_ids"]) + max(len(r.get(k) or []) for k in ("chosen_ids", "rejected_ids",
                                                                              "completion_ids")) for r in train)
    def pct(q):
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    print(f"data: tokens per example (prompt + longer answer) min {lengths[0]} / p50 {pct(0.5)} / p90 {pct(0.9)} / "
          f"max {lengths[-1]}")
    ex = train[0]
    print("example (the loss is computed only inside ⟦ ⟧):")
    sides = ("chosen", "rejected") if "chosen_ids" in ex else ("completion",)
    for side in sides:
        ids = ex["prompt_ids"] + ex[f"{side}_ids"]
        labels = [-100] * len(ex["prompt_ids"]) + ex[f"{side}_ids"]
        title = side if side != "completion" else f"completion (label: {'desirable' if ex['label'] else 'undesirable'})"
        print(f"--- {title}:")
        print(data_lib.render_masked(tokenizer, ids, labels))


# ---- arguments --------------------------------------------------------------------------------------------
PREFERENCE_FLAGS = ("beta", "loss_type", "ref_free", "ref_adapter", "simpo_gamma")


def check_sft_flags(train_args):
    """--stage sft takes none of the preference flags."""
    given = [f for f in PREFERENCE_FLAGS if getattr(train_args, f, None) not in (None, False)]
    if given:
        raise UserError(f"--{given[0]} applies to the preference stages (--stage dpo, orpo, kto, simpo), not to "
                        "--stage sft; add --stage dpo (or another) or drop the flag")


def check_sft_data(values):
    """--stage sft on a registered preference dataset: one sentence naming both ways to use it."""
    from utils import data as data_lib

    datasets, _ = data_lib.registry()
    for value in values:
        name = value.rsplit(":", 1)[0] if re.search(r":[0-9.]+$", value) else value
        if "@" in name:
            continue  # a format named explicitly (e.g. @transcript: SFT on the chosen transcripts)
        fmt = (datasets.get(name) or {}).get("format")
        if fmt in PAIR_FORMATS:
            raise UserError(f"--data {value} holds preference pairs ({fmt}); train on them with --stage dpo (or orpo, "
                            f"kto, simpo), or for SFT on the chosen answers pass --data {name}@transcript")


def stage_settings(train_args):
    """The stage's settings with the papers' defaults filled in; impossible combinations are one sentence."""
    stage = train_args.stage
    beta = train_args.beta if train_args.beta is not None else DEFAULT_BETA[stage]
    loss = train_args.loss_type
    if loss is not None:
        valid = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES}.get(stage)
        if valid is None:
            raise UserError(f"--loss_type applies to --stage dpo and kto; --stage {stage} has one loss (drop the flag)")
        if loss not in valid:
            raise UserError(f"--loss_type {loss} is not a {stage} loss; TRL's {stage} losses are: {', '.join(valid)}")
    loss = loss or {"dpo": "sigmoid", "kto": "kto", "orpo": "orpo", "simpo": "simpo"}[stage]
    if train_args.ref_free and stage != "dpo":
        raise UserError(f"--ref_free applies to --stage dpo; {stage} "
                        + ("needs its reference model" if stage == "kto" else "never uses a reference model")
                        + " (drop the flag)")
    if train_args.simpo_gamma is not None and stage != "simpo":
        raise UserError(f"--simpo_gamma applies to --stage simpo, not {stage}; drop the flag")
    out = {"stage": stage, "beta": beta, "loss_type": loss, "ref_free": bool(train_args.ref_free),
           "ref_adapter": str(Path(train_args.ref_adapter).resolve()) if train_args.ref_adapter else None}
    if stage == "simpo":
        out["simpo_gamma"] = train_args.simpo_gamma if train_args.simpo_gamma is not None else SIMPO_GAMMA_RATIO * beta
    return out


def check_method(peft_type, stage):
    from utils.peft_methods import load_preset

    preset = load_preset(peft_type)
    if preset["builder"] == "peft.AdaLoraConfig":
        raise UserError(f"--peft_type adalora cannot train --stage {stage}: AdaLoRA allows one trainable adapter and "
                        "no frozen reference copy, and its orthogonality penalty is part of the SFT loss only; use "
                        "lora, dora or another LoRA-family method")
    if preset.get("needs_gpu"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--peft_type {peft_type} needs a GPU")


def reference_mode(settings, loader, ref_adapter):
    """How the reference log-probs are obtained: none, disabled (adapter off), ref_adapter or precomputed."""
    if settings["stage"] not in REFERENCE_STAGES or settings["ref_free"]:
        return "none"
    if loader == "peft":
        return "ref_adapter" if ref_adapter else "disabled"
    return "precomputed"


REFERENCE_WORDS = {
    "none": "none (the loss needs no reference model)",
    "disabled": "the base model: the adapter disabled (no second copy of the weights)",
    "ref_adapter": "the --ref_adapter SFT adapter, kept as a frozen copy named 'ref'",
    "precomputed": "the initial model's log-probs, computed over the training data before the first step (no "
                   "second copy of the weights)",
}


def open_ref_adapter(ref_adapter, model_args, data_args, peft_args):
    """--ref_adapter RUN: the run's base model and template apply (checked against the flags); (run, model_args)."""
    from utils.loader import open_run
    from utils.peft_methods import capability

    run = open_run(ref_adapter)
    if capability(run.peft_type, "loader") != "peft":
        raise UserError(f"--ref_adapter {ref_adapter} holds a {run.peft_type} adapter; only PEFT adapters (lora, "
                        "dora, ia3, ...) can be continued by a preference stage")
    if peft_args.peft_type != run.peft_type:
        raise UserError(f"--ref_adapter {ref_adapter} is a {run.peft_type} adapter and the policy continues it; pass "
                        f"--peft_type {run.peft_type} (not {peft_args.peft_type})")
    if data_args.template and data_args.template != run.template.name:
        raise UserError(f"--ref_adapter {ref_adapter} was trained with the template '{run.template.name}'; drop "
                        f"--template {data_args.template} (the preference stage must use the same prompts)")
    if model_args.model_name_or_path is None:
        model_args = replace(model_args, model_name_or_path=run.meta["base_model"],
                             trust_remote_code=model_args.trust_remote_code or bool(run.meta.get("trust_remote_code")))
    return run, model_args


# ---- trainers ---------------------------------------------------------------------------------------------
def _toolkit_trainer(base):
    """Our ToolkitTrainer (atomic checkpoints, tokens/s) on top of a TRL trainer class."""
    from utils.trainer import ToolkitTrainer

    class Trainer(ToolkitTrainer, base):
        def create_model_card(self, *args, **kwargs):
            pass  # the run directory documents itself (finetune_meta.json); no README.md in it

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            if self.args.bf16 or self.args.fp16:  # the autocast wrapper is for the training loop only
                self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
            return result

    Trainer.__name__ = Trainer.__qualname__ = f"Toolkit{base.__name__}"
    return Trainer


def trainer_class(stage):
    """The trainer class of a stage, made to take our token ids instead of tokenizing text."""
    import os

    if stage == "dpo":
        from trl import DPOTrainer

        class Trainer(_toolkit_trainer(DPOTrainer)):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # already {prompt_ids, chosen_ids, rejected_ids} from our template

            def _precompute_ref_logps(self, dataset, name, batch_size):
                if "ref_chosen_logps" in dataset.column_names:  # --ref_free: zeros, no reference forward
                    return dataset
                return super()._precompute_ref_logps(dataset, name, batch_size)

        return Trainer
    if stage == "kto":
        from trl import KTOTrainer

        class Trainer(_toolkit_trainer(KTOTrainer)):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                if not self.calculate_KL:
                    return dataset

                def mismatched(batch):  # KTO's KL term: each prompt with its batch neighbour's completion
                    c = batch["completion_ids"]
                    return {"KL_completion_ids": c[-1:] + c[:-1]}

                return dataset.map(mismatched, batched=True, batch_size=args.per_device_train_batch_size)

        return Trainer
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental in TRL 1.16
    if stage == "orpo":
        from trl.experimental.orpo import ORPOTrainer as base
    else:
        from trl.experimental.cpo import CPOTrainer as base

    class Trainer(_toolkit_trainer(base)):
        def tokenize_row(self, feature, model=None):
            p = feature["prompt_ids"]
            out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for side in ("chosen", "rejected"):
                answer = feature[f"{side}_ids"]
                out[f"{side}_input_ids"] = p + answer
                out[f"{side}_attention_mask"] = [1] * (len(p) + len(answer))
                out[f"{side}_labels"] = [-100] * len(p) + answer
            return out

        def _track_num_input_tokens(self, inputs):
            import torch

            if self.args.include_num_input_tokens_seen == "no":
                return
            n = sum(inputs[f"{s}_attention_mask"].sum() for s in ("chosen", "rejected"))
            n = torch.as_tensor(n, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(n).sum().item()

    return Trainer


def config_class(stage):
    import os

    if stage == "dpo":
        from trl import DPOConfig as cls
    elif stage == "kto":
        from trl import KTOConfig as cls
    else:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        if stage == "orpo":
            from trl.experimental.orpo import ORPOConfig as cls
        else:
            from trl.experimental.cpo import CPOConfig as cls
    return cls


def stage_config_kwargs(settings, reference, cutoff_len):
    """The TRL config fields of the stage (the TrainingArguments part comes from utils.train)."""
    stage = settings["stage"]
    kw = {"beta": settings["beta"]}
    if stage == "dpo":
        # --ref_free: the reference log-probs are zeros in the data, read as "precomputed" (no reference model)
        kw.update(loss_type=[settings["loss_type"]], max_length=None, pad_to_multiple_of=None,
                  precompute_ref_log_probs=reference == "precomputed" or settings["ref_free"])
    elif stage == "kto":
        kw.update(loss_type=settings["loss_type"], max_length=None, precompute_ref_log_probs=reference == "precomputed",
                  pad_to_multiple_of=None, train_sampling_strategy="sequential")
    elif stage == "orpo":
        kw.update(max_length=cutoff_len)
    else:
        kw.update(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=settings["simpo_gamma"], max_length=cutoff_len)
    return kw


# ---- the run ----------------------------------------------------------------------------------------------
def bf16_plan(model, train, train_args, quant_bits):
    """(bf16 autocast?, why): --bf16 auto keeps fp32 when the first chosen answers' loss moves > 2% under bf16."""
    import torch

    from utils import packing
    from utils.peft_methods import cpu_has_bf16
    from utils.train import BF16_LOSS_TOLERANCE, PadCollator, decide_bf16

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    on, why = decide_bf16(train_args.bf16, torch.cuda.is_available(), cpu_has_bf16(),
                          str(dtype).replace("torch.", ""), bool(quant_bits))
    if on and train_args.bf16 == "auto":
        sides = "chosen_ids" if "chosen_ids" in train.column_names else "completion_ids"
        probe = [{"input_ids": r["prompt_ids"] + r[sides], "labels": [-100] * len(r["prompt_ids"]) + r[sides]}
                 for r in train.select(range(min(len(train), 4)))]
        batch = PadCollator(model.config.pad_token_id or 0)(probe)
        fp32, bf16 = packing.batch_loss(model, batch), packing.batch_loss(model, batch, bf16=True)
        gap = abs(bf16 - fp32) / max(abs(fp32), 1e-6)
        if gap > BF16_LOSS_TOLERANCE:
            return False, (f"first chosen answers' loss {bf16:.4f} in bf16 vs {fp32:.4f} in fp32 "
                           f"({100 * gap:.1f}% apart)")
        why += f"; first chosen answers' loss {bf16:.4f} vs {fp32:.4f} in fp32 ({100 * gap:.2f}% apart)"
    return on, why


ANSWER_COLUMNS = ("chosen_ids", "rejected_ids", "completion_ids")


def group_by_length(flag, settings):
    """Length-grouped batches (less padding): on by default, except for kto's KL term (it needs a fixed order)."""
    kl = settings["stage"] == "kto" and settings["loss_type"] == "kto"
    if flag and kl:
        raise UserError("--group_by_length cannot be used with --stage kto: its KL term pairs each answer with its "
                        "neighbours in a fixed order; drop the flag (or use --loss_type apo_zero_unpaired)")
    return not kl if flag is None else bool(flag)


def build_preference_run(model_args, data_args, peft_args, train_args):
    """A Run for --stage dpo / orpo / kto / simpo (None for --dry_run)."""
    from utils import train as T
    from utils.peft_methods import capability, steps_for_run

    settings = stage_settings(train_args)
    stage = settings["stage"]
    check_stage_flags(data_args, peft_args, stage)
    ref_run = None
    if train_args.ref_adapter:
        ref_run, model_args = open_ref_adapter(train_args.ref_adapter, model_args, data_args, peft_args)
    setup = T.setup_run(model_args, data_args, peft_args, train_args, template=ref_run.template if ref_run else None)
    micro, _ = T.decide_micro_batch(train_args.micro_batch_size, train_args.per_gpu_train_batch_size)
    if stage == "kto" and settings["loss_type"] == "kto" and micro < 2:
        raise UserError("--stage kto estimates its KL term from the other answers of a pass, so it needs at least 2 "
                        "samples per pass; raise --per_gpu_train_batch_size or --micro_batch_size")
    train, val, report = prepare_data(data_args, train_args, setup.tokenizer, setup.template)
    main = T.is_main_process()
    reference = reference_mode(settings, capability(peft_args.peft_type, "loader"), bool(ref_run))
    if main:
        print(f"model: {setup.describe()}; stage: {stage} (beta {settings['beta']:g}, loss {settings['loss_type']}"
              + (f", gamma {settings['simpo_gamma']:g}" if stage == "simpo" else "") + ")")
        print(f"reference: {REFERENCE_WORDS[reference]}")
        print_data_report(report, train, setup.tokenizer, stage)
    if data_args.dry_run:
        return None

    resume = T.resolve_resume(train_args.resume_from_checkpoint, setup.output_dir,
                              say=print if main else (lambda *a: None))
    total_steps = steps_for_run(len(train), train_args.per_gpu_train_batch_size, train_args.gradient_accumulation_steps,
                                train_args.epochs, train_args.max_steps, T.world_size())
    model, callbacks = load_policy(setup, peft_args, train_args, total_steps, ref_run)
    trainable, total, global_batch = T.report_scale(model, train_args, total_steps)
    bf16, why_bf16 = bf16_plan(model, train, train_args, setup.quant_bits)
    group = group_by_length(data_args.group_by_length, settings)
    if group:  # the Trainer's length-grouped samplers (train and eval) read this column
        train, val = _with_length(train), val and _with_length(val)
    speed = {"bf16": bf16, "micro_batch": micro, "packing": False, "selective_loss": False, "group_by_length": group,
             "summary": f"padded batches (TRL's collator){', length-grouped' if group else ''}; bf16 autocast "
                        f"{'on' if bf16 else 'off'} ({why_bf16})"}
    if main:
        print(f"speed: {speed['summary']}")
    trainer = _stage_trainer(model, callbacks, train, val, setup, settings, reference, data_args, train_args, speed)
    meta = T.run_meta(setup, model_args, data_args, peft_args, train_args, trainable, total, report, global_batch,
                      speed)
    meta.update(stage=stage, preference=dict(settings, reference=reference))
    return T.Run((model_args, data_args, peft_args, train_args), trainer, model, setup.tokenizer, setup.template,
                 train, val, report, meta, setup.output_dir, resume, before_save=_drop_reference_adapter)


def check_stage_flags(data_args, peft_args, stage):
    """The sft-only data flags and the method, against a preference stage (one sentence each)."""
    if data_args.packing == "on":
        raise UserError(f"--packing on applies to --stage sft; --stage {stage} pads each batch (drop the flag)")
    if data_args.train_on_inputs:
        raise UserError("--train_on_inputs applies to --stage sft; a preference loss compares answers only")
    check_method(peft_args.peft_type, stage)


def _stage_trainer(model, callbacks, train, val, setup, settings, reference, data_args, train_args, speed):
    """TRL's trainer of the stage on the tokenized pairs, with the reference set up as `reference` says."""
    from utils import train as T

    stage = settings["stage"]
    if settings["ref_free"]:  # no reference forward: the reference log-probs are zeros, read from the batch
        train, val = _with_zero_reference(train), val and _with_zero_reference(val)
    args = T._training_arguments(train_args, str(setup.output_dir), val is not None, speed, config_class(stage),
                                stage_config_kwargs(settings, reference, data_args.cutoff_len))
    trainer = trainer_class(stage)(model=model, args=args, train_dataset=train, eval_dataset=val,
                                   processing_class=setup.tokenizer, callbacks=callbacks)
    policy = trainer.model
    if reference != "ref_adapter" and "ref" in getattr(policy, "peft_config", {}):
        policy.delete_adapter("ref")  # a fresh adapter starts as the base: the reference is the adapter disabled
        policy.set_adapter("default")
    T.add_throughput(trainer)
    return trainer


def _with_length(dataset):
    return dataset.add_column("length", [len(r["prompt_ids"]) + max(len(r.get(k) or []) for k in ANSWER_COLUMNS)
                                         for r in dataset])


def _with_zero_reference(dataset):
    n = len(dataset)
    return dataset.add_column("ref_chosen_logps", [0.0] * n).add_column("ref_rejected_logps", [0.0] * n)


def load_policy(setup, peft_args, train_args, total_steps, ref_run):
    """The base model with the method attached, or --ref_adapter's adapter made trainable again."""
    from transformers import set_seed

    from utils.models import load_model
    from utils.peft_methods import attach_adapter

    model = load_model(setup.path, setup.model_args.dtype, setup.model_args.trust_remote_code,
                       setup.tokenizer.pad_token_id, setup.quant_bits)
    set_seed(train_args.seed)  # adapter init depends on --seed alone
    if ref_run is None:
        return attach_adapter(model, peft_args, setup.spec, total_steps, train_args.gradient_checkpointing)
    from peft import PeftModel

    if setup.quant_bits:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train_args.gradient_checkpointing)
    try:
        model = PeftModel.from_pretrained(model, str(ref_run.path), is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"the adapter in {ref_run.path} does not fit the base model {setup.path} "
                        f"({str(exc).splitlines()[0][:200]}); drop --model_name_or_path to use the run's own base") \
            from None
    if train_args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, []


def _drop_reference_adapter(run):
    """Only the trained adapter goes into the run directory (never TRL's frozen 'ref' copy)."""
    model = run.trainer.accelerator.unwrap_model(run.trainer.model)
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


FINAL_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
              "logps/rejected", "kl", "nll_loss", "log_odds_ratio")


def final_metrics(log_history, eval_metrics=None):
    """The last logged value of each preference metric (train), and the final evaluation's."""
    out = {}
    for h in log_history:
        for k in FINAL_KEYS:
            if k in h and isinstance(h[k], (int, float)) and math.isfinite(h[k]):
                out[f"last_{k}"] = h[k]
    for k, v in (eval_metrics or {}).items():
        if k.startswith("eval_") and any(k == f"eval_{f}" for f in FINAL_KEYS):
            out[k] = v
    return out
