"""Synthetic data: determinism, planted ring structure, features, and the oracle check."""

import numpy as np
import pytest

from tfx_xmatch.data import (
    leave_one_out,
    make_synthetic,
    planted_cluster_of,
    planted_clusters,
    planted_successor,
    time_split,
)


def test_defaults_shape_and_features():
    data = make_synthetic()
    assert (data.num_users, data.num_items, data.name) == (500, 200, "synthetic")
    lengths = np.array([len(sequence) for sequence in data.sequences])
    assert lengths.min() >= 20 and lengths.max() <= 50
    assert all(sequence.dtype == np.int32 for sequence in data.sequences)
    items = np.concatenate(data.sequences)
    assert items.min() >= 1 and items.max() <= 200
    category = data.item_features["category"]
    assert category.shape == (201, 10) and category.dtype == np.float32
    assert category[0].sum() == 0 and (category[1:].sum(axis=1) == 1).all()
    np.testing.assert_array_equal(category[1:].argmax(axis=1), planted_cluster_of(200, 10, 0)[1:])
    segment = data.user_features["segment"]
    assert segment.dtype == np.int32 and segment.shape == (500,)
    np.testing.assert_array_equal(segment, planted_cluster_of(200, 10, 0)[[s[0] for s in data.sequences]] + 1)
    assert len(data.feature_vocabs["category"]) == 10 and data.feature_vocabs["segment"][0] == "unknown"
    assert all(len(t) == len(s) and (np.diff(t) > 0).all() for t, s in zip(data.timestamps, data.sequences))


def test_deterministic_for_a_seed():
    first, second = make_synthetic(seed=3), make_synthetic(seed=3)
    assert all((a == b).all() for a, b in zip(first.sequences, second.sequences))
    assert all((a == b).all() for a, b in zip(first.timestamps, second.timestamps))
    other = make_synthetic(seed=4)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(first.sequences, other.sequences))


def test_structure_does_not_depend_on_the_number_of_users():
    np.testing.assert_array_equal(
        make_synthetic(num_users=5, seed=2).metadata["successor"],
        make_synthetic(num_users=50, seed=2).metadata["successor"],
    )


def test_successor_is_one_ring_per_cluster():
    successor = planted_successor(23, 4, seed=1)
    cluster_of = planted_cluster_of(23, 4, seed=1)
    rings = planted_clusters(23, 4, seed=1)
    assert successor[0] == 0 and cluster_of[0] == -1
    assert sorted(np.concatenate(rings).tolist()) == list(range(1, 24))
    assert sorted(len(ring) for ring in rings) == [5, 6, 6, 6]
    for ring in rings:
        item, seen = ring[0], []
        for _ in range(len(ring)):
            seen.append(item)
            assert cluster_of[successor[item]] == cluster_of[item]
            item = successor[item]
        assert item == ring[0] and sorted(seen) == sorted(ring.tolist())


def test_without_noise_every_step_follows_the_successor():
    data = make_synthetic(num_users=40, noise=0.0)
    successor = data.metadata["successor"]
    for sequence in data.sequences:
        np.testing.assert_array_equal(successor[sequence[:-1]], sequence[1:])


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3])
def test_successor_oracle_scores_hr_at_1_of_one_minus_noise(noise):
    data = make_synthetic(num_users=1000, noise=noise, seed=5)
    split = leave_one_out(data)
    successor = planted_successor(200, 10, seed=5)
    predictions = successor[[history[-1] for history in split.test.histories]]
    hit_rate = float(np.mean(predictions == split.test.targets))
    # A jump lands on the successor by chance with probability about 1/200.
    assert hit_rate == pytest.approx(1 - noise + noise / 200, abs=0.04)


def test_timestamps_support_a_time_split():
    split = time_split(make_synthetic(num_users=100))
    assert len(split.test) > 0 and len(split.validation) > 0


def test_large_dataset():
    # Functional check only; how long generation takes belongs in benchmarks.
    data = make_synthetic(num_users=6000, num_items=3000, num_clusters=100)
    assert data.num_users == 6000 and data.num_items == 3000
    items = np.concatenate(data.sequences)
    assert items.min() >= 1 and items.max() <= 3000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_users": 0}, "num_users must be at least 1, got 0"),
        ({"num_clusters": 0}, "num_clusters must be at least 1, got 0"),
        ({"num_items": 5, "num_clusters": 6}, "num_items=5 and num_clusters=6"),
        ({"min_length": 5, "max_length": 4}, "max_length=4 and min_length=5"),
        ({"noise": 1.5}, r"noise must be in \[0, 1\], got 1.5"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic(**kwargs)
