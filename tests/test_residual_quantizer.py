"""ResidualQuantizer (RQ-VAE): greedy residual assignments against NumPy, reconstruction per
level, gradients to the codebooks, dead-code restarts, metrics, config and checkpoint round trips."""

import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch.layers import ResidualQuantizer


def _data(n=256, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d)) * 3
    return (centres[rng.integers(0, 6, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_codes_are_the_greedy_nearest_codewords_of_each_residual():
    tf.keras.utils.set_random_seed(0)
    layer = ResidualQuantizer(num_levels=3, num_codewords=5)
    x = _data()
    out = layer(x, training=True)
    encoded = layer.encoder(x).numpy()
    books = layer.codebooks.numpy()  # after the data-dependent initialisation
    out = layer(x)
    residual = encoded
    for level in range(3):
        distances = ((residual[:, None, :] - books[level][None]) ** 2).sum(-1)
        chosen = out["codes"].numpy()[:, level]
        # Nearest up to float32 rounding: the layer expands ||r - e||^2, NumPy subtracts first,
        # so a near tie may go either way (unseeded, about 1 run in 15 had one).
        np.testing.assert_allclose(distances[np.arange(len(x)), chosen], distances.min(1), rtol=1e-4, atol=1e-4)
        assert np.mean(chosen == distances.argmin(1)) > 0.98
        residual = residual - books[level][chosen]
    np.testing.assert_allclose(out["quantized"].numpy(), encoded - residual, rtol=1e-4, atol=1e-5)


def test_more_levels_reconstruct_better():
    errors = {}
    for levels in (1, 2, 3):
        tf.keras.utils.set_random_seed(0)
        layer = ResidualQuantizer(num_levels=levels, num_codewords=4, dead_code_threshold=0.0)
        optimizer = tf.keras.optimizers.Adam(1e-2)
        x = tf.constant(_data())

        def step():
            with tf.GradientTape() as tape:
                loss = layer(x, training=True)["loss"]
            optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables))

        step()  # eagerly: the first call initialises the codebooks from the data and builds the slots
        traced_step = tf.function(step)  # 149 eager steps took 20 s of the suite
        for _ in range(149):
            traced_step()
        assert traced_step.experimental_get_tracing_count() == 1
        errors[levels] = float(tf.reduce_mean(tf.reduce_sum(tf.square(layer(x)["reconstruction"] - x), -1)))
    assert errors[1] > errors[2] > errors[3], errors


def test_residual_shrinks_with_every_level_of_one_quantizer():
    # Seeded: greedy codewords drawn from the data do not promise that every level beats the
    # zero vector (unseeded, about 1 run in 85 had a level that did not shrink the residual).
    tf.keras.utils.set_random_seed(0)
    layer = ResidualQuantizer(num_levels=4, num_codewords=8)
    x = _data()
    layer(x, training=True)
    encoded = layer.encoder(x)
    _, codewords, _ = layer.quantize(encoded)
    partial = tf.cumsum(codewords, axis=1)
    errors = tf.reduce_mean(tf.reduce_sum(tf.square(encoded[:, None, :] - partial), -1), 0).numpy()
    assert np.all(np.diff(errors) < 0), errors


def test_a_loss_on_the_outputs_reaches_the_codebooks_and_the_encoder():
    layer = ResidualQuantizer(num_levels=3, num_codewords=4)
    x = tf.constant(_data(64))
    layer(x, training=True)
    target = tf.random.normal(x.shape)
    with tf.GradientTape() as tape:
        out = layer(x)
        downstream = tf.reduce_sum(out["codewords"][:, 0, :] * target[:, :1]) + tf.reduce_sum(
            out["reconstruction"] * target)
    codebook_grad, encoder_grad = tape.gradient(downstream, [layer.codebooks, layer.encoder.trainable_variables[0]])
    assert codebook_grad is not None and encoder_grad is not None
    used = np.unique(out["codes"].numpy()[:, 2])
    assert np.abs(tf.convert_to_tensor(codebook_grad).numpy()[2, used]).sum() > 0  # every level, not just level 1
    assert np.abs(encoder_grad.numpy()).sum() > 0


def test_dead_codes_are_restarted_and_metrics_are_reported():
    layer = ResidualQuantizer(num_levels=2, num_codewords=6, dead_code_threshold=0.5)
    x = _data(32)
    layer(x, training=True)
    layer.usage.assign(tf.maximum(layer.usage, 1.0) + tf.tensor_scatter_nd_update(
        tf.zeros_like(layer.usage), [[0, 1]], [-100.0]))
    before = layer.codebooks.numpy().copy()
    layer(x, training=True)
    after = layer.codebooks.numpy()
    assert not np.allclose(after[0, 1], before[0, 1])
    live = np.ones(before.shape[:2], bool)
    live[0, 1] = False
    np.testing.assert_array_equal(after[live], before[live])  # only the dead codeword moved
    names = {m.name for m in layer.metrics}
    assert {f"{layer.name}_level0_perplexity",
            f"{layer.name}_level1_dead_codes", f"{layer.name}_reconstruction_error"} <= names


def test_codebook_perplexity_counts_the_codes_in_use():
    layer = ResidualQuantizer(num_levels=2, num_codewords=4)
    codes = tf.constant([[0, 1], [1, 1], [2, 1], [3, 1]])
    np.testing.assert_allclose(layer.codebook_perplexity(codes), [4.0, 1.0], rtol=1e-5)
    assert layer.dead_codewords(codes) == [0.0, 0.75]  # level 2 uses one codeword of four


def test_config_round_trip_and_checkpoint_reload(tmp_path):
    layer = ResidualQuantizer(num_levels=2, num_codewords=5, latent_dim=6, hidden_units=(12,), name="rq")
    x = _data(40)
    layer(x, training=True)
    again = ResidualQuantizer.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    again(x)
    checkpoint = tf.train.Checkpoint(layer=layer)
    path = checkpoint.write(str(tmp_path / "rq"))
    tf.train.Checkpoint(layer=again).read(path).assert_consumed()
    for key in ("codes", "reconstruction"):
        np.testing.assert_allclose(again(x)[key].numpy(), layer(x)[key].numpy(), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_levels": 0}, "num_levels must be an integer >= 1, got 0"),
    ({"num_codewords": 1}, "num_codewords must be an integer >= 2, got 1"),
    ({"commitment_weight": -1.0}, "commitment_weight must be a number in \\[0.0, inf\\), got -1.0"),
    ({"usage_decay": 1.0}, r"usage_decay must be a number in \(0.0, 1.0\), got 1.0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidualQuantizer(**kwargs)


def test_a_batch_of_no_vectors_changes_no_state_and_no_metric():
    """A replica left empty by a short last batch under a distribution strategy trains on no
    vectors: drawing initial or restarted codewords from them failed, and its losses were means
    over nothing (NaN)."""
    quantizer = ResidualQuantizer(num_levels=2, num_codewords=8, dead_code_threshold=0.5)
    quantizer.build(tf.TensorShape([None, 4]))
    step = tf.function(lambda vectors: quantizer(vectors, training=True))
    for _ in range(2):  # before the first real batch (uninitialised), then after it
        state = [variable.numpy().copy() for variable in quantizer.weights]
        logged = [float(metric.result()) for metric in quantizer.metrics]
        out = step(tf.zeros([0, 4]))
        assert out["codes"].shape[0] == 0 and float(out["loss"]) == 0.0
        for old, variable in zip(state, quantizer.weights):
            np.testing.assert_array_equal(old, variable.numpy(), err_msg=variable.name)
        assert [float(metric.result()) for metric in quantizer.metrics] == logged
        step(tf.random.normal([16, 4]))
    assert bool(quantizer.initialized.numpy())


@pytest.mark.parametrize("initialised", [False, True], ids=["first_call", "initialised"])
def test_masked_vectors_count_for_nothing(initialised):
    """A batch with vectors masked out trains the layer's state and logs as the batch without
    them would (initialisation, usage, restarts, metrics, loss); they are still quantized."""
    rng = np.random.default_rng(4)
    real = _data(n=48).reshape(6, 8, 8)
    junk = (50.0 + rng.normal(size=(6, 8, 8))).astype(np.float32)
    layers = []
    for _ in range(2):
        tf.keras.utils.set_random_seed(5)
        layer = ResidualQuantizer(num_levels=2, num_codewords=8, dead_code_threshold=0.5)
        layer.build(tf.TensorShape([None, 8, 8]))
        if initialised:
            layer(real, training=True)
        layers.append(layer)
    alone, masked = layers
    tf.keras.utils.set_random_seed(6)
    expected = alone(real, training=True)
    tf.keras.utils.set_random_seed(6)
    both = np.concatenate([real, junk], axis=1)  # [6, 16, 8]: the mask covers both leading axes
    out = masked(both, training=True, vector_mask=tf.constant([[True] * 8 + [False] * 8] * 6))
    for old, new in zip(alone.weights, masked.weights):
        np.testing.assert_allclose(new.numpy(), old.numpy(), rtol=1e-6, atol=1e-6, err_msg=old.name)
    assert [float(metric.result()) for metric in masked.metrics] == pytest.approx(
        [float(metric.result()) for metric in alone.metrics], rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-5)
    np.testing.assert_array_equal(out["codes"].numpy()[:, :8], expected["codes"].numpy())
    assert out["codes"].shape == (6, 16, 2)
    state = [variable.numpy().copy() for variable in masked.weights]
    silent = masked(both, training=True, vector_mask=tf.constant(False))
    assert float(silent["loss"]) == 0.0
    for old, variable in zip(state, masked.weights):
        np.testing.assert_array_equal(old, variable.numpy(), err_msg=variable.name)
    with pytest.raises(ValueError, match="vector_mask must cover the inputs' 2 leading axes"):
        masked(both, vector_mask=tf.ones([6, 16, 8], tf.bool))


def test_vectors_that_do_not_count_leave_loss_and_state_finite_and_a_mixed_policy_trains_it():
    real = _data(n=32)
    tf.keras.utils.set_random_seed(8)
    layer = ResidualQuantizer(num_levels=2, num_codewords=4)
    layer(real, training=True)
    inputs = tf.Variable(np.concatenate([real, np.full((2, 8), np.nan, np.float32)]))
    with tf.GradientTape() as tape:
        out = layer(inputs, training=True, vector_mask=tf.constant([True] * 32 + [False] * 2))
    # The loss and the state leave them out; their gradient is 0 (they still pass through the
    # encoder, whose weight gradients a NaN row makes NaN, as in any layer: keep them finite).
    assert np.isfinite(float(out["loss"]))
    assert np.all(np.isfinite(layer.codebooks.numpy())) and np.all(np.isfinite(layer.usage.numpy()))
    np.testing.assert_array_equal(tape.gradient(out["loss"], inputs).numpy()[32:], 0.0)
    # On its own under a float16 policy: its first training call added float32 jitter to float16 rows.
    mixed = ResidualQuantizer(num_levels=2, num_codewords=4, dtype="mixed_float16")
    out = mixed(real, training=True)
    assert np.isfinite(float(out["loss"])) and bool(mixed.initialized.numpy())
