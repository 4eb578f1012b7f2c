"""SPARC quality benchmark on ML-1M and Beauty (not a test): two-tower vs SPARC hard search vs
SPARC soft search with K = 2, 4, 8 interests, plus the latency cost of the K searches.

Same split and protocol as ``quality.py`` (leave-one-out, full ranking over all items, history
removed, selection on validation NDCG@10, test reported). Each model is a shipped config;
training runs live in ``--runs-dir`` and are reused when finished (the ML-1M two-tower run is
the one ``quality.py`` trained), so re-running only re-evaluates.

SPARC rows answer like a served export: the user's top-K interest vectors are searched in a
brute-force index of the item vectors (top-100 each, history excluded) and merged by
``SoftSearchIndex``; items not retrieved rank last. ``hard`` is K = 1 (the most probable
interest). Latency is per user (batch 1) through the same path, encoder included, on this
machine, measured over ``--latency-users`` users after a warm-up, every path of a model timed
interleaved user by user.

Writes ``results/sparc.md`` and ``results/sparc.json``. JSON rows use DESIGN's names: model
``sparc_hard`` (K = 1) or ``sparc_soft`` with variant ``soft-k2`` / ``soft-k4`` / ``soft-k8``,
``sparc`` with ``backbone-alone`` for the encoder alone; ``path`` is the page's label.

    python benchmarks/sparc.py
    python benchmarks/sparc.py --datasets beauty --minutes beauty:sparc=20
    python benchmarks/sparc.py --datasets ml-1m --output sparc_drawn_only \
        --sparc-set model.options.predicted_query_rate=1.0 --minutes ml-1m:sparc=30
    python benchmarks/sparc.py --datasets ml-1m --models sparc --output sparc_mixture \
        --sparc-set model.options.predicted_query_rate=1.0 \
        --sparc-set model.options.mixture_interests=4 --minutes ml-1m:sparc=65

A SPARC trained with ``backbone_loss_weight`` > 0 also gets a row scored by its encoder state
alone (the same weights, interests off).

With ``--models sparc`` the two-tower is not trained; its rows are copied from the recorded
``results/sparc.json`` (same config, split and protocol) and marked so.

Every SPARC row is compared on the same test users with the two-tower (when its run is in
``--runs-dir``) and with SPARC-hard: the mean difference of Recall@50 and TailRecall@50 with a
95% confidence interval and the p-value of a paired test (``paired_difference``). Per-user ranks are kept in each run
directory (``test_ranks/``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import (  # noqa: E402
    RESULTS_DIR, add_seed_and_merge_arguments, default_data_dir, header, markdown_header, merge_rows, model_name,
    read_results, seeded_run_dir, training_budgets, training_overrides, write_results,
)


import numpy as np  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.bench.paired import paired_table, save_ranks  # noqa: E402
from tfx_xmatch.config import load_config  # noqa: E402
from tfx_xmatch.bench.serving_paths import (  # noqa: E402
    RETRIEVED, brute_force_ranks, evaluate_path, per_user_latencies, serving_path,
)
from tfx_xmatch.evaluation import compare_metrics, is_tail_target  # noqa: E402

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIGS = {
    ("ml-1m", "two_tower_sasrec"): CONFIGS_DIR / "ml1m_sasrec.yaml",
    ("ml-1m", "sparc"): CONFIGS_DIR / "ml1m_sparc.yaml",
    ("beauty", "two_tower_sasrec"): CONFIGS_DIR / "beauty_sasrec.yaml",
    ("beauty", "sparc"): CONFIGS_DIR / "beauty_sparc.yaml",
}
# The ML-1M two-tower run is shared with quality.py (same config, same overrides); the Beauty one
# keeps the recorded run's name whatever --output is, so an ablation compares with it.
RUN_NAMES = {("ml-1m", "two_tower_sasrec"): "quality-two_tower_sasrec",
             ("beauty", "two_tower_sasrec"): "sparc-beauty-two_tower_sasrec"}
DEFAULT_MINUTES = {"ml-1m:two_tower_sasrec": 70.0, "ml-1m:sparc": 65.0,
                   "beauty:two_tower_sasrec": 15.0, "beauty:sparc": 15.0}
MODELS = ("two_tower_sasrec", "sparc")
INTERESTS = (1, 2, 4, 8)
REPORTED = ("Recall@50", "NDCG@50", "HR@10", "NDCG@10", "TailRecall@50", "Coverage@50")
COMPARED = ("Recall@50", "TailRecall@50")
HARD = "hard (K=1)"
# A re-run of a model replaces all of its rows of that dataset and seed (a SPARC run's rows are
# sparc_hard, sparc_soft and sparc: one trained model).
ROW_KEY = ("dataset", "trained_model", "train_seed")


def design_identity(path_variant: dict) -> dict:
    """A SPARC row's ``model`` and ``variant`` as DESIGN names them: "sparc_hard", "sparc_soft"
    with "soft-k2" / "soft-k4" / "soft-k8", and "sparc" with "backbone-alone" for its encoder alone."""
    interests = path_variant.get("interests")
    if interests is None:
        return {"model": "sparc", "variant": "backbone-alone"}
    return {"model": "sparc_hard"} if interests == 1 else {"model": "sparc_soft", "variant": f"soft-k{interests}"}


def trained_model(row: dict) -> str:
    """The trained model a row answers with (a SPARC run gives sparc_hard, sparc_soft and sparc rows)."""
    return row.get("trained_model") or ("sparc" if row["model"].startswith("sparc") else row["model"])


def soft_search_rows(run_dir: pathlib.Path, split, config, base: dict, latency_users: int,
                     reference: np.ndarray | None) -> list[dict]:
    """One row per K in INTERESTS (K = 1 is hard search), answered through SoftSearchIndex, each
    compared with SPARC-hard and with the two-tower's ``reference`` ranks (when given)."""
    model = training.load_model(run_dir / "model")
    codes = model.item_codes().numpy()
    perplexity = [round(p, 1) for p in model.rqvae.codebook_perplexity(codes)]
    dead = [round(share, 4) for share in model.rqvae.dead_codewords(codes)]
    paths = [serving_path(model, split.num_items, {"kind": "soft_search", "interests": num_interests})
             for num_interests in INTERESTS]
    if model.backbone_loss_weight > 0:
        # The in-run ablation: the encoder state alone, which the backbone loss trains as a two-tower.
        paths.append(serving_path(model, split.num_items, {"kind": "brute_force", "backbone_only": True}))
    evaluated = {path.label: evaluate_path(path, model, split, config, return_ranks=True) for path in paths}
    for label, (_, ranks) in evaluated.items():
        save_ranks(run_dir, label, ranks, split.test.targets, config)
    is_tail = is_tail_target(split.test.targets, split.item_popularity())
    latencies = per_user_latencies({path.label: path for path in paths}, model, split, config, latency_users)
    rows = []
    for path in paths:
        path_metrics, ranks = evaluated[path.label]
        p50, p99 = latencies[path.label]
        paired = {}
        if path.label != HARD:
            paired["vs_hard"] = compare_metrics(ranks, evaluated[HARD][1], COMPARED, is_tail)
        if reference is not None:
            paired["vs_two_tower"] = compare_metrics(ranks, reference, COMPARED, is_tail)
        rows.append({**base, "trained_model": base.get("trained_model", base["model"]),
                     **design_identity(path.variant), "path": path.label,
                     "interests": path.variant.get("interests", 0), **_reported(path_metrics),
                     "codebook_perplexity": perplexity, "codebook_dead_codes": dead, "p50_ms": p50, "p99_ms": p99,
                     **paired})
        print({k: v for k, v in rows[-1].items() if k != "settings"}, flush=True)
    return rows


def recorded_baseline_rows(dataset: str, train_seed: int = 0) -> list[dict]:
    """The two-tower rows of ``dataset`` and ``train_seed`` in the recorded ``results/sparc.json``
    (none if absent)."""
    path = RESULTS_DIR / "sparc.json"
    if not path.is_file():
        print(f"no recorded two-tower rows: {path} does not exist", file=sys.stderr)
        return []
    rows = [row for row in read_results(path, "sparc")["rows"]
            if row.get("dataset") == dataset and row.get("model") == "two_tower_sasrec"
            and row.get("train_seed", 0) == train_seed]
    label = " (recorded: sparc.json)"
    return [{**row, "path": row["path"] if row["path"].endswith(label) else row["path"] + label} for row in rows]


def _reported(metrics: dict) -> dict:
    return {key: round(metrics[key], 4) for key in REPORTED}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "beauty"], choices=["ml-1m", "beauty"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="models to train and evaluate; a skipped two-tower's rows come from results/sparc.json")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--minutes", action="append", default=[], metavar="DATASET:MODEL=MINUTES",
                        help=f"training-time budget of a model (default {DEFAULT_MINUTES})")
    parser.add_argument("--latency-users", type=int, default=200)
    parser.add_argument("--sparc-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config overrides of the SPARC runs (an ablation; use with --output)")
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--output", default="sparc", help="results file stem under benchmarks/results/")
    add_seed_and_merge_arguments(parser, "SPARC", "dataset, model and seed")
    args = parser.parse_args()

    dataset_dir = pathlib.Path(args.data_dir)
    budgets = training_budgets(parser, args.minutes, DEFAULT_MINUTES)
    result = header("sparc")
    result["rows"] = []
    for dataset in args.datasets:
        if not (dataset_dir / dataset).is_dir():
            print(f"skipped: dataset {dataset!r} not found under {dataset_dir}", file=sys.stderr)
            continue
        split = None
        if "two_tower_sasrec" not in args.models and not args.merge:
            # (Merged into a file, the file's own two-tower rows stay.)
            result["rows"] += recorded_baseline_rows(dataset, args.train_seed)
        # The two-tower first: SPARC rows are compared with it.
        for name in sorted(args.models, key=lambda model: model != "two_tower_sasrec"):
            minutes = budgets[f"{dataset}:{name}"]
            overrides = [*training_overrides(dataset, dataset_dir, args.epochs, args.patience, minutes),
                         f"train.seed={args.train_seed}"]
            config = load_config(CONFIGS[dataset, name], overrides + (args.sparc_set if name == "sparc" else []))
            split = split or training.prepare_split(config)
            run_dir = run_dir_of(args, dataset, name)
            metrics = training.train(config, run_dir, split=split)
            base = {"dataset": dataset, "split": "leave_one_out", "model": name, "trained_model": name,
                    "train_seed": args.train_seed,
                    "train_seconds": metrics["train_seconds"], "epochs": metrics["epochs"],
                    "best_epoch": metrics["best_epoch"], "val_NDCG@10": round(metrics["validation"]["NDCG@10"], 4),
                    "num_items": split.num_items, "settings": config.to_dict()["model"]}
            if name == "sparc":
                two_tower_config = load_config(CONFIGS[dataset, "two_tower_sasrec"], overrides)
                reference = brute_force_ranks(run_dir_of(args, dataset, "two_tower_sasrec"), split, two_tower_config)
                result["rows"] += soft_search_rows(run_dir, split, config, base, args.latency_users, reference)
            else:
                result["rows"].append({**base, "path": "exact", **_reported(metrics["test"])})
                print({k: v for k, v in result["rows"][-1].items() if k != "settings"}, flush=True)
            written = (merge_rows(result, RESULTS_DIR / f"{args.output}.json", ROW_KEY, {"train_seed": 0})
                       if args.merge else result)
            write_results(written, args.output, to_markdown)
    return 0


def run_dir_of(args, dataset: str, name: str) -> pathlib.Path:
    return seeded_run_dir(args.runs_dir, RUN_NAMES.get((dataset, name), f"{args.output}-{dataset}-{name}"),
                          args.train_seed)


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "SPARC soft/hard search vs two-tower, full ranking") + [
        "- protocol: leave-one-out (last item test, second-to-last validation), full ranking over all items, "
        "history removed, model selected on validation NDCG@10 (SPARC: the exact 4-interest mixture), test "
        f"reported. SPARC rows answer through SoftSearchIndex over a brute-force index (top-{RETRIEVED} per "
        "interest, merged); tail = targets outside the 20% most popular items; latency is one user per call, "
        "encoder included",
        "",
    ]
    for dataset in dict.fromkeys(row["dataset"] for row in result["rows"]):
        rows = [row for row in result["rows"] if row["dataset"] == dataset]
        lines += [f"## {dataset} ({rows[0]['num_items']:,} items)", "",
                  "| model | path | " + " | ".join(REPORTED) + " | p50 / p99 ms | epochs (best) | train s |",
                  "|" + "---|" * (len(REPORTED) + 5)]
        for row in rows:
            metrics = " | ".join(f"{row[key]:.4f}" for key in REPORTED)
            latency = f"{row['p50_ms']} / {row['p99_ms']}" if "p50_ms" in row else ""
            lines.append(f"| {model_name(row)} | {row['path']} | {metrics} | {latency} | "
                         f"{row['epochs']} ({row['best_epoch']}) | {row['train_seconds']:.0f} |")
        trained = {id(row): model_name({**row, "model": trained_model(row)}) for row in rows}
        perplexities = {trained[id(row)]: row["codebook_perplexity"] for row in rows if "codebook_perplexity" in row}
        dead = {trained[id(row)]: row["codebook_dead_codes"] for row in rows if "codebook_dead_codes" in row}
        for name, perplexity in perplexities.items():
            lines += ["", f"{name} codebook perplexity per level over the catalogue's codes: {perplexity} "
                          f"(of {rows[-1]['settings']['options'].get('num_codewords', 64)} codewords per level)"
                          + (f"; share of dead codes (used by no item) per level: {dead[name]}" if name in dead else "")]
        table = paired_table([{**row, "model": model_name(row)} for row in rows], ("model", "path"),
                             {"vs_hard": "hard", "vs_two_tower": "two-tower (same seed)"}, COMPARED)
        lines += [""] + table if table else []
        lines.append("")
    lines += ["Settings per model:", ""]
    for row in {(r["dataset"], model_name({**r, "model": trained_model(r)})): r for r in result["rows"]}.values():
        lines.append(f"- {row['dataset']} {model_name({**row, 'model': trained_model(row)})}: `{row['settings']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
