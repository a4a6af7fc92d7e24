"""README's generated tables: `make readme` (python -m utils.readme) rewrites every block between
`<!-- generated: NAME (make readme) -->` and `<!-- end: NAME -->` from the registries; `--check` only reports.

Tests compare README with these generators, so a registry change and its documentation land together.
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _flags(*names):
    def make():
        import utils.args as args_mod

        return args_mod.flags_table(*(getattr(args_mod, n) for n in names))
    return make


def _evaluate_flags():
    from utils.args import flags_table
    from utils.eval_args import EVAL_ARGS

    return flags_table(*EVAL_ARGS)


def _self_instruct_flags():
    from utils.args import flags_table
    from utils.self_instruct import SelfInstructArguments

    return flags_table(SelfInstructArguments)


def _registry():
    from utils.data import registry_table

    return registry_table(available=False)


def _models():
    from utils.models import models_table

    return models_table()


def _methods():
    from utils.peft_methods import methods_table

    return methods_table()


SECTIONS = {
    "finetune-flags": _flags("ModelArguments", "DataArguments", "PeftArguments", "TrainArguments"),
    "generate-flags": _flags("ModelArguments", "InferArguments", "GenerationArguments"),
    "server-flags": _flags("ServeArguments"),
    "registry": _registry,
    "self-instruct-flags": _self_instruct_flags,
    "evaluate-flags": _evaluate_flags,
    "models": _models,
    "methods": _methods,
}
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) \(make readme\) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)",
                    re.S)


def render(text):
    """README text with every generated block rewritten; unknown block names are an error."""
    def replace(m):
        name = m.group("name")
        if name not in SECTIONS:
            raise KeyError(f"README block '{name}' has no generator in utils/readme.py")
        return m.group(1) + SECTIONS[name]() + m.group(4)

    return _BLOCK.sub(replace, text)


def stale_blocks(text):
    return [m.group("name") for m in _BLOCK.finditer(text) if SECTIONS[m.group("name")]() != m.group("body")]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    text = README.read_text(encoding="utf-8")
    if "--check" in argv:
        stale = stale_blocks(text)
        if stale:
            print(f"README.md is out of date in: {', '.join(stale)}; run `make readme`", file=sys.stderr)
            return 1
        return 0
    new = render(text)
    if new != text:
        README.write_text(new, encoding="utf-8")
        print("README.md: generated tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
