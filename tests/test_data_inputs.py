"""tf.data pipelines: shapes, next-item alignment, padding, user features, order and shuffling."""

import tfx_xmatch  # noqa: F401  (before TensorFlow: selects Keras 2)
import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch.data import (
    EvalExamples,
    eval_dataset,
    leave_one_out,
    make_synthetic,
    pad_histories,
    sequence_training_dataset,
)


def collect(dataset):
    batches = [{key: value.numpy() for key, value in batch.items()} for batch in dataset]
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def test_training_batches_align_history_and_next_items():
    sequences = [np.array([1, 2, 3, 4, 5]), np.array([6, 7]), np.array([8]), np.array([9, 1, 2])]
    dataset = sequence_training_dataset(sequences, max_length=3, batch_size=2, shuffle=False)
    assert dataset.element_spec["history"].shape.as_list() == [None, 3]
    assert dataset.element_spec["history"].dtype == tf.int32
    assert dataset.element_spec["next_items"].dtype == tf.int32
    arrays = collect(dataset)
    # The single-item sequence [8] has nothing to predict and is left out; [1..5] keeps the
    # most recent 3 positions.
    assert arrays["history"].tolist() == [[2, 3, 4], [0, 0, 6], [0, 9, 1]]
    assert arrays["next_items"].tolist() == [[3, 4, 5], [0, 0, 7], [0, 1, 2]]


def test_next_item_at_t_follows_history_at_t_on_synthetic_data():
    data = make_synthetic(num_users=50, num_items=40, num_clusters=4, min_length=2, max_length=30)
    arrays = collect(sequence_training_dataset(data.sequences, max_length=20, batch_size=16, shuffle=False))
    assert arrays["history"].shape == (50, 20)
    for row, sequence in enumerate(data.sequences):
        history, next_items = arrays["history"][row], arrays["next_items"][row]
        assert ((history == 0) == (next_items == 0)).all()
        for t in np.flatnonzero(history):
            # Position t of the row is position p of the sequence; the target is what followed.
            p = len(sequence) - 1 - (20 - t)
            assert history[t] == sequence[p] and next_items[t] == sequence[p + 1]


def test_user_features_follow_user_rows():
    sequences = [np.array([1, 2]), np.array([3, 4, 5])]
    features = {"segment": np.array([10, 20, 30], dtype=np.int64)}
    dataset = sequence_training_dataset(
        sequences,
        max_length=4,
        batch_size=8,
        shuffle=False,
        user_rows=np.array([2, 0]),
        user_features=features,
    )
    assert dataset.element_spec["segment"].dtype == tf.int32
    arrays = collect(dataset)
    assert arrays["segment"].tolist() == [30, 10]
    assert sorted(arrays) == ["history", "next_items", "segment"]


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
    sequences = [np.array([k, k + 1]) for k in range(1, 65)]
    dataset = sequence_training_dataset(sequences, max_length=2, batch_size=64, seed=7)
    first, second = [batch["history"][:, 1].numpy().tolist() for batch in dataset.repeat(2)]
    assert sorted(first) == sorted(second) == list(range(1, 65))
    assert first != second
    again = sequence_training_dataset(sequences, max_length=2, batch_size=64, seed=7)
    assert next(iter(again))["history"][:, 1].numpy().tolist() == first


def test_drop_remainder_gives_static_batch_size():
    sequences = [np.array([1, 2, 3])] * 5
    dataset = sequence_training_dataset(sequences, max_length=4, batch_size=2, drop_remainder=True)
    assert dataset.element_spec["history"].shape.as_list() == [2, 4]
    assert len(list(dataset)) == 2


def test_training_errors():
    with pytest.raises(ValueError, match="no training sequence has at least 2 items"):
        sequence_training_dataset([np.array([1])], max_length=4, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        sequence_training_dataset([np.array([1, 2])], max_length=4, batch_size=0)
    with pytest.raises(ValueError, match="max_length must be positive, got -1"):
        sequence_training_dataset([np.array([1, 2])], max_length=-1, batch_size=2)
    with pytest.raises(ValueError, match="user_rows has 2 entries but there are 1 sequences"):
        sequence_training_dataset([np.array([1, 2])], max_length=4, batch_size=2, user_rows=np.array([0, 1]))


def test_eval_dataset_keeps_example_order():
    data = make_synthetic(num_users=30, num_items=20, num_clusters=2, min_length=3, max_length=12)
    split = leave_one_out(data)
    dataset = eval_dataset(split.test, max_length=8, batch_size=7, user_features=data.user_features)
    assert {key: spec.dtype for key, spec in dataset.element_spec.items()} == {
        "history": tf.int32,
        "target": tf.int32,
        "user_row": tf.int32,
        "segment": tf.int32,
    }
    arrays = collect(dataset)
    np.testing.assert_array_equal(arrays["history"], pad_histories(split.test.histories, 8))
    np.testing.assert_array_equal(arrays["target"], split.test.targets)
    np.testing.assert_array_equal(arrays["user_row"], split.test.user_rows)
    np.testing.assert_array_equal(arrays["segment"], data.user_features["segment"][split.test.user_rows])


@pytest.mark.parametrize("name", ["history", "next_items", "target", "user_row"])
def test_reserved_user_feature_names_are_rejected(name):
    with pytest.raises(ValueError, match=f"'{name}' is reserved"):
        sequence_training_dataset(
            [np.array([1, 2])], max_length=2, batch_size=1, user_features={name: np.array([1])}
        )


def test_eval_dataset_rejects_out_of_range_user_rows():
    examples = EvalExamples(user_rows=np.array([5]), histories=[np.array([1])], targets=np.array([2]))
    with pytest.raises(ValueError, match="user row 5 is out of range for user feature 'age' with 2 users"):
        eval_dataset(examples, max_length=3, batch_size=1, user_features={"age": np.array([1, 2])})
