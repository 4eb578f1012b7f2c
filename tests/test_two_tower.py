"""TwoTower and its layers: shapes, causality, config round trips, a training step, save/reload."""

import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch.layers import CausalTransformerBlock, ItemTower, MeanPoolingEncoder, SASRecEncoder
from tfx_xmatch.models import TwoTower
from tfx_xmatch.training import load_model, save_model

NUM_ITEMS, LENGTH = 30, 8


def _batch(seed=0, batch=6):
    rng = np.random.default_rng(seed)
    history = rng.integers(1, NUM_ITEMS + 1, size=(batch, LENGTH)).astype(np.int32)
    history[0, :3] = 0  # a left-padded row
    next_items = np.roll(history, -1, axis=1)
    next_items[:, -1] = rng.integers(1, NUM_ITEMS + 1, size=batch)
    next_items[history == 0] = 0
    return {"history": history, "next_items": next_items}


def _model(**kwargs):
    defaults = dict(num_items=NUM_ITEMS, embedding_dim=16, max_length=LENGTH, dropout=0.0)
    tf.keras.utils.set_random_seed(1)
    return TwoTower(**{**defaults, **kwargs})


def test_sasrec_encoder_is_causal_and_zero_on_padding():
    encoder = SASRecEncoder(max_length=LENGTH, num_blocks=2, num_heads=2, dropout=0.0)
    embeddings = tf.random.normal([2, LENGTH, 8], seed=0)
    mask = tf.constant([[False] * 2 + [True] * 6, [True] * 8])
    out = encoder(embeddings, mask).numpy()
    changed = embeddings.numpy().copy()
    changed[:, 5:] += np.random.default_rng(1).normal(size=changed[:, 5:].shape)  # only the future of position 4
    out_changed = encoder(tf.constant(changed), mask).numpy()
    np.testing.assert_allclose(out[:, :5], out_changed[:, :5], atol=1e-5)
    assert not np.allclose(out[:, 5:], out_changed[:, 5:])
    np.testing.assert_array_equal(out[0, :2], 0.0)


def test_histories_longer_than_max_length_are_refused_with_both_lengths():
    # One position too many once broadcast a single position row over the whole history.
    encoder = SASRecEncoder(max_length=LENGTH, num_blocks=1, num_heads=1, dropout=0.0)
    too_long = tf.random.normal([2, LENGTH + 1, 8], seed=0)
    with pytest.raises(ValueError, match=rf"histories are {LENGTH + 1} positions long, more than max_length={LENGTH}"):
        encoder(too_long, tf.ones([2, LENGTH + 1], tf.bool))
    dynamic = tf.function(encoder, input_signature=[tf.TensorSpec([None, None, 8]), tf.TensorSpec([None, None], tf.bool)])
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"longer than max_length={LENGTH}"):
        dynamic(too_long, tf.ones([2, LENGTH + 1], tf.bool))
    assert dynamic(too_long[:, 1:], tf.ones([2, LENGTH], tf.bool)).shape == (2, LENGTH, 8)


def test_mean_pooling_encoder_is_the_running_mean():
    encoder = MeanPoolingEncoder(projection=False)
    embeddings = np.random.default_rng(0).normal(size=(1, 4, 3)).astype(np.float32)
    mask = np.array([[False, True, True, True]])
    out = encoder(embeddings, mask).numpy()
    np.testing.assert_allclose(out[0, 3], embeddings[0, 1:].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(out[0, 1], embeddings[0, 1], rtol=1e-5)
    np.testing.assert_array_equal(out[0, 0], 0.0)


@pytest.mark.parametrize("encoder", [
    SASRecEncoder(max_length=LENGTH, num_blocks=1, num_heads=1, dropout=0.0),
    SASRecEncoder(max_length=LENGTH, num_blocks=3, num_heads=2, dropout=0.0),
    CausalTransformerBlock(num_heads=2, ffn_units=12, dropout=0.0),
    MeanPoolingEncoder(projection=True),
    MeanPoolingEncoder(projection=False),
], ids=["sasrec-1-block", "sasrec-3-blocks", "block", "mean-projected", "mean"])
def test_last_position_only_is_the_last_row_of_the_full_output(encoder):
    """What serving reads, computed alone: left padding, a row with one item, an empty row, and
    a length the trace did not know."""
    embeddings = tf.random.normal([4, LENGTH, 8], seed=3)
    mask = tf.constant([[False] * 3 + [True] * 5, [True] * 8, [False] * 7 + [True], [False] * 8])
    full = encoder(embeddings, mask).numpy()
    last = encoder(embeddings, mask, last_position_only=True)
    assert last.shape == (4, 1, 8)
    np.testing.assert_allclose(last.numpy(), full[:, -1:], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(last.numpy()[3], 0.0)
    traced = tf.function(lambda x, m: encoder(x, m, last_position_only=True),
                         input_signature=[tf.TensorSpec([None, None, 8]), tf.TensorSpec([None, None], tf.bool)])
    np.testing.assert_allclose(traced(embeddings[:, 2:], mask[:, 2:]).numpy(),
                               encoder(embeddings[:, 2:], mask[:, 2:]).numpy()[:, -1:], rtol=1e-5, atol=1e-6)


class _PlainBlock(CausalTransformerBlock):
    """A user's own block, written before blocks took last_position_only."""

    def call(self, inputs, padding_mask, training=False):
        return super().call(inputs, padding_mask, training=training)


class _PlainBlockEncoder(SASRecEncoder):
    def build(self, input_shape):
        super().build(input_shape)
        self.blocks = [_PlainBlock(self.num_heads, dropout=self.dropout, name=f"plain_block_{i}")
                       for i in range(self.num_blocks)]


def test_an_encoder_with_blocks_of_its_own_still_encodes_every_position():
    encoder = _PlainBlockEncoder(max_length=LENGTH, num_blocks=2, dropout=0.0)
    assert encoder(tf.random.normal([2, LENGTH, 8], seed=4), tf.ones([2, LENGTH], tf.bool)).shape == (2, LENGTH, 8)


class _ScaledStateTwoTower(TwoTower):
    """A subclass that overrides encode_sequence the way it was written before it took
    last_position_only."""

    def encode_sequence(self, inputs, training=False):
        return 2.0 * super().encode_sequence(inputs, training=training)


@pytest.mark.parametrize("user_tower", ["sasrec", "mean"])
def test_user_embedding_is_the_last_encoded_position_and_follows_an_override(user_tower):
    model = _model(user_tower=user_tower)
    batch = {**_batch(), "history": np.concatenate([_batch()["history"][:5], np.zeros((1, LENGTH), np.int32)])}
    np.testing.assert_allclose(model.user_embedding(batch).numpy(),
                               model.encode_sequence(batch).numpy()[:, -1], rtol=1e-5, atol=1e-6)
    scaled = _ScaledStateTwoTower.from_config(model.get_config())
    scaled(batch)
    scaled.set_weights(model.get_weights())
    np.testing.assert_allclose(scaled.user_embedding(batch).numpy(), 2.0 * model.user_embedding(batch).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [
        CausalTransformerBlock(num_heads=2, ffn_units=12, dropout=0.1),
        SASRecEncoder(max_length=5, num_blocks=3, num_heads=1, dropout=0.3),
        MeanPoolingEncoder(projection=False),
        ItemTower(num_items=9, embedding_dim=4, feature_dims={"genres": 3}, hidden_units=(8,), l2=0.01),
    ],
)
def test_layer_config_round_trip(layer):
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config


@pytest.mark.parametrize("bad", [dict(num_items=0, embedding_dim=4), dict(num_items=4, embedding_dim=0)])
def test_item_tower_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="must be an integer >= 1, got 0"):
        ItemTower(**bad)


def test_item_tower_feature_table_shape_is_checked():
    with pytest.raises(ValueError, match="genres"):
        ItemTower(3, 4, feature_dims={"genres": 2}, feature_tables={"genres": np.zeros((3, 2))})


@pytest.mark.parametrize("field, value", [("user_tower", "gru"), ("loss", "bpr"), ("temperature", 0.0)])
def test_model_rejects_bad_hyperparameters(field, value):
    with pytest.raises(ValueError, match=repr(value)):
        _model(**{field: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(user_tower="sasrec", loss="full_softmax"),
        dict(user_tower="mean", loss="full_softmax"),
        dict(user_tower="sasrec", loss="sampled_softmax", num_sampled_negatives=16),
        dict(user_tower="mean", loss="sampled_softmax"),
    ],
)
def test_one_training_step_reduces_the_loss_on_a_fixed_batch(kwargs):
    model = _model(**kwargs)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    batch = {key: tf.constant(value) for key, value in _batch().items()}
    if kwargs["loss"] == "sampled_softmax":
        tf.random.set_seed(0)  # the same negatives before and after the step
    before = float(model.compute_loss(batch))
    model.train_on_batch(batch)
    if kwargs["loss"] == "sampled_softmax":
        tf.random.set_seed(0)
    after = float(model.compute_loss(batch))
    assert np.isfinite(before) and after < before


def test_full_softmax_loss_matches_numpy():
    model = _model(user_tower="mean")
    batch = _batch()
    loss = float(model.compute_loss(batch))
    sequence = model.encode_sequence(batch).numpy()
    items = model.item_embeddings().numpy()[1:]
    valid = batch["next_items"] > 0
    logits = sequence[valid] @ items.T
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(valid.sum()), batch["next_items"][valid] - 1].mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_score_all_is_user_embedding_dot_items():
    model = _model()
    batch = _batch()
    scores = model.score_all(batch).numpy()
    expected = model.user_embedding(batch).numpy() @ model.item_embeddings().numpy().T
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert scores.shape == (6, NUM_ITEMS + 1)


def test_item_frequencies_are_validated_and_smoothed():
    model = _model()
    with pytest.raises(ValueError, match=r"expected \(31,\)"):
        model.set_item_frequencies(np.ones(5))
    counts = np.zeros(NUM_ITEMS + 1)
    counts[1] = 10
    model.set_item_frequencies(counts)
    frequency = model.item_frequency.numpy()
    assert frequency[0] == 0 and frequency[1] > frequency[2] > 0
    np.testing.assert_allclose(frequency.sum(), 1.0, rtol=1e-5)


def _features_model():
    rng = np.random.default_rng(3)
    genres = (rng.random((NUM_ITEMS + 1, 4)) > 0.5).astype(np.float32)
    return _model(item_feature_dims={"genres": 4}, item_feature_tables={"genres": genres},
                  user_feature_cardinalities={"gender": 2, "age": 7}), genres


def test_model_config_round_trip_gives_the_same_model():
    model, _ = _features_model()
    batch = {**_batch(), "gender": np.array([1, 2, 0, 1, 2, 1], np.int32), "age": np.arange(6, dtype=np.int32)}
    expected = model.score_all(batch).numpy()
    clone = TwoTower.from_config(model.get_config())
    clone.score_all(batch)
    clone.set_weights(model.get_weights())
    assert clone.get_config() == model.get_config()
    np.testing.assert_allclose(clone.score_all(batch).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("with_features", [False, True])
def test_save_and_reload_gives_identical_outputs(tmp_path, with_features):
    if with_features:
        model, genres = _features_model()
        extra = {"gender": np.array([1, 2, 0, 1, 2, 1], np.int32), "age": np.arange(6, dtype=np.int32)}
    else:
        model, genres, extra = _model(), None, {}
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    batch = {**_batch(), **extra}
    model.train_on_batch(batch)  # weights that differ from any fresh initialisation
    expected = model.score_all(batch).numpy()
    save_model(model, tmp_path / "model")
    reloaded = load_model(tmp_path / "model")
    np.testing.assert_array_equal(reloaded.score_all(batch).numpy(), expected)
    if with_features:
        np.testing.assert_array_equal(reloaded.item_tower.feature_tables["genres"].numpy(), genres)


def test_missing_user_feature_is_named():
    model, _ = _features_model()
    with pytest.raises(KeyError, match="gender"):
        model.score_all(_batch())


def _sampled_loss_oracle(model, batch, extra_ids):
    """Independent NumPy sampled softmax: logQ under both samplers, accidental hits removed."""
    sequence = model.encode_sequence(batch).numpy()
    valid = batch["next_items"] > 0
    queries, targets = sequence[valid], batch["next_items"][valid]
    candidate_ids = np.concatenate([targets, extra_ids])
    table = model.item_embeddings().numpy()
    frequency = model.item_frequency.numpy()
    expected_count = len(targets) * frequency[candidate_ids] + len(extra_ids) / NUM_ITEMS
    logits = queries @ table[candidate_ids].T / model.temperature - np.log(expected_count)
    losses = []
    for row, target in enumerate(targets):
        row_logits = logits[row].copy()
        duplicate = (candidate_ids == target) & (np.arange(len(candidate_ids)) != row)
        row_logits[duplicate] = -1e30
        shifted = row_logits - row_logits.max()
        losses.append(-(shifted[row] - np.log(np.exp(shifted).sum())))
    return float(np.mean(losses))


@pytest.mark.parametrize("num_extra", [0, 5])
def test_sampled_softmax_loss_matches_numpy_oracle(monkeypatch, num_extra):
    model = _model(loss="sampled_softmax", num_sampled_negatives=num_extra, temperature=0.5)
    batch = _batch()
    batch["next_items"][1:, -1] = batch["next_items"][0, -1]  # duplicate targets: accidental hits
    counts = np.arange(NUM_ITEMS + 1) % 7
    model.set_item_frequencies(counts)
    extra_ids = np.array([3, 7, 7, batch["next_items"][0, -1], 30], np.int32)[:num_extra]
    from tfx_xmatch.models.history_encoding import LossDraws

    monkeypatch.setattr(LossDraws, "uniform", lambda self, shape, *args, **kwargs: tf.constant(extra_ids, kwargs["dtype"]))
    loss = float(model.compute_loss(batch))
    np.testing.assert_allclose(loss, _sampled_loss_oracle(model, batch, extra_ids), rtol=1e-4)


def test_a_model_copies_before_and_after_it_is_built():
    """The training step's per-thread state (a threading.local) made copy.deepcopy of a model
    fail ("cannot pickle '_thread._local' object")."""
    import copy

    model = TwoTower(num_items=20, embedding_dim=8, max_length=5)
    assert type(copy.deepcopy(model)) is TwoTower
    model({"history": tf.constant([[1, 2, 3, 0, 0]])})
    copied = copy.deepcopy(model)
    np.testing.assert_allclose(copied.get_weights()[0], model.get_weights()[0])


@pytest.mark.parametrize("method", ["call", "tokens"])
def test_item_tower_refuses_indices_past_its_table_naming_them(method):
    """A CPU gather failed with a bare "indices[0,1] = 6 is not in [0, 6)"; a GPU one read zeros."""
    tower = ItemTower(5, 4, feature_dims={"genres": 2}, name="items")
    embed = tower if method == "call" else tower.tokens
    assert embed(tf.constant([[0, 5]], tf.int64)).shape[0] == 1  # padding and the last item
    assert embed(tf.zeros([0, 3], tf.int32)).shape[0] == 0  # no rows
    for bad, low, high in (([[1, 6]], 1, 6), ([[-1, 2]], -1, 2)):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=rf"items: item indices must be in \[0, 5\] .*, got indices from {low} to {high}(\n|$)"):
            embed(tf.constant(bad))
        traced = tf.function(embed, input_signature=[tf.TensorSpec([None, None], tf.int32)])
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=rf"item indices must be in \[0, 5\](.|\n)*\[{low}\] \[to\] \[{high}\]"):
            traced(tf.constant(bad))
    # Indices known when traced (all_items' range, a constant) are checked then, not per call.
    graph = tf.function(tower.all_items).get_concrete_function().graph
    assert not [op for op in graph.get_operations() if op.type == "Assert"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="got indices from 0 to 6"):
        tf.function(lambda: embed(tf.constant([0, 6]))).get_concrete_function()
