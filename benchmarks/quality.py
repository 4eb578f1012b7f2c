"""Quality benchmark of the two-tower baseline on ML-1M (not a test).

Leave-one-out split, full ranking over all 3,416 items with already-seen items removed, model
selection (early stopping and the kept epoch) on validation, final numbers on test. Writes
``results/quality.md`` and ``results/quality.json``.

    python benchmarks/quality.py                      # sasrec and mean towers
    python benchmarks/quality.py --models two_tower_sasrec --minutes two_tower_sasrec=30
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import (  # noqa: E402
    default_data_dir, header, markdown_header, non_negative_int, positive_int, training_budgets, training_overrides,
    write_results,
)

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.config import load_config  # noqa: E402

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# Each benchmarked model is a shipped config, so `xmatch train --config` reproduces it exactly.
MODELS = {
    "two_tower_sasrec": CONFIGS_DIR / "ml1m_sasrec.yaml",
    "two_tower_mean": CONFIGS_DIR / "ml1m_mean.yaml",
}
# Training-time budget per model (minutes) on a 2-core CPU; the mean tower converges far sooner.
DEFAULT_MINUTES = {"two_tower_sasrec": 70.0, "two_tower_mean": 15.0}
REPORTED = ("HR@10", "NDCG@10", "MRR@20", "Recall@50", "NDCG@50", "P@50", "TailRecall@50", "Coverage@50")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=positive_int, default=200)
    parser.add_argument("--patience", type=non_negative_int, default=10)
    parser.add_argument("--minutes", action="append", default=[], metavar="MODEL=MINUTES",
                        help=f"training-time budget of a model (default {DEFAULT_MINUTES})")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every model")
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--output", default="quality", help="results file stem under benchmarks/results/")
    args = parser.parse_args()

    budgets = training_budgets(parser, args.minutes, DEFAULT_MINUTES)  # a bad flag is refused, data or not
    dataset_dir = pathlib.Path(args.data_dir)
    if not (dataset_dir / args.dataset).is_dir():
        print(f"skipped: dataset {args.dataset!r} not found under {dataset_dir}", file=sys.stderr)
        return 0
    result = header("quality")
    result["rows"] = []
    split = None
    for name in args.models:
        overrides = [*training_overrides(args.dataset, dataset_dir, args.epochs, args.patience, budgets[name]),
                     *args.set]
        config = load_config(MODELS[name], overrides)
        split = split or training.prepare_split(config)
        started = time.time()
        metrics = training.train(config, pathlib.Path(args.runs_dir) / f"{args.output}-{name}", split=split)
        row = {"dataset": args.dataset, "split": "leave_one_out", "model": name,
               **{key: round(metrics["test"][key], 4) for key in REPORTED},
               "val_NDCG@10": round(metrics["validation"]["NDCG@10"], 4),
               "train_seconds": metrics["train_seconds"], "epochs": metrics["epochs"],
               "best_epoch": metrics["best_epoch"], "wall_seconds": round(time.time() - started, 1),
               "settings": config.to_dict()["model"] | {"batch_size": config.train.batch_size,
                                                        "learning_rate": config.train.learning_rate}}
        result["rows"].append(row)
        print({k: v for k, v in row.items() if k != "settings"}, flush=True)
        # Rewritten after every model, so a long run that is cut short keeps what finished.
        write_results(result, args.output, to_markdown)
    return 0


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "two-tower baseline, full ranking") + [
        "- protocol: leave-one-out (last item test, second-to-last validation), full ranking over all "
        "items, items already in the history removed, model selected on validation NDCG@10",
        "",
        "| dataset | split | model | " + " | ".join(REPORTED) + " | epochs (best) | train s |",
        "|" + "---|" * (len(REPORTED) + 5),
    ]
    for row in result["rows"]:
        metrics = " | ".join(f"{row[key]:.4f}" for key in REPORTED)
        lines.append(f"| {row['dataset']} | {row['split']} | {row['model']} | {metrics} | "
                     f"{row['epochs']} ({row['best_epoch']}) | {row['train_seconds']:.0f} |")
    lines += ["", "Settings per model:", ""]
    for row in result["rows"]:
        lines.append(f"- {row['model']}: `{row['settings']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
