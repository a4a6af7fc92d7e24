"""A KV cache for the batcher's lanes whose decoding steps write in place.

transformers' DynamicLayer appends each step's key and value with torch.cat, which copies the whole cache of every
layer at every step: for a batch of 8 on a 2-core CPU that copy was 15% of a decoding step (bench/RESULTS.md).
GrowingLayer keeps `keys` / `values` as views of the first positions of larger buffers and writes a step's tokens
into the room behind them; a full buffer grows by half. Values are bit for bit those of DynamicLayer: only where
they are stored differs.

The batcher replaces `keys` / `values` with new tensors when rows join or leave a lane (utils/serving/batcher.py:
Lane._merge / Lane._select); the next update sees that they are no longer views of its buffers and copies them
into fresh ones once.
"""
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 16  # positions of room added at least, when a buffer is (re)made


class GrowingLayer(DynamicLayer):
    """DynamicLayer whose keys and values are views into buffers with room for the next tokens."""

    _kbuf = _vbuf = None

    def _owns_views(self):
        """Whether keys / values are still the views this layer made (not tensors the batcher put there)."""
        k, v, kb, vb = self.keys, self.values, self._kbuf, self._vbuf
        return (kb is not None and k.data_ptr() == kb.data_ptr() and k.stride() == kb.stride()
                and v.data_ptr() == vb.data_ptr() and v.stride() == vb.stride())

    def _rebuffer(self, held, need, key_states, value_states):
        """Fresh buffers with room for `need` positions and more, holding the `held` positions kept so far."""
        room = need + max(MIN_ROOM, need // 2)
        kshape, vshape = list(key_states.shape), list(value_states.shape)
        kshape[-2] = vshape[-2] = room
        kbuf, vbuf = key_states.new_empty(kshape), value_states.new_empty(vshape)
        if held:
            kbuf[..., :held, :] = self.keys
            vbuf[..., :held, :] = self.values
        self._kbuf, self._vbuf = kbuf, vbuf

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys.numel() else 0
        need = held + key_states.shape[-2]
        if (held and not self._owns_views()) or self._kbuf is None or self._kbuf.shape[-2] < need \
                or self._kbuf.shape[:-2] != key_states.shape[:-2]:
            self._rebuffer(held, need, key_states, value_states)
        self._kbuf[..., held:need, :] = key_states
        self._vbuf[..., held:need, :] = value_states
        self.keys, self.values = self._kbuf[..., :need, :], self._vbuf[..., :need, :]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """DynamicCache of GrowingLayer: what a lane's forward passes use."""

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
