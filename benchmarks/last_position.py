"""What encoding only the last history position saves (not a test).

Serving and evaluation read one state per user, the one after the most recent item; training
reads every position. The SASRec encoder's ``last_position_only`` path runs its last block for
that one query instead of all L, and every model's user side takes it
(``history_encoding.last_position_state``). This script measures it against the full encoding's
last row, the way the models read it before, on the same weights: a second copy of each model
whose ``encode_sequence`` does not take ``last_position_only`` (as a subclass that overrides it
without the argument), which ``last_position_state`` then calls as written.

For the two-tower, SparCode and the detached-backbone T2Diff (DDIM-10) on ML-1M, as initialised
(the time depends on the architecture, not on the weights): p50/p99 ms of the user side for
single users (``--requests`` test histories, the two paths interleaved request by request, after
10 untimed), and seconds of a full-ranking evaluation pass over every validation user
(``training.evaluate``, ``--repeats`` times each way, interleaved, after one untimed pass each).
Both paths must answer alike: the largest difference of the user-side outputs and of the pass's
metrics is reported. Skips cleanly without ML-1M.

Writes ``results/last_position.md`` and ``results/last_position.json``.

    python benchmarks/last_position.py
    python benchmarks/last_position.py --models two_tower_sasrec --requests 500
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import (default_data_dir, header, markdown_header, positive_int, run_split,  # noqa: E402
                    training_overrides, write_results)
from t2diff import CONFIGS_DIR, VARIANTS  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.bench.schema import design_model_name  # noqa: E402
from tfx_xmatch.config import load_config  # noqa: E402
from tfx_xmatch.data.dataset import pad_histories  # noqa: E402

# Model -> (config, extra overrides, the method that is its user side).
MODELS = {
    "two_tower_sasrec": (*VARIANTS["two_tower_sasrec"], "user_embedding"),
    "sparcode": (CONFIGS_DIR / "ml1m_sparcode.yaml", [], "query_codes"),
    "t2diff_sasrec_backbone_detached": (*VARIANTS["t2diff_sasrec_backbone_detached"], "user_embedding"),
}
WARMUP_REQUESTS = 10


def full_encoding_copy(model: tf.keras.Model, config, dataset, inputs: dict) -> tf.keras.Model:
    """A model with ``model``'s weights whose ``encode_sequence`` encodes every position."""
    copy = training.build_model(config, dataset)
    copy(inputs)
    copy.set_weights(model.get_weights())
    encode_every_position = type(copy).encode_sequence
    copy.encode_sequence = lambda inputs, training=False: encode_every_position(copy, inputs, training)
    return copy


def measure(name: str, config, split, num_requests: int, repeats: int) -> list[dict]:
    """The rows (every position, then last position) of the model ``name`` (which picks its user
    side) built from ``config`` on ``split``."""
    length = config.model.max_length
    user_side_name = MODELS[name][2]
    tf.keras.utils.set_random_seed(config.train.seed)  # the same initial weights on every run
    model = training.build_model(config, split.dataset)
    count = min(num_requests + WARMUP_REQUESTS, len(split.test.histories))
    histories = pad_histories(split.test.histories[:count], length)
    requests = [training.model_inputs(model, split.dataset, histories[i:i + 1], split.test.user_rows[i:i + 1])
                for i in range(count)]
    model(requests[0])
    paths = {"last position": model, "every position": full_encoding_copy(model, config, split.dataset, requests[0])}
    user_side = {path: tf.function(getattr(m, user_side_name)) for path, m in paths.items()}

    outputs = {path: [] for path in paths}
    latencies = {path: [] for path in paths}
    for i, request in enumerate(requests):
        for path, fn in user_side.items():
            start = time.perf_counter()
            answer = fn(request).numpy()
            if i >= WARMUP_REQUESTS:
                latencies[path].append((time.perf_counter() - start) * 1000)
                outputs[path].append(answer)
    first, second = (np.concatenate(outputs[path]) for path in paths)
    if first.dtype.kind in "iu":  # SparCode's codes
        disagreement = float(np.mean(first != second))
    else:
        disagreement = float(np.abs(first - second).max())

    metrics = {path: training.evaluate(m, split, "validation", config) for path, m in paths.items()}  # traces
    seconds = {path: [] for path in paths}
    for _ in range(repeats):
        for path, m in paths.items():
            start = time.perf_counter()
            metrics[path] = training.evaluate(m, split, "validation", config)
            seconds[path].append(round(time.perf_counter() - start, 3))
    metric_difference = max(abs(metrics["last position"][key] - value)
                            for key, value in metrics["every position"].items() if isinstance(value, float))
    shared = {"dataset": config.data.dataset, "split": config.data.split, "model": design_model_name(config),
              "variant": name, "user_side": user_side_name, "max_length": length,
              "num_blocks": len(model.encoder.blocks), "requests": len(latencies["last position"]),
              "validation_users": len(split.validation.targets), "batch_size": config.eval.batch_size,
              "NDCG@10": round(metrics["last position"]["NDCG@10"], 4)}
    differences = {"user_side_difference": disagreement, "max_metric_difference": float(metric_difference)}
    return [{**shared, "path": path, "p50_ms": round(float(np.percentile(latencies[path], 50)), 3),
             "p99_ms": round(float(np.percentile(latencies[path], 99)), 3), "pass_s": seconds[path],
             **(differences if path == "last position" else {})} for path in ("every position", "last position")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=pathlib.Path, default=default_data_dir())
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--requests", type=positive_int, default=200, help="single-user requests timed per path")
    parser.add_argument("--repeats", type=positive_int, default=2, help="timed evaluation passes per path")
    parser.add_argument("--output", default="last_position")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        config_path, extra, _ = MODELS[name]
        config = load_config(config_path, [*training_overrides("ml-1m", args.data_dir, 1, 1, 1.0), *extra])
        split = run_split(config)
        if split is None:
            return 0  # the data is absent; run_split said so
        rows.extend(measure(name, config, split, args.requests, args.repeats))
        print(rows[-2:], flush=True)
    result = header("last_position")
    result.update(data_dir=str(args.data_dir), repeats=args.repeats, warmup_requests=WARMUP_REQUESTS, rows=rows)
    write_results(result, args.output, to_markdown, echo=True)
    return 0


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "the user side with the last history position encoded alone") + [
        "- models: as initialised on ML-1M (time depends on the architecture, not on the weights); "
        "\"every position\" is the same weights encoding the whole history and reading its last row, "
        "as before",
        f"- single user: the test histories one at a time, both paths interleaved request by request, "
        f"after {result['warmup_requests']} untimed",
        f"- pass: every validation user ranked against every item (`training.evaluate`), "
        f"{result['repeats']} timed passes per path, interleaved, after one untimed pass each",
        "",
        "| model | user side | blocks x length | single user p50 / p99 ms, every position | last position | "
        "speed-up (p50) | pass s (median), every position | last position | speed-up | user-side difference | "
        "NDCG@10 | largest metric difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for every, last in zip(rows[::2], rows[1::2]):
        before, after = float(np.median(every["pass_s"])), float(np.median(last["pass_s"]))
        difference = (f"{last['user_side_difference']:.1%} of codes differ" if last["user_side"] == "query_codes"
                      else f"{last['user_side_difference']:.1e}")
        lines.append(
            f"| {last['variant']} | `{last['user_side']}` | {last['num_blocks']} x {last['max_length']} | "
            f"{every['p50_ms']} / {every['p99_ms']} | {last['p50_ms']} / {last['p99_ms']} | "
            f"{every['p50_ms'] / last['p50_ms']:.2f}x | {before:.2f} | {after:.2f} | {before / after:.2f}x | "
            f"{difference} | {last['NDCG@10']} | {last['max_metric_difference']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
