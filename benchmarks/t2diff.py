"""T2Diff quality and sampling benchmark on ML-1M (not a test): two-tower vs T2Diff, the
no-drift and no-stop-gradient ablations, and DDPM-50 against DDIM with 5, 10 and 25 steps.

Protocol as ``quality.py`` (full ranking over all items, history removed, selection on
validation NDCG@10, test reported), on the leave-one-out split and on the paper's user-level
split (80/10/10 users; history -> last item). Every model is a shipped config trained within
the same time budget; runs live in ``--runs-dir`` and are reused when finished.

Sampling rows re-evaluate the selected T2Diff with another reverse process: DDPM with all
T = 50 ancestral steps (seeded), and deterministic DDIM (eta = 0) with 5, 10 and 25 steps;
per-user latency is one user per call through ``user_embedding`` + brute-force top-100 (history
excluded, as an export answers), after a warm-up, on this machine, every sampler of a model timed
interleaved user by user. A model with a backbone also gets a row scored by its backbone state
alone (the same weights, branch off).

Every row is also compared with the two-tower of its split on the same test users: the mean
difference of HR@10, MRR@20 and NDCG@10 with a 95% confidence interval and the p-value of a
paired test (``tfx_xmatch.evaluation.paired_difference``). Each path's per-user ranks are kept
in its run directory (``test_ranks/``), so the two-tower's are computed once and reused.

Writes ``results/t2diff.md`` and ``results/t2diff.json``. JSON rows carry DESIGN's ``variant``
(``ddpm-50``, ``ddim-5`` / ``ddim-10`` / ``ddim-25``, ``backbone-alone``) beside the page's
``sampling`` label.

    python benchmarks/t2diff.py
    python benchmarks/t2diff.py --splits leave_one_out --variants t2diff --minutes t2diff=45
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import (  # noqa: E402
    RESULTS_DIR, default_data_dir, header, markdown_header, merge_rows, model_name, training_budgets,
    training_overrides, write_results,
)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.bench.paired import load_ranks, paired_table, save_ranks  # noqa: E402
from tfx_xmatch.bench.serving_paths import per_user_latencies, serving_path  # noqa: E402
from tfx_xmatch.config import load_config  # noqa: E402
from tfx_xmatch.evaluation import compare_metrics, evaluate_full_ranking  # noqa: E402
from tfx_xmatch.models.history_encoding import last_position_state  # noqa: E402

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# Variant -> (config, extra overrides).
VARIANTS = {
    "two_tower_sasrec": (CONFIGS_DIR / "ml1m_sasrec.yaml", []),
    "t2diff": (CONFIGS_DIR / "ml1m_t2diff.yaml", []),
    "t2diff_no_drift": (CONFIGS_DIR / "ml1m_t2diff.yaml", ["model.options.diffuse=raw"]),
    "t2diff_no_stop_gradient": (CONFIGS_DIR / "ml1m_t2diff.yaml", ["model.options.stop_gradient=false"]),
    # Not in the paper's settings: the long history widened to the two-tower's 200-item window
    # (10 + 190), to separate "reads less history" from the model itself.
    "t2diff_long_history": (CONFIGS_DIR / "ml1m_t2diff.yaml", ["model.options.history_length=190"]),
    # Not in the paper either: the session vector read at the x_hat position after self-attention
    # (recency order kept) instead of the mean, with two attention blocks like the two-tower's.
    "t2diff_predicted_pooling": (CONFIGS_DIR / "ml1m_t2diff.yaml", [
        "model.options.session_pooling=predicted", "model.num_blocks=2"]),
    # Both of the above: the predicted pooling reading the two-tower's 200-item window.
    "t2diff_predicted_pooling_long_history": (CONFIGS_DIR / "ml1m_t2diff.yaml", [
        "model.options.session_pooling=predicted", "model.num_blocks=2", "model.options.history_length=190"]),
    # The predicted pooling trained on twice the positions per batch: the two-tower's full softmax
    # learns from every real position (about 13,700 per batch of 128 on ML-1M), T2Diff from 4,096.
    "t2diff_predicted_pooling_more_positions": (CONFIGS_DIR / "ml1m_t2diff.yaml", [
        "model.options.session_pooling=predicted", "model.num_blocks=2", "model.max_loss_positions=8192"]),
    # The two-tower's SASRec encoder as a backbone: the user vector is its state plus the projected
    # mixed-attention vector; the backbone trains on every position (the two-tower's loss), the
    # T2Diff branch on 2,048 sampled positions per batch (to keep an epoch near a minute).
    "t2diff_sasrec_backbone": (CONFIGS_DIR / "ml1m_t2diff.yaml", [
        "model.options.backbone=sasrec", "model.options.session_pooling=predicted", "model.num_blocks=2",
        "model.max_loss_positions=2048"]),
    # The same, with the denoiser also conditioned on the backbone state (stop-gradient): the
    # predicted next item then draws on the whole history, not only the 10-item session.
    "t2diff_sasrec_backbone_conditioned": (CONFIGS_DIR / "ml1m_t2diff.yaml", [
        "model.options.backbone=sasrec", "model.options.session_pooling=predicted", "model.num_blocks=2",
        "model.max_loss_positions=2048", "model.options.condition_on_backbone=true"]),
    # The backbone variant with a detached branch: the branch's retrieval loss trains only the mixed
    # attention and its projection, so the backbone and item table learn the two-tower's loss alone.
    "t2diff_sasrec_backbone_detached": (CONFIGS_DIR / "ml1m_t2diff.yaml", [
        "model.options.backbone=sasrec", "model.options.session_pooling=predicted", "model.num_blocks=2",
        "model.max_loss_positions=2048", "model.options.detach_branch=true"]),
}
DEFAULT_MINUTES = {"two_tower_sasrec": 70.0, "t2diff": 45.0, "t2diff_no_drift": 30.0, "t2diff_no_stop_gradient": 30.0,
                   "t2diff_long_history": 60.0, "t2diff_predicted_pooling": 60.0,
                   "t2diff_predicted_pooling_long_history": 60.0, "t2diff_predicted_pooling_more_positions": 60.0,
                   "t2diff_sasrec_backbone": 85.0, "t2diff_sasrec_backbone_conditioned": 85.0,
                   "t2diff_sasrec_backbone_detached": 85.0}
SPLIT_OVERRIDES = {"leave_one_out": ["data.split=leave_one_out"],
                   "user_level": ["data.split=user_level"]}
KS = (2, 10, 20, 50)
REPORTED = ("HR@2", "MRR@2", "HR@10", "MRR@10", "NDCG@10", "HR@20", "MRR@20")
# A re-run of a model replaces all of its rows (its sampler sweep may differ from the last run's).
ROW_KEY = ("split", "model", "train_seed")
# Variants evaluated with every sampler of SAMPLINGS; the others with their serving default.
SAMPLER_SWEEP_VARIANTS = ("t2diff", "t2diff_predicted_pooling", "t2diff_predicted_pooling_long_history",
                          "t2diff_predicted_pooling_more_positions", "t2diff_sasrec_backbone",
                          "t2diff_sasrec_backbone_conditioned", "t2diff_sasrec_backbone_detached")
SAMPLINGS = (("ddpm", 50), ("ddim", 5), ("ddim", 10), ("ddim", 25))
REFERENCE = ("two_tower_sasrec", "dot product")
COMPARED = ("HR@10", "MRR@20", "NDCG@10")
BACKBONE_ALONE = "backbone alone (branch off)"


def design_variant(sampling: str) -> dict:
    """The row's ``variant`` as DESIGN spells it ("ddpm-50", "ddim-10", "backbone-alone"), from
    its ``sampling`` label; none for the two-tower's dot product."""
    if sampling == REFERENCE[1]:
        return {}
    if sampling == BACKBONE_ALONE:
        return {"variant": "backbone-alone"}
    return {"variant": sampling.split(" ")[0].lower()}


def backbone_state(model, inputs) -> tf.Tensor:
    """A backbone T2Diff's user vector without its branch: the SASRec state after the last item."""
    return last_position_state(model.encode_sequence, inputs)


def evaluate(model, split, config, backbone_only: bool = False, **sampling) -> tuple[dict, np.ndarray]:
    """Test metrics at KS and per-user target ranks with the given sampler settings (T2Diff) or
    the model's own scores; ``backbone_only`` scores with the backbone state alone (the same
    model, branch switched off)."""
    if backbone_only:
        score_all = tf.function(lambda inputs: tf.matmul(backbone_state(model, inputs), model.item_embeddings(),
                                                         transpose_b=True), reduce_retracing=True)
    else:
        score_all = tf.function(lambda inputs: model.score_all(inputs, **sampling), reduce_retracing=True)
    return evaluate_full_ranking(
        lambda histories, rows: score_all(training.model_inputs(model, split.dataset, histories, rows)),
        split.test, num_items=split.num_items, max_length=config.model.max_length,
        batch_size=config.eval.batch_size, ks=KS, mask_history=config.eval.mask_history,
        item_popularity=split.item_popularity(), return_ranks=True,
    )


def run_name(variant: str, split_name: str, prefix: str, train_seed: int = 0) -> str:
    """The run directory's name. The two-tower's does not depend on ``prefix``, so an ablation
    under another ``--output`` reuses (and is compared with) the same two-tower: on leave-one-out
    the one quality.py trained."""
    if variant == REFERENCE[0]:
        name = "quality-two_tower_sasrec" if split_name == "leave_one_out" else f"t2diff-{split_name}-{variant}"
    else:
        name = f"{prefix}-{split_name}-{variant}"
    return name + (f"-seed{train_seed}" if train_seed else "")


def reference_ranks(run_dir: pathlib.Path, split) -> np.ndarray | None:
    """The two-tower's per-user test ranks on this split: saved ones, else computed from its
    trained model (with its own config) and saved; None (with a message) when it was never
    trained here."""
    config = training.load_run_config(run_dir) if (run_dir / "config.json").is_file() else None
    ranks = load_ranks(run_dir, REFERENCE[1], split.test.targets, config)
    if ranks is None and (run_dir / "model").is_dir():
        _, ranks = evaluate(training.load_model(run_dir / "model"), split, config)
        save_ranks(run_dir, REFERENCE[1], ranks, split.test.targets, config)
    if ranks is None:
        print(f"no paired comparison: no two-tower run at {run_dir}", file=sys.stderr)
    return ranks


def latencies(model, split, config, users: int, servings: dict, seed: int) -> dict:
    """p50/p99 ms of one user (batch 1) for each serving path (a label -> ``evaluate``'s keyword
    arguments: a sampler, or ``backbone_only``): user vector + brute-force top-100, history
    excluded, every path timed interleaved user by user (``per_user_latencies``)."""
    paths = {}
    for label, kwargs in servings.items():
        variant = {"kind": "brute_force", **{key: kwargs[key] for key in ("sampler", "steps", "backbone_only")
                                             if key in kwargs}}
        paths[label] = serving_path(model, split.num_items, variant, seed=seed)
    return per_user_latencies(paths, model, split, config, users)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--splits", nargs="+", default=list(SPLIT_OVERRIDES), choices=list(SPLIT_OVERRIDES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--minutes", action="append", default=[], metavar="VARIANT=MINUTES",
                        help=f"training-time budget (default {DEFAULT_MINUTES})")
    parser.add_argument("--latency-users", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the DDPM draws")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="training seed (train.seed) of every variant; a non-zero seed trains its own runs "
                             "(names ending -seed<N>), each T2Diff compared with the two-tower of the same seed")
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--output", default="t2diff", help="results file stem under benchmarks/results/")
    parser.add_argument("--run-prefix", help="name prefix of the T2Diff run directories (default: --output), "
                                             "e.g. to re-evaluate runs trained under another --output")
    parser.add_argument("--merge", action="store_true",
                        help="add the rows to the results already under --output (the rows of a re-run split "
                             "and model replaced) instead of starting the file afresh")
    args = parser.parse_args()

    dataset_dir = pathlib.Path(args.data_dir)
    if not (dataset_dir / "ml-1m").is_dir():
        print(f"skipped: dataset 'ml-1m' not found under {dataset_dir}", file=sys.stderr)
        return 0
    budgets = training_budgets(parser, args.minutes, DEFAULT_MINUTES)
    runs_dir = pathlib.Path(args.runs_dir)
    result = header("t2diff")
    result["rows"] = []
    for split_name in args.splits:
        split = None
        # The two-tower first: every other variant is compared with it.
        for variant in sorted(args.variants, key=lambda name: name != REFERENCE[0]):
            config_path, extra = VARIANTS[variant]
            overrides = [*training_overrides("ml-1m", dataset_dir, args.epochs, args.patience, budgets[variant]),
                         *SPLIT_OVERRIDES[split_name], *extra, f"train.seed={args.train_seed}"]
            config = load_config(config_path, overrides)
            split = split or training.prepare_split(config)
            result["num_items"] = split.num_items
            run_dir = runs_dir / run_name(variant, split_name, args.run_prefix or args.output, args.train_seed)
            metrics = training.train(config, run_dir, split=split)
            model = training.load_model(run_dir / "model")
            base = {"dataset": "ml-1m", "split": split_name, "model": variant, "train_seed": args.train_seed,
                    "train_seconds": metrics["train_seconds"],
                    "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"],
                    "settings": config.to_dict()["model"]}
            servings = {}
            for sampler, steps in (SAMPLINGS if variant in SAMPLER_SWEEP_VARIANTS else ((None, None),)):
                label = "dot product" if sampler is None and variant == "two_tower_sasrec" else (
                    f"{sampler.upper()}-{steps}" if sampler else "DDIM-10 (serving default)")
                servings[label] = {} if sampler is None else {"sampler": sampler, "steps": steps, "seed": args.seed}
            if getattr(model, "backbone", "none") != "none":
                # The in-run ablation: the same trained weights with the branch switched off.
                servings[BACKBONE_ALONE] = {"backbone_only": True}
            tests = {label: evaluate(model, split, config, **kwargs) for label, kwargs in servings.items()}
            for label, (_, ranks) in tests.items():
                save_ranks(run_dir, label, ranks, split.test.targets, config)
            reference = (None if variant == REFERENCE[0] else reference_ranks(
                runs_dir / run_name(REFERENCE[0], split_name, "", args.train_seed), split))
            timings = latencies(model, split, config, args.latency_users, servings, args.seed)
            own_backbone = tests.get(BACKBONE_ALONE, (None, None))[1]
            for label, (test, ranks) in tests.items():
                paired = {} if reference is None else {"vs_two_tower": compare_metrics(ranks, reference, COMPARED)}
                if own_backbone is not None and label != BACKBONE_ALONE:
                    # Does the branch add anything to the weights it sits on? The same model, so
                    # the comparison is free of the seed-to-seed spread of two trainings.
                    paired["vs_backbone"] = compare_metrics(ranks, own_backbone, COMPARED)
                result["rows"].append({**base, **design_variant(label), "sampling": label,
                                       **{k: round(test[k], 4) for k in REPORTED},
                                       "p50_ms": timings[label][0], "p99_ms": timings[label][1], **paired})
                print({k: v for k, v in result["rows"][-1].items() if k != "settings"}, flush=True)
            written = (merge_rows(result, RESULTS_DIR / f"{args.output}.json", ROW_KEY, {"train_seed": 0})
                       if args.merge else result)
            write_results(written, args.output, to_markdown)
    return 0


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "T2Diff vs two-tower on ML-1M, full ranking") + [
        f"- protocol: full ranking over all {result.get('num_items', 0):,} items, history removed, selection on "
        "validation NDCG@10, test "
        "reported; latency = one user per call (user vector + brute-force top-100)",
    ] + [f"- {variant}: `{VARIANTS[variant][0].name}`" + (f" with `{' '.join(VARIANTS[variant][1])}`"
                                                         if VARIANTS[variant][1] else "")
         for variant in dict.fromkeys(row["model"] for row in result["rows"]) if variant in VARIANTS] + [""]
    for split_name in dict.fromkeys(row["split"] for row in result["rows"]):
        lines += [f"## {split_name}", "", "| model | sampling | " + " | ".join(REPORTED)
                  + " | p50 / p99 ms | epochs (best) | train s |", "|" + "---|" * (len(REPORTED) + 5)]
        for row in (r for r in result["rows"] if r["split"] == split_name):
            metrics = " | ".join(f"{row[key]:.4f}" for key in REPORTED)
            lines.append(f"| {model_name(row)} | {row['sampling']} | {metrics} | {row['p50_ms']} / "
                         f"{row['p99_ms']} | {row['epochs']} ({row['best_epoch']}) | "
                         f"{row['train_seconds']:.0f} |")
        lines.append("")
        table = paired_table([{**row, "model": model_name(row)} for row in result["rows"] if row["split"] == split_name],
                             ("model", "sampling"),
                             {"vs_two_tower": "two-tower", "vs_backbone": "its backbone alone"}, COMPARED)
        lines += table + ([""] if table else [])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
