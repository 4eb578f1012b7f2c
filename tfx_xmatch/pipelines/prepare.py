"""Beam ``prepare``: raw interaction logs -> per-user sequences -> a split -> TFRecord shards,
the item vocabulary, statistics and a dead-letter file.

The output is the in-process ``write_split_tfrecords(make_split(load_dataset(path,
side_info=False, skip_bad_lines=True), ...))`` byte for byte, given the same dataset name (no
user features are written): lines are parsed by the loaders' ``LineParser`` / ``RowParser``,
users are split by the same per-user functions (``leave_one_out_user``, ``user_level_user``,
``time_user``), and records are serialized by ``example_bytes`` into the same contiguous shards.
Where the in-process loader would fail on a malformed line, the pipeline sends it to
``dead_letter.jsonl`` (file, line, problem, and the line, or the row as JSON for tables) and
counts it in ``statistics.json`` (``malformed_lines``); nothing is dropped silently. The split is
checked before any shard is replaced; every file is written to a temporary name and renamed,
``statistics.json`` last (a directory without it is not a finished output); every ordering is
fixed (users by first appearance, records by user row), so a re-run over the same input writes
identical files.

What stays global (one worker): the vocabulary (one entry per item), the user order (one per
user) and, for the ``time`` split without explicit cuts, all event times. Everything per event
and per user runs in parallel. Files are read whole, one per worker: split big logs into several
files to read them in parallel (their order is the sorted file names).

    python -m tfx_xmatch.pipelines.prepare --dataset ml-1m --data-dir ../shared/data --output-dir out/
    python -m tfx_xmatch.pipelines.prepare --input 'logs/*.tsv' --format ratings \\
        --reader-option 'sep=\\t' --output-dir out/ --split user_level \\
        --runner=FlinkRunner --flink_master=localhost:8081
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import fnmatch
import json
import logging
import os
import pathlib
import sys
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from tfx_xmatch.data.dataset import sequence_statistics
from tfx_xmatch.data.loaders import (
    DataFormatError, LineParser, ParsedLine, RowParser, is_typed_table, record_lines, table_rows, vocabulary_from_tokens,
)
from tfx_xmatch.data.registry import DATASETS
from tfx_xmatch.data.splits import (
    SPLITS, check_split_options, check_time_split, check_user_level, leave_one_out_user, time_cuts, time_user,
    user_level_parts, user_level_user,
)
from tfx_xmatch.data.tfrecord import SPLIT_PARTS, example_bytes, remove_stale_shards, shard_boundaries, shard_paths
from tfx_xmatch.io_utils import json_text
from tfx_xmatch.pipelines.beam_utils import (gfile_temporary, pipeline_options, remove_if_present, require_beam,
                                             split_arguments, write_text)

logger = logging.getLogger(__name__)

DEAD_LETTER_FILE = "dead_letter.jsonl"
LINE_OPTIONS = ("sep", "columns", "min_rating", "has_header")
TABLE_OPTIONS = ("user_column", "item_column", "timestamp_column", "rating_column", "min_rating", "sep")


@dataclasses.dataclass(frozen=True)
class PrepareSpec:
    """What ``prepare`` reads and writes.

    Attributes:
      inputs: File paths or glob patterns (any Beam file system); files are read in sorted order.
      format: "pairs", "sequences", "ratings" or "table" (see ``tfx_xmatch.data.loaders``).
      output_dir: Where the TFRecords, ``item_vocab.json``, ``statistics.json`` and the
        dead-letter file go (created if missing).
      name: Dataset name recorded in the statistics.
      reader_options: For "ratings": ``sep``, ``columns``, ``min_rating``, ``has_header``; for
        "table" (CSV/TSV with a header, Parquet): ``user_column``, ``item_column``,
        ``timestamp_column``, ``rating_column``, ``min_rating``, ``sep``.
      split: "leave_one_out", "user_level" or "time".
      split_options: Arguments of the split (e.g. ``min_length``, ``fractions``, ``seed``).
      num_shards: Shards per part (train, validation, test).
      encoding: Text encoding of the inputs.
    """

    inputs: tuple
    format: str
    output_dir: str
    name: str = "dataset"
    reader_options: dict = dataclasses.field(default_factory=dict)
    split: str = "leave_one_out"
    split_options: dict = dataclasses.field(default_factory=dict)
    num_shards: int = 1
    encoding: str = "utf-8-sig"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; known: {', '.join(SPLITS)}")
        if not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {self.num_shards!r}")
        known = TABLE_OPTIONS if self.format == "table" else LINE_OPTIONS
        unknown = sorted(set(self.reader_options) - set(known))
        if unknown:
            raise ValueError(f"unknown reader option(s) {unknown} for format {self.format!r}; known: {', '.join(known)}")
        parser = self.parser()  # validates the format and reader options now, not on a worker
        sep = self.reader_options.get("sep")
        if sep is not None and not isinstance(sep, str):
            raise ValueError(f"reader option sep must be a string, got {sep!r}")
        has_header = self.reader_options.get("has_header", False)
        if not isinstance(has_header, bool):  # "maybe" was taken as true: line 1 of every file dropped
            raise ValueError(f"reader option has_header must be true or false, got {has_header!r}")
        check_split_options(self.split, self.split_options)
        if self.split == "time" and not parser.has_timestamps:
            raise ValueError(f"the time split needs timestamps; {self.format!r} input has none (give a rating log "
                             "with a timestamp column, or a table with timestamp_column)")

    def needs_all_times(self) -> bool:
        """The time split computes a cut from every event time unless both cuts are given."""
        return self.split == "time" and any(self.split_options.get(cut) is None
                                            for cut in ("validation_time", "test_time"))

    def parser(self) -> Union[LineParser, RowParser]:
        """A new parser for one file (a rating log detects its separator per file)."""
        options = {key: value for key, value in self.reader_options.items() if key not in ("has_header", "sep")}
        if self.format == "table":
            return RowParser(**options)
        return LineParser(self.format, sep=self.reader_options.get("sep"), **options)

    @classmethod
    def for_dataset(cls, dataset: str, data_dir: str, output_dir: str, name: Optional[str] = None,
                    **kwargs: Any) -> "PrepareSpec":
        """The spec of a named benchmark dataset file (``DATASETS``) under ``data_dir``;
        ``name`` (default: ``dataset``) is what the statistics call it."""
        info = DATASETS.get(dataset)
        if info is None or info.kind != "file":
            files = sorted(key for key, value in DATASETS.items() if value.kind == "file")
            raise ValueError(f"prepare reads dataset files; {dataset!r} is not one of {files}")
        path = os.path.join(data_dir, info.relative_path)
        import tensorflow as tf  # its file systems reach gs://, as the Beam workers' reads do

        if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
            raise FileNotFoundError(f"dataset {dataset!r} expects its {info.format} file at {path!r}; not found")
        options = {**info.options, **kwargs.pop("reader_options", {})}
        return cls(inputs=(path,), format=info.format, output_dir=output_dir, name=name or dataset,
                   reader_options=options, **kwargs)


def match_inputs(patterns: Iterable[str]) -> list[str]:
    """Every file matching the patterns, sorted and without repeats.

    Raises:
      FileNotFoundError: If a pattern matches no file (the message names it).
      ValueError: If a pattern names a directory.
    """
    from apache_beam.io.filesystems import FileSystems

    paths: set[str] = set()
    for pattern in patterns:
        # Beam's local file system globs within a pattern's directory part, and finds nothing
        # for a bare "r_*.tsv" (no directory part) that "./r_*.tsv" matches.
        bare_glob = "://" not in pattern and not os.path.dirname(pattern) and any(c in pattern for c in "*?[")
        searched = os.path.join(os.curdir, pattern) if bare_glob else pattern
        found = [metadata.path for result in FileSystems.match([searched]) for metadata in result.metadata_list]
        if not found:
            raise FileNotFoundError(f"input pattern {pattern!r} matches no file")
        import tensorflow as tf

        folders = [path for path in found if tf.io.gfile.isdir(path)]
        if folders:  # it would fail on a worker, as IsADirectoryError, after the launch
            raise ValueError(f"input {pattern!r} names the directory {folders[0]!r}; give its files or a glob such "
                             f"as {pattern.rstrip('/')}/*")
        paths.update(found)
    return sorted(paths)


def written_names(num_shards: int) -> list[str]:
    """The names ``prepare`` writes into its output directory."""
    shards = [os.path.basename(path) for part in SPLIT_PARTS for path in shard_paths(part, num_shards)]
    return ["statistics.json", "item_vocab.json", DEAD_LETTER_FILE, *shards]


def check_inputs_outside_output(spec: PrepareSpec, files: Sequence[str]) -> None:
    """Refuses input files inside the output directory, and input globs that the outputs would
    match: a re-run read its own TFRecords, vocabulary and statistics as interactions (thousands
    of "malformed lines", other counts) and exited 0.

    Raises:
      ValueError: Naming the input (file or glob) and the output directory.
    """
    for pattern in spec.inputs:
        covered = next((name for name in written_names(spec.num_shards)
                        if _matches(pattern, os.path.join(spec.output_dir, name))), None)
        if covered is not None:
            raise ValueError(f"input {pattern!r} would also read the outputs written into the output directory "
                             f"{spec.output_dir!r} ({covered}, ...) as interactions; write the output elsewhere "
                             "or narrow the input pattern")
    output = _local_or_url(spec.output_dir, os.path.realpath).rstrip("/") + "/"
    for path in files:
        if _local_or_url(path, os.path.realpath).startswith(output):
            raise ValueError(f"input {path!r} lies inside the output directory {spec.output_dir!r}, so a re-run "
                             "would read the outputs written there as interactions; write the output elsewhere")


def _local_or_url(path: str, absolute) -> str:
    return path if "://" in path else absolute(path)


def _matches(pattern: str, path: str) -> bool:
    """Whether the glob ``pattern`` matches ``path`` as Beam's file systems match: ``*``, ``?``
    and ``[...]`` within one path component, ``**`` across components."""
    pattern, path = _local_or_url(pattern, os.path.abspath), _local_or_url(path, os.path.abspath)
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern)
    pattern_parts, path_parts = pattern.split("/"), path.split("/")
    return len(pattern_parts) == len(path_parts) and all(
        fnmatch.fnmatchcase(part, glob) for part, glob in zip(path_parts, pattern_parts))


def _read_bytes(path: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="auto") as handle:
        return handle.read()


def _parsed_lines(path: str, spec: PrepareSpec):
    """(line number, ParsedLine, raw record) of one input file."""
    parser = spec.parser()
    data = _read_bytes(path)
    if isinstance(parser, RowParser):
        typed = is_typed_table(path)
        for line_number, row, problem in table_rows(data, path, parser, sep=spec.reader_options.get("sep"),
                                                    encoding=spec.encoding):
            if problem is not None:
                yield line_number, ParsedLine(problem=problem), ""
            else:
                yield line_number, parser.parse(row, typed=typed), json.dumps(row, default=str, ensure_ascii=False)
        return
    for line_number, line, problem in record_lines(data, spec.encoding, spec.reader_options.get("has_header", False)):
        if problem is not None:
            yield line_number, ParsedLine(problem=problem), ""
        else:
            yield line_number, parser.parse(line), line


def _parse_file(element: tuple[int, str], spec: PrepareSpec):
    """(file number, path) -> events keyed by user, and dead letters (tagged "dead_letter")."""
    import apache_beam as beam

    file_number, path = element
    filtered = beam.metrics.Metrics.counter("prepare", "filtered_below_min_rating")
    for line_number, parsed, record in _parsed_lines(path, spec):
        if parsed.problem is not None:
            yield beam.pvalue.TaggedOutput("dead_letter", {
                "file": path, "line": line_number, "problem": parsed.problem, "record": record})
        if parsed.filtered:
            filtered.inc()
        for field, (user, item, timestamp) in enumerate(parsed.events):
            # The position orders events as the in-process loader reads them.
            yield user, ((file_number, line_number, field), item, timestamp)


def _user_record(element, has_timestamps: bool) -> tuple:
    """(user, events) -> (first position, user, item tokens, timestamps) in the loader's order."""
    user, events = element
    events = list(events)
    # Stable time order with ties in file order, as the loader's two stable sorts give.
    events.sort(key=(lambda event: (event[2], event[0])) if has_timestamps else (lambda event: event[0]))
    first = min(event[0] for event in events)
    items = [event[1] for event in events]
    times = [event[2] for event in events] if has_timestamps else None
    return first, user, items, times


def _vocabulary(first_seen: list[tuple[tuple, str]], header_possible: bool):
    """Item tokens with their first positions -> (Vocabulary, token -> index); with
    ``header_possible`` (text files whose first line is read as data), those first seen on a
    line 1 are named as a possible header line if they are odd ids."""
    if not first_seen:
        return None
    header_tokens = {token for (_, line_number, _), token in first_seen if line_number == 1} if header_possible else ()
    return vocabulary_from_tokens([token for _, token in sorted(first_seen)], header_tokens)


def _user_rows(firsts: list[tuple[tuple, str]]) -> dict[str, int]:
    return {user: row for row, (_, user) in enumerate(sorted(firsts))}


def _indexed(record: tuple, vocabulary, rows: dict[str, int]) -> tuple[int, np.ndarray, Optional[np.ndarray]]:
    _, user, items, times = record
    token_to_index = vocabulary[1]
    sequence = np.fromiter((token_to_index[item] for item in items), np.int32, len(items))
    return rows[user], sequence, None if times is None else np.asarray(times, np.int64)


def _split_settings(spec: PrepareSpec, num_users: int, all_times: Optional[list]) -> dict:
    """What the per-user split needs that only the whole dataset knows."""
    options = dict(spec.split_options)
    if num_users == 0:  # no interactions at all: _finish reports that
        return options
    if spec.split == "user_level":
        options["parts"] = user_level_parts(num_users, options.get("fractions", (0.8, 0.1, 0.1)),
                                            options.get("seed", 0), spec.name)
    if spec.split == "time":
        options["cuts"] = time_cuts(all_times or [], options.get("validation_time"), options.get("test_time"),
                                    options.get("quantiles", (0.8, 0.9)))
    return options


def _user_examples(user: tuple, spec: PrepareSpec, settings: dict):
    """One indexed user -> ((part, row), (history, target)) records and count markers."""
    row, sequence, times = user
    if spec.split == "leave_one_out":
        share = leave_one_out_user(sequence, settings.get("min_length", 3))
    elif spec.split == "user_level":
        share = user_level_user(sequence, int(settings["parts"][row]))
    else:
        share = time_user(sequence, times, *settings["cuts"])
    if share.train is not None:
        yield ("train_sequences", row), (None, len(share.train))
        if len(share.train) >= 1:  # one item: a record without history, for the popularity (see tfrecord)
            yield ("train", row), (share.train[:-1], int(share.train[-1]))
    for part, example in (("validation", share.validation), ("test", share.test)):
        if example is not None:
            yield (part, row), example


def _shard_of(element, rows_by_part: dict[str, list[int]], num_shards: int):
    (part, row), (history, target) = element
    rows = rows_by_part[part]
    boundaries = shard_boundaries(len(rows), num_shards)
    rank = bisect.bisect_left(rows, row)
    shard = int(np.searchsorted(boundaries, rank, side="right")) - 1
    return (part, shard), (row, history, target)


def _write_shard(element, output_dir: str, num_shards: int) -> str:
    """Writes one shard (records sorted by user row) to a temporary file, then renames it."""
    import tensorflow as tf

    (part, shard), records = element
    path = shard_paths(os.path.join(output_dir, part), num_shards)[shard]
    with gfile_temporary(path) as temporary, tf.io.TFRecordWriter(temporary) as writer:
        for row, history, target in sorted(records, key=lambda record: record[0]):
            writer.write(example_bytes(history, target, {"user_row": row}))
    return path


def _count_and_first(pairs) -> tuple:
    """(count, first dead letter by file and line) of (1, letter) pairs and partial results."""
    count, first = 0, None
    for number, letter in pairs:
        count += number
        if letter is not None and (first is None or (letter["file"], letter["line"]) < (first["file"], first["line"])):
            first = letter
    return count, first


def _check(_, spec: PrepareSpec, vocabulary, lengths: list[int], counts: dict, settings: dict,
           dead_letters: tuple) -> dict:
    """Fails on an unusable input or split before any shard is replaced; returns full counts."""
    if vocabulary is None:
        # Nothing is written on this path, the dead-letter file included: quote the first line.
        num_dead_letters, first = dead_letters
        example = (f"; the first, {first['file']}:{first['line']}: {first['problem']} (is --format right?)"
                   if first else "")
        raise DataFormatError(spec.inputs[0], None, f"input has no interactions ({num_dead_letters} "
                              f"malformed line(s){example})")
    counts = {part: counts.get(part, 0) for part in (*SPLIT_PARTS, "train_sequences", "train_interactions")}
    split_counts = {"train": counts["train_sequences"], "validation": counts["validation"], "test": counts["test"]}
    if spec.split == "leave_one_out" and not (counts["validation"] or counts["test"]):
        raise ValueError(f"leave_one_out needs at least one user with >= {settings.get('min_length', 3)} "
                         f"interactions; the longest of the {len(lengths)} sequences has {max(lengths)}")
    if spec.split == "user_level":
        check_user_level(split_counts, settings["parts"], settings.get("fractions", (0.8, 0.1, 0.1)), spec.name)
    if spec.split == "time":
        check_time_split(split_counts, *settings["cuts"], len(lengths), spec.name)
    return counts


def _finish(_, spec: PrepareSpec, vocabulary, lengths: list[int], counts: dict, dead_letters: list[dict],
            written: list[str]) -> dict:
    """Removes stale shards, writes dead letters, the vocabulary and, last, the statistics."""
    for part in SPLIT_PARTS:
        remove_stale_shards(os.path.join(spec.output_dir, part), shard_paths(os.path.join(spec.output_dir, part),
                                                                              spec.num_shards))
    dead_letters = sorted(dead_letters, key=lambda letter: (letter["file"], letter["line"]))
    write_text(os.path.join(spec.output_dir, DEAD_LETTER_FILE),
                "".join(json.dumps(letter, ensure_ascii=False) + "\n" for letter in dead_letters))
    write_text(os.path.join(spec.output_dir, "item_vocab.json"),
                json_text(vocabulary[0].to_json()))
    statistics = {
        "dataset": sequence_statistics(spec.name, lengths, vocabulary[0].num_items),
        "split": spec.split,
        "num_items": vocabulary[0].num_items,
        "examples": {part: counts[part] for part in SPLIT_PARTS},
        "train_sequences": counts["train_sequences"],
        "train_interactions": counts["train_interactions"],
        "user_feature_names": [],
        "malformed_lines": len(dead_letters),
        "num_shards": spec.num_shards,
        "files": {part: [os.path.basename(path) for path in shard_paths(os.path.join(spec.output_dir, part),
                                                                        spec.num_shards)] for part in SPLIT_PARTS},
    }
    write_text(os.path.join(spec.output_dir, "statistics.json"), json_text(statistics))
    return statistics


def prepare_pipeline(pipeline, spec: PrepareSpec):
    """Adds the prepare transforms to ``pipeline``; returns the PCollection of the statistics dict.

    Raises:
      FileNotFoundError: If an input pattern matches no file.
    """
    beam = require_beam()
    files = match_inputs(spec.inputs)
    check_inputs_outside_output(spec, files)
    has_timestamps = spec.parser().has_timestamps
    parsed = (
        pipeline
        | "Files" >> beam.Create(list(enumerate(files)))
        | "SpreadFiles" >> beam.Reshuffle()
        | "Parse" >> beam.FlatMap(_parse_file, spec).with_outputs("dead_letter", main="events")
    )
    events = parsed.events
    records = (events | "GroupByUser" >> beam.GroupByKey()
               | "UserRecords" >> beam.Map(_user_record, has_timestamps))
    vocabulary = beam.pvalue.AsSingleton(
        events
        | "ItemPositions" >> beam.Map(lambda event: (event[1][1], event[1][0]))
        | "FirstSeen" >> beam.CombinePerKey(min)
        | "Swap" >> beam.Map(lambda item_first: (item_first[1], item_first[0]))
        | "AllItems" >> beam.combiners.ToList()
        | "Vocabulary" >> beam.Map(_vocabulary, spec.format != "table"
                                   and not spec.reader_options.get("has_header", False)))
    rows = beam.pvalue.AsSingleton(
        records | "UserFirsts" >> beam.Map(lambda record: (record[0], record[1]))
        | "AllUsers" >> beam.combiners.ToList() | "Rows" >> beam.Map(_user_rows))
    users = records | "Index" >> beam.Map(_indexed, vocabulary, rows)

    lengths = users | "Lengths" >> beam.Map(lambda user: len(user[1])) | "AllLengths" >> beam.combiners.ToList()
    all_times = None
    if spec.needs_all_times():
        all_times = beam.pvalue.AsSingleton(users | "Times" >> beam.Map(lambda user: user[2])
                                            | "AllTimes" >> beam.combiners.ToList())
    settings = beam.pvalue.AsSingleton(
        lengths | "SplitSettings" >> beam.Map(lambda all_lengths, times: _split_settings(spec, len(all_lengths), times),
                                              all_times if all_times is not None else None))
    tagged = users | "Split" >> beam.FlatMap(_user_examples, spec, settings)
    examples = tagged | "Examples" >> beam.Filter(lambda element: element[0][0] in SPLIT_PARTS)
    counts = (
        tagged
        | "CountKeys" >> beam.FlatMap(lambda element: [(element[0][0], 1)] + (
            [("train_interactions", element[1][1])] if element[0][0] == "train_sequences" else []))
        | "Count" >> beam.CombinePerKey(sum) | "Counts" >> beam.combiners.ToDict())
    rows_by_part = beam.pvalue.AsSingleton(
        examples
        | "PartRow" >> beam.Map(lambda element: element[0])
        | "GroupRows" >> beam.GroupByKey()
        | "SortRows" >> beam.Map(lambda part_rows: (part_rows[0], sorted(part_rows[1])))
        | "RowsByPart" >> beam.combiners.ToDict()
        | "EveryPart" >> beam.Map(lambda found: {part: found.get(part, []) for part in SPLIT_PARTS}))
    dead_letters = (
        parsed.dead_letter
        # The count, and the earliest malformed line to quote if nothing else is usable.
        | "SummarizeDeadLetters" >> beam.Map(lambda letter: (1, letter))
        | "CountAndFirst" >> beam.CombineGlobally(_count_and_first))
    checked = beam.pvalue.AsSingleton(
        pipeline | "Check" >> beam.Create([None]) | "CheckSplit" >> beam.Map(
            _check, spec, vocabulary, beam.pvalue.AsSingleton(lengths), beam.pvalue.AsSingleton(counts), settings,
            beam.pvalue.AsSingleton(dead_letters)))
    # The previous output's marker goes only once the new split is known good, and before
    # the first of its shards is replaced.
    unmarked = beam.pvalue.AsSingleton(
        pipeline | "Unmark" >> beam.Create([None]) | "RemoveOldStatistics" >> beam.Map(
            lambda _, __: remove_if_present(os.path.join(spec.output_dir, "statistics.json")), checked))
    every_shard = pipeline | "EveryShard" >> beam.Create(
        [((part, shard), None) for part in SPLIT_PARTS for shard in range(spec.num_shards)])
    written = (
        (examples | "Shard" >> beam.Map(_shard_of, rows_by_part, spec.num_shards), every_shard)
        | "AllShards" >> beam.Flatten()
        | "GroupShards" >> beam.GroupByKey()
        | "DropEmptyMarker" >> beam.Map(lambda shard: (shard[0], [record for record in shard[1] if record is not None]))
        # After the marker's removal (which waits for the checked counts): no shard is replaced
        # before the split is known good, nor while the old statistics.json still says finished.
        | "WriteShards" >> beam.Map(lambda shard, _: _write_shard(shard, spec.output_dir, spec.num_shards), unmarked))
    return (
        pipeline
        | "Finish" >> beam.Create([None])
        | "WriteMetadata" >> beam.Map(
            _finish, spec, vocabulary, beam.pvalue.AsSingleton(lengths), checked,
            beam.pvalue.AsList(parsed.dead_letter), beam.pvalue.AsList(written))
    )


def run_prepare(spec: PrepareSpec, beam_args: Sequence[str] = ()) -> dict:
    """Runs ``prepare`` to completion and returns the statistics it wrote.

    Raises:
      FileNotFoundError: If an input matches no file (before anything runs).
      ValueError: If an input lies in the output directory, or an input glob would read its
        outputs (before anything runs).
      DirectoryBeingWritten: Another process is writing the (local) output directory.
      Exception: An input without any interaction, or a split that cannot be made (e.g. no user
        long enough), fails the pipeline on a worker; the runner re-raises it, as its own type
        where it can, else as a RuntimeError carrying the message. No shard is replaced then.
    """
    beam = require_beam()
    import tensorflow as tf

    from tfx_xmatch.io_utils import check_output_location, claimed_directory

    check_output_location(spec.output_dir, "output directory", directory=True)
    # statistics.json is written last: without it a directory is not a finished prepare output.
    # The pipeline removes an old one only once the input has proved usable.
    statistics_path = os.path.join(spec.output_dir, "statistics.json")
    made = [] if "://" in spec.output_dir else [
        path for path in (pathlib.Path(spec.output_dir).absolute(), *pathlib.Path(spec.output_dir).absolute().parents)
        if not path.exists()]
    tf.io.gfile.makedirs(spec.output_dir)
    try:
        # Two runs into one directory both exited 0 and left a "finished" mix: one's records and
        # statistics with the other's vocabulary. An object store has no locks: it stays unclaimed.
        with claimed_directory(spec.output_dir, "output directory"):
            with beam.Pipeline(options=pipeline_options(beam_args)) as pipeline:
                prepare_pipeline(pipeline, spec)
            with tf.io.gfile.GFile(statistics_path) as handle:
                return json.load(handle)
    except BaseException:
        for directory in made:  # a refused run leaves no empty directories behind
            try:
                directory.rmdir()
            except OSError:
                break
        raise


# Separators and column names are taken as written ("::", "007"), with escapes decoded ("\\t").
RAW_OPTIONS = ("sep", "user_column", "item_column", "timestamp_column", "rating_column")


def _parse_value(name: str, text: str) -> Any:
    """A --split-option / --reader-option value: raw text for separators and column names,
    YAML scalars and lists (numbers, booleans, [0.8, 0.1, 0.1]) otherwise."""
    if name in RAW_OPTIONS:
        # Through raw_unicode_escape, so only the escapes decode and "é" or "用户" stay as written.
        return text.encode("raw_unicode_escape").decode("unicode_escape")
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"option {name}={text!r} is not a valid value: {error}") from None


def parse_options(pairs: Sequence[str], flag: str) -> dict:
    """NAME=VALUE command-line options as a dict (values as ``_parse_value`` reads them)."""
    options = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise ValueError(f"{flag} takes NAME=VALUE, got {pair!r}")
        options[name] = _parse_value(name, value)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmatch pipeline prepare", description=__doc__.split("\n\n")[0],
        epilog="Other flags are Beam pipeline options, e.g. --runner=FlinkRunner --direct_num_workers=2.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help=f"a dataset file by name: {', '.join(k for k, v in DATASETS.items() if v.kind == 'file')}")
    source.add_argument("--input", action="append", help="file path or glob (repeatable; any Beam file system)")
    parser.add_argument("--data-dir", default=os.environ.get("XMATCH_DATA_DIR", "."), help="folder of --dataset")
    parser.add_argument("--format", choices=("pairs", "sequences", "ratings", "table"), help="format of --input files")
    parser.add_argument("--name", help="dataset name for the statistics (default: --dataset, or 'dataset')")
    parser.add_argument("--reader-option", action="append", default=[], metavar="NAME=VALUE",
                        help=f"e.g. sep=:: min_rating=4 has_header=true; table: {', '.join(TABLE_OPTIONS)}")
    parser.add_argument("--split", default="leave_one_out", choices=tuple(SPLITS))
    parser.add_argument("--split-option", action="append", default=[], metavar="NAME=VALUE",
                        help="e.g. min_length=5, seed=1, fractions=[0.8,0.1,0.1], validation_time=...")
    parser.add_argument("--num-shards", type=int, default=1, help="TFRecord shards per part (default 1)")
    parser.add_argument("--output-dir", required=True)
    return parser


def spec_from_args(args: argparse.Namespace) -> PrepareSpec:
    reader_options = parse_options(args.reader_option, "--reader-option")
    split_options = parse_options(args.split_option, "--split-option")
    common = dict(split=args.split, split_options=split_options, num_shards=args.num_shards)
    if args.dataset:
        return PrepareSpec.for_dataset(args.dataset, args.data_dir, args.output_dir, name=args.name,
                                       reader_options=reader_options, **common)
    if not args.format:
        raise ValueError("--input needs --format (pairs, sequences, ratings or table)")
    return PrepareSpec(inputs=tuple(args.input), format=args.format, output_dir=args.output_dir,
                       name=args.name or "dataset", reader_options=reader_options, **common)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, beam_args = split_arguments(build_parser(), argv)
    statistics = run_prepare(spec_from_args(args), beam_args)
    dataset = statistics["dataset"]
    print(f"prepared {dataset['name']}: {dataset['users']} users, {dataset['items']} items, "
          f"{dataset['interactions']} interactions; examples {statistics['examples']}; "
          f"{statistics['malformed_lines']} malformed line(s) in {DEAD_LETTER_FILE}; -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
