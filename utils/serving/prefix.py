"""Prompt starts that requests share (a system prompt, few-shot examples), kept with their keys and values.

A chat server sees the same beginning in most prompts: SmolLM2's template puts 24 tokens of system prompt before
each user message, about half of a short prompt. The batcher (utils/serving/batcher.py: Lane.prefill) asks this
store for the longest start that every newcomer of a prefill shares with a kept one, copies that start's keys and
values into the new cache and runs the model over the rest of each prompt only. Causal attention makes the keys
and values of the first P positions depend on those P tokens alone, so a kept start serves any prompt that begins
with it, whatever follows.

What is kept: after a prefill, the start a newcomer shares with another prompt of that prefill or with one of the
recent prompts (at least MIN_TOKENS long; never a whole prompt: its last token must run to give the first answer
token). Entries are per lane and adapter (an adapter changes the keys and values), the least recently used leave
first, and all of them together hold at most `budget` positions (server.py --prefix_cache_tokens; 0: off).
"""
from collections import OrderedDict, deque

import numpy as np
import torch

MIN_TOKENS = 8  # shorter shared starts are not worth a cache entry
RECENT = 32     # prompts remembered (tokens only) to spot a start that comes back


def common_length(a, b):
    """Length of the common start of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class Entry:
    """One kept start: its tokens and, per layer, keys and values [1, kv heads, P, head dim]."""

    def __init__(self, tokens, layers):
        self.tokens, self.layers = tokens, layers


class PrefixStore:
    """Kept prompt starts of one batcher, least recently used first out, at most `budget` positions in all."""

    def __init__(self, budget=2048):
        self.budget = budget
        self.entries = OrderedDict()  # (lane key, adapter, tokens) -> Entry
        self.recent = deque(maxlen=RECENT)  # (lane key, adapter, prompt)
        self.hits = self.saved = 0  # prefills that used an entry; prompt positions they did not compute

    @property
    def held(self):
        return sum(len(e.tokens) for e in self.entries.values())

    def find(self, key, adapter, prompts):
        """(entry, P): the kept start with the longest part P that every prompt begins with (each prompt's last
        token excluded), or (None, 0) when none reaches MIN_TOKENS."""
        if not self.budget:
            return None, 0
        best, length = None, 0
        for (k, a, _), entry in self.entries.items():
            if k != key or a != adapter:
                continue
            n = min(common_length(entry.tokens, p[:-1]) for p in prompts)
            if n > length:
                best, length = entry, n
        if length < MIN_TOKENS:
            return None, 0
        self.entries.move_to_end((key, adapter, best.tokens))
        self.hits += 1
        self.saved += length * len(prompts)
        return best, length

    def learn(self, key, adapter, prompts, row_layers):
        """Keep what the prompts of one prefill share with each other or with recent prompts. row_layers(i, n):
        prompt i's keys and values of its first n positions, per layer."""
        if not self.budget:
            return
        others = [p for k, a, p in self.recent if k == key and a == adapter]
        for i, prompt in enumerate(prompts):
            start = prompt[:-1]
            n = max([common_length(start, q) for j, q in enumerate(prompts) if j != i]
                    + [common_length(start, q) for q in others] + [0])
            covered = max([common_length(e.tokens, start) for (k, a, _), e in self.entries.items()
                           if k == key and a == adapter] + [0])
            if n >= MIN_TOKENS and n > covered and n <= self.budget:
                tokens = tuple(start[:n])
                self.entries[(key, adapter, tokens)] = Entry(tokens, row_layers(i, n))
                while self.held > self.budget:
                    self.entries.popitem(last=False)
        for prompt in prompts:
            self.recent.append((key, adapter, tuple(prompt)))


def seed(cache, entry, length, rows):
    """Put an entry's first `length` keys and values into an empty cache, once per row (the cache's update copies
    the expanded views into its own buffers)."""
    for i, (keys, values) in enumerate(entry.layers):
        cache.update(keys[:, :, :length].expand(rows, -1, -1, -1), values[:, :, :length].expand(rows, -1, -1, -1), i)


def row_layers(cache, row, columns):
    """Keys and values of one row of a cache at the given columns (a LongTensor), per layer, as [1, h, n, d]."""
    return [(layer.keys[row:row + 1].index_select(2, columns), layer.values[row:row + 1].index_select(2, columns))
            for layer in cache.layers]  # index_select copies: the entry shares no memory with the cache


def columns_of(prefix, width, prompt_len, n, device=None):
    """Cache columns of a prompt's first n positions after a prefill that took `prefix` positions from the store
    and left-padded the rest of the prompts to `width`."""
    rest = prompt_len - prefix
    cols = list(range(min(n, prefix))) + [prefix + width - rest + j for j in range(max(0, n - prefix))]
    return torch.tensor(cols, dtype=torch.long, device=device)
