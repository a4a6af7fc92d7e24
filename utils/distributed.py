"""DeepSpeed ZeRO and FSDP: combinations refused up front, FSDP on CPU processes, sharded weights gathered for saving.

- `check_distributed(...)` refuses what cannot work with one sentence each, before the model is loaded.
- `enable_fsdp_on_cpu(trainer)`: accelerate applies `--fsdp` only on accelerator devices and silently runs plain
  DDP on CPU; torch's FSDP2 (`fully_shard`) works over gloo, so CPU processes get it too (ToolkitTrainer calls it).
- `shut_down()`: the end of a distributed run (uniform_finetune.py calls it after training).
- `full_weights(model)`: under ZeRO-3 and FSDP each process holds only a shard of every weight; inside this
  context every process holds the full trained tensors, so rank 0 saves complete ones. Every rank must enter it.
"""
import contextlib
import json
from pathlib import Path

from utils.errors import UserError


def quiet_deepspeed_on_cpu():
    """Name the CPU to DeepSpeed up front (as DS_ACCELERATOR), so that importing it does not warn on every rank
    that no GPU was found; transformers imports it whenever it is installed. An explicit DS_ACCELERATOR wins."""
    import os

    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def shut_down():
    """After a distributed run: every rank leaves together and the process group is destroyed, so that gloo's
    threads are joined before the interpreter exits. Left to exit with them running, a rank that had finished and
    saved was seen to abort ('terminate called without an active exception', SIGABRT), failing the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def zero_config(path):
    """The DeepSpeed config file as a dict (None without --deepspeed); unreadable JSON is a UserError."""
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--deepspeed {path} is not a readable JSON file ({exc}); pass a config such as "
                        "configs/ds_zero2.json") from None


def fsdp_settings(path):
    """The --fsdp_config file as a dict ({} without one), keys without their optional `fsdp_` prefix."""
    if not path:
        return {}
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--fsdp_config {path} is not a readable JSON file ({exc}); pass a config such as "
                        "configs/fsdp.json") from None
    return {(k[5:] if k.startswith("fsdp_") else k): v for k, v in cfg.items()}


def zero_stage(cfg):
    return int((cfg or {}).get("zero_optimization", {}).get("stage", 0) or 0)


# Upstream PEFT methods that cannot train sharded, by builder (the reason lies in the upstream class), measured
# with peft 0.21 / deepspeed 0.19 / torch 2.13 on 2 gloo processes.
_NOT_UNDER = {
    "peft.AdaLoraConfig": {
        "deepspeed": "its rank allocator reads each weight's full gradient after the optimizer step, when "
                     "DeepSpeed has already reduced and freed it",
        "fsdp": "its orthogonality loss multiplies whole LoRA matrices after the forward pass, when FSDP holds "
                "only shards of them",
    },
}
_PROMPT_LEARNING_BUILDERS = ("peft.PrefixTuningConfig", "peft.PromptEncoderConfig", "peft.PromptTuningConfig")
_PROMPT_WHY = {
    "zero3": "PEFT computes the virtual-token embeddings to save with a forward pass on rank 0 alone, which "
             "ZeRO-3 turns into an all-gather the other ranks never join (the run hangs at its first checkpoint)",
    "fsdp": "PEFT computes the virtual-token embeddings to save with a forward pass over FSDP's sharded weights, "
            "which fails at the first checkpoint",
}


def _launched():
    """True under torchrun / the deepspeed launcher (they set RANK and LOCAL_RANK for every process)."""
    import os

    return "RANK" in os.environ and "LOCAL_RANK" in os.environ


def check_distributed(model_args, peft_args, train_args, quant_bits):
    """Impossible DeepSpeed / FSDP combinations, refused with one sentence each before the model is loaded."""
    import os

    from utils.peft_methods import load_preset

    fsdp = bool(train_args.fsdp or train_args.fsdp_config)
    ds = bool(train_args.deepspeed)
    if not (fsdp or ds):
        return
    if fsdp and ds:
        raise UserError("--deepspeed and --fsdp both shard the model and exclude each other; pick one "
                        "(e.g. --deepspeed configs/ds_zero3.json, or --fsdp --fsdp_config configs/fsdp.json)")
    engine = "--deepspeed" if ds else "--fsdp"
    if not _launched():
        raise UserError(f"{engine} needs a distributed launcher; run `torchrun --nproc_per_node N "
                        "uniform_finetune.py ...` (N >= 1), or drop the flag")
    import torch

    if fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2 and not torch.cuda.is_available():
        raise UserError("--fsdp on CPU needs at least two processes to shard across; launch with "
                        "`torchrun --nproc_per_node 2 ...` or drop --fsdp")
    cfg = zero_config(train_args.deepspeed)
    stage = zero_stage(cfg)
    if quant_bits == 8 and fsdp:
        raise UserError("--fsdp cannot wrap an 8-bit base (bitsandbytes' Int8Params cannot become FSDP "
                        "parameters); use --load_in_4bit, or --deepspeed configs/ds_zero3.json with the 8-bit base")
    preset = load_preset(peft_args.peft_type)
    builder = preset.get("builder")
    method = f"--peft_type {peft_args.peft_type}"
    why = _NOT_UNDER.get(builder, {}).get("deepspeed" if ds else "fsdp")
    if why:
        raise UserError(f"{method} cannot train under {engine}: {why}; drop {engine} (plain DDP) or pick another "
                        "method")
    if fsdp and builder == "peft.VeraConfig" and fsdp_settings(train_args.fsdp_config).get("cpu_ram_efficient_loading"):
        raise UserError(f"{method} cannot train under --fsdp with cpu_ram_efficient_loading: accelerate then "
                        "reloads every tensor as a shard, and VeRA's shared projections are plain buffers; set "
                        "\"cpu_ram_efficient_loading\": false in the --fsdp_config file (configs/fsdp.json has it)")
    prompt_learning = preset.get("prompt_learning", builder in _PROMPT_LEARNING_BUILDERS)
    if prompt_learning and (stage == 3 or fsdp):
        where = "ZeRO-3" if stage == 3 else "--fsdp"
        raise UserError(f"{method} cannot train under {where}: {_PROMPT_WHY['zero3' if stage == 3 else 'fsdp']}; "
                        "use --deepspeed configs/ds_zero2.json (or plain DDP)")


def enable_fsdp_on_cpu(trainer):
    """Give CPU processes the FSDP the Trainer was asked for (accelerate keeps FSDP for accelerator devices).

    Returns True when it switched FSDP on. Called right after the Trainer built its Accelerator, before anything
    is prepared; mirrors what accelerate's state does on a GPU (the plugin, its mixed precision).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if trainer.args.fsdp_plugin_args is None or getattr(state, "fsdp_plugin", None) is not None:
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    return True


@contextlib.contextmanager
def _full_fsdp_params(model):
    """FSDP2: each trained DTensor shard swapped for its full tensor (restored on exit; the shards stay the truth)."""
    import torch
    from torch.distributed.tensor import DTensor

    full, swapped = {}, []
    for module in model.modules():  # the same order on every rank: the all-gathers line up
        for name, param in list(module._parameters.items()):
            if param is None or not param.requires_grad or not isinstance(param, DTensor):
                continue
            if id(param) not in full:  # a tied weight is gathered once and stays one tensor
                full[id(param)] = torch.nn.Parameter(param.full_tensor().detach(), requires_grad=True)
            module._parameters[name] = full[id(param)]
            swapped.append((module, name, param))
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


@contextlib.contextmanager
def full_weights(model):
    """Inside: every trained weight of `model` is a full tensor on every process (ZeRO-3 / FSDP shards gathered).

    Outside ZeRO-3 and FSDP it does nothing. Every rank must enter it (the gathering is collective); typically
    only rank 0 then writes files. Only trained weights are gathered: they are what an adapter file holds.
    """
    zero3 = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield model
    else:
        with _full_fsdp_params(model):
            yield model
