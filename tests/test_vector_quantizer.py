"""VectorQuantizer: assignments, EMA updates, straight-through gradients, init, restarts, metrics."""

import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch.layers import VectorQuantizer

# (constructor kwargs, input shape, codebooks M, width w)
LAYOUTS = {
    "single": (dict(num_codewords=5), (3, 4, 6), 1, 6),
    "grouped": (dict(num_codewords=5, num_codebooks=3), (4, 3, 6), 3, 6),
    "product": (dict(num_codewords=5, num_codebooks=3, product_quantization=True), (2, 4, 6), 3, 2),
}


def _layer(codebooks, **kwargs):
    """A built layer with explicit codebooks, marked as initialized."""
    codebooks = np.asarray(codebooks, np.float32)
    layer = VectorQuantizer(**kwargs)
    m, _, w = codebooks.shape
    layer.build((None, m, w) if m > 1 and not kwargs.get("product_quantization") else (None, m * w))
    layer.codebooks.assign(codebooks)
    layer.ema_cluster_size.assign(np.ones(codebooks.shape[:2], np.float32))
    layer.ema_embed_sum.assign(codebooks)
    layer.initialized.assign(True)
    return layer


def _groups(x, m, w):
    """[..., d] or [..., M, d] -> [V, M, w], the oracle's view of the layouts."""
    return np.asarray(x).reshape(-1, m, w)


def _nearest(vectors, codebooks):
    """Brute-force argmin: [V, M, w], [M, N, w] -> [V, M]."""
    distances = ((vectors[:, :, None, :] - codebooks[None]) ** 2).sum(-1)
    return distances.argmin(-1)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_codes_are_the_nearest_codewords(layout):
    kwargs, shape, m, w = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    codebooks = rng.normal(size=(m, 5, w)).astype(np.float32)
    x = rng.normal(size=shape).astype(np.float32)
    layer = _layer(codebooks, **kwargs)
    quantized, codes = layer(tf.constant(x))
    expected = _nearest(_groups(x, m, w), codebooks)
    codes_shape = shape[:-1] + ((m,) if layout == "product" else ())
    assert codes.dtype == tf.int32 and tuple(codes.shape) == codes_shape
    np.testing.assert_array_equal(codes.numpy().reshape(-1, m), expected)
    chosen = codebooks[np.arange(m), expected]  # [V, M, w]
    np.testing.assert_allclose(quantized.numpy(), chosen.reshape(shape), atol=1e-6)
    np.testing.assert_allclose(layer.codewords(codes).numpy().reshape(-1, m, w), chosen, atol=0)
    np.testing.assert_array_equal(
        layer.global_codes(codes).numpy().reshape(-1, m), expected + np.arange(m) * 5
    )
    assert layer.num_codes == m * 5


def test_ties_go_to_the_lowest_index():
    layer = _layer([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]], num_codewords=3)
    _, codes = layer(tf.constant([[1.0, 0.0], [0.0, 5.0]]))
    np.testing.assert_array_equal(codes.numpy(), [0, 0])


def test_ema_update_matches_the_formula():
    codebooks = np.array([[[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]]], np.float32)
    x = np.array([[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]], np.float32)
    decay, eps = 0.9, 1e-3
    layer = _layer(codebooks, num_codewords=3, decay=decay, epsilon=eps, dead_code_threshold=0.0)
    _, codes = layer(tf.constant(x), training=True)
    np.testing.assert_array_equal(codes.numpy(), [0, 0, 1])
    counts = np.array([2.0, 1.0, 0.0])
    sums = np.array([[1.0, 2.0], [9.0, 9.0], [0.0, 0.0]])
    cluster_size = decay * 1.0 + (1 - decay) * counts
    embed_sum = decay * codebooks[0] + (1 - decay) * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + 3 * eps) * total
    np.testing.assert_allclose(layer.ema_cluster_size.numpy()[0], cluster_size, rtol=1e-6)
    np.testing.assert_allclose(layer.ema_embed_sum.numpy()[0], embed_sum, rtol=1e-6)
    np.testing.assert_allclose(layer.codebooks.numpy()[0], embed_sum / smoothed[:, None], rtol=1e-5)


def test_straight_through_gradient_and_frozen_codebooks():
    rng = np.random.default_rng(1)
    codebooks = rng.normal(size=(2, 4, 3)).astype(np.float32)
    layer = _layer(
        codebooks, num_codewords=4, num_codebooks=2, product_quantization=True, commitment_weight=0.0
    )
    x = tf.constant(rng.normal(size=(5, 6)).astype(np.float32))
    w = tf.constant(rng.normal(size=(5, 6)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        quantized, codes = layer(x, training=True)
        objective = tf.reduce_sum(w * quantized)
    expected = codebooks[np.arange(2), codes.numpy()].reshape(5, 6)  # codebooks before the EMA step
    np.testing.assert_allclose(quantized.numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(tape.gradient(objective, x).numpy(), w.numpy())
    assert layer.trainable_weights == []
    assert tape.gradient(objective, layer.codebooks) is None


def test_commitment_loss_only_in_training():
    codebooks = np.array([[[0.0, 0.0], [4.0, 4.0]]], np.float32)
    layer = _layer(codebooks, num_codewords=2, commitment_weight=0.5)
    x = np.array([[1.0, 0.0], [3.0, 5.0]], np.float32)
    layer(tf.constant(x))
    assert layer.losses == []
    layer(tf.constant(x), training=True)
    expected = 0.5 * np.mean((x - np.array([[0.0, 0.0], [4.0, 4.0]])) ** 2)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(layer.losses[0].numpy(), expected, rtol=1e-6)
    layer(tf.constant(x), training=False)
    assert layer.losses == []
    # Measured, not added, when evaluating: the same figure under the layer's commitment_loss.
    layer.commitment_tracker.reset_state()
    layer(tf.constant(x), training=False, track_metrics=True)
    assert layer.losses == []
    now = layer.codebooks.numpy()[0]  # moved by the training call's EMA update
    nearest = now[np.argmin(((x[:, None, :] - now[None]) ** 2).sum(-1), axis=1)]
    np.testing.assert_allclose(float(layer.commitment_tracker.result()), 0.5 * np.mean((x - nearest) ** 2), rtol=1e-5)


@pytest.mark.parametrize("batch", [20, 3])  # more and fewer vectors than codewords
def test_first_training_call_initializes_codewords_from_inputs(batch):
    tf.keras.utils.set_random_seed(2)
    decay, n = 0.9, 6
    layer = VectorQuantizer(
        num_codewords=n, num_codebooks=2, product_quantization=True, decay=decay, dead_code_threshold=0.0
    )
    x = np.random.default_rng(3).normal(size=(batch, 4)).astype(np.float32)
    quantized, codes = layer(tf.constant(x), training=True)
    assert bool(layer.initialized.numpy())
    vectors, codes = _groups(x, 2, 2), codes.numpy()
    for m in range(2):
        # Undo the EMA step: embed_sum = decay * initial + (1 - decay) * (sum of assigned vectors).
        assigned = np.stack([vectors[codes[:, m] == j, m].sum(0) for j in range(n)])
        initial = (layer.ema_embed_sum.numpy()[m] - (1 - decay) * assigned) / decay
        matches = np.abs(initial[:, None, :] - vectors[None, :, m]).max(-1) < 1e-5  # [N, V]
        assert matches.any(1).all(), "every initial codeword is a batch vector"
        if batch >= n:
            assert len({tuple(np.round(c, 4)) for c in initial}) == n, "sampled without replacement"
        else:
            assert matches.any(0).all(), "every batch vector is used when there are too few"
        expected_size = decay + (1 - decay) * np.bincount(codes[:, m], minlength=n)
        np.testing.assert_allclose(layer.ema_cluster_size.numpy()[m], expected_size, rtol=1e-6)
    if batch < n:
        # Every vector is its own codeword, so quantization is exact on the init batch.
        np.testing.assert_allclose(quantized.numpy(), x, atol=1e-6)
    # A second call continues the EMA from the state left by the first instead of re-sampling.
    previous = layer.ema_cluster_size.numpy()
    _, codes = layer(tf.constant(x), training=True)
    counts = [np.bincount(c, minlength=n) for c in codes.numpy().reshape(-1, 2).T]
    expected_size = decay * previous + (1 - decay) * np.stack(counts)
    np.testing.assert_allclose(layer.ema_cluster_size.numpy(), expected_size, rtol=1e-6)


def _far_code_layer(**kwargs):
    # Codeword 2 is far from every input, so its EMA size drops to decay * 1 < threshold.
    codebooks = [[[0.0, 0.0], [1.0, 0.0], [100.0, 100.0]]]
    return _layer(codebooks, num_codewords=3, decay=0.9, dead_code_threshold=1.0, **kwargs)


FAR_INPUTS = np.array([[0.1, 0.0], [-0.1, 0.1], [0.9, 0.1], [1.1, -0.1]], np.float32)


def test_dead_codes_are_restarted_at_batch_vectors():
    tf.keras.utils.set_random_seed(6)
    layer = _far_code_layer()
    layer(tf.constant(FAR_INPUTS), training=True)
    restarted = layer.codebooks.numpy()[0, 2]
    assert np.abs(FAR_INPUTS - restarted).max(-1).min() < 1e-6
    np.testing.assert_allclose(layer.ema_cluster_size.numpy()[0], [1.1, 1.1, 2.0], rtol=1e-6)
    np.testing.assert_allclose(layer.ema_embed_sum.numpy()[0, 2], 2.0 * restarted, rtol=1e-6)
    dead = [m.result().numpy() for m in layer.metrics if m.name.endswith("_dead_codes")]
    assert dead == [pytest.approx(1 / 3)]  # counted before the restart


def test_dead_codes_stay_when_restart_is_off():
    layer = _far_code_layer(restart_dead_codes=False)
    layer(tf.constant(FAR_INPUTS), training=True)
    assert layer.codebooks.numpy()[0, 2].min() > 10
    np.testing.assert_allclose(layer.ema_cluster_size.numpy()[0, 2], 0.9, rtol=1e-6)


def test_codebook_perplexity_and_dead_fraction():
    layer = _layer(np.zeros((1, 8, 2)), num_codewords=8)
    uniform = tf.constant([[0, 1], [2, 3], [3, 2], [1, 0]])  # 4 of the 8 codes, equally often
    np.testing.assert_allclose(layer.codebook_perplexity(uniform).numpy(), [4.0], rtol=1e-6)
    grouped = _layer(np.zeros((2, 4, 2)), num_codewords=4, num_codebooks=2)
    codes = tf.constant([[0, 0], [1, 0], [2, 0], [3, 0]])
    np.testing.assert_allclose(grouped.codebook_perplexity(codes).numpy(), [4.0, 1.0], rtol=1e-6)
    # Codebook 0 sees uniform usage (perplexity 4), codebook 1 sends every vector to code 0
    # (perplexity 1) and its codes 1..3 decay to 0.5 < threshold: 3 of 8 codewords are dead.
    x = np.stack([[[j, 0.0], [0.0, 0.0]] for j in range(4)]).astype(np.float32)
    table = np.array([[[j, 0.0] for j in range(4)]] * 2, np.float32)
    grouped = _layer(table, num_codewords=4, num_codebooks=2, decay=0.5, dead_code_threshold=1.0, name="vq")
    grouped(tf.constant(x), training=True)
    results = {m.name: float(m.result()) for m in grouped.metrics}
    # Every vector sits on its codeword: no commitment.
    assert results == {"vq_perplexity": pytest.approx(2.5), "vq_dead_codes": pytest.approx(3 / 8),
                       "vq_commitment_loss": 0.0}


def test_metrics_and_loss_show_up_in_fit():
    tf.keras.utils.set_random_seed(7)

    class TinyAutoencoder(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.encoder = tf.keras.layers.Dense(4)
            self.vq = VectorQuantizer(num_codewords=8, num_codebooks=2, product_quantization=True, name="vq")
            self.decoder = tf.keras.layers.Dense(6)

        def call(self, x, training=False):
            quantized, _ = self.vq(self.encoder(x), training=training)
            reconstruction = self.decoder(quantized)
            self.add_loss(tf.reduce_mean(tf.square(reconstruction - x)))
            return reconstruction

    model = TinyAutoencoder()
    model.compile(optimizer="adam")
    x = np.random.default_rng(8).normal(size=(64, 6)).astype(np.float32)
    history = model.fit(x, epochs=1, batch_size=16, verbose=0)
    assert {"loss", "vq_perplexity", "vq_dead_codes"} <= set(history.history)
    assert 1.0 <= history.history["vq_perplexity"][0] <= 8.0
    assert 0.0 <= history.history["vq_dead_codes"][0] <= 1.0
    assert bool(model.vq.initialized.numpy())


def test_config_round_trip_and_checkpoint(tmp_path):
    tf.keras.utils.set_random_seed(9)
    kwargs = dict(num_codewords=6, num_codebooks=2, product_quantization=True, decay=0.8,
                  commitment_weight=0.1, epsilon=1e-4, dead_code_threshold=0.5, restart_dead_codes=False)
    layer = VectorQuantizer(**kwargs, name="vq")
    config = layer.get_config()
    assert VectorQuantizer.from_config(config).get_config() == config
    assert {k: config[k] for k in kwargs} == kwargs
    x = tf.random.normal([32, 4])
    for _ in range(3):
        layer(x, training=True)
    path = tf.train.Checkpoint(layer=layer).save(str(tmp_path / "vq"))
    restored = VectorQuantizer.from_config(config)
    restored(x)  # build, then overwrite every weight from the checkpoint
    tf.train.Checkpoint(layer=restored).restore(path).assert_consumed()
    np.testing.assert_array_equal(restored(x)[1].numpy(), layer(x)[1].numpy())
    assert bool(restored.initialized.numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_codewords=1), "num_codewords must be an integer >= 2, got 1"),
        (dict(num_codewords=4, num_codebooks=0), "got 0"),
        (dict(num_codewords=4, decay=1.0), "decay must be a number in (0.0, 1.0), got 1.0"),
        (dict(num_codewords=4, decay=0), "got 0"),
        (dict(num_codewords=4, commitment_weight=-1.0), "got -1.0"),
        (dict(num_codewords=4, epsilon=0.0), "got 0.0"),
        (dict(num_codewords=4, dead_code_threshold=-0.5), "got -0.5"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VectorQuantizer(**kwargs)


def test_bad_input_shapes_raise():
    with pytest.raises(ValueError, match=r"width 7 .*num_codebooks=3"):
        VectorQuantizer(4, num_codebooks=3, product_quantization=True)(tf.zeros([2, 7]))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, d\], got shape \(2, 4, 5\)"):
        VectorQuantizer(4, num_codebooks=3)(tf.zeros([2, 4, 5]))
    layer = VectorQuantizer(4)
    layer(tf.zeros([2, 5]))
    with pytest.raises(ValueError, match="built for width 5"):
        layer(tf.zeros([2, 6]))


def test_training_inside_tf_function():
    tf.keras.utils.set_random_seed(10)
    rng = np.random.default_rng(11)
    table = rng.normal(size=(2, 4, 3)).astype(np.float32)
    batches = [tf.constant(rng.normal(size=(8, 2, 3)).astype(np.float32)) for _ in range(2)]
    eager = _layer(table, num_codewords=4, num_codebooks=2, restart_dead_codes=False)
    graph = _layer(table, num_codewords=4, num_codebooks=2, restart_dead_codes=False)
    step = tf.function(lambda x: graph(x, training=True))
    for x in batches:
        np.testing.assert_array_equal(step(x)[1].numpy(), eager(x, training=True)[1].numpy())
    for a, b in zip(eager.weights, graph.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)

    # Init and restart in graph mode: the flag flips inside the graph, the far code is replaced.
    fresh = VectorQuantizer(num_codewords=3, decay=0.9)
    step = tf.function(lambda x: fresh(x, training=True))
    step(tf.constant(FAR_INPUTS))
    assert bool(fresh.initialized.numpy())
    fresh.codebooks.assign([[[0.0, 0.0], [1.0, 0.0], [100.0, 100.0]]])
    fresh.ema_cluster_size.assign([[1.0, 1.0, 1.0]])
    step(tf.constant(FAR_INPUTS))
    assert np.abs(FAR_INPUTS - fresh.codebooks.numpy()[0, 2]).max(-1).min() < 1e-6
    np.testing.assert_allclose(fresh.ema_cluster_size.numpy()[0, 2], 2.0)


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_a_batch_of_no_vectors_changes_no_state_and_no_metric(num_codebooks):
    """A replica left empty by a short last batch under a distribution strategy trains on no
    vectors: sampling its initial or restarted codewords from them failed ("Need minval < maxval"),
    and its commitment loss was a mean over nothing (NaN)."""
    quantizer = VectorQuantizer(8, num_codebooks=num_codebooks)
    shape = [None, 4] if num_codebooks == 1 else [None, num_codebooks, 4]
    quantizer.build(tf.TensorShape(shape))
    empty = tf.zeros([0] + shape[1:])
    step = tf.function(lambda vectors: quantizer(vectors, training=True))
    for _ in range(2):  # before the first real batch (uninitialised), then after it
        state = [variable.numpy().copy() for variable in quantizer.weights]
        logged = [float(metric.result()) for metric in quantizer.metrics]
        quantized, codes = step(empty)
        assert quantized.shape[0] == 0 and codes.shape[0] == 0
        for old, variable in zip(state, quantizer.weights):
            np.testing.assert_array_equal(old, variable.numpy(), err_msg=variable.name)
        assert [float(metric.result()) for metric in quantizer.metrics] == logged
        quantizer(empty, training=True)  # eagerly, to read its commitment loss
        assert [float(loss) for loss in quantizer.losses] == [0.0]
        step(tf.random.normal([16] + shape[1:]))
    assert bool(quantizer.initialized.numpy())


def _state(layer):
    return {variable.name: variable.numpy().copy() for variable in layer.weights}


@pytest.mark.parametrize("initialised", [False, True], ids=["first_call", "initialised"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_masked_vectors_count_for_nothing(layout, initialised):
    """A batch with vectors masked out trains the layer as the batch without them would: the
    codebooks, the EMA statistics, the restarts, the metrics and the commitment loss; the
    masked vectors are still quantized (the placeholder row of an empty replica, padding)."""
    kwargs, shape, m, w = LAYOUTS[layout]
    rng = np.random.default_rng(3)
    real = rng.normal(size=shape).astype(np.float32)
    junk = (100.0 + rng.normal(size=shape)).astype(np.float32)  # would take over any codeword it reached
    codebooks = rng.normal(size=(m, 5, w)).astype(np.float32)
    layers = []
    for _ in range(2):
        layer = _layer(codebooks, dead_code_threshold=0.5, **kwargs)
        if not initialised:
            layer.initialized.assign(False)
        layers.append(layer)
    alone, masked = layers
    tf.keras.utils.set_random_seed(11)
    expected_quantized, expected_codes = alone(tf.constant(real), training=True)
    tf.keras.utils.set_random_seed(11)
    both = tf.constant(np.concatenate([real, junk]))
    mask = tf.constant([True] * shape[0] + [False] * shape[0])  # a prefix of the leading axes
    quantized, codes = masked(both, training=True, vector_mask=mask)
    for name, value in _state(alone).items():
        np.testing.assert_allclose(_state(masked)[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
    assert [float(metric.result()) for metric in masked.metrics] == pytest.approx(
        [float(metric.result()) for metric in alone.metrics])
    assert [float(loss) for loss in masked.losses] == pytest.approx([float(loss) for loss in alone.losses])
    np.testing.assert_allclose(quantized.numpy()[: shape[0]], expected_quantized.numpy(), atol=1e-6)
    np.testing.assert_array_equal(codes.numpy()[: shape[0]], expected_codes.numpy())
    assert codes.shape[0] == 2 * shape[0]  # the junk is quantized too


def test_an_all_false_mask_is_a_batch_of_no_vectors_and_a_bad_mask_is_refused():
    layer = _layer(np.eye(3, 4, dtype=np.float32)[np.newaxis], num_codewords=3)
    state = _state(layer)
    step = tf.function(lambda vectors, mask: layer(vectors, training=True, vector_mask=mask))
    step(tf.ones([5, 4]), tf.constant(False))  # a scalar mask covers every vector
    for name, value in state.items():
        np.testing.assert_array_equal(_state(layer)[name], value, err_msg=name)
    assert [float(metric.result()) for metric in layer.metrics] == [0.0, 0.0, 0.0]
    layer(tf.ones([5, 4]), training=False, track_metrics=True, vector_mask=tf.zeros([5], tf.bool))
    assert float(layer.perplexity_tracker.count) == 0.0 and float(layer.commitment_tracker.count) == 0.0
    with pytest.raises(ValueError, match="vector_mask must be bool"):
        layer(tf.ones([5, 4]), vector_mask=tf.ones([5]))
    with pytest.raises(ValueError, match=r"vector_mask of shape \(4,\) does not match the inputs' leading axes \(5,\) "
                                         r"\(axis 0: 4 against 5\)"):
        layer(tf.ones([5, 4]), vector_mask=tf.ones([4], tf.bool))
    with pytest.raises(ValueError, match="vector_mask must cover the inputs' 1 leading axes"):
        layer(tf.ones([5, 4]), vector_mask=tf.ones([5, 4], tf.bool))
    # With the batch size unknown when traced, a wrong size is caught when the step runs, and a
    # mask axis of size 1 is not broadcast over the batch.
    traced = tf.function(lambda vectors, mask: layer(vectors, training=True, vector_mask=mask),
                         input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None], tf.bool)])
    with pytest.raises(tf.errors.InvalidArgumentError, match="vector_mask does not match the leading axes of the inputs"):
        traced(tf.ones([5, 4]), tf.constant([False]))


def test_a_keras_mask_is_not_taken_for_the_vector_mask():
    """Keras fills an argument named ``mask`` from an upstream Embedding(mask_zero=True): the
    grouped layout then refused its [B, M] mask, and other layouts trained on fewer vectors
    without being asked."""
    ids = tf.constant([[1, 2], [3, 0]])
    embedded = tf.keras.layers.Embedding(10, 4, mask_zero=True)(ids)  # [B, M=2, d], carries _keras_mask
    assert getattr(embedded, "_keras_mask", None) is not None
    rng = np.random.default_rng(0)
    layers = [_layer(rng.normal(size=(2, 3, 4)), num_codewords=3, num_codebooks=2) for _ in range(2)]
    layers[1].set_weights(layers[0].get_weights())
    _, codes = layers[0](embedded, training=True)
    _, plain = layers[1](tf.identity(embedded.numpy()), training=True)
    np.testing.assert_array_equal(codes.numpy(), plain.numpy())
    assert [float(loss) for loss in layers[0].losses] == [float(loss) for loss in layers[1].losses]


def test_vectors_that_do_not_count_may_hold_nan_or_inf():
    """Weighed by 0 rather than left out, a NaN or inf that does not count made the commitment
    loss NaN, and a NaN's code N failed the gather of its codeword."""
    rng = np.random.default_rng(1)
    real = rng.normal(size=(4, 4)).astype(np.float32)
    junk = np.array([[np.nan] * 4, [np.inf] * 4], np.float32)
    codebooks = rng.normal(size=(1, 3, 4))
    alone, masked = _layer(codebooks, num_codewords=3), _layer(codebooks, num_codewords=3)
    tf.keras.utils.set_random_seed(2)
    alone(tf.constant(real), training=True)
    tf.keras.utils.set_random_seed(2)
    variables = tf.Variable(np.concatenate([real, junk]))
    with tf.GradientTape() as tape:
        quantized, codes = masked(variables, training=True, vector_mask=tf.constant([True] * 4 + [False] * 2))
        loss = tf.add_n(masked.losses)
    assert float(loss) == pytest.approx(float(tf.add_n(alone.losses)))
    assert np.all(np.isfinite(tape.gradient(loss, variables).numpy()))
    assert np.all((codes.numpy() >= 0) & (codes.numpy() < 3))
    np.testing.assert_allclose(masked.codebooks.numpy(), alone.codebooks.numpy(), rtol=1e-6)
    masked(variables, vector_mask=tf.constant([True] * 4 + [False] * 2))  # inference gathers too


def test_a_vector_that_counts_and_is_not_finite_is_named_or_makes_the_training_loss_nan():
    """A NaN input (a diverged encoder) found no nearest codeword, and the gather of code N failed
    with "indices[0,3] = 8 is not in [0, 8)" inside fit, before the run could keep its best
    epoch; an inf did the same."""
    rng = np.random.default_rng(0)
    codebooks = rng.normal(size=(1, 8, 4))
    for bad in (np.nan, np.inf):
        x = rng.normal(size=(6, 4)).astype(np.float32)
        x[3] = bad
        layer = _layer(codebooks, num_codewords=8)
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"an input vector is not finite \(NaN or inf\) or so large that its distances "
                                 r"overflow.*first such vector \(from 0\):[^0-9]*3"):
            layer(tf.constant(x))
        # In training the step completes with a loss that says it diverged.
        _, codes = layer(tf.constant(x), training=True)
        assert np.all((codes.numpy() >= 0) & (codes.numpy() < 8))
        assert not np.isfinite(float(tf.add_n(layer.losses)))


def test_perplexity_of_no_codes_is_refused():
    """It was NaN, outside the documented [1, N]."""
    from tfx_xmatch.layers import ResidualQuantizer

    with pytest.raises(ValueError, match="codebook_perplexity needs at least one code, got none"):
        VectorQuantizer(num_codewords=8).codebook_perplexity(tf.zeros([0], tf.int32))
    with pytest.raises(ValueError, match="codebook_perplexity needs at least one code, got none"):
        ResidualQuantizer(2, 8).codebook_perplexity(tf.zeros([0, 2], tf.int32))
