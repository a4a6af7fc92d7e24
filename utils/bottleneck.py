"""Bottleneck adapters for decoder LLMs: the three variants of the Alpaca-CoT study that upstream `peft` lacks.

An adapter is a small bottleneck network, ``up(act(down(x)))`` with ``down: hidden -> bottleneck`` and
``up: bottleneck -> hidden``, whose output is multiplied by a scale ``s`` (a constant, or a trainable scalar
with ``scaling="learned"``) and added to the output of a sub-layer of every transformer block. The base
model is frozen; only the adapters train.

- ``sadapter_h`` (SadapterH, Houlsby et al. 2019, sequential): two adapters per block, one right after the
  attention output projection (``o_proj``) and one right after the MLP output projection (``down_proj``),
  both before the residual addition: ``y = m(x); y + s * up(act(down(dropout(y))))``.
- ``sadapter_p`` (SadapterP, Pfeiffer et al. 2020, sequential): one adapter per block, after the MLP output
  projection only, same formula.
- ``p_adapter`` (P-adapter, He et al. 2021 "Towards a unified view of parameter-efficient transfer learning",
  parallel): one adapter per block beside the whole MLP (``parallel_site="mlp"``, the default) or beside the
  whole attention module (``parallel_site="attn"``). It reads the same hidden states as that sub-layer and its
  output is added to the sub-layer's output: ``m(x, ...) + s * up(act(down(dropout(x))))``.

With ``init="zero"`` the up-projection starts at zero, so the adapted model computes exactly what the base
computes until the first optimizer step. Adapters are inserted by replacing the target sub-modules with a
small wrapper module that holds ``base`` (the original module) and ``adapter``; parameter names are therefore
stable, e.g. ``model.layers.0.mlp.down_proj.adapter.down.weight``. They are saved in the PEFT directory layout
(``adapter_config.json`` + ``adapter_model.safetensors`` holding only the adapter tensors).

Public API: ``BottleneckConfig``, ``adapter_types``, ``add_bottleneck``, ``save_bottleneck``,
``is_bottleneck_dir``, ``load_bottleneck``, ``bottleneck_state_dict``, ``adapter_modules``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from utils.errors import UserError
from utils.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")
INITS = ("zero", "normal")
PARALLEL_SITES = ("mlp", "attn")
LIBRARY = "alpaca-cot bottleneck"


def adapter_types():
    """The methods built by this module: presets in peft/ whose loader is `bottleneck`."""
    from utils.peft_methods import methods_with

    return methods_with(loader="bottleneck")


STYLES = ("sequential", "parallel")


@dataclasses.dataclass
class BottleneckConfig:
    adapter_type: str = "sadapter_h"
    bottleneck_size: int = 64
    non_linearity: str = "relu"
    dropout: float = 0.0
    scaling: Union[float, str] = 1.0
    init: str = "zero"
    target_modules: Optional[list] = None
    parallel_site: str = "mlp"
    base_model_name_or_path: Optional[str] = None
    style: Optional[str] = None         # sequential (after the sites) or parallel (beside parallel_site)
    sites: Optional[list] = None        # roles of the model's layout a sequential adapter follows

    def _preset_variant(self):
        """style and sites from the method's preset, for configs that do not name them (older runs)."""
        from utils.peft_methods import load_preset

        defaults = load_preset(self.adapter_type)["defaults"]
        self.style = self.style or defaults["style"]
        if self.sites is None and self.style == "sequential":
            self.sites = list(defaults["sites"])

    def __post_init__(self):
        def bad(field, value, valid):
            raise UserError(f"bottleneck {field} '{value}' is not valid; use one of: {', '.join(valid)}")

        if self.adapter_type not in adapter_types():
            bad("adapter_type", self.adapter_type, adapter_types())
        if self.non_linearity not in NON_LINEARITIES:
            bad("non_linearity", self.non_linearity, NON_LINEARITIES)
        if self.init not in INITS:
            bad("init", self.init, INITS)
        if self.parallel_site not in PARALLEL_SITES:
            bad("parallel_site", self.parallel_site, PARALLEL_SITES)
        self._preset_variant()
        if self.style not in STYLES:
            bad("style", self.style, STYLES)
        if isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) \
                or self.bottleneck_size < 1:
            raise UserError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"bottleneck dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.scaling, str):
            if self.scaling != "learned":
                try:
                    self.scaling = float(self.scaling)
                except ValueError:
                    raise UserError(f"bottleneck scaling must be a number or 'learned', got '{self.scaling}'") \
                        from None
        elif isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise UserError(f"bottleneck scaling must be a number or 'learned', got {self.scaling!r}")
        else:
            self.scaling = float(self.scaling)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise UserError("bottleneck target_modules is empty; name at least one module or leave it unset")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data.pop("peft_type", None)
        data.pop("library", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise UserError(f"unknown bottleneck config key '{unknown[0]}'; valid keys are: "
                            f"{', '.join(sorted(fields))}")
        return cls(**data)


# --------------------------------------------------------------------------------------------- modules

def _activation(name):
    return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}[name]()


class BottleneckAdapter(nn.Module):
    """s * up(act(down(dropout(x)))): hidden -> bottleneck -> hidden."""

    def __init__(self, in_features, out_features, config, dtype=None, device=None):
        super().__init__()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.down = nn.Linear(in_features, config.bottleneck_size, dtype=dtype, device=device)
        self.act = _activation(config.non_linearity)
        self.up = nn.Linear(config.bottleneck_size, out_features, dtype=dtype, device=device)
        if config.scaling == "learned":
            self.scale = nn.Parameter(torch.ones((), dtype=dtype, device=device))
        else:
            self.scale = float(config.scaling)
        self.reset_parameters(config.init)

    @torch.no_grad()
    def reset_parameters(self, init):
        if init == "zero":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.down.weight, std=0.01)
            nn.init.normal_(self.up.weight, std=0.01)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        x = x.to(self.down.weight.dtype)
        return self.up(self.act(self.down(self.dropout(x)))) * self.scale


class _Wrapper(nn.Module):
    """Holds `base` (the original module) and `adapter`; unknown attributes are looked up on `base`."""

    def __init__(self, base, adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name in ("base", "adapter") or "base" not in modules:
                raise
            return getattr(modules["base"], name)


def _add(output, delta):
    """Add delta to a module output, or to element 0 of a tuple/list output."""
    if isinstance(output, (tuple, list)):
        return type(output)((output[0] + delta.to(output[0].dtype), *output[1:]))
    return output + delta.to(output.dtype)


class SequentialAdapterLayer(_Wrapper):
    """y = base(x); y + s * adapter(y)  (Houlsby / Pfeiffer: after a sub-layer's output projection)."""

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        y = out[0] if isinstance(out, (tuple, list)) else out
        return _add(out, self.adapter(y))


class ParallelAdapterLayer(_Wrapper):
    """base(x, ...) + s * adapter(x), x = the hidden states the wrapped sub-layer reads (He et al. 2021)."""

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if x is None:
            raise TypeError("the parallel adapter's module was called without hidden states (first positional "
                            "argument or `hidden_states=`)")
        return _add(self.base(*args, **kwargs), self.adapter(x))


# --------------------------------------------------------------------------------------------- helpers

def _model_type(model):
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _hidden_size(model):
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    return None


def default_targets(model, config):
    """Target names for config.adapter_type from the model family's layout (utils/models.py)."""
    from utils.models import layout_for

    model_type = _model_type(model)
    names = layout_for(model_type)
    sites = [config.parallel_site] if config.style == "parallel" else list(config.sites or [])
    if names is None or any(s not in names for s in sites):
        raise UserError(f"bottleneck adapters have no default target modules for model type '{model_type}'; "
                        f"pass target_modules explicitly with the names of the modules to wrap, such as o_proj and "
                        f"down_proj")
    return [names[s] for s in sites]


def _matches(full_name, target):
    if full_name == target or full_name.endswith("." + target):
        return True
    return "*" in target and (fnmatch.fnmatchcase(full_name, target) or fnmatch.fnmatchcase(full_name, "*." + target))


def _find_targets(model, targets):
    found = {}
    for target in targets:
        hits = [name for name, _ in model.named_modules() if name and _matches(name, target)]
        if not hits:
            raise UserError(f"bottleneck target module '{target}' is not in this model; pass module names that "
                            f"exist, such as o_proj, down_proj or mlp")
        for name in hits:
            found[name] = target
    # deepest first, so a wrapped parent holds the already wrapped child
    return sorted(found, key=lambda n: n.count("."), reverse=True)


def _out_features(module):
    for attr in ("out_features", "nf"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    return None


def _dtype_device(module, model):
    """The dtype of the module's floating tensors (else the model's) and the device its tensors live on."""
    tensors = list(module.parameters()) + list(module.buffers())
    device = tensors[0].device if tensors else None
    floating = [t for t in tensors if t.is_floating_point()]
    dtype = floating[0].dtype if floating else getattr(model, "dtype", None)
    return (dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None), device


def adapter_modules(model):
    """{full name: wrapper} of every adapter wrapper inside model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _Wrapper)}


def bottleneck_state_dict(model):
    """Only the adapter tensors, keyed by their full parameter names."""
    state = {}
    for name, wrapper in adapter_modules(model).items():
        for key, tensor in wrapper.adapter.state_dict().items():
            state[f"{name}.adapter.{key}"] = tensor
    return state


# --------------------------------------------------------------------------------------------- public API

def add_bottleneck(model, config):
    """Freeze model, insert the adapters of `config` and make only them trainable; returns model.

    The model keeps its class (generate(), Trainer and gradient checkpointing work as before);
    `model.bottleneck_config` holds the resolved config.
    """
    if adapter_modules(model):
        raise UserError("this model already has bottleneck adapters; load the base model again before adding new ones")
    config = dataclasses.replace(config)  # the caller's object is left as it was
    if not config.target_modules:
        config.target_modules = default_targets(model, config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None

    for param in model.parameters():
        param.requires_grad_(False)

    sequential = config.style == "sequential"
    hidden = _hidden_size(model)
    for name in _find_targets(model, config.target_modules):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = parent.get_submodule(leaf)
        dtype, device = _dtype_device(module, model)
        if sequential:
            features = _out_features(module) or hidden
            in_features = out_features = features
        else:
            in_features = out_features = hidden
        if not in_features:
            raise UserError(f"cannot tell the hidden size of module '{name}'; target a Linear layer or a module "
                            f"of a model whose config has hidden_size")
        adapter = BottleneckAdapter(in_features, out_features, config, dtype=dtype, device=device)
        wrapper_cls = SequentialAdapterLayer if sequential else ParallelAdapterLayer
        setattr(parent, leaf, wrapper_cls(module, adapter))

    for wrapper in adapter_modules(model).values():
        for param in wrapper.adapter.parameters():
            param.requires_grad_(True)
    model.bottleneck_config = config
    return model


def save_bottleneck(model, directory):
    """Write adapter_config.json and adapter_model.safetensors (only the adapter tensors) to directory."""
    from safetensors.torch import save_file

    config = getattr(model, "bottleneck_config", None)
    if config is None or not adapter_modules(model):
        raise UserError("this model has no bottleneck adapters to save; call add_bottleneck first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {**config.to_dict(), "peft_type": config.adapter_type, "library": LIBRARY}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in bottleneck_state_dict(model).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt", "library": LIBRARY})
    return directory


def _read_config(directory):
    path = Path(directory) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_bottleneck_dir(directory):
    """True when directory holds a bottleneck adapter saved by save_bottleneck."""
    data = _read_config(directory)
    return isinstance(data, dict) and data.get("peft_type") in adapter_types()


def load_bottleneck(model, directory, is_trainable=False):
    """Rebuild the adapters saved in directory on model (its base) and load their tensors; eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    data = _read_config(directory)
    if not isinstance(data, dict) or data.get("peft_type") not in adapter_types():
        raise UserError(f"{directory} holds no bottleneck adapter (adapter_config.json with peft_type "
                        f"{', '.join(adapter_types())}); pass the output directory of a bottleneck training run")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{directory} has no {ADAPTER_WEIGHTS}; pass the output directory of a finished training run")
    model = add_bottleneck(model, BottleneckConfig.from_dict(data))
    saved = load_file(str(weights))
    expected = bottleneck_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(expected) & set(saved) if saved[k].shape != expected[k].shape)
    if missing or extra or wrong:
        what = (f"misses '{missing[0]}'" if missing else f"has the unexpected tensor '{extra[0]}'" if extra
                else f"has a wrong shape for '{wrong[0]}'")
        raise UserError(f"the adapter in {directory} does not match this base model ({ADAPTER_WEIGHTS} {what}); "
                        f"load it onto the base model it was trained on")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(saved[key])
    for wrapper in adapter_modules(model).values():
        for param in wrapper.adapter.parameters():
            param.requires_grad_(is_trainable)
    model.eval()
    return model
