"""TargetAttention: masked positions are invisible, fully masked queries give zeros, config round trip."""

import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch.layers import TargetAttention


def test_masked_positions_do_not_change_the_output():
    layer = TargetAttention(num_heads=2)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(2, 3, 8)).astype(np.float32)
    states = rng.normal(size=(2, 5, 8)).astype(np.float32)
    mask = np.ones((2, 3, 5), bool)
    mask[:, :, :2] = False
    before = layer(queries, states, mask).numpy()
    states[:, :2] = rng.normal(size=(2, 2, 8))
    np.testing.assert_allclose(layer(queries, states, mask).numpy(), before, rtol=1e-5, atol=1e-6)


def test_a_query_with_nothing_to_see_gets_zeros_and_the_output_follows_the_query():
    layer = TargetAttention()
    rng = np.random.default_rng(1)
    states = tf.constant(rng.normal(size=(1, 4, 6)).astype(np.float32))
    queries = tf.constant(rng.normal(size=(1, 2, 6)).astype(np.float32) * 3)
    mask = tf.constant([[[True] * 4, [False] * 4]])
    out = layer(queries, states, mask).numpy()
    np.testing.assert_array_equal(out[0, 1], np.zeros(6))
    other = layer(queries * -1.0, states, tf.ones([1, 2, 4], tf.bool)).numpy()
    assert not np.allclose(other[0, 0], out[0, 0])  # the query chooses what it attends to


def test_config_round_trip_and_bad_arguments():
    layer = TargetAttention(num_heads=2, key_dim=4, dropout=0.1, name="ta")
    assert TargetAttention.from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1, got 0"):
        TargetAttention(num_heads=0)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0.0, 1.0\), got 1.5"):
        TargetAttention(dropout=1.5)
