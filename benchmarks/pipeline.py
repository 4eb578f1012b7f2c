"""End-to-end pipeline timing on ML-1M (not a test): ``xmatch pipeline run`` with the shipped
SASRec two-tower config, every Beam stage on the DirectRunner of this machine.

Records the wall time of each stage (prepare, train, build index, export, evaluate, publish),
what each stage produced, and the test metrics the evaluate stage measured through the export.
Training is capped by a time budget so the run fits a session; the quality benchmark
(``quality.py``) is where the converged numbers live.

Writes ``results/pipeline.md`` and ``results/pipeline.json``.

    python benchmarks/pipeline.py --data-dir ../shared/data --train-minutes 10
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import default_data_dir, header, markdown_header, write_results  # noqa: E402

from tfx_xmatch.bench.schema import design_model_name  # noqa: E402
from tfx_xmatch.config import load_config  # noqa: E402
from tfx_xmatch.pipelines.beam_utils import split_arguments  # noqa: E402

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "ml1m_sasrec.yaml"
ROW_METRICS = ("HR@10", "NDCG@10", "MRR@20", "Recall@50", "NDCG@50", "P@50", "TailRecall@50", "Coverage@50")


def pipeline_rows(result: dict) -> list[dict]:
    """The run as DESIGN's one row: the published export's test metrics (full ranking), its
    training and the pipeline's wall time."""
    return [{"dataset": result["dataset_name"], "split": result["split"], "model": result["model"],
             "variant": f"index={result['index_kind']}",
             **{metric: round(result["test"][metric], 4) for metric in ROW_METRICS},
             "train_seconds": result["training"]["train_seconds"], "epochs": result["training"]["epochs"],
             "total_seconds": result["total_seconds"]}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--train-minutes", type=float, default=10.0, help="training time budget")
    parser.add_argument("--index", default="brute_force")
    parser.add_argument("--num-shards", type=int, default=4)
    parser.add_argument("--item-shards", type=int, default=8)
    parser.add_argument("--work-dir", help="keep the run here (default: a temporary directory, removed)")
    parser.add_argument("--output", default="pipeline", help="results file stem under benchmarks/results/")
    # Unknown flags go to Beam, but not a misspelt one of ours (parse_known_args would hand
    # "--trian-minutes 1" to Beam, which drops it with a warning, and train the default budget).
    args, beam_args = split_arguments(parser, sys.argv[1:])

    data_dir = pathlib.Path(args.data_dir)
    if not (data_dir / args.dataset).is_dir():
        print(f"skipped: dataset {args.dataset!r} not found under {data_dir}", file=sys.stderr)
        return 0
    from tfx_xmatch.pipelines.run import run_pipeline

    config = load_config(CONFIG, [f"data.dataset={args.dataset}", f"data.data_dir={data_dir}",
                                  f"train.max_train_seconds={args.train_minutes * 60}", "train.verbose=2"])
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="xmatch-pipeline-"))
    try:
        summary = run_pipeline(config, str(work / "out"), str(work / "models"), index_kind=args.index,
                               num_shards=args.num_shards, item_shards=args.item_shards, beam_args=beam_args)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result = {**header("pipeline"), "dataset_name": args.dataset, "split": config.data.split,
              "model": design_model_name(config), "train_minutes": args.train_minutes,
              "index_kind": args.index, "num_shards": args.num_shards, "item_shards": args.item_shards,
              "beam_args": beam_args or ["--runner=DirectRunner (default)"],
              "index_build": summary["index"],
              **{key: summary[key] for key in ("stage_seconds", "total_seconds", "dataset", "examples",
                                               "malformed_lines", "training", "test")}}
    result["rows"] = pipeline_rows(result)
    write_results(result, args.output, to_markdown, echo=True)
    return 0


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, f"`xmatch pipeline run` end to end on {result['dataset_name']}")
    dataset, training, test = result["dataset"], result["training"], result["test"]
    lines += [
        f"- Beam runner: {' '.join(result['beam_args'])}; {result['num_shards']} TFRecord shards per part, "
        f"{result['item_shards']} item shards for the index build; serving index `{result['index_kind']}`",
        f"- data: {dataset['users']} users, {dataset['items']} items, {dataset['interactions']} interactions; "
        f"examples {result['examples']}; {result['malformed_lines']} malformed line(s)",
        f"- training: SASRec two-tower (`configs/ml1m_sasrec.yaml`) with a {result['train_minutes']:g}-minute "
        f"training budget (validation passes not counted): {training['epochs']} epochs, best {training['best_epoch']}",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {stage} | {seconds:.1f} |" for stage, seconds in result["stage_seconds"].items()],
        f"| **total** | **{result['total_seconds']:.1f}** |",
        "",
        "Test metrics measured by the evaluate stage through the exported SavedModel (full ranking, "
        f"history removed, {int(test['num_examples'])} users):",
        "",
        "| HR@10 | NDCG@10 | MRR@20 | Recall@50 | TailRecall@50 | Coverage@50 |",
        "|---|---|---|---|---|---|",
        "| " + " | ".join(f"{test.get(key, float('nan')):.4f}" for key in
                         ("HR@10", "NDCG@10", "MRR@20", "Recall@50", "TailRecall@50", "Coverage@50")) + " |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
