"""T2Diff as a SavedModel: export time, size, load time, first answer and latency (not a test).

For DDPM (all of the model's T steps, 50 in the ML-1M configs) and DDIM-10, each exported as a
plain graph and with an XLA-compiled user side (``export_retrieval_model(jit_compile=...)``,
top_k up to k = 100, over the whole catalogue), this process measures: seconds to export; MiB
on disk; seconds to load (``tf.saved_model.load``); seconds of the first request (one user:
XLA compiles there); and p50/p99 ms of single-user requests to the loaded ``top_k`` signature
(k = 100, the test users' histories), every export timed interleaved request by request so a
drift in the machine's speed hits them alike. Then, export by export, ``--callers`` threads call
the signature at once in a closed loop (each its share of the same requests), as a server's
request threads do: p50/p99 ms and requests per second under that load.

TensorFlow's thread pools are sized by ``--intra-op-threads`` / ``--inter-op-threads`` (what
TF Serving's and ``xmatch serve``'s ``--tensorflow_intra_op_parallelism`` /
``--tensorflow_inter_op_parallelism`` set; 0: TensorFlow's default, all cores). A process sizes
them once, so each setting is its own run, and ``--merge`` adds its rows to the same table.
The run's ``TF_ENABLE_ONEDNN_OPTS`` (TensorFlow's oneDNN kernels: on by default on x86 Linux, off
with ``0``; read when TensorFlow starts, so set in the environment) is recorded and keys the rows
the same way.

The model: a finished run's (``--run`` under ``--runs-dir``; by default the ``--variant``'s
leave-one-out run as ``t2diff.py`` names it) when there is one; otherwise the
model of a ``t2diff.py`` variant (``--variant``, default the detached SASRec-backbone one) on
ML-1M as initialised, since export time, size and latency depend on the architecture and the
catalogue, not on the weights. Skips cleanly without ML-1M.

Writes ``results/t2diff_export.md`` and ``results/t2diff_export.json``.

    python benchmarks/t2diff_export.py
    python benchmarks/t2diff_export.py --variant t2diff --requests 300
    python benchmarks/t2diff_export.py --intra-op-threads 1 --merge
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/t2diff_export.py --merge
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import (RESULTS_DIR, default_data_dir, header, load_finished_run, markdown_header,  # noqa: E402
                    merge_rows, non_negative_int, positive_int, run_split, training_overrides, write_results)
from t2diff import VARIANTS, run_name  # noqa: E402

import numpy as np  # noqa: E402

from tfx_xmatch.bench.schema import design_model_name  # noqa: E402

DDIM_STEPS = 10
K = 100
WARMUP_REQUESTS = 10  # per export, untimed
ROW_KEY = ("sampling", "xla", "intra_op_threads", "inter_op_threads", "tf_enable_onednn_opts")


def _model(args):
    """(config, split, model, where the weights come from), or None when the data is absent."""
    from tfx_xmatch import training
    from tfx_xmatch.config import load_config

    # The variant's own leave-one-out run, as t2diff.py names it: a fixed default measured the
    # detached-backbone run whatever --variant asked for.
    run = args.run or run_name(args.variant, "leave_one_out", "t2diff")
    run_dir = pathlib.Path(args.runs_dir) / run
    if (run_dir / "model").is_dir():
        loaded = load_finished_run(run_dir, "benchmarks/t2diff.py")
        return None if loaded is None else (*loaded, f"run `{run}`")
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
    parser.add_argument("--run", help="a finished T2Diff run under --runs-dir (default: the --variant's "
                                      "leave-one-out run, t2diff-leave_one_out-<variant>); without one, "
                                      "--variant as initialised")
    parser.add_argument("--variant", default="t2diff_sasrec_backbone_detached",
                        choices=[name for name in VARIANTS if name.startswith("t2diff")])
    parser.add_argument("--requests", type=int, default=200, help="single-user requests timed per export")
    parser.add_argument("--callers", type=positive_int, default=4,
                        help="threads calling each export at once in the second measurement")
    parser.add_argument("--intra-op-threads", type=non_negative_int, default=0,
                        help="TensorFlow's intra-op threads (--tensorflow_intra_op_parallelism); 0: its default")
    parser.add_argument("--inter-op-threads", type=non_negative_int, default=0,
                        help="TensorFlow's inter-op threads (--tensorflow_inter_op_parallelism); 0: its default")
    parser.add_argument("--output", default="t2diff_export")
    parser.add_argument("--merge", action="store_true",
                        help="add the rows to the results already under --output (rows of the same sampling, user "
                             "side, threads and TF_ENABLE_ONEDNN_OPTS replaced) instead of starting the file afresh")
    args = parser.parse_args()
    if args.requests <= WARMUP_REQUESTS:
        parser.error(f"--requests must be more than the {WARMUP_REQUESTS} untimed warm-up requests, "
                     f"got {args.requests}")
    if args.callers > args.requests - WARMUP_REQUESTS:
        parser.error(f"--callers must be at most the {args.requests - WARMUP_REQUESTS} timed requests "
                     f"(--requests {args.requests} less {WARMUP_REQUESTS} warm-ups), got {args.callers}")
    if not (args.data_dir / "ml-1m").is_dir():
        print(f"skipped: dataset 'ml-1m' not found under {args.data_dir}", file=sys.stderr)
        return 0
    from tfx_xmatch.serving.server import set_tensorflow_threads

    # Before the first op: the pools are created then, once per process.
    set_tensorflow_threads(args.intra_op_threads, args.inter_op_threads)
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
                             "intra_op_threads": args.intra_op_threads, "inter_op_threads": args.inter_op_threads,
                             "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
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
        concurrent = {key: _concurrent_calls(signature, requests[WARMUP_REQUESTS:], args.callers, tf)
                      for key, signature in signatures.items()}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for row in rows:
        key = (row["sampling"], row["xla"])
        values = timings[key][WARMUP_REQUESTS:]
        row.update(p50_ms=round(float(np.percentile(values, 50)), 3), p99_ms=round(float(np.percentile(values, 99)), 3),
                   **concurrent[key])
    result = header("t2diff_export")
    result.update(weights=weights, requests=len(requests), num_items=split.num_items, k=K, rows=rows)
    if args.merge:
        result = merge_rows(result, RESULTS_DIR / f"{args.output}.json", ROW_KEY,
                            {"intra_op_threads": 0, "inter_op_threads": 0, "tf_enable_onednn_opts": "unset"})
    write_results(result, args.output, to_markdown, echo=True)
    return 0


def _concurrent_calls(signature, requests: list, callers: int, tf) -> dict:
    """``callers`` threads calling ``signature`` in a closed loop, caller c taking requests c, c + callers, ...

    Returns the callers, p50/p99 ms of every call and the calls per second from the common start
    to the last finish.
    """
    latencies = [[] for _ in range(callers)]
    start = threading.Barrier(callers)
    k = tf.constant(K)

    def call(caller: int) -> None:
        start.wait()
        for request in requests[caller::callers]:
            started = time.perf_counter()
            signature(history=request, k=k)["item_ids"].numpy()
            latencies[caller].append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=call, args=(caller,)) for caller in range(callers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    values = [value for per_caller in latencies for value in per_caller]
    if len(values) != len(requests):  # a caller's exception ends its thread, not the benchmark
        raise RuntimeError(f"{len(requests) - len(values)} of {len(requests)} concurrent calls did not complete; "
                           "see the thread tracebacks above")
    return {"callers": callers, "callers_p50_ms": round(float(np.percentile(values, 50)), 3),
            "callers_p99_ms": round(float(np.percentile(values, 99)), 3),
            "callers_per_s": round(len(values) / seconds, 1)}


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "T2Diff as a SavedModel: export, size, load and latency") + [
        *([f"- code: {result['code']}"] if "code" in result else []),
        f"- weights: {result['weights']}; catalogue {result['num_items']:,} items; top_k with k = {result['k']}",
        f"- latency: {result['requests']} single-user requests (test histories) per export, the first "
        f"{WARMUP_REQUESTS} untimed, every export interleaved request by request, in the process that loaded them",
        "- under load: the same requests after the warm-ups, `callers` threads calling one export at once in a "
        "closed loop, export by export",
        "- TF threads: intra-op / inter-op pool sizes of the run (default: TensorFlow's, all cores); each setting "
        "is a process of its own; oneDNN: the run's `TF_ENABLE_ONEDNN_OPTS` (unset: TensorFlow's default, on for "
        "x86 Linux)",
        "",
        "| sampling | user side | TF threads | oneDNN | export s | SavedModel MiB | load s | first request s | p50 ms | p99 ms "
        "| callers | p50 ms under load | p99 ms under load | requests/s under load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        threads = " / ".join(str(row.get(pool) or "default") for pool in ("intra_op_threads", "inter_op_threads"))
        lines.append(f"| {row['sampling']} | {'XLA' if row['xla'] else 'graph'} | {threads} | "
                     f"{row.get('tf_enable_onednn_opts', 'unset')} | {row['export_s']} | "
                     f"{row['saved_model_mib']} | {row['load_s']} | {row['first_request_s']} | {row['p50_ms']} | "
                     f"{row['p99_ms']} | {row.get('callers', '')} | {row.get('callers_p50_ms', '')} | "
                     f"{row.get('callers_p99_ms', '')} | {row.get('callers_per_s', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
