"""evaluate.py and the study runner: scoring on hand-made cases, then every task end to end on a tiny model."""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, SHARED_DATA, run_inprocess, start_server, stop_server
from utils.evals.scoring import (answers_match, extract_choice, extract_final_answer, letter_set, mc_correct,
                              parse_judge_score, parse_number)

CMMLU = SHARED_DATA / "cmmlu"
SUBJECTS = ["agronomy", "anatomy", "arts"]
BELLE = SHARED_DATA / "belle_eval"


# ---- scoring functions --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("答案是 B", "B"), ("答案：B。", "B"), ("(C)", "C"), ("（C）", "C"), ("B", "B"), ("B. 北京鸭", "B"),
    ("The answer is (D).", "D"), ("Answer: A and C", "AC"), ("正确答案是：A、C", "AC"), ("答案为A,B,D", "ABD"),
    ("答案：AC", "AC"), ("我选择 D。", "D"), ("选B", "B"), ("A and C are correct", "AC"),
    ("I think the answer is C because A is wrong", "C"), ("Options: A. x B. y. The answer is B", "B"),
    ("A cat sat on the mat", None), ("no idea", None), ("", None), ("The answer is E", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_multi_answer_counts_only_an_exact_set():
    assert letter_set("A,C") == letter_set("CA") == {"A", "C"}
    assert mc_correct("CA", "AC") and mc_correct("B", "B")
    assert not mc_correct("A", "AC") and not mc_correct("ABC", "AC") and not mc_correct(None, "A")


@pytest.mark.parametrize("text, expected", [
    ("Bloody mess is covered in blood. So the final answer is bloody mess.", "bloody mess"),
    ("Caesar had three children. Therefore, the final answer is no.", "no"),
    ("2240-1120 = 1120 The final answer: (C).", "(C)"),
    ("Pythagoras proved it. The answer: yes.", "yes"),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("She earns 0.2 x 50 = 10 dollars.\nThe answer is $10.", "$10"),
    ("So the answer is 3.5.", "3.5"),
    ("The options are listed.\n\nThe answer is:\n- beer", "beer"),
    ("所以答案是 42。", "42"),
    ("To answer this question, we think first.", None),
    ("I am not sure.", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("pred, ref, expected", [
    ("1,000", "1000", True), ("$1,000.50", "1000.5", True), ("72.0", "72", True), ("72 clips", "72", True),
    ("$18", "18 dollars", True), ("10%", "10", True), ("1/2", "0.5", True), ("71", "72", False),
    ("(C) 1120", "(C)", True), ("C", "(C)", True), ("B", "(C)", False),
    ("Bloody Mess", "bloody mess", True), ("yes, it is", "yes", True), ("no", "yes", False), (None, "72", False),
])
def test_answers_match(pred, ref, expected):
    assert answers_match(pred, ref) is expected


def test_parse_number():
    assert parse_number("$1,234,567.5 dollars") == 1234567.5
    assert parse_number("-3 degrees") == -3 and parse_number("no number") is None


@pytest.mark.parametrize("text, expected", [
    ("得分: 0.8", 0.8), ("得分：1分。模型回答与标准答案完全一致，翻译准确无误。", 1.0), ("得分:0", 0.0),
    ("得分: 8/10", 0.8), ("分数在0到1之间。得分: 0.6", 0.6), ("Score: 0.5", 0.5),
    ("这个回答很好，但是没有给出分数。", None), ("得分: 7", None), ("", None),
])
def test_parse_judge_score(text, expected):
    assert parse_judge_score(text) == expected


def test_read_mc_csv_layouts(tmp_path):
    from utils.evaluation import read_mc_csv

    cmmlu = tmp_path / "cmmlu.csv"
    cmmlu.write_text(",Question,A,B,C,D,Answer\n0,1+1=?,1,2,3,4,B\n1,bad row,1,2,3,4,E\n", encoding="utf-8")
    ceval = tmp_path / "ceval_val.csv"
    ceval.write_text("id,question,A,B,C,D,answer,explanation\n0,q?,a,b,c,d,D,because\n", encoding="utf-8")
    mmlu = tmp_path / "mmlu_test.csv"
    mmlu.write_text("What is 2+2?,3,4,5,6,B\nPick two,x,y,z,w,\"A,C\"\n", encoding="utf-8")
    rows, skipped = read_mc_csv(cmmlu)
    assert rows == [{"question": "1+1=?", "options": {"A": "1", "B": "2", "C": "3", "D": "4"}, "answer": "B"}]
    assert skipped == 1  # an answer that is not an option
    assert read_mc_csv(ceval)[0][0]["answer"] == "D"
    rows, _ = read_mc_csv(mmlu)
    assert [r["answer"] for r in rows] == ["B", "AC"] and rows[0]["question"] == "What is 2+2?"


def test_mc_prompt_with_shots_never_contains_the_question():
    from utils.evaluation import mc_messages

    q = {"question": "问题一", "options": {"A": "甲", "B": "乙"}, "answer": "A"}
    shot = {"question": "例题", "options": {"A": "丙", "B": "丁"}, "answer": "B"}
    msgs = mc_messages(q, [shot], "农学", multi=False)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"].startswith("以下是关于农学的单项选择题") and msgs[1]["content"] == "B"
    assert msgs[2]["content"] == "问题一\nA. 甲\nB. 乙"


# ---- tasks end to end on a tiny model ----------------------------------------------------------------
def _eval(*argv):
    from utils.eval_args import parse_eval_args
    from utils.evaluation import run_eval

    return run_eval(*parse_eval_args([str(a) for a in argv]), quiet=True)


def _no_model_load(monkeypatch):
    from utils.evaluation import ModelHandle

    def fail(self):
        raise AssertionError("the model was loaded although every item was cached")

    monkeypatch.setattr(ModelHandle, "load", fail)


def test_sequence_logprobs_keep_only_the_needed_logits_and_equal_full_logits(tiny_llama_dir):
    """The LM head runs at the positions asked for (logits_to_keep) and the log-probs equal those of full logits;
    prompt learning (virtual tokens before the input) falls back to full logits, with the same answer."""
    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.evals.common import sequence_logprobs

    seqs = [[5, 9, 33, 12, 7, 8], [40, 41, 42], [3, 4, 5, 6, 7]]
    wanted = [([5], [100]), ([1, 2], [7, 8]), ([0, 2, 4], [9, 9, 9])]

    def reference(model, n_virtual=0):
        out = []
        for s, (pos, tgt) in zip(seqs, wanted):
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([s])).logits[0, n_virtual:].log_softmax(-1)
            out.append([lp[p, t].item() for p, t in zip(pos, tgt)])
        return out

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    seen = []
    head = lora.get_base_model().lm_head
    hook = head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    got = sequence_logprobs(lora, seqs, 0, wanted)
    hook.remove()
    assert seen == [5]  # positions {0, 1, 2, 4, 5}, not the width 6 x 3 rows
    assert [g == pytest.approx(r, abs=1e-5) for g, r in zip(got, reference(lora))] == [True] * 3
    prompt = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    got = sequence_logprobs(prompt, seqs, 0, wanted)
    assert [g == pytest.approx(r, abs=1e-5) for g, r in zip(got, reference(prompt, 3))] == [True] * 3


def test_mc_loglik_zero_and_one_shot(tiny_llama_dir, tmp_path, monkeypatch):
    base = ["--task", "mc", "--data_dir", CMMLU, "--split", "dev", "--subjects", *SUBJECTS, "--limit", 3,
            "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path]
    zero = _eval(*base)
    assert set(zero["subjects"]) == set(SUBJECTS) and all(s["n"] == 3 for s in zero["subjects"].values())
    assert set(zero["groups"]) == {"Other", "STEM", "Humanities"}
    m = zero["metrics"]
    assert m["n"] == 9 and 0 <= m["average"] <= 1
    assert m["average"] == pytest.approx(sum(s["accuracy"] for s in zero["subjects"].values()) / 3)
    assert (tmp_path / "mc-0shot.json").is_file() and "| **average** (mean over subjects) |" in (tmp_path / "mc-0shot.md").read_text()
    cached = [json.loads(l) for f in (tmp_path / "cache").glob("mc-*.jsonl") for l in f.read_text().splitlines()]
    assert len(cached) == 9 and all(set(r["scores"]) == {"A", "B", "C", "D"} and r["pred"] in "ABCD" for r in cached)
    # 1-shot through the script itself
    res = run_inprocess("evaluate.py", *base, "--shots", 1)
    assert res.returncode == 0, res.stderr
    one = json.loads((tmp_path / "mc-1shot.json").read_text())
    assert one["metrics"]["n"] == 9 and one["settings"]["shots"] == 1 and "| agronomy | Other | 3 |" in res.stdout
    _no_model_load(monkeypatch)  # a rerun is answered from the cache
    assert _eval(*base)["metrics"] == zero["metrics"]


def test_mc_generate_and_multi_answer_loglik(tiny_llama_dir, tmp_path):
    bench = tmp_path / "bench"
    for split, rows in (("test", ["两个正确,x,y,z,w,AC", "一个正确,x,y,z,w,B"]), ("dev", ["例题,x,y,z,w,BD"])):
        (bench / split).mkdir(parents=True)
        (bench / split / f"multi_{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    res = _eval("--task", "mc", "--data_dir", bench, "--shots", 1, "--model_name_or_path", tiny_llama_dir,
                "--output_dir", tmp_path / "out")
    assert res["subjects"]["multi"]["n"] == 2 and res["subjects"]["multi"]["groups"] == []
    recs = [json.loads(l) for l in next((tmp_path / "out" / "cache").glob("mc-*.jsonl")).read_text().splitlines()]
    assert all(r["pred"] and set(r["pred"]) <= set("ABCD") for r in recs)  # a subset of the options, scored as a set
    assert all(r["correct"] == mc_correct(r["pred"], r["gold"]) for r in recs)
    gen = _eval("--task", "mc", "--data_dir", CMMLU, "--split", "dev", "--subjects", "arts", "--limit", 2,
                "--mc_method", "generate", "--max_new_tokens", 3, "--model_name_or_path", tiny_llama_dir,
                "--output_dir", tmp_path / "out")
    assert gen["metrics"]["n"] == 2 and 0 <= gen["metrics"]["parsable_rate"] <= 1


@pytest.fixture(scope="module")
def gsm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gsm") / "gsm8k_6.jsonl"
    with open(SHARED_DATA / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(6)), encoding="utf-8")
    return path


def test_cot_on_gsm8k_rows(tiny_llama_dir, gsm_file, tmp_path, monkeypatch):
    args = ["--task", "cot", "--data", gsm_file, "--limit", 4, "--max_new_tokens", 6, "--batch_size", 4,
            "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path]
    res = _eval(*args)
    m = res["metrics"]
    assert m["n"] == 4 and 0 <= m["accuracy"] <= m["parsable_rate"] <= 1
    assert [s["reference"] for s in res["samples"]][:2] == ["72", "10"]  # GSM8K "#### N" references
    held_out = _eval(*args, "--exclude_data", f"{gsm_file}:2", "--limit", 10)
    assert held_out["data"][0]["excluded"] == 2 and held_out["metrics"]["n"] == 4
    _no_model_load(monkeypatch)
    assert _eval(*args)["metrics"] == m


class _StubJudge:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that answers with a canned score and counts calls."""

    def __init__(self):
        self.calls = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                text = body["messages"][-1]["content"]
                reply = "这个回答看不出好坏。" if "计算机科学老师" in text else "得分: 0.8\n理由：基本正确。"
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": reply}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
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
def stub_judge():
    judge = _StubJudge()
    yield judge
    judge.close()


@pytest.fixture(scope="module")
def belle_rows(tmp_path_factory):
    """Three real Belle-eval rows of three classes (one spelled with a no-break space, as in the file)."""
    rows = [json.loads(l) for l in (BELLE / "eval_set_dev.jsonl").read_text(encoding="utf-8").splitlines()]
    pick = [next(r for r in rows if r["class"] == c) for c in ("math", "code", "closed\xa0qa")]
    data = tmp_path_factory.mktemp("belle") / "belle3.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pick), encoding="utf-8")
    return data, pick


def test_belle_with_a_stub_judge_and_its_cache(tiny_llama_dir, tmp_path, stub_judge, belle_rows, monkeypatch):
    data, pick = belle_rows
    args = ["--task", "belle", "--data", data, "--judge_prompts", BELLE / "eval_prompt.json",
            "--judge_base_url", stub_judge.url, "--judge_model", "stub-judge", "--judge_api_key", "k123",
            "--max_new_tokens", 4, "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path / "out"]
    res = _eval(*args)
    assert len(stub_judge.calls) == 3
    call = stub_judge.calls[0]
    assert call["path"] == "/v1/chat/completions" and call["body"]["model"] == "stub-judge"
    assert call["auth"] == "Bearer k123"
    asked = " ".join(c["body"]["messages"][0]["content"] for c in stub_judge.calls)
    assert "你是一个数学老师" in asked and "标准回答：" in asked and pick[0]["question"] in asked
    m = res["metrics"]
    assert m["n"] == 3 and m["scored"] == 2 and m["no_score"] == 1 and m["score"] == pytest.approx(0.8)
    assert set(res["classes"]) == {"math", "code", "closed qa"} and res["classes"]["code"]["score"] is None
    assert res["classes_with_generic_prompt"] == []
    _no_model_load(monkeypatch)  # the rerun costs nothing: answers and judgements come from the cache
    assert _eval(*args)["metrics"] == m and len(stub_judge.calls) == 3


def test_belle_with_our_server_as_judge(tiny_llama_dir, tmp_path, monkeypatch):
    pytest.importorskip("uvicorn")
    from utils.args import GenerationArguments, ModelArguments, ServeArguments
    from utils.evaluation import Judge
    from utils.server import create_app

    app = create_app(ServeArguments(served_name="judge"), ModelArguments(model_name_or_path=str(tiny_llama_dir)),
                     GenerationArguments(max_new_tokens=8), log=lambda m: None)
    server, thread, base = start_server(app)
    try:
        url = f"{base}/v1"
        rows = [json.loads(l) for l in (BELLE / "eval_set_dev.jsonl").read_text(encoding="utf-8").splitlines()]
        short = sorted(rows, key=lambda r: len(r["question"]) + len(r["std_answer"]))[:2]  # the tiny judge reads 512 tokens
        data = tmp_path / "belle_short.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in short), encoding="utf-8")
        args = ["--task", "belle", "--data", data, "--judge_prompts", BELLE / "eval_prompt.json", "--judge_max_tokens", 8,
                "--judge_base_url", url, "--judge_model", "judge",
                "--max_new_tokens", 4, "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path]
        m = _eval(*args)["metrics"]
        judged = [json.loads(l) for l in (tmp_path / "cache" / "judge.jsonl").read_text().splitlines()]
        assert m["n"] == m["judged"] == 2 and m["scored"] + m["no_score"] == 2  # a random tiny judge rarely scores
        assert len(judged) == 2 and all(isinstance(j["response"], str) for j in judged)
        _no_model_load(monkeypatch)
        monkeypatch.setattr(Judge, "__call__", lambda self, content: pytest.fail("the judge was asked again"))
        assert _eval(*args)["metrics"] == m
    finally:
        stop_server(server, thread)


def test_judge_client_without_openai_package(stub_judge):
    from utils.evaluation import Judge

    judge = Judge(stub_judge.url, "stub-judge")
    judge._client = None  # the plain urllib path
    assert parse_judge_score(judge("一个问题")) == 0.8 and stub_judge.calls[-1]["path"] == "/v1/chat/completions"


def test_judge_unreachable_is_one_sentence(tmp_path):
    from utils.errors import UserError
    from utils.evaluation import Judge

    with pytest.raises(UserError, match="check --judge_base_url"):
        Judge("http://127.0.0.1:9/v1", "m", timeout=300)("x")


# ---- the study runner and the loss task ---------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tiny_llama_dir, gsm_file, tmp_path_factory):
    from utils.study import run_study

    out = tmp_path_factory.mktemp("study")
    spec = {
        "output_dir": str(out / "run"),
        "train": {"model_name_or_path": str(tiny_llama_dir), "max_steps": 2, "per_gpu_train_batch_size": 2,
                  "cutoff_len": 96, "logging_steps": 1, "save_steps": 1000, "learning_rate": 1e-2},
        "grid": {"peft_type": ["lora", "ia3"], "data": ["arith_sample:16", f"{gsm_file}:4"]},
        "eval": [{"task": "loss", "data": [str(gsm_file)], "limit": 3, "exclude_train_data": True}],
    }
    path = out / "grid.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")  # JSON is YAML
    first = run_study(path)
    return {"path": path, "first": first, "out": out / "run"}


def test_study_grid_trains_evaluates_and_tabulates(study):
    first, out = study["first"], study["out"]
    names = ["lora__arith_sample-16", "lora__gsm8k_6-4", "ia3__arith_sample-16", "ia3__gsm8k_6-4"]
    assert first["trained"] == names and len(first["evaluated"]) == 5  # 4 cells + the base model
    for name in names:
        cell = out / "cells" / name
        assert (cell / "adapter" / "adapter_model.safetensors").is_file() and (cell / "adapter" / "eval" / "loss.json").is_file()
        assert [h["step"] for h in json.loads((cell / "log_history.json").read_text()) if "loss" in h] == [1, 2]
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("cell,base_model,model_type,peft_type,data")
    assert lines[1].startswith("base-") and "loss: loss" in lines[0]
    assert "| lora__arith_sample-16 |" in (out / "results.md").read_text() and (out / "loss_curves.png").stat().st_size > 0
    heldout = json.loads((out / "cells" / names[1] / "adapter" / "eval" / "loss.json").read_text())
    assert heldout["data"][0]["excluded"] == 4 and heldout["metrics"]["rows"] == 2  # the 4 trained rows are held out


def test_study_rerun_skips_every_cell(study, monkeypatch):
    import utils.study

    monkeypatch.setattr(utils.study, "train_cell", lambda *a: pytest.fail("a finished cell was trained again"))
    again = utils.study.run_study(study["path"])
    assert again["trained"] == [] and again["evaluated"] == [] and len(again["skipped"]) == 9
    assert again["rows"] == study["first"]["rows"]


def test_loss_base_versus_adapter(study, tiny_llama_dir, gsm_file, tmp_path):
    adapter = study["out"] / "cells" / "lora__gsm8k_6-4" / "adapter"
    common = ["--task", "loss", "--data", gsm_file, "--limit", 3, "--output_dir", tmp_path]
    base = _eval(*common, "--model_name_or_path", tiny_llama_dir)["metrics"]
    tuned = _eval(*common, "--lora_dir", adapter)["metrics"]
    for m in (base, tuned):
        assert m["rows"] == 3 and m["tokens"] > 0 and math.isfinite(m["loss"]) and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert tuned["loss"] != pytest.approx(base["loss"], abs=1e-6)


def test_loss_equals_the_training_loss_of_a_row(tiny_llama_dir, gsm_file, tmp_path):
    import torch

    from utils.data import load_conversations
    from utils.loader import load_for_inference

    got = _eval("--task", "loss", "--data", gsm_file, "--limit", 1, "--cutoff_len", 128,
                "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path)["metrics"]
    model, tok, tmpl, _ = load_for_inference(model_name_or_path=str(tiny_llama_dir))
    ids, labels = tmpl.encode(tok, load_conversations([str(gsm_file)])[0][0])
    with torch.no_grad():  # what the Trainer computes: HF's shifted cross-entropy over the labels != -100
        want = model(input_ids=torch.tensor([ids[:128]]), labels=torch.tensor([labels[:128]])).loss.item()
    assert got["loss"] == pytest.approx(want, rel=1e-5) and got["tokens"] == sum(l != -100 for l in labels[1:128]) > 0


def test_evaluate_needs_a_task_and_its_data():
    res = run_inprocess("evaluate.py", "--task", "mc")
    assert res.returncode == 2 and res.stderr.startswith("error: --task mc needs --data_dir")
    res = run_inprocess("evaluate.py")
    assert res.returncode == 2 and "needs --task" in res.stderr


def test_readme_documents_evaluate_flags():
    from utils.args import flags_table
    from utils.eval_args import EVAL_ARGS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert flags_table(*EVAL_ARGS) in readme
    assert "| `evaluate.py` |" in readme and "python -m utils.study study/example.yaml" in readme
