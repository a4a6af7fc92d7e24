"""Step-level continuous batching for server.py: many requests share each forward pass of the model.

The running batch is kept in lanes. A lane is the set of requests that one forward pass serves: all requests on
one model, or, on a shared PeftModel of LoRA adapters, all requests of every adapter and of the base at once
(PEFT's mixed-adapter batch: each row names its adapter in `adapter_names`, "__base__" for the base). DoRA
adapters (PEFT keeps them out of mixed batches) and the other shared tuners (loha, lokr, ia3, adalora) get one
lane per adapter, switched with set_adapter / disable_adapter before each forward.

A lane holds one KV cache for all its rows (a transformers DynamicCache whose steps write in place:
utils/serving/kvcache.py), left-padded to a common length, with a 2-D
attention mask and each row's own position ids, as `model.generate` does for a left-padded batch. Each step:

1. requests that wait join (Batcher.admit): they are prefilled together (left padding) into a fresh cache, which
   is then merged into the lane's (both padded on the left to the longer one); a prompt start they all share with
   one the prefix store keeps (utils/serving/prefix.py) is copied into the fresh cache instead of computed;
2. one decoding step per lane (Batcher.step): every row's last token in, one new token out per row, chosen with
   that row's own settings: greedy, or sampled with its temperature / top_p / top_k and its own torch.Generator
   (seed), after its repetition_penalty / no_repeat_ngram_size (transformers' logits processors, in generate's
   order);
3. each row checks its end: EOS or end-of-turn token, a stop string (utils/serving/streaming.py), max_tokens;
   streamed rows send the text that is settled. Finished and cancelled rows leave the cache, and the cache's
   leading columns that no row uses any more are cut off, so its length stays that of its longest member.
"""
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from utils.serving.protocol import generation_failed
from utils.serving.streaming import TextStream

# One forward for a mixed-adapter LoRA batch (PEFT's adapter_names) rather than one per adapter (see the measurement
# in bench/RESULTS.md).
MIXED_ADAPTER_BATCHES = True

# generation_config fields that would add logits processors the batcher does not apply: an entry whose model's
# generation_config sets one takes the single-request path (model.generate applies them).
_UNBATCHED_CONFIG = {
    "guidance_scale": lambda v: v not in (None, 1, 1.0), "sequence_bias": bool, "bad_words_ids": bool,
    "encoder_repetition_penalty": lambda v: v not in (None, 1.0), "min_length": bool, "min_new_tokens": bool,
    "forced_bos_token_id": lambda v: v is not None, "forced_eos_token_id": lambda v: v is not None,
    "exponential_decay_length_penalty": bool, "suppress_tokens": bool, "begin_suppress_tokens": bool,
    "min_p": lambda v: v is not None, "typical_p": lambda v: v not in (None, 1.0), "epsilon_cutoff": bool,
    "eta_cutoff": bool, "top_h": lambda v: v is not None, "watermarking_config": lambda v: v is not None,
}


@dataclass
class Plan:
    """How the batcher runs one model id: which lane its requests join and how that lane calls the model."""
    single: Optional[str] = None  # why it takes the single-request path instead (None: batched)
    key: Any = None               # its lane
    model: Any = field(default=None, repr=False)
    mode: str = "plain"           # plain: the model as it is; switch: set its adapter first; mixed: adapter_names
    adapter: Optional[str] = None  # switch: the adapter to set (None: adapters off); mixed: this id's row name
    cache_arg: str = "cache"      # the forward's name for the cache (transformers renamed past_key_values)
    keep_logits: bool = False     # the forward takes logits_to_keep
    gen_config: Any = field(default=None, repr=False)
    pad_id: int = 0
    device: Any = None


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _why_single(entry, inner, params):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from utils.peft_methods import capability

    if entry.peft_type and capability(entry.peft_type, "prompt_learning"):
        return "prompt learning adapter"
    if not type(inner).__module__.startswith("transformers.models.") or inner.config.is_encoder_decoder:
        return "model code outside transformers' decoders"
    if "cache" not in params and "past_key_values" not in params:
        return "its forward takes no cache"
    if "position_ids" not in params:
        return "its forward takes no position ids"
    try:
        cache = DynamicCache(config=inner.config)
    except Exception:  # noqa: BLE001 - whatever the config cannot describe is served alone
        return "its cache layout is unknown"
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return "sliding-window or hybrid cache"
    config = getattr(inner, "generation_config", None)
    for name, is_set in _UNBATCHED_CONFIG.items():
        if config is not None and is_set(getattr(config, name, None)):
            return f"its generation_config sets {name}"
    return None


def _mixed_capable(entry):
    """Whether the entry's rows can share PEFT's mixed-adapter forward: plain LoRA adapters (no DoRA: PEFT refuses
    it in adapter_names) on a PeftModel of LoRA adapters, and the base served from it."""
    configs = getattr(entry.model, "peft_config", None) or {}
    if not (MIXED_ADAPTER_BATCHES and configs and all(_is_lora(c) for c in configs.values())):
        return False
    return entry.adapter_name is None or not getattr(configs.get(entry.adapter_name), "use_dora", True)


def _is_lora(config):
    return str(getattr(config, "peft_type", "")) in ("LORA", "PeftType.LORA")


def plan_for(entry):
    """The Plan of an Entry: its lane and forward call, or why it takes the single-request path."""
    model = entry.model
    inner = _inner(model)
    params = inspect.signature(inner.forward).parameters
    why = _why_single(entry, inner, params)
    if why:
        return Plan(single=why)
    pad = getattr(entry.tokenizer, "pad_token_id", None)
    plan = Plan(model=model, cache_arg="cache" if "cache" in params else "past_key_values",
                keep_logits="logits_to_keep" in params, gen_config=getattr(inner, "generation_config", None),
                pad_id=pad if pad is not None else 0, device=model.device)
    if entry.shared and _mixed_capable(entry):
        plan.key, plan.mode, plan.adapter = ("mixed", id(model)), "mixed", entry.adapter_name or "__base__"
    elif entry.shared:
        plan.key, plan.mode, plan.adapter = ("switch", id(model), entry.adapter_name), "switch", entry.adapter_name
    else:
        plan.key = ("plain", id(model))
    return plan


def forward(plan, ids, mask, positions, cache, adapters):
    """One forward pass of a lane: logits (float32) of each row's last position."""
    from contextlib import nullcontext

    kwargs = {plan.cache_arg: cache, "use_cache": True}
    if plan.keep_logits:
        kwargs["logits_to_keep"] = 1
    context, adapter = nullcontext(), plan.adapter
    if plan.mode == "mixed" and len(set(adapters)) > 1:
        kwargs["adapter_names"] = adapters
    elif plan.mode != "plain":  # switch, or a mixed lane whose rows all use one adapter: the plain LoRA forward
        if plan.mode == "mixed":
            adapter = None if adapters[0] == "__base__" else adapters[0]
        if adapter is None:
            context = plan.model.disable_adapter()
        elif getattr(plan.model, "active_adapter", None) != adapter:  # set_adapter walks every module
            plan.model.set_adapter(adapter)
    with context:
        out = plan.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    return out.logits[:, -1, :].float()


# ---- one request ---------------------------------------------------------------------------------------
def _processors(kwargs, gen_config):
    """transformers' logits processors of one request, in model.generate's order (None: plain greedy)."""
    from transformers import (LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    out = LogitsProcessorList()
    penalty = kwargs.get("repetition_penalty")
    if penalty is not None and penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(penalty=penalty))
    ngram = kwargs.get("no_repeat_ngram_size", getattr(gen_config, "no_repeat_ngram_size", None))
    if ngram:
        out.append(NoRepeatNGramLogitsProcessor(ngram))
    if kwargs.get("do_sample"):
        if kwargs.get("temperature") not in (None, 1.0):
            out.append(TemperatureLogitsWarper(kwargs["temperature"]))
        if kwargs.get("top_k"):
            out.append(TopKLogitsWarper(top_k=kwargs["top_k"]))
        if kwargs.get("top_p") is not None and kwargs["top_p"] < 1.0:
            out.append(TopPLogitsWarper(top_p=kwargs["top_p"]))
    return out or None


class Row:
    """One request in a lane: its prompt, the tokens made so far, its settings and its text stream."""

    def __init__(self, job, plan):
        from utils.generation import generation_kwargs

        entry = job.entry
        kwargs = generation_kwargs(job.gen, entry.tokenizer, entry.template)
        self.job, self.prompt, self.adapter = job, list(job.ids), plan.adapter
        self.max_new = kwargs["max_new_tokens"]
        self.eos = {t for t in kwargs.get("eos_token_id") or [] if t is not None}
        self.sample = bool(kwargs.get("do_sample"))
        self.processors = _processors(kwargs, plan.gen_config)
        self.generator = None
        if self.sample and job.seed is not None:
            self.generator = torch.Generator(device=plan.device).manual_seed(job.seed % (1 << 63))
        self.text = TextStream(entry.tokenizer, job.stop, job.emitter())
        self.done = False

    @property
    def tokens(self):
        return self.text.tokens

    def choose(self, logits, greedy):
        """The next token from this row's logits [1, vocab] (greedy: the batch's argmax, for plain greedy rows)."""
        if self.processors is None and not self.sample:
            return greedy
        scores = logits
        if self.processors is not None:
            ids = torch.tensor([self.prompt + self.tokens], device=logits.device)
            scores = self.processors(ids, logits.clone())
        if not self.sample:
            return int(scores.argmax(-1))
        probs = F.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def take(self, token):
        """Add the new token; ends the request (its "end" event) on EOS, a stop string or max_tokens."""
        stopped = self.text.push(token)
        n = len(self.tokens)
        if stopped or token in self.eos or n >= self.max_new:
            reason = "stop" if stopped or token in self.eos or n < self.max_new else "length"
            self.job.put("end", (self.text.close().strip(), reason, n))
            self.done = True


def _pad_left(x, n, value=0):
    """Pad the sequence dimension (the second last of a cache tensor, the last of a mask) on the left."""
    if n == 0:
        return x
    return F.pad(x, (n, 0), value=value) if x.dim() == 2 else F.pad(x, (0, 0, n, 0), value=value)


# ---- one lane ------------------------------------------------------------------------------------------
class Lane:
    """The rows one forward pass serves, with their shared left-padded cache and attention mask."""

    def __init__(self, plan, store=None):
        self.plan, self.store, self.rows, self.cache, self.mask = plan, store, [], None, None

    def _advance(self, rows, logits):
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            row.take(row.choose(logits[i:i + 1], greedy[i]))

    def prefill(self, rows):
        """Run the prompts of newcomers (left-padded together), choose their first tokens, merge the live ones.
        A start that every prompt shares with one the prefix store keeps is copied in rather than computed."""
        from utils.serving.kvcache import GrowingCache
        from utils.serving.prefix import seed

        plan, adapters = self.plan, [r.adapter for r in rows]
        entry, prefix = None, 0
        if self.store is not None and len(set(adapters)) == 1:
            entry, prefix = self.store.find(plan.key, adapters[0], [r.prompt for r in rows])
        rests = [r.prompt[prefix:] for r in rows]
        width = max(len(t) for t in rests)
        ids = torch.tensor([[plan.pad_id] * (width - len(t)) + t for t in rests], device=plan.device)
        mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in rests], device=plan.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + prefix
        if prefix:
            mask = torch.cat([mask.new_ones(len(rows), prefix), mask], dim=1)
        cache = GrowingCache()
        if entry is not None:
            seed(cache, entry, prefix, len(rows))
        logits = forward(plan, ids, mask, positions, cache, adapters)
        self._learn(rows, cache, prefix, width)
        self._advance(rows, logits)
        live = [i for i, r in enumerate(rows) if not r.done]
        if live:
            self._merge(cache, mask, rows, live)

    def _learn(self, rows, cache, prefix, width):
        """Let the prefix store keep what these prompts share (per adapter: it changes the keys and values)."""
        from utils.serving.prefix import columns_of, row_layers

        if self.store is None:
            return
        for adapter in dict.fromkeys(r.adapter for r in rows):
            index = [i for i, r in enumerate(rows) if r.adapter == adapter]
            self.store.learn(self.plan.key, adapter, [rows[i].prompt for i in index], lambda j, n: row_layers(
                cache, index[j], columns_of(prefix, width, len(rows[index[j]].prompt), n, self.plan.device)))

    def _merge(self, cache, mask, rows, live):
        if len(live) < len(rows):
            cache, mask = self._select(cache, mask, live)
            rows = [rows[i] for i in live]
        if not self.rows:
            self.cache, self.mask, self.rows = cache, mask, rows
            return
        width = max(self.mask.shape[1], mask.shape[1])
        a, b = width - self.mask.shape[1], width - mask.shape[1]
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, a), _pad_left(theirs.keys, b)])
            mine.values = torch.cat([_pad_left(mine.values, a), _pad_left(theirs.values, b)])
        self.mask = torch.cat([_pad_left(self.mask, a), _pad_left(mask, b)])
        self.rows = self.rows + rows

    @staticmethod
    def _select(cache, mask, keep):
        """Rows `keep` of a cache and its mask, without the leading columns none of them uses."""
        index = torch.tensor(keep, device=mask.device)
        mask = mask.index_select(0, index)
        start = int(mask.any(0).int().argmax())
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        return cache, mask[:, start:]

    def keep(self, keep):
        """Keep only rows `keep` (indices), dropping the others from the cache."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        self.cache, self.mask = self._select(self.cache, self.mask, keep)
        self.rows = [self.rows[i] for i in keep]

    def decode(self):
        """One decoding step for every row: its last token in, its next token out."""
        plan, rows = self.plan, self.rows
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=plan.device)
        positions = torch.tensor([[len(r.prompt) + len(r.tokens) - 1] for r in rows], device=plan.device)
        mask = F.pad(self.mask, (0, 1), value=1)  # the new token's column
        logits = forward(plan, ids, mask, positions, self.cache, [r.adapter for r in rows])
        self.mask = mask
        self._advance(rows, logits)
        self.keep([i for i, r in enumerate(rows) if not r.done])

    def fail(self, error):
        for row in self.rows:
            if not row.done:
                row.job.put("error", error)
        self.rows, self.cache, self.mask = [], None, None


# ---- the batch -----------------------------------------------------------------------------------------
def _fail_rows(rows, exc, stats):
    print(f"generation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    stats["failed"] += 1
    for row in rows:
        if not row.done:
            row.job.put("error", generation_failed(exc))
            row.done = True


class Batcher:
    """Every lane of the running batch; the generation worker calls admit() and step() in turns."""

    def __init__(self, stats=None, prefix_tokens=None):
        """prefix_tokens: what the prefix store may hold (None: server.py's --prefix_cache_tokens default)."""
        from utils.args import ServeArguments
        from utils.serving.engine import new_stats
        from utils.serving.prefix import PrefixStore

        self.lanes = {}
        self.stats = stats if stats is not None else new_stats()
        if prefix_tokens is None:
            prefix_tokens = ServeArguments().prefix_cache_tokens
        self.prefixes = PrefixStore(prefix_tokens)

    @property
    def size(self):
        return sum(len(lane.rows) for lane in self.lanes.values())

    def admit(self, jobs):
        """Prefill the jobs (grouped by lane) and let them join their lanes."""
        groups = {}
        for job in jobs:
            try:
                row = Row(job, job.entry.plan)
            except Exception as exc:  # noqa: BLE001 - e.g. a seed torch refuses: this request alone fails
                job.put("error", generation_failed(exc))
                continue
            groups.setdefault(job.entry.plan.key, []).append(row)
        with torch.inference_mode():
            for key, rows in groups.items():
                lane = self.lanes.setdefault(key, Lane(rows[0].job.entry.plan, self.prefixes))
                try:
                    lane.prefill(rows)
                except Exception as exc:  # noqa: BLE001 - the newcomers fail, the lane's running rows go on
                    _fail_rows(rows, exc, self.stats)
                self.stats["prefills"] += 1
                self.stats["batched"] += len(rows)
        self.stats["prefix_hits"], self.stats["prefix_saved"] = self.prefixes.hits, self.prefixes.saved
        self._tidy()

    def step(self):
        """One decoding step in every lane; cancelled rows leave first."""
        with torch.inference_mode():
            for lane in list(self.lanes.values()):
                keep = [i for i, r in enumerate(lane.rows) if not r.job.cancel.is_set()]
                self.stats["cancelled"] += len(lane.rows) - len(keep)
                lane.keep(keep)
                if not lane.rows:
                    continue
                self.stats["steps"] += 1
                self.stats["widest"] = max(self.stats["widest"], len(lane.rows))
                try:
                    lane.decode()
                except Exception as exc:  # noqa: BLE001 - the lane's requests fail, the worker goes on
                    _fail_rows(lane.rows, exc, self.stats)
                    lane.rows, lane.cache, lane.mask = [], None, None
        self._tidy()

    def _tidy(self):
        for key in [k for k, lane in self.lanes.items() if not lane.rows]:
            del self.lanes[key]

    def fail_all(self, error):
        for lane in self.lanes.values():
            lane.fail(error)
        self.lanes.clear()
