"""Next-item examples as sharded TFRecord files of tf.train.Example, and reading them back.

Record layout (all int64): ``history`` (variable-length list, oldest first, unpadded),
``target``, optional ``user_row`` (the user's row in the source dataset) and one scalar per
user feature. Padding happens in-graph when reading, so one set of files serves any
``max_length``. This is the hand-off format to TFX / Beam pipelines: :func:`read_tfrecords`
gives ``eval_dataset``'s dicts and :func:`read_training_tfrecords` gives
``sequence_training_dataset``'s (history and next_items of every position).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import re
import struct
import zlib
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch.data.dataset import PAD_INDEX, EvalExamples, Split, check_user_feature_names
from tfx_xmatch.io_utils import atomic_paths, write_json_atomic
from tfx_xmatch.user_errors import clean_tf_message

_UNKNOWN_USER_ROW = -1
SPLIT_PARTS = ("train", "validation", "test")


def shard_paths(path_prefix: str, num_shards: int) -> list[str]:
    """The file names ``{prefix}-{i:05d}-of-{n:05d}.tfrecord`` for ``num_shards`` shards.

    Args:
      path_prefix: Path prefix, e.g. ``out/test``.
      num_shards: Number of shards (at least 1).

    Returns:
      The shard paths in order.

    Raises:
      ValueError: If ``num_shards`` is below 1.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards!r}")
    return [f"{path_prefix}-{shard:05d}-of-{num_shards:05d}.tfrecord" for shard in range(num_shards)]


def shard_pattern(directory: str, part: str, suffix: str = "") -> str:
    """The glob of a part's shards in ``directory``, ``DIR/{part}-*-of-*.tfrecord{suffix}``, with
    the directory's own glob characters escaped: an output directory named ``exp[1]`` was
    written, then read back as a pattern ("exp" and one of "1") that matched nothing."""
    return os.path.join(glob.escape(directory), f"{part}-*-of-*.tfrecord{suffix}")


def remove_stale_shards(path_prefix: str, keep: Sequence[str]) -> list[str]:
    """Deletes shards ``{prefix}-NNNNN-of-MMMMM.tfrecord`` not in ``keep`` (an older sharding).

    Goes through ``tf.io.gfile``, so the prefix may be local or remote (``gs://``).
    """
    directory = os.path.dirname(path_prefix) or "."
    pattern = re.compile(re.escape(os.path.basename(path_prefix)) + r"-\d{5,}-of-\d{5,}\.tfrecord")
    keep_names = {os.path.basename(path) for path in keep}
    removed = []
    for name in sorted(tf.io.gfile.listdir(directory)):
        if pattern.fullmatch(name) and name not in keep_names:
            path = os.path.join(directory, name)
            try:
                tf.io.gfile.remove(path)
            except tf.errors.NotFoundError:  # removed concurrently
                continue
            removed.append(path)
    return removed


def _int64_feature(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def example_bytes(history: Sequence[int], target: int, scalars: Mapping[str, int]) -> bytes:
    """One serialized record: ``history``, ``target``, then the int64 ``scalars`` in order."""
    features = {
        "history": _int64_feature(np.asarray(history, dtype=np.int64).tolist()),
        "target": _int64_feature([int(target)]),
    }
    for name, value in scalars.items():
        features[name] = _int64_feature([int(value)])
    # Deterministic: a map's entries are otherwise written in an order that changes from one
    # Python process to the next, and identical inputs must give identical bytes.
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


def shard_boundaries(num_examples: int, num_shards: int) -> np.ndarray:
    """[num_shards + 1] example offsets of contiguous, near-equal shards."""
    return np.linspace(0, num_examples, num_shards + 1).astype(np.int64)


def write_tfrecords(
    path_prefix: str,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    user_features: Optional[Mapping[str, np.ndarray]] = None,
    num_shards: int = 1,
    *,
    user_rows: Optional[np.ndarray] = None,
) -> list[str]:
    """Writes next-item examples as tf.train.Example records, in contiguous shards.

    Examples keep their order: shard 0 holds the first ones, so reading the shards in name
    order gives the original order back. The shards are written to temporaries and renamed
    only once all are written, so a failure leaves the old shards as they were; then shards of
    the same prefix left by an earlier write with another ``num_shards`` are deleted, so a
    glob like ``{prefix}-*-of-*.tfrecord`` only matches the new ones.

    Args:
      path_prefix: Output prefix; shards are ``{prefix}-{i:05d}-of-{n:05d}.tfrecord`` (missing
        directories are created).
      histories: One item-index array per example, oldest first.
      targets: [E] next item of each example.
      user_features: Per-example int feature values (already looked up per example, each
        [E]), stored as int64 scalars.
      num_shards: Number of shards (at least 1; shards may be empty when there are fewer
        examples).
      user_rows: Optional [E] dataset row of each example's user, stored as ``user_row`` so
        that reading gives the same dict as ``eval_dataset``.

    Returns:
      The shard paths.

    Raises:
      ValueError: If the lengths of histories, targets, user_rows or features differ, a
        feature name is reserved, ``num_shards`` is below 1, or an example holds something
        other than integers (naming the example).
    """
    paths = shard_paths(path_prefix, num_shards)
    try:
        targets = np.asarray(targets, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"targets must be int64 item indices: {error}") from None
    num_examples = len(histories)
    if len(targets) != num_examples:
        raise ValueError(f"got {num_examples} histories but {len(targets)} targets")
    columns: dict[str, np.ndarray] = {}
    if user_rows is not None:
        columns["user_row"] = np.asarray(user_rows, dtype=np.int64)
    check_user_feature_names(user_features or {})
    for name, values in (user_features or {}).items():
        columns[name] = np.asarray(values, dtype=np.int64)
    for name, values in columns.items():
        if values.shape != (num_examples,):
            raise ValueError(f"{name} must have shape ({num_examples},) like targets, got {values.shape}")

    boundaries = shard_boundaries(num_examples, num_shards)
    # All shards are written before any is replaced: a bad example in the last one must not
    # leave the earlier shards new and the later ones old.
    with atomic_paths(paths) as temporaries:
        for shard, temporary in enumerate(temporaries):
            with tf.io.TFRecordWriter(str(temporary)) as writer:
                for k in range(boundaries[shard], boundaries[shard + 1]):
                    scalars = {name: int(values[k]) for name, values in columns.items()}
                    writer.write(_checked_example_bytes(k, histories[k], targets[k], scalars))
    remove_stale_shards(path_prefix, paths)
    return paths


def _checked_example_bytes(index: int, history, target: int, scalars: Mapping[str, int]) -> bytes:
    try:
        return example_bytes(history, target, scalars)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"example {index}: its history {history!r} is not a list of int64 item indices "
                         f"({error})") from None


def feature_spec(user_feature_names: Sequence[str] = ()) -> dict[str, object]:
    """The ``tf.io.parse_example`` spec of the records written by :func:`write_tfrecords`.

    Args:
      user_feature_names: User features to parse (missing ones parse as 0, unknown).

    Returns:
      Spec with ``history`` (ragged int64), ``target`` (int64), ``user_row`` (int64, -1 when
      not stored) and one int64 scalar per user feature.

    Raises:
      ValueError: A feature name no pipeline dict or serving signature can take (as
        ``check_user_feature_names`` says).
    """
    spec: dict[str, object] = {
        "history": tf.io.RaggedFeature(tf.int64),
        "target": tf.io.FixedLenFeature([], tf.int64),
        "user_row": tf.io.FixedLenFeature([], tf.int64, default_value=_UNKNOWN_USER_ROW),
    }
    check_user_feature_names(user_feature_names)
    for name in user_feature_names:
        spec[name] = tf.io.FixedLenFeature([], tf.int64, default_value=0)
    return spec


def left_pad_ragged(histories: tf.RaggedTensor, max_length: int) -> tf.Tensor:
    """Left-pads (or keeps the most recent ``max_length`` of) each row, like ``pad_histories``.

    Args:
      histories: Ragged [B, None] item indices, oldest first.
      max_length: Output width.

    Returns:
      Dense [B, max_length] tensor with PAD_INDEX where there is no item.
    """
    # Reversing the flat values reverses the row order and every row, so each row starts with
    # its most recent item: right-padding/truncating then keeps the most recent items, and
    # reversing both axes back restores row order and oldest-first order with left padding.
    reversed_rows = tf.RaggedTensor.from_row_lengths(
        tf.reverse(histories.flat_values, axis=[0]), tf.reverse(histories.row_lengths(), axis=[0])
    )
    reversed_rows = tf.reverse(reversed_rows.to_tensor(PAD_INDEX, shape=[None, max_length]), axis=[0])
    return tf.reverse(reversed_rows, axis=[1])


def _glob_all(file_pattern) -> list[str]:
    """Files of each glob in name order; a directory named as such (no wildcard) stands for the
    files in it (ExampleGen's ``Split-train``: tf.data said only "Is a directory").

    Only such a literal pattern is asked whether it is a directory: one request per pattern,
    not per matched file (a request each on an object store).
    """
    patterns = [file_pattern] if isinstance(file_pattern, str) else list(file_pattern)
    files = []
    for pattern in patterns:
        if not any(wildcard in pattern for wildcard in "*?[") and tf.io.gfile.isdir(pattern):
            directory = pattern.rstrip("/")
            # An object store lists sub-directories with a trailing "/"; locally, ask.
            files += sorted(f"{directory}/{name}" for name in tf.io.gfile.listdir(directory)
                            if not name.endswith("/") and ("://" in directory
                                                           or not os.path.isdir(os.path.join(directory, name))))
        else:
            files += sorted(tf.io.gfile.glob(pattern))
    return files


def matching_files(file_pattern) -> list[str]:
    """The record files a glob, a directory or a list of them names, as the readers take them.

    Raises:
      FileNotFoundError: If nothing matches.
    """
    files = _glob_all(file_pattern)
    if not files:
        raise FileNotFoundError(f"no TFRecord file matches {file_pattern!r}")
    return files


_RECORD_HEADER_BYTES = 12  # the data's length (uint64) and that length's masked CRC32C
_RECORD_FOOTER_BYTES = 4  # the data's masked CRC32C


def _where_cut_short(path: str) -> Optional[str]:
    """Where the TFRecord file ``path`` ends before its last record does, or None.

    tf.data stops silently, as if at the end of the file, when a file ends inside a record's
    12-byte header, and a GZIP file cut early reads as the records decoded so far: a copy cut
    short would train or evaluate on fewer records without a word. This reads the file once in
    large chunks, stepping from header to header, and a GZIP stream to its end marker. The
    CRCs are left to tf.data, which checks them as it reads.
    """
    record = start = 0  # the record being read and the byte where it starts
    header = b""  # the bytes of its header read so far
    to_skip = 0  # its data and footer bytes not read yet, once its header is whole
    with tf.io.gfile.GFile(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
        try:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                position = 0
                while position < len(chunk):
                    if to_skip:
                        step = min(to_skip, len(chunk) - position)
                        to_skip -= step
                        position += step
                        if not to_skip:  # the next record starts here
                            start += _RECORD_HEADER_BYTES + length + _RECORD_FOOTER_BYTES
                            record, header = record + 1, b""
                        continue
                    taken = chunk[position:position + _RECORD_HEADER_BYTES - len(header)]
                    header += taken
                    position += len(taken)
                    if len(header) == _RECORD_HEADER_BYTES:
                        (length,) = struct.unpack("<Q", header[:8])
                        to_skip = length + _RECORD_FOOTER_BYTES
        except (EOFError, zlib.error, gzip.BadGzipFile) as error:
            return f"its GZIP stream is cut short or damaged ({error})"
    if to_skip:
        return f"it ends inside record {record} (at byte {start}, {length} bytes long)"
    if header:
        return (f"it ends inside the header of record {record} (at byte {start}, "
                f"{len(header)} of {_RECORD_HEADER_BYTES} header bytes)")
    return None


def check_not_cut_short(files: Sequence[str]) -> None:
    """Checks that each TFRecord file holds whole records up to its end (see ``_where_cut_short``).

    Raises:
      tf.errors.DataLossError: ``<file>: it ends inside ...: the TFRecord file is damaged or
        cut short; write it again``, for the first file that is.
    """
    for path in files:
        # Training counts the records, then reads them: a file seen whole is not read again
        # while its length and modification time stay those it had then.
        version = _file_version(path)
        if version is not None and _FOUND_WHOLE.get(path) == version:
            continue
        where = _where_cut_short(path)
        if where is not None:
            raise tf.errors.DataLossError(
                None, None, f"{path}: {where}: the TFRecord file is damaged or cut short; write it again")
        if version is not None:
            _FOUND_WHOLE[path] = version


# path -> (length, modification time in ns) of a file ``check_not_cut_short`` found whole.
_FOUND_WHOLE: dict[str, tuple[int, int]] = {}


def _file_version(path: str) -> Optional[tuple[int, int]]:
    """(length, modification time in ns) of ``path``, or None where the time is not known.

    A local file's time comes from ``os.stat`` (tf.io.gfile rounds it to the second, so a file
    rewritten within that second at the same length would look unchanged).
    """
    if "://" not in path:
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    stat = tf.io.gfile.stat(path)
    return (stat.length, stat.mtime_nsec) if stat.mtime_nsec else None


def _matching_files(file_pattern, max_length: int, batch_size: int) -> list[str]:
    """Files of one glob or a list of globs (TFX passes lists), each glob's in name order.

    Raises:
      FileNotFoundError: If nothing matches.
      ValueError: If ``max_length`` or ``batch_size`` is not positive.
      tf.errors.DataLossError: If a file ends before its last record does (naming it).
    """
    for name, value in (("max_length", max_length), ("batch_size", batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    files = matching_files(file_pattern)
    check_not_cut_short(files)
    return files


_INT32_MAX = int(np.iinfo(np.int32).max)


def _checked_item_indices(parsed: dict, files) -> dict:
    """``parsed`` records once their history and target hold item indices in 0..int32 max.

    A record from another writer could hold anything: a cast to int32 wrapped 2**32 + 1 to
    item 1, and counting took -1 for the last item. The check fails the read (when it runs)
    naming ``files``.
    """
    history, target = parsed["history"], parsed["target"]
    values = tf.concat([history.flat_values, tf.reshape(target, [-1])], 0)
    message = f"{files}: a record holds an item index outside 0..{_INT32_MAX}"
    checks = [tf.debugging.assert_non_negative(values, message=message),
              tf.debugging.assert_less_equal(values, tf.constant(_INT32_MAX, values.dtype), message=message)]
    with tf.control_dependencies(checks):
        checked = dict(parsed, history=history.with_flat_values(tf.identity(history.flat_values)),
                       target=tf.identity(target))
    return checked


def _record_dataset(files: Sequence[str]) -> tf.data.Dataset:
    """A TFRecordDataset of ``files``; GZIP-compressed when they end in .gz (TFX ExampleGen's)."""
    compressed = {path.endswith(".gz") for path in files}
    if len(compressed) > 1:
        raise ValueError(f"cannot mix GZIP (.gz) and plain TFRecord files in one read: {sorted(files)[:4]}")
    return tf.data.TFRecordDataset(list(files), compression_type="GZIP" if compressed.pop() else "")


def _damaged_file(file_pattern) -> Optional[tuple[str, str]]:
    """The first file that cannot be read to its end, with TensorFlow's reason."""
    for path in _glob_all(file_pattern):
        try:
            for _ in _record_dataset([path]):
                pass
        except tf.errors.DataLossError as error:
            return path, clean_tf_message(error.message)
    return None


@contextlib.contextmanager
def damaged_file_named(file_pattern) -> Iterator[None]:
    """Names the file when reading TFRecords fails on a damaged or cut-short record.

    tf.data says only "corrupted record at 474" (a byte offset), not in which file: on that
    error the files are read again one at a time to find it.

    Args:
      file_pattern: The files read inside the block: a path, a glob or a list of them.

    Example:

    >>> import tempfile
    >>> path = tempfile.mkdtemp() + "/cut.tfrecord"
    >>> with tf.io.TFRecordWriter(path) as writer:
    ...     writer.write(b"a record")
    >>> with open(path, "r+b") as f:
    ...     _ = f.truncate(20)
    >>> try:
    ...     with damaged_file_named(path):
    ...         _ = list(tf.data.TFRecordDataset(path))
    ... except tf.errors.DataLossError as error:
    ...     print(error.message.startswith(path + ": truncated record at 0"))
    True

    Raises:
      tf.errors.DataLossError: ``<file>: <TensorFlow's reason>: ...``.
    """
    try:
        yield
    except tf.errors.DataLossError as error:
        found = _damaged_file(file_pattern)
        if found is None:
            raise
        path, reason = found
        raise tf.errors.DataLossError(
            error.node_def, error.op,
            f"{path}: {reason}: the TFRecord file is damaged or cut short; write it again") from None


def read_eval_examples(file_pattern, user_feature_names: Sequence[str] = ()) -> tuple[EvalExamples, dict]:
    """Reads evaluation records back into in-memory ``EvalExamples`` (for full-ranking evaluation).

    Args:
      file_pattern: A glob or a list of globs of shards written by :func:`write_tfrecords`
        (plain or GZIP-compressed ``.gz``).
      user_feature_names: User features to read.

    Returns:
      ``(examples, user_features)``: the examples in file order, with ``user_rows`` numbering
      them 0..E-1, and ``{name: int32 [E]}`` feature values indexed by those rows.

    Raises:
      FileNotFoundError: If no file matches.
      tf.errors.DataLossError: If a file is damaged or cut short (naming it).
    """
    files = _matching_files(file_pattern, 1, 1)
    spec = feature_spec(user_feature_names)
    histories, targets, features = [], [], {name: [] for name in user_feature_names}
    with damaged_file_named(files):
        for batch in _record_dataset(files).batch(1024).map(
                lambda s: _checked_item_indices(tf.io.parse_example(s, spec), file_pattern)):
            histories += [np.asarray(row, dtype=np.int32) for row in batch["history"].to_list()]
            targets.append(batch["target"].numpy())
            for name in user_feature_names:
                features[name].append(batch[name].numpy())
    targets = np.concatenate(targets).astype(np.int32) if targets else np.zeros(0, np.int32)
    examples = EvalExamples(user_rows=np.arange(len(targets), dtype=np.int64), histories=histories, targets=targets)
    return examples, {name: np.concatenate(values).astype(np.int32) for name, values in features.items()}


def read_tfrecords(
    file_pattern: str,
    *,
    max_length: int,
    batch_size: int,
    user_feature_names: Sequence[str] = (),
) -> tf.data.Dataset:
    """Reads records written by :func:`write_tfrecords` into ``eval_dataset``'s dict format.

    Files matching the pattern are read one after another in name order, so the examples come
    back in the order they were written.

    Args:
      file_pattern: Glob of the shards, e.g. ``out/test-*-of-*.tfrecord``, or a list of globs;
        ``.gz`` files are read as GZIP (TFX ExampleGen's output).
      max_length: Width L of the histories (padded/truncated in-graph).
      batch_size: Examples per batch.
      user_feature_names: User features to read.

    Returns:
      A dataset of ``{"history": int32 [B, L], "target": int32 [B], "user_row": int32 [B],
      <feature>: int32 [B]}``.

    Raises:
      FileNotFoundError: If no file matches the pattern.
      ValueError: If ``max_length`` or ``batch_size`` is not positive.

    Iterating the dataset raises tf.data's own ``DataLossError`` on a damaged file, which does
    not name it; iterate inside :func:`damaged_file_named` for one that does.
    """
    files = _matching_files(file_pattern, max_length, batch_size)
    spec = feature_spec(user_feature_names)

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = _checked_item_indices(tf.io.parse_example(serialized, spec), file_pattern)
        batch = {"history": tf.cast(left_pad_ragged(parsed.pop("history"), max_length), tf.int32)}
        for name, value in parsed.items():
            batch[name] = tf.cast(value, tf.int32)
        return batch

    return (
        _record_dataset(files)
        .batch(batch_size)
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def read_training_tfrecords(
    file_pattern: str,
    *,
    max_length: int,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    user_feature_names: Sequence[str] = (),
    drop_remainder: bool = False,
    shuffle_buffer_size: Optional[int] = None,
) -> tf.data.Dataset:
    """Reads training records into :func:`sequence_training_dataset`'s dict format.

    Each record (history, target) is the training sequence ``full = history + [target]``, as
    written by :func:`write_split_tfrecords` for ``train``. In-graph, ``history = full[:-1]``
    and ``next_items = full[1:]``, both cut to the most recent ``max_length`` and left-padded
    with 0, so ``next_items[t]`` is the item after ``history[t]`` (0 where ``history[t]`` is
    padding). Records with an empty history (a one-item sequence) have nothing to predict and
    are skipped, like one-item sequences in ``sequence_training_dataset``.

    Args:
      file_pattern: Glob of the shards, e.g. ``out/train-*-of-*.tfrecord``, or a list of globs;
        ``.gz`` files are read as GZIP (TFX ExampleGen's output).
      max_length: Width L of the rows.
      batch_size: Sequences per batch.
      shuffle: Shuffle records, differently every epoch (deterministic given ``seed``);
        otherwise records come in file (written) order.
      seed: Shuffle seed.
      user_feature_names: User features to read; each becomes an int32 [B] entry.
      drop_remainder: Drop the last incomplete batch (static batch size).
      shuffle_buffer_size: Records held by the shuffle buffer; None counts the records once
        and shuffles them all (a uniform shuffle, like ``sequence_training_dataset``).

    Returns:
      A dataset of ``{"history": int32 [B, L], "next_items": int32 [B, L], <feature>: int32 [B]}``.

    Raises:
      FileNotFoundError: If no file matches the pattern.
      ValueError: If ``max_length``, ``batch_size`` or ``shuffle_buffer_size`` is not
        positive, or a feature name is reserved.
      tf.errors.DataLossError: If counting the records (``shuffle_buffer_size`` None) meets
        a damaged or cut-short file (naming it). Iterating the dataset raises tf.data's own
        error, which does not; iterate inside :func:`damaged_file_named` for one that does.
    """
    files = _matching_files(file_pattern, max_length, batch_size)
    if shuffle_buffer_size is not None and shuffle_buffer_size <= 0:
        raise ValueError(f"shuffle_buffer_size must be positive, got {shuffle_buffer_size!r}")
    spec = feature_spec(user_feature_names)
    del spec["user_row"]  # not part of the training dict

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        parsed = _checked_item_indices(tf.io.parse_example(serialized, spec), file_pattern)
        history = parsed.pop("history")
        target = parsed.pop("target")
        target = tf.RaggedTensor.from_tensor(target[:, None], row_splits_dtype=history.row_splits.dtype)
        full = tf.concat([history, target], axis=1)  # the training sequence
        batch = {
            "history": tf.cast(left_pad_ragged(full[:, :-1], max_length), tf.int32),
            "next_items": tf.cast(left_pad_ragged(full[:, 1:], max_length), tf.int32),
        }
        for name, value in parsed.items():
            batch[name] = tf.cast(value, tf.int32)
        return batch

    def has_history(serialized: tf.Tensor) -> tf.Tensor:
        parsed = tf.io.parse_single_example(serialized, {"history": tf.io.RaggedFeature(tf.int64)})
        return tf.size(parsed["history"]) > 0

    dataset = _record_dataset(files).filter(has_history)
    if shuffle:
        if shuffle_buffer_size is None:
            with damaged_file_named(files):
                shuffle_buffer_size = max(1, int(dataset.reduce(np.int64(0), lambda count, _: count + 1)))
        dataset = dataset.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
    return (
        dataset.batch(batch_size, drop_remainder=drop_remainder)
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def _lookup(user_features: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.asarray(values)[rows] for name, values in user_features.items()}


def write_split_tfrecords(split: Split, directory: str, num_shards: int = 1) -> dict[str, list[str]]:
    """Writes a split as TFRecords plus its item vocabulary and statistics, all atomically.

    ``train`` holds one example per training sequence with at least two items (history
    ``seq[:-1]``, target ``seq[-1]``; read it with :func:`read_training_tfrecords`);
    ``validation`` and ``test`` hold the split's examples (read with :func:`read_tfrecords`).
    Every record carries ``user_row`` and the dataset's user features.

    Args:
      split: The split.
      directory: Output folder (created if missing).
      num_shards: Shards per part.

    Returns:
      ``{"train": [...], "validation": [...], "test": [...], "item_vocab": [path],
      "statistics": [path]}``.

    Raises:
      ValueError: If ``num_shards`` is below 1.
    """
    shard_paths(directory, num_shards)  # checks num_shards before the old marker goes
    os.makedirs(directory, exist_ok=True)
    statistics_path = os.path.join(directory, "statistics.json")
    # statistics.json marks a finished output: gone first, so an interrupted rewrite cannot leave
    # the old marker and vocabulary beside new shards.
    if os.path.exists(statistics_path):
        os.remove(statistics_path)
    user_features = split.dataset.user_features
    # A one-item sequence trains nothing (the reader skips a record without history), but its
    # item counts in the training popularity that tail recall reads (record_counts), as it does
    # in-process: left out, the two paths' tail sets differed.
    train_keep = [k for k, sequence in enumerate(split.train_sequences) if len(sequence) >= 1]
    train_rows = np.asarray(split.train_user_rows, dtype=np.int64)[train_keep]
    parts = {
        "train": (
            [split.train_sequences[k][:-1] for k in train_keep],
            np.asarray([split.train_sequences[k][-1] for k in train_keep], dtype=np.int64),
            train_rows,
        ),
        "validation": (split.validation.histories, split.validation.targets, split.validation.user_rows),
        "test": (split.test.histories, split.test.targets, split.test.user_rows),
    }
    written: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for part, (histories, targets, rows) in parts.items():
        rows = np.asarray(rows, dtype=np.int64)
        written[part] = write_tfrecords(
            os.path.join(directory, part),
            histories,
            targets,
            _lookup(user_features, rows),
            num_shards,
            user_rows=rows,
        )
        counts[part] = len(targets)

    vocab_path = os.path.join(directory, "item_vocab.json")
    split.dataset.item_vocab.save(vocab_path)
    statistics = {
        "dataset": split.dataset.statistics(),
        "split": split.name,
        "num_items": split.num_items,
        "examples": counts,
        "train_sequences": len(split.train_sequences),
        "train_interactions": int(sum(len(sequence) for sequence in split.train_sequences)),
        "user_feature_names": sorted(user_features),
        "malformed_lines": int(split.dataset.skipped_lines),
        "num_shards": num_shards,
        "files": {part: [os.path.basename(path) for path in paths] for part, paths in written.items()},
    }
    write_json_atomic(statistics_path, statistics)
    written["item_vocab"] = [vocab_path]
    written["statistics"] = [statistics_path]
    return written


def train_records_lack_one_item_sequences(prepared_dir: str) -> bool:
    """Whether ``prepared_dir``'s ``statistics.json`` counts fewer train records than training
    sequences: a preparation by a version before 2026-12-06 left out one-item sequences, so the
    training popularity ``record_counts`` reads misses their items (a different tail set for
    TailRecall). Such a version wrote train examples == sequences whenever none was one item
    long, when the records are complete anyway."""
    path = os.path.join(prepared_dir, "statistics.json")
    if not tf.io.gfile.exists(path):
        return False
    with tf.io.gfile.GFile(path, "rb") as handle:
        statistics = json.loads(handle.read())
    try:
        return int(statistics["examples"]["train"]) < int(statistics["train_sequences"])
    except (KeyError, TypeError, ValueError):
        return False


def record_counts(train_files, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-item counts over training-sequence TFRecords (``write_split_tfrecords``'s ``train``).

    Each record is one training sequence ``history + [target]``.

    Args:
      train_files: A glob or a list of globs of the train shards (plain or GZIP ``.gz``).
      num_items: Number of real items; indices in the records must be in 1..num_items.

    Returns:
      ``(target_counts, interactions)``, both int64 [num_items + 1] with index 0 (padding) = 0:
      how often each item is a next item to predict (every position but the first of a
      sequence; the logQ correction of sampled softmax), and how often it occurs at all (the
      training popularity that ``item_popularity`` wants for tail recall).

    Raises:
      FileNotFoundError: If no file matches.
      IndexError: If a record holds an item index above ``num_items``.
    """
    targets = np.zeros(num_items + 1, np.int64)
    interactions = np.zeros(num_items + 1, np.int64)
    examples, _ = read_eval_examples(train_files)
    for history, target in zip(examples.histories, examples.targets):
        sequence = np.append(history, target)
        if sequence.max(initial=0) > num_items:
            raise IndexError(f"a training record holds item index {int(sequence.max())}, but the vocabulary has "
                             f"{num_items} items: the records and the item_vocab.json given with them come from "
                             "different preparations")
        np.add.at(targets, sequence[1:], 1)
        np.add.at(interactions, sequence, 1)
    interactions[0] = targets[0] = 0
    return targets, interactions
