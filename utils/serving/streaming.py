"""The text of one answer as it grows token by token: stop strings, and the part that can be sent already.

The rules are those of utils/generation.py's streamed path (transformers' TextIteratorStreamer plus a hold-back
for stop strings), so that a batched answer streams exactly what a request served alone streams: the
concatenated pieces equal the final text.
"""


def stop_cut(text, stop):
    """Where the first stop string starts in text (None: none there)."""
    hits = [text.find(s) for s in (stop or []) if s and s in text]
    return min(hits) if hits else None


def _is_cjk(ch):
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def _settled(text):
    """How much of the decoded text later tokens can no longer change: all of it after a newline or a CJK
    character, else everything before the last space (a tokenizer's clean-up may still eat that space, and an
    unfinished word or UTF-8 sequence may still change)."""
    if not text:
        return 0
    if text.endswith("\n") or _is_cjk(text[-1]):
        return len(text)
    return max(text.rfind(" "), 0)


class TextStream:
    """Decode one answer's tokens as they come; push() says when a stop string appeared; emit(text) (optional)
    receives the settled text, and close() sends the rest."""

    def __init__(self, tokenizer, stop=None, emit=None):
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.tokens, self.text, self.sent = [], "", 0
        self.hold = max((len(s) for s in stop or []), default=1) - 1  # a stop string may still be forming
        self.stopped = False

    def _decode(self):
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token):
        """Add one generated token; True when a stop string has appeared (the text ends before it)."""
        self.tokens.append(token)
        if self.emit is None and not self.stop:
            return False  # nothing to look at before the end
        text = self._decode()
        cut = stop_cut(text, self.stop)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return True
        self.text = text
        if self.emit is not None:
            safe = min(_settled(text), len(text) - self.hold)
            if safe > self.sent:
                self.emit(text[self.sent:safe])
                self.sent = safe
        return False

    def close(self):
        """The answer is complete: its final text (cut at a stop string), the unsent rest handed to emit."""
        if not self.stopped:
            self.text = self._decode()
        if self.emit is not None and len(self.text) > self.sent:
            self.emit(self.text[self.sent:])
            self.sent = len(self.text)
        return self.text


class Stripped:
    """Forward streamed text without leading and trailing whitespace, so that the concatenated stream
    equals the stripped answer of a non-streamed request."""

    def __init__(self, emit):
        self.emit, self.started, self.pending = emit, False, ""

    def __call__(self, text):
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        if body:
            self.emit(body)
