"""T2Diff serving latency with the user side compiled by XLA (not a test).

A trained T2Diff run (by default the detached SASRec-backbone run of ``t2diff.py``) answers one
user per call through its user side + brute-force top-100, history excluded, for DDPM-50,
DDIM-10 and its backbone alone, each as a plain TensorFlow graph and compiled with XLA
(``jit_compile``, what ``export_retrieval_model(jit_compile=True)`` and ``xmatch export
--jit-compile`` bake into the SavedModel). Every path is timed interleaved user by user
(``per_user_latencies``). XLA must not change the answers, so each compiled path is also
scored over the whole test set (full ranking, as ``t2diff.py``) and compared user by user with
its plain path.

Writes ``results/t2diff_xla.md`` and ``results/t2diff_xla.json``.

    python benchmarks/t2diff_xla.py
    python benchmarks/t2diff_xla.py --run t2diff-leave_one_out-t2diff --users 300
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import header, load_finished_run, markdown_header, write_results  # noqa: E402

import numpy as np  # noqa: E402

from tfx_xmatch.bench.schema import design_model_name  # noqa: E402
from tfx_xmatch.bench.serving_paths import evaluate_path, per_user_latencies, serving_path  # noqa: E402

DEFAULT_RUN = "t2diff-leave_one_out-t2diff_sasrec_backbone_detached"
SERVINGS = {"DDPM-50": {"sampler": "ddpm", "steps": 50}, "DDIM-10": {"sampler": "ddim", "steps": 10}}
BACKBONE = "backbone alone"
REPORTED = ("HR@10", "MRR@20", "NDCG@10")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--run", default=DEFAULT_RUN, help="a finished T2Diff run directory under --runs-dir")
    parser.add_argument("--users", type=int, default=200, help="test users timed, one per call")
    parser.add_argument("--seed", type=int, default=0, help="seed of DDPM's draws")
    parser.add_argument("--output", default="t2diff_xla")
    args = parser.parse_args()
    loaded = load_finished_run(pathlib.Path(args.runs_dir) / args.run, "benchmarks/t2diff.py")
    if loaded is None:
        return 0
    config, split, model = loaded
    if type(model).__name__ != "T2Diff":
        parser.error(f"--run {args.run!r} is a {type(model).__name__} run, not a T2Diff one")
    servings = dict(SERVINGS)
    if getattr(model, "backbone", "none") != "none":
        servings[BACKBONE] = {"backbone_only": True}
    paths = {}
    for label, variant in servings.items():
        for jit in (False, True):
            paths[(label, jit)] = serving_path(model, split.num_items, {"kind": "brute_force", **variant,
                                                                        "jit_compile": jit}, seed=args.seed)
    by_name = {path.label: key for key, path in paths.items()}
    timings = per_user_latencies({path.label: path for path in paths.values()}, model, split, config, args.users)
    timed = {by_name[name]: value for name, value in timings.items()}

    result = header("t2diff_xla")
    result.update(run=args.run, users_timed=args.users, num_items=split.num_items,
                  test_users=len(split.test.targets), rows=[])
    for label in servings:
        metrics, ranks = {}, {}
        for jit in (False, True):
            metrics[jit], ranks[jit] = evaluate_path(paths[(label, jit)], model, split, config, return_ranks=True)
        result["rows"].append({
            "dataset": config.data.dataset, "split": config.data.split, "model": design_model_name(config), "path": label,
            "graph_p50_ms": timed[(label, False)][0], "graph_p99_ms": timed[(label, False)][1],
            "xla_p50_ms": timed[(label, True)][0], "xla_p99_ms": timed[(label, True)][1],
            **{f"graph_{key}": round(metrics[False][key], 4) for key in REPORTED},
            **{f"xla_{key}": round(metrics[True][key], 4) for key in REPORTED},
            "users_same_rank": float(np.mean(ranks[False] == ranks[True])),
        })
    write_results(result, args.output, to_markdown, echo=True)
    return 0


def to_markdown(result: dict) -> str:
    rows = {row["path"]: row for row in result["rows"]}
    lines = markdown_header(result, "T2Diff serving latency, plain graph against XLA-compiled user side") + [
        f"- run: `{result['run']}`; {result['users_timed']} test users timed one per call (user side + "
        f"brute-force top-100 over {result['num_items']:,} items, history excluded), every path interleaved "
        f"user by user; quality over all {result['test_users']:,} test users, full ranking",
        "",
        "| path | graph p50 / p99 ms | XLA p50 / p99 ms | XLA speed-up (p50) | graph HR@10 / MRR@20 | "
        "XLA HR@10 / MRR@20 | users with the same target rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        lines.append(
            f"| {label} | {row['graph_p50_ms']} / {row['graph_p99_ms']} | {row['xla_p50_ms']} / {row['xla_p99_ms']} | "
            f"{row['graph_p50_ms'] / row['xla_p50_ms']:.2f}× | {row['graph_HR@10']} / {row['graph_MRR@20']} | "
            f"{row['xla_HR@10']} / {row['xla_MRR@20']} | {row['users_same_rank']:.4f} |")
    if {"DDPM-50", "DDIM-10"} <= set(rows):
        ddpm, ddim = rows["DDPM-50"], rows["DDIM-10"]
        lines += ["", "DDIM-10 against DDPM-50, p50: "
                  f"{ddpm['graph_p50_ms'] / ddim['graph_p50_ms']:.2f}× faster as a graph, "
                  f"{ddpm['xla_p50_ms'] / ddim['xla_p50_ms']:.2f}× with XLA; XLA DDIM-10 against graph DDPM-50: "
                  f"{ddpm['graph_p50_ms'] / ddim['xla_p50_ms']:.2f}×."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
