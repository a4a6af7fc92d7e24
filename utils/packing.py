"""Fast training paths: padding-free packing, logits only where the loss needs them, and their self-checks.

Packing. `PackingCollator` keeps the batch the user asked for (the same samples per step as without packing, so
steps per epoch, the learning-rate schedule, AdaLoRA's total_step and the multi-process / accumulation
invariances are unchanged) and lays those samples out in as few rows of at most --cutoff_len tokens as pays off,
each sample with its own `position_ids` (0, 1, 2, ... restarting at every sample). No attention mask is passed:
transformers then builds a block-diagonal causal mask from the restarting position ids, so a token attends only
to earlier tokens of its own sample. The first label of every sample is -100, so the last token of one sample
never has to predict the first token of the next; the loss is therefore the token-weighted mean over the same
target tokens as the padded batch (the Trainer's `num_items_in_batch`). The padding that remains at the end of
a row is its own "sample" (positions restart there too) with labels -100.

Whether a model really isolates packed samples depends on its attention code, so `check_packing` runs the model
on two short sequences, alone and packed into one row, and compares the logits: packing is used only when they
agree (no cross-contamination, ever).

Selective logits. Only the positions whose next token is trained need logits: `FastTrainer.compute_loss` asks
the model for those alone (`logits_to_keep` as a boolean mask) and computes the cross-entropy itself, in fp32.
With answer-only loss that skips most of the (hidden x vocab) LM-head work and the vocab-wide softmax.
`check_selective_loss` verifies it against the model's own loss first; methods that add terms to the model's
loss (AdaLoRA's orthogonality penalty) or shift positions (prompt learning) keep the model's own loss.
"""
import contextlib
import heapq
import math

import torch

from utils.trainer import ToolkitTrainer

# Which methods may pack samples or use selective logits is declared by their presets (peft/*.yaml: `packing`,
# `selective_loss`); utils/train.py reads those.
ROW_TOKENS = "row_tokens"  # per-row count of real tokens; read by the Trainer, never passed to the model


def attention_cost_per_position(config):
    """Attention work per token per key position, relative to the token's linear-layer work (from the config).

    With a block-diagonal mask the attention kernels compute the full row (no causal skipping), so a row of W
    tokens costs about W * (1 + coef * W) units; used to choose how many rows a batch is packed into.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = getattr(cfg, "hidden_size", None)
    if not h:
        return 0.0
    heads = getattr(cfg, "num_attention_heads", None) or 1
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    linear = h * (heads * head_dim) * 2 + 2 * h * kv + 3 * h * inter  # q, o, k, v, gated MLP
    # QK^T and AV per key position, x2: attention kernels run at about half the efficiency of the big matmuls
    # (fitted on SmolLM2-135M, bf16 autocast, 2 CPU cores: rows of 203 / 404 / 808 tokens, see bench/RESULTS.md)
    return 2.0 * 2.0 * heads * head_dim / linear


def pack_rows(lengths, capacity, attn_coef=0.0):
    """Group sample indices into rows of at most `capacity` tokens, minimising the estimated cost of the batch.

    For each row count k from the fewest possible up to one row per sample, samples are placed longest first
    into the least-filled row that still has room (LPT); the padded batch of k rows x the longest row costs about
    k * W * (1 + attn_coef * W). The cheapest layout wins (ties: fewer rows). Deterministic for given lengths.
    A sample longer than `capacity` gets a row of its own (the data layer truncates at --cutoff_len, so this only
    happens when capacity is smaller).
    """
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    longest = lengths[order[0]]
    capacity = max(capacity, longest)
    best = None
    for k in range(max(1, math.ceil(sum(lengths) / capacity)), n + 1):
        if best is not None and k * longest * (1.0 + attn_coef * longest) >= best[0]:
            break  # no layout with more rows can be cheaper
        heap = [(0, j) for j in range(k)]  # (load, row): the least-filled row is on top
        rows = [[] for _ in range(k)]
        for i in order:
            load, r = heapq.heappop(heap)
            if load + lengths[i] > capacity:  # not even the least-filled row has room
                rows = None
                break
            rows[r].append(i)
            heapq.heappush(heap, (load + lengths[i], r))
        if rows is None:
            continue
        width = max(load for load, _ in heap)
        cost = k * width * (1.0 + attn_coef * width)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, [sorted(r) for r in rows])
    return best[1]


class PackingCollator:
    """Pack the samples of a batch into rows of at most `max_len` tokens with per-sample position_ids.

    Output: input_ids, labels, position_ids (rows x width), and `row_tokens` (real tokens per row; the Trainer
    counts throughput with it and drops it before the forward). No attention_mask: see the module docstring.
    """

    def __init__(self, pad_token_id, max_len, attn_coef=0.0):
        self.pad_token_id, self.max_len, self.attn_coef = pad_token_id, max_len, attn_coef

    def layout(self, lengths):
        return pack_rows(lengths, self.max_len, self.attn_coef)

    def __call__(self, batch):
        lengths = [len(b["input_ids"]) for b in batch]
        rows = self.layout(lengths)
        loads = [sum(lengths[i] for i in row) for row in rows]
        width = max(loads)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        pos = torch.empty((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                ids[r, at:at + n] = torch.tensor(batch[i]["input_ids"])
                lab = torch.tensor(batch[i]["labels"])
                lab[0] = -100  # never predicted from the previous sample's last token
                labels[r, at:at + n] = lab
                pos[r, at:at + n] = torch.arange(n)
                at += n
            pos[r, at:] = torch.arange(width - at)  # the padding tail: a separate "sample" of its own
        return {"input_ids": ids, "labels": labels, "position_ids": pos,
                ROW_TOKENS: torch.tensor(loads, dtype=torch.long)}


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module  # DDP
    return model


def _forward(model, **kwargs):
    return model(**kwargs, use_cache=False)


@contextlib.contextmanager
def _probe_mode(model):
    """Deterministic forwards for the checks: eval mode, except over bitsandbytes 4-bit layers on a CPU.

    There an eval-mode forward repacks the 4-bit weights for CPU inference, after which they no longer train;
    so those models are probed in train mode with every dropout set to 0, and everything is restored after.
    """
    was_training = model.training
    cpu_4bit = not torch.cuda.is_available() and any(type(m).__name__ == "Linear4bit" for m in model.modules())
    drops = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)] if cpu_4bit else []
    for m, _ in drops:
        m.p = 0.0
    model.train(cpu_4bit)
    try:
        yield
    finally:
        for m, p in drops:
            m.p = p
        model.train(was_training)


def check_packing(model, vocab_size=None, seed=1234):
    """(ok, detail): are two samples packed into one row kept apart, each getting the logits it gets alone?

    Two checks, in eval mode under no_grad with a private generator (training randomness is untouched):
    - isolation: the second sample's logits must not change when the first sample is replaced by other tokens
      (same shapes, so any difference beyond rounding is attention across samples; the tolerance is strict in
      every dtype);
    - positions: each packed sample's logits must equal its logits alone (tolerance by weight dtype).
    An exception means the attention implementation cannot take packed position_ids.
    """
    model = _unwrap(model)
    vocab_size = vocab_size or model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    a1, a2 = (torch.randint(5, vocab_size, (1, 11), generator=gen) for _ in range(2))
    b = torch.randint(5, vocab_size, (1, 7), generator=gen)
    pos = torch.cat([torch.arange(11), torch.arange(7)]).unsqueeze(0)
    a1, a2, b, pos = (t.to(_device(model)) for t in (a1, a2, b, pos))  # a quantized base already sits on its GPU
    try:
        with _probe_mode(model), torch.no_grad():
            alone_a = _forward(model, input_ids=a1).logits.float()
            alone_b = _forward(model, input_ids=b).logits.float()
            packed1 = _forward(model, input_ids=torch.cat([a1, b], 1), position_ids=pos).logits.float()
            packed2 = _forward(model, input_ids=torch.cat([a2, b], 1), position_ids=pos).logits.float()
    except Exception as exc:  # an attention implementation that cannot take position_ids this way
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    scale = max(alone_a.abs().max().item(), alone_b.abs().max().item(), 1e-6)
    leak = (packed1[:, 11:] - packed2[:, 11:]).abs().max().item() / scale
    if leak > 1e-4:
        return False, f"a packed sample's logits change by {leak:.1e} (relative) when the sample before it changes"
    err = max((packed1[:, :11] - alone_a).abs().max().item(), (packed1[:, 11:] - alone_b).abs().max().item()) / scale
    tol = 1e-4 if _weights_dtype(model) == torch.float32 else 2e-2
    if err > tol:
        return False, f"packed logits differ from the logits alone by {err:.1e} (relative; tolerance {tol:.0e})"
    return True, f"packed = alone to {err:.0e}, no leak across samples"


def _device(model):
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _weights_dtype(model):
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def selective_loss(model, inputs, num_items_in_batch=None):
    """Causal-LM loss with logits computed only where the next token is trained; fp32 cross-entropy.

    Sum over trained tokens divided by num_items_in_batch (the Trainer's count over the whole accumulated,
    all-process batch) or, without it, by this batch's trained tokens: the model's own loss, term for term.
    """
    labels = inputs["labels"]
    target = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = target != -100
    fwd = {k: v for k, v in inputs.items() if k not in ("labels", ROW_TOKENS)}
    out = _forward(model, **fwd, logits_to_keep=keep)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    targets = target[target != -100]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    if torch.is_tensor(denom):
        denom = denom.to(loss.device)
    return loss / denom, out


def check_selective_loss(model, vocab_size=None, seed=4321):
    """(ok, detail): selective_loss equals the model's own loss on a small labelled batch (eval mode, no_grad)."""
    model = _unwrap(model)
    vocab_size = vocab_size or model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    ids, labels = ids.to(_device(model)), labels.to(_device(model))
    try:
        with _probe_mode(model), torch.no_grad():
            own = _forward(model, input_ids=ids, labels=labels).loss.float().item()
            mine = selective_loss(model, {"input_ids": ids, "labels": labels})[0].item()
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    err = abs(own - mine) / max(abs(own), 1e-6)
    tol = 1e-4 if _weights_dtype(model) == torch.float32 else 2e-2
    return err <= tol, f"relative difference to the model's own loss {err:.1e}"


def batch_loss(model, batch, bf16=False):
    """Token-weighted loss of one collated batch in eval mode (no_grad), optionally under CPU bf16 autocast."""
    model = _unwrap(model)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with _probe_mode(model), torch.no_grad(), ctx:
        fwd = {k: v.to(_device(model)) for k, v in batch.items() if k != ROW_TOKENS}
        return _forward(model, **fwd).loss.float().item()


FP32_SDPA = "sdpa_fp32_under_autocast"


def _sdpa_fp32(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """sdpa, but computed in fp32 when CPU bf16 autocast is on (transformers' own sdpa otherwise).

    Measured here (SmolLM2-135M, 2 cores, AVX512-BF16): PyTorch's CPU flash-attention kernel is slower in bf16
    than in fp32 at these sizes, and with a mask transformers repeats the key/value heads instead of using
    grouped-query attention; this runs the fp32 kernel with enable_gqa: a packed LoRA step is 6% faster than with
    sdpa in bf16. Same mask, same semantics; the attention itself is computed in full precision. (Eager attention
    was another 6% faster but keeps every layer's attention probabilities for the backward pass: +0.45 GB peak
    RSS; see bench/RESULTS.md.)
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    with torch.autocast("cpu", enabled=False):
        q, k, v = query.float(), key.float(), value.float()
        causal = attention_mask is None and q.shape[2] > 1 and q.shape[2] == k.shape[2] and \
            (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
            enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_fp32_sdpa():
    """Register FP32_SDPA with transformers (attention function + the sdpa mask builder); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_SDPA, _sdpa_fp32)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
    return FP32_SDPA


class FastTrainer(ToolkitTrainer):
    """ToolkitTrainer that computes the training loss from selected logits and counts packed tokens."""

    selective = False  # set by utils.train after check_selective_loss
    after_train = ()  # callables that undo training-only settings (e.g. the attention implementation)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != ROW_TOKENS}
        if not self.selective or return_outputs or self.label_smoother is not None or self.compute_loss_func:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None  # the Trainer then divides by the accumulation steps itself
        loss, _ = selective_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss
        return loss

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if self.args.bf16 or self.args.fp16:  # autocast is for the training loop: afterwards the model is itself again
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        for undo in self.after_train:
            undo()
        return result

    def _track_num_input_tokens(self, inputs):
        if ROW_TOKENS not in inputs or self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        n = torch.as_tensor(inputs[ROW_TOKENS].sum(), device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(n).sum().item()
