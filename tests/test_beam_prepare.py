"""The Beam prepare pipeline writes exactly what the in-process loaders, splits and TFRecord
writer write, routes malformed lines to a dead-letter file, and is idempotent."""

import dataclasses
import filecmp
import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from tfx_xmatch.data import (  # noqa: E402
    DataFormatError, load_dataset, make_split, make_synthetic, write_split_tfrecords,
)
from tfx_xmatch.data.loaders import load_table  # noqa: E402
from tfx_xmatch.pipelines import prepare  # noqa: E402
from tfx_xmatch.pipelines.prepare import DEAD_LETTER_FILE, PrepareSpec, run_prepare  # noqa: E402
from tests.conftest import shared_data_dir  # noqa: E402

DATA_DIR = shared_data_dir()  # $XMATCH_DATA_DIR, else ../shared/data


def same_outputs(expected_dir: pathlib.Path, actual_dir: pathlib.Path) -> None:
    """Every file the in-process writer wrote is byte-identical in the Beam output."""
    expected = sorted(os.listdir(expected_dir))
    actual = sorted(name for name in os.listdir(actual_dir) if name != DEAD_LETTER_FILE)
    assert actual == expected
    for name in expected:
        assert filecmp.cmp(expected_dir / name, actual_dir / name, shallow=False), name


def in_process(dataset, split: str, directory: pathlib.Path, num_shards: int, **split_options) -> pathlib.Path:
    write_split_tfrecords(make_split(dataset, split, **split_options), str(directory), num_shards=num_shards)
    return directory


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> pathlib.Path:
    """A pairs file of synthetic sequences with string ids, users interleaved, and bad lines."""
    dataset = make_synthetic(num_users=60, num_items=40, min_length=2, max_length=12, seed=3)
    lines = []
    for position in range(max(len(s) for s in dataset.sequences)):
        for row, sequence in enumerate(dataset.sequences):
            if position < len(sequence):
                lines.append(f"u{row} i{sequence[position]}")
    lines.insert(5, "only-one-field")
    lines.insert(40, "u1 i2 i3")
    lines.insert(41, "")
    path = tmp_path_factory.mktemp("pairs") / "events.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("split,options,num_shards", [
    ("leave_one_out", {}, 1), ("leave_one_out", {"min_length": 4}, 3), ("user_level", {"seed": 2}, 2),
])
def test_pairs_equal_in_process(pairs_file, tmp_path, split, options, num_shards):
    dataset = load_dataset(str(pairs_file), format="pairs", skip_bad_lines=True, side_info=False)
    expected = in_process(dataset, split, tmp_path / "expected", num_shards, **options)
    spec = PrepareSpec(inputs=(str(pairs_file),), format="pairs", output_dir=str(tmp_path / "beam"),
                       name="events", split=split, split_options=options, num_shards=num_shards)
    statistics = run_prepare(spec)
    same_outputs(expected, tmp_path / "beam")
    assert statistics["malformed_lines"] == dataset.skipped_lines == 2


def test_dead_letters_name_file_line_and_problem(pairs_file, tmp_path):
    spec = PrepareSpec(inputs=(str(pairs_file),), format="pairs", output_dir=str(tmp_path), name="events")
    run_prepare(spec)
    letters = [json.loads(line) for line in (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()]
    assert [(letter["file"], letter["line"], letter["record"]) for letter in letters] == [
        (str(pairs_file), 6, "only-one-field"), (str(pairs_file), 41, "u1 i2 i3")]
    # The problem is the one the in-process loader fails with on that line.
    with pytest.raises(DataFormatError) as error:
        load_dataset(str(pairs_file), format="pairs", side_info=False)
    assert (error.value.line_number, error.value.problem) == (6, letters[0]["problem"])
    assert "expected 'user item', got 'u1 i2 i3'" in letters[1]["problem"]


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_undecodable_lines_are_dead_letters_as_in_process(tmp_path, suffix):
    header, sep = (b"user,item\n", b",") if suffix == ".csv" else (b"", b" ")
    path = tmp_path / f"events{suffix}"
    rows = [b"u%d" % (i % 4) + sep + b"i%d" % (i % 7) for i in range(24)]
    rows[5] = b"u1" + sep + b"caf\xff"
    path.write_bytes(header + b"\n".join(rows) + b"\n")
    format = "table" if suffix == ".csv" else "pairs"
    spec = PrepareSpec(inputs=(str(path),), format=format, output_dir=str(tmp_path / "beam"), name="events")
    statistics = run_prepare(spec)
    letters = [json.loads(line) for line in (tmp_path / "beam" / DEAD_LETTER_FILE).read_text().splitlines()]
    assert [(letter["line"], letter["problem"]) for letter in letters] == [
        (6 + bool(header), "not valid utf-8-sig: byte(s) b'\\xff' at column 7")]
    assert statistics["malformed_lines"] == 1
    dataset = (load_table(path, skip_bad_lines=True) if format == "table"
               else load_dataset(str(path), format="pairs", skip_bad_lines=True, side_info=False))
    same_outputs(in_process(dataset, "leave_one_out", tmp_path / "expected", 1), tmp_path / "beam")


def test_rerun_is_idempotent_and_replaces_old_shards(pairs_file, tmp_path):
    spec = PrepareSpec(inputs=(str(pairs_file),), format="pairs", output_dir=str(tmp_path / "out"), num_shards=3)
    run_prepare(spec)
    first = {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")}
    run_prepare(spec)
    second = {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")}
    assert first == second
    run_prepare(PrepareSpec(inputs=(str(pairs_file),), format="pairs", output_dir=str(tmp_path / "out"), num_shards=2))
    names = sorted(os.listdir(tmp_path / "out"))
    assert not [name for name in names if "-of-00003" in name]
    assert not [name for name in names if name.startswith(".")], "temporary files left behind"


def test_several_input_files_equal_their_concatenation(pairs_file, tmp_path, monkeypatch):
    lines = pairs_file.read_text().splitlines(keepends=True)
    (tmp_path / "part-b.txt").write_text("".join(lines[len(lines) // 2:]))
    (tmp_path / "part-a.txt").write_text("".join(lines[: len(lines) // 2]))
    dataset = load_dataset(str(pairs_file), format="pairs", skip_bad_lines=True, side_info=False)
    expected = in_process(dataset, "leave_one_out", tmp_path / "expected", 2)
    spec = PrepareSpec(inputs=(str(tmp_path / "part-*.txt"),), format="pairs", output_dir=str(tmp_path / "beam"),
                       name="events", num_shards=2)
    run_prepare(spec)
    same_outputs(expected, tmp_path / "beam")
    # A glob without a directory part, relative to the working directory, matched nothing.
    monkeypatch.chdir(tmp_path)
    bare = dataclasses.replace(spec, inputs=("part-*.txt",), output_dir=str(tmp_path / "bare"))
    run_prepare(bare)
    same_outputs(expected, tmp_path / "bare")


def rating_lines() -> list[str]:
    """Rating events with shuffled times, ties, low ratings and malformed lines."""
    rng = np.random.default_rng(0)
    lines = []
    for event in range(600):
        user, item = rng.integers(1, 40), rng.integers(1, 90)
        lines.append(f"{user}::{item}::{rng.integers(1, 6)}::{rng.integers(1000, 1060)}")
    lines[10] = "7::8::5::yesterday"
    lines[20] = "7::8::five::1000"
    lines[30] = "7::8::5"
    return lines


@pytest.mark.parametrize("split,options", [("leave_one_out", {}), ("time", {}), ("time", {"quantiles": [0.5, 0.7]})])
def test_rating_log_with_min_rating_equal_in_process(tmp_path, split, options):
    path = tmp_path / "ratings.dat"
    path.write_text("\n".join(rating_lines()) + "\n")
    dataset = load_dataset(str(path), format="ratings", min_rating=3, skip_bad_lines=True, side_info=False)
    expected = in_process(dataset, split, tmp_path / "expected", 2, **options)
    spec = PrepareSpec(inputs=(str(path),), format="ratings", output_dir=str(tmp_path / "beam"), name="ratings",
                       reader_options={"min_rating": 3}, split=split, split_options=options, num_shards=2)
    statistics = run_prepare(spec)
    same_outputs(expected, tmp_path / "beam")
    assert statistics["malformed_lines"] == 3


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".parquet"])
def test_ids_are_read_as_written_as_in_process(tmp_path, suffix):
    """Prepare read ids through the same str.split() and strip() as the loaders: "x\u00a0y" split in two
    (sequences), " a" merged with "a" (CSV, Parquet), "a\x00" kept as an id of its own."""
    items = ["x\u00a0y", "p\u3000q", "a", "a\u00a0", "b"] * 3
    users = [f"u{i % 4}" for i in range(len(items))]
    path = tmp_path / f"events{suffix}"
    if suffix == ".txt":
        path.write_text("".join(f"{user} {item} {item}\n" for user, item in zip(users, items)) + "u1 a\x00\n")
    elif suffix == ".csv":
        path.write_text("user,item\n" + "".join(f"{user},{item}\n" for user, item in zip(users, items))
                        + "u1, a\nu2,a\x00\n")
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as parquet

        parquet.write_table(pa.table({"user": users + ["u1", "u2"], "item": items + [" a", "a\x00"]}), path)
    format = "sequences" if suffix == ".txt" else "table"
    dataset = load_dataset(str(path), format=format, skip_bad_lines=True, side_info=False)
    assert list(dataset.item_vocab) == items[:5] + ([" a"] if suffix == ".parquet" else [])
    spec = PrepareSpec(inputs=(str(path),), format=format, output_dir=str(tmp_path / "beam"), name="events")
    statistics = run_prepare(spec)
    same_outputs(in_process(dataset, "leave_one_out", tmp_path / "expected", 1), tmp_path / "beam")
    letters = [json.loads(line) for line in (tmp_path / "beam" / DEAD_LETTER_FILE).read_text().splitlines()]
    assert statistics["malformed_lines"] == dataset.skipped_lines == len(letters) == (1 if suffix != ".csv" else 2)
    assert "control character '\\x00'" in letters[-1]["problem"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_with_named_columns_equal_in_process(tmp_path, suffix):
    rows = [line.split("::") for line in rating_lines()[40:]]
    path = tmp_path / f"events{suffix}"
    if suffix == ".csv":
        path.write_text("ts,who,what,stars\n" + "".join(f"{r[3]},{r[0]},{r[1]},{r[2]}\n" for r in rows) + "1,,3,4\n")
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as parquet

        parquet.write_table(pa.table({"who": [int(r[0]) for r in rows], "what": [int(r[1]) for r in rows],
                                      "stars": [float(r[2]) for r in rows], "ts": [int(r[3]) for r in rows]}), path)
    options = {"user_column": "who", "item_column": "what", "timestamp_column": "ts", "rating_column": "stars",
               "min_rating": 2}
    dataset = load_table(path, name="events", skip_bad_lines=True, **options)
    expected = in_process(dataset, "leave_one_out", tmp_path / "expected", 1)
    spec = PrepareSpec(inputs=(str(path),), format="table", output_dir=str(tmp_path / "beam"), name="events",
                       reader_options=options)
    statistics = run_prepare(spec)
    same_outputs(expected, tmp_path / "beam")
    assert statistics["malformed_lines"] == (1 if suffix == ".csv" else 0)


@pytest.mark.skipif(not (DATA_DIR / "ml-100k" / "u.data").is_file(), reason="ML-100K not under ../shared/data")
@pytest.mark.parametrize("split", ["leave_one_out", "user_level", "time"])
def test_movielens_100k_equal_in_process(tmp_path, split):
    dataset = load_dataset("ml-100k", str(DATA_DIR), side_info=False)
    expected = in_process(dataset, split, tmp_path / "expected", 3)
    spec = PrepareSpec.for_dataset("ml-100k", str(DATA_DIR), str(tmp_path / "beam"), split=split, num_shards=3)
    statistics = run_prepare(spec)
    same_outputs(expected, tmp_path / "beam")
    assert statistics["dataset"]["users"] == 943 and statistics["malformed_lines"] == 0


def test_bad_inputs_say_what_is_wrong(tmp_path):
    (tmp_path / "logs").mkdir()
    with pytest.raises(ValueError, match=r"names the directory .*logs'; give its files or a glob such as .*logs/\*"):
        run_prepare(PrepareSpec(inputs=(str(tmp_path / "logs"),), format="pairs", output_dir=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        run_prepare(PrepareSpec(inputs=(str(tmp_path / "nothing-here*.txt"),), format="pairs", output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="'colour'"):
        PrepareSpec(inputs=("x",), format="ratings", output_dir=str(tmp_path), reader_options={"colour": 1})
    with pytest.raises(ValueError, match="'random'"):
        PrepareSpec(inputs=("x",), format="pairs", output_dir=str(tmp_path), split="random")
    with pytest.raises(ValueError, match="num_shards"):
        PrepareSpec(inputs=("x",), format="pairs", output_dir=str(tmp_path), num_shards=0)
    broken = tmp_path / "broken.txt"
    broken.write_text("a\nb\n")
    # Nothing is written on this path: the error quotes the first malformed line rather than
    # pointing at a dead-letter file that does not exist.
    with pytest.raises(Exception, match=rf"no interactions \(2 malformed line\(s\); the first, {broken}:1: "
                                        r".*\(is --format right\?\)"):
        run_prepare(PrepareSpec(inputs=(str(broken),), format="pairs", output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "statistics.json").exists()


def test_a_repeated_header_line_is_a_dead_letter_as_in_process(tmp_path):
    lines = "user item rating ts\nu1 i1 5 1\nu1 i2 4 2\nu1 i3 5 3\nuser item rating ts\nu2 i1 3 4\nu2 i3 5 5\nu2 i4 4 6\n"
    (tmp_path / "ratings.txt").write_text(lines)
    spec = PrepareSpec(inputs=(str(tmp_path / "ratings.txt"),), format="ratings", output_dir=str(tmp_path / "beam"),
                       name="ratings", reader_options={"has_header": True})
    assert run_prepare(spec)["malformed_lines"] == 1
    letter = json.loads((tmp_path / "beam" / DEAD_LETTER_FILE).read_text())
    assert (letter["line"], letter["problem"]) == (5, "the header line again (files concatenated with their headers?)")
    dataset = load_dataset(str(tmp_path / "ratings.txt"), format="ratings", has_header=True, skip_bad_lines=True,
                           side_info=False)
    same_outputs(in_process(dataset, "leave_one_out", tmp_path / "in_process", 1), tmp_path / "beam")


def test_command_line(pairs_file, tmp_path, capsys):
    assert prepare.main(["--input", str(pairs_file), "--format", "pairs", "--output-dir", str(tmp_path),
                         "--split", "user_level", "--split-option", "fractions=[0.6,0.2,0.2]",
                         "--num-shards", "2", "--direct_num_workers=1"]) == 0
    assert "2 malformed line(s)" in capsys.readouterr().out
    statistics = json.loads((tmp_path / "statistics.json").read_text())
    assert statistics["split"] == "user_level" and statistics["num_shards"] == 2


@pytest.mark.parametrize("mode", ["in_memory", "multi_processing"])
def test_a_workers_error_is_one_line_in_every_running_mode(tmp_path, capsys, mode):
    """With workers in other processes the runner's RuntimeError carries the worker's whole
    traceback, which the command printed after "error:" (65 lines)."""
    from tfx_xmatch.pipelines import cli as pipeline_cli

    bad = tmp_path / "bad.txt"
    bad.write_text("only-one-field\nanother\n")
    assert pipeline_cli.main(["prepare", "--input", str(bad), "--format", "pairs", "--output-dir",
                              str(tmp_path / "out"), f"--direct_running_mode={mode}", "--direct_num_workers=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"xmatch pipeline prepare: error: {bad}: input has no interactions (2 malformed line(s)")
    assert "\n" not in err and "Traceback" not in err, err


def test_a_workers_bug_keeps_its_traceback():
    from tfx_xmatch.data import DataFormatError
    from tfx_xmatch.user_errors import beam_worker_error, user_error_text

    wrapped = RuntimeError("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                           "IndexError: list index out of range [while running 'Embed']")
    assert beam_worker_error(wrapped) == (IndexError, "list index out of range [while running 'Embed']")
    assert user_error_text(wrapped, (DataFormatError, RuntimeError)) is None  # a bug: re-raised
    unknown = RuntimeError("not.imported.module.OddError: what [while running 'Step']")
    assert beam_worker_error(unknown) == (None, "what [while running 'Step']")
    assert user_error_text(unknown, (RuntimeError,)) is None
    assert user_error_text(RuntimeError("TFDS is out of reach"), (RuntimeError,)) == "TFDS is out of reach"


def test_command_line_reads_a_named_dataset(tmp_path, capsys):
    # `xmatch pipeline --help`'s own example; it failed with "got multiple values for argument 'name'".
    (tmp_path / "data" / "ml-100k").mkdir(parents=True)
    lines = [f"{user}\t{item}\t4\t{1000 + step}" for user in range(1, 6) for step, item in enumerate(range(user, user + 6))]
    (tmp_path / "data" / "ml-100k" / "u.data").write_text("\n".join(lines) + "\n")
    arguments = ["--dataset", "ml-100k", "--data-dir", str(tmp_path / "data"), "--direct_num_workers=1"]
    assert prepare.main([*arguments, "--output-dir", str(tmp_path / "named")]) == 0
    statistics = json.loads((tmp_path / "named" / "statistics.json").read_text())
    assert statistics["dataset"]["name"] == "ml-100k" and statistics["dataset"]["users"] == 5
    assert prepare.main([*arguments, "--name", "ml100k-sample", "--output-dir", str(tmp_path / "renamed")]) == 0
    assert json.loads((tmp_path / "renamed" / "statistics.json").read_text())["dataset"]["name"] == "ml100k-sample"


def test_time_split_with_explicit_cuts_equals_in_process(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("\n".join(rating_lines()) + "\n")
    dataset = load_dataset(str(path), format="ratings", skip_bad_lines=True, side_info=False)
    cuts = {"validation_time": 1040, "test_time": 1050}
    expected = in_process(dataset, "time", tmp_path / "expected", 1, **cuts)
    spec = PrepareSpec(inputs=(str(path),), format="ratings", output_dir=str(tmp_path / "beam"), name="ratings",
                       split="time", split_options=cuts)
    run_prepare(spec)
    same_outputs(expected, tmp_path / "beam")


def test_split_options_and_reader_options_are_checked_before_running(tmp_path):
    common = dict(inputs=("x",), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['min_lenght'\]"):
        PrepareSpec(format="pairs", split_options={"min_lenght": 5}, **common)
    with pytest.raises(ValueError, match=r"min_length must be an integer >= 3 \(.*\), got 2"):
        PrepareSpec(format="pairs", split_options={"min_length": 2}, **common)
    with pytest.raises(ValueError, match="time split needs timestamps; 'pairs'"):
        PrepareSpec(format="pairs", split="time", **common)
    with pytest.raises(ValueError, match="sep must be a string"):
        PrepareSpec(format="ratings", reader_options={"sep": {":": None}}, **common)
    # Separators and column names are taken as written, escapes decoded.
    assert prepare.parse_options(["sep=::", "user_column=007", "min_rating=4"], "--reader-option") == {
        "sep": "::", "user_column": "007", "min_rating": 4}
    assert prepare.parse_options(["sep=\\t"], "--reader-option") == {"sep": "\t"}


def test_a_run_that_fails_leaves_the_previous_output_whole(pairs_file, tmp_path):
    """The old statistics.json (the mark of a finished output) was deleted before the input was
    even matched, so a misspelt --input left a good output that evaluate refused."""
    out = tmp_path / "out"
    run_prepare(PrepareSpec(inputs=(str(pairs_file),), format="pairs", output_dir=str(out), num_shards=2))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    broken = tmp_path / "broken.txt"
    broken.write_text("a\nb\n")
    failing = [
        ("leave_one_out needs at least one user with >= 50",
         dict(inputs=(str(pairs_file),), num_shards=3, split_options={"min_length": 50})),
        ("matches no file", dict(inputs=(str(tmp_path / "misspelt.txt"),))),
        ("no interactions", dict(inputs=(str(broken),))),
    ]
    for message, options in failing:
        with pytest.raises(Exception, match=message):
            run_prepare(PrepareSpec(format="pairs", output_dir=str(out), **options))
        assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before, message


@pytest.mark.parametrize("options, message", [
    (dict(reader_options={"has_header": "maybe"}), "has_header must be true or false, got 'maybe'"),
    (dict(split="user_level", split_options={"fractions": [0.5, 0.5, 0.5]}), "fractions must be three non-negative"),
    (dict(split="time", split_options={"validation_time": 20, "test_time": 10}),
     "validation_time must not be after test_time"),
])
def test_option_values_are_checked_before_the_pipeline_runs(tmp_path, options, message):
    # Each of these was accepted up front: has_header=maybe silently dropped line 1 of every
    # file; the split values failed on a worker after all the data was read and grouped.
    with pytest.raises(ValueError, match=message):
        PrepareSpec(inputs=("x",), format="ratings", output_dir=str(tmp_path), **options)


def test_a_misspelt_flag_is_an_error_not_a_discarded_beam_option(pairs_file, tmp_path, capsys):
    # `--num_shards 3` went to Beam, which discarded it with a warning, and prepare exited 0.
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--input", str(pairs_file), "--format", "pairs", "--output-dir", str(tmp_path),
                      "--num_shards", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized argument --num_shards; did you mean --num-shards?" in capsys.readouterr().err
    assert not (tmp_path / "statistics.json").exists()
    with pytest.raises(SystemExit):  # a typo went to Beam as well
        prepare.main(["--input", str(pairs_file), "--format", "pairs", "--output-dir", str(tmp_path),
                      "--num-shrads", "3"])
    assert "unrecognized argument --num-shrads; did you mean --num-shards?" in capsys.readouterr().err


def test_a_failed_write_leaves_no_temporary_behind(tmp_path, monkeypatch):
    import tensorflow as tf

    from tfx_xmatch.pipelines import beam_utils

    def failing_rename(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tf.io.gfile, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        beam_utils.write_text(str(tmp_path / "statistics.json"), "{}")
    with pytest.raises(OSError, match="disk full"):
        prepare._write_shard((("train", 0), [(0, [0, 1], 2)]), str(tmp_path), 1)
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []  # was one .tmp-<uuid> per attempt


def test_an_output_directory_another_process_is_writing_is_refused(pairs_file, tmp_path):
    """Two runs into one output directory both exited 0 and left a "finished" mix: one's records
    and statistics with the other's item vocabulary."""
    from tfx_xmatch.io_utils import CLAIM_FILE, DirectoryBeingWritten, claimed_directory

    out = tmp_path / "out"
    out.mkdir()
    spec = PrepareSpec(inputs=(str(pairs_file),), format="pairs", output_dir=str(out))
    with claimed_directory(out, "output directory"):
        with pytest.raises(DirectoryBeingWritten, match=rf"output directory '{out}' is being written by another "
                                                        r"process \(pid \d+\)"):
            run_prepare(spec)
        assert os.listdir(out) == [CLAIM_FILE]
    run_prepare(spec)
    assert CLAIM_FILE not in os.listdir(out) and "statistics.json" in os.listdir(out)


def test_inputs_that_would_read_the_outputs_are_refused(pairs_file, tmp_path):
    """`--input 'D/*' --output-dir D` read its own records, vocabulary and statistics as
    interactions on a re-run (thousands of malformed lines, other counts), exit 0."""
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "events.txt").write_bytes(pairs_file.read_bytes())
    for inputs, message in [
        ((str(folder / "*"),), rf"input '{folder}/\*' would also read the outputs written into the output "
                               rf"directory '{folder}' \(statistics.json, ...\)"),
        ((str(tmp_path / "*" / "*"),), r"would also read the outputs .* \(statistics.json, ...\)"),
        ((str(folder / "events.txt"),), rf"input '{folder}/events.txt' lies inside the output directory '{folder}'"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_prepare(PrepareSpec(inputs=inputs, format="pairs", output_dir=str(folder)))
    assert os.listdir(folder) == ["events.txt"]
    run_prepare(PrepareSpec(inputs=(str(folder / "*.txt"),), format="pairs", output_dir=str(tmp_path / "out")))
