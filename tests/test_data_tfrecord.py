"""TFRecord export: write/read round trip equals eval_dataset, sharding, atomic split export."""

import json
import os

import tfx_xmatch  # noqa: F401  (before TensorFlow: selects Keras 2)
import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch.data import (
    EvalExamples,
    Vocabulary,
    eval_dataset,
    feature_spec,
    leave_one_out,
    make_synthetic,
    read_tfrecords,
    read_training_tfrecords,
    sequence_training_dataset,
    shard_paths,
    write_split_tfrecords,
    write_tfrecords,
)


def collect(dataset):
    batches = [{key: value.numpy() for key, value in batch.items()} for batch in dataset]
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


@pytest.fixture(scope="module")
def split():
    data = make_synthetic(num_users=40, num_items=30, num_clusters=3, min_length=3, max_length=15, seed=2)
    return leave_one_out(data)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_equals_eval_dataset(tmp_path, split, num_shards):
    examples = split.test
    features = split.dataset.user_features
    paths = write_tfrecords(
        str(tmp_path / "test"),
        examples.histories,
        examples.targets,
        {name: values[examples.user_rows] for name, values in features.items()},
        num_shards=num_shards,
        user_rows=examples.user_rows,
    )
    assert paths == shard_paths(str(tmp_path / "test"), num_shards)
    assert os.path.basename(paths[-1]) == f"test-{num_shards - 1:05d}-of-{num_shards:05d}.tfrecord"
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(path) for path in paths)
    # max_length 6 is shorter than most histories, so in-graph truncation is exercised too.
    read = read_tfrecords(
        str(tmp_path / "test-*-of-*.tfrecord"), max_length=6, batch_size=4, user_feature_names=list(features)
    )
    expected = eval_dataset(examples, max_length=6, batch_size=4, user_features=features)
    assert {key: spec.dtype for key, spec in read.element_spec.items()} == {
        key: spec.dtype for key, spec in expected.element_spec.items()
    }
    read_arrays, expected_arrays = collect(read), collect(expected)
    assert sorted(read_arrays) == sorted(expected_arrays)
    for key in expected_arrays:
        np.testing.assert_array_equal(read_arrays[key], expected_arrays[key], err_msg=key)


def test_short_and_empty_histories_are_left_padded(tmp_path):
    histories = [np.array([], dtype=np.int32), np.array([4, 5]), np.array([1, 2, 3, 4])]
    write_tfrecords(str(tmp_path / "x"), histories, np.array([1, 6, 5]))
    arrays = collect(read_tfrecords(str(tmp_path / "x-*"), max_length=3, batch_size=8))
    assert arrays["history"].tolist() == [[0, 0, 0], [0, 4, 5], [2, 3, 4]]
    assert arrays["target"].tolist() == [1, 6, 5]
    # Records written without user rows read back as -1 (unknown).
    assert arrays["user_row"].tolist() == [-1, -1, -1]


def test_records_are_plain_tf_examples(tmp_path):
    (path,) = write_tfrecords(str(tmp_path / "x"), [np.array([7, 8])], np.array([9]), {"age": np.array([3])})
    record = next(iter(tf.data.TFRecordDataset(path))).numpy()
    example = tf.train.Example.FromString(record)
    assert list(example.features.feature["history"].int64_list.value) == [7, 8]
    assert list(example.features.feature["target"].int64_list.value) == [9]
    assert list(example.features.feature["age"].int64_list.value) == [3]
    assert sorted(feature_spec(["age"])) == ["age", "history", "target", "user_row"]


def test_write_errors(tmp_path):
    with pytest.raises(ValueError, match="got 1 histories but 2 targets"):
        write_tfrecords(str(tmp_path / "x"), [np.array([1])], np.array([1, 2]))
    with pytest.raises(ValueError, match="num_shards must be at least 1, got 0"):
        write_tfrecords(str(tmp_path / "x"), [np.array([1])], np.array([1]), num_shards=0)
    with pytest.raises(ValueError, match="'target' is reserved"):
        write_tfrecords(str(tmp_path / "x"), [np.array([1])], np.array([1]), {"target": np.array([1])})
    # The same reserved names as the input pipelines (a training read yields next_items).
    with pytest.raises(ValueError, match="'next_items' is reserved"):
        write_tfrecords(str(tmp_path / "x"), [np.array([1])], np.array([1]), {"next_items": np.array([1])})
    with pytest.raises(ValueError, match="'next_items' is reserved"):
        feature_spec(["next_items"])
    with pytest.raises(FileNotFoundError, match="no TFRecord file matches"):
        read_tfrecords(str(tmp_path / "nothing-*"), max_length=3, batch_size=2)
    assert os.listdir(tmp_path) == []


def test_write_split_tfrecords(tmp_path, split, monkeypatch):
    written = write_split_tfrecords(split, str(tmp_path / "export"), num_shards=2)
    directory = tmp_path / "export"
    names = sorted(os.listdir(directory))
    assert names == sorted(
        [f"{part}-{k:05d}-of-00002.tfrecord" for part in ("train", "validation", "test") for k in range(2)]
        + ["item_vocab.json", "statistics.json"]
    )
    assert Vocabulary.load(written["item_vocab"][0]) == split.dataset.item_vocab
    statistics = json.loads((directory / "statistics.json").read_text())
    assert statistics["split"] == "leave_one_out"
    assert statistics["num_items"] == 30
    # Records read with the vocabulary of another preparation: named, not a bare IndexError.
    from tfx_xmatch.data.tfrecord import record_counts

    with pytest.raises(IndexError, match="but the vocabulary has 5 items: the records and the item_vocab.json"):
        record_counts(str(directory / "train-*"), 5)
    # Training sequences of a single item (users with 3 interactions) have no target to train:
    # written without history, the reader skips them, but their item counts in the training
    # popularity, as in-process (without them the pipeline's tail set differed).
    keep = [k for k, sequence in enumerate(split.train_sequences) if len(sequence) >= 2]
    assert 0 < len(keep) < 40
    assert statistics["examples"] == {"train": 40, "validation": 40, "test": 40}
    target_counts, popularity = record_counts(str(directory / "train-*"), split.num_items)
    np.testing.assert_array_equal(popularity, split.item_popularity())
    expected_targets = np.zeros(split.num_items + 1, np.int64)
    for sequence in split.train_sequences:
        np.add.at(expected_targets, sequence[1:], 1)
    np.testing.assert_array_equal(target_counts, expected_targets)
    assert statistics["user_feature_names"] == ["segment"]
    # A rewrite that fails part-way leaves no statistics.json, the mark of a finished output.
    from tfx_xmatch.data import tfrecord

    def disk_full(path_prefix, *args, **kwargs):
        if path_prefix.endswith("test"):
            raise OSError(28, "No space left on device")
        return write_tfrecords(path_prefix, *args, **kwargs)

    monkeypatch.setattr(tfrecord, "write_tfrecords", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_split_tfrecords(split, str(directory), num_shards=2)
    assert not (directory / "statistics.json").exists()
    monkeypatch.undo()
    write_split_tfrecords(split, str(directory), num_shards=2)

    train = collect(
        read_tfrecords(str(directory / "train-*"), max_length=20, batch_size=16, user_feature_names=["segment"])
    )
    with_history = train["history"].any(axis=1)
    train = {name: values[with_history] for name, values in train.items()}
    rows = split.train_user_rows[keep]
    sequences = [split.train_sequences[k] for k in keep]
    np.testing.assert_array_equal(train["user_row"], rows)
    np.testing.assert_array_equal(train["target"], [sequence[-1] for sequence in sequences])
    np.testing.assert_array_equal(train["segment"], split.dataset.user_features["segment"][rows])
    for padded, sequence in zip(train["history"], sequences):
        history = sequence[:-1]
        assert padded[-len(history):].tolist() == history.tolist() and (padded[: -len(history)] == 0).all()

    validation = collect(read_tfrecords(str(directory / "validation-*"), max_length=20, batch_size=16))
    np.testing.assert_array_equal(validation["target"], split.validation.targets)


def test_eval_examples_without_features_round_trip(tmp_path):
    examples = EvalExamples(
        user_rows=np.array([2, 0]), histories=[np.array([1, 2, 3]), np.array([4])], targets=np.array([4, 1])
    )
    write_tfrecords(str(tmp_path / "e"), examples.histories, examples.targets, user_rows=examples.user_rows)
    read = collect(read_tfrecords(str(tmp_path / "e-*"), max_length=2, batch_size=1))
    expected = collect(eval_dataset(examples, max_length=2, batch_size=1))
    for key in expected:
        np.testing.assert_array_equal(read[key], expected[key])


def test_rewrite_with_other_shard_count_removes_stale_shards(tmp_path):
    prefix = str(tmp_path / "test")
    histories, targets = [np.array([k]) for k in range(1, 7)], np.arange(2, 8)
    old = write_tfrecords(prefix, histories, targets, num_shards=3)
    # Files of other prefixes (even ones starting with "test") are left alone.
    kept = write_tfrecords(str(tmp_path / "test-extra"), histories[:2], targets[:2], num_shards=2)
    (tmp_path / "test-notes.txt").write_text("not a shard")
    new = write_tfrecords(prefix, histories[:4], targets[:4], num_shards=2)
    assert not any(os.path.exists(path) for path in old)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(path) for path in new + kept] + ["test-notes.txt"]
    )
    # "[0-9]" keeps the glob from also matching the "test-extra" shards.
    pattern = prefix + "-[0-9]*-of-*"
    assert collect(read_tfrecords(pattern, max_length=1, batch_size=8))["target"].tolist() == [2, 3, 4, 5]
    # Rewriting with the same count replaces the shards in place.
    assert write_tfrecords(prefix, histories[:1], targets[:1], num_shards=2) == new
    assert collect(read_tfrecords(pattern, max_length=1, batch_size=8))["target"].tolist() == [2]


def sorted_rows(arrays):
    """Rows of the dict's arrays as sortable tuples (order-insensitive comparison)."""
    keys = sorted(arrays)
    num_rows = len(arrays[keys[0]])
    return sorted(tuple(tuple(np.ravel(arrays[key][row]).tolist()) for key in keys) for row in range(num_rows))


@pytest.mark.parametrize("max_length", [4, 20])
def test_training_read_equals_sequence_training_dataset(tmp_path, split, max_length):
    write_split_tfrecords(split, str(tmp_path), num_shards=2)
    features = split.dataset.user_features
    pattern = str(tmp_path / "train-*-of-*.tfrecord")
    expected_dataset = sequence_training_dataset(
        split.train_sequences,
        max_length=max_length,
        batch_size=8,
        shuffle=False,
        user_rows=split.train_user_rows,
        user_features=features,
    )
    read = read_training_tfrecords(
        pattern, max_length=max_length, batch_size=8, shuffle=False, user_feature_names=list(features)
    )
    assert read.element_spec == expected_dataset.element_spec
    expected = collect(expected_dataset)
    # max_length 4 truncates most sequences, 20 pads all of them.
    assert sorted(expected) == ["history", "next_items", "segment"]
    actual = collect(read)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)

    shuffled = read_training_tfrecords(
        pattern, max_length=max_length, batch_size=8, seed=3, user_feature_names=list(features)
    )
    first, second = [collect(shuffled) for _ in range(2)]
    assert sorted_rows(first) == sorted_rows(second) == sorted_rows(expected)
    assert first["history"].tolist() != second["history"].tolist()  # reshuffled each epoch
    again = read_training_tfrecords(
        pattern, max_length=max_length, batch_size=8, seed=3, user_feature_names=list(features)
    )
    np.testing.assert_array_equal(collect(again)["history"], first["history"])


def test_training_read_aligns_next_items_and_skips_empty_histories(tmp_path):
    # Sequences [1, 2, 3, 4, 5], [6] (no history: nothing to predict) and [7, 8].
    histories = [np.array([1, 2, 3, 4]), np.array([], dtype=np.int64), np.array([7])]
    write_tfrecords(str(tmp_path / "t"), histories, np.array([5, 6, 8]), {"age": np.array([1, 2, 3])})
    dataset = read_training_tfrecords(
        str(tmp_path / "t-*"), max_length=3, batch_size=2, shuffle=False, user_feature_names=["age"]
    )
    arrays = collect(dataset)
    assert arrays["history"].tolist() == [[2, 3, 4], [0, 0, 7]]
    assert arrays["next_items"].tolist() == [[3, 4, 5], [0, 0, 8]]
    assert arrays["age"].tolist() == [1, 3]
    assert sorted(arrays) == ["age", "history", "next_items"]
    static = read_training_tfrecords(str(tmp_path / "t-*"), max_length=3, batch_size=2, drop_remainder=True)
    assert static.element_spec["history"].shape.as_list() == [2, 3]
    with pytest.raises(FileNotFoundError, match="no TFRecord file matches"):
        read_training_tfrecords(str(tmp_path / "none-*"), max_length=3, batch_size=2)
    with pytest.raises(ValueError, match="max_length must be positive, got 0"):
        read_training_tfrecords(str(tmp_path / "t-*"), max_length=0, batch_size=2)


def test_records_are_the_same_bytes_in_every_process():
    # A record's feature map was written in an order that changed with the process, so a re-run,
    # or a Beam worker, wrote other bytes for the same examples. The protobuf runtime orders a
    # map with a seed of its own per process, so processes differ by chance: the record must be
    # the canonical (key-sorted) serialization, checked here in one process, and the processes
    # below (each with its own string hashing too) must agree.
    from tfx_xmatch.data.tfrecord import example_bytes

    record = example_bytes([0, 3, 5], 7, {"age": 2, "gender": 1, "occupation": 9, "zip": 4})
    assert tf.train.Example.FromString(record).SerializeToString(deterministic=True) == record
    import subprocess
    import sys

    script = ("import tfx_xmatch; from tfx_xmatch.data.tfrecord import example_bytes; import sys; "
              "sys.stdout.write(example_bytes([0, 3, 5], 7, {'age': 2, 'gender': 1, 'occupation': 9, 'zip': 4}).hex())")
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed, "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout
               for seed in ("1", "2", "3", "4")}
    assert outputs == {record.hex()}


@pytest.mark.parametrize("history, target", [([-1, 2], 3), ([1, 2**32 + 1], 3), ([1, 2], 2**32 + 3)],
                         ids=["negative", "past_int32_history", "past_int32_target"])
def test_records_from_another_writer_with_indices_out_of_range_fail_the_read(tmp_path, history, target):
    """A cast to int32 wrapped 2**32 + 1 to item 1 without a word, counting took -1 for the last
    item, and read_eval_examples raised a raw OverflowError."""
    from tfx_xmatch.data.tfrecord import read_eval_examples, record_counts

    example = tf.train.Example(features=tf.train.Features(feature={
        "history": tf.train.Feature(int64_list=tf.train.Int64List(value=history)),
        "target": tf.train.Feature(int64_list=tf.train.Int64List(value=[target])),
        "user_row": tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
    }))
    path = str(tmp_path / "foreign-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(example.SerializeToString())
    message = "a record holds an item index outside 0..2147483647"
    for read in (lambda: collect(read_tfrecords(path, max_length=4, batch_size=2)),
                 lambda: collect(read_training_tfrecords(path, max_length=4, batch_size=2, shuffle=False)),
                 lambda: read_eval_examples(path),
                 lambda: record_counts(path, num_items=10)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=f"{tmp_path}.*{message}"):
            read()


@pytest.mark.parametrize("damage", ["flipped_byte", "cut_short", "cut_inside_a_header", "gzip_flipped_byte",
                                    "gzip_cut_short"])
def test_a_damaged_file_is_named(tmp_path, split, damage):
    """tf.data said "corrupted record at 474" and nothing of which of the shards it was; a file
    cut inside a record's header, or a GZIP file cut short, read as fewer records and no error."""
    from tfx_xmatch.data import damaged_file_named
    from tfx_xmatch.data.tfrecord import read_eval_examples, record_counts
    from tfx_xmatch.pipelines.evaluate import read_records

    suffix = ".gz" if damage.startswith("gzip") else ""
    written = write_split_tfrecords(split, str(tmp_path), num_shards=3)
    files = written["train"]
    if suffix:  # TFX ExampleGen's GZIP shards
        for path in files:
            records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
            with tf.io.TFRecordWriter(path + suffix, options="GZIP") as writer:
                for record in records:
                    writer.write(record)
            os.remove(path)
        files = [path + suffix for path in files]
    damaged = files[1]
    data = bytearray(open(damaged, "rb").read())
    if damage.endswith("cut_short"):
        data = data[:-5]
    elif damage == "cut_inside_a_header":
        last_record = list(tf.data.TFRecordDataset(damaged))[-1].numpy()
        records_before = len(list(tf.data.TFRecordDataset(damaged)))
        data = data[:len(data) - (12 + len(last_record) + 4) + 5]
    else:
        data[len(data) // 2] ^= 0xFF
    with open(damaged, "wb") as f:
        f.write(data)
    if damage == "cut_inside_a_header":  # tf.data alone reads it as one record fewer, silently
        assert len(list(tf.data.TFRecordDataset(damaged))) == records_before - 1
    pattern = str(tmp_path / f"train-*{suffix}")
    expected = f"^{damaged}: .*: the TFRecord file is damaged or cut short"
    reads = {
        "read_eval_examples": lambda: read_eval_examples(pattern),
        "record_counts": lambda: record_counts(pattern, num_items=split.num_items),
        "read_training_tfrecords counting": lambda: read_training_tfrecords(pattern, max_length=4, batch_size=2),
        "the Beam stage's reader": lambda: list(read_records(damaged)),
    }

    def iterate_lazily():
        with damaged_file_named(pattern):
            collect(read_training_tfrecords(pattern, max_length=4, batch_size=2, shuffle=False))

    reads["iterating inside damaged_file_named"] = iterate_lazily
    for name, read in reads.items():
        with pytest.raises(tf.errors.DataLossError, match=expected) as info:
            read()
        assert "function_node" not in info.value.message and "[Op:" not in info.value.message, name
    # Undamaged files read as before.
    assert len(read_eval_examples(files[0])[0].targets) > 0


def test_a_file_is_checked_whole_once_and_again_when_it_changes(tmp_path, split, monkeypatch):
    """Training counts the records and then reads them: each file was scanned to its end twice.
    A file found whole is not scanned again, unless it was rewritten since."""
    from tfx_xmatch.data import tfrecord
    from tfx_xmatch.data.tfrecord import read_eval_examples, record_counts

    files = write_split_tfrecords(split, str(tmp_path), num_shards=2)["train"]
    scanned = []
    scan = tfrecord._where_cut_short
    monkeypatch.setattr(tfrecord, "_where_cut_short", lambda path: scanned.append(path) or scan(path))
    record_counts(files, num_items=split.num_items)
    read_training_tfrecords(files, max_length=4, batch_size=2)
    assert scanned == files
    # Rewritten at the same length (tf.io.gfile's stat, to the second, could not tell): scanned again.
    same = open(files[1], "rb").read()
    with open(files[1], "wb") as f:
        f.write(same)
    os.utime(files[1], ns=(os.stat(files[1]).st_atime_ns, os.stat(files[1]).st_mtime_ns + 1))
    record_counts(files, num_items=split.num_items)
    assert scanned == files + [files[1]]
    data = open(files[0], "rb").read()
    with open(files[0], "wb") as f:  # cut short after it was found whole
        f.write(data[:-5])
    with pytest.raises(tf.errors.DataLossError, match=f"^{files[0]}: .*cut short"):
        read_eval_examples(files)


def test_a_failed_write_leaves_the_old_files_as_they_were(tmp_path, split):
    """A bad example in the second shard left shard 0 new and shard 1 old; num_shards=0 was
    refused only after the old statistics.json (the mark of a finished output) was deleted."""
    prefix = str(tmp_path / "recs" / "part")
    paths = write_tfrecords(prefix, [[1, 2], [2, 3], [3, 4], [4, 5]], [10, 11, 12, 13], num_shards=2)
    before = {path: open(path, "rb").read() for path in paths}
    with pytest.raises(ValueError, match=r"example 3: its history \['x'\] is not a list of int64 item indices"):
        write_tfrecords(prefix, [[1], [2], [3], ["x"]], [20, 21, 22, 23], num_shards=2)
    with pytest.raises(ValueError, match="targets must be int64 item indices"):
        write_tfrecords(prefix, [[1], [2]], [20, "y"], num_shards=2)
    assert {path: open(path, "rb").read() for path in paths} == before
    assert sorted(os.listdir(tmp_path / "recs")) == sorted(os.path.basename(path) for path in paths)  # no temporaries

    directory = tmp_path / "split"
    write_split_tfrecords(split, str(directory), num_shards=1)
    before = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    with pytest.raises(ValueError, match="num_shards must be at least 1, got 0"):
        write_split_tfrecords(split, str(directory), num_shards=0)
    assert {name: (directory / name).read_bytes() for name in os.listdir(directory)} == before
