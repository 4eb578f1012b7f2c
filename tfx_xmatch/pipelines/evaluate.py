"""Beam pipeline ``evaluate``: batch full-ranking evaluation of an exported model.

Every example of a prepared split (``write_split_tfrecords`` / the ``prepare`` pipeline) goes
through ``RunInference`` with :class:`TopKModelHandler`, which calls the export's ``top_k``
signature (``tfx_xmatch.export``) on batches of raw-id histories; a ``CombineFn`` feeds the
returned lists to ``FullRankingEvaluator.update_from_top_k`` and merges evaluators across
workers, so the metric formulas are the in-process ones. The rank of a target is its position
in the returned list (which the export computed over every item, without the user's history),
or "at least max K" when it is absent.

The metrics equal ``evaluate_full_ranking(..., mask_history=True)`` except that:

* A target that also occurs in its own history is removed by the export like every history item,
  so it counts as a miss, while the in-process protocol always ranks the target. Such examples
  are counted in ``targets_in_history`` (0 for leave-one-out splits without repeats).
* Ties: the export orders equal scores by item index; the in-process default counts ties
  against the target (``tie_policy="pessimistic"``). They agree when scores are distinct.
* An approximate index (``scann``, ``partitioned``, ...) gives the metrics of what is served.

Usage::

    python -m tfx_xmatch.pipelines.evaluate --export-dir exports/xmatch/1 \\
        --prepared-dir prepared/ml-1m --split test --ks 10 20 50 --output metrics.json \\
        [--runner=FlinkRunner ...]

The metrics come back to the launcher through a file in a local temporary directory, so a
runner whose workers do not share this machine's file system cannot run ``run_evaluate``
(``evaluate_pipeline`` itself has no such restriction).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.data.tfrecord import (check_not_cut_short, damaged_file_named, record_counts, shard_pattern,
                                      train_records_lack_one_item_sequences)
from tfx_xmatch.evaluation.full_ranking import FullRankingEvaluator
from tfx_xmatch.io_utils import absolute_unless_url, json_text
from tfx_xmatch.pipelines.beam_utils import (pipeline_options, remove_if_present, require_beam, split_arguments,
                                             write_text)

beam = require_beam()
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference  # noqa: E402

SPLITS = ("validation", "test")
SIGNATURE = "top_k"


def read_records(path: str):
    """Yields the serialized records of one TFRecord file (GZIP when it ends in ``.gz``)."""
    # tf.data rather than beam.io.ReadFromTFRecord: Beam's reader needs a CRC package
    # (crcmod / google-crc32c) that a plain apache-beam install lacks; TensorFlow is here anyway.
    check_not_cut_short([path])  # tf.data reads a file cut inside a record header as ending there
    dataset = tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
    with damaged_file_named(path):
        yield from dataset.as_numpy_iterator()


def parse_record(serialized: bytes) -> tuple[np.ndarray, int]:
    """``(history item indices, target)`` of one record written by ``write_tfrecords``.

    Raises:
      ValueError: If the record has no single target or an empty history (the export needs
        at least one item per history).
    """
    features = tf.train.Example.FromString(serialized).features.feature
    target = list(features["target"].int64_list.value)
    if len(target) != 1:
        raise ValueError(f"a record must hold exactly one target, got {target!r}")
    history = np.asarray(features["history"].int64_list.value, dtype=np.int64)
    if history.size == 0:
        raise ValueError(f"a record with target {target[0]} has an empty history; the export cannot rank it")
    return history, target[0]


class _Export:
    """A loaded export's ``top_k`` signature speaking item indices instead of raw ids."""

    def __init__(self, export_dir: str, item_ids: np.ndarray):
        if not tf.io.gfile.exists(export_dir):
            raise FileNotFoundError(f"export_dir {export_dir!r} does not exist")
        if not tf.io.gfile.exists(os.path.join(export_dir, "saved_model.pb")):
            versions = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(export_dir)
                              if n.rstrip("/").isdigit()) if tf.io.gfile.isdir(export_dir) else []
            hint = f" (it holds versions {versions}; pass one, e.g. {export_dir}/{versions[-1]})" if versions else ""
            raise FileNotFoundError(f"export_dir {export_dir!r} is not a SavedModel{hint}")
        loaded = tf.saved_model.load(export_dir)
        if SIGNATURE not in loaded.signatures:
            raise ValueError(f"the export {export_dir!r} has no {SIGNATURE!r} signature (it has "
                             f"{sorted(loaded.signatures)}); export it with tfx_xmatch.export")
        self.loaded, self.signature = loaded, loaded.signatures[SIGNATURE]
        self.id_dtype = self.signature.structured_input_signature[1]["history"].dtype
        string_ids = self.id_dtype == tf.string
        if hasattr(loaded, "index_to_id"):  # our exports carry their vocabulary and padding id
            served = [raw.decode() if isinstance(raw, bytes) else raw for raw in loaded.index_to_id.numpy().tolist()]
            padding = served[0]
            if served[1:] != item_ids.tolist():
                raise ValueError(f"the export {export_dir!r} was built with another item vocabulary than the "
                                 f"prepared data ({len(served) - 1} items, e.g. {served[1:3]}, vs {len(item_ids)} "
                                 f"items, e.g. {item_ids[:2].tolist()})")
        else:
            padding = "" if string_ids else 0
        # Position i holds the raw id of item index i; 0 is padding.
        self.index_to_raw = np.asarray([padding, *item_ids.tolist()], dtype=object if string_ids else np.int64)
        self.raw_to_index = {(raw.encode() if string_ids else int(raw)): index
                             for index, raw in enumerate(self.index_to_raw.tolist())}

    def top_k(self, histories: Sequence[np.ndarray], k: int) -> np.ndarray:
        """int64 [B, k] item indices, best first, 0 where nothing (or a ``-inf`` result) was returned."""
        padded = np.zeros((len(histories), max(len(history) for history in histories)), np.int64)
        for row, history in enumerate(histories):
            padded[row, : len(history)] = history  # right padding: the export aligns rows itself
        bad = padded[(padded < 0) | (padded >= len(self.index_to_raw))]
        if bad.size:
            raise ValueError(f"a history holds item index {bad[0]}, outside the vocabulary's "
                             f"1..{len(self.index_to_raw) - 1}")
        raw = tf.constant(self.index_to_raw[padded].tolist(), self.id_dtype)
        output = self.signature(history=raw, k=tf.constant(k, tf.int32))
        ids, scores = output["item_ids"].numpy(), output["scores"].numpy()
        try:
            items = np.vectorize(self.raw_to_index.__getitem__, otypes=[np.int64])(ids)
        except KeyError as error:
            raise ValueError(f"the export returned item id {error.args[0]!r}, which is not in the vocabulary") from None
        items[np.isneginf(scores)] = 0
        return items


def check_export(export_dir: str, item_ids: np.ndarray, k: int) -> None:
    """Loads the export and asks it for ``k`` results once, to fail before any pipeline runs.

    Raises:
      FileNotFoundError: ``export_dir`` is not a SavedModel.
      ValueError: No ``top_k`` signature, another vocabulary, or ``k`` above the export's k_max.
    """
    export = _Export(export_dir, item_ids)
    try:
        export.top_k([np.array([1])], k)
    except tf.errors.InvalidArgumentError as error:
        found = re.search(r"k_max=(\d+)", error.message)
        limit = f"k_max = {found.group(1)}" if found else f"its limit ({error.message.strip()})"
        raise ValueError(f"max(ks) = {k} exceeds the export's {limit}; lower --ks or re-export with a larger "
                         f"k_max") from None


class TopKModelHandler(ModelHandler):
    """``RunInference`` handler: ``(history indices, target)`` -> ``PredictionResult`` whose
    ``inference`` is int64 [k] item indices, best first, 0 for an empty slot.

    Args:
      export_dir: A SavedModel written by ``tfx_xmatch.export`` (one version directory).
      item_ids: Raw id of each item index 1..N (the prepared data's vocabulary), in order.
      k: Results per example (``max(ks)``).
      batch_size: Examples per signature call.
    """

    def __init__(self, export_dir: str, item_ids: np.ndarray, k: int, batch_size: int = 256):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._export_dir, self._item_ids, self._k = str(export_dir), np.asarray(item_ids), int(k)

    def load_model(self) -> _Export:
        return _Export(self._export_dir, self._item_ids)

    def run_inference(self, batch: Sequence[tuple[np.ndarray, int]], model: _Export,
                      inference_args: Optional[dict] = None) -> list:
        items = model.top_k([history for history, _ in batch], self._k)
        return [PredictionResult(example, row) for example, row in zip(batch, items)]


class MetricsCombineFn(beam.CombineFn):
    """Combines ``PredictionResult``s into metrics; the accumulator is a ``FullRankingEvaluator``."""

    def __init__(self, num_items: int, ks: Sequence[int], popularity: Optional[np.ndarray]):
        self._num_items, self._ks, self._popularity = num_items, tuple(ks), popularity

    def create_accumulator(self) -> FullRankingEvaluator:
        return FullRankingEvaluator(self._num_items, self._ks, mask_history=True, item_popularity=self._popularity)

    def add_input(self, evaluator: FullRankingEvaluator, result: PredictionResult) -> FullRankingEvaluator:
        evaluator.update_from_top_k(np.asarray(result.inference)[None, :], np.array([result.example[1]]))
        return evaluator

    def merge_accumulators(self, evaluators) -> FullRankingEvaluator:
        merged, *others = evaluators
        for evaluator in others:
            merged.merge(evaluator)
        return merged

    def extract_output(self, evaluator: FullRankingEvaluator) -> dict:
        # result() refuses an empty evaluator; run_evaluate turns 0 examples into a clear error.
        return evaluator.result() if evaluator.num_examples else {"num_examples": 0.0}


def _target_in_history(example: tuple[np.ndarray, int]) -> int:
    return int(np.any(example[0] == example[1]))


def _with_counts(metrics: dict, targets_in_history: int) -> dict:
    counts = {name: int(metrics[name]) for name in ("num_examples", "num_tail_examples") if name in metrics}
    return dict(metrics, **counts, targets_in_history=int(targets_in_history))


def evaluate_pipeline(pipeline, export_dir: str, examples_pattern: str, item_vocab_path: str, *,
                      ks: Sequence[int] = (10, 20, 50), batch_size: int = 256,
                      popularity: Optional[np.ndarray] = None):
    """Adds the evaluation transforms to ``pipeline``.

    Args:
      pipeline: A ``beam.Pipeline``.
      export_dir: The export (a SavedModel version directory with a ``top_k`` signature).
      examples_pattern: Glob of the evaluation TFRecords (plain or ``.gz``).
      item_vocab_path: The prepared data's ``item_vocab.json`` (maps record indices to raw ids).
      ks: Cutoffs; the export is asked for ``max(ks)`` items per example.
      batch_size: Examples per call of the export.
      popularity: Optional training interactions per item index [num_items + 1], for TailRecall@K.

    Returns:
      A PCollection with one dict: ``FullRankingEvaluator.result()`` (``num_examples`` as an int)
      plus ``targets_in_history``.

    Raises:
      FileNotFoundError: No record matches, or the export or vocabulary is missing.
      ValueError: Bad ``ks`` or ``batch_size``, or an export that cannot answer ``max(ks)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    files = sorted(tf.io.gfile.glob(examples_pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord file matches {examples_pattern!r}")
    if not tf.io.gfile.exists(item_vocab_path):
        raise FileNotFoundError(f"item vocabulary {item_vocab_path!r} not found")
    vocab = Vocabulary.load(item_vocab_path)
    item_ids = vocab.ids(np.arange(1, vocab.num_items + 1))
    combine = MetricsCombineFn(vocab.num_items, ks, popularity)
    max_k = combine.create_accumulator().max_k  # also validates ks and popularity
    check_export(str(export_dir), item_ids, max_k)

    # Reshuffle spreads the records of few (often one) files over the workers for inference.
    examples = (pipeline | "ListFiles" >> beam.Create(files) | "ReadRecords" >> beam.FlatMap(read_records)
                | "Reshuffle" >> beam.Reshuffle() | "ParseExamples" >> beam.Map(parse_record))
    metrics = (examples | "TopK" >> RunInference(TopKModelHandler(export_dir, item_ids, max_k, batch_size))
               | "Metrics" >> beam.CombineGlobally(combine))
    in_history = (examples | "TargetInHistory" >> beam.Map(_target_in_history)
                  | "CountTargetsInHistory" >> beam.CombineGlobally(sum))
    return metrics | "AddCounts" >> beam.Map(_with_counts, beam.pvalue.AsSingleton(in_history))


def run_evaluate(export_dir: str, prepared_dir: str, *, split: str = "test", ks: Sequence[int] = (10, 20, 50),
                 batch_size: int = 256, output_path: Optional[str] = None,
                 beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """Runs :func:`evaluate_pipeline` over one split of a prepared directory.

    TailRecall@K uses the training interactions of the directory's ``train`` records when they
    exist. The output is a pure function of the inputs, so a re-run writes the same file.

    Args:
      export_dir: The export's version directory.
      prepared_dir: Output of ``write_split_tfrecords`` / the ``prepare`` pipeline.
      split: "validation" or "test".
      ks: Cutoffs.
      batch_size: Examples per call of the export.
      output_path: If given, ``{"metrics": ..., "settings": ...}`` is written there atomically.
      beam_args: Runner flags (default: the DirectRunner in this process).

    Returns:
      The metrics dict (see :func:`evaluate_pipeline`).

    Raises:
      FileNotFoundError: Missing records of the split, statistics.json (an unfinished
        preparation), vocabulary or export.
      ValueError: Unknown split, no examples, or bad ``ks`` / export (see ``evaluate_pipeline``).
      IsADirectoryError, NotADirectoryError, PermissionError: ``output_path`` cannot be
        written (checked before the evaluation runs).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if output_path is not None:  # checked now, not after the whole evaluation
        from tfx_xmatch.io_utils import check_output_location

        check_output_location(output_path, "--output", directory=False)
    pattern = shard_pattern(prepared_dir, split, "*")
    if not tf.io.gfile.glob(pattern):
        expected = os.path.join(prepared_dir, os.path.basename(pattern))  # as given, not escaped
        raise FileNotFoundError(f"no {split} TFRecords in {prepared_dir!r} (expected {expected}); "
                                "run the prepare pipeline first")
    if not tf.io.gfile.exists(os.path.join(prepared_dir, "statistics.json")):
        raise FileNotFoundError(f"{prepared_dir!r} has no statistics.json, the mark of a finished preparation "
                                "(interrupted, or still running?); run the prepare pipeline again")
    vocab_path = os.path.join(prepared_dir, "item_vocab.json")
    train_pattern = shard_pattern(prepared_dir, "train", "*")
    popularity = None
    if train_records_lack_one_item_sequences(prepared_dir):
        # Their tail set would differ from the in-process evaluation's, without a word.
        logging.getLogger("tfx_xmatch.pipelines.evaluate").warning(
            "%s was prepared by an older version whose train records leave out one-item training sequences: "
            "TailRecall is not reported (prepare the data again to have it)", prepared_dir)
    elif tf.io.gfile.glob(train_pattern) and tf.io.gfile.exists(vocab_path):
        popularity = record_counts(train_pattern, Vocabulary.load(vocab_path).num_items)[1]

    settings = {"export_dir": absolute_unless_url(export_dir), "prepared_dir": absolute_unless_url(prepared_dir),
                "split": split, "ks": sorted(set(ks)), "batch_size": batch_size,
                "mask_history": True, "tail_popularity": "train records" if popularity is not None else None}
    # The last step writes the result through tf.io.gfile, so output_path may be on any file
    # system the workers reach (gs://...); without one, a local temporary file carries it back.
    # The result lands beside output_path first and replaces it only when there is one: an
    # empty evaluation must not overwrite an earlier file.
    staging = None if output_path is not None else tempfile.mkdtemp(prefix="xmatch-evaluate-")
    target = (f"{output_path}.partial-{uuid.uuid4().hex}" if output_path is not None
              else os.path.join(staging, "metrics.json"))
    try:
        with beam.Pipeline(options=pipeline_options(beam_args)) as pipeline:
            metrics = evaluate_pipeline(pipeline, export_dir, pattern, vocab_path, ks=ks, batch_size=batch_size,
                                        popularity=popularity)
            _ = metrics | "Write" >> beam.Map(
                lambda result: write_text(target, json_text({"metrics": result, "settings": settings})))
        with tf.io.gfile.GFile(target) as handle:
            metrics = json.load(handle)["metrics"]
        if not metrics["num_examples"]:
            raise ValueError(f"no examples in {pattern!r}: nothing to evaluate")
        if output_path is not None:
            tf.io.gfile.rename(target, output_path, overwrite=True)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            remove_if_present(target)
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m tfx_xmatch.pipelines.evaluate --export-dir ... --prepared-dir ...``.

    Unrecognised flags are passed to Beam (e.g. ``--runner=FlinkRunner``).

    Returns:
      0 on success; bad inputs exit with status 2 and the reason.
    """
    parser = argparse.ArgumentParser(prog="xmatch pipeline evaluate",
                                     description="Full-ranking evaluation of an exported model with Apache Beam.")
    parser.add_argument("--export-dir", required=True, help="SavedModel version directory of the export")
    parser.add_argument("--prepared-dir", required=True, help="directory written by the prepare pipeline")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50], help="cutoffs K")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per call of the export")
    parser.add_argument("--output", help="metrics JSON file (written atomically)")
    args, beam_args = split_arguments(parser, argv)
    try:
        metrics = run_evaluate(args.export_dir, args.prepared_dir, split=args.split, ks=args.ks,
                               batch_size=args.batch_size, output_path=args.output, beam_args=beam_args)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
