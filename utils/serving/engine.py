"""The serving engine: the loaded models (one Entry per model id) and the one generation worker thread.

Models. The base is loaded once. LoRA-family adapters (lora, dora, qlora, adalora, loha, lokr, ia3) are
attached to ONE PeftModel per PEFT tuner type, each under its own adapter name; the base model is served by the
same PeftModel with the adapters off. Methods that change the base itself or hook into it in ways PEFT cannot
switch per request get their own loaded copy of the base: full and freeze (they overwrite weights), our
bottleneck adapters (sadapter_h, sadapter_p, p_adapter: they wrap the modules in place), prompt learning (prefix,
p_tuning, prompt: PEFT's multi-adapter switching and disable_adapter go through other code paths for them) and
vera (its shared projections tie all adapters of a model to one configuration). Adapters trained on different
bases are refused at start.

Worker. One thread runs every forward pass, so adapter state is never touched by two requests at once. It
batches (utils/serving/batcher.py): requests waiting in the bounded queue (beyond --max_queue: HTTP 503) join
the running batch between two decoding steps, up to --max_batch_size at once; when the worker is idle, the
first request waits up to --max_wait_ms for companions. Requests the batcher cannot serve (beam search, prompt
learning adapters, models whose cache is not a plain full-attention cache) take the single-request path:
`model.generate` through utils/generation.py, between two steps. An error never leaves a request waiting: the
requests it touched get an OpenAI-style 500 and the worker keeps serving.
"""
import queue
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

from utils.errors import UserError
from utils.serving.protocol import APIError, generation_failed, server_busy, server_shutdown
from utils.serving.streaming import Stripped

DEFAULT_MAX_BATCH_SIZE = 8  # ServeArguments' defaults
DEFAULT_MAX_WAIT_MS = 10


@dataclass
class Entry:
    """One servable model id: the base, or an adapter (shared PeftModel or its own loaded model)."""
    id: str
    model: Any
    tokenizer: Any
    template: Any
    peft_type: Optional[str] = None   # None for the base model
    adapter_dir: Optional[str] = None
    adapter_name: Optional[str] = None  # name inside a shared PeftModel (None: base, or a model of its own)
    shared: bool = False               # model is a shared PeftModel: switch with set_adapter / disable_adapter
    max_length: Optional[int] = None   # the model's context window (max_position_embeddings)
    created: int = field(default_factory=lambda: int(time.time()))
    plan: Any = None                   # how the batcher runs it (batcher.plan_for); None: not decided yet


@dataclass
class Job:
    """One request on its way through the worker; put() hands its events to the request's event loop."""
    entry: Entry
    ids: list
    gen: Any
    stop: Optional[list]
    seed: Optional[int]
    mode: Optional[str]  # None: no streaming; "raw": stream text as is; "strip": stream the stripped answer
    loop: Any = None
    events: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def emitter(self):
        """The callable that streams this job's text (None: not streamed)."""
        if self.mode is None:
            return None
        emit = partial(self.put, "delta")
        return Stripped(emit) if self.mode == "strip" else emit

    def put(self, kind, value):
        """Called from the worker thread: ("delta", text), ("end", (text, reason, n)) or ("error", APIError)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody waits any more
            self.cancel.set()


def new_stats():
    """The worker's counters: decoding steps (one per lane), prefills, the widest lane, requests batched and served
    alone, generations failed, requests cancelled by their client before their end, prefills that took a prompt
    start from the prefix store and the prompt positions they did not compute."""
    return {"steps": 0, "prefills": 0, "widest": 0, "batched": 0, "single": 0, "failed": 0, "cancelled": 0,
            "prefix_hits": 0, "prefix_saved": 0}


def _log_error(what, exc):
    print(f"{what}: {type(exc).__name__}: {exc}", file=sys.stderr)


class Engine:
    """The loaded models and the generation worker that batches their requests."""

    def __init__(self, entries, base_id, gen_defaults, max_queue=64, aliases=None,
                 max_batch_size=DEFAULT_MAX_BATCH_SIZE, max_wait_ms=DEFAULT_MAX_WAIT_MS, prefix_tokens=None):
        self.entries = {e.id: e for e in entries}
        self.base_id = base_id
        self.aliases = dict(aliases or {})
        self.gen_defaults = gen_defaults
        self.jobs = queue.Queue(maxsize=max(1, max_queue))
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000
        self.prefix_tokens = prefix_tokens  # None: the batcher's default
        self.stats = new_stats()
        self._stop = threading.Event()
        self._thread = None
        self._start_lock = threading.Lock()

    # -- lookup --------------------------------------------------------------------------------------
    def get(self, model_id):
        entry = self.entries.get(model_id) or self.entries.get(self.aliases.get(model_id, ""))
        if entry is None:
            raise APIError(404, f"The model `{model_id}` does not exist; available models: "
                                f"{', '.join(self.entries)}", "model", "model_not_found")
        return entry

    # -- the worker's life ---------------------------------------------------------------------------
    def start(self):
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._work, name="generation-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout=30):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:  # fail whatever still waits
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            job.put("error", server_shutdown())

    def submit(self, job):
        if self._thread is None or not self._thread.is_alive():
            self.start()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise server_busy(self.jobs.maxsize) from None

    def _work(self):
        from utils.serving.batcher import Batcher

        batcher = Batcher(self.stats, self.prefix_tokens)
        try:
            while not self._stop.is_set():
                jobs = []
                try:
                    jobs = self._take(batcher.size)
                    self._admit(batcher, jobs)
                    if batcher.size:
                        batcher.step()
                except Exception as exc:  # a safety net (the batcher fails the requests it touched itself)
                    _log_error("generation worker", exc)
                    error = generation_failed(exc)
                    batcher.fail_all(error)
                    for job in jobs:  # an extra event after a job's end is never read
                        job.put("error", error)
        finally:
            batcher.fail_all(server_shutdown())

    def _take(self, running):
        """The jobs to admit now: whatever waits, up to the free batch rows; an idle worker waits up to 0.2 s for
        a first job, then up to max_wait for companions."""
        free = self.max_batch_size - running
        jobs = []
        if free <= 0:
            return jobs
        if not running:
            try:
                jobs.append(self.jobs.get(timeout=0.2))
            except queue.Empty:
                return jobs
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < free and (left := deadline - time.monotonic()) > 0:
                try:
                    jobs.append(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
        while len(jobs) < free:
            try:
                jobs.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _admit(self, batcher, jobs):
        from utils.serving.batcher import plan_for

        batch = []
        for job in jobs:
            if job.cancel.is_set():
                self.stats["cancelled"] += 1
                continue  # the client went away while it waited
            if job.entry.plan is None:
                job.entry.plan = plan_for(job.entry)
            if job.entry.plan.single or job.gen.num_beams > 1:
                self.stats["single"] += 1
                self._run_single(job)
            else:
                batch.append(job)
        if batch:
            batcher.admit(batch)

    # -- the single-request path -----------------------------------------------------------------------
    def _run_single(self, job):
        try:
            job.put("end", self.run(job))
        except UserError as exc:
            job.put("error", APIError(400, str(exc)))
        except Exception as exc:  # a failed generation must not take the worker down
            _log_error("generation failed", exc)
            self.stats["failed"] += 1
            job.put("error", generation_failed(exc))

    def run(self, job):
        """Generate one answer with model.generate in the worker thread: (text, finish_reason, completion_tokens)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from utils.generation import generate_ids, generation_kwargs

        class ClientGone(StoppingCriteria):  # stops generation when the client disconnects mid-stream
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), job.cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        entry = job.entry
        if job.seed is not None:
            torch.manual_seed(job.seed)
        kwargs = generation_kwargs(job.gen, entry.tokenizer, entry.template)
        kwargs["stopping_criteria"] = StoppingCriteriaList([ClientGone()])
        emit = job.emitter()
        context = nullcontext()
        if entry.shared:
            if entry.adapter_name is None:
                context = entry.model.disable_adapter()
            else:
                entry.model.set_adapter(entry.adapter_name)
        with context:
            return generate_ids(entry.model, entry.tokenizer, job.ids, kwargs, stream=emit, stop=job.stop)


# ---- loading ---------------------------------------------------------------------------------------------
def parse_lora_value(value):
    """'NAME=DIR' or 'DIR' -> (model id, directory); the id defaults to the directory's name."""
    if "=" in value and not Path(value).exists():
        name, path = value.split("=", 1)
        if not name.strip() or not path.strip():
            raise UserError(f"--lora_dir '{value}' must be DIR or NAME=DIR with both parts non-empty")
        return name.strip(), path.strip()
    return Path(value).resolve().name or value, value


def _base_key(name):
    """Compare base models by identity: embedded aliases by alias, local paths by their real path."""
    from utils.models import EMBEDDED_NAMES

    alias = EMBEDDED_NAMES.get(str(name).lower())
    if alias:
        return f"embedded:{alias}"
    path = Path(name)
    return str(path.resolve()) if path.exists() else str(name)


def _default_base_id(name):
    path = Path(name)
    return path.resolve().name if path.exists() else str(name)


def _context_length(model):
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def batching_limits(serve_args):
    """(--max_batch_size, --max_wait_ms) of the server's arguments, checked (ServeArguments' defaults for what an
    arguments object lacks)."""
    from utils.args import ServeArguments

    defaults = ServeArguments()
    size = getattr(serve_args, "max_batch_size", None)
    wait = getattr(serve_args, "max_wait_ms", None)
    size = defaults.max_batch_size if size is None else size
    wait = defaults.max_wait_ms if wait is None else wait
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"--max_batch_size must be at least 1, not {size}")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
        raise UserError(f"--max_wait_ms must be at least 0, not {wait}")
    return size, wait


def _base_of(model_args, adapters, runs):
    """The base model: --model_name_or_path, else the adapters' (all the same one), else the embedded model."""
    from utils.models import EMBEDDED_ALIAS

    if model_args.model_name_or_path:
        return model_args.model_name_or_path
    if not adapters:
        return EMBEDDED_ALIAS
    first = adapters[0][0]
    base = runs[first].meta["base_model"]
    for name, _ in adapters[1:]:
        if _base_key(runs[name].meta["base_model"]) != _base_key(base):
            raise UserError(f"the adapters were trained on different base models ('{first}' on {base}, "
                            f"'{name}' on {runs[name].meta['base_model']}); start one server.py per base model")
    return base


def _adapter_entries(adapters, runs, bits_of, path, model_args, trust, log):
    """(an Entry per adapter, groups: (PEFT tuner type, quantization bits) -> the shared PeftModel)."""
    from utils.loader import attach_run, shares_base
    from utils.models import load_model, load_tokenizer, place_for_inference
    from utils.peft_methods import load_adapter

    entries, groups = [], {}
    for i, (name, adir) in enumerate(adapters):
        run, bits = runs[name], bits_of[name]
        tokenizer = load_tokenizer(adir, trust)
        shared = shares_base(run)
        internal = f"adapter{i}"
        if shared:
            key = (run.adapter_config.get("peft_type"), bits)
            if key not in groups:
                groups[key] = place_for_inference(load_model(path, model_args.dtype, trust, tokenizer.pad_token_id,
                                                             bits))
            model = groups[key] = load_adapter(groups[key], adir, adapter_name=internal)
        else:
            model = place_for_inference(attach_run(load_model(path, model_args.dtype, trust, tokenizer.pad_token_id,
                                                              bits), run))
        entries.append(Entry(name, model, tokenizer, run.template, run.peft_type, str(adir),
                             internal if shared else None, shared, _context_length(model)))
        log(f"[model '{name}': adapter {adir} ({run.peft_type}), template {run.template.name}, "
            f"{'shares the base' if shared else 'own copy of the base'}]")
    return entries, groups


def load_engine(model_args, serve_args, gen_args, log=print):
    """Load the base model once and every --lora_dir adapter; one Entry per model id.

    Adapters of methods whose preset says `shareable` attach to one PeftModel per (tuner, quantization) and are
    switched per request; the others get their own copy of the base.
    """
    from utils.loader import inference_bits, open_run
    from utils.models import get_spec, load_model, load_tokenizer, place_for_inference, resolve_model
    from utils.peft_methods import check_quantization_available, requested_bits
    from utils.templates import pick_template

    max_batch_size, max_wait_ms = batching_limits(serve_args)
    base_bits = requested_bits(model_args)
    adapters = [parse_lora_value(v) for v in serve_args.lora_dir or []]
    ids = [a[0] for a in adapters]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise UserError(f"two --lora_dir values would both be served as '{dup}'; name them with NAME=DIR")
    runs = {name: open_run(path) for name, path in adapters}
    bits_of = {name: inference_bits(run, base_bits) for name, run in runs.items()}
    for bits in {base_bits, *bits_of.values()}:
        check_quantization_available(bits)
    trust = model_args.trust_remote_code or any(r.meta.get("trust_remote_code") for r in runs.values())
    base = _base_of(model_args, adapters, runs)
    model_type = model_args.model_type or (runs[adapters[0][0]].meta["model_type"] if adapters else None)
    path, _, mtype = resolve_model(base, model_type, trust)
    base_id = serve_args.served_name or _default_base_id(base)
    if base_id in ids:
        raise UserError(f"the base model and an adapter would both be served as '{base_id}'; rename the adapter "
                        "with NAME=DIR or the base with --served_name")

    entries, groups = _adapter_entries(adapters, runs, bits_of, path, model_args, trust, log)
    tokenizer = load_tokenizer(path, trust)
    template = pick_template(serve_args.template, get_spec(mtype).template, tokenizer)
    host = next((m for (_, bits), m in groups.items() if bits == base_bits), None)
    if host is not None:
        base_entry = Entry(base_id, host, tokenizer, template, shared=True, max_length=_context_length(host))
    else:
        model = place_for_inference(load_model(path, model_args.dtype, trust, tokenizer.pad_token_id, base_bits))
        model.eval()
        base_entry = Entry(base_id, model, tokenizer, template, max_length=_context_length(model))
    log(f"[model '{base_id}': base {base} ({mtype}), template {template.name}]")
    entries = [base_entry] + entries
    _plan_entries(entries, serve_args, max_batch_size, max_wait_ms, log)
    aliases = {str(base): base_id} if str(base) != base_id else {}
    return Engine(entries, base_id, gen_args, serve_args.max_queue, aliases, max_batch_size, max_wait_ms,
                  getattr(serve_args, "prefix_cache_tokens", None))


def _plan_entries(entries, serve_args, max_batch_size, max_wait_ms, log):
    """Pack the entries' weights (--packed_weights), give each its batching plan, and say so."""
    from utils.serving.batcher import plan_for
    from utils.serving.packed import pack_linears

    which = getattr(serve_args, "packed_weights", "all")
    packed = [f"{e.id} ({n} layers)" for e in entries if (n := pack_linears(e.model, which, max_batch_size))]
    for entry in entries:
        entry.plan = plan_for(entry)
    if packed:
        log(f"[linear layers run by oneDNN with their weights packed for {max_batch_size} rows (CPU float32): "
            f"{', '.join(packed)}]")
    single = [f"{e.id} ({e.plan.single})" for e in entries if e.plan.single]
    log(f"[batching: up to {max_batch_size} requests per step, first request waits up to {max_wait_ms} ms for "
        f"companions{'; single-request path for ' + ', '.join(single) if single else ''}]")
    prefix_tokens = getattr(serve_args, "prefix_cache_tokens", None)
    if prefix_tokens is not None:
        log(f"[prompt starts that requests share kept for reuse: "
            f"{f'up to {prefix_tokens} positions' if prefix_tokens else 'off'}]")
