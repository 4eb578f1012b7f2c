"""T2Diff as a SavedModel: export time, size, load time, first answer and latency (not a test).

For DDPM (all of the model's T steps, 50 in the ML-1M configs) and DDIM-10, each exported as a
plain graph and with an XLA-compiled user side (``export_retrieval_model(jit_compile=...)``,
top_k up to k = 100, over the whole catalogue), this process measures: seconds to export; MiB
on disk; seconds to load (``tf.saved_model.load``); seconds of the first request (one user:
XLA compiles there); and p50/p99 ms of single-user requests to the loaded ``top_k`` signature
(k = 100, the test users' histories), every export timed interleaved request by request so a
drift in the machine's speed hits them alike.

The model: a finished run's (``--run`` under ``--runs-dir``) when there is one; otherwise the
model of a ``t2diff.py`` variant (``--variant``, default the detached SASRec-backbone one) on
ML-1M as initialised, since export time, size and latency depend on the architecture and the
catalogue, not on the weights. Skips cleanly without ML-1M.

Writes ``results/t2diff_export.md`` and ``results/t2diff_export.json``.

    python benchmarks/t2diff_export.py
    python benchmarks/t2diff_export.py --variant t2diff --requests 300
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import (default_data_dir, header, load_finished_run, markdown_header, run_split,  # noqa: E402
                    training_overrides, write_results)
from t2diff import VARIANTS  # noqa: E402

import numpy as np  # noqa: E402

from tfx_xmatch.bench.schema import design_model_name  # noqa: E402

DDIM_STEPS = 10
K = 100
WARMUP_REQUESTS = 10  # per export, untimed


def _model(args):
    """(config, split, model, where the weights come from), or None when the data is absent."""
    from tfx_xmatch import training
    from tfx_xmatch.config import load_config

    run_dir = pathlib.Path(args.runs_dir) / args.run
    if (run_dir / "model").is_dir():
        loaded = load_finished_run(run_dir, "benchmarks/t2diff.py")
        return None if loaded is None else (*loaded, f"run `{args.run}`")
    config_path, extra = VARIANTS[args.variant]
    config = load_config(config_path, [*training_overrides("ml-1m", args.data_dir, 1, 1, 1.0), *extra])
    split = run_split(config)
    if split is None:
        return None
    model = training.build_model(config, split.dataset)
    histories = np.zeros((1, config.model.max_length), np.int64)
    model(training.model_inputs(model, split.dataset, histories, split.test.user_rows[:1]))
    return config, split, model, f"variant `{args.variant}` as initialised (no run at {run_dir})"


def _directory_mib(path: pathlib.Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=pathlib.Path, default=default_data_dir())
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--run", default="t2diff-leave_one_out-t2diff_sasrec_backbone_detached",
                        help="a finished T2Diff run under --runs-dir; without one, --variant as initialised")
    parser.add_argument("--variant", default="t2diff_sasrec_backbone_detached",
                        choices=[name for name in VARIANTS if name.startswith("t2diff")])
    parser.add_argument("--requests", type=int, default=200, help="single-user requests timed per export")
    parser.add_argument("--output", default="t2diff_export")
    args = parser.parse_args()
    if args.requests <= WARMUP_REQUESTS:
        parser.error(f"--requests must be more than the {WARMUP_REQUESTS} untimed warm-up requests, "
                     f"got {args.requests}")
    if not (args.data_dir / "ml-1m").is_dir():
        print(f"skipped: dataset 'ml-1m' not found under {args.data_dir}", file=sys.stderr)
        return 0
    loaded = _model(args)
    if loaded is None:
        return 0
    config, split, model, weights = loaded

    import tensorflow as tf

    from tfx_xmatch.data.dataset import pad_histories
    from tfx_xmatch.export import export_retrieval_model

    vocab = split.dataset.item_vocab
    padded = pad_histories(list(split.test.histories[:args.requests]), config.model.max_length)
    requests = [tf.constant(np.where(row > 0, vocab.ids(np.maximum(row, 1)), 0)[np.newaxis].astype(np.int64))
                for row in padded]
    rows, signatures = [], {}
    staging = pathlib.Path(tempfile.mkdtemp(prefix="t2diff_export-"))
    try:
        # The export serves the model's own sampler settings.
        for label, sampler in ((f"DDPM-{model.diffusion_steps}", "ddpm"), (f"DDIM-{DDIM_STEPS}", "ddim")):
            model.sampler, model.sampling_steps = sampler, (DDIM_STEPS if sampler == "ddim" else model.sampling_steps)
            for jit in (False, True):
                started = time.perf_counter()
                path = export_retrieval_model(model, vocab, staging / f"{sampler}-{jit}", k_max=K, jit_compile=jit)
                exported = time.perf_counter() - started
                started = time.perf_counter()
                signature = tf.saved_model.load(str(path)).signatures["top_k"]
                load_seconds = time.perf_counter() - started
                started = time.perf_counter()
                signature(history=requests[0], k=tf.constant(K))["item_ids"].numpy()
                first = time.perf_counter() - started
                signatures[(label, jit)] = signature
                rows.append({"dataset": config.data.dataset, "split": config.data.split,
                             "model": design_model_name(config), "sampling": label, "xla": jit,
                             "export_s": round(exported, 2), "saved_model_mib": round(_directory_mib(path), 2),
                             "load_s": round(load_seconds, 2), "first_request_s": round(first, 3)})
                print(rows[-1], flush=True)
        keys, timings = list(signatures), {key: [] for key in signatures}
        for position, request in enumerate(requests):
            for turn in range(len(keys)):
                key = keys[(position + turn) % len(keys)]
                started = time.perf_counter()
                signatures[key](history=request, k=tf.constant(K))["item_ids"].numpy()
                timings[key].append((time.perf_counter() - started) * 1000)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for row in rows:
        values = timings[(row["sampling"], row["xla"])][WARMUP_REQUESTS:]
        row.update(p50_ms=round(float(np.percentile(values, 50)), 3), p99_ms=round(float(np.percentile(values, 99)), 3))
    result = header("t2diff_export")
    result.update(weights=weights, requests=len(requests), num_items=split.num_items, k=K, rows=rows)
    write_results(result, args.output, to_markdown, echo=True)
    return 0


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "T2Diff as a SavedModel: export, size, load and latency") + [
        *([f"- code: {result['code']}"] if "code" in result else []),
        f"- weights: {result['weights']}; catalogue {result['num_items']:,} items; top_k with k = {result['k']}",
        f"- latency: {result['requests']} single-user requests (test histories) per export, the first "
        f"{WARMUP_REQUESTS} untimed, every export interleaved request by request, in the process that loaded them",
        "",
        "| sampling | user side | export s | SavedModel MiB | load s | first request s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['sampling']} | {'XLA' if row['xla'] else 'graph'} | {row['export_s']} | "
                     f"{row['saved_model_mib']} | {row['load_s']} | {row['first_request_s']} | {row['p50_ms']} | "
                     f"{row['p99_ms']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
