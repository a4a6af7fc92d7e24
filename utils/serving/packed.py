"""The linear layers of a CPU float32 model served by server.py, run through oneDNN with their weights packed.

A decoding step multiplies a few rows (one per request in the batch) by every weight matrix of the model. torch's
default GEMM does poorly at those few rows on an AVX2 CPU: on a 2-core AMD EPYC a 576 x 1536 projection at 8 rows
took 325-376 us with it and 165-173 us through oneDNN with the weight reordered once for that many rows; the
49,152 x 576 output layer 29.5 ms and 9.2 ms (bench/RESULTS.md, 2026-12-07). Prompts (hundreds of rows) run within
a few percent of torch's GEMM either way. The results agree to float32 rounding (the sums run in another order), not
bit for bit.

pack_linears keeps every module and weight as it is (state dicts, tied embeddings, peft wrappers see nothing new)
and gives each chosen nn.Linear a forward that uses its packed copy, which costs one more copy of those weights in
memory. The packed copy is made again if the weight is changed in place or replaced, and the plain path runs
whenever the input is not CPU float32 or gradients are wanted. Small matrices (the k/v projections of a
grouped-query model, LoRA's A and B) keep torch's GEMM: oneDNN's fixed cost per call outweighs its gain there.
"""
import types

import torch
import torch.nn.functional as F

MIN_ELEMENTS = 1 << 18  # smaller weights keep torch's GEMM (a 192 x 576 one at 1 row: 13 us plain, 41 us oneDNN)


def _packed_forward(self, x):
    weight = self.weight
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or x.numel() < self._packed_from:
        return F.linear(x, weight, self.bias)
    if self._packed_version != _versions(self):  # changed in place, or replaced, since it was packed
        _pack(self, self._packed_rows)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed, self.bias, "none", [], "")


def _versions(layer):
    """What changes when the weight or bias is written in place or replaced by another tensor."""
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in (layer.weight, layer.bias))


def _pack(layer, rows):
    layer._packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows)
    layer._packed_rows, layer._packed_version = rows, _versions(layer)


def _eligible(layer):
    return (type(layer) is torch.nn.Linear and layer.weight.device.type == "cpu"
            and layer.weight.dtype == torch.float32)


def _output_layer(model):
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _adapter_layers(model):
    """ids of the Linear layers inside a PEFT tuner's adapter dicts (LoRA's A and B...): they stay plain, being
    small and switched per request."""
    out = set()
    for module in model.modules():
        for name in getattr(module, "adapter_layer_names", ()):
            holder = getattr(module, name, None)
            if isinstance(holder, torch.nn.ModuleDict):
                out.update(id(m) for m in holder.modules())
    return out


def _give(layer, rows, from_rows):
    """The packed forward for one Linear; False where this torch's oneDNN cannot run it."""
    if "forward" in vars(layer):  # packed already (one base shared by several served ids)
        return True
    layer._packed_from = from_rows * layer.in_features
    try:
        _pack(layer, rows)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, layer.in_features), layer._packed, layer.bias, "none",
                                           [], "")
    except (RuntimeError, AttributeError):
        return False
    layer.forward = types.MethodType(_packed_forward, layer)
    return True


def pack_linears(model, which="all", rows=8, min_elements=MIN_ELEMENTS):
    """Give the packed oneDNN forward to the model's CPU float32 nn.Linear layers: which="all" every one with at
    least min_elements weights plus the output layer, "head" the output layer only, "none" none. rows: the batch
    size the weights are laid out for (the server's --max_batch_size). Returns how many layers have it."""
    if which == "none" or not torch.backends.mkldnn.is_available():
        return 0
    head = _output_layer(model)
    layers = [head] if head is not None and _eligible(head) else []
    if which == "all":
        adapters = _adapter_layers(model)
        layers += [m for m in model.modules() if m is not head and _eligible(m) and id(m) not in adapters
                   and m.weight.numel() >= min_elements]
    return sum(_give(layer, max(1, rows), 1 if layer is head else 2) for layer in layers)
