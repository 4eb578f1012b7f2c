"""Continuous training (not a test): the next run warm-starts from the last served model although
the catalogue changed in between, against training that run from scratch.

The earlier span is what ML-1M held before: the first ``--span-users`` users (ML-1M numbers
users in sign-up order) with the oldest ``--span-fraction`` of each one's ratings, never their
last two (the full data's validation and test targets). Prepared on its own, as a pipeline would
prepare the data it had then, its catalogue lacks the items rated only later and numbers the
others differently. A two-tower SASRec trained on it is exported as a serving SavedModel (what a
TFX Trainer receives as ``base_model``); the run on the full data then warm-starts from that
export, its item rows carried over by item id (``tfx_xmatch.warm_start``), and is compared with
the same run from scratch: validation NDCG@10 per epoch, the epochs and seconds to reach the
scratch run's best, and the selected model's test metrics (full ranking over every item).

The scratch run is the quality benchmark's ``quality-two_tower_sasrec`` (seed 0, the warm-started
run's seed) when it is there, otherwise it is trained here; its other seeds (``-seed1``,
``-seed2``), where they are, are listed too, for the seed-to-seed spread of training from
scratch. The earlier span's run directory keeps the full data's
config (``train`` takes the span as an already prepared split): evaluate it through this script,
not ``xmatch evaluate``. Writes ``results/continuous_training.md`` / ``.json``.

    python benchmarks/continuous_training.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
import common  # noqa: E402
from common import REPO_ROOT, default_data_dir, header, markdown_header, training_overrides, write_results  # noqa: E402

import numpy as np  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.bench.schema import design_model_name  # noqa: E402
from tfx_xmatch.config import load_config  # noqa: E402
from tfx_xmatch.data import make_split  # noqa: E402
from tfx_xmatch.data.dataset import SequenceDataset  # noqa: E402
from tfx_xmatch.data.loaders import vocabulary_from_tokens  # noqa: E402
from tfx_xmatch.export import export_retrieval_model  # noqa: E402

MONITOR = "NDCG@10"
TEST_METRICS = ("HR@10", "NDCG@10", "Recall@50", "TailRecall@50")


def earlier_span(dataset: SequenceDataset, num_users: int, fraction: float) -> SequenceDataset:
    """The first ``num_users`` users' oldest ``fraction`` of interactions, never their last two;
    users left with fewer than 3 are dropped. Items are numbered as the loader numbers the items
    of that data alone, so the vocabulary is the earlier preparation's, not the full data's."""
    rows, sequences = [], []
    for row, sequence in enumerate(dataset.sequences[:num_users]):
        kept = min(int(fraction * len(sequence)), len(sequence) - 2)
        if kept >= 3:
            rows.append(row)
            sequences.append(sequence[:kept])
    raw = [dataset.item_vocab.ids(sequence) for sequence in sequences]
    vocab, _ = vocabulary_from_tokens([str(item_id) for ids in raw for item_id in ids])
    old_rows = np.concatenate([[0], dataset.item_vocab.lookup(vocab.ids(np.arange(1, vocab.num_items + 1)))])
    rows = np.array(rows)
    return dataclasses.replace(
        dataset,
        name=f"{dataset.name} (earlier span)",
        sequences=[vocab.lookup(ids).astype(np.int32) for ids in raw],
        item_vocab=vocab,
        user_ids=np.asarray(dataset.user_ids)[rows],
        timestamps=None if dataset.timestamps is None else [dataset.timestamps[row][:len(sequence)]
                                                            for row, sequence in zip(rows, sequences)],
        item_features={name: table[old_rows] for name, table in dataset.item_features.items()},
        user_features={name: np.asarray(values)[rows] for name, values in dataset.user_features.items()},
        metadata={**dataset.metadata, "earlier_span": {"users": num_users, "fraction": fraction}},
    )


def curve(run_dir: pathlib.Path) -> list[dict]:
    history = json.loads((run_dir / "history.json").read_text(encoding="utf-8"))
    return [{"epoch": row["epoch"], "seconds": round(row["train_seconds"], 1), MONITOR: round(row[f"val_{MONITOR}"], 4)}
            for row in history["epochs"] if f"val_{MONITOR}" in row]


def first_reaching(points: list[dict], level: float) -> Optional[dict]:
    return next((point for point in points if point[MONITOR] >= level), None)


def run_row(name: str, run_dir: pathlib.Path, metrics: dict) -> dict:
    config = training.load_run_config(run_dir)
    return {"dataset": config.data.dataset, "split": config.data.split, "model": design_model_name(config),
            "run": name, "run_dir": run_dir.name, "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"],
            "train_seconds": round(metrics["train_seconds"], 1),
            "validation": round(metrics["validation"][MONITOR], 4),
            "test": {key: round(metrics["test"][key], 4) for key in TEST_METRICS}, "curve": curve(run_dir)}


def measure(config, runs: pathlib.Path, scratch_dirs: list[pathlib.Path], span_users: int, span_fraction: float,
            span_minutes: float, output: str) -> Optional[dict]:
    """Trains (or reuses) the earlier span's run, the first scratch run and the warm-started run,
    and returns the result; None when the data is absent. The other scratch runs are read where
    they are finished, and must differ from ``config`` in their seed only."""
    split = common.run_split(config)
    if split is None:
        return None
    span = earlier_span(split.dataset, span_users, span_fraction)
    span_split = make_split(span, config.data.split, **config.data.split_options)
    span_dir = runs / f"{output}-earlier_span"
    span_config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, max_train_seconds=span_minutes * 60))
    span_metrics = training.train(span_config, span_dir, split=span_split)
    served = span_dir / "serving" / "1"
    if not served.exists():
        export_retrieval_model(training.load_model(span_dir / "model"), span.item_vocab, span_dir / "serving",
                               version=1)
    first = training.train(config, scratch_dirs[0], split=split)
    scratch = [run_row("full data, from scratch", scratch_dirs[0], first)]
    for other in scratch_dirs[1:]:
        if not (other / "metrics.json").exists():
            print(f"skipped: no finished run at {other}", file=sys.stderr)
            continue
        other_config = training.load_run_config(other)
        seeded = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=other_config.train.seed))
        if other_config != seeded:
            raise ValueError(f"{other} is not {scratch_dirs[0].name} with another seed: its config differs in more")
        scratch.append(run_row(f"full data, from scratch, seed {other_config.train.seed}", other,
                               training.train(other_config, other, split=split)))
    warm_config = dataclasses.replace(config, train=dataclasses.replace(config.train, warm_start=str(served)))
    warm_dir = runs / f"{output}-warm_started"
    warm = training.train(warm_config, warm_dir, split=split)

    span_ids = span.item_vocab.ids(np.arange(1, span.num_items + 1))
    full_indices = split.dataset.item_vocab.lookup(span_ids)
    result = header("continuous_training")
    result.update(
        span={"users": span.num_users, "interactions": span.num_interactions, "items": span.num_items,
              "span_users": span_users, "span_fraction": span_fraction},
        full={"users": split.dataset.num_users, "interactions": split.dataset.num_interactions,
              "items": split.num_items},
        new_items=split.num_items - span.num_items,
        renumbered_items=int(np.sum(full_indices != np.arange(1, span.num_items + 1))),
        earlier=run_row("earlier span, from scratch", span_dir, span_metrics),
        rows=[scratch[0], run_row("full data, warm-started from the earlier span's export", warm_dir, warm),
              *scratch[1:]],
        settings={key: config.to_dict()[key] for key in ("model", "train")},
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--span-users", type=int, default=3000, help="users of the earlier span (the first ones)")
    parser.add_argument("--span-fraction", type=float, default=0.5,
                        help="oldest fraction of each of their interactions in the earlier span")
    parser.add_argument("--span-minutes", type=float, default=15.0, help="training budget on the earlier span")
    parser.add_argument("--minutes", type=float, default=70.0,
                        help="training budget of each run on the full data (when the scratch run is trained here)")
    parser.add_argument("--scratch-runs", nargs="+",
                        default=["quality-two_tower_sasrec", "quality-two_tower_sasrec-seed1",
                                 "quality-two_tower_sasrec-seed2"],
                        help="run directories (under --runs-dir) of runs from scratch: the first is the "
                             "comparison (its config is reused when it is there, else it is trained here), the "
                             "others, where finished, other seeds of it")
    parser.add_argument("--output", default="continuous_training")
    args = parser.parse_args()
    if args.span_users < 1 or not 0 < args.span_fraction <= 1:
        parser.error(f"--span-users must be at least 1 and --span-fraction in (0, 1]; got {args.span_users}, "
                     f"{args.span_fraction}")
    runs = pathlib.Path(args.runs_dir)
    scratch_dirs = [runs / name for name in args.scratch_runs]
    if (scratch_dirs[0] / "config.json").exists():
        config = training.load_run_config(scratch_dirs[0])
    else:
        config = load_config(REPO_ROOT / "configs" / "ml1m_sasrec.yaml",
                             training_overrides("ml-1m", args.data_dir, 200, 10, args.minutes))
    result = measure(config, runs, scratch_dirs, args.span_users, args.span_fraction, args.span_minutes, args.output)
    if result is None:
        print("skipped: no data; nothing written", file=sys.stderr)
        return 0
    write_results(result, args.output, to_markdown, echo=True)
    return 0


def to_markdown(result: dict) -> str:
    span, full = result["span"], result["full"]
    lines = markdown_header(result, "warm start across a changed catalogue against training from scratch") + [
        f"- earlier span: the first {span['span_users']:,} users, the oldest {span['span_fraction']:g} of each one's "
        f"interactions but never the last two: {span['users']:,} users, {span['interactions']:,} interactions, "
        f"{span['items']:,} items",
        f"- full data: {full['users']:,} users, {full['interactions']:,} interactions, {full['items']:,} items, "
        "of which "
        f"{result['new_items']:,} new since the earlier span and {result['renumbered_items']:,} of the known ones at "
        "another index",
        f"- protocol: leave-one-out on the full data, full ranking over all {full['items']:,} items (history removed), "
        f"model selected on validation {MONITOR}, early stopping as configured; the warm-started run begins from the "
        "earlier span's serving SavedModel (item rows carried over by item id, a fresh Adam)",
        f"- earlier span's own run: {result['earlier']['epochs']} epochs (best {result['earlier']['best_epoch']}), "
        f"{result['earlier']['train_seconds']:,.0f} s, validation {MONITOR} {result['earlier']['validation']} "
        "(on its own split)",
        "",
    ]
    scratch_best = result["rows"][0]["validation"]
    lines += [
        f"| run | epochs (best) | train s | validation {MONITOR} | epoch 1 | reaches 99% of scratch's best "
        f"({0.99 * scratch_best:.4f}) at | " + " | ".join(f"test {key}" for key in TEST_METRICS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(TEST_METRICS),
    ]
    for row in result["rows"]:
        reached = first_reaching(row["curve"], 0.99 * scratch_best)
        when = "never" if reached is None else f"epoch {reached['epoch']}, {reached['seconds']:,.0f} s"
        lines.append(f"| {row['run']} | {row['epochs']} ({row['best_epoch']}) | {row['train_seconds']:,.0f} | "
                     f"{row['validation']} | {row['curve'][0][MONITOR]} | {when} | "
                     + " | ".join(str(row["test"][key]) for key in TEST_METRICS) + " |")
    lines += ["", f"Validation {MONITOR} by epoch (every fifth):", "",
              "| epoch | " + " | ".join(row["run"] for row in result["rows"]) + " |",
              "|---|" + "---|" * len(result["rows"])]
    longest = max(len(row["curve"]) for row in result["rows"])
    for index in sorted({*range(0, longest, 5), longest - 1}):
        cells = [str(row["curve"][index][MONITOR]) if index < len(row["curve"]) else "" for row in result["rows"]]
        lines.append(f"| {index + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
