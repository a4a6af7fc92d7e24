"""How the new rows of --extend_vocab should start: held-out loss per character before any training, per init.

Run by hand, not in CI, after bench/vocab_study.py (it reads that study's data and its extended run):

    .venv/bin/python bench/vocab_study.py                  # writes /tmp/vocab_study (data + runs)
    .venv/bin/python bench/vocab_init.py                   # about 2 minutes on 2 CPU cores

The extended run's tokens (its finetune_meta.json) are added to the base model again. Each variant sets every new
row from the rows of the pieces the old tokenizer splits the token into: `mean` (the toolkit's default), `first`,
`last`, `scaleX` (the mean times X), `mixA` (A x the first piece + (1 - A) x the mean) and `mean_norm` (the mean
rescaled to the pieces' mean norm). The score is bench/vocab_study.py's loss per character on the first held-out
Belle-eval and CMMLU rows. Lower is better; the base model's score with its own tokenizer is printed first.
"""
import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = ("mean", "mix0.5", "scale0.8", "scale1.2", "first", "last", "mean_norm")


def new_row(variant, pieces):
    """The starting row of one new token from its pieces' rows (a [pieces, hidden] tensor)."""
    mean = pieces.mean(0)
    if variant == "mean":
        return mean
    if variant == "first":
        return pieces[0]
    if variant == "last":
        return pieces[-1]
    if variant == "mean_norm":
        return mean / mean.norm() * pieces.norm(dim=1).mean()
    if variant.startswith("scale"):
        return mean * float(variant[len("scale"):])
    if variant.startswith("mix"):
        a = float(variant[len("mix"):])
        return a * pieces[0] + (1 - a) * mean
    raise SystemExit(f"unknown variant {variant}; use one of {', '.join(VARIANTS)} (scaleX / mixA with any number)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work_dir", default="/tmp/vocab_study", help="bench/vocab_study.py's --work_dir")
    ap.add_argument("--rows", type=int, nargs=2, default=[25, 15], metavar=("BELLE", "CMMLU"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    a = ap.parse_args(argv)

    import torch
    import vocab_study as study

    from utils import vocab
    from utils.loader import open_run
    from utils.models import embedded_model_dir, load_model, load_tokenizer

    work = Path(a.work_dir)
    if not (work / "extended" / "finetune_meta.json").is_file():
        raise SystemExit(f"no extended run in {work}; run bench/vocab_study.py --work_dir {work} first")
    _, _, held, belle_held = study.build_data(work)
    rows = belle_held[:a.rows[0]] + held[len(belle_held):len(belle_held) + a.rows[1]]
    run = open_run(work / "extended")
    base = load_model(embedded_model_dir(), "float32")
    print(f"base model: {study.loss_per_char(base, load_tokenizer(embedded_model_dir()), run.template, rows)}")
    old = base.get_input_embeddings().weight.detach().clone()
    tokenizer = load_tokenizer(work / "extended")
    for variant in a.variants:
        model, plan = copy.deepcopy(base), vocab.VocabPlan.from_meta(run.meta)
        plan.old_rows = plan.rows = None
        vocab.resize_and_init(model, plan)
        weight = model.get_input_embeddings().weight
        with torch.no_grad():
            for i, pieces in enumerate(plan.pieces):
                weight[plan.first_id + i] = new_row(variant, old[pieces])
        print(f"{variant}: {study.loss_per_char(model, tokenizer, run.template, rows)}", flush=True)


if __name__ == "__main__":
    main()
