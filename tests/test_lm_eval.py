"""evaluate.py --task lm_eval: EleutherAI's lm-evaluation-harness on the model evaluate.py loaded (no second load):
the shipped local tasks (CMMLU, MMCU, C-Eval, our mc prompt, GSM8K), a user's YAML directory, lm-eval's response
cache, one-sentence errors before any model loads, and item-by-item agreement with our own mc scorer."""
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_DATA, run_script
from utils.errors import UserError

CMMLU = SHARED_DATA / "cmmlu"
AGREE_SUBJECTS = ["agronomy", "arts", "college_law", "genetics"]  # 20 items: both score every item in full


def _eval(*argv):
    from utils.eval_args import parse_eval_args
    from utils.evaluation import run_eval

    return run_eval(*parse_eval_args([str(a) for a in argv]), quiet=True)


def _samples(res, task):
    """lm-eval's per-item records of one task (the run wrote them to the folder its results name)."""
    return [json.loads(l) for l in (Path(res["samples"]) / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]


def _no_model_load(monkeypatch):
    from utils.evals.common import ModelHandle

    def fail(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ModelHandle, "load", fail)


def test_cmmlu_subject_on_tiny_model_and_the_response_cache(tiny_llama_dir, tmp_path, monkeypatch):
    args = ["--task", "lm_eval", "--lm_eval_tasks", "cmmlu_local_agronomy", "--data_dir", CMMLU, "--split", "dev",
            "--limit", 2, "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path]
    res = _eval(*args)
    m, theirs = res["metrics"], res["lm_eval"]["results"]["cmmlu_local_agronomy"]
    assert m["cmmlu_local_agronomy/n"] == 2 and m["cmmlu_local_agronomy/acc"] == theirs["acc,none"]
    assert m["cmmlu_local_agronomy/acc_norm"] == theirs["acc_norm,none"]
    recs = _samples(res, "cmmlu_local_agronomy")
    assert [r["doc_id"] for r in recs] == [0, 1] and m["cmmlu_local_agronomy/acc"] == sum(r["acc"] for r in recs) / 2
    assert all(r["acc"] == (r["pred"] == r["target"]) and r["continuations"] == ["A", "B", "C", "D"] for r in recs)
    # lm-eval's CMMLU prompt: the subject line as system message, "答案：" cue, through the model's chat template
    assert recs[0]["prompt"].startswith("<|im_start|>system\n以下是关于农学的单项选择题，请直接给出正确答案的选项。")
    assert recs[0]["prompt"].endswith("A. 胸\nB. 腹\nC. 大腿\nD. 小腿\n答案：<|im_end|>\n<|im_start|>assistant\n")
    assert "| cmmlu_local_agronomy | acc | " in res["table"]
    assert (tmp_path / "lm_eval-cmmlu_local_agronomy-0shot.json").is_file()
    assert Path(res["samples"]) == tmp_path / "lm_eval-cmmlu_local_agronomy-0shot-samples"
    # our template renders what the tokenizer's own chat template renders, when it is the model's template
    tok = _eval(*args, "--lm_eval_chat", "tokenizer")
    assert Path(tok["samples"]).name == "lm_eval-cmmlu_local_agronomy-0shot-tokenizer-samples"
    assert [r["prompt"] for r in _samples(tok, "cmmlu_local_agronomy")] == [r["prompt"] for r in recs]
    assert tok["metrics"] == m
    # a rerun is answered from lm-eval's response cache in OUTPUT_DIR/cache: the model scores nothing
    from lm_eval.models.huggingface import HFLM

    def fail(self, requests, *a, **k):
        raise AssertionError(f"{len(requests)} requests were not cached")

    monkeypatch.setattr(HFLM, "loglikelihood", fail)
    assert _eval(*args)["metrics"] == m


def test_user_task_directory(tiny_llama_dir, tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a}+{a}", "choices": [str(2 * a), str(2 * a + 1)], "label": 0}) + "\n"
                            for a in range(3)), encoding="utf-8")
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "my_sums.yaml").write_text(
        f"task: my_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}} ='\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    res = _eval("--task", "lm_eval", "--lm_eval_tasks", "my_s*", "--lm_eval_include", tasks, "--lm_eval_chat", "none",
                "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path / "out")
    assert res["metrics"]["my_sums/n"] == 3 and 0 <= res["metrics"]["my_sums/acc"] <= 1
    recs = _samples(res, "my_sums")
    assert recs[1]["prompt"] == "1+1 =" and recs[1]["continuations"] == [" 2", " 3"]  # plain text: no chat template


@pytest.mark.parametrize("argv, message", [
    (["--lm_eval_tasks", "cmmlu_locl", "--data_dir", CMMLU, "--split", "dev"],
     r"^--lm_eval_tasks: unknown task 'cmmlu_locl' \(did you mean 'cmmlu_local'\?\); name a shipped task"),
    (["--lm_eval_tasks", "cmmlu_local_no_such_subject", "--data_dir", CMMLU, "--split", "dev"],
     r"^--lm_eval_tasks: 'cmmlu_local_no_such_subject' is no subject of --data_dir"),
    (["--lm_eval_tasks", "mc_local"], r"^--lm_eval_tasks mc_local needs --data_dir"),
    (["--lm_eval_tasks", "gsm8k_local"], r"^--lm_eval_tasks gsm8k_local needs --data"),
    (["--lm_eval_tasks", "cmmlu_local", "--data_dir", CMMLU, "--split", "dev", "--shots", 5],
     r"^--shots 5: subject '\w+' has only 4 example\(s\) for shots"),
    (["--data_dir", CMMLU], r"^--task lm_eval needs --lm_eval_tasks"),
    (["--lm_eval_tasks", "x", "--lm_eval_include", "/no/such/dir"], r"^--lm_eval_include /no/such/dir is not a "
                                                                    r"directory"),
])
def test_user_errors_come_before_any_model_load(argv, message, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    with pytest.raises(UserError, match=message):
        _eval("--task", "lm_eval", *argv, "--output_dir", tmp_path)


def test_a_bad_subject_from_the_command_line(tmp_path):
    # the model directory does not exist: the task's own check speaks first, before anything about the model
    res = run_script("evaluate.py", "--task", "lm_eval", "--lm_eval_tasks", "mc_local_no_such_subject", "--data_dir",
                     CMMLU, "--split", "dev", "--model_name_or_path", tmp_path / "no_model_here", "--output_dir", tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --lm_eval_tasks: 'mc_local_no_such_subject' is no "
                                                     "subject of --data_dir")


def test_mmcu_multi_answer_and_ceval_layouts(tiny_llama_dir, tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "multi.csv").write_text("两个正确,甲,乙,丙,丁,AC\n一个正确,甲,乙,丙,丁,B\n", encoding="utf-8")  # headerless
    (bench / "accountant.csv").write_text("id,question,A,B,C,D,answer,explanation\n0,会计问题,甲,乙,丙,丁,D,因为\n",
                                          encoding="utf-8")
    groups = tmp_path / "groups.yaml"
    groups.write_text("subjects:\n  accountant: {name: 注册会计师}\n  multi: {name: 多选测试}\n", encoding="utf-8")
    res = _eval("--task", "lm_eval", "--lm_eval_tasks", "mmcu_local_multi", "ceval_local_accountant", "--data_dir",
                bench, "--groups", groups, "--model_name_or_path", tiny_llama_dir, "--output_dir", tmp_path / "out")
    assert res["metrics"]["mmcu_local_multi/n"] == 2 and res["metrics"]["ceval_local_accountant/n"] == 1
    multi = _samples(res, "mmcu_local_multi")
    assert len(multi[0]["continuations"]) == 15 and multi[0]["continuations"][multi[0]["target"]] == "AC"
    assert multi[1]["continuations"][multi[1]["target"]] == "B"  # the same 15 candidate sets on every row
    assert "以下是关于多选测试的多项选择题，请直接给出所有正确答案的选项。" in multi[0]["prompt"]
    ceval = _samples(res, "ceval_local_accountant")[0]
    assert "以下是中国关于注册会计师的单项选择题，请选出其中的正确答案。" in ceval["prompt"]
    assert "会计问题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：" in ceval["prompt"] and ceval["target"] == 3


@pytest.fixture(scope="module")
def gsm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gsm") / "gsm8k_4.jsonl"
    with open(SHARED_DATA / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(4)), encoding="utf-8")
    return path


def test_gsm8k_generate_until_from_the_repo_root(tiny_llama_dir, gsm_file, tmp_path):
    # a fresh process in the repo root, where our evaluate.py shadows HF's `evaluate` (sys.path[0] is the root):
    # lm-eval's exact_match is its own, so scoring works
    res = run_script("evaluate.py", "--task", "lm_eval", "--lm_eval_tasks", "gsm8k_local", "--data", gsm_file,
                     "--limit", 2, "--shots", 1, "--max_new_tokens", 4, "--model_name_or_path", tiny_llama_dir,
                     "--output_dir", tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "lm_eval-gsm8k_local-1shot.json").read_text(encoding="utf-8"))
    m = out["metrics"]
    assert m["gsm8k_local/n"] == 2 and 0 <= m["gsm8k_local/exact_match/strict-match"] <= 1
    assert "gsm8k_local/exact_match/flexible-extract" in m and "| gsm8k_local | exact_match (strict-match) |" in res.stdout
    rows = [json.loads(l) for l in gsm_file.read_text().splitlines()]
    recs = _samples(out, "gsm8k_local")  # one record per item and filter
    assert [(r["doc_id"], r["filter"]) for r in recs] == [(0, "strict-match"), (1, "strict-match"),
                                                         (0, "flexible-extract"), (1, "flexible-extract")]
    for i, rec in enumerate(recs[:2]):  # 1 shot: the first other row of the file, never the question itself
        shot, question = rows[1 - i], rows[i]
        assert rec["prompt"].count("Question: ") == 2 and f"Question: {shot['question']}" in rec["prompt"]
        assert rec["prompt"].rstrip().endswith(f"Question: {question['question']}\nAnswer:<|im_end|>\n<|im_start|>assistant")
        assert isinstance(rec["output"][0][0], str) and rec["target"] == question["answer"]


def test_hf_evaluate_is_found_past_our_evaluate_py(monkeypatch):
    import importlib

    from utils.evals.lm_eval import _hf_evaluate_importable

    monkeypatch.delitem(sys.modules, "evaluate", raising=False)
    monkeypatch.syspath_prepend(str(ROOT))
    assert Path(importlib.import_module("evaluate").__file__) == ROOT / "evaluate.py"  # the shadow is real
    with _hf_evaluate_importable():
        hf = importlib.import_module("evaluate")
        assert "site-packages" in Path(hf.__file__).parts and callable(hf.load)  # HF's package
    assert str(ROOT) in sys.path


def test_mc_and_lm_eval_pick_the_same_answers(embedded_dir, tmp_path):
    """Our mc scorer and lm-eval, given the same prompt (mc_local) and template, on 4 CMMLU dev subjects (20 items)."""
    common = ["--data_dir", CMMLU, "--split", "dev", "--subjects", *AGREE_SUBJECTS, "--output_dir", tmp_path]
    ours = _eval("--task", "mc", *common)
    recs = {}
    for f in (tmp_path / "cache").glob("mc-*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            recs[r["key"]] = r
    theirs = _eval("--task", "lm_eval", "--lm_eval_tasks", "mc_local", *common)
    same = total = 0
    for subject in AGREE_SUBJECTS:
        picks = _samples(theirs, f"mc_local_{subject}")
        assert len(picks) == 5
        for p in picks:
            total += 1
            same += p["continuations"][p["pred"]] == recs[f"{subject}/{p['doc_id']}"]["pred"]
        assert theirs["metrics"][f"mc_local_{subject}/acc"] == ours["subjects"][subject]["accuracy"]
    assert total == 20 and same == total
    assert theirs["metrics"]["mc_local/acc"] == pytest.approx(ours["metrics"]["overall"])


def test_the_adapter_object_is_what_lm_eval_scores(tiny_llama_dir, tmp_path):
    """lm-eval gets the handle's model object (base + adapter, loaded once), not a second load of the base."""
    from peft import LoraConfig, get_peft_model

    from utils.eval_args import parse_eval_args
    from utils.evals import lm_eval
    from utils.evals.common import EvalContext
    from utils.loader import load_for_inference

    class Handle:
        loads = 0

        def __init__(self, adapter):
            self.adapter = adapter

        def load(self):
            Handle.loads += 1
            model, tok, template, info = load_for_inference(model_name_or_path=str(tiny_llama_dir))
            if self.adapter:  # random, non-zero LoRA weights: the adapter changes every score
                model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
            return model.eval(), tok, template, info

        def identity(self):
            return {"base": str(tiny_llama_dir), "adapter": self.adapter}

    _, ev, gen = parse_eval_args(["--task", "lm_eval", "--lm_eval_tasks", "cmmlu_local_arts", "--data_dir", str(CMMLU),
                                  "--split", "dev", "--limit", "2"])
    flags = lm_eval.Flags(lm_eval_tasks=ev.lm_eval_tasks)
    scores = {}
    for adapter in (False, True):
        res = lm_eval.run(EvalContext(Handle(adapter), ev, gen, flags, tmp_path / str(adapter)))
        scores[adapter] = [r["logliks"] for r in _samples(res, "cmmlu_local_arts")]
    assert Handle.loads == 2 and scores[True] != scores[False]
