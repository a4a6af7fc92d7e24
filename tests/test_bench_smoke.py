"""The training and prediction benchmarks' smoke runs on the tiny random model (ours, plus TRL's default when trl is
installed); bf16 configurations are skipped on CPUs without native bf16. Timeouts are hang guards, not speed checks."""
import importlib.util
import json
import os
import subprocess
import sys

from conftest import ROOT

HANG_GUARD = 900


def _run(*argv):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=HANG_GUARD)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res


def test_train_throughput_quick(tmp_path):
    systems = ["ours", "trl_default"] if importlib.util.find_spec("trl") else ["ours"]
    res = _run("bench/train_throughput.py", "--quick", "--n", "8", "--heldout", "4", "--systems", *systems,
               "--json", tmp_path / "r.json")
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["ours"]["tokens_per_s"] > 0 and summary["ours"]["heldout_loss"] > 0
    if len(systems) > 1:
        assert "train tokens/s ours/trl = " in res.stdout


def test_predict_throughput_quick():
    assert "predict rows/s ours/sequential = " in _run("bench/predict_throughput.py", "--quick", "--n", "8").stdout


def test_train_ablation_quick(tiny_llama_dir):
    res = _run("bench/train_ablation.py", "--reps", "1", "--n", "16", "--model", tiny_llama_dir)
    table = res.stdout[res.stdout.index("configuration"):].splitlines()
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from train_ablation import BF16_CONFIGS, FP32_CONFIGS
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from utils.peft_methods import cpu_has_bf16

    configs = BF16_CONFIGS if cpu_has_bf16() else FP32_CONFIGS  # the bench picks its set by the CPU kind, so do we
    assert [line.split("  ")[0] for line in table[1:]] == list(configs)
    assert table[1].startswith("ours (default)") and table[1].split()[-1] == "1.00"
    diff, size = res.stdout.split("with the packed mask: logits max abs diff ")[1].split(")")[0].split(" (logits up to ")
    assert float(diff) < 1e-5 * max(float(size), 1.0)  # the per-sample attention computes the packed mask's attention


def test_gemm_in_step_quick(tiny_llama_dir):
    res = _run("bench/gemm_in_step.py", "--reps", "1", "--n", "16", "--model", tiny_llama_dir, "--min_weights", "1")
    lines = res.stdout[res.stdout.index("nn.Linear (torch)"):].splitlines()
    assert [line[:26].strip() for line in lines] == ["nn.Linear (torch)", "timed, torch.mm (MKL)",
                                                     "timed, numpy (OpenBLAS)"]
    assert all("GFLOP/s" in line and " 0 GFLOP/s" not in line for line in lines[1:])
    assert "0 frozen linear layers" not in res.stdout
    diff = float(res.stdout.split("numpy (OpenBLAS) vs nn.Linear: max abs diff ")[1].split()[0])
    assert diff < 1e-4  # the timed GEMMs compute the same step
