"""--task pairwise (two systems, an LLM judge, both orders) and --task mt_bench (single-answer grading of two turns):
verdict / rating parsing and the length-controlled win rate on hand-made cases, then the tasks end to end on the tiny
model against a stub judge (canned answers, every request recorded), our own server.py as the judge, and one small
real run of the embedded model."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import SHARED_DATA, run_script, start_server, stop_server
from utils.errors import UserError
from utils.evals.mt_bench import parse_rating
from utils.evals.pairwise import MIN_LC_PROMPTS, length_controlled, order_score, parse_verdict

BELLE = SHARED_DATA / "belle_eval"
MT_BENCH = SHARED_DATA / "mt_bench"


# ---- parsing and the length control ---------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Reply A answers the question. [[A]]", "A"), ("[[B]]", "B"), ("They are equal.\n[[C]]", "C"), ("[[tie]]", "C"),
    ("I choose [[ B ]]", "B"), ("First [[A]], on reflection [[B]]", "B"),
    ("[[A]] if reply A is better, [[B]] if B, [[C]] for a tie.\nVerdict: [[B]]", "B"),  # the instructions echoed
    ("[[A]] if A is better, [[B]] when B is, [[C]] when equal", None),
    ("The answer to the user's request is: [C]", "C"), ("The answer is: B", "B"), ("Final verdict: **A**", "A"),
    ("Winner: reply B.", "B"), ("Verdict: tie", "C"),
    ("the answer is a bit long", None), ("Assistant A is better", None), ("answer is Apple", None), ("", None),
    (None, None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_order_score_maps_positions_to_systems():
    assert [order_score(v, True) for v in ("A", "B", "C", None)] == [1.0, 0.0, 0.5, None]
    assert [order_score(v, False) for v in ("A", "B", "C", None)] == [0.0, 1.0, 0.5, None]  # B was shown first


def test_the_judge_reads_the_whole_conversation_and_the_matching_text():
    from utils.evals.pairwise import conversation_text, prompt_text

    one = [{"role": "user", "content": "Translate this.", "input": "你好"}]
    assert conversation_text(one) == "Translate this.\n\n你好" and prompt_text(one) == "Translate this. 你好"
    multi = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "  Name a  colour. "}]
    assert conversation_text(multi) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser:   Name a  colour. "
    assert prompt_text(multi) == "Name a colour."


def _rec(scores, d):
    return {"scores": scores, "tokens_a": 100 + d, "tokens_b": 100}


def test_length_controlled_win_rate():
    few = [_rec([1, 1], 5)] * (MIN_LC_PROMPTS - 1)
    assert length_controlled(few) == (None, None, None, f"needs at least {MIN_LC_PROMPTS} prompts judged in both "
                                                        f"orders (got {MIN_LC_PROMPTS - 1})")
    # A wins exactly when it is longer, in 30 of 40 prompts: raw win rate 0.75, all of it explained by length
    by_length = [_rec([1, 1], d) for d in range(1, 31)] + [_rec([0, 0], -d) for d in range(1, 11)]
    lc, coef, pos, note = length_controlled(by_length)
    assert note is None and lc == pytest.approx(0.5, abs=0.01) and coef > 5 and pos == pytest.approx(0, abs=1e-6)
    # A wins 80% whether longer or shorter: length explains nothing, the LC win rate stays the raw one
    good = [_rec([0, 0] if i % 5 == 0 else [1, 1], 50 if i < 30 else -50) for i in range(40)]
    lc, coef, _, _ = length_controlled(good)
    assert lc == pytest.approx(0.8, abs=0.01) and abs(coef) < 0.05
    # a judge that always prefers the first answer shown: position, not A, explains it
    lc, coef, pos, _ = length_controlled([_rec([1, 0], i - 12) for i in range(25)])
    assert lc == pytest.approx(0.5, abs=1e-6) and pos > 3
    lc, _, _, _ = length_controlled([_rec([1, 1], 5)] * 25)  # all wins: the prior keeps the fit finite
    assert 0.98 < lc < 1


@pytest.mark.parametrize("text, expected", [
    ("The answer is helpful. Rating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("for example: Rating: [[5]]. ... Rating: [[3]]", 3.0),
    ("Rating: 6", 6.0), ("Rating: [[11]]", None), ("[[0]]", None), ("no rating here", None), ("", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


# ---- a stub judge ------------------------------------------------------------------------------------------
class StubJudge:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1: reply(messages) -> text; every request is recorded."""

    def __init__(self, reply):
        self.calls, self.reply = [], reply
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.calls.append(body)
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                       "role": "assistant", "content": stub.reply(body["messages"])}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    judge = StubJudge(lambda messages: "[[C]]")
    yield judge
    judge.close()


def _replies(message):
    """(reply A, reply B) as the pairwise prompt shows them."""
    a = re.search(r"\[Reply A\]\n(.*)\n\[End of reply A\]", message, re.S).group(1)
    b = re.search(r"\[Reply B\]\n(.*)\n\[End of reply B\]", message, re.S).group(1)
    return a, b


def _request(message):
    return re.search(r"\[User request\]\n(.*)\n\[End of user request\]", message, re.S).group(1)


def _eval(*argv):
    from utils.eval_args import parse_eval_args
    from utils.evaluation import run_eval

    return run_eval(*parse_eval_args([str(a) for a in argv]), quiet=True)


def _no_model_load(monkeypatch):
    from utils.evals.common import ModelHandle

    monkeypatch.setattr(ModelHandle, "load", lambda self: pytest.fail("the model was loaded although all was cached"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Three short real Belle-eval rows (question, std_answer, class) and a reference file for them."""
    rows = [json.loads(l) for l in (BELLE / "eval_set_dev.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = sorted((r for r in rows if r["std_answer"]), key=lambda r: len(r["question"]))[:3]
    d = tmp_path_factory.mktemp("pairwise")
    data = d / "belle3.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ref = d / "reference.json"  # an AlpacaEval-style outputs file (a JSON list), prompts with extra whitespace
    ref.write_text(json.dumps([{"instruction": "  " + r["question"] + "\n", "output": f"REFERENCE answer {i}",
                                "generator": "ref"} for i, r in enumerate(rows)], ensure_ascii=False), encoding="utf-8")
    return {"data": data, "ref": ref, "rows": rows}


def _base_args(prompts, tiny_llama_dir, out, stub, *more):
    return ["--task", "pairwise", "--data", prompts["data"], "--max_new_tokens", 4, "--judge_base_url", stub.url,
            "--model_name_or_path", tiny_llama_dir, "--output_dir", out, *more]


def test_pairwise_asks_both_orders_and_cancels_position_bias(tiny_llama_dir, prompts, stub, tmp_path, monkeypatch):
    out = tmp_path / "out"
    stub.reply = lambda m: "B's reply is the reference. [[{}]]".format("A" if "REFERENCE" in _replies(m[-1]["content"])[0] else "B")
    args = _base_args(prompts, tiny_llama_dir, out, stub, "--judge_model", "fair", "--pairwise_reference", prompts["ref"])
    res = _eval(*args)
    assert len(stub.calls) == 6 and all(c["model"] == "fair" and c["temperature"] == 0 for c in stub.calls)
    answers = {r["prompt"]: r["output"] for f in (out / "cache").glob("pairwise-*.jsonl")
               for r in map(json.loads, f.read_text().splitlines())}
    for i, row in enumerate(prompts["rows"]):
        asked = [_replies(c["messages"][-1]["content"]) for c in stub.calls
                 if _request(c["messages"][-1]["content"]) == row["question"]]
        a, ref = answers[" ".join(row["question"].split())], f"REFERENCE answer {i}"
        assert sorted(asked) == sorted([(a, ref), (ref, a)])  # the same two answers, once in each order
    m = res["metrics"]
    assert (m["n"], m["judged"], m["wins"], m["ties"], m["losses"]) == (3, 3, 0, 0, 3)
    assert m["win_rate"] == 0 and m["consistency"] == 1 and m["first_position_rate"] == 0.5
    assert m["avg_chars_b"] == pytest.approx(sum(len(f"REFERENCE answer {i}") for i in range(3)) / 3)
    assert m["avg_tokens_a"] <= 4 and m["lc_win_rate"] is None and str(MIN_LC_PROMPTS) in res["lc_note"]
    assert "| wins / ties / losses | 0 / 0 / 3 |" in res["table"]
    # a judge that always picks the answer shown first: every prompt is a tie, and the bias is visible
    stub.reply = lambda m: "[[A]]"
    biased = _eval(*args[:-4], "--judge_model", "biased", "--pairwise_reference", prompts["ref"])["metrics"]
    assert len(stub.calls) == 12 and (biased["wins"], biased["ties"], biased["losses"]) == (0, 3, 0)
    assert biased["win_rate"] == 0.5 and biased["consistency"] == 0 and biased["first_position_rate"] == 1
    # the rerun asks no judge and loads no model: answers and verdicts come from the caches
    _no_model_load(monkeypatch)
    assert _eval(*args)["metrics"] == m and len(stub.calls) == 12


def test_pairwise_against_the_data_answers_leaves_out_prompts_without_a_verdict(tiny_llama_dir, prompts, stub, tmp_path):
    rows = prompts["rows"]
    data = tmp_path / "with_empty.jsonl"  # Belle-eval has rows with an empty std_answer: skipped, counted
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + [
        {"question": "列出一些有趣的职业", "std_answer": "", "class": "brainstorming"}]), encoding="utf-8")
    first = rows[0]["question"]
    stub.reply = lambda m: "I cannot tell." if _request(m[-1]["content"]) == first and \
        _replies(m[-1]["content"])[0] == rows[0]["std_answer"] else "[[B]]"
    res = _eval(*_base_args(prompts, tiny_llama_dir, tmp_path, stub, "--judge_model", "stub", "--data", data))
    m = res["metrics"]
    assert res["system_b"] == "the answers in --data" and len(stub.calls) == 6
    assert (m["n"], m["skipped_no_answer"], m["judged"], m["no_verdict"]) == (3, 1, 2, 1)
    assert m["consistency"] == 0 and m["win_rate"] == 0.5 and m["first_position_rate"] == 0
    assert m["avg_chars_b"] == pytest.approx(sum(len(r["std_answer"]) for r in rows) / 3)


def test_pairwise_adapter_against_its_base_and_another_adapter(tiny_llama_dir, tiny_lora_run, prompts, stub, tmp_path):
    res = _eval("--task", "pairwise", "--data", prompts["data"], "--max_new_tokens", 4, "--judge_base_url", stub.url,
                "--judge_model", "stub", "--lora_dir", tiny_lora_run, "--pairwise_base", "--output_dir", tmp_path)
    assert res["system_b"].startswith("the base model (") and res["metrics"]["judged"] == 3
    assert len(list((tmp_path / "cache").glob("pairwise-*.jsonl"))) == 2  # one answer cache per system
    assert len(stub.calls) == 6 - 2 * res["metrics"]["identical"]  # identical answers are a tie without a judge
    assert res["metrics"]["win_rate"] == 0.5  # the stub says [[C]]
    res = _eval("--task", "pairwise", "--data", prompts["data"], "--max_new_tokens", 4, "--model_name_or_path",
                tiny_llama_dir, "--pairwise_lora_dir", tiny_lora_run, "--output_dir", tmp_path)  # no judge: answers only
    assert res["metrics"]["win_rate"] is None and res["table"].startswith("answers generated; no judge given")
    assert res["system_b"] == f"adapter {tiny_lora_run} ({tiny_lora_run})" and res["metrics"]["avg_tokens_b"] <= 4


@pytest.mark.parametrize("extra, message", [
    (["--judge_base_url", "http://127.0.0.1:9/v1"], "--judge_base_url needs --judge_model"),
    (["--pairwise_reference", "REF", "--pairwise_base"], "--pairwise_reference and --pairwise_base both name system B"),
    (["--pairwise_base"], "--pairwise_base compares an adapter with its base model; pass --lora_dir"),
    (["--pairwise_reference", "MISSING"], "does not exist; pass a JSONL / JSON file of {instruction, output} rows"),
    (["--pairwise_reference", "PARTIAL"], "has no output for 1 of the 3 prompts (the first: '"),
    (["--pairwise_reference", "BADROW"], "line 1 needs a prompt ('instruction', 'prompt' or 'question') and an output"),
    (["--pairwise_reference", "TWICE"], "appears twice with different outputs; keep one output per prompt"),
    (["--pairwise_lora_dir", "NOTARUN"], "has no adapter_config.json; pass the --output_dir of a finished"),
    (["--data", MT_BENCH / "question.jsonl", "--limit", 2], "have no answers to compare with; --task pairwise needs "
                                                            "system B: rows with answers, --pairwise_reference FILE"),
])
def test_pairwise_bad_inputs_are_one_sentence(tiny_llama_dir, prompts, tmp_path, extra, message, monkeypatch):
    rows = prompts["rows"]
    files = {"REF": prompts["ref"], "MISSING": tmp_path / "nope.jsonl", "PARTIAL": tmp_path / "partial.jsonl",
             "BADROW": tmp_path / "bad.jsonl", "TWICE": tmp_path / "twice.jsonl", "NOTARUN": tmp_path}
    files["PARTIAL"].write_text("".join(json.dumps({"prompt": r["question"], "response": "x"}, ensure_ascii=False) + "\n"
                                        for r in rows[:2]), encoding="utf-8")
    files["BADROW"].write_text('{"instruction": "q"}\n', encoding="utf-8")
    files["TWICE"].write_text("".join(json.dumps({"instruction": "q", "output": o}) + "\n" for o in "xy"), encoding="utf-8")
    extra = [files.get(str(e), e) if isinstance(e, str) else e for e in extra]
    _no_model_load(monkeypatch)  # every one of these fails before any model loads
    with pytest.raises(UserError, match=re.escape(message)):
        _eval("--task", "pairwise", "--data", prompts["data"], "--model_name_or_path", tiny_llama_dir,
              "--output_dir", tmp_path / "out", *extra)


def test_pairwise_bad_input_through_the_script(prompts, tmp_path):
    res = run_script("evaluate.py", "--task", "pairwise", "--data", prompts["data"], "--pairwise_reference",
                     tmp_path / "nope.json", "--output_dir", tmp_path, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"error: --pairwise_reference {tmp_path / 'nope.json'} does not exist")


def test_pairwise_with_our_server_as_judge(tiny_llama_dir, prompts, tmp_path, monkeypatch):
    pytest.importorskip("uvicorn")
    from utils.args import GenerationArguments, ModelArguments, ServeArguments
    from utils.evals.judge import Judge
    from utils.server import create_app

    app = create_app(ServeArguments(served_name="judge"), ModelArguments(model_name_or_path=str(tiny_llama_dir)),
                     GenerationArguments(max_new_tokens=8), log=lambda m: None)
    server, thread, base = start_server(app)
    try:
        args = ["--task", "pairwise", "--data", prompts["data"], "--pairwise_reference", prompts["ref"],
                "--judge_base_url", f"{base}/v1", "--judge_model", "judge", "--judge_max_tokens", 8,
                "--max_new_tokens", 4, "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path]
        m = _eval(*args)["metrics"]
        judged = [json.loads(l) for l in (tmp_path / "cache" / "judge.jsonl").read_text().splitlines()]
        assert len(judged) == 6 and all(isinstance(j["response"], str) and j["judge_model"] == "judge" for j in judged)
        assert m["n"] == 3 and m["judged"] + m["no_verdict"] == 3  # a random tiny judge rarely gives a verdict
        _no_model_load(monkeypatch)
        monkeypatch.setattr(Judge, "__call__", lambda self, content: pytest.fail("the judge was asked again"))
        assert _eval(*args)["metrics"] == m
    finally:
        stop_server(server, thread)


def test_pairwise_embedded_model_small_real_run(embedded_dir, prompts, stub, tmp_path):
    stub.reply = lambda m: "The longer one. [[{}]]".format("A" if len(_replies(m[-1]["content"])[0]) >
                                                           len(_replies(m[-1]["content"])[1]) else "B")
    res = _eval("--task", "pairwise", "--data", prompts["data"], "--pairwise_reference", prompts["ref"],
                "--max_new_tokens", 8, "--judge_base_url", stub.url, "--judge_model", "longer",
                "--model_name_or_path", embedded_dir, "--output_dir", tmp_path)
    m = res["metrics"]
    lens = [(len(s["a"]), len(s["b"])) for s in res["samples"]]
    assert all(a > 0 for a, _ in lens) and 0 < m["avg_tokens_a"] <= 8 and m["judged"] == 3
    assert m["wins"] == sum(a > b for a, b in lens) and m["losses"] == sum(a < b for a, b in lens)
    assert m["consistency"] == 1 and len(stub.calls) == 6


# ---- MT-bench ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mt_questions(tmp_path_factory):
    """Two real MT-bench questions: a writing one (general prompts) and a math one with references."""
    qs = [json.loads(l) for l in (MT_BENCH / "question.jsonl").read_text(encoding="utf-8").splitlines()]
    pick = [next(q for q in qs if q["category"] == "writing"), next(q for q in qs if q["question_id"] == 116)]
    path = tmp_path_factory.mktemp("mt_bench") / "two.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in pick), encoding="utf-8")
    return path, pick


def test_mt_bench_two_turns_graded_with_the_data_prompts(tiny_llama_dir, mt_questions, stub, tmp_path, monkeypatch):
    import utils.generation

    path, pick = mt_questions
    prompts = {json.loads(l)["name"]: json.loads(l) for l in (MT_BENCH / "judge_prompts.jsonl").read_text().splitlines()}
    stub.reply = lambda m: "Good. Rating: [[4]]" if "### User:" in m[-1]["content"] else "Rating: [[7]]"
    seen, real = [], utils.generation.generate_batch

    def recording(model, tokenizer, ids, kwargs, strip=True):
        seen.extend(tokenizer.decode(p) for p in ids)
        return real(model, tokenizer, ids, kwargs, strip)

    monkeypatch.setattr(utils.generation, "generate_batch", recording)
    args = ["--task", "mt_bench", "--data", path, "--mt_bench_judge_prompts", MT_BENCH / "judge_prompts.jsonl",
            "--judge_base_url", stub.url, "--judge_model", "stub", "--max_new_tokens", 4,
            "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path]
    res = _eval(*args)
    m = res["metrics"]
    assert (m["n"], m["judged"], m["scored"], m["turn_1"], m["turn_2"], m["score"]) == (2, 4, 4, 7.0, 4.0, 5.5)
    assert res["categories"] == {c: {"questions": 1, "turn_1": 7.0, "turn_2": 4.0, "score": 5.5} for c in ("writing", "math")}
    assert m["reference_guided"] == 2 and len(stub.calls) == 4
    systems = sorted(c["messages"][0]["content"] for c in stub.calls)
    want = sorted(prompts[n]["system_prompt"] for n in ("single-v1", "single-math-v1", "single-v1-multi-turn",
                                                        "single-math-v1-multi-turn"))
    assert systems == want and all(c["messages"][0]["role"] == "system" for c in stub.calls)
    math_turn2 = next(c["messages"][1]["content"] for c in stub.calls if pick[1]["turns"][1] in c["messages"][1]["content"])
    assert "### Reference answer:\n" + pick[1]["reference"][1] in math_turn2
    # the second turn was generated with the first turn and the model's own first answer in the history
    answers = {(r["question_id"], r["turn"]): r["answer"] for f in (tmp_path / "cache").glob("mt_bench-*.jsonl")
               for r in map(json.loads, f.read_text().splitlines())}
    turn2 = [p for p in seen if pick[1]["turns"][1] in p]
    assert len(seen) == 4 and len(turn2) == 1 and pick[1]["turns"][0] in turn2[0] and answers[("116", 1)] in turn2[0]
    _no_model_load(monkeypatch)
    assert _eval(*args)["metrics"] == m and len(stub.calls) == 4


def test_mt_bench_bad_inputs(tiny_llama_dir, mt_questions, tmp_path):
    path, _ = mt_questions
    base = ["--task", "mt_bench", "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path]
    with pytest.raises(UserError, match="--task mt_bench needs --data"):
        _eval(*base)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": "one string"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="needs 'turns', a list of one or two strings"):
        _eval(*base, "--data", bad)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"name": "single-v1", "prompt_template": "{question} {answer}"}) + "\n")
    with pytest.raises(UserError, match="lacks the judge prompt 'single-math-v1'"):
        _eval(*base, "--data", path, "--mt_bench_judge_prompts", prompts, "--judge_base_url", "http://127.0.0.1:9/v1",
              "--judge_model", "m")
    with pytest.raises(UserError, match=re.escape(f"MT-bench judge prompts {path.parent / 'judge_prompts.jsonl'} do not exist")):
        _eval(*base, "--data", path, "--judge_base_url", "http://127.0.0.1:9/v1", "--judge_model", "m")
