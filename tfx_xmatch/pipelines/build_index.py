"""Beam pipeline ``build_index``: catalogue item embeddings and SparCode posting lists.

From a run's saved model (``RUN_DIR/model``, loaded once per worker) it writes to ``OUTPUT_DIR``:

* ``item_embeddings.npy``: float32 [N + 1, D], row 0 the padding row, like
  ``model.item_embeddings()``; item shards (ranges of 1..N) are embedded in parallel.
* For SparCode, ``sparse_code_index.npz``: the posting lists ``model.build_index`` puts in a
  ``SparseCodeIndex`` with the same budget, entry for entry. Each (code shard x item shard) block
  of the [N, C] score table is pruned to the budget alone; a combiner merges the blocks, pruning
  again at twice the budget. Exact, because an entry among the global best (per code or overall)
  is among its block's best too (see ``prune_entries``). ``load_sparse_code_index`` loads it.
* ``index_stats.json``: counts, shards and budget, written last.

Scores come in chunks of ``batch_size`` items over all codes, on ``SparCode.build_index``'s grid
(item shards are whole chunks): matmuls round differently for other shapes, so a code shard
scoring its own slice would not reproduce the in-process scores bit for bit. Code shards split
the pruning. Outputs are written to temporary names and renamed, and nothing depends on bundle
order: a re-run writes identical bytes. ``run_build_index`` adds ``build_index_summary.json``
(the statistics plus the wall time). Every file is read and written through ``tf.io.gfile``, so
``RUN_DIR`` and ``OUTPUT_DIR`` may be local or on any file system TensorFlow reaches (``gs://``,
``hdfs://``, ``s3://`` with its plug-in): on Dataflow or Flink, give URLs every worker reaches.

    python -m tfx_xmatch.pipelines.build_index --run-dir runs/ml1m-sparcode --output-dir index/ \\
        --item-shards 8 --code-shards 4 --cache-fraction 0.01 [--runner=FlinkRunner ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time
import zipfile
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch import training
from tfx_xmatch.arguments import is_integer
from tfx_xmatch.index.sparse_code_index import SparseCodeIndex, cache_budget, entries_to_postings, prune_entries
from tfx_xmatch.io_utils import json_text
from tfx_xmatch.models import SparCode
from tfx_xmatch.pipelines.beam_utils import (gfile_temporary, pipeline_options, read_bytes, remove_if_present,
                                             require_beam, split_arguments, write_bytes, write_text)

beam = require_beam()
from apache_beam.utils.shared import Shared  # noqa: E402

EMBEDDINGS_FILE = "item_embeddings.npy"
POSTINGS_FILE = "sparse_code_index.npz"
STATS_FILE = "index_stats.json"
SUMMARY_FILE = "build_index_summary.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # a fixed member time keeps the .npz byte-identical across runs
# One handle per saved model: several builds of one model in a pipeline load it once per worker.
_SHARED_MODELS: dict[str, Shared] = {}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything the transforms need, checked and computed once on the launcher."""

    model_dir: str
    model_tag: str  # reloads the shared model when the saved one changes
    model_name: str
    num_items: int
    num_codes: Optional[int]  # None: not a SparCode model, no posting lists
    item_ranges: tuple
    code_ranges: tuple
    batch_size: int
    max_items_per_code: Optional[int]
    cache_fraction: Optional[float]
    output_dir: str
    max_postings: Optional[int]  # M, the global cap of cache_fraction


def _plan(run_dir, output_dir, item_shards, code_shards, max_items_per_code, cache_fraction, batch_size) -> _Plan:
    for name, value in (("item_shards", item_shards), ("code_shards", code_shards), ("batch_size", batch_size)):
        if not is_integer(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    SparseCodeIndex(max_items_per_code=max_items_per_code, cache_fraction=cache_fraction)  # checks the budget
    # Strings joined with os.path, not pathlib, which would turn "gs://b/x" into the local "gs:/b/x".
    run_dir, output_dir = os.fspath(run_dir), os.fspath(output_dir)
    if not tf.io.gfile.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    model_dir = os.path.join(run_dir, "model")
    config_path = os.path.join(model_dir, "config.json")
    if not tf.io.gfile.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: is {run_dir!r} a training run directory?")
    if "://" not in output_dir and os.path.realpath(output_dir) in (os.path.realpath(run_dir),
                                                                      os.path.realpath(model_dir)):
        raise ValueError(f"the output directory {output_dir!r} is the run's own directory: the index files would "
                         "mix with the run's; give another --output-dir")
    saved = json.loads(read_bytes(config_path))
    name, config = saved["model"], saved["config"]
    try:
        model_class = training.model_class(name, saved.get("module"))
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from error.__cause__
    if model_class is None:  # the workers could not load it either
        raise ValueError(f"{config_path} names the model {name!r}, neither a built-in one nor a class "
                         f"{training.unregistered_because(saved.get('module'))}")
    is_sparcode = issubclass(model_class, SparCode)
    num_items = int(config["num_items"])
    num_codes = None
    if is_sparcode and config.get("quantize", True):
        num_codes = int(config["num_codebooks"]) * int(config["num_codewords"])
        if max_items_per_code is None and cache_fraction is None:  # the cache the model was selected on
            cache_fraction = config.get("serving_cache_fraction")
    elif max_items_per_code is not None or cache_fraction is not None:
        budget = f"max_items_per_code={max_items_per_code!r}, cache_fraction={cache_fraction!r}"
        raise ValueError(f"a budget ({budget}) asks for SparCode posting lists, but the model in {str(run_dir)!r} "
                         f"is {name!r}{' with quantize=False' if is_sparcode else ''}: it has no codes")
    # Item shards are whole chunks of the SparCode.build_index grid, so scores match bit for bit.
    chunks = -(-num_items // batch_size)
    bounds = [1 + min(chunks * s // item_shards * batch_size, num_items) for s in range(item_shards + 1)]
    item_ranges = tuple((lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo)
    code_ranges = ()
    if num_codes is not None:
        bounds = [num_codes * c // code_shards for c in range(code_shards + 1)]
        code_ranges = tuple((lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo)
    return _Plan(model_dir, f"{model_dir}@{tf.io.gfile.stat(config_path).mtime_nsec}", name, num_items,
                 num_codes, item_ranges, code_ranges, int(batch_size),
                 None if max_items_per_code is None else int(max_items_per_code),
                 None if cache_fraction is None else float(cache_fraction), output_dir,
                 cache_budget(cache_fraction, num_codes, num_items) if num_codes else None)


class _EmbedItems(beam.DoFn):
    """Item range -> its embedding rows; for SparCode also one dense block per code shard."""

    BLOCKS = "blocks"

    def __init__(self, plan: _Plan, shared: Shared):
        self._plan, self._shared = plan, shared

    def setup(self) -> None:
        # One model per worker process, shared by its threads and reused across bundles.
        self._model = self._shared.acquire(lambda: training.load_model(self._plan.model_dir), tag=self._plan.model_tag)

    def process(self, item_range):
        start, stop, size = *item_range, self._plan.batch_size
        rows = np.concatenate([
            self._model.item_embeddings(tf.range(first, min(first + size, stop), dtype=tf.int32)).numpy()
            for first in range(start, stop, size)])
        yield start, rows
        if start >= 1:  # the padding row (range 0..1) has no postings
            for first_code, end_code in self._plan.code_ranges:
                yield beam.pvalue.TaggedOutput(self.BLOCKS, (first_code, start, rows[:, first_code:end_code]))


def _prune_block(block, num_codes: int, per_code: Optional[int], total: Optional[int]):
    """Dense block (first code, first item, [n, c] scores) -> (codes, rows, scores, positives)."""
    first_code, first_item, values = block
    table = values.T  # [c, n]
    positive = table > 0  # NaN and <= 0 are never stored, as in SparseCodeIndex
    codes, rows = np.nonzero(positive)
    scores = table[codes, rows]
    codes = (codes + first_code).astype(np.int32)
    rows = (rows + first_item - 1).astype(np.int32)  # row positions of items 1..N are 0..N-1
    return (*prune_entries(codes, rows, scores, num_codes, per_code, total), int(positive.sum()))


class _MergePostings(beam.CombineFn):
    """Union of pruned blocks under the global budget; output as in ``SparseCodeIndex``."""

    def __init__(self, num_codes: int, per_code: Optional[int], total: Optional[int]):
        self.num_codes, self.per_code, self.total = num_codes, per_code, total
        caps = [cap for cap in (per_code and per_code * num_codes, total) if cap]
        self.capacity = min(caps) if caps else None

    def create_accumulator(self):
        return [[], 0]  # (codes, rows, scores) parts, positive entries seen

    def _compacted(self, accumulator, force: bool = False):
        parts = accumulator[0]
        # Pruning at twice the budget keeps the work per entry amortised constant.
        if parts and (force or (self.capacity is not None and sum(len(p[0]) for p in parts) > 2 * self.capacity)):
            merged = (np.concatenate(column) for column in zip(*parts))
            accumulator[0] = [prune_entries(*merged, self.num_codes, self.per_code, self.total)]
        return accumulator

    def add_input(self, accumulator, block):
        accumulator[0].append(block[:3])
        accumulator[1] += block[3]
        return self._compacted(accumulator)

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        merged = [[part for parts, _ in accumulators for part in parts], sum(n for _, n in accumulators)]
        return self._compacted(merged)

    def extract_output(self, accumulator):
        (parts, positives), empty = self._compacted(accumulator, force=True), np.zeros(0, np.int32)
        entries = parts[0] if parts else (empty, empty, np.zeros(0, np.float32))
        return (*entries_to_postings(*entries, self.num_codes), positives)


def _unmark(plan: _Plan) -> None:
    """Removes the statistics of an earlier build, just before one of its files is replaced.

    The statistics mark a finished build, so an interrupted rebuild must not pass new files off
    under them; removed no sooner, so a build that fails before writing (a run directory
    without weights) leaves the earlier one whole.
    """
    for name in (STATS_FILE, SUMMARY_FILE):
        remove_if_present(os.path.join(plan.output_dir, name))


def _write_embeddings(pieces: list, plan: _Plan) -> dict:
    pieces = sorted(pieces, key=lambda piece: piece[0])
    embeddings = np.concatenate([rows for _, rows in pieces]).astype(np.float32)
    starts = [start for start, _ in pieces]
    if starts != [0] + [lo for lo, _ in plan.item_ranges] or len(embeddings) != plan.num_items + 1:
        raise RuntimeError(f"item shards starting at {starts} do not cover items 0..{plan.num_items}")
    _unmark(plan)
    with gfile_temporary(os.path.join(plan.output_dir, EMBEDDINGS_FILE)) as temporary:
        with tf.io.gfile.GFile(temporary, "wb") as handle:
            np.save(handle, embeddings, allow_pickle=False)
    return {"num_items": plan.num_items, "dimension": int(embeddings.shape[1])}


def _write_postings(merged, plan: _Plan) -> dict:
    items, scores, splits, positives = merged
    arrays = {"posting_items": items, "posting_scores": scores, "posting_splits": splits,
              "identifiers": np.arange(1, plan.num_items + 1, dtype=np.int64)}
    # Zipped in memory: zipfile needs tell(), which object stores' write streams lack.
    content = io.BytesIO()
    with zipfile.ZipFile(content, "w", zipfile.ZIP_STORED) as archive:  # np.savez would stamp the time
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), buffer.getvalue())
    _unmark(plan)
    write_bytes(os.path.join(plan.output_dir, POSTINGS_FILE), content.getvalue())
    lengths = np.diff(splits)
    return {"num_codes": plan.num_codes, "max_items_per_code": plan.max_items_per_code,
            "cache_fraction": plan.cache_fraction, "max_postings": plan.max_postings,
            "positive_entries": positives, "postings": int(len(items)), "is_exact": int(len(items)) == positives,
            "longest_posting_list": int(lengths.max()), "empty_posting_lists": int((lengths == 0).sum())}


def _write_stats(parts: list, plan: _Plan) -> dict:
    stats = {"model": plan.model_name, "batch_size": plan.batch_size, "item_shards": len(plan.item_ranges),
             "code_shards": len(plan.code_ranges) or None, "files": [EMBEDDINGS_FILE]}
    for part in parts:
        stats.update(part)
    if plan.num_codes is not None:
        stats["files"].append(POSTINGS_FILE)
    else:  # a previous SparCode build here would otherwise pass for this model's index
        remove_if_present(os.path.join(plan.output_dir, POSTINGS_FILE))
    stats = dict(sorted(stats.items()))
    write_text(os.path.join(plan.output_dir, STATS_FILE), json_text(stats))
    return stats


class _BuildIndex(beam.PTransform):
    def __init__(self, plan: _Plan):
        super().__init__()
        self._plan = plan

    def expand(self, pbegin):
        plan = self._plan
        ranges = [(0, 1), *plan.item_ranges]  # (0, 1): the padding row
        embed = _EmbedItems(plan, _SHARED_MODELS.setdefault(plan.model_tag, Shared()))
        embedded = (pbegin | "ItemShards" >> beam.Create(ranges) | "Reshard" >> beam.Reshuffle()
                    | "Embed" >> beam.ParDo(embed).with_outputs(_EmbedItems.BLOCKS, main="rows"))
        stats = [embedded.rows | "AllRows" >> beam.combiners.ToList()
                 | "WriteEmbeddings" >> beam.Map(_write_embeddings, plan)]
        if plan.num_codes is not None:
            per_code, total = plan.max_items_per_code, plan.max_postings
            stats.append(embedded[_EmbedItems.BLOCKS]
                         | "SpreadBlocks" >> beam.Reshuffle()  # code x item blocks go to any worker
                         | "PruneBlocks" >> beam.Map(_prune_block, plan.num_codes, per_code, total)
                         | "Merge" >> beam.CombineGlobally(_MergePostings(plan.num_codes, per_code, total))
                         | "WritePostings" >> beam.Map(_write_postings, plan))
        return (stats | "Parts" >> beam.Flatten() | "AllParts" >> beam.combiners.ToList()
                | "WriteStats" >> beam.Map(_write_stats, plan))


def build_index_pipeline(pipeline, run_dir: str | os.PathLike, output_dir: str | os.PathLike, *, item_shards: int,
                         code_shards: int, max_items_per_code: Optional[int] = None,
                         cache_fraction: Optional[float] = None, batch_size: int = 4096):
    """Adds the build-index transforms to ``pipeline`` (several calls may share one pipeline).

    Args:
      pipeline: A ``beam.Pipeline``.
      run_dir: Training run directory holding ``model/`` (``tfx_xmatch.training.save_model``).
      output_dir: Where the outputs go (created if missing; see the module docstring).
      item_shards: Item shards, int >= 1 (at most one per chunk of ``batch_size`` items is used).
      code_shards: Code shards of the posting-list pruning, int >= 1 (at most C used; ignored
        for models without codes).
      max_items_per_code: SparCode budget L (``SparseCodeIndex``), or None.
      cache_fraction: SparCode budget f in (0, 1], or None.
      batch_size: Items per forward pass, int >= 1; ``SparCode.build_index``'s default.

    Returns:
      A PCollection with one element, the statistics dict written to ``index_stats.json``.

    Raises:
      FileNotFoundError: If ``run_dir`` or its saved model is missing.
      ValueError: If a shard count, batch size or budget is out of range, or a budget is given
        for a model without codes (the message names the value).
    """
    plan = _plan(run_dir, output_dir, item_shards, code_shards, max_items_per_code, cache_fraction, batch_size)
    return pipeline | f"BuildIndex({plan.output_dir})" >> _BuildIndex(plan)


def run_build_index(run_dir: str | os.PathLike, output_dir: str | os.PathLike, *, beam_args: Sequence[str] = (),
                    item_shards: int = 8, code_shards: int = 4, max_items_per_code: Optional[int] = None,
                    cache_fraction: Optional[float] = None, batch_size: int = 4096) -> dict:
    """Runs ``build_index_pipeline`` and writes ``build_index_summary.json``.

    Args:
      run_dir, output_dir, item_shards, code_shards, max_items_per_code, cache_fraction,
        batch_size: See ``build_index_pipeline``.
      beam_args: Beam flags (default: the DirectRunner in this process).

    Returns:
      The statistics plus ``wall_seconds``.

    Raises:
      FileNotFoundError, ValueError: As ``build_index_pipeline``, before anything runs.
    """
    settings = dict(item_shards=item_shards, code_shards=code_shards, max_items_per_code=max_items_per_code,
                    cache_fraction=cache_fraction, batch_size=batch_size)
    _plan(run_dir, output_dir, **settings)  # fail before starting a runner
    output_dir = os.fspath(output_dir)
    started = time.perf_counter()
    with beam.Pipeline(options=pipeline_options(beam_args)) as pipeline:
        build_index_pipeline(pipeline, run_dir, output_dir, **settings)
    stats = json.loads(read_bytes(os.path.join(output_dir, STATS_FILE)))
    summary = {**stats, "wall_seconds": round(time.perf_counter() - started, 3)}
    write_text(os.path.join(output_dir, SUMMARY_FILE), json_text(summary))
    return summary


def finished_build(output_dir: str | os.PathLike) -> dict:
    """The statistics of a finished build in ``output_dir``.

    Raises:
      FileNotFoundError: If the directory has no statistics (no build, or one that did not finish).
    """
    path = os.path.join(os.fspath(output_dir), STATS_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{os.fspath(output_dir)!r} has no {STATS_FILE}: no build_index finished there "
                                "(interrupted?); run build_index again")
    return json.loads(read_bytes(path))


def load_item_embeddings(output_dir: str | os.PathLike) -> np.ndarray:
    """The catalogue's item embeddings of a finished build: float32 [N + 1, D], row 0 padding.

    Raises:
      FileNotFoundError: If the directory holds no finished build.
    """
    finished_build(output_dir)
    # Straight from the file handle (it seeks): reading the bytes first would hold the table twice.
    with tf.io.gfile.GFile(os.path.join(os.fspath(output_dir), EMBEDDINGS_FILE), "rb") as handle:
        return np.load(handle, allow_pickle=False)


def load_sparse_code_index(output_dir: str | os.PathLike, k_max: int = 100, **kwargs) -> SparseCodeIndex:
    """A ``SparseCodeIndex`` (identifiers: item indices 1..N) with the pipeline's posting lists.

    Args:
      output_dir: The pipeline's output directory.
      k_max, **kwargs: ``SparseCodeIndex`` arguments (the budget comes from the statistics).

    Returns:
      The index.

    Raises:
      FileNotFoundError: If the directory holds no posting lists.
    """
    stats = finished_build(output_dir)
    path = os.path.join(os.fspath(output_dir), POSTINGS_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: was build_index run on a SparCode model into "
                                f"{os.fspath(output_dir)!r}?")
    index = SparseCodeIndex(k_max=k_max, max_items_per_code=stats["max_items_per_code"],
                            cache_fraction=stats["cache_fraction"], **kwargs)
    with tf.io.gfile.GFile(path, "rb") as handle, np.load(handle, allow_pickle=False) as arrays:
        return index.load_postings(arrays["posting_items"], arrays["posting_scores"], arrays["posting_splits"],
                                   arrays["identifiers"], num_positive_entries=stats["positive_entries"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m tfx_xmatch.pipelines.build_index --run-dir ... --output-dir ...``.

    Unrecognised flags are passed to Beam (e.g. ``--runner=FlinkRunner``).

    Returns:
      0 on success; bad inputs exit with status 2 and the reason.
    """
    parser = argparse.ArgumentParser(prog="xmatch pipeline build-index",
                                     description="Item embeddings and SparCode posting lists with Apache Beam.")
    parser.add_argument("--run-dir", required=True, help="training run directory (with model/)")
    parser.add_argument("--output-dir", required=True, help="where the index files go")
    parser.add_argument("--item-shards", type=int, default=8, help="at most one per --batch-size items")
    parser.add_argument("--code-shards", type=int, default=4, help="SparCode: code ranges pruned in parallel")
    parser.add_argument("--max-items-per-code", type=int, help="SparCode budget L: posting-list length cap")
    parser.add_argument("--cache-fraction", type=float, help="SparCode budget f: fraction of the table kept "
                        "(default, when neither budget is given: the model's serving_cache_fraction, if set)")
    parser.add_argument("--batch-size", type=int, default=4096, help="items per forward pass")
    args, beam_args = split_arguments(parser, argv)
    try:
        summary = run_build_index(args.run_dir, args.output_dir, beam_args=beam_args, item_shards=args.item_shards,
                                  code_shards=args.code_shards, max_items_per_code=args.max_items_per_code,
                                  cache_fraction=args.cache_fraction, batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
