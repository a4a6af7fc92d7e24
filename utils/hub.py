"""Whether the Hugging Face Hub can be reached from this machine, asked once per process.

Without a network huggingface_hub retries every request five times with back-off (about 25 s) before it fails;
the scripts ask here first, and where the hub cannot be reached they look in the local hub cache only, so a missing
dataset or model is one sentence at once instead of half a minute of retry warnings.
"""
import functools
import os
import socket
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT = 5  # seconds for one TCP connect to the hub; a hang guard, not a speed target


def offline_requested():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint():
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    return url.hostname, url.port or (80 if url.scheme == "http" else 443)


def reachable():
    """False when HF_HUB_OFFLINE is set or the hub's host (HF_ENDPOINT) does not resolve or accept a connection."""
    if offline_requested():
        return False
    host, port = _endpoint()
    return bool(host) and _connects(host, port)


@functools.lru_cache(maxsize=None)
def _connects(host, port):
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def why_unreachable():
    """The reason reachable() gave False, for the one-sentence errors."""
    if offline_requested():
        return "HF_HUB_OFFLINE is set"
    return f"{_endpoint()[0]} cannot be reached from here"


def cache_only(path):
    """from_pretrained's local_files_only for `path`: a hub id (not a local path) while the hub cannot be reached."""
    from pathlib import Path

    return not Path(str(path)).exists() and not reachable()
