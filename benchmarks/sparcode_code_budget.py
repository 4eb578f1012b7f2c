"""What a query of M codes can carry: the encoder state product-quantized at several code budgets (not a test).

SparCode serves a user from the codes of its query alone, so whatever the codes do not carry is
lost to every (code, item) score the index can hold. This benchmark measures that loss without
any SparCode training: it takes a trained run's encoder (by default the SparCode run's own, the
"encoder alone" row of ``sparcode.py``), fits a product quantizer to its states at the training
positions (k-means in each of M slices of the state, N codewords per slice: M codes of log2(N)
bits per query, M x N codewords in all), and ranks the catalogue by the dot product of the
*reconstructed* test state with the item vectors. It shows what an offline quantizer that
minimises the reconstruction error keeps of the encoder's ranking at a given budget. It is not a
bound: a quantizer trained for ranking, or an interaction other than the dot product, may keep
more.

Every row is full ranking over all items with the history masked, on the test users, and is
paired user by user with the unquantized encoder.

Writes ``results/<output>.md`` and ``results/<output>.json``.

    python benchmarks/sparcode_code_budget.py
    python benchmarks/sparcode_code_budget.py --run quality-two_tower_sasrec --budgets 8x512 16x256
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import RESULTS_DIR, header, load_finished_run, markdown_header, write_results  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.bench.schema import design_model_name  # noqa: E402
from tfx_xmatch.data.dataset import pad_histories  # noqa: E402
from tfx_xmatch.evaluation import (  # noqa: E402
    compare_metrics, describe_recorded_tests, evaluate_full_ranking, format_recorded_difference, is_tail_target,
)

DEFAULT_RUN = "sparcode_slots-sparcode"
DEFAULT_BUDGETS = ("1x4096", "8x64", "8x512", "8x4096", "16x256", "16x512", "32x256")
REPORTED = ("HR@10", "NDCG@10", "Recall@50")
EXACT = "encoder state, unquantized"


def parse_budget(text: str) -> tuple[int, int]:
    """'MxN' -> (M codebooks, N codewords); names the bad value."""
    try:
        books, words = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a code budget is MxN (codebooks x codewords), got {text!r}") from None
    if books < 1 or words < 2:
        raise argparse.ArgumentTypeError(f"a code budget needs M >= 1 and N >= 2, got {text!r}")
    return books, words


def kmeans(points: tf.Tensor, num_centroids: int, iterations: int, seed: int) -> tf.Tensor:
    """Lloyd's k-means from a random sample of the points; an emptied centroid is re-seeded at a
    random point, as the quantizer's dead-code restarts do. float [num_centroids, w]."""
    if points.shape[0] < num_centroids:
        raise ValueError(f"k-means of {num_centroids} centroids needs as many points, got {points.shape[0]}; "
                         "raise --sample or lower N")
    rng = np.random.default_rng(seed)
    centroids = tf.gather(points, rng.choice(points.shape[0], num_centroids, replace=False))
    for _ in range(iterations):
        assignment = nearest(points, centroids)
        sums = tf.math.unsorted_segment_sum(points, assignment, num_centroids)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(assignment, tf.float32), assignment, num_centroids)
        reseeded = tf.gather(points, rng.integers(0, points.shape[0], num_centroids))
        centroids = tf.where(counts[:, None] > 0, sums / tf.maximum(counts, 1.0)[:, None], reseeded)
    return centroids


def nearest(points: tf.Tensor, centroids: tf.Tensor, chunk: int = 50_000) -> tf.Tensor:
    """Index of each point's nearest centroid (squared Euclidean distance), int32 [P]; in chunks
    of points, so 300k points x 4096 centroids need no 5 GB distance matrix."""
    squared_norms = tf.reduce_sum(centroids ** 2, axis=1)[tf.newaxis, :]
    return tf.concat([
        tf.argmin(squared_norms - 2.0 * tf.matmul(points[start:start + chunk], centroids, transpose_b=True),
                  axis=1, output_type=tf.int32)
        for start in range(0, int(points.shape[0]), chunk)], axis=0)


class ProductQuantizer:
    """k-means in each of M contiguous slices of the vectors; ``reconstruct`` maps a vector to
    the concatenation of its slices' nearest codewords."""

    def __init__(self, points: np.ndarray, num_codebooks: int, num_codewords: int, iterations: int, seed: int):
        width = points.shape[1]
        if width % num_codebooks:
            raise ValueError(f"the state width {width} is not divisible by {num_codebooks} codebooks")
        self.slice = width // num_codebooks
        points = tf.constant(points, tf.float32)
        self.codebooks = [kmeans(points[:, m * self.slice:(m + 1) * self.slice], num_codewords, iterations, seed + m)
                          for m in range(num_codebooks)]

    def reconstruct(self, vectors: np.ndarray) -> np.ndarray:
        vectors = tf.constant(vectors, tf.float32)
        parts = [tf.gather(codebook, nearest(vectors[:, m * self.slice:(m + 1) * self.slice], codebook))
                 for m, codebook in enumerate(self.codebooks)]
        return tf.concat(parts, axis=1).numpy()


def encoder_parts(model):
    """(states function over all positions [B, L, d], item vectors [num_items + 1, d]) of the
    model's encoder: SparCode's own two-tower, or a two-tower's."""
    if hasattr(model, "encoder_item_embeddings"):
        items = model.encoder_item_embeddings()
    elif type(model).__name__ == "TwoTower":
        items = model.item_embeddings()
    else:
        raise ValueError(f"--run must be a SparCode or TwoTower run, got a {type(model).__name__} run")
    return tf.function(lambda inputs: model.encode_sequence(inputs), reduce_retracing=True), items.numpy()


def training_states(model, encode, split, max_length: int, sample: int, seed: int) -> tuple[np.ndarray, int]:
    """(encoder states at up to ``sample`` training positions, each after a real item; the number
    of training positions)."""
    states = []
    for start in range(0, len(split.train_sequences), 256):
        histories = pad_histories([sequence[:-1] for sequence in split.train_sequences[start:start + 256]], max_length)
        inputs = training.model_inputs(model, split.dataset, histories, split.train_user_rows[start:start + 256])
        states.append(encode(inputs).numpy()[histories > 0])
    states = np.concatenate(states)
    rng = np.random.default_rng(seed)
    return states[rng.choice(len(states), min(sample, len(states)), replace=False)], len(states)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--run", default=DEFAULT_RUN, help="a finished SparCode or TwoTower run under --runs-dir")
    parser.add_argument("--budgets", nargs="+", type=parse_budget, default=[parse_budget(b) for b in DEFAULT_BUDGETS],
                        help="code budgets MxN: M codebooks (slices of the state) of N codewords")
    parser.add_argument("--sample", type=int, default=300_000, help="training positions the k-means fits")
    parser.add_argument("--iterations", type=int, default=20, help="k-means iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="sparcode_code_budget")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args()
    loaded = load_finished_run(pathlib.Path(args.runs_dir) / args.run, "benchmarks/sparcode.py")
    if loaded is None:
        return 0
    config, split, model = loaded
    encode, items = encoder_parts(model)
    for books, words in args.budgets:  # before hours of fitting, not after them
        if items.shape[1] % books:
            parser.error(f"budget {books}x{words}: the state width {items.shape[1]} is not divisible by {books}")
        if words > args.sample:
            parser.error(f"budget {books}x{words}: {words} codewords need --sample >= {words}, got {args.sample}")
    max_length = config.model.max_length
    fit_states, positions = training_states(model, encode, split, max_length, args.sample, args.seed)

    def evaluate(transform):
        def score_fn(histories, user_rows):
            inputs = training.model_inputs(model, split.dataset, histories, user_rows)
            return transform(encode(inputs).numpy()[:, -1, :]) @ items.T

        return evaluate_full_ranking(
            score_fn, split.test, num_items=split.num_items, max_length=max_length,
            batch_size=config.eval.batch_size, ks=(10, 50), mask_history=config.eval.mask_history,
            item_popularity=split.item_popularity(), return_ranks=True)

    is_tail = is_tail_target(split.test.targets, split.item_popularity())
    exact_metrics, exact_ranks = evaluate(lambda states: states)
    result = header("sparcode_code_budget")
    identity = {"dataset": config.data.dataset, "split": config.data.split, "model": design_model_name(config)}
    result.update(run=args.run, model=type(model).__name__, num_items=split.num_items,
                  mask_history=bool(config.eval.mask_history),
                  test_users=len(split.test.targets), training_positions=positions,
                  fitted_positions=len(fit_states), iterations=args.iterations, seed=args.seed,
                  rows=[{**identity, "budget": EXACT, **{key: round(exact_metrics[key], 4) for key in REPORTED}}])
    print(result["rows"][-1], flush=True)
    for books, words in args.budgets:
        started = time.perf_counter()
        quantizer = ProductQuantizer(fit_states, books, words, args.iterations, args.seed)
        fit_seconds = time.perf_counter() - started
        metrics, ranks = evaluate(quantizer.reconstruct)
        result["rows"].append({
            **identity, "budget": f"{books}x{words}", "codebooks": books, "codewords": words,
            "bits": round(books * float(np.log2(words)), 1), "slice_width": quantizer.slice,
            **{key: round(metrics[key], 4) for key in REPORTED},
            "fit_seconds": round(fit_seconds, 1),
            "vs_unquantized": compare_metrics(ranks, exact_ranks, REPORTED, is_tail)})
        print({key: value for key, value in result["rows"][-1].items() if key != "vs_unquantized"}, flush=True)
    results_dir = pathlib.Path(args.results_dir)
    write_results(result, args.output, to_markdown, echo=True, results_dir=results_dir)
    return 0


def to_markdown(result: dict) -> str:
    lines = markdown_header(result, "what a query of M codes keeps of its encoder state") + [
        f"- run: `{result['run']}` ({result['model']}); the encoder's states at {result['fitted_positions']:,} of "
        f"{result['training_positions']:,} training positions fit a product quantizer (k-means in each slice, "
        f"{result['iterations']} iterations, seed {result['seed']}); the test users' reconstructed states rank all "
        f"{result['num_items']:,} items by dot product, "
        f"{'history masked' if result.get('mask_history', True) else 'history not masked'} "
        f"({result['test_users']:,} users)",
        "- Δ: paired over the same users, 95% interval, p-value of "
        + describe_recorded_tests([row["vs_unquantized"][metric] for row in result["rows"] if "vs_unquantized" in row
                                   for metric in ("HR@10", "NDCG@10")]),
        "",
        "| query codes | bits | codewords in all | HR@10 | NDCG@10 | Recall@50 | HR@10 kept | ΔHR@10 vs unquantized | "
        "ΔNDCG@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    exact = result["rows"][0]
    for row in result["rows"]:
        if row["budget"] == EXACT:
            lines.append(f"| {EXACT} | | | {row['HR@10']} | {row['NDCG@10']} | {row['Recall@50']} | 100% | | |")
            continue
        paired = row["vs_unquantized"]
        cells = [format_recorded_difference(paired[key]) for key in ("HR@10", "NDCG@10")]
        lines.append(f"| {row['codebooks']} x {row['codewords']} (slices of {row['slice_width']}) | {row['bits']:g} | "
                     f"{row['codebooks'] * row['codewords']:,} | "
                     f"{row['HR@10']} | {row['NDCG@10']} | {row['Recall@50']} | "
                     f"{row['HR@10'] / exact['HR@10']:.1%} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
