"""Generator for the project's own small sample instruction dataset.

The rows are step-by-step arithmetic problems written from templates in this
file (nothing is copied from an existing dataset).  Each row uses the unified
Alpaca format ``{"instruction": str, "input": str, "output": str}``; ``input``
is usually empty but sometimes holds the numbers (``"Add the two numbers."`` /
``"37 and 48"``) or the word problem itself.

About half of the rows are English and half simplified Chinese.  The kinds are:

* ``add``        two-digit addition (mostly with carrying), explained digit by
                 digit, via tens and ones, or by splitting the second number;
* ``sub``        two-digit subtraction (mostly with borrowing);
* ``mul``        a two-digit number times a one-digit number;
* ``change``     two-step shopping problem: price x quantity, then change;
* ``total``      two-step shopping problem: two purchases, then their sum.

Every output is a short chain of thought (2-4 short steps, one per line) that
ends with a fixed final-answer line: ``The answer is N.`` in English and
``答案是 N。`` in Chinese; :func:`final_answer` parses it back.  Rows are kept
short (English: at most 60 words; Chinese: at most 120 characters over
instruction + input + output) so that a small model can be trained on them on
CPU with a cutoff length of 256 tokens.

The generator is deterministic for a given seed (it only uses its own
``random.Random(seed)``).  Regenerate the committed file with::

    python -m utils.sample_data --n 400 --seed 0 --out data/arith_sample.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

MAX_EN_WORDS = 60
MAX_ZH_CHARS = 120

EN_NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Leo", "Emma", "Jack", "Nora"]
ZH_NAMES = ["小明", "小红", "小华", "小丽", "小刚", "小芳", "小军", "妈妈", "爸爸", "王老师"]

# Countable things for addition / subtraction stories: (English plural),
# (Chinese measure word, noun).
EN_COUNT_ITEMS = ["apples", "marbles", "stickers", "stamps", "pencils", "cards"]
ZH_COUNT_ITEMS = [("个", "苹果"), ("颗", "弹珠"), ("张", "贴纸"), ("枚", "邮票"),
                  ("支", "铅笔"), ("张", "卡片")]

# Things to buy: (English singular, English plural), (measure word, noun).
EN_SHOP_ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("ticket", "tickets"),
                 ("cake", "cakes"), ("toy car", "toy cars"), ("ball", "balls")]
ZH_SHOP_ITEMS = [("本", "笔记本"), ("支", "钢笔"), ("张", "门票"), ("块", "蛋糕"),
                 ("辆", "玩具车"), ("个", "皮球")]

# Generic instructions used when the word problem itself goes into ``input``.
EN_SOLVE = ["Solve the word problem step by step.",
            "Solve this problem and show your work.",
            "Answer the question below. Think step by step."]
ZH_SOLVE = ["请一步一步解答下面的应用题。",
            "解答这道题，写出计算过程。",
            "请分步计算并回答下面的问题。"]

_ANSWER_RE = re.compile(r"^(?:The answer is (-?\d+)\.|答案是 (-?\d+)。)$")


def final_answer(output: str) -> int | None:
    """Return the integer on the final-answer line of ``output`` (or None).

    Accepts ``The answer is N.`` and ``答案是 N。`` as the last non-empty line.
    """
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return None
    m = _ANSWER_RE.match(lines[-1])
    if not m:
        return None
    return int(m.group(1) if m.group(1) is not None else m.group(2))


def _finish(steps: list[str], answer: int, lang: str) -> str:
    last = f"The answer is {answer}." if lang == "en" else f"答案是 {answer}。"
    return "\n".join(steps + [last])


def _word_or_bare(rng: random.Random, lang: str, word: list[str],
                  bare: list[tuple[str, str]], fields: dict) -> tuple[str, str]:
    """Pick a word-problem template (sometimes moved into ``input``) or a bare one."""
    if rng.random() < 0.6:
        text = rng.choice(word).format(**fields)
        if rng.random() < 0.25:
            return rng.choice(EN_SOLVE if lang == "en" else ZH_SOLVE), text
        return text, ""
    instruction, inp = rng.choice(bare)
    return instruction.format(**fields), inp.format(**fields)


# --------------------------------------------------------------------------
# addition


def _two_digit(rng: random.Random, lo: int = 11, hi: int = 89) -> int:
    """A two-digit number whose ones digit is not 0."""
    while True:
        x = rng.randint(lo, hi)
        if x % 10:
            return x


def _addition(rng: random.Random, lang: str) -> tuple[str, str, str, int]:
    carry = rng.random() < 0.7
    while True:
        a, b = _two_digit(rng), _two_digit(rng)
        if (a % 10 + b % 10 >= 10) == carry:
            break
    s = a + b
    a1, a0 = divmod(a, 10)
    b1, b0 = divmod(b, 10)
    o = a0 + b0
    en = lang == "en"
    style = rng.choice(["digits", "tens", "split"])
    if style == "digits":
        t = a1 + b1 + (1 if carry else 0)
        if carry:
            steps = ([f"Ones: {a0} + {b0} = {o}, write {o - 10}, carry 1.",
                      f"Tens: {a1} + {b1} + 1 = {t}."] if en else
                     [f"个位：{a0} + {b0} = {o}，写 {o - 10} 进 1。",
                      f"十位：{a1} + {b1} + 1 = {t}。"])
        else:
            steps = ([f"Ones: {a0} + {b0} = {o}.", f"Tens: {a1} + {b1} = {t}."] if en else
                     [f"个位：{a0} + {b0} = {o}。", f"十位：{a1} + {b1} = {t}。"])
        if t >= 10:
            steps.append(f"{t} tens and {s % 10} ones make {s}." if en else
                         f"{t} 个十加 {s % 10} 个一是 {s}。")
    elif style == "tens":
        T = (a1 + b1) * 10
        steps = ([f"Tens: {a1 * 10} + {b1 * 10} = {T}.", f"Ones: {a0} + {b0} = {o}.",
                  f"Together: {T} + {o} = {s}."] if en else
                 [f"整十相加：{a1 * 10} + {b1 * 10} = {T}。", f"个位相加：{a0} + {b0} = {o}。",
                  f"合起来：{T} + {o} = {s}。"])
    else:
        m = a + b1 * 10
        steps = ([f"Split {b} into {b1 * 10} and {b0}.", f"{a} + {b1 * 10} = {m}.",
                  f"{m} + {b0} = {s}."] if en else
                 [f"把 {b} 拆成 {b1 * 10} 和 {b0}。", f"{a} + {b1 * 10} = {m}。",
                  f"{m} + {b0} = {s}。"])

    if en:
        fields = dict(a=a, b=b, name=rng.choice(EN_NAMES), item=rng.choice(EN_COUNT_ITEMS))
        word = ["{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
                "One box holds {a} {item} and another holds {b}. How many {item} are there in total?",
                "A library had {a} books and received {b} new ones. How many books does it have now?",
                "{a} boys and {b} girls went on the school trip. How many children went in all?"]
        bare = [("What is {a} + {b}?", ""), ("Add the two numbers.", "{a} and {b}"),
                ("Compute the sum step by step.", "{a} + {b}"),
                ("Find the sum of {a} and {b}.", "")]
    else:
        unit, noun = rng.choice(ZH_COUNT_ITEMS)
        fields = dict(a=a, b=b, name=rng.choice(ZH_NAMES), m=unit, item=noun)
        word = ["{name}有 {a} {m}{item}，又买了 {b} {m}，现在一共有多少{m}？",
                "甲盒里有 {a} {m}{item}，乙盒里有 {b} {m}，两盒一共有多少{m}？",
                "图书馆原有 {a} 本书，又新到了 {b} 本，现在一共有多少本书？",
                "参加春游的男生有 {a} 人，女生有 {b} 人，一共有多少人？"]
        bare = [("计算 {a} + {b} 等于多少？", ""), ("把下面两个数相加。", "{a} 和 {b}"),
                ("请一步一步计算下面的加法。", "{a} + {b}"), ("求 {a} 与 {b} 的和。", "")]
    instruction, inp = _word_or_bare(rng, lang, word, bare, fields)
    return instruction, inp, _finish(steps, s, lang), s


# --------------------------------------------------------------------------
# subtraction


def _subtraction(rng: random.Random, lang: str) -> tuple[str, str, str, int]:
    borrow = rng.random() < 0.7
    while True:
        a, b = rng.randint(30, 99), _two_digit(rng, 11, 98)
        if b < a and (a % 10 < b % 10) == borrow:
            break
    d = a - b
    a1, a0 = divmod(a, 10)
    b1, b0 = divmod(b, 10)
    en = lang == "en"
    if rng.random() < 0.5:
        m = a - b1 * 10
        steps = ([f"Subtract the tens: {a} - {b1 * 10} = {m}.",
                  f"Subtract the ones: {m} - {b0} = {d}."] if en else
                 [f"先减整十：{a} - {b1 * 10} = {m}。", f"再减个位：{m} - {b0} = {d}。"])
    elif borrow:
        steps = ([f"Ones: {a0} is less than {b0}, so borrow 1 ten: {a0 + 10} - {b0} = {a0 + 10 - b0}.",
                  f"Tens: {a1} - 1 - {b1} = {a1 - 1 - b1}."] if en else
                 [f"个位 {a0} 不够减 {b0}，向十位借 1：{a0 + 10} - {b0} = {a0 + 10 - b0}。",
                  f"十位：{a1} - 1 - {b1} = {a1 - 1 - b1}。"])
    else:
        steps = ([f"Ones: {a0} - {b0} = {a0 - b0}.", f"Tens: {a1} - {b1} = {a1 - b1}."] if en else
                 [f"个位：{a0} - {b0} = {a0 - b0}。", f"十位：{a1} - {b1} = {a1 - b1}。"])

    if en:
        fields = dict(a=a, b=b, name=rng.choice(EN_NAMES), item=rng.choice(EN_COUNT_ITEMS))
        word = ["{name} had {a} {item} and gave {b} to a friend. How many {item} are left?",
                "A bus had {a} passengers. Then {b} got off. How many passengers are still on the bus?",
                "A shop had {a} {item} and sold {b} of them. How many {item} does it have left?",
                "How much greater is {a} than {b}?"]
        bare = [("What is {a} - {b}?", ""),
                ("Subtract the second number from the first.", "{a} and {b}"),
                ("Compute the difference step by step.", "{a} - {b}")]
    else:
        unit, noun = rng.choice(ZH_COUNT_ITEMS)
        fields = dict(a=a, b=b, name=rng.choice(ZH_NAMES), m=unit, item=noun)
        word = ["{name}有 {a} {m}{item}，送给同学 {b} {m}，还剩多少{m}？",
                "公交车上有 {a} 名乘客，到站后下车了 {b} 名，车上还有多少名乘客？",
                "商店里有 {a} {m}{item}，卖出了 {b} {m}，还剩多少{m}？",
                "{a} 比 {b} 多多少？"]
        bare = [("计算 {a} - {b} 等于多少？", ""), ("用第一个数减去第二个数。", "{a} 和 {b}"),
                ("请一步一步计算下面的减法。", "{a} - {b}")]
    instruction, inp = _word_or_bare(rng, lang, word, bare, fields)
    return instruction, inp, _finish(steps, d, lang), d


# --------------------------------------------------------------------------
# multiplication (two-digit x one-digit)


def _multiplication(rng: random.Random, lang: str) -> tuple[str, str, str, int]:
    a, b = _two_digit(rng, 12, 99), rng.randint(2, 9)
    p = a * b
    a1, a0 = divmod(a, 10)
    en = lang == "en"
    if rng.random() < 0.5:
        x, y = a1 * 10 * b, a0 * b
        steps = ([f"Split {a} into {a1 * 10} and {a0}.",
                  f"{a1 * 10} × {b} = {x}, {a0} × {b} = {y}.", f"{x} + {y} = {p}."] if en else
                 [f"把 {a} 拆成 {a1 * 10} 和 {a0}。",
                  f"{a1 * 10} × {b} = {x}，{a0} × {b} = {y}。", f"{x} + {y} = {p}。"])
    else:
        o = a0 * b
        c = o // 10
        t = a1 * b + c
        if c:
            steps = ([f"Ones: {a0} × {b} = {o}, write {o % 10}, carry {c}.",
                      f"Tens: {a1} × {b} + {c} = {t}."] if en else
                     [f"个位：{a0} × {b} = {o}，写 {o % 10} 进 {c}。",
                      f"十位：{a1} × {b} + {c} = {t}。"])
        else:
            steps = ([f"Ones: {a0} × {b} = {o}.", f"Tens: {a1} × {b} = {t}."] if en else
                     [f"个位：{a0} × {b} = {o}。", f"十位：{a1} × {b} = {t}。"])
        if t >= 10:
            steps.append(f"{t} tens and {p % 10} ones make {p}." if en else
                         f"{t} 个十加 {p % 10} 个一是 {p}。")

    if en:
        fields = dict(a=a, b=b, name=rng.choice(EN_NAMES))
        word = ["Each box holds {a} pencils. How many pencils are in {b} boxes?",
                "A ticket costs {a} dollars. How much do {b} tickets cost?",
                "{name} reads {a} pages every day. How many pages does {name} read in {b} days?",
                "A school buys {b} crates of milk with {a} bottles in each. How many bottles is that?"]
        bare = [("What is {a} × {b}?", ""), ("Multiply the two numbers.", "{a} and {b}"),
                ("Compute the product step by step.", "{a} × {b}")]
    else:
        fields = dict(a=a, b=b, name=rng.choice(ZH_NAMES))
        word = ["每盒有 {a} 支铅笔，{b} 盒一共有多少支？",
                "一张门票 {a} 元，买 {b} 张需要多少元？",
                "{name}每天看 {a} 页书，{b} 天一共看多少页？",
                "学校买了 {b} 箱牛奶，每箱 {a} 瓶，一共有多少瓶？"]
        bare = [("计算 {a} × {b} 等于多少？", ""), ("求两个数的积。", "{a} 和 {b}"),
                ("请一步一步计算下面的乘法。", "{a} × {b}")]
    instruction, inp = _word_or_bare(rng, lang, word, bare, fields)
    return instruction, inp, _finish(steps, p, lang), p


# --------------------------------------------------------------------------
# two-step shopping problems


def _change(rng: random.Random, lang: str) -> tuple[str, str, str, int]:
    while True:
        price, qty = rng.randint(2, 19), rng.randint(2, 9)
        cost = price * qty
        if cost < 100:
            break
    bill = rng.choice([x for x in (10, 20, 50, 100) if x > cost][:2])
    change = bill - cost
    en = lang == "en"
    left = rng.random() < 0.3  # "money left" instead of "change" phrasing
    if en:
        sing, plural = rng.choice(EN_SHOP_ITEMS)
        f = dict(p=price, q=qty, B=bill, name=rng.choice(EN_NAMES), sing=sing, item=plural)
        if left:
            text = "{name} has {B} dollars and buys {q} {item} at {p} dollars each. How much money is left?"
        else:
            text = rng.choice([
                "{name} buys {q} {item} at {p} dollars each and pays with a {B}-dollar bill. "
                "How much change does {name} get?",
                "One {sing} costs {p} dollars. {name} buys {q} and pays {B} dollars. "
                "How much change is given back?"])
        if rng.random() < 0.5:
            steps = [f"Cost: {qty} × {price} = {cost} dollars.",
                     f"{'Left' if left else 'Change'}: {bill} - {cost} = {change} dollars."]
        else:
            steps = [f"First the total cost: {qty} × {price} = {cost}.",
                     f"Then subtract it from {bill}: {bill} - {cost} = {change}."]
    else:
        unit, noun = rng.choice(ZH_SHOP_ITEMS)
        f = dict(p=price, q=qty, B=bill, name=rng.choice(ZH_NAMES), m=unit, item=noun)
        if left:
            text = "{name}带了 {B} 元，买了 {q} {m}{item}，每{m} {p} 元，还剩多少元？"
        else:
            text = rng.choice(["{name}买了 {q} {m}{item}，每{m} {p} 元，付了 {B} 元，应找回多少元？",
                               "一{m}{item} {p} 元，{name}买了 {q} {m}，给了售货员 {B} 元，应找回多少元？"])
        steps = [f"先算总价：{qty} × {price} = {cost} 元。",
                 f"再算{'剩下的钱' if left else '找零'}：{bill} - {cost} = {change} 元。"]
    text = text.format(**f)
    if rng.random() < 0.25:
        instruction, inp = rng.choice(EN_SOLVE if en else ZH_SOLVE), text
    else:
        instruction, inp = text, ""
    return instruction, inp, _finish(steps, change, lang), change


def _total(rng: random.Random, lang: str) -> tuple[str, str, str, int]:
    q1, p1 = rng.randint(2, 6), rng.randint(2, 15)
    q2, p2 = rng.randint(2, 6), rng.randint(2, 15)
    x, y = q1 * p1, q2 * p2
    total = x + y
    en = lang == "en"
    i1, i2 = rng.sample(range(len(EN_SHOP_ITEMS)), 2)
    if en:
        (_, n1), (_, n2) = EN_SHOP_ITEMS[i1], EN_SHOP_ITEMS[i2]
        name = rng.choice(EN_NAMES)
        text = (f"{name} buys {q1} {n1} at {p1} dollars each and {q2} {n2} at {p2} dollars each. "
                f"How much does {name} spend in total?")
        steps = [f"{n1.capitalize()}: {q1} × {p1} = {x} dollars.",
                 f"{n2.capitalize()}: {q2} × {p2} = {y} dollars.",
                 f"Total: {x} + {y} = {total} dollars."]
    else:
        (m1, n1), (m2, n2) = ZH_SHOP_ITEMS[i1], ZH_SHOP_ITEMS[i2]
        name = rng.choice(ZH_NAMES)
        text = (f"{name}买了 {q1} {m1}{n1}，每{m1} {p1} 元，又买了 {q2} {m2}{n2}，"
                f"每{m2} {p2} 元，一共花了多少元？")
        steps = [f"{n1}：{q1} × {p1} = {x} 元。", f"{n2}：{q2} × {p2} = {y} 元。",
                 f"一共：{x} + {y} = {total} 元。"]
    if rng.random() < 0.25:
        instruction, inp = rng.choice(EN_SOLVE if en else ZH_SOLVE), text
    else:
        instruction, inp = text, ""
    return instruction, inp, _finish(steps, total, lang), total


_KINDS = {
    "add": (_addition, 0.30),
    "sub": (_subtraction, 0.25),
    "mul": (_multiplication, 0.20),
    "change": (_change, 0.15),
    "total": (_total, 0.10),
}


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _fits(instruction: str, inp: str, output: str) -> bool:
    """Length guard: <= MAX_ZH_CHARS characters (Chinese) or <= MAX_EN_WORDS words."""
    text = instruction + inp + output
    if _is_chinese(text):
        return len(text) <= MAX_ZH_CHARS
    return len(" ".join((instruction, inp, output)).split()) <= MAX_EN_WORDS


def make_samples(n: int = 400, seed: int = 0, with_answers: bool = False) -> list[dict]:
    """Return ``n`` deterministic arithmetic rows in Alpaca format.

    Exactly half of the rows (rounded) are English and the rest Chinese, in a
    seeded random order.  No two rows share the same instruction and input,
    and a row over the length limits (``MAX_EN_WORDS``, ``MAX_ZH_CHARS``) is
    redrawn.
    With ``with_answers=True`` each row additionally carries ``kind`` and
    ``answer`` keys (handy for tests; they are never written to the file).
    """
    rng = random.Random(seed)
    langs = ["en"] * (n // 2) + ["zh"] * (n - n // 2)
    rng.shuffle(langs)
    names = list(_KINDS)
    weights = [_KINDS[k][1] for k in names]
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for lang in langs:
        while True:
            kind = rng.choices(names, weights)[0]
            instruction, inp, output, answer = _KINDS[kind][0](rng, lang)
            if (instruction, inp) not in seen and _fits(instruction, inp, output):
                seen.add((instruction, inp))
                break
        row = {"instruction": instruction, "input": inp, "output": output}
        if with_answers:
            row["kind"] = kind
            row["answer"] = answer
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the sample arithmetic instruction dataset.")
    parser.add_argument("--n", type=int, default=400, help="number of rows (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default="data/arith_sample.json", help="output JSON path")
    args = parser.parse_args(argv)
    rows = make_samples(args.n, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
