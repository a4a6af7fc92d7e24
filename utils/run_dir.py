"""The run directory: what uniform_finetune.py writes to --output_dir, and the one place that reads it back.

    adapter_config.json, adapter_model.safetensors   the adapter (PEFT layout, for every method)
    tokenizer.json, tokenizer_config.json, ...        the tokenizer (pad-token fix and any added tokens included)
    template.json                                     the exact prompt template of training
    finetune_meta.json                                base model, model_type, peft_type, data, arguments, counts
    metrics.json, log_history.json, loss.png          final metrics, every logged value, the curves
    checkpoint-N/                                     complete Trainer checkpoints

Every reader checks what it reads and names the damaged file in one sentence, so a truncated or corrupt run
directory is an error a user can act on, never a traceback from deep inside a library.
"""
import json
import struct
import time
from pathlib import Path

from utils.errors import UserError

META_FILE = "finetune_meta.json"
TEMPLATE_FILE = "template.json"
METRICS_FILE = "metrics.json"
LOG_HISTORY_FILE = "log_history.json"
PLOT_FILE = "loss.png"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUNS_ROOT = "saved_models"  # where runs go by default: saved_models/<model_type>_<peft_type>


def _finish_hint(run_dir):
    return f"pass the --output_dir of a finished uniform_finetune.py run (or train again into {run_dir})"


def read_json(path, what="file"):
    """A JSON file of a run directory; a missing, empty or corrupt one is one sentence."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}; {_finish_hint(path.parent)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
        if not text.strip():
            raise ValueError("the file is empty")
        return json.loads(text)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is damaged ({reason}); restore the {what} or {_finish_hint(path.parent)}") from None


def read_meta(run_dir):
    """finetune_meta.json as a dict, with the keys every reader relies on checked."""
    meta = read_json(Path(run_dir) / META_FILE, "run metadata")
    missing = [k for k in ("base_model", "model_type", "peft_type") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{Path(run_dir) / META_FILE} lacks '{missing[0]}'; restore the file or "
                        f"{_finish_hint(run_dir)}")
    return meta


def read_template(run_dir):
    """The Template the run was trained with (template.json)."""
    from utils.templates import Template

    data = read_json(Path(run_dir) / TEMPLATE_FILE, "template")
    try:
        return Template(**data)
    except TypeError as exc:
        raise UserError(f"{Path(run_dir) / TEMPLATE_FILE} is not a template written by uniform_finetune.py "
                        f"({exc}); restore it or {_finish_hint(run_dir)}") from None


def read_adapter_config(run_dir):
    return read_json(Path(run_dir) / ADAPTER_CONFIG, "adapter config")


def check_safetensors(path):
    """A safetensors file whose header is intact and whose tensors all lie inside the file (not truncated)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}; {_finish_hint(path.parent)}")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"it holds {size} bytes but its tensors need {8 + n + end}: the file is truncated")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"{path} is damaged ({exc}); copy the adapter again or {_finish_hint(path.parent)}") from None


def check_adapter_dir(run_dir):
    """The adapter files of a run directory are present and intact; returns the adapter config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--lora_dir {run_dir} is not a directory; pass the --output_dir of a finished "
                        "uniform_finetune.py run")
    config = read_adapter_config(run_dir)
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise UserError(f"{run_dir / ADAPTER_CONFIG} names no peft_type; restore it or {_finish_hint(run_dir)}")
    check_safetensors(run_dir / ADAPTER_WEIGHTS)
    return config


def write_run(out_dir, meta, template, metrics, log_history):
    """Write template.json, finetune_meta.json, metrics.json and log_history.json (the adapter is saved first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / TEMPLATE_FILE).write_text(template.to_json(), encoding="utf-8")
    meta = dict(meta, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (out / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    (out / LOG_HISTORY_FILE).write_text(json.dumps(log_history, indent=1), encoding="utf-8")


def read_metrics(run_dir):
    return read_json(Path(run_dir) / METRICS_FILE, "metrics")


def default_run_dir(model_type, peft_type):
    return Path(RUNS_ROOT) / f"{model_type}_{peft_type}"


def find_run(model_type=None, data=None, root=RUNS_ROOT):
    """The newest finished run under `root` trained with this model type on this data (the seed's
    `generate.py --data D --model_type T`); None when there is none."""
    best = None
    root = Path(root)
    if not root.is_dir():
        return None
    for meta_path in root.glob(f"*/{META_FILE}"):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if model_type and meta.get("model_type") != model_type:
            continue
        if data and list(meta.get("data") or []) != list(data):
            continue
        if not (meta_path.parent / ADAPTER_CONFIG).is_file():
            continue
        when = meta_path.stat().st_mtime
        if best is None or when > best[0]:
            best = (when, meta_path.parent)
    return best[1] if best else None
