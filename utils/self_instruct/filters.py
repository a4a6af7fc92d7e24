"""Alpaca's filters of generated instructions: length, blacklist, bad start, empty output, exact duplicate and
ROUGE-L similarity to every instruction kept so far (SimilarityIndex: exact, fast for tens of thousands)."""
import re
from array import array
from collections import Counter

from utils.formats import CJK

BLACKLIST = {
    # tasks a text model cannot do (Alpaca's list)
    "en": ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
           "plot", "go to", "video", "audio", "music", "flowchart", "diagram"],
    "zh": ["图片", "图像", "照片", "图表", "图形", "示意图", "流程图", "思维导图", "地图", "文件", "画出", "画一",
           "绘制", "视频", "音频", "音乐", "录音", "前往"],
}
BAD_STARTS = {
    "en": ["write a program", "as an ai", "i'm sorry", "i am sorry", "sorry", "i cannot", "i can't"],
    "zh": ["编写一个程序", "写一个程序", "编写程序", "写程序", "作为一个ai", "作为ai", "作为人工智能", "抱歉",
           "对不起", "我无法", "我不能"],
}
RULES = ("malformed", "truncated", "too_short", "too_long", "blacklist", "bad_start", "empty_output", "duplicate",
         "similar")


class CharTokenizer:
    """rouge-score tokenizer for Chinese: every CJK character is a token, latin words and numbers are tokens,
    punctuation and spaces are dropped."""

    _TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[a-z0-9]+")

    def tokenize(self, text):
        return self._TOKEN.findall(text.lower())


def rouge_tokenizer(lang):
    """The rouge-score tokenizer used for similarity: its default one for English, characters for Chinese."""
    from rouge_score import tokenizers

    if lang == "zh":
        return type("RougeCharTokenizer", (CharTokenizer, tokenizers.Tokenizer), {})()
    return tokenizers.DefaultTokenizer(use_stemmer=False)


def rouge_l(a, b, lang="en"):
    """ROUGE-L F1 of two texts with rouge-score's scorer (reference implementation for tests)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=rouge_tokenizer(lang)).score(a, b)["rougeL"].fmeasure


class SimilarityIndex:
    """ROUGE-L against every instruction added so far, exact but fast for tens of thousands of them.

    ROUGE-L F1 = 2 * LCS / (len_a + len_b), and the LCS is at most the multiset overlap of the two token
    lists. An inverted index (token -> instructions and counts) gives that overlap for all instructions at
    once (numpy); rouge-score's own `_score_lcs` then runs only on the few whose bound reaches the
    threshold, best bound first. Decisions are identical to scoring every pair.
    """

    def __init__(self, threshold, lang="en"):
        self.threshold = threshold
        self.tokenizer = rouge_tokenizer(lang)
        self.texts, self.tokens = [], []
        self.lengths = array("i")
        self.postings = {}  # token -> (array of instruction ids, array of counts)

    def __len__(self):
        return len(self.texts)

    def tokenize(self, text):
        return self.tokenizer.tokenize(text)

    def add(self, text, tokens=None):
        tokens = self.tokenize(text) if tokens is None else tokens
        idx = len(self.texts)
        self.texts.append(text)
        self.tokens.append(tokens)
        self.lengths.append(len(tokens))
        for tok, count in Counter(tokens).items():
            ids, counts = self.postings.setdefault(tok, (array("i"), array("i")))
            ids.append(idx)
            counts.append(count)

    def find_similar(self, text, tokens=None):
        """(score, text) of the most similar instruction scoring >= threshold, or None."""
        import numpy as np
        from rouge_score.rouge_scorer import _score_lcs

        tokens = self.tokenize(text) if tokens is None else tokens
        if not tokens or not self.texts:
            return None
        id_parts, weight_parts = [], []
        for tok, count in Counter(tokens).items():
            posting = self.postings.get(tok)
            if posting is not None:
                id_parts.append(np.frombuffer(posting[0], dtype=np.int32))
                weight_parts.append(np.minimum(np.frombuffer(posting[1], dtype=np.int32), count))
        if not id_parts:
            return None
        overlap = np.bincount(np.concatenate(id_parts), weights=np.concatenate(weight_parts),
                              minlength=len(self.texts))
        bound = 2.0 * overlap / (len(tokens) + np.frombuffer(self.lengths, dtype=np.int32))
        candidates = np.flatnonzero(bound >= self.threshold - 1e-9)
        best = None
        for i in candidates[np.argsort(-bound[candidates], kind="stable")]:
            if best is not None and bound[i] <= best[0]:
                break
            score = _score_lcs(self.tokens[i], tokens).fmeasure
            if score >= self.threshold and (best is None or score > best[0]):
                best = (score, self.texts[int(i)])
        return best


def _word_pattern(words):
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE) if words else None


class InstructionFilter:
    """Alpaca's filters, each a method that returns the reason to reject (or None); `check` runs them in the
    order of RULES and `add` registers a kept instruction (duplicate set and similarity index)."""

    def __init__(self, lang="en", similarity_threshold=0.7, min_words=3, max_words=150, blacklist_extra=()):
        self.lang = lang
        self.min_words, self.max_words = min_words, max_words
        words = BLACKLIST["en"] + (BLACKLIST["zh"] if lang == "zh" else []) + list(blacklist_extra or ())
        self.blacklist_words = [w for w in words if not CJK.search(w)]
        self.blacklist_chars = [w for w in words if CJK.search(w)]
        self._blacklist_re = _word_pattern(self.blacklist_words)
        self.bad_starts = BAD_STARTS["en"] + (BAD_STARTS["zh"] if lang == "zh" else [])
        self.index = SimilarityIndex(similarity_threshold, lang)
        self.seen = set()

    @staticmethod
    def key(instruction):
        return " ".join(instruction.lower().split())

    def count_words(self, text):
        return len(CharTokenizer().tokenize(text)) if self.lang == "zh" else len(text.split())

    def length(self, instruction):
        n = self.count_words(instruction)
        return "too_short" if n < self.min_words else "too_long" if n > self.max_words else None

    def blacklisted(self, instruction):
        """The blacklisted word the instruction contains, or None."""
        if self._blacklist_re is not None:
            m = self._blacklist_re.search(instruction)
            if m:
                return m.group(0)
        return next((w for w in self.blacklist_chars if w in instruction), None)

    def bad_start(self, instruction):
        first = instruction[:1]
        if not first.isalpha() or (self.lang == "en" and not first.isascii()):
            return True  # punctuation, a digit, a list marker or (English) a non-latin letter
        low = instruction.lower()
        return any(low.startswith(s) for s in self.bad_starts)

    def duplicate(self, instruction):
        return self.key(instruction) in self.seen

    def similar(self, instruction, tokens=None):
        return self.index.find_similar(instruction, tokens)

    def check(self, item):
        """(reason, detail) for a rejected item, (None, None) for a keeper."""
        instruction, output = item.get("instruction"), item.get("output")
        if not instruction or output is None:
            return "malformed", None
        reason = self.length(instruction)
        if reason:
            return reason, self.count_words(instruction)
        word = self.blacklisted(instruction)
        if word:
            return "blacklist", word
        if self.bad_start(instruction):
            return "bad_start", instruction[:20]
        if not output.strip():
            return "empty_output", None
        if self.duplicate(instruction):
            return "duplicate", None
        hit = self.similar(instruction)
        if hit:
            return "similar", {"rouge_l": round(hit[0], 4), "similar_to": hit[1]}
        return None, None

    def add(self, instruction):
        self.seen.add(self.key(instruction))
        self.index.add(instruction)
