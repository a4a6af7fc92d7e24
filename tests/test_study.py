"""The study runner with every kind of task: headline columns from the task modules, result names, early errors, the
judge server the study starts itself, per-entry baseline, and the one plot (loss curves + a bar chart per entry)."""
import json
import urllib.request

import pytest
import yaml

from conftest import SHARED_DATA
from utils.errors import UserError

BELLE = SHARED_DATA / "belle_eval"


def test_every_task_declares_its_headline():
    from utils.evals import TASKS

    missing = [name for name, m in TASKS.items() if not hasattr(m, "headline") and not hasattr(m, "HEADLINE")]
    assert missing == [], f"task modules without HEADLINE or headline(results): {missing}"


def test_headline_columns_come_from_the_task_modules():
    from utils.study import headline

    assert headline("mc", {"metrics": {"average": 0.4, "overall": 0.5}}) == {"average": 0.4}
    assert headline("loss", {"metrics": {"loss": 2.0, "perplexity": 7.4, "rows": 3}}) == {"loss": 2.0, "perplexity": 7.4}
    assert headline("code", {"metrics": {"pass@1": 0.25, "pass@5": 0.5}}) == {"pass@1": 0.25}
    assert headline("pairwise", {"metrics": {"win_rate": 0.6}}) == {"win_rate": 0.6}
    assert headline("mt_bench", {"metrics": {"score": 6.5}}) == {"score": 6.5}
    res = {"metrics": {"cmmlu_local_arts/acc": 0.1, "cmmlu_local/acc": 0.3, "cmmlu_local/acc_norm": 0.2,
                       "cmmlu_local/n": 10, "gsm8k_local/exact_match/strict-match": 0.05},
           "settings": {"lm_eval_tasks": ["cmmlu_local", "gsm8k_local"]}}
    assert headline("lm_eval", res) == {"cmmlu_local/acc": 0.3, "gsm8k_local/exact_match/strict-match": 0.05}


def test_eval_names_use_the_tasks_result_names():
    from utils.study import eval_names

    evals = [{"task": "mc", "shots": 1}, {"task": "lm_eval", "lm_eval_tasks": "cmmlu_local"}, {"task": "code"},
             {"task": "code", "limit": 3}, {"task": "loss", "name": "held out"}, {"task": "pairwise"}]
    assert eval_names(evals) == ["mc-1shot", "lm_eval-cmmlu_local-0shot", "code", "code-2", "held_out", "pairwise"]


@pytest.mark.parametrize("entry, top, message", [
    ({"task": "nope"}, {}, "eval entry 1 has an unknown task 'nope'; tasks are: "),
    ({"task": "loss", "data": ["x"], "limt": 3}, {}, "eval entry 1 (loss): config file its settings has an unknown key "
                                                     "'limt'; did you mean 'limit'?"),
    ({"task": "pairwise", "judge_server": True}, {}, "eval entry 1 asks for judge_server but the study has no "
                                                     "'judge_server' mapping"),
    ({"task": "loss"}, {"judge_server": "yes"}, "'judge_server' must be a mapping of server.py flags"),
])
def test_bad_study_entries_fail_before_training(tmp_path, monkeypatch, entry, top, message):
    import utils.study

    monkeypatch.setattr(utils.study, "train_cell", lambda *a: pytest.fail("trained despite a bad eval entry"))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": {"peft_type": ["lora"]}, "eval": [entry], **top}), encoding="utf-8")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        utils.study.run_study(path)


@pytest.fixture(scope="module")
def judged_study(tiny_llama_dir, tmp_path_factory):
    """One LoRA cell on the tiny llama + the base model; pairwise judged by server.py (started by the study), the
    adapter against its base (cells only), and code with the canonical solutions."""
    from utils.study import run_study

    out = tmp_path_factory.mktemp("judged_study")
    rows = [json.loads(l) for l in (BELLE / "eval_set_dev.jsonl").read_text(encoding="utf-8").splitlines()]
    short = sorted((r for r in rows if r["std_answer"]), key=lambda r: len(r["question"]) + len(r["std_answer"]))[:2]
    data = out / "belle2.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in short), encoding="utf-8")
    pairwise = {"task": "pairwise", "data": str(data), "max_new_tokens": 4, "judge_max_tokens": 8}
    spec = {
        "output_dir": str(out / "run"),
        "train": {"model_name_or_path": str(tiny_llama_dir), "max_steps": 2, "per_gpu_train_batch_size": 2,
                  "cutoff_len": 64, "logging_steps": 1, "save_steps": 1000, "learning_rate": 1e-2},
        "grid": {"peft_type": ["lora"], "data": ["arith_sample:8"]},
        "judge_server": {"model_name_or_path": str(tiny_llama_dir), "max_new_tokens": 8},
        "eval": [dict(pairwise, judge_server=True),
                 dict(pairwise, pairwise_base=True, baseline=False, judge_server=True),
                 {"task": "code", "code_canonical": True, "limit": 2}],
    }
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return {"path": path, "first": run_study(path), "out": out / "run"}


def test_study_with_a_judge_server_pairwise_and_code(judged_study):
    import csv

    out, first = judged_study["out"], judged_study["first"]
    cell, base = "lora__arith_sample-8", "base-" + first["rows"][0]["base_model"].rstrip("/").split("/")[-1]
    assert first["trained"] == [cell] and first["evaluated"] == [
        f"{cell}/pairwise", f"{cell}/pairwise-2", f"{cell}/code", f"{base}/pairwise", f"{base}/code"]
    with open(out / "results.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["cell"].startswith("base-") for r in table] == [True, False]
    assert {"pairwise: win_rate", "pairwise-2: win_rate", "code: pass@1"} <= set(table[0])
    assert [r["code: pass@1"] for r in table] == ["1.0", "1.0"]  # the canonical solutions pass
    assert table[0]["pairwise-2: win_rate"] == "" and table[1]["peft_type"] == "lora"  # baseline: false
    res = json.loads((out / "cells" / cell / "adapter" / "eval" / "pairwise-2.json").read_text())
    assert res["system_b"].startswith("the base model") and res["judge_model"] == base[len("base-"):]  # served name
    judged = [json.loads(l) for l in (out / "cells" / cell / "adapter" / "eval" / "cache" / "judge.jsonl")
              .read_text().splitlines()]
    assert judged and all(isinstance(j["response"], str) for j in judged)
    # the judge server was started for the study and is gone now
    cfg = yaml.safe_load((out / "cells" / cell / "adapter" / "eval" / "pairwise.yaml").read_text())
    assert cfg["judge_base_url"].startswith("http://127.0.0.1:") and (out / "judge_server.log").is_file()
    with pytest.raises(OSError):
        urllib.request.urlopen(cfg["judge_base_url"].rsplit("/v1", 1)[0] + "/health", timeout=300)
    # one plot: the loss curves and a bar chart per eval entry (loss_curves.png stays: the loss panel alone)
    from PIL import Image

    with Image.open(out / "results.png") as img:
        assert img.size[0] > 1000 and img.size[1] > 300  # 4 panels, 3 per row
    assert (out / "loss_curves.png").stat().st_size > 0


def test_study_rerun_starts_no_judge_server(judged_study, monkeypatch):
    import utils.study

    monkeypatch.setattr(utils.study, "train_cell", lambda *a: pytest.fail("a finished cell was trained again"))
    monkeypatch.setattr(utils.study.JudgeServer, "_start", lambda self: pytest.fail("the judge server was started"))
    again = utils.study.run_study(judged_study["path"])
    assert again["trained"] == [] and again["evaluated"] == [] and again["rows"] == judged_study["first"]["rows"]
