"""Scoring: pure text -> answer functions, tested on hand-made cases (no model, no I/O)."""
import re

_FULLWIDTH = str.maketrans("ＡＢＣＤＥＦＧＨ（）：，．", "ABCDEFGH():,.")
_LETTER = r"[\(\[（【]?([A-H])[\)\]）】]?(?![A-Za-z])"
_SEP = r"\s*(?:,|，|、|;|；|/|&|和|与|及|以及|\band\b|\bor\b|\s)\s*"
_RUN = rf"{_LETTER}(?:{_SEP}{_LETTER})*"
_CUE = re.compile(r"(?:正确答案|答案|正确选项|选项|answers?)\s*(?:应该|应当|应)?\s*(?:is|are|:|：|是|为|选|选择)?"
                  r"\s*(?:选项|选择|选)?\s*[:：]?\s*", re.I)
_CHOOSE = re.compile(r"(?:选择|选)\s*")


def letter_set(text):
    """The letters of an answer field: "AC", "A,C", "A、C", "(B)" -> frozenset({"A", "C"}) / {"B"}."""
    return frozenset(re.findall(r"[A-H]", str(text or "").upper().translate(_FULLWIDTH)))


def mc_correct(pred, gold):
    """A multiple-choice answer is right only when its set of letters equals the gold set ("CA" == "AC";
    "A" != "AC")."""
    return bool(pred) and letter_set(pred) == letter_set(gold)


_GLUED = re.compile(r"\s*([A-H]{2,8})(?![A-Za-z])")
_RUN_AT = re.compile(r"\s*" + _RUN)


def _letters_at(text, pos, allowed):
    """Option letters right at text[pos:]: "AC", "A and C", "(B)", "A、C"; None when there are none."""
    m = _GLUED.match(text, pos)
    if m:
        letters = set(m.group(1))
    else:
        m = _RUN_AT.match(text, pos)
        if not m:
            return None
        letters = set(re.findall(r"[A-H]", m.group(0)))
    letters &= set(allowed)
    return letters or None


def extract_choice(text, allowed="ABCD"):
    """The option letter(s) a generated answer picks, sorted ("B", "AC"), or None when it names none.

    Cues first ("答案是 B", "The answer is (C)", "Answer: A and C", "选B"; the last cue wins), then a letter
    that opens the answer ("B.", "(C) ..."), then a single parenthesised letter, then a single stand-alone
    option letter ("A" followed by a lowercase word is read as the article, not an option).
    """
    if not text:
        return None
    t = str(text).translate(_FULLWIDTH)
    found = None
    for cue in (_CUE, _CHOOSE):
        for m in cue.finditer(t):
            got = _letters_at(t, m.end(), allowed)
            if got:
                found = got
        if found:
            return "".join(sorted(found))
    opens = re.match(r"\s*[\(\[（【]?[A-H](?:[\)\]）】.．、:：,，\s]|$|[A-H]*(?![A-Za-z]))", t)
    article = re.match(r"\s*A\s+(?!and\b|or\b)[a-z]", t)  # "A cat ..." is the article, not option A
    got = _letters_at(t, 0, allowed) if opens and not article else None
    if got:
        return "".join(sorted(got))
    paren = set(re.findall(r"[\(（]([A-H])[\)）]", t)) & set(allowed)
    if len(paren) == 1:
        return paren.pop()
    lone = r"(?<![A-Za-z'])([A-H])(?![A-Za-z'])(?!\s+(?!and\b|or\b)[a-z])"
    bare = {m.group(1) for m in re.finditer(lone, t)} & set(allowed)
    return bare.pop() if len(bare) == 1 else None


_FINAL = re.compile(
    r"####\s*(?P<a>[^\n]*\w[^\n]*)"
    r"|(?<![A-Za-z])answer\s*(?:[:：]|\s+(?:is|was|would\s+be|will\s+be)\b\s*[:：]?)\s*(?:[-*•]\s+)?(?P<b>[^\n]*\w[^\n]*)"
    r"|(?:最终答案|答案)\s*(?:是|为|[:：])\s*(?P<c>[^\n]+)", re.I)


def _trim_answer(s):
    s = s.strip()
    s = re.split(r"\.(?=\s|$)|。", s, maxsplit=1)[0]  # end at the sentence's end
    s = s.strip().strip("*_`\"'“”‘’").strip()
    s = re.sub(r"[\s.。,，;；!！]+$", "", s)
    return s or None


def extract_final_answer(text):
    """The final answer a chain of thought states, or None when it states none.

    Understands the CoT collection's endings ("Therefore, the final answer is X.", "So the answer is X.",
    "The final answer: (C).", "The answer: yes."), GSM8K's "#### 72", "Answer: X" and "答案是 X"; the last one wins.
    """
    if not text:
        return None
    last = None
    for m in _FINAL.finditer(str(text)):
        got = _trim_answer(m.group("a") or m.group("b") or m.group("c") or "")
        if got:
            last = got
    return last


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def parse_number(text):
    """The (last) number in a short answer, tolerant to $, commas, units, %: "$1,000.50" -> 1000.5,
    "72.0 clips" -> 72."""
    if text is None:
        return None
    s = re.sub(r"(?<=\d)[,，](?=\d{3}(?!\d))", "", str(text))
    s = s.replace("−", "-")
    nums = _NUMBER.findall(s)
    if not nums:
        return None
    last = nums[-1].replace(" ", "")
    try:
        if "/" in last:
            a, b = last.split("/")
            return float(a) / float(b) if float(b) else None
        return float(last)
    except ValueError:
        return None


def _norm_text(s):
    s = str(s).lower().translate(_FULLWIDTH)
    s = re.sub(r"[\"'“”‘’`*_()\[\]（）【】.,，。:：;；!！?？]", " ", s)
    return " ".join(s.split())


def _is_numeric_answer(ref):
    return bool(re.search(r"\d", ref)) and len(re.sub(r"[\d\s.,$%/+\-€£¥]", "", ref)) <= 12


def answers_match(pred, ref):
    """Does the extracted answer equal the reference? Numbers numerically, option letters by letter, text normalised."""
    if pred is None or ref is None:
        return False
    pred, ref = str(pred).strip(), str(ref).strip()
    letter = re.fullmatch(r"[\(（]?([A-H])[\)）]?\.?", ref)
    if letter:
        m = re.match(r"\s*(?:option\s+)?[\(（]?([A-H])[\)）]?(?![A-Za-z])", pred, re.I)
        return bool(m) and m.group(1).upper() == letter.group(1)
    if _is_numeric_answer(ref):
        a, b = parse_number(pred), parse_number(ref)
        return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))
    p, r = _norm_text(pred), _norm_text(ref)
    if p == r:
        return True
    if r in ("yes", "no"):  # "yes, because ..." / "no." answer a yes/no question
        return p.split()[:1] == [r]
    return False


_SCORE = re.compile(r"(?:得分|分数|评分|score)\s*(?:为|是)?\s*[:：]?\s*(-?\d+(?:\.\d+)?)"
                    r"(?:\s*/\s*(\d+(?:\.\d+)?))?", re.I)


def parse_judge_score(text):
    """The score in a Belle judge answer ("得分: 0.8", "得分：1分。...", "得分: 8/10"), on Belle's 0-1 scale.

    None when the answer has no score, or one outside 0-1 (the prompts ask for 0-1; a guess would bias the mean).
    """
    if not text:
        return None
    m = _SCORE.search(str(text))
    if not m:
        return None
    value = float(m.group(1))
    if m.group(2):
        den = float(m.group(2))
        value = value / den if den else -1
    return value if 0 <= value <= 1 else None
