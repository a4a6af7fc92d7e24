"""Vocabulary expansion (`--extend_vocab FILE | auto:N`, `--new_token_init mean | random`).

An English-centred tokenizer spends several tokens on one Chinese character; adding Chinese tokens (and training
their embeddings) makes prompts shorter and generation faster, and the seed's study found it helps Chinese
instruction following. This module:

- reads the new tokens from a file (one a line) or learns the N most useful ones from the training data with the
  `tokenizers` library (a BPE trained on the data's runs of Chinese characters; a candidate's use is how many tokens
  it saves: its count times the pieces the old tokenizer needs for it, minus one);
- adds them to the tokenizer, resizes the embeddings (and an untied LM head) to a multiple of PAD_MULTIPLE rows and
  initialises the new rows deterministically: the mean of the token's pieces' rows (`mean`) or seeded normal noise
  (`random`); the rows that only pad the matrix to the multiple get the mean of the old rows;
- tells the method which rows train, as its preset's `vocab_extension` capability says:
  `trainable_tokens` (peft's `trainable_token_indices`: only the new rows are trained and saved; peft ties them into
  a tied LM head itself, an untied head gets its own rows), `modules_to_save` (peft trains a copy of the embedding
  (+ the untied head); a gradient mask keeps every old row as it was; a tied head is pointed at the copy), `weights`
  (full / freeze: the method's own saved tensors hold the rows; freeze trains the new rows under the same mask) or
  `no` (refused with a sentence);
- does the same resize + initialisation at inference (`prepare_base`, before the adapter is attached) and, after it
  (`after_adapter`), re-ties a modules_to_save head or writes trainable tokens' rows into the weights once, from the
  run's `finetune_meta.json` entry (META_KEY).
"""
import copy
import functools
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from utils.errors import UserError

PAD_MULTIPLE = 64  # embedding rows are a multiple of this (tensor-core and kernel friendly shapes)
AUTO_PREFIX = "auto:"
INITS = ("mean", "random")
META_KEY = "vocab_extension"
MECHANISMS = {
    "trainable_tokens": "peft's trainable_token_indices: only the new rows of the embedding and LM head train and are "
                        "saved with the adapter",
    "modules_to_save": "peft's modules_to_save: a trained copy of the embedding (and an untied LM head) is saved with "
                       "the adapter; a gradient mask keeps every old row as it was",
    "weights": "the method's own saved weights hold the resized embedding (full trains every row, freeze the new ones)",
    "no": "refused: the method cannot train embedding rows",
}
MAX_TOKEN_CHARS = 6  # longest learned token (auto:N), in characters
MIN_ROWS = 3  # a learned token occurs in at least this many training rows (auto:N)
LEARN_ROWS = 20_000  # auto:N learns from (and the savings are measured on) at most this many training rows
# Han ideographs (basic, extension A, compatibility) and CJK / full-width punctuation: what auto:N learns tokens from
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
CJK_RUN = re.compile(f"[{_CJK}]+")
HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


# ---- the flags ----------------------------------------------------------------------------------------------------
def parse_value(value):
    """('auto', N) or ('file', Path) from an --extend_vocab value."""
    text = str(value).strip()
    if text.lower().startswith(AUTO_PREFIX):
        n = text[len(AUTO_PREFIX):].strip()
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--extend_vocab {value}: N in auto:N must be a positive whole number of tokens to learn, "
                            "e.g. auto:500")
        return "auto", int(n)
    path = Path(text)
    if not path.is_file():
        raise UserError(f"--extend_vocab {value} is neither auto:N nor an existing file; pass a text file with one "
                        "new token per line or auto:N to learn N tokens from the training data")
    return "file", path


def mechanism(peft_type):
    """How --peft_type trains the new rows (its preset's vocab_extension capability)."""
    from utils.peft_methods import capability

    return capability(peft_type, "vocab_extension")


def _alternatives():
    from utils.peft_methods import methods_with

    return "; ".join(f"{', '.join(methods_with(vocab_extension=m))} ({m})" for m in MECHANISMS if m != "no"
                     and methods_with(vocab_extension=m))


def _why_not(peft_type):
    from utils.peft_methods import capability

    if capability(peft_type, "prompt_learning"):
        return ("peft embeds its inputs through its own reference to the original word embedding, so trained rows "
                "for new tokens would never reach the model")
    if capability(peft_type, "builder") == "bottleneck":
        return "its adapter files hold only the bottleneck modules, so trained embedding rows would be lost"
    return "it cannot train embedding rows"


def check_request(peft_type, extend_vocab, new_token_init="mean", stage="sft", weight_decay=0.0, engine=None):
    """The mechanism (see MECHANISMS) for a run, or None without --extend_vocab; impossible combinations are one
    sentence, before anything is loaded. engine: None, "deepspeed" or "fsdp" (the sharding engine of the run)."""
    if not extend_vocab:
        if new_token_init != INITS[0]:
            raise UserError(f"--new_token_init {new_token_init} applies to the rows --extend_vocab adds; add "
                            "--extend_vocab FILE or auto:N, or drop --new_token_init")
        return None
    parse_value(extend_vocab)
    if new_token_init not in INITS:
        raise UserError(f"--new_token_init {new_token_init} is not one of {', '.join(INITS)}")
    if stage != "sft":
        raise UserError(f"--extend_vocab cannot be used with --stage {stage}: preference stages train on the base's "
                        "vocabulary; extend it in an sft run first and train that model (merge.py) with --stage "
                        f"{stage}, or drop --extend_vocab")
    mech = mechanism(peft_type)
    if mech == "no":
        raise UserError(f"--extend_vocab cannot be used with --peft_type {peft_type}: {_why_not(peft_type)}; use "
                        f"one of: {_alternatives()}")
    if weight_decay and masked(peft_type):
        raise UserError(f"--weight_decay {weight_decay} would shrink the old embedding rows that --extend_vocab "
                        f"keeps fixed for --peft_type {peft_type}; use --weight_decay 0 or a method with trainable "
                        "tokens (lora, dora, adalora, qlora)")
    if engine == "fsdp":
        raise UserError("--extend_vocab cannot be used with --fsdp: FSDP2 cannot shard peft's trainable-token "
                        "layer, and the gradient mask of the other methods needs whole embedding rows; use "
                        "--deepspeed configs/ds_zero3.json (with lora, dora or adalora) or plain DDP (torchrun "
                        "without --fsdp)")
    if engine == "deepspeed" and masked(peft_type):
        raise UserError(f"--extend_vocab with --peft_type {peft_type} keeps the old embedding rows fixed with a "
                        "gradient mask on the embedding, and DeepSpeed's optimizer (on flat partitions) still moves "
                        "them; use a method with trainable tokens (lora, dora, adalora) under --deepspeed, or plain "
                        "DDP (torchrun without --deepspeed)")
    return mech


def masked(peft_type):
    """Whether the method trains a whole embedding matrix of which only the new rows may move (a gradient mask)."""
    from utils.peft_methods import capability

    mech = mechanism(peft_type)
    return mech == "modules_to_save" or (mech == "weights" and capability(peft_type, "builder") == "freeze")


# ---- which tokens ---------------------------------------------------------------------------------------------------
def read_token_file(path):
    """The tokens of a file, one a line, in order, without duplicates (a UTF-8 byte-order mark and line breaks
    stripped, nothing else: a token may begin or end with a space)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--extend_vocab {path} is not UTF-8 text; save it as UTF-8 with one token per line") from None
    tokens = list(dict.fromkeys(line.rstrip("\r") for line in lines if line.strip()))
    if not tokens:
        raise UserError(f"--extend_vocab {path} holds no token; write one new token per line")
    return tokens


def pieces_of(tokenizer, token):
    return tokenizer.encode(token, add_special_tokens=False)


def learn_tokens(texts, tokenizer, n, max_chars=MAX_TOKEN_CHARS, min_rows=MIN_ROWS):
    """The n tokens that save the most tokens on `texts`: BPE (the `tokenizers` library) trained on the texts' runs
    of Chinese characters proposes characters and words; each is scored by its count in that BPE's own segmentation
    times (the old tokenizer's pieces for it - 1). A candidate must occur in at least min_rows texts (a phrase
    repeated inside one example does not generalise); deterministic (ties by the string)."""
    from tokenizers import Tokenizer, models, trainers

    runs, owner = [], []
    for i, text in enumerate(texts):
        for m in CJK_RUN.finditer(text):
            runs.append(m.group())
            owner.append(i)
    if not runs:
        raise UserError("--extend_vocab auto:N found no Chinese text in the training data to learn tokens from; pass "
                        "a file of tokens instead")
    alphabet = len(set("".join(runs)))
    bpe = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=alphabet + 4 * n, min_frequency=2, show_progress=False,
                                  max_token_length=max_chars)
    bpe.train_from_iterator(runs, trainer)
    counts, rows = Counter(), {}
    for i, enc in zip(owner, bpe.encode_batch(runs)):
        for tok in enc.tokens:
            counts[tok] += 1
            rows.setdefault(tok, set()).add(i)
    scored = []
    for token, count in counts.items():
        if len(rows[token]) < min_rows:
            continue
        saved = count * (len(pieces_of(tokenizer, token)) - 1)
        if saved > 0:
            scored.append((-saved, token))
    return [token for _, token in sorted(scored)[:n]]


def texts_of(dataset, tokenizer, limit=None):
    """The text of tokenized training rows (their input_ids decoded: what the model reads, templates included)."""
    if limit is not None and len(dataset) > limit:
        dataset = dataset.select(range(limit))
    return tokenizer.batch_decode([list(ids) for ids in dataset["input_ids"]], skip_special_tokens=False)


# ---- the plan -----------------------------------------------------------------------------------------------------
@dataclass
class VocabPlan:
    """The tokens a run adds and how their rows start; recorded in finetune_meta.json under META_KEY."""
    source: str                  # the --extend_vocab value
    init: str                    # mean | random
    tokens: list                 # the added tokens, in id order
    first_id: int                # id of tokens[0]; the rest follow
    pieces: list                 # the old tokenizer's ids of each token (mean init)
    skipped: list = field(default_factory=list)  # file tokens the tokenizer already had as one token
    seed: int = 42
    pad_multiple: int = PAD_MULTIPLE
    old_rows: int = None         # embedding rows of the base (set by resize_and_init)
    rows: int = None             # embedding rows after resizing
    tied: bool = None            # the LM head shares the embedding matrix
    mechanism: str = None
    savings: dict = None

    @property
    def ids(self):
        return list(range(self.first_id, self.first_id + len(self.tokens)))

    def to_meta(self):
        return asdict(self)

    @classmethod
    def from_meta(cls, meta):
        data = (meta or {}).get(META_KEY)
        return cls(**data) if data else None


def extend_tokenizer(tokenizer, value, texts=None, init="mean", seed=42):
    """Add the tokens of --extend_vocab to `tokenizer` (in place); returns the VocabPlan.

    texts: the training texts (a list, or a callable returning one), needed for auto:N only."""
    kind, arg = parse_value(value)
    if kind == "auto":
        texts = texts() if callable(texts) else texts
        candidates = learn_tokens(texts or [], tokenizer, arg)
    else:
        candidates = read_token_file(arg)
    pieces = {t: pieces_of(tokenizer, t) for t in candidates}
    existing = tokenizer.get_vocab()
    new = [t for t in candidates if len(pieces[t]) > 1 and t not in existing]
    skipped = [t for t in candidates if t not in new]
    if not new:
        raise UserError(f"--extend_vocab {value}: every token is already one token of this tokenizer; nothing to add")
    first_id = len(tokenizer)
    old_tokenizer = copy.deepcopy(tokenizer)
    added = tokenizer.add_tokens(new)
    ids = tokenizer.convert_tokens_to_ids(new)
    if added != len(new) or ids != list(range(first_id, first_id + len(new))):
        raise UserError(f"--extend_vocab {value}: the tokenizer did not take the tokens as new consecutive ids; pass "
                        "tokens it does not know yet")
    plan = VocabPlan(source=str(value), init=init, tokens=new, first_id=first_id, pieces=[pieces[t] for t in new],
                     skipped=skipped, seed=seed)
    plan.old_tokenizer = old_tokenizer  # not a field: the savings report compares with it
    return plan


def check_ranks(plan):
    """Under torchrun (the process group is up once the Trainer exists): every process added the same tokens, or
    one sentence. A no-op in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    mine = [plan.tokens, plan.first_id, plan.rows]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if any(other != mine for other in every):
        raise UserError("--extend_vocab: the processes of this launch added different tokens (different training "
                        "data on each?); give every process the same --data and --seed, or pass a file of tokens")


def han_chars(text):
    return len(HAN.findall(text))


def _count(tokenizer, texts):
    return sum(len(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]) if texts else 0


def measure(plan, tokenizer, texts):
    """plan.savings on `texts` (the training rows as the model reads them): tokens with the old and the extended
    tokenizer, and tokens per Chinese character on the texts' runs of Chinese (each run encoded alone)."""
    old = plan.old_tokenizer
    b, a = _count(old, texts), _count(tokenizer, texts)
    savings = {"texts": len(texts), "tokens_before": b, "tokens_after": a, "saved": b - a,
               "saved_pct": round(100 * (b - a) / max(b, 1), 2)}
    runs = [m.group() for t in texts for m in CJK_RUN.finditer(t)]
    chars = sum(han_chars(r) for r in runs)
    if chars:
        savings.update(chinese_chars=chars, tokens_per_char_before=round(_count(old, runs) / chars, 4),
                       tokens_per_char_after=round(_count(tokenizer, runs) / chars, 4))
    plan.savings = savings
    return savings


def describe(plan):
    """The --dry_run / training lines about the expansion."""
    auto = plan.source.lower().startswith(AUTO_PREFIX)
    how = f"learned from the training data ({plan.source})" if auto else f"from {plan.source}"
    asked = int(plan.source.split(":", 1)[1]) if auto else len(plan.tokens)
    if len(plan.tokens) < asked:
        how += (f"; only {len(plan.tokens)} candidates occur in >= {MIN_ROWS} training rows and save tokens")
    lines = [f"vocab: +{len(plan.tokens)} tokens {how} (ids {plan.first_id}..{plan.first_id + len(plan.tokens) - 1}, "
             f"rows initialised: {plan.init}); first: {' '.join(plan.tokens[:12])}"]
    if plan.skipped:
        lines.append(f"vocab: {len(plan.skipped)} listed tokens skipped (already one token): "
                     f"{' '.join(plan.skipped[:8])}")
    s = plan.savings or {}
    if s:
        line = (f"vocab: the {s['texts']:,} training rows take {s['tokens_after']:,} tokens instead of "
                f"{s['tokens_before']:,} ({s['saved']:,} fewer, -{s['saved_pct']}%)")
        if "tokens_per_char_before" in s:
            line += (f"; {s['tokens_per_char_after']} instead of {s['tokens_per_char_before']} tokens per Chinese "
                     f"character ({s['chinese_chars']:,} characters)")
        lines.append(line)
    return "\n".join(lines)


# ---- the model ------------------------------------------------------------------------------------------------------
def rows_for(size, multiple=PAD_MULTIPLE):
    return int(math.ceil(size / multiple) * multiple)


def _tied(model):
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def _init_rows(weight, plan, old_rows):
    """New-token rows by plan.init, padding rows (beyond the old rows and the new tokens) by the mean old row."""
    import torch

    n_ref = min(plan.first_id, old_rows)
    ref = weight[:n_ref].float()
    n = len(plan.tokens)
    if plan.init == "mean":
        rows = torch.stack([ref[p].mean(0) for p in plan.pieces])
    else:
        gen = torch.Generator().manual_seed(plan.seed)
        rows = torch.randn(n, ref.shape[1], generator=gen) * ref.std()
    weight[plan.first_id:plan.first_id + n] = rows.to(weight.dtype)
    start = max(old_rows, plan.first_id + n)
    if start < weight.shape[0]:
        weight[start:] = ref.mean(0).to(weight.dtype)


def resize_and_init(model, plan):
    """Resize the embeddings (and an untied LM head) to plan.rows (a multiple of PAD_MULTIPLE holding the old rows
    and the new tokens) and initialise the new rows; the old rows stay bit for bit. Sets plan.old_rows / rows / tied
    the first time (training); at inference plan comes from the run's metadata and must fit the base."""
    import torch

    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    if plan.old_rows is not None and plan.old_rows != old_rows:
        raise UserError(f"this base model has {old_rows} embedding rows but the run extended one with "
                        f"{plan.old_rows}; load the adapter onto the base model it was trained on")
    rows = plan.rows or max(old_rows, rows_for(plan.first_id + len(plan.tokens), plan.pad_multiple))
    if rows != old_rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    tied = _tied(model)
    with torch.no_grad():
        _init_rows(model.get_input_embeddings().weight, plan, old_rows)
        if not tied:
            head = model.get_output_embeddings().weight
            gen_plan = plan if plan.init == "mean" else _with_seed(plan, plan.seed + 1)
            _init_rows(head, gen_plan, old_rows)
    plan.old_rows, plan.rows, plan.tied = old_rows, rows, tied
    return model


def _with_seed(plan, seed):
    from dataclasses import replace

    return replace(plan, seed=seed)


def module_name(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def peft_params(model, plan, mech):
    """The settings the method's peft config takes for the new rows (before get_peft_model)."""
    emb = module_name(model, model.get_input_embeddings())
    head = None if _tied(model) else module_name(model, model.get_output_embeddings())
    if mech == "trainable_tokens":
        # tied: peft wraps the embedding and ties the head to the same rows; untied: each gets its own rows
        return {"trainable_token_indices": plan.ids if head is None else {emb: plan.ids, head: plan.ids}}
    if mech == "modules_to_save":
        return {"modules_to_save": [emb] + ([head] if head else [])}
    return {}


def _mask_hook(plan):
    import torch

    def hook(grad):
        keep = torch.zeros(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
        keep[plan.first_id:plan.first_id + len(plan.tokens)] = 1
        return grad * keep

    return hook


def _copies(model):
    """modules_to_save: the trained copies of the embedding (and an untied head)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = []
    for module in (inner.get_input_embeddings(), inner.get_output_embeddings()):
        copies = getattr(module, "modules_to_save", None)
        if copies is not None:
            out.append(copies[module.active_adapters[0]])
    return out


def retie(model):
    """A tied LM head follows peft's trained embedding copy (modules_to_save), as it followed the embedding."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = inner.get_input_embeddings()
    copies = getattr(emb, "modules_to_save", None)
    if copies is None or not inner.config.get_text_config().tie_word_embeddings:
        return model
    head = inner.get_output_embeddings()
    if getattr(head, "modules_to_save", None) is None:
        head.weight = copies[emb.active_adapters[0]].weight
    return model


def after_attach(model, plan, mech, builder):
    """After the method is attached (training): modules_to_save re-ties a tied head and masks the copies' gradients;
    freeze trains the embedding (+ untied head) under the mask. Returns the number of trained new rows."""
    plan.mechanism = mech
    hook = _mask_hook(plan)
    if mech == "modules_to_save":
        retie(model)
        for module in _copies(model):
            module.weight.register_hook(hook)
    elif mech == "weights" and builder == "freeze":
        inner = model
        weights = [inner.get_input_embeddings().weight]
        if not _tied(inner):
            weights.append(inner.get_output_embeddings().weight)
        for w in weights:
            w.requires_grad_(True)
            w.register_hook(hook)
    if rows_in_adapter(model):
        # the Trainer's checkpoints call model.save_pretrained too; peft's "auto" would add the whole resized
        # embedding to each of them although the adapter already holds the new rows (resume rebuilds the rest)
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    return len(plan.tokens) * (1 if plan.tied else 2)


def rows_in_adapter(model):
    """Whether peft holds the new rows itself (trainable tokens or a modules_to_save copy of the embedding)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = inner.get_input_embeddings()
    return hasattr(emb, "token_adapter") or getattr(emb, "modules_to_save", None) is not None


# ---- inference ------------------------------------------------------------------------------------------------------
def extends(meta):
    return bool((meta or {}).get(META_KEY))


def prepare_base(model, meta):
    """Before the adapter of an extended-vocabulary run is attached: the same resize and row initialisation as in
    training (a no-op for other runs)."""
    plan = VocabPlan.from_meta(meta)
    if plan is not None:
        resize_and_init(model, plan)
    return model


def added_tokens(meta):
    return len(meta[META_KEY]["tokens"]) if extends(meta) else 0


def check_tokenizer(tokenizer, meta, run_dir):
    """The run directory's tokenizer holds the tokens its training added, at the ids it trained (one sentence)."""
    plan = VocabPlan.from_meta(meta)
    if plan is None:
        return
    if tokenizer.convert_tokens_to_ids(plan.tokens) != plan.ids:
        raise UserError(f"the tokenizer in {run_dir} lacks the {len(plan.tokens)} tokens its run added with "
                        "--extend_vocab (or holds them at other ids); restore the run's tokenizer files "
                        "(tokenizer.json, tokenizer_config.json) or train again")


def check_merged(model, tokenizer, plan):
    """A merged model of an extended run: plain modules (no adapter left) with plan.rows embedding rows and a
    tokenizer whose ids all fit them."""
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] != plan.rows or len(tokenizer) > plan.rows:
        raise UserError(f"merging left {emb.weight.shape[0]} embedding rows for a tokenizer of {len(tokenizer)} "
                        f"tokens (the run trained {plan.rows}); load the adapter with --lora_dir instead of merging")
    return model


def after_adapter(model, meta):
    """After the adapter is attached (inference): a modules_to_save run's tied head follows the trained copy again;
    a trainable_tokens run's rows are written into the embedding (and head) once (merge_token_rows)."""
    mech = meta[META_KEY].get("mechanism") if extends(meta) else None
    if mech == "modules_to_save":
        retie(model)
    elif mech == "trainable_tokens":
        merge_token_rows(model)
    return model


def merge_token_rows(model):
    """Write peft's trained token rows into the embedding and LM head weights (peft's own TrainableTokensLayer.merge:
    an index_copy, so the logits stay bit for bit). Unmerged, every forward pass builds a fresh copy of the whole
    embedding matrix (and of the LM head) to overlay the rows, which dominates a decoding step of a small model;
    the LoRA matrices stay unmerged. peft unmerges by itself while the adapter is disabled."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and not module.merged:
            module.merge()
    return model
