"""Each model's serving path as the benchmarks measure it: the index an export would bake in,
and one search from a batch of histories to the top items, history excluded.

Quality and latency go through the same path, so a reported number is what a served export
answers: items the index does not return rank last in the full-ranking evaluation.

Paths per model (``variants`` of :func:`serving_paths`):

* two-tower: ``{"kind": "brute_force"}`` (exact dot product).
* SparCode: ``{"kind": "sparse_code", "cache_fraction": f}`` (posting lists under a budget).
* SPARC: ``{"kind": "soft_search", "interests": K}`` (K = 1 is hard search).
* T2Diff: ``{"kind": "brute_force", "sampler": "ddim"|"ddpm", "steps": S}``.
* A model with a sequence backbone (SPARC, T2Diff with ``backbone``), branch switched off, or
  SparCode with its code path switched off: ``{"kind": "brute_force", "backbone_only": True}``
  (its encoder state after the last item, dot product with the item tower).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Callable

import numpy as np
import tensorflow as tf

from tfx_xmatch import training
from tfx_xmatch.bench.paired import load_ranks, save_ranks
from tfx_xmatch.data.dataset import pad_histories
from tfx_xmatch.evaluation import evaluate_full_ranking
from tfx_xmatch.index import BruteForceIndex, SoftSearchIndex, SparseCodeIndex
from tfx_xmatch.models.history_encoding import last_position_state

RETRIEVED = 100


@dataclasses.dataclass
class ServingPath:
    """One way a trained model answers.

    Attributes:
      label: What the path is, e.g. "brute force", "soft K=4", "DDIM-10", "cache 10%".
      variant: The settings it was built from.
      index: The filled index.
      build_seconds: Wall time of filling the index.
      search: ``search(inputs, history) -> (scores [B, k], item indices [B, k])``.
    """

    label: str
    variant: dict
    index: object
    build_seconds: float
    search: Callable


def index_bytes(index) -> int:
    """Bytes held by the index's variables (strings: their byte lengths)."""
    total, seen = 0, set()
    for variable in index.variables:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        if variable.dtype.name == "string":
            total += int(sum(len(x) for x in np.ravel(variable.numpy())))
        else:
            # Variables have unknown static dimensions; the value's shape is the real one.
            total += int(np.prod(variable.value().shape.as_list())) * variable.dtype.size
    return total


def _label(variant: dict) -> str:
    if "label" in variant:
        return variant["label"]
    if variant.get("jit_compile"):
        return _label({key: value for key, value in variant.items() if key != "jit_compile"}) + " (XLA)"
    if variant.get("backbone_only"):
        return "backbone alone (branch off)"
    if "sampler" in variant:
        return f"{variant['sampler'].upper()}-{variant['steps']}"
    if variant["kind"] == "sparse_code":
        fraction = variant.get("cache_fraction")
        return "cache 100%" if fraction is None else f"cache {fraction * 100:g}%"
    if variant["kind"] == "soft_search":
        return "hard (K=1)" if variant["interests"] == 1 else f"soft K={variant['interests']}"
    return "brute force"


def serving_path(model, num_items: int, variant: dict, seed: int = 0) -> ServingPath:
    """Builds the index of ``variant`` for ``model`` and the search through it.

    ``variant["jit_compile"]`` compiles the user side (not the index) with XLA, as
    ``export_retrieval_model(jit_compile=True)`` does.

    Raises:
      ValueError: If the variant does not fit the model (the message names both).
    """
    kind = variant["kind"]
    ids = tf.range(1, num_items + 1, dtype=tf.int64)
    started = time.perf_counter()
    if kind == "sparse_code":
        if not hasattr(model, "build_index"):
            raise ValueError(f"variant {variant} needs a SparCode model, got {type(model).__name__}")
        index = SparseCodeIndex(k_max=RETRIEVED, cache_fraction=variant.get("cache_fraction"), exclude_padding=0)
        model.build_index(index, verbose=0)
    elif kind == "soft_search":
        if not hasattr(model, "interest_vectors"):
            raise ValueError(f"variant {variant} needs a SPARC model, got {type(model).__name__}")
        index = SoftSearchIndex(BruteForceIndex(k_max=RETRIEVED), num_interests=variant["interests"],
                                k_max=RETRIEVED, exclude_padding=0)
        index.index(model.item_embeddings()[1:], ids)
    elif kind == "brute_force":
        if variant.get("backbone_only") and (not hasattr(model, "encode_sequence")
                                             or getattr(model, "backbone", "sasrec") == "none"):
            raise ValueError(f"variant {variant} needs a model with a sequence backbone, got {type(model).__name__}")
        index = BruteForceIndex(k_max=RETRIEVED, exclude_padding=0)
        # SparCode's item_embeddings are its code-score columns; its encoder scores the item tower.
        sparcode_encoder = variant.get("backbone_only") and hasattr(model, "encoder_item_embeddings")
        items = model.encoder_item_embeddings() if sparcode_encoder else model.item_embeddings()
        index.index(items[1:], ids)
    else:
        raise ValueError(f"unknown serving path kind {kind!r} in {variant}")
    build_seconds = time.perf_counter() - started
    compiled = (lambda fn: tf.function(fn, jit_compile=True)) if variant.get("jit_compile") else (lambda fn: fn)

    if kind == "soft_search":
        interests = variant["interests"]
        interest_vectors = compiled(lambda inputs: model.interest_vectors(inputs, interests))

        @tf.function(reduce_retracing=True)
        def search(inputs, history):
            vectors, log_probs = interest_vectors(inputs)
            return index(vectors, k=RETRIEVED, exclude=history, log_weights=log_probs)
    else:
        if variant.get("backbone_only"):
            user_vectors = compiled(lambda inputs: last_position_state(model.encode_sequence, inputs))
        else:
            sampling = {key: variant[key] for key in ("sampler", "steps") if key in variant}
            if sampling:
                sampling["seed"] = seed
            user_vectors = compiled(lambda inputs: model.user_embedding(inputs, **sampling))

        @tf.function(reduce_retracing=True)
        def search(inputs, history):
            return index(user_vectors(inputs), k=RETRIEVED, exclude=history)

    return ServingPath(_label(variant), dict(variant), index, build_seconds, search)


def retrieval_score_fn(query_fn, num_items: int):
    """A full-ranking ``score_fn`` for a model served through an index, like an export answers:
    ``query_fn(histories, user_rows) -> (scores [B, k], item indices [B, k])`` gives each row's
    retrieved items; every item it did not return scores -inf (ranks last)."""

    def score_fn(histories, user_rows):
        scores, ids = query_fn(histories, user_rows)
        dense = np.full((len(histories), num_items + 1), -np.inf, np.float32)
        ids, scores = np.asarray(ids), np.asarray(scores)
        found = ids > 0
        rows = np.broadcast_to(np.arange(len(histories))[:, None], ids.shape)
        dense[rows[found], ids[found]] = scores[found]
        return dense

    return score_fn


def evaluate_path(path: ServingPath, model, split, config, return_ranks: bool = False):
    """Test metrics of the path: full ranking, items the path does not return rank last.

    With ``return_ranks``, returns ``(metrics, ranks)``: also each test user's 0-based target rank.

    With ``eval.mask_history`` (the protocol's default), the search excludes each user's whole
    history, as an export given the full history does (excluding only the model's window would
    let older items take result slots that the evaluation then masks), except the target: the
    protocol ranks a target the user had met before, and a served search that dropped it ranked
    it last. Without masking nothing is excluded, as the protocol masks nothing.
    """
    full_histories = dict(zip(split.test.user_rows.tolist(), split.test.histories))
    targets = dict(zip(split.test.user_rows.tolist(), split.test.targets.tolist()))

    def query_fn(histories, user_rows):
        inputs = training.model_inputs(model, split.dataset, histories, user_rows)
        rows = np.asarray(user_rows).tolist()
        if config.eval.mask_history:
            seen = [full_histories[row][full_histories[row] != targets[row]] for row in rows]
        else:
            seen = [np.zeros(0, np.int64) for _ in rows]
        exclude = pad_histories(seen, max(1, max(len(history) for history in seen)))
        scores, ids = path.search(inputs, tf.constant(exclude, tf.int64))
        return scores.numpy(), ids.numpy()

    return evaluate_full_ranking(
        retrieval_score_fn(query_fn, split.num_items), split.test, num_items=split.num_items,
        max_length=config.model.max_length, batch_size=config.eval.batch_size, ks=tuple(config.eval.ks),
        mask_history=config.eval.mask_history, item_popularity=split.item_popularity(), return_ranks=return_ranks)


def per_user_latency(path: ServingPath, model, split, config, users: int, warmup: int = 10) -> tuple[float, float]:
    """p50/p99 milliseconds of one user's query (batch 1) through the path, encoder included.

    Each call excludes the user's whole history, as ``evaluate_path`` does, so the timed search
    is the one whose quality is reported.
    """
    return per_user_latencies({path.label: path}, model, split, config, users, warmup)[path.label]


def per_user_latencies(paths: dict, model, split, config, users: int, warmup: int = 10) -> dict:
    """``per_user_latency`` of several paths of one model: {label: (p50 ms, p99 ms)}.

    The paths are timed interleaved, user by user, each in turn in a rotating order, so a drift
    in the machine's speed (up to 30% within a session on a shared VM) hits every path alike
    and their ratios hold.
    """
    seen = list(split.test.histories[:users])
    histories = pad_histories(seen, config.model.max_length)
    user_rows = split.test.user_rows[:users]
    labels = list(paths)
    timings = {label: [] for label in labels}
    for position in range(len(histories) + warmup):
        row = position % len(histories)
        inputs = training.model_inputs(model, split.dataset, histories[row][np.newaxis], user_rows[row][np.newaxis])
        exclude = tf.constant(np.asarray(seen[row], np.int64)[np.newaxis])
        for turn in range(len(labels)):
            label = labels[(position + turn) % len(labels)]
            started = time.perf_counter()
            scores, _ = paths[label].search(inputs, exclude)
            scores.numpy()
            if position >= warmup:  # the first calls trace and warm up
                timings[label].append((time.perf_counter() - started) * 1000)
    return {label: (round(float(np.percentile(values, 50)), 3), round(float(np.percentile(values, 99)), 3))
            for label, values in timings.items()}


def brute_force_ranks(run_dir, split, config) -> np.ndarray | None:
    """A trained run's per-user test ranks through its brute-force path (the two-tower's serving
    path): the ranks saved under ``run_dir`` as "brute force", else computed from its model and
    saved; None (with a message) when there is no run at ``run_dir``."""
    ranks = load_ranks(run_dir, "brute force", split.test.targets, config)
    if ranks is None and (pathlib.Path(run_dir) / "model").is_dir():
        model = training.load_model(pathlib.Path(run_dir) / "model")
        _, ranks = evaluate_path(serving_path(model, split.num_items, {"kind": "brute_force"}), model, split,
                                 config, return_ranks=True)
        save_ranks(run_dir, "brute force", ranks, split.test.targets, config)
    if ranks is None:
        print(f"no paired comparison with the two-tower: no run at {run_dir}", file=sys.stderr)
    return ranks
