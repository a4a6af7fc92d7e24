"""The HF Trainer as we run it: atomic checkpoints, resume from the latest complete one, tokens/s.

- Checkpoints are written into `OUTPUT/.staging/checkpoint-N` and renamed to `OUTPUT/checkpoint-N` only when
  complete (rename is atomic on one filesystem), so a run killed mid-save never leaves a checkpoint that
  looks usable. Rotation (`--save_total_limit`) runs on the renamed ones. Under DeepSpeed and FSDP every rank
  writes its shards into the staging folder; rank 0 renames it once all of them are done (on a filesystem the
  nodes share). A staging folder left by a killed run is cleared before it is written again.
- Under --fsdp on CPU processes the Trainer gets the FSDP it was asked for (`utils.distributed.enable_fsdp_on_cpu`).
- `latest_checkpoint(OUTPUT)` is the newest complete checkpoint; anything else is reported and ignored.
- The progress bar shows useful (non-padding) tokens per second next to the step rate and ETA, and every
  logged loss carries `tokens_per_s`.
"""
import os
import re
import shutil
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from utils.distributed import enable_fsdp_on_cpu, quiet_deepspeed_on_cpu

quiet_deepspeed_on_cpu()  # before the Trainer imports DeepSpeed

STAGING = ".staging"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_FILE = "trainer_state.json"  # the Trainer writes it last


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class ToolkitTrainer(Trainer):
    """Trainer whose checkpoints appear all at once (staging dir, then rename) and whose logs carry tokens/s."""

    throughput = None  # a ThroughputCallback, set by utils.train

    def log(self, logs, *args, **kwargs):
        if self.throughput is not None and "loss" in logs:
            logs["tokens_per_s"] = round(self.throughput.rate(self.state), 1)
        return super().log(logs, *args, **kwargs)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)  # accelerate keeps --fsdp for accelerator devices; torch's FSDP2 runs over gloo too

    def _get_output_dir(self, trial=None):
        if getattr(self, "_staging", False):
            return os.path.join(self.args.output_dir, STAGING)
        return super()._get_output_dir(trial=trial)

    def _save_checkpoint(self, model, trial):
        stale = Path(self.args.output_dir) / STAGING / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and stale.exists():  # half-written by a killed run: start it afresh
            shutil.rmtree(stale)
        _barrier()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        _barrier()
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            src = Path(self.args.output_dir) / STAGING / name
            dst = Path(self.args.output_dir) / name
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(src, dst)
            rotate_checkpoints(output_dir=self.args.output_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        _barrier()


def latest_checkpoint(output_dir, say=print):
    """The newest complete checkpoint-N in output_dir (None if none); incomplete ones are reported."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))),
                   reverse=True)
    for step, path in found:
        if (path / COMPLETE_FILE).is_file():
            return str(path)
        say(f"ignoring {path}: it is incomplete (no {COMPLETE_FILE}), probably from a run killed while saving")
    return None


class ThroughputCallback(TrainerCallback):
    """Non-padding tokens per second, on the progress bar and in every log entry."""

    def __init__(self, handler=None):
        self.handler, self.start, self.tokens0 = handler, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.tokens0 = time.time(), state.num_input_tokens_seen

    def rate(self, state):
        elapsed = time.time() - (self.start or time.time())
        return (state.num_input_tokens_seen - self.tokens0) / elapsed if elapsed > 0 else 0.0

    def on_step_end(self, args, state, control, **kwargs):
        bar = next((getattr(cb, "training_bar", None) for cb in getattr(self.handler, "callbacks", [])
                    if getattr(cb, "training_bar", None) is not None), None)
        if bar is not None:
            bar.set_postfix(tok_s=f"{self.rate(state):.0f}", refresh=False)

