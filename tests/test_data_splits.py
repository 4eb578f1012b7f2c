"""Splits: protocol semantics, no leakage, clear errors on data too small to split."""

import functools

import numpy as np
import pytest

from tfx_xmatch.data import (
    SequenceDataset,
    Vocabulary,
    leave_one_out,
    load_dataset,
    make_split,
    make_synthetic,
    time_split,
    user_level,
)


def make_dataset(sequences, timestamps=None, name="tiny"):
    num_items = max(max(sequence) for sequence in sequences)
    return SequenceDataset(
        name=name,
        sequences=[np.asarray(sequence, dtype=np.int32) for sequence in sequences],
        item_vocab=Vocabulary(range(1, num_items + 1)),
        user_ids=np.arange(1, len(sequences) + 1),
        timestamps=None if timestamps is None else [np.asarray(t, dtype=np.int64) for t in timestamps],
    )


# ----------------------------------------------------------------------------- leave one out


def test_leave_one_out_semantics():
    dataset = make_dataset([[1, 2, 3, 4], [5, 6], [7, 8, 9]])
    split = leave_one_out(dataset)
    assert split.name == "leave_one_out" and split.dataset is dataset
    assert split.train_user_rows.tolist() == [0, 1, 2]
    assert [s.tolist() for s in split.train_sequences] == [[1, 2], [5, 6], [7]]
    assert split.validation.user_rows.tolist() == [0, 2]
    assert [h.tolist() for h in split.validation.histories] == [[1, 2], [7]]
    assert split.validation.targets.tolist() == [3, 8]
    assert [h.tolist() for h in split.test.histories] == [[1, 2, 3], [7, 8]]
    assert split.test.targets.tolist() == [4, 9]
    assert split.test.targets.dtype == np.int32


def test_leave_one_out_has_no_leakage_on_synthetic_data():
    dataset = make_synthetic(num_users=200, num_items=100, min_length=2, max_length=30)
    split = leave_one_out(dataset, min_length=3)
    train = dict(zip(split.train_user_rows.tolist(), split.train_sequences))
    validation = dict(zip(split.validation.user_rows.tolist(), split.validation.targets.tolist()))
    test = dict(zip(split.test.user_rows.tolist(), split.test.targets.tolist()))
    for row, sequence in enumerate(dataset.sequences):
        if len(sequence) >= 3:
            rebuilt = train[row].tolist() + [validation[row], test[row]]
            assert rebuilt == sequence.tolist()
        else:
            assert train[row].tolist() == sequence.tolist() and row not in test
    for history, target, row in zip(split.test.histories, split.test.targets, split.test.user_rows):
        assert history.tolist() + [target] == dataset.sequences[row].tolist()


def test_leave_one_out_too_small():
    with pytest.raises(ValueError, match=r"at least one user with >= 3 interactions; the longest .* has 2"):
        leave_one_out(make_dataset([[1, 2], [3]]))
    with pytest.raises(ValueError, match=r"min_length must be an integer >= 3 .*got 2"):
        leave_one_out(make_dataset([[1, 2, 3]]), min_length=2)


def test_item_popularity_counts_training_interactions_only():
    # Train sequences are [1, 2] and [1]: targets 3, 4 and the second user's 1, 2 are held out.
    split = leave_one_out(make_dataset([[1, 2, 3, 4], [1, 1, 2]]))
    assert split.item_popularity().tolist() == [0, 2, 1, 0, 0]


# ----------------------------------------------------------------------------- user level


def test_user_level_partitions_users():
    dataset = make_synthetic(num_users=100, num_items=50, num_clusters=5, min_length=2, max_length=10)
    split = user_level(dataset, fractions=(0.6, 0.2, 0.2), seed=3)
    train = set(split.train_user_rows.tolist())
    validation = set(split.validation.user_rows.tolist())
    test = set(split.test.user_rows.tolist())
    assert (len(train), len(validation), len(test)) == (60, 20, 20)
    assert not train & validation and not train & test and not validation & test
    assert train | validation | test == set(range(100))
    for examples in (split.validation, split.test):
        for history, target, row in zip(examples.histories, examples.targets, examples.user_rows):
            assert history.tolist() + [target] == dataset.sequences[row].tolist()
    for row, sequence in zip(split.train_user_rows, split.train_sequences):
        assert sequence.tolist() == dataset.sequences[row].tolist()
    again = user_level(dataset, fractions=(0.6, 0.2, 0.2), seed=3)
    assert again.test.user_rows.tolist() == split.test.user_rows.tolist()
    other = user_level(dataset, fractions=(0.6, 0.2, 0.2), seed=4)
    assert other.test.user_rows.tolist() != split.test.user_rows.tolist()


def test_user_level_errors():
    with pytest.raises(ValueError, match="at least 10 users, dataset 'tiny' has 3"):
        user_level(make_dataset([[1, 2], [2, 3], [3, 1]]))
    dataset = make_dataset([[1, 2]] * 10)
    with pytest.raises(ValueError, match=r"summing to 1, got \(0.5, 0.1, 0.1\)"):
        user_level(dataset, fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="need at least 2 interactions"):
        user_level(make_dataset([[1]] * 10 + [[1, 2]]))


# ----------------------------------------------------------------------------- time


def test_time_split_explicit_cuts():
    dataset = make_dataset(
        [[1, 2, 3, 4, 5], [6, 7], [8, 9], [3, 4]],
        timestamps=[[1, 2, 5, 6, 9], [1, 8], [6, 7], [2, 3]],
    )
    split = time_split(dataset, validation_time=5, test_time=8)
    assert split.name == "time"
    assert split.train_user_rows.tolist() == [0, 1, 3]
    assert [s.tolist() for s in split.train_sequences] == [[1, 2], [6], [3, 4]]
    # User 0: validation predicts the first event in [5, 8) from events before 5.
    assert split.validation.user_rows.tolist() == [0]
    assert [h.tolist() for h in split.validation.histories] == [[1, 2]]
    assert split.validation.targets.tolist() == [3]
    # Test histories include the validation period. User 2 (events at 6, 7) has nothing before
    # the validation cut and nothing at/after the test cut, so it gets no example at all; user 3
    # (2, 3) has nothing after either cut and is train-only.
    assert split.test.user_rows.tolist() == [0, 1]
    assert [h.tolist() for h in split.test.histories] == [[1, 2, 3, 4], [6]]
    assert split.test.targets.tolist() == [5, 7]


def test_time_split_sorts_unsorted_timestamps():
    dataset = make_dataset([[3, 1, 2]], timestamps=[[30, 10, 20]])
    split = time_split(dataset, validation_time=20, test_time=30)
    assert split.train_sequences[0].tolist() == [1]
    assert split.validation.targets.tolist() == [2] and split.test.targets.tolist() == [3]


def test_time_split_needs_timestamps():
    with pytest.raises(ValueError, match="dataset 'tiny' has no timestamps"):
        time_split(make_dataset([[1, 2, 3]]))


def test_time_split_errors():
    dataset = make_dataset([[1, 2, 3]], timestamps=[[10, 20, 30]])
    with pytest.raises(ValueError, match="no event before validation_time=5"):
        time_split(dataset, validation_time=5, test_time=25)
    with pytest.raises(ValueError, match="events both before and at/after test_time=40"):
        time_split(dataset, validation_time=15, test_time=40)
    with pytest.raises(ValueError, match="must not be after test_time"):
        time_split(dataset, validation_time=30, test_time=20)
    with pytest.raises(ValueError, match="quantiles"):
        time_split(dataset, quantiles=(0.9, 0.8))


@functools.lru_cache(maxsize=None)
def real_ml100k(data_dir: str):
    return load_dataset("ml-100k", data_dir=data_dir, side_info=False)


def test_time_split_on_real_ml100k_has_no_leakage(real_data_dir):
    dataset = real_ml100k(str(real_data_dir))
    split = time_split(dataset)
    every = np.concatenate(dataset.timestamps)
    validation_time, test_time = np.quantile(every, (0.8, 0.9), method="higher")
    assert len(split.validation) > 50 and len(split.test) > 50
    for row, sequence in zip(split.train_user_rows, split.train_sequences):
        times = dataset.timestamps[row][: len(sequence)]
        assert (times < validation_time).all()
        assert sequence.tolist() == dataset.sequences[row][: len(sequence)].tolist()
    for examples, cut in ((split.validation, validation_time), (split.test, test_time)):
        for history, target, row in zip(examples.histories, examples.targets, examples.user_rows):
            times = dataset.timestamps[row]
            position = len(history)
            assert (times[:position] < cut).all() and times[position] >= cut
            assert dataset.sequences[row][position] == target


def test_real_leave_one_out_counts(real_data_dir):
    dataset = real_ml100k(str(real_data_dir))
    split = leave_one_out(dataset)
    assert len(split.test) == len(split.validation) == dataset.num_users == 943
    assert sum(len(s) for s in split.train_sequences) == 100000 - 2 * 943


# ----------------------------------------------------------------------------- dispatch


def test_make_split_dispatches_and_rejects_unknown_names():
    dataset = make_synthetic(num_users=20, num_items=20, num_clusters=2, min_length=3, max_length=5)
    assert make_split(dataset, "leave_one_out").name == "leave_one_out"
    assert make_split(dataset, "user_level", seed=1).name == "user_level"
    assert make_split(dataset, "time", quantiles=(0.5, 0.7)).name == "time"
    with pytest.raises(ValueError, match="unknown split 'random'; known: leave_one_out, user_level, time"):
        make_split(dataset, "random")


@pytest.mark.parametrize("split, options, message", [
    # Each once failed deep inside the split with "'<' not supported between 'str' and 'int'" or
    # NumPy's "SeedSequence expects int", naming neither the option nor its value.
    ("leave_one_out", {"min_length": "abc"}, r"min_length must be an integer >= 3 .*got 'abc'"),
    ("leave_one_out", {"min_length": 3.5}, r"min_length must be an integer >= 3 .*got 3.5"),
    ("user_level", {"seed": "abc"}, "seed must be an integer >= 0, got 'abc'"),
    ("time", {"validation_time": "yesterday"}, "validation_time must be an integer timestamp or None, got 'yesterday'"),
    ("time", {"test_time": 1.5}, "test_time must be an integer timestamp or None, got 1.5"),
    ("time", {"quantiles": "abc"}, r"quantiles must be \(validation, test\) with 0 < validation <= test < 1, got 'abc'"),
    ("time", {"quantiles": [0.8, "x"]}, r"quantiles must be .* got \[0.8, 'x'\]"),
])
def test_split_options_of_the_wrong_type_are_named(split, options, message):
    from tfx_xmatch.data.splits import check_split_options

    with pytest.raises(ValueError, match=message):
        check_split_options(split, options)
    timestamps = [[1, 2, 3, 4], [2, 3, 4, 5], [1, 3, 5, 7]] * 4
    dataset = make_dataset([[1, 2, 3, 4], [2, 3, 4, 5], [1, 3, 5, 2]] * 4, timestamps=timestamps)
    with pytest.raises(ValueError, match=message):  # the same words from the split itself
        make_split(dataset, split, **options)
