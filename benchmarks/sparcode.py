"""SparCode quality benchmark on ML-1M (not a test): two-tower vs SparCode through its index vs the
unquantized all-to-all upper bound, with a cache-budget sweep.

Same split and protocol as ``quality.py`` (leave-one-out, full ranking over all items, history
removed, selection on validation NDCG@10, test reported). Each model is a shipped config;
training runs live in ``--runs-dir`` and are reused when finished (the two-tower run is the one
``quality.py`` trained), so re-running only re-evaluates.

SparCode rows:
  * ``cache=100%``, ``cache=10%``, ``cache=1%``: retrieval through a ``SparseCodeIndex`` whose
    posting lists keep that fraction of all (code, item) scores, exactly as a served export
    answers (top-100 with the history excluded; items not retrieved rank last).
  * ``unquantized``: the same trained network fed continuous query tokens (no codes).

Writes ``results/sparcode.md`` and ``results/sparcode.json``.

    python benchmarks/sparcode.py
    python benchmarks/sparcode.py --models sparcode --minutes sparcode=45
    python benchmarks/sparcode.py --models sparcode --output sparcode_sparsity0.03 \
        --sparcode-set model.options.sparsity_weight=0.03 --minutes sparcode=25
    python benchmarks/sparcode.py --models sparcode --output sparcode_continued \
        --sparcode-set train.warm_start=benchmarks/runs/sparcode-sparcode --minutes sparcode=30
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import (  # noqa: E402
    RESULTS_DIR, add_seed_and_merge_arguments, default_data_dir, header, markdown_header, merge_rows, model_name,
    seeded_run_dir, training_budgets, training_overrides, write_results,
)

import tensorflow as tf  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.bench.paired import paired_table, save_ranks  # noqa: E402
from tfx_xmatch.bench.serving_paths import brute_force_ranks, evaluate_path, serving_path  # noqa: E402
from tfx_xmatch.config import load_config  # noqa: E402
from tfx_xmatch.evaluation import compare_metrics, evaluate_full_ranking, is_tail_target  # noqa: E402

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
MODELS = {
    "two_tower_sasrec": CONFIGS_DIR / "ml1m_sasrec.yaml",
    "sparcode": CONFIGS_DIR / "ml1m_sparcode.yaml",
    "sparcode_all_to_all": CONFIGS_DIR / "ml1m_sparcode_all_to_all.yaml",
}
# The two-tower run is shared with quality.py (same config, same overrides).
RUN_NAMES = {"two_tower_sasrec": "quality-two_tower_sasrec"}
DEFAULT_MINUTES = {"two_tower_sasrec": 70.0, "sparcode": 50.0, "sparcode_all_to_all": 30.0}
CACHE_FRACTIONS = (1.0, 0.1, 0.01)
REPORTED = ("HR@10", "NDCG@10", "Recall@50", "P@50", "NDCG@50", "TailRecall@50", "Coverage@50")
COMPARED = ("HR@10", "NDCG@10", "Recall@50")
# A re-run of a model replaces all of its rows of that seed.
ROW_KEY = ("model", "train_seed")
UNQUANTIZED = "unquantized"


def evaluate_with(score_fn, split, config):
    """(test metrics, per-user target ranks) of a full-ranking score function."""
    return evaluate_full_ranking(
        score_fn, split.test, num_items=split.num_items, max_length=config.model.max_length,
        batch_size=config.eval.batch_size, ks=tuple(config.eval.ks), mask_history=config.eval.mask_history,
        item_popularity=split.item_popularity(), return_ranks=True,
    )


def sparcode_rows(run_dir: pathlib.Path, split, config, base: dict, reference=None) -> list[dict]:
    """Index rows for each cache budget, the unquantized row and, when the encoder has its own
    loss, the encoder alone (the code path switched off: the two-tower inside SparCode).

    Every row's per-user ranks are saved under ``run_dir``; each row is compared on the same test
    users with the two-tower's ``reference`` ranks (when given) and with the encoder alone.
    """
    model = training.load_model(run_dir / "model")
    evaluated, extra = {}, {}
    for fraction in CACHE_FRACTIONS:
        # Answers like a served export: top-100 with the whole history excluded.
        path = serving_path(model, split.num_items, {"kind": "sparse_code", "cache_fraction": fraction})
        index = path.index
        evaluated[f"cache={fraction:.0%}"] = evaluate_path(path, model, split, config, return_ranks=True), path.label
        lengths = index.posting_list_lengths()
        extra[f"cache={fraction:.0%}"] = {
            "index_entries": int(lengths.sum()), "mean_posting_list": round(float(lengths.mean()), 1),
            "positive_entries": int(index.num_positive_entries), "index_bytes": int(index.memory_bytes()),
            "index_build_seconds": round(path.build_seconds, 2), "is_exact": bool(index.is_exact())}
    unquantized = tf.function(model.score_all_unquantized, reduce_retracing=True)
    evaluated[UNQUANTIZED] = evaluate_with(
        lambda histories, user_rows: unquantized(training.model_inputs(model, split.dataset, histories, user_rows)),
        split, config), UNQUANTIZED
    encoder = None
    if model.encoder_loss_weight > 0:
        encoder = "encoder alone (codes off)"
        path = serving_path(model, split.num_items, {"kind": "brute_force", "backbone_only": True, "label": encoder})
        evaluated[encoder] = evaluate_path(path, model, split, config, return_ranks=True), path.label
    is_tail = is_tail_target(split.test.targets, split.item_popularity())
    rows = []
    for variant, ((metrics, ranks), label) in evaluated.items():
        save_ranks(run_dir, label, ranks, split.test.targets, config)
        # The unquantized row scores every item, where a re-consumed target still ranks; the
        # other rows search with the whole history excluded. Only searches are paired.
        searched, paired = variant != UNQUANTIZED, {}
        if searched and reference is not None:
            paired["vs_two_tower"] = compare_metrics(ranks, reference, COMPARED, is_tail)
        if searched and encoder is not None and variant != encoder:
            paired["vs_encoder"] = compare_metrics(ranks, evaluated[encoder][0][1], COMPARED, is_tail)
        rows.append({**base, "variant": variant, **_reported(metrics), **extra.get(variant, {}), **paired})
        print({k: v for k, v in rows[-1].items() if k not in ("settings", "vs_two_tower", "vs_encoder")}, flush=True)
    return rows


def _reported(metrics: dict) -> dict:
    return {key: round(metrics[key], 4) for key in REPORTED}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--minutes", action="append", default=[], metavar="MODEL=MINUTES",
                        help=f"training-time budget of a model (default {DEFAULT_MINUTES})")
    parser.add_argument("--sparcode-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for the SparCode model only (repeatable); use with --output")
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--output", default="sparcode", help="results file stem under benchmarks/results/")
    add_seed_and_merge_arguments(parser, "SparCode", "model and seed")
    args = parser.parse_args()

    budgets = training_budgets(parser, args.minutes, DEFAULT_MINUTES)  # a bad flag is refused, data or not
    dataset_dir = pathlib.Path(args.data_dir)
    if not (dataset_dir / "ml-1m").is_dir():
        print(f"skipped: dataset 'ml-1m' not found under {dataset_dir}", file=sys.stderr)
        return 0
    result = header("sparcode")
    result["rows"] = []
    split = None
    for name in args.models:
        overrides = [*training_overrides("ml-1m", dataset_dir, args.epochs, args.patience, budgets[name]),
                     f"train.seed={args.train_seed}"]
        config = load_config(MODELS[name], overrides + (args.sparcode_set if name == "sparcode" else []))
        split = split or training.prepare_split(config)
        run_dir = seeded_run_dir(args.runs_dir, RUN_NAMES.get(name, f"{args.output}-{name}"), args.train_seed)
        metrics = training.train(config, run_dir, split=split)
        base = {"dataset": "ml-1m", "split": "leave_one_out", "model": name, "train_seed": args.train_seed,
                "train_seconds": metrics["train_seconds"], "epochs": metrics["epochs"],
                "best_epoch": metrics["best_epoch"], "val_NDCG@10": round(metrics["validation"]["NDCG@10"], 4),
                "settings": config.to_dict()["model"]}
        if config.train.warm_start:  # its epochs continue that run's: say so beside them
            base["warm_start"] = config.train.warm_start
        if name == "sparcode":
            two_tower_config = load_config(MODELS["two_tower_sasrec"], overrides)
            two_tower_run = seeded_run_dir(args.runs_dir, RUN_NAMES["two_tower_sasrec"], args.train_seed)
            reference = brute_force_ranks(two_tower_run, split, two_tower_config)
            result["rows"] += sparcode_rows(run_dir, split, config, base, reference)
        else:
            # Its per-user ranks too, so seed_study.py can compare SparCode with every two-tower run.
            brute_force_ranks(run_dir, split, config)
            result["rows"].append({**base, "variant": "exact", **_reported(metrics["test"])})
            print({k: v for k, v in result["rows"][-1].items() if k != "settings"}, flush=True)
        written = (merge_rows(result, RESULTS_DIR / f"{args.output}.json", ROW_KEY, {"train_seed": 0})
                   if args.merge else result)
        write_results(written, args.output, to_markdown)
    return 0


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "SparCode vs two-tower vs all-to-all on ML-1M, full ranking") + [
        "- protocol: leave-one-out (last item test, second-to-last validation), full ranking over all "
        "3,416 items, history removed, model selected on validation NDCG@10; SparCode `cache=` rows "
        "answer through the SparseCodeIndex (top-100, the whole history excluded) holding that fraction of all "
        "(code, item) scores",
        "",
        "| model | variant | " + " | ".join(REPORTED) + " | epochs (best) | train s | index entries |",
        "|" + "---|" * (len(REPORTED) + 5),
    ]
    for row in result["rows"]:
        metrics = " | ".join(f"{row[key]:.4f}" for key in REPORTED)
        entries = row.get("index_entries", "")
        lines.append(f"| {model_name(row)} | {row['variant']} | {metrics} | {row['epochs']} ({row['best_epoch']}) | "
                     f"{row['train_seconds']:.0f} | {entries} |")
    table = paired_table([{**row, "model": model_name(row)} for row in result["rows"]], ("model", "variant"),
                         {"vs_two_tower": "two-tower (same seed)", "vs_encoder": "its own encoder alone"}, COMPARED)
    lines += [""] + table if table else []
    lines += ["", "Settings per model:", ""]
    for row in {model_name(r): r for r in result["rows"]}.values():
        lines.append(f"- {model_name(row)}: `{row['settings']}`")
        serving_cache = row["settings"].get("options", {}).get("serving_cache_fraction")
        if serving_cache is not None:
            lines.append(f"  - selected on validation NDCG@10 through a {serving_cache:.0%} cache (`serving_cache_fraction`), "
                         "the path a served index of that budget answers, not through the whole table")
        if row.get("warm_start"):
            lines.append(f"  - warm-started from `{row['warm_start']}`: the epochs and train seconds above are the ones "
                         "trained after it, not counting the source run's")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
