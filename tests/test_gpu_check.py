"""bench/gpu_check.py on a CPU: the dry run's plan (every step, its exact command, the files it writes), its
argument errors, the probe that wraps the project's scripts, and bench/gpu_wheels.sh's pins. Nothing trains."""
import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
STEPS = ["env", "build_model", "train_ours", "trl_default", "trl_padding_free", "trl_packing", "qlora_4bit",
         "lora_8bit", "lora_fp16", "merge_fp16", "lora_bf16_autocast", "generate_bf16", "generate_fp16",
         "predict_batched", "server"]


def run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def tokenizer_dir(tmp_path):
    """A folder that passes --tokenizer's check (the dry run never loads it)."""
    tok = tmp_path / "tok"
    tok.mkdir(exist_ok=True)
    (tok / "tokenizer_config.json").write_text("{}")
    return tok


def test_dry_run_writes_the_plan_with_every_step_and_its_command(tmp_path):
    out = tmp_path / "out"
    r = run("--dry_run", "--out", out, "--tokenizer", tokenizer_dir(tmp_path), "--work", tmp_path / "work")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "plan.md"]
    assert not (tmp_path / "work").exists()  # nothing ran
    plan = json.loads((out / "plan.json").read_text())
    assert [s["name"] for s in plan["steps"]] == STEPS
    assert plan["mode"] == "full (CPU)" and plan["executes"] is False and plan["budget_s"] == 420
    cmd = {s["name"]: s["command"] for s in plan["steps"]}
    work = str(tmp_path / "work")
    assert f"--worker env --spec {work}/spec.json --result {work}/results/env.json" in cmd["env"]
    assert "--worker build" in cmd["build_model"]
    ours = cmd["train_ours"]
    assert f"-- uniform_finetune.py --model_name_or_path {work}/model" in ours
    for flag in ("--per_gpu_train_batch_size 8", "--cutoff_len 256", "--learning_rate 0.001", "--epochs 1",
                 "--lora_r 8", "--lora_alpha 16", "--lora_dropout 0.05", "--lora_target_modules q_proj v_proj",
                 f"--output_dir {work}/ours"):
        assert flag in ours, flag
    for name in ("trl_default", "trl_padding_free", "trl_packing"):
        assert f"--worker {name} " in cmd[name]
    assert "--peft_type qlora --max_steps 10" in cmd["qlora_4bit"]
    assert "--load_in_8bit --max_steps 10" in cmd["lora_8bit"]
    assert f"--dtype float16 --max_steps 10 --output_dir {work}/lora_fp16" in cmd["lora_fp16"]
    assert f"-- merge.py --lora_dir {work}/lora_fp16 --merged_dir {work}/merged" in cmd["merge_fp16"]
    assert "-- generate.py --lora_dir" in cmd["generate_bf16"] and "--dtype bfloat16" in cmd["generate_bf16"]
    assert "--dtype float16" in cmd["generate_fp16"]
    assert "-- predict.py" in cmd["predict_batched"] and "--data arith_sample:16" in cmd["predict_batched"]
    assert "--batch_size 8" in cmd["predict_batched"]
    assert re.search(r"-- server\.py --lora_dir \S+/ours --port \d+ ", cmd["server"])
    assert "--dtype float32 --bf16 on --max_steps 10" in cmd["lora_bf16_autocast"]
    by = {s["name"]: s for s in plan["steps"]}
    assert by["merge_fp16"]["after"] == ["lora_fp16"] and by["server"]["after"] == ["train_ours"]
    assert "trl" in by["trl_default"]["needs"] and "bitsandbytes" in by["qlora_4bit"]["needs"]
    assert {r["name"] for r in plan["environment"]["requirements"]} >= {"transformers", "peft", "datasets"}
    md = (out / "plan.md").read_text()
    assert all(f"| {name} |" in md for name in STEPS)
    assert "dry run: wrote" in r.stdout


def test_steps_bring_their_dependencies_and_tiny_on_cpu_swaps_fp16(tmp_path):
    out = tmp_path / "out"
    r = run("--dry_run", "--execute-tiny", "--steps", "merge_fp16", "server", "--out", out, "--tokenizer",
            tokenizer_dir(tmp_path), "--work", tmp_path / "work", "--budget_s", "0")
    assert r.returncode == 0, r.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert [s["name"] for s in plan["steps"]] == ["env", "build_model", "train_ours", "lora_fp16", "merge_fp16",
                                                  "server"]
    fp16 = next(s for s in plan["steps"] if s["name"] == "lora_fp16")
    assert "--dtype float32" in fp16["command"] and "--max_steps 2" in fp16["command"]
    assert fp16["cpu_substitute"] == "--dtype float32 (float16 training needs a GPU)"
    # a zero budget runs nothing: every step is skipped with the reason, and the results say so
    res = json.loads((out / "results.json").read_text())
    assert {n: s["status"] for n, s in res["steps"].items()} == {n: "skip" for n in
                                                                 ("env", "build_model", "train_ours", "lora_fp16",
                                                                  "merge_fp16", "server")}
    assert res["steps"]["env"]["why"] == "budget: 0 s left, the step needs about 10 s"
    assert res["steps"]["train_ours"]["why"] == "needs build_model to pass first"
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "plan.md", "results.json", "steps.log", "summary.md"]
    assert "| server | skip |" in (out / "summary.md").read_text()


def test_argument_errors_are_one_sentence_and_exit_2(tmp_path):
    r = run("--dry_run", "--out", tmp_path / "o", "--tokenizer", tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: --tokenizer {tmp_path} holds no tokenizer_config.json; pass a folder of "
                                "tokenizer files (bash bench/gpu_wheels.sh writes .gpu_carry/tokenizer)")
    r = run("--dry_run", "--out", tmp_path / "o", "--tokenizer", tokenizer_dir(tmp_path), "--steps", "nope")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown step 'nope'; the steps are: env build_model")
    r = run("--out", tmp_path / "o", "--tokenizer", tokenizer_dir(tmp_path))  # a real run on a machine with no GPU
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: no CUDA device: this check is for a GPU machine; use --dry_run (plan only) or "
                                "--dry_run --execute-tiny (a tiny rehearsal on this CPU)")


def test_probe_runs_a_script_and_records_its_exit_code(tmp_path):
    result = tmp_path / "probe.json"
    r = run("--probe", result, "--", "merge.py")  # merge.py without its flags: a user error
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    info = json.loads(result.read_text())
    assert info["rc"] == 2 and info["cuda_used"] is False and info["peak_allocated_gib"] == 0.0


def test_device_command_in_the_docstring_fits_the_tool():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    line = next(l.strip() for l in gpu_check.__doc__.splitlines() if l.strip().startswith("python3 -m pip install"))
    assert len(line) <= 2000
    assert "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;" in line
    assert re.search(r"timeout \d+ python3 bench/gpu_check\.py --out \"\$OUT\" --tokenizer \.gpu_carry/tokenizer", line)


def test_relaxed_lines_name_what_is_outside_or_missing():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    rows = [{"requirement": "transformers>=5.20,<6", "name": "transformers", "installed": "5.17.0", "status": "outside",
             "needed": True},
            {"requirement": "trl", "name": "trl", "installed": "1.16.0", "status": "ok", "needed": False},
            {"requirement": "bitsandbytes>=0.45,<0.51", "name": "bitsandbytes", "installed": None, "status": "missing",
             "needed": True},
            {"requirement": "gguf>=0.17,<1", "name": "gguf", "installed": None, "status": "missing", "needed": False}]
    assert gpu_check.relaxed_lines(rows) == [
        "transformers 5.17.0 is outside `transformers>=5.20,<6`: run anyway",
        "bitsandbytes is missing (`bitsandbytes>=0.45,<0.51`): the steps that need it are skipped",
        "absent, and used by none of these steps: gguf"]


def test_wheel_pins_are_one_per_package_and_inside_our_ranges():
    text = (ROOT / "bench" / "gpu_wheels.sh").read_text()
    pins = dict(re.findall(r'^\s+"([A-Za-z0-9_.-]+)==([^"]+)"', text, re.M))
    names = [n.lower().replace("_", "-") for n in pins]
    assert len(names) == len(set(names)) and len(names) == 18
    ranges = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            ranges[req.name.lower()] = req.specifier
    for name in ("transformers", "peft", "datasets", "bitsandbytes", "fastapi", "uvicorn"):
        assert ranges[name].contains(pins[name]), (name, pins[name])
