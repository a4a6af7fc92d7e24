"""The output layer (lm_head) of a CPU float32 model served by server.py, run through oneDNN with its weight packed.

A decoding step multiplies a few rows (one per request in the batch) by the vocabulary-sized output matrix. On a
2-core AMD EPYC (AVX2 only) torch's default GEMM took 35 ms for that at 8 rows and 12 ms at 1 row; oneDNN with the
weight packed once in its own layout took 19 ms and 6 ms (bench/RESULTS.md, 2026-12-07). The results agree to
float32 rounding (the rows' sums run in another order), not bit for bit.

pack_output_layer keeps the module and its weight as they are (state dicts, tied embeddings, peft wrappers see
nothing new) and gives that one Linear a forward that uses the packed copy, which costs one more copy of the weight
in memory. The packed copy is made again if the weight is changed in place or replaced, and the plain path runs
whenever the input is not CPU float32 or gradients are wanted.
"""
import types

import torch
import torch.nn.functional as F


def _packed_forward(self, x):
    weight = self.weight
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, self.bias)
    if self._packed_version != _versions(self):  # changed in place, or replaced, since it was packed
        _pack(self)
    rows = x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn()
    out = torch._C._nn.mkldnn_linear(rows, self._packed, self._packed_bias).to_dense()
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _versions(head):
    """What changes when the weight or bias is written in place or replaced by another tensor."""
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in (head.weight, head.bias))


def _pack(head):
    weight = head.weight.detach()
    bias = head.bias.detach() if head.bias is not None else torch.zeros(weight.shape[0])
    head._packed, head._packed_bias, head._packed_version = weight.to_mkldnn(), bias.to_mkldnn(), _versions(head)


def pack_output_layer(model):
    """Give the model's output Linear the packed oneDNN forward, where it applies: a CPU float32 nn.Linear (not a
    LoRA-wrapped one) and a torch built with oneDNN. Returns whether it did."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu" or head.weight.dtype != torch.float32 \
            or not torch.backends.mkldnn.is_available():
        return False
    if "forward" in vars(head):  # packed already (one base shared by several served ids)
        return True
    try:
        _pack(head)
        torch._C._nn.mkldnn_linear(torch.zeros(1, head.in_features).to_mkldnn(), head._packed, head._packed_bias)
    except RuntimeError:  # a build whose oneDNN cannot run it: the plain forward stays
        return False
    head.forward = types.MethodType(_packed_forward, head)
    return True
