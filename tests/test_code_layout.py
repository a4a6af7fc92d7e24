"""The code's shape, as issue #15 asks: no function longer than MAX_LINES unless a `# long: <reason>` comment in its
first lines says why (the escape hatch for a body that reads best in one piece)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def _sources():
    return sorted([*ROOT.glob("*.py"), *(ROOT / "utils").rglob("*.py"), *(ROOT / "bench").glob("*.py")])


def long_functions(path, max_lines=MAX_LINES):
    """(name, first line, length) of the functions in `path` over max_lines without a `# long:` reason."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        head = "\n".join(lines[node.lineno - 1:node.lineno + 4])
        if length > max_lines and "# long:" not in head:
            found.append((node.name, node.lineno, length))
    return found


def test_the_check_finds_a_long_function_and_honours_a_reason(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    plain = tmp_path / "plain.py"
    plain.write_text(f"def f():\n{body}\n", encoding="utf-8")
    reasoned = tmp_path / "reasoned.py"
    reasoned.write_text(f"def f():\n    # long: one table of settings reads best in one place\n{body}\n", encoding="utf-8")
    short = tmp_path / "short.py"
    short.write_text("def f():\n    return 1\n", encoding="utf-8")
    assert long_functions(plain) == [("f", 1, MAX_LINES + 1)]
    assert long_functions(reasoned) == [] and long_functions(short) == []


def test_no_function_over_the_limit_without_a_reason():
    offenders = [f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
                 for p in _sources() for name, line, n in long_functions(p)]
    assert not offenders, (f"functions over {MAX_LINES} lines: {offenders}; split them, or say why in a "
                           "'# long: <reason>' comment on their first lines")
