"""One client of OpenAI-compatible APIs (/chat/completions, /completions), shared by the LLM judges of
evaluate.py and by self-instruct: thread-safe, retries with exponential backoff and jitter on the answers that
deserve one (timeouts, refused connections, HTTP 408/409/429/5xx, malformed bodies), one clear sentence for the
answers that do not (a wrong key, a wrong URL)."""
import json
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from utils.errors import UserError

RETRYABLE_HTTP = {408, 409, 429, 500, 502, 503, 504}


class RequestFailed(Exception):
    """A request that failed for good (after its retries, or a non-retryable answer such as HTTP 400)."""


def api_root(base_url):
    if not re.match(r"https?://", base_url or ""):
        raise UserError(f"--base_url '{base_url}' must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
    url = base_url.rstrip("/")
    if urllib.parse.urlparse(url).path in ("", "/"):
        url += "/v1"  # http://host:port -> the OpenAI root http://host:port/v1
    return url


class OpenAIClient:
    """Minimal thread-safe client of an OpenAI-compatible API (/chat/completions or /completions)."""

    def __init__(self, base_url, model, api_key=None, use_completions=False, timeout=120.0, max_retries=5,
                 retry_delay=1.0, sampling=None, stop=None):
        self.root = api_root(base_url)
        self.model, self.api_key, self.use_completions = model, api_key, use_completions
        self.timeout, self.max_retries, self.retry_delay = timeout, max_retries, retry_delay
        self.sampling, self.stop = dict(sampling or {}), stop
        self.lock = threading.Lock()
        self.requests = self.retries = 0

    def _post(self, path, payload):
        url = self.root + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps(payload).encode("utf-8")
        error = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self.lock:
                    self.retries += 1
                time.sleep(min(self.retry_delay * 2 ** (attempt - 1), 60.0) * random.uniform(1.0, 1.25))
            with self.lock:
                self.requests += 1
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                detail = " ".join(exc.read()[:300].decode("utf-8", "replace").split())
                if exc.code in (401, 403):
                    raise UserError(f"{url} refused the request (HTTP {exc.code}: {detail}); pass a valid --api_key "
                                    "or set OPENAI_API_KEY") from None
                if exc.code == 404:
                    raise UserError(f"{url} answered HTTP 404 ({detail}); check --base_url (the API root, usually "
                                    f"ending in /v1) and --model") from None
                error = f"HTTP {exc.code}: {detail}"
                if exc.code not in RETRYABLE_HTTP:
                    raise RequestFailed(error) from None
                continue
            except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, reset, timeout, bad HTTP
                error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
                continue
            try:
                data = json.loads(raw)
                if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
                    raise ValueError(f"no 'choices' in the answer: {raw[:200]!r}")
                return data
            except ValueError as exc:  # a proxy's error page, a half-written answer, ...
                error = str(exc)[:300]
        raise RequestFailed(error)

    def _payload(self):
        payload = {"model": self.model, **self.sampling}
        if self.stop:
            payload["stop"] = self.stop
        return payload

    def chat(self, messages, **sampling):
        """(text, finish_reason) of one chat completion; RequestFailed when it failed for good."""
        data = self._post("/chat/completions", dict(self._payload(), **sampling, messages=messages))
        choice = data["choices"][0]
        return (choice.get("message") or {}).get("content") or "", choice.get("finish_reason")

    def complete(self, prompts):
        """[(text, finish_reason) or RequestFailed] for each prompt."""
        if self.use_completions:
            try:
                prompt = prompts if len(prompts) > 1 else prompts[0]
                data = self._post("/completions", dict(self._payload(), prompt=prompt))
                choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
                if len(choices) != len(prompts):
                    raise RequestFailed(f"{len(choices)} choices for {len(prompts)} prompts; the endpoint may not take "
                                        "a list of prompts: use --request_batch_size 1")
                return [(c.get("text") or "", c.get("finish_reason")) for c in choices]
            except RequestFailed as exc:
                return [exc] * len(prompts)
        results = []
        for prompt in prompts:
            try:
                results.append(self.chat([{"role": "user", "content": prompt}]))
            except RequestFailed as exc:
                results.append(exc)
        return results
