"""--task code: the sandbox (utils/sandbox.py), pass@k, completion -> program, and the task end to end."""
import json
import os
import socket
import tempfile
import time
from math import comb
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, run_script
from utils.errors import UserError
from utils.evals import code
from utils.sandbox import Limits, Sandbox

ISOLATIONS = ["auto", "plain"]  # auto = namespaces where unshare works here; plain = the fallback, tested everywhere


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """Sandbox directories go under this test's own folder: its path marks every process a run starts."""
    root = tmp_path / "sbx"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _procs_with(marker):
    """PIDs of live (non-zombie) processes whose command line contains marker."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state != "Z":
            found.append(int(d))
    return found


def _assert_no_leftovers(tmp_root):
    assert _procs_with(str(tmp_root)) == []
    assert list(tmp_root.iterdir()) == []  # every run's directory was removed


# ==== sandbox ===========================================================================================
PROBLEM = {"task_id": "t/add", "entry_point": "add", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
           "canonical_solution": "    return a + b\n"}


@pytest.mark.parametrize("iso", ISOLATIONS)
def test_correct_passes_wrong_fails(iso, tmp_root):
    sb = Sandbox(Limits(timeout=300), isolation=iso)
    ok = sb.run(code.build_program(PROBLEM, "    return a + b\n", "raw"))
    assert (ok.status, ok.kind, ok.message) == ("passed", "", "")
    bad = sb.run(code.build_program(PROBLEM, "    return a - b\n", "raw"))
    assert (bad.status, bad.kind) == ("failed", "AssertionError")
    assert bad.message == "line 7: assert candidate(1, 2) == 3"
    _assert_no_leftovers(tmp_root)


@pytest.mark.parametrize("program, status, kind", [
    ("raise ValueError('boom')", "error", "ValueError"),
    ("def f(:\n    pass", "error", "SyntaxError"),
    ("import sys\nsys.exit(0)", "error", "SystemExit"),
    ("import os\nos._exit(0)", "error", "exited"),
    ("input()", "error", "EOFError"),            # stdin is /dev/null
    ("import os\nos.kill(os.getpid(), 9)", "error", "killed"),
    ("import numpy", "error", "ModuleNotFoundError"),  # the standard library only
])
def test_outcomes_are_classified(program, status, kind):
    res = Sandbox(Limits(timeout=300)).run(program)
    assert (res.status, res.kind) == (status, kind), res


def test_cpu_time_and_file_size_limits():
    res = Sandbox(Limits(timeout=300, cpu_s=1)).run("while True:\n    pass\n")
    assert (res.status, res.kind, res.message) == ("timeout", "cpu_time", "the CPU-time limit was reached")
    res = Sandbox(Limits(timeout=300, file_mb=1)).run("open('big', 'wb').write(b'x' * (2 << 20))\n")
    assert (res.status, res.kind) == ("error", "OSError") and "[Errno 27] File too large" in res.message


@pytest.mark.parametrize("iso", ISOLATIONS)
def test_infinite_loop_times_out(iso, tmp_root):
    res = Sandbox(Limits(timeout=1), isolation=iso).run("while True:\n    pass\n")
    assert (res.status, res.kind, res.message) == ("timeout", "wall_clock", "still running after 1 s")
    _assert_no_leftovers(tmp_root)


@pytest.mark.parametrize("iso", ISOLATIONS)
def test_memory_bomb_is_stopped(iso, tmp_root):
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    res = Sandbox(Limits(timeout=300, memory_mb=256), isolation=iso).run(bomb)
    assert (res.status, res.kind) == ("error", "MemoryError")
    _assert_no_leftovers(tmp_root)


@pytest.mark.parametrize("iso", ISOLATIONS)
def test_process_limit_and_fork_bomb(iso, tmp_root):
    sb = Sandbox(Limits(timeout=300, nproc=8), isolation=iso)
    counted = ("import os, time\nn = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(600)\n        os._exit(0)\n"
               "    n += 1\nprint(n)\n")
    res = sb.run(counted)
    assert res.status == "passed"
    assert int(res.stdout) < 8  # RLIMIT_NPROC: the first process + at most 7 children
    _assert_no_leftovers(tmp_root)  # the sleeping children died with the run
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    res = Sandbox(Limits(timeout=2, nproc=8), isolation=iso).run(bomb)
    assert res.status == "timeout"
    _assert_no_leftovers(tmp_root)


@pytest.mark.parametrize("iso", ISOLATIONS)
def test_network_connection_fails(iso, tmp_root):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        prog = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=10).sendall(b'x')\n"
        sb = Sandbox(Limits(timeout=300), isolation=iso)
        res = sb.run(prog)
        assert res.status == "error"
        if sb.setup.namespaces:
            assert (res.kind, res.message.split("]")[0]) == ("OSError", f"line 2: socket.create_connection"
                                                             f"(('127.0.0.1', {port}), timeout=10).sendall(b'x') "
                                                             "[Errno 101")  # Network is unreachable
            assert sb.protection["network"] == "none: own network namespace"
        else:
            assert res.kind == "PermissionError" and "network access is disabled" in res.message
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()
    _assert_no_leftovers(tmp_root)


@pytest.mark.parametrize("iso", ISOLATIONS)
def test_grandchild_is_killed(iso, tmp_root):
    sb = Sandbox(Limits(timeout=300), isolation=iso)
    if not (sb.setup.namespaces or sb.setup.drop_uid):
        pytest.skip("plain isolation as a non-root user: a process that calls setsid() survives (documented)")
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n    os._exit(0)\nprint('done')\n"
    res = sb.run(prog)
    assert (res.status, res.stdout) == ("passed", "done\n")
    _assert_no_leftovers(tmp_root)


@pytest.mark.parametrize("iso", ISOLATIONS)
def test_files_stay_in_the_run_directory(iso, tmp_root, tmp_path):
    name = f"sandbox-test-{os.getpid()}-{time.time_ns()}"
    outside = ROOT / f".{name}"  # a directory this user can write to, outside /tmp
    prog = (f"import os\nopen('out.txt', 'w').write('x')\nopen('/tmp/{name}', 'w').write('y')\n"
            f"print(os.getcwd(), sorted(os.listdir('.')))\n"
            f"try:\n    open({str(outside)!r}, 'w').write('z')\nexcept OSError as e:\n    print(type(e).__name__)\n")
    sb = Sandbox(Limits(timeout=300), isolation=iso)
    try:
        res = sb.run(prog)
        assert res.status == "passed", res
        lines = res.stdout.splitlines()
        cwd, listing = lines[0].split(" ", 1)
        assert "out.txt" in listing
        if sb.setup.private_tmp:
            assert cwd == "/tmp" and listing == f"['out.txt', '{name}']"  # /tmp is the run's directory
            assert not Path("/tmp", name).exists()
        else:
            assert cwd.startswith(str(tmp_root)) and not Path(cwd).exists()
        if sb.setup.readonly or sb.setup.drop_uid:  # read-only mounts, or an unprivileged uid
            assert lines[1] in ("OSError", "PermissionError", "FileNotFoundError") and not outside.exists()
    finally:
        Path("/tmp", name).unlink(missing_ok=True)
        outside.unlink(missing_ok=True)
    _assert_no_leftovers(tmp_root)


def test_output_is_truncated():
    res = Sandbox(Limits(timeout=300, output_bytes=1000)).run("import sys\nprint('x' * 100000)\n"
                                                              "sys.stderr.write('e' * 5000)\n")
    assert res.status == "passed" and res.truncated
    assert res.stdout == "x" * 1000 + "\n...[99001 more bytes cut]"
    assert res.stderr == "e" * 1000 + "\n...[4000 more bytes cut]"


def test_protection_is_reported():
    sb = Sandbox()
    assert set(sb.protection) == {"isolation", "network", "processes", "filesystem", "user", "nproc", "python"}
    assert sb.protection["isolation"] == ("namespaces" if sb.setup.namespaces else "plain")
    plain = Sandbox(isolation="plain").protection
    assert plain["isolation"] == "plain" and plain["network"].startswith("in-process only")


def test_namespaces_required_but_missing(monkeypatch):
    import shutil

    import utils.sandbox as sandbox_mod

    real = shutil.which
    monkeypatch.setattr(sandbox_mod.shutil, "which", lambda name: None if name == "unshare" else real(name))
    monkeypatch.setattr(Sandbox, "_detected", {})
    with pytest.raises(UserError, match=r"^the code sandbox needs `unshare` \(util-linux\)"):
        Sandbox(isolation="namespaces")
    assert Sandbox(isolation="auto").protection["isolation"] == "plain"  # auto falls back


def test_run_many_in_order_and_an_exception_stops_everything(tmp_root):
    sb = Sandbox(Limits(timeout=300))
    res = sb.run_many([f"print({i})" for i in range(6)], workers=3)
    assert [r.stdout for r in res] == [f"{i}\n" for i in range(6)]
    _assert_no_leftovers(tmp_root)

    slow = Sandbox(Limits(timeout=300))  # hang guard: a pool that ignored the error would wait 300 s per program

    def boom(i, result):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        slow.run_many(["pass"] + ["while True:\n    pass\n"] * 5, workers=2, on_result=boom)
    _assert_no_leftovers(tmp_root)


# ==== pass@k ===========================================================================================
def test_pass_at_k_hand_values():
    assert code.pass_at_k(5, 2, 1) == pytest.approx(0.4)          # 1 - C(3,1)/C(5,1) = 1 - 3/5
    assert code.pass_at_k(5, 2, 2) == pytest.approx(0.7)          # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert code.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert code.pass_at_k(5, 0, 3) == 0.0
    assert code.pass_at_k(5, 4, 2) == 1.0                         # n - c < k: every k-subset has a pass
    assert code.pass_at_k(1, 1, 1) == 1.0
    assert code.pass_at_k(3, 1, 4) is None                        # k > n: not computable
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert code.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert 0.99 < code.pass_at_k(200, 13, 100) < 1.0              # stable where the binomials are huge
    assert code.mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx((0.4 + 0 + 1) / 3)
    assert code.mean_pass_at_k([(5, 2)], 6) is None


# ==== completions -> programs ==============================================================================
def test_truncate_at_stop_strings():
    assert code.truncate_at_stops("    return 1\n\ndef g():\n    pass\n", "def f():\n") == "    return 1\n"
    assert code.truncate_at_stops("    x = 1  # note\n    return x\n# done\n", "p\n") == "    x = 1  # note\n    return x"
    assert code.truncate_at_stops("    return 1\nprint(f())", "p\n") == "    return 1"
    assert code.truncate_at_stops("def g(): pass", 'def f():\n    """x"""\n') == ""  # "\ndef " across the seam
    assert code.truncate_at_stops("    return 1\n", "# a\n#") == "    return 1\n"  # a stop inside the prompt only


def test_chat_answers_become_programs():
    answer = ("Here it is:\n```python\nimport math\n\ndef add(a, b):\n    return a + b\n```\nAnd a test:\n"
              "```python\nprint(add(1, 2))\n```")
    assert code.extract_code(answer, "add") == "import math\n\ndef add(a, b):\n    return a + b\n"
    assert code.extract_code("no fence at all", "add") == "no fence at all"
    prog = code.chat_program_code(PROBLEM, answer)
    assert prog.startswith(PROBLEM["prompt"].rstrip() + "\n\nimport math\n\ndef add(a, b):")
    body = code.chat_program_code(PROBLEM, "```\nreturn a + b\n```")  # a bare body at column 0 is indented
    assert body == PROBLEM["prompt"] + "    return a + b\n"
    sb = Sandbox(Limits(timeout=300))
    for completion in (answer, "```\nreturn a + b\n```", "```py\n    return a + b\n```"):
        assert sb.run(code.build_program(PROBLEM, completion, "chat")).status == "passed", completion


# ==== the task ==============================================================================================
def _problems_file(tmp_path):
    probs = [PROBLEM,
             {"task_id": "t/even", "entry_point": "is_even", "prompt": "def is_even(n):\n",
              "test": "def check(f):\n    assert f(2) and not f(3)\n", "canonical_solution": "    return n % 2 == 0\n"},
             {"task_id": "t/rev", "entry_point": "rev", "prompt": "def rev(s):\n",
              "test": "def check(f):\n    assert f('ab') == 'ba'\n", "canonical_solution": "    return s[::-1]\n"}]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in probs), encoding="utf-8")
    return path, probs


class FakeHandle:
    """What ctx.handle offers: load() -> (model, tokenizer, template, info) and identity(); counts loads."""

    def __init__(self, path):
        self.path, self.loads = str(path), 0

    def load(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from utils.templates import get_template

        self.loads += 1
        tok = AutoTokenizer.from_pretrained(self.path)
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        return model, tok, get_template("chat", tok), {}

    def identity(self):
        return {"path": self.path}


def _ctx(handle, out_dir, gen=None, limit=None, **flags):
    from utils.args import GenerationArguments

    ev = SimpleNamespace(limit=limit, batch_size=4, output_dir=str(out_dir), lora_dir=None, template=None)
    return SimpleNamespace(handle=handle, eval_args=ev, gen_args=gen or GenerationArguments(max_new_tokens=8),
                           flags=code.Flags(**flags), out_dir=Path(out_dir))


def test_task_end_to_end_with_stubbed_completions(tiny_llama_dir, tmp_path, monkeypatch):
    path, probs = _problems_file(tmp_path)
    answers = {p["prompt"]: p["canonical_solution"] for p in probs}
    answers[probs[2]["prompt"]] = "    return s\n"  # wrong

    def fake_generate(model, tokenizer, prompts, kwargs, strip=True):
        assert not strip  # code keeps its indentation
        assert kwargs["stop_strings"] == list(code.STOP_STRINGS) and kwargs["tokenizer"] is tokenizer
        return [answers[tokenizer.decode(p)] + "\ndef extra():\n    pass\n" for p in prompts]

    monkeypatch.setattr(code, "generate_batch", fake_generate)
    handle = FakeHandle(tiny_llama_dir)
    ctx = _ctx(handle, tmp_path / "out", code_problems=str(path), code_prompt_style="raw", code_k=[1, 3])
    res = code.run(ctx)
    assert res["metrics"]["pass@1"] == pytest.approx(2 / 3)
    assert res["metrics"]["pass@3"] is None and res["not_computable"] == ["pass@3"]
    assert {k: res["metrics"][k] for k in ("passed", "failed", "timeout", "error")} == \
        {"passed": 2, "failed": 1, "timeout": 0, "error": 0}
    assert res["problems"]["t/rev"] == {"n": 1, "correct": 0, "statuses": ["failed"]}
    assert "| pass@3 | not computable (k > n = 1) |" in res["table"]
    assert res["failures"] == [{"task_id": "t/rev", "sample": 0, "status": "failed", "kind": "AssertionError",
                                "message": "line 6: assert f('ab') == 'ba'"}]
    cache = next((tmp_path / "out" / "cache").glob("code-*.jsonl"))
    recs = [json.loads(l) for l in cache.read_text().splitlines()]
    assert len(recs) == 6 and sum("result" in r for r in recs) == 3  # completion, then completion + result
    assert handle.loads == 1
    again = code.run(ctx)  # everything cached: no model load, same numbers
    assert handle.loads == 1 and again["metrics"] == res["metrics"]
    ctx.flags.code_timeout = 300.0  # another timeout reruns the programs, not the model
    assert code.run(ctx)["metrics"] == res["metrics"] and handle.loads == 1


@pytest.mark.parametrize("style", ["raw", "chat"])
def test_task_on_the_tiny_model(tiny_llama_dir, tmp_path, style):
    from utils.args import GenerationArguments

    path, _ = _problems_file(tmp_path)
    gen = GenerationArguments(max_new_tokens=8, do_sample=True, temperature=1.0)
    res = code.run(_ctx(FakeHandle(tiny_llama_dir), tmp_path / "out", gen=gen, code_problems=str(path),
                        code_samples=2, code_k=[1, 2, 5], code_prompt_style=style, code_workers=2))
    m = res["metrics"]
    assert (m["problems"], m["samples_per_problem"]) == (3, 2)
    assert m["passed"] + m["failed"] + m["timeout"] + m["error"] == 6
    assert 0.0 <= m["pass@1"] <= m["pass@2"] <= 1.0 and m["pass@5"] is None
    assert res["prompt_style"] == [style]


def test_canonical_solutions_pass(tmp_path):
    path, _ = _problems_file(tmp_path)
    res = code.run(_ctx(None, tmp_path / "out", code_problems=str(path), code_canonical=True))
    assert res["metrics"]["pass@1"] == 1.0 and res["metrics"]["passed"] == 3


def test_bad_flags_and_files(tmp_path):
    ev = SimpleNamespace(limit=None)
    for flags, msg in [(dict(code_samples=0), "--code_samples must be >= 1"),
                       (dict(code_k=[1, 0]), "--code_k values must be integers >= 1, not 0"),
                       (dict(code_k=[]), "--code_k needs at least one k"),
                       (dict(code_timeout=0), "--code_timeout must be > 0 and <= 3600"),
                       (dict(code_memory_mb=10), "--code_memory_mb must be >= 64"),
                       (dict(code_workers=0), "--code_workers must be >= 1"),
                       (dict(code_prompt_style="x"), "--code_prompt_style must be one of auto, raw, chat"),
                       (dict(code_python=str(tmp_path / "nope")), "is not an executable file"),
                       (dict(code_problems=str(tmp_path / "nope.jsonl")), "does not exist")]:
        with pytest.raises(UserError, match=msg.replace("(", r"\(")):
            code.check(ev, code.Flags(**flags))
    bad = tmp_path / "bad.jsonl"
    for text, msg in [('{"task_id": "a", "prompt": "", "test": "t"}\n', "line 1 needs a string field 'entry_point'"),
                      ('{"task_id": "a", "prompt": "", "test": "t", "entry_point": "no-name"}\n', "is not a Python"),
                      ("[1]\n", "line 1 is not a JSON object"), ("{\n", "line 1 is not valid JSON"),
                      ('{"task_id": "a", "prompt": "", "test": "t", "entry_point": "f"}\n' * 2, "appears twice"),
                      ('{"task_id": "a", "prompt": "", "test": "t", "entry_point": "f"}\n',
                       "--code_canonical needs a canonical_solution")]:
        bad.write_text(text)
        with pytest.raises(UserError, match=msg):
            code.check(ev, code.Flags(code_problems=str(bad), code_canonical=True))


def test_several_greedy_samples_are_refused_before_the_model_loads(tmp_path):
    class NoLoad:
        def load(self):
            raise AssertionError("the model must not load")

        def identity(self):
            return {}

    with pytest.raises(UserError, match=r"^--code_samples 3 needs sampling: add --do_sample"):
        code.run(_ctx(NoLoad(), tmp_path, code_samples=3, code_k=[1]))


def test_cli_refuses_bad_code_flags():
    res = run_script("evaluate.py", "--task", "code", "--code_k", "0")
    assert res.returncode == 2 and res.stderr.startswith("error: --code_k values must be integers >= 1"), res.stderr


def test_two_real_humaneval_problems_on_the_embedded_model(embedded_dir, tmp_path):
    res = code.run(_ctx(FakeHandle(embedded_dir), tmp_path / "out", limit=2))
    m = res["metrics"]
    assert (m["problems"], m["samples_per_problem"]) == (2, 1)
    assert m["pass@1"] in (0.0, 0.5, 1.0)
    assert m["passed"] + m["failed"] + m["timeout"] + m["error"] == 2
    assert res["prompt_style"] == ["chat"]  # an instruct model with a chat template
    assert set(res["problems"]) == {"HumanEval/0", "HumanEval/1"}
