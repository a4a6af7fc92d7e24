"""Self-instruct (utils/self_instruct/): parsing, every filter, the generation loop against a stub
OpenAI-compatible endpoint on 127.0.0.1 (retries, truncation, resume), the CLI, and the README table."""
import json
import random
import re
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_DATA, start_server, stop_server
from utils.errors import UserError
from utils import self_instruct as si

SEEDS = SHARED_DATA / "self_instruct" / "seed_tasks.jsonl"
ZH_SEEDS = SHARED_DATA / "self_instruct" / "zh_seed_tasks.json"


# ---- parsing --------------------------------------------------------------------------------------

COMPLETION = """ Give three tips for staying healthy.
4. Input:
<noinput>
4. Output:
1. Eat vegetables.
2. Sleep eight hours.
###
5. Instruction:   Translate the sentence
 into French.
5. Input:
I like cheese.
5. Output:
J'aime le fromage.
###
6. Instruction: Summarize the paragraph in one sentence.
6. Input:
The city council met on Monday and voted to expand the bike lanes downtown.
6. Output:
The council voted to add bike lanes."""


def test_parse_well_formed_completion():
    items = si.parse_response(COMPLETION, finish_reason="stop")
    assert items == [
        {"instruction": "Give three tips for staying healthy.", "input": "",
         "output": "1. Eat vegetables.\n2. Sleep eight hours."},
        {"instruction": "Translate the sentence into French.", "input": "I like cheese.",
         "output": "J'aime le fromage."},
        {"instruction": "Summarize the paragraph in one sentence.",
         "input": "The city council met on Monday and voted to expand the bike lanes downtown.",
         "output": "The council voted to add bike lanes."}]


def test_parse_chat_noise_markdown_and_chinese_labels():
    text = ("Sure! Here are more tasks:\n\n**4. Instruction:** Name a primary color.\n**4. Input:** <No Input>\n"
            "**4. Output:** Red.\n\n---\n\n5) instruction : Convert 5 km to miles.\n5) input: <noinput>\n"
            "5) output:\nAbout 3.1 miles.\n###\n6. 指令：写一句关于春天的诗\n6. 输入：\n<noinput>\n6. 输出：\n春风又绿江南岸\n###")
    assert si.parse_items(text) == [
        {"instruction": "Name a primary color.", "input": "", "output": "Red."},
        {"instruction": "Convert 5 km to miles.", "input": "", "output": "About 3.1 miles."},
        {"instruction": "写一句关于春天的诗", "input": "", "output": "春风又绿江南岸"}]


def test_parse_truncated_last_item_is_dropped():
    cut = COMPLETION + ("\n###\n7. Instruction: Explain why the sky is blue.\n7. Input:\n<noinput>\n"
                        "7. Output:\nSunlight is sca")
    assert len(si.parse_response(cut, finish_reason="stop")) == 4
    items = si.parse_response(cut, finish_reason="length")
    assert [i["instruction"] for i in items] == ["Give three tips for staying healthy.",
                                                   "Translate the sentence into French.",
                                                   "Summarize the paragraph in one sentence."]


def test_parse_garbage_yields_nothing():
    for text in ["", "   ", "I'm sorry, I can't help with that.", "lorem ipsum dolor\n\n12345 ###", None]:
        assert si.parse_items(text) == []
    # a label without an instruction, or an instruction without an output, is malformed
    broken = si.parse_items("4. Output:\nRed.\n###\n5. Instruction: Name a fruit that is yellow.\n5. Input:\n<noinput>")
    filt = si.InstructionFilter()
    assert [filt.check(i)[0] for i in broken] == ["malformed", "malformed"]


# ---- filters --------------------------------------------------------------------------------------

def test_similarity_filter_matches_rouge_score():
    filt = si.InstructionFilter(similarity_threshold=0.7)
    filt.add("What is the relation between the given pairs?")
    reason, detail = filt.check({"instruction": "What is the relation between the two given pairs?", "output": "x"})
    assert reason == "similar" and detail["similar_to"] == "What is the relation between the given pairs?"
    expected = si.rouge_l("What is the relation between the given pairs?",
                          "What is the relation between the two given pairs?")
    assert detail["rouge_l"] == round(expected, 4) and expected >= 0.7
    keeper = {"instruction": "Suggest a name for a bakery that sells vegan bread.", "output": "x"}
    assert filt.check(keeper) == (None, None)
    # the threshold is inclusive and configurable: 8 of 9 and 8 tokens -> 16/17 = 0.941
    assert si.InstructionFilter(similarity_threshold=0.95).check(
        {"instruction": "What is the relation between the two given pairs?", "output": "x"})[0] is None


def test_similarity_index_equals_brute_force():
    rng = random.Random(0)
    vocab = "the a of to write list explain give name short story poem about given text sentence word".split()
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    index = si.SimilarityIndex(0.7)
    for t in texts[:200]:
        index.add(t)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    hits = 0
    for q in texts[200:]:
        best = max(scorer.score(t, q)["rougeL"].fmeasure for t in texts[:200])
        got = index.find_similar(q)
        assert (got is not None) == (best >= 0.7), q
        if got:
            hits += 1
            assert got[0] == pytest.approx(best)
    assert 0 < hits < 100  # both outcomes exercised


def test_similarity_chinese_is_character_level():
    a, b = "给出下面词语的同义词", "请给出下面这个词语的同义词"
    assert si.rouge_l(a, b, "en") == 0  # rouge-score's default tokenizer drops every Chinese character
    assert si.rouge_l(a, b, "zh") >= 0.7
    filt = si.InstructionFilter(lang="zh")
    filt.add(a)
    assert filt.check({"instruction": b, "output": "x"})[0] == "similar"
    assert filt.check({"instruction": "把下面的句子翻译成英文", "output": "x"}) == (None, None)


def test_blacklist_filter():
    filt = si.InstructionFilter()
    for text, word in [("Draw a cat in the style of Picasso.", "Draw"),
                       ("Describe the IMAGES below in detail.", "IMAGES"),
                       ("Go to the website and book a ticket.", "Go to"), ("Compose music for a short film.", "music"),
                       ("Make a flowchart of the hiring process.", "flowchart")]:
        assert filt.blacklisted(text) == word
        assert filt.check({"instruction": text, "output": "x"})[0] == "blacklist"
    for text in ["Update the user profile description below.", "Explain the mapping between keys and values.",
                 "Write a short story about a dragon."]:
        assert filt.blacklisted(text) is None  # whole words only: profile, mapping
    zh = si.InstructionFilter(lang="zh")
    assert zh.blacklisted("描述这张图片里的内容") == "图片" and zh.blacklisted("请为我画出一棵树") == "画出"
    assert zh.blacklisted("给出下面词语的同义词") is None
    extra = si.InstructionFilter(blacklist_extra=["weather"])
    assert extra.check({"instruction": "What will the weather be tomorrow?", "output": "x"})[0] == "blacklist"


def test_length_filter():
    filt = si.InstructionFilter(min_words=3, max_words=150)
    assert filt.check({"instruction": "Name it.", "output": "x"})[0] == "too_short"
    assert filt.check({"instruction": "Name three fruits.", "output": "x"})[0] is None
    assert filt.check({"instruction": "Explain " + "very " * 150 + "clearly.", "output": "x"})[0] == "too_long"
    zh = si.InstructionFilter(lang="zh")
    assert zh.count_words("写诗。") == 2 and zh.check({"instruction": "写诗。", "output": "x"})[0] == "too_short"


def test_bad_start_filter():
    filt = si.InstructionFilter()
    for text in ["- List three uses of vinegar in cooking.", "\"Carpe diem\" means what exactly?",
                 "3 ways to save money on groceries.", "Écrivez une phrase sur la mer.",
                 "Write a program that sorts a list of numbers.", "I'm sorry, but I cannot create more tasks."]:
        assert filt.check({"instruction": text, "output": "x"})[0] == "bad_start", text
    assert filt.check({"instruction": "Write a poem that sorts socks by color.", "output": "x"})[0] is None
    zh = si.InstructionFilter(lang="zh")
    assert zh.check({"instruction": "抱歉，我不能生成更多任务", "output": "x"})[0] == "bad_start"
    assert zh.check({"instruction": "“春眠不觉晓”的下一句是什么？", "output": "x"})[0] == "bad_start"
    assert zh.check({"instruction": "写一首关于秋天的短诗", "output": "x"})[0] is None


def test_duplicate_and_empty_output_filters():
    filt = si.InstructionFilter(similarity_threshold=1.0)
    filt.add("Name three fruits that are red.")
    assert filt.check({"instruction": "name three  fruits that are RED.", "output": "x"})[0] == "duplicate"
    assert filt.check({"instruction": "Name three fruits that are blue.", "output": "  "})[0] == "empty_output"
    item = si.parse_items("1. Instruction: Name a blue fruit today.\n1. Input:\n\n1. Output:\n<nooutput>")[0]
    assert item["output"] == "" and filt.check(item)[0] == "empty_output"


def test_seeds_prompt_and_language():
    en, zh = si.load_seed_tasks(SEEDS), si.load_seed_tasks(ZH_SEEDS)
    assert len(en) == 175 and len(zh) == 175 and set(en[0]) == {"instruction", "input", "output"}
    assert si.detect_lang(s["instruction"] for s in en) == "en" and si.detect_lang(s["instruction"] for s in zh) == "zh"
    prompt = si.encode_prompt(si.HEADERS["en"], en[:2], 20)
    assert "Come up with 20 new" in prompt and "List of 20 tasks:" in prompt
    assert "###\n1. Instruction: Is there anything I can eat" in prompt
    assert "1. Input:\n<noinput>\n1. Output:\nYes," in prompt
    assert "2. Input:\nNight : Day :: Right : Left\n" in prompt and prompt.endswith("###\n3. Instruction:")
    assert "{num_tasks}" not in si.encode_prompt(si.HEADERS["zh"], zh[:1], 10)


# ---- a stub OpenAI-compatible endpoint ------------------------------------------------------------

GOOD = ["Suggest a name for a bakery that sells vegan bread.",
        "Explain the difference between weather and climate to a child.",
        "Convert the temperature from Celsius to Fahrenheit.",
        "Classify the sentiment of the movie review as positive or negative.",
        "Rewrite the sentence in the passive voice.",
        "List four renewable energy sources and one advantage of each.",
        "How many minutes are there in a week?",
        "Summarize the plot of Romeo and Juliet in two sentences.",
        "Give advice to someone preparing for their first marathon.",
        "Extract all email addresses from the text.",
        "Why do leaves change color in autumn?",
        "Correct the grammar mistakes in this paragraph.",
        "Propose three questions for interviewing a software engineer.",
        "Find the odd one out among these animals.",
        "Describe how compound interest works with an example.",
        "Brainstorm slogans for a neighborhood recycling campaign."]
REJECTS = [("Draw a picture of a cat sleeping on a windowsill.", "blacklist"),
           ("What is the relation between the two given pairs?", "similar"),   # seed_task_1, reworded
           ("Name it.", "too_short"),
           ("Write a program that prints the prime numbers below 100.", "bad_start")]


class _Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.calls, self.next_good, self.fail_first, self.prompts, self.bodies = 0, 0, 0, [], []
        self.status = None  # a fixed HTTP status to answer with

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def completion_text(self, prompt, chat):
        """Two fresh good tasks, the four rejects, and every third answer cut off inside a seventh item."""
        start = int(re.findall(r"(\d+)\. Instruction:", prompt)[-1])
        with self.lock:
            call = self.calls
            self.calls += 1
            good = [GOOD[(self.next_good + i) % len(GOOD)] for i in range(2)]
            self.next_good += 2
        tasks = [(good[0], "")] + [(t, "") for t, _ in REJECTS[:2]] + [(good[1], "Some input text.")] + \
                [(t, "") for t, _ in REJECTS[2:]]
        parts = []
        for n, (instruction, input_text) in enumerate(tasks, start):
            bold = "**" if chat and n % 2 else ""
            parts.append(f"{bold}{n}. Instruction:{bold} {instruction}\n{n}. Input:\n{input_text or '<noinput>'}\n"
                         f"{n}. Output:\nAn answer to task {n}.\n")
        text = "###\n".join(parts)
        if not chat:  # a completion continues after the prompt's final "N. Instruction:"
            text = text.split("Instruction:", 1)[1]
        truncated = call % 3 == 2
        if truncated:
            n = start + 6
            text += f"###\n{n}. Instruction: Tell me a joke about penguins.\n{n}. Input:\n<noinput>\n{n}. Output:\nWhy did"
        return text, "length" if truncated else "stop"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        srv = self.server
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.bodies.append(dict(req, path=self.path, auth=self.headers.get("Authorization")))
            if srv.status:
                return self._send(srv.status, {"error": {"message": "stub says no"}})
            if srv.fail_first > 0:
                srv.fail_first -= 1
                return self._send(503, {"error": {"message": "overloaded"}})
        if self.path == "/v1/chat/completions":
            prompt = req["messages"][-1]["content"]
            with srv.lock:
                srv.prompts.append(prompt)
            text, finish = srv.completion_text(prompt, chat=True)
            return self._send(200, {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]})
        if self.path == "/v1/completions":
            prompts = req["prompt"] if isinstance(req["prompt"], list) else [req["prompt"]]
            choices = []
            for i, prompt in enumerate(prompts):
                with srv.lock:
                    srv.prompts.append(prompt)
                text, finish = srv.completion_text(prompt, chat=False)
                choices.append({"index": i, "text": text, "finish_reason": finish})
            return self._send(200, {"object": "text_completion", "choices": choices[::-1]})  # any order
        return self._send(404, {"error": {"message": f"no route {self.path}"}})


@pytest.fixture
def stub():
    srv = _Stub()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _args(stub, out, **kw):
    base = si.SelfInstructArguments(seed_tasks=str(SEEDS), output=str(out), base_url=stub.url, model="stub",
                                    api_key="k-123", num_instructions=5, concurrency=2, retry_delay=0.01,
                                    request_timeout=300)  # a hang guard, never a speed check
    return replace(base, **kw)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _adds_up(stats):
    return stats["items"] == stats["kept"] + sum(stats["rejected"].values()) + stats["surplus"]


def test_loop_against_stub_filters_retries_and_resumes(stub, tmp_path):
    out = tmp_path / "gen" / "si.jsonl"
    stub.fail_first = 1  # the first request gets HTTP 503 and is retried
    logs = []
    stats = si.run_self_instruct(_args(stub, out, save_rejected=True), log=logs.append)
    rows = _rows(out)
    assert len(rows) == 5 and stats["kept"] == 5 and stats["kept_this_run"] == 5
    assert all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert {r["instruction"] for r in rows} <= set(GOOD) and len({r["instruction"] for r in rows}) == 5
    assert any(r["input"] == "" for r in rows) and any(r["input"] == "Some input text." for r in rows)
    assert stats["retries"] >= 1 and stats["failed_prompts"] == 0 and stats["responses"] >= 3
    for _, rule in REJECTS:
        assert stats["rejected"][rule] >= 2, rule  # every answer has one; later ones may be surplus
    assert stats["rejected"]["truncated"] >= 1 and stats["truncated_responses"] >= 1
    assert _adds_up(stats)
    assert json.loads(si.stats_path(out).read_text()) == stats and stats["lang"] == "en"
    assert "kept 5/5 instructions" in "\n".join(logs) and "rejected" in "\n".join(logs)
    rejected = _rows(si.rejected_path(out))
    assert {r["reason"] for r in rejected} >= {"blacklist", "similar", "too_short", "bad_start", "truncated"}
    # what went over the wire: chat completions, our header, Alpaca's layout, the key, the sampling flags
    body = stub.bodies[-1]
    assert body["path"] == "/v1/chat/completions" and body["auth"] == "Bearer k-123" and body["model"] == "stub"
    assert body["temperature"] == 1.0 and body["max_tokens"] == 3072 and body["stop"] == ["21. Instruction"]
    assert stub.prompts[0].startswith("You are helping to build") and stub.prompts[0].endswith("###\n4. Instruction:")
    assert stub.prompts[0].count("Instruction:") == 4 and "<noinput>" in stub.prompts[0]

    # the output is training data as it stands
    from utils.data import load_conversations

    convs, _ = load_conversations([str(out)])
    assert len(convs) == 5 and convs[0][-1]["role"] == "assistant"

    # resume: a second run with a larger target continues the same file
    stub.prompts.clear()
    logs.clear()
    stats2 = si.run_self_instruct(_args(stub, out, num_instructions=8), log=logs.append)
    rows2 = _rows(out)
    assert rows2[:5] == rows and len(rows2) == 8 and len({r["instruction"] for r in rows2}) == 8
    assert stats2["kept"] == 8 and stats2["kept_this_run"] == 3 and stats2["runs"] == 2 and _adds_up(stats2)
    assert stats2["prompts"] > stats["prompts"] and "resuming" in logs[0]
    assert any(r["instruction"] in p for p in stub.prompts for r in rows)  # generated examples are mixed in

    # a torn last line (a killed run) is cut off; the target already met means nothing to do
    with out.open("a", encoding="utf-8") as f:
        f.write('{"instruction": "Half a ro')
    stats3 = si.run_self_instruct(_args(stub, out, num_instructions=8), log=logs.append)
    assert _rows(out) == rows2 and stats3["kept"] == 8 and "nothing to do" in logs[-1]


def test_completions_batch_and_chinese_seeds(stub, tmp_path):
    out = tmp_path / "zh.jsonl"
    stats = si.run_self_instruct(_args(stub, out, seed_tasks=str(ZH_SEEDS), use_completions=True,
                                       request_batch_size=2, concurrency=1, num_instructions=3, max_prompts=4),
                                 log=lambda *a: None)
    assert stats["lang"] == "zh" and stats["kept"] == 3 and _adds_up(stats)
    assert all(b["path"] == "/v1/completions" and isinstance(b["prompt"], list) for b in stub.bodies)
    assert stub.prompts[0].startswith("你正在帮助") and stub.prompts[0].endswith("###\n4. Instruction:")
    assert len(_rows(out)) == 3


def test_max_prompts_stops_and_prompt_file(stub, tmp_path):
    header = tmp_path / "header.txt"
    header.write_text("Make {num_tasks} tasks, please.\n", encoding="utf-8")
    out = tmp_path / "few.jsonl"
    logs = []
    stats = si.run_self_instruct(_args(stub, out, num_instructions=50, max_prompts=2, prompt_file=str(header),
                                       num_tasks_per_prompt=7), log=logs.append)
    assert stats["prompts"] == 2 and stats["kept"] == 4 and "run the same command again" in "\n".join(logs)
    assert stub.prompts[0].startswith("Make 7 tasks, please.\n###\n1. Instruction:")
    assert stub.bodies[0]["stop"] == ["8. Instruction"]


def test_endpoint_errors_are_one_sentence(stub, tmp_path):
    stub.status = 401
    with pytest.raises(UserError, match="refused the request .* --api_key"):
        si.run_self_instruct(_args(stub, tmp_path / "a.jsonl"), log=lambda *a: None)
    stub.status = 500
    with pytest.raises(UserError, match=r"prompts in a row failed \(last error: HTTP 500"):
        si.run_self_instruct(_args(stub, tmp_path / "b.jsonl", max_retries=1), log=lambda *a: None)
    stub.status = 404
    with pytest.raises(UserError, match="check --base_url"):
        si.run_self_instruct(_args(stub, tmp_path / "c.jsonl"), log=lambda *a: None)
    with pytest.raises(UserError, match="must end in .jsonl"):
        si.run_self_instruct(_args(stub, tmp_path / "d.json"), log=lambda *a: None)
    with pytest.raises(UserError, match="must start with http"):
        si.run_self_instruct(_args(stub, tmp_path / "e.jsonl", base_url="127.0.0.1:1"), log=lambda *a: None)


def test_cli(stub, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "utils.self_instruct", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    res = cli("--seed_tasks", SEEDS)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "missing: --output --base_url --model" in res.stderr
    out = tmp_path / "cli.jsonl"
    res = cli("--seed_tasks", SEEDS, "--output", out, "--base_url", stub.url.removesuffix("/v1"), "--model", "stub",
              "--num_instructions", 2, "--concurrency", 1)
    assert res.returncode == 0, res.stderr
    assert len(_rows(out)) == 2 and "kept 2/2 instructions" in res.stdout and "--data" in res.stdout


def test_readme_has_flags_table():
    from utils.args import flags_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Self-instruct: grow your own instruction data" in readme
    assert flags_table(si.SelfInstructArguments) in readme


# ---- against our own server.py (a tiny random llama: garbage text, so this checks the mechanics) -------

def test_loop_against_our_server(tiny_llama_dir, tmp_path):
    pytest.importorskip("uvicorn")
    server_mod = pytest.importorskip("utils.server")
    from utils.args import GenerationArguments, ModelArguments, ServeArguments

    app = server_mod.create_app(ServeArguments(served_name="tiny", api_key="local"),
                                ModelArguments(model_name_or_path=str(tiny_llama_dir)),
                                GenerationArguments(max_new_tokens=16), log=lambda m: None)
    server, thread, base = start_server(app)
    try:
        seeds = tmp_path / "seeds.jsonl"  # short prompts: the tiny model's context is 512 tokens
        seeds.write_text("".join(json.dumps({"instruction": f"Name a {w} animal.", "instances": [
            {"input": "", "output": w}]}) + "\n" for w in ["big", "small", "fast"]), encoding="utf-8")
        header = tmp_path / "header.txt"
        header.write_text("List {num_tasks} tasks.", encoding="utf-8")
        url = f"{base}/v1"
        for completions in (False, True):
            out = tmp_path / f"server_{completions}.jsonl"
            args = si.SelfInstructArguments(seed_tasks=str(seeds), output=str(out), base_url=url, model="tiny",
                                            api_key="local", num_instructions=3, prompt_file=str(header),
                                            num_prompt_instructions=2, num_tasks_per_prompt=5, max_tokens=24,
                                            max_prompts=2, concurrency=2, use_completions=completions,
                                            request_timeout=600, max_retries=1, retry_delay=0.01)
            stats = si.run_self_instruct(args, log=lambda *a: None)
            rows = _rows(out) if out.exists() else []
            assert stats["prompts"] == 2 and stats["responses"] == 2 and stats["failed_prompts"] == 0
            assert stats["kept"] == len(rows) and _adds_up(stats)
            assert json.loads(si.stats_path(out).read_text()) == stats
    finally:
        stop_server(server, thread)


def test_worker_error_reaches_the_caller_and_a_dead_worker_never_hangs():
    from utils.self_instruct.pool import WorkerPool

    pool = WorkerPool(lambda job: 1 / job, 2)
    pool.submit(0)
    with pytest.raises(ZeroDivisionError):
        pool.next_result()
    with pytest.raises(RuntimeError, match="would wait forever"):
        pool.next_result()
    pool.close()
    dead = WorkerPool(lambda job: job, 1)
    put = dead.results.put

    def fail_once(x, *args, **kwargs):
        dead.results.put = put
        raise MemoryError("simulated")

    dead.results.put = fail_once
    dead.submit(1)
    with pytest.raises(RuntimeError, match="ended with 1 job"):
        dead.next_result()
