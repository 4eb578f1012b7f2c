"""Time of one full-ranking evaluation pass (not a test): the item side computed once per pass
(``training.pass_scorer``, what validation, model selection and the test report use) against
once per batch (calling ``model.score_all`` on every batch, as before).

For SparCode the item side is the code-item table: every code against every item through the
interaction network, plus, with ``serving_cache_fraction``, a top-k over the whole table. Both
ways must rank identically, so the metrics of the two passes are compared too.

Each run's pass is timed ``--repeats`` times each way, interleaved, after one untimed pass each
(tracing). Writes ``results/evaluation_pass.md`` and ``results/evaluation_pass.json``.

    python benchmarks/evaluation_pass.py
    python benchmarks/evaluation_pass.py --runs sparcode_chunks_served1pct-sparcode --which test
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import header, load_finished_run, markdown_header, write_results  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.bench.schema import design_model_name  # noqa: E402
from tfx_xmatch.evaluation import evaluate_full_ranking  # noqa: E402

DEFAULT_RUNS = ("sparcode_chunks_served1pct-sparcode", "sparcode_chunks_continued-sparcode", "quality-two_tower_sasrec")


def per_batch_evaluation(score_all, model, split, config, which: str) -> dict:
    """The pass as it ran before ``pass_scorer``: ``score_all`` (a ``tf.function`` of the
    model's, made once) does all its work on every batch."""
    return evaluate_full_ranking(
        lambda histories, rows: score_all(training.model_inputs(model, split.dataset, histories, rows)),
        getattr(split, which), num_items=split.num_items, max_length=config.model.max_length,
        batch_size=config.eval.batch_size, ks=tuple(config.eval.ks), mask_history=config.eval.mask_history,
        item_popularity=split.item_popularity())


def timed(evaluate) -> tuple[float, dict]:
    start = time.perf_counter()
    metrics = evaluate()
    return time.perf_counter() - start, metrics


def measure(run_dir: pathlib.Path, which: str, repeats: int) -> Optional[dict]:
    """One run's row: its pass timed ``repeats`` times each way; None (printed as skipped) when
    the run or its data is absent."""
    loaded = load_finished_run(run_dir)
    if loaded is None:
        return None
    config, split, model = loaded
    score_all = tf.function(model.score_all, reduce_retracing=True)
    ways = {"per batch": lambda: per_batch_evaluation(score_all, model, split, config, which),
            "per pass": lambda: training.evaluate(model, split, which, config)}
    metrics = {way: evaluate() for way, evaluate in ways.items()}  # untimed: traces both
    seconds = {way: [] for way in ways}
    for _ in range(repeats):
        for way, evaluate in ways.items():
            spent, metrics[way] = timed(evaluate)
            seconds[way].append(spent)
    differences = [abs(metrics["per batch"][key] - value) for key, value in metrics["per pass"].items()
                   if isinstance(value, float)]
    return {
        "dataset": config.data.dataset, "split": config.data.split, "model": design_model_name(config),
        "run": run_dir.name, "users": len(getattr(split, which).targets),
        "batch_size": config.eval.batch_size,
        "serving_cache_fraction": config.model.options.get("serving_cache_fraction"),
        "per_batch_s": [round(s, 3) for s in seconds["per batch"]],
        "per_pass_s": [round(s, 3) for s in seconds["per pass"]],
        "NDCG@10": round(metrics["per pass"]["NDCG@10"], 4),
        "max_metric_difference": float(max(differences, default=0.0)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                        help="finished run directories under --runs-dir (absent ones are skipped)")
    parser.add_argument("--which", choices=("validation", "test"), default="validation")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes each way")
    parser.add_argument("--output", default="evaluation_pass")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    rows = [row for name in args.runs
            if (row := measure(pathlib.Path(args.runs_dir) / name, args.which, args.repeats)) is not None]
    if not rows:
        print("skipped: none of the runs is here; nothing written", file=sys.stderr)
        return 0
    result = header("evaluation_pass")
    result.update(which=args.which, repeats=args.repeats, rows=rows)
    write_results(result, args.output, to_markdown, echo=True)
    return 0


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "one full-ranking evaluation pass, item side per batch against per pass") + [
        f"- pass: every {result['which']} user ranked against every item (history removed), "
        f"{result['repeats']} timed passes each way, interleaved, after one untimed pass each",
        "",
        "| run | model | users (batch) | serving cache | per batch s (median) | per pass s (median) | speed-up | "
        "NDCG@10 | largest metric difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        before, after = float(np.median(row["per_batch_s"])), float(np.median(row["per_pass_s"]))
        cache = "none" if row["serving_cache_fraction"] is None else f"{row['serving_cache_fraction']:g}"
        lines.append(f"| {row['run']} | {row['model']} | {row['users']:,} ({row['batch_size']}) | {cache} | "
                     f"{before:.2f} | {after:.2f} | {before / after:.1f}× | {row['NDCG@10']} | "
                     f"{row['max_metric_difference']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
