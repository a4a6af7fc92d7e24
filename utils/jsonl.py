"""Append-only JSON-lines files that survive a kill: predictions, evaluation caches, self-instruct output.

A writer killed mid-line leaves a last line without its newline. `repair_tail` keeps that line when it is a
complete JSON value (the newline is added) and cuts it off when it is torn, so a resumed run neither loses a
finished row nor repeats one.
"""
import json
import threading
from pathlib import Path

from utils.errors import UserError


def repair_tail(path):
    """Make the file end with a newline after its last complete record; returns True if it changed it."""
    path = Path(path)
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        path.write_bytes(data[:cut])  # torn: the row is done again
        return True
    with path.open("ab") as f:  # complete but unterminated: keep it
        f.write(b"\n")
    return True


def read_records(path, strict=False):
    """Every JSON object of a JSON-lines file (after repair_tail); with strict, a bad line is a UserError."""
    path = Path(path)
    if not path.is_file():
        return []
    repair_tail(path)
    out = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
            except ValueError:  # UnicodeDecodeError is a ValueError too
                if strict:
                    raise UserError(f"{path} line {n} is not valid JSON; fix or remove that line, or write to a "
                                    "new file") from None
                continue
            if isinstance(rec, dict):
                out.append(rec)
            elif strict:
                raise UserError(f"{path} line {n} is not a JSON object; fix or remove that line")
    return out


class JsonlWriter:
    """Thread-safe appender: one record per line, flushed as it is written."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, rec):
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
