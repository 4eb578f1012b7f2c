"""SparCode and its interaction layer: NumPy oracles, straight-through training, the inverted index
against brute force, config round trips, save/reload and export."""

import threading

import numpy as np
import pytest
import tensorflow as tf

from tests.successor_data import successor_batches
from tfx_xmatch import training
from tfx_xmatch.config import ConfigError, load_config
from tfx_xmatch.data.dataset import pad_histories
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.export import build_serving_module, export_retrieval_model, non_stock_ops
from tfx_xmatch.index import BruteForceIndex, SparseCodeIndex
from tfx_xmatch.layers import AllToAllInteraction
from tfx_xmatch.models import SparCode
from tfx_xmatch.models.sparcode import readable_history, relu_with_leaky_gradient
from tfx_xmatch.training import build_model, load_model, save_model
from tfx_xmatch.data import make_synthetic

NUM_ITEMS, LENGTH = 40, 8


def _batches(num_batches=6, batch=16, seed=0):
    return successor_batches(NUM_ITEMS, LENGTH, num_batches=num_batches, batch=batch, seed=seed, padding=2)


def _model(**kwargs):
    defaults = dict(num_items=NUM_ITEMS, embedding_dim=16, max_length=LENGTH, dropout=0.0, num_query_tokens=2,
                    num_codewords=16, interaction_units=(16,), max_loss_positions=64)
    tf.keras.utils.set_random_seed(3)
    model = SparCode(**{**defaults, **kwargs})
    model.compile(optimizer=tf.keras.optimizers.Adam(5e-3))
    return model


@pytest.fixture(scope="module")
def trained():
    model = _model()
    history = model.fit(_batches(), epochs=3, verbose=0)
    return model, history


def test_relu_with_leaky_gradient_is_relu_forward_and_leaks_backward():
    x = tf.constant([-2.0, -0.5, 0.5, 3.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = relu_with_leaky_gradient(x, 0.1)
    np.testing.assert_array_equal(y.numpy(), [0.0, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), [0.1, 0.1, 1.1, 1.1])


def test_all_to_all_interaction_equals_a_numpy_mlp_over_each_pair():
    layer = AllToAllInteraction(hidden_units=(6, 5), bilinear=True)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    items = rng.normal(size=(7, 2, 4)).astype(np.float32)
    scores = layer(queries, items).numpy()
    (a, a_bias), (b,), (w1, b1), (w_out, b_out), (w_bilinear,) = (
        [v.numpy() for v in layer.query_projection.weights], [layer.item_projection.kernel.numpy()],
        [v.numpy() for v in layer.hidden_layers[0].weights], [v.numpy() for v in layer.output_layer.weights],
        [layer.bilinear_projection.kernel.numpy()])
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    for p in range(3):
        for i in range(7):
            # The factorised first layer is the same as a dense layer on the concatenation.
            concatenated = np.concatenate([queries[p], items[i].ravel()])
            first = relu(concatenated @ np.concatenate([a, b]) + a_bias)
            expected = relu(first @ w1 + b1) @ w_out + b_out + (queries[p] @ w_bilinear) @ items[i, 0]
            np.testing.assert_allclose(scores[p, i], expected[0], rtol=1e-4, atol=1e-5)


def test_all_to_all_interaction_config_round_trip_and_bad_arguments():
    layer = AllToAllInteraction(hidden_units=(8, 4), bilinear=False, name="e")
    again = AllToAllInteraction.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    with pytest.raises(ValueError, match=r"hidden_units .* got \(\)"):
        AllToAllInteraction(hidden_units=())
    with pytest.raises(ValueError, match="got shape"):
        AllToAllInteraction()(tf.zeros([2, 3, 4]), tf.zeros([5, 1, 4]))
    with pytest.raises(ValueError, match=r"must share d, got shapes \(2, 4\) and \(5, 1, 3\)"):
        AllToAllInteraction()(tf.zeros([2, 4]), tf.zeros([5, 1, 3]))
    # Every weight exists once the layer is built from the query shape, before any call.
    built = AllToAllInteraction(hidden_units=(8, 4))
    built.build(tf.TensorShape([None, 4]))
    built(tf.zeros([2, 4]), tf.zeros([5, 1, 4]))
    assert built.bilinear_projection.kernel.shape == (4, 4)
    # Told its item-token count, build creates the whole network, and a call must match it.
    complete = AllToAllInteraction(hidden_units=(8, 4), num_item_tokens=2)
    complete.build(tf.TensorShape([None, 4]))
    assert len(complete.weights) == 8 and complete.item_projection.kernel.shape == (8, 8)
    assert AllToAllInteraction.from_config(complete.get_config()).num_item_tokens == 2
    with pytest.raises(ValueError, match=r"hold 1 tokens per item but .* built for num_item_tokens=2"):
        complete(tf.zeros([2, 4]), tf.zeros([5, 1, 4]))
    with pytest.raises(ValueError, match=r"num_item_tokens must be an integer >= 1 or None, got 0"):
        AllToAllInteraction(num_item_tokens=0)


def test_training_shows_losses_and_codebook_usage(trained):
    _, history = trained
    logs = history.history
    assert {"loss", "retrieval_loss", "encoder_loss", "positive_score_fraction", "quantizer_perplexity",
            "quantizer_dead_codes"} <= set(logs)
    assert logs["retrieval_loss"][-1] < logs["retrieval_loss"][0]
    assert logs["quantizer_perplexity"][-1] > 1.0
    # Each weighted term of the loss has its own figure, in training and in validation (the
    # commitment term hid in regularization_loss, in training only; the sparsity term nowhere).
    model, _ = trained
    batches = _batches(num_batches=2)
    results = model.evaluate(batches, verbose=0, return_dict=True)
    assert results["quantizer_commitment_loss"] > 0 and results["sparsity_loss"] > 0
    assert logs["regularization_loss"][-1] == pytest.approx(logs["quantizer_commitment_loss"][-1], rel=1e-5)
    assert logs["quantizer_commitment_loss"][-1] > 0 and logs["sparsity_loss"][-1] > 0


def test_a_model_serves_another_thread_while_a_training_step_is_being_traced(trained):
    """The step's row weight, a tensor of the traced step, was kept on the model: user_embedding
    called from another thread meanwhile (an in-process server answering from the model in
    training) read it and failed ("Tensor ... is out of scope")."""
    model, _ = trained
    history = {"history": np.array([[0, 0, 1, 2, 3, 4, 5, 6]], np.int32)}
    expected = model.user_embedding(history).numpy()
    served = []

    @tf.function
    def step():
        with model._weighing_logs_by(tf.constant(4)):  # what train_step holds while tracing
            server = threading.Thread(target=lambda: served.append(model.user_embedding(history).numpy()))
            server.start()
            server.join()
            assert model.step_has_rows() is not None  # the tracing thread still sees its step
        return tf.constant(0)

    step()
    assert len(served) == 1, "the serving thread failed"
    np.testing.assert_allclose(served[0], expected, rtol=1e-6)


def _code_path_gradients(model, batch):
    """Gradients of the code-path loss alone (the auxiliary encoder loss switched off)."""
    model.compute_loss(batch, training=True)  # builds, initialises the codebook from data
    weight, model.encoder_loss_weight = model.encoder_loss_weight, 0.0
    with tf.GradientTape() as tape:
        loss = model.compute_loss(batch, training=True)
    model.encoder_loss_weight = weight
    encoder = model.encoder.trainable_variables
    tokenizer = [model.tokenizer.kernel] if hasattr(model, "tokenizer") else []
    gradients = tape.gradient(loss, [*tokenizer, model.interaction.output_layer.kernel, *encoder])
    return [g is not None and float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in gradients]


@pytest.mark.parametrize("detach", [False, True])
def test_retrieval_loss_reaches_the_tokenizer_through_the_codes(detach):
    model = _model(detach_code_path=detach)
    reached = _code_path_gradients(model, next(iter(_batches())))
    assert reached[:2] == [True, True]  # straight-through soft assignment -> tokenizer; interaction
    # The encoder gets the code path's gradient only when it is not detached.
    assert any(reached[2:]) == (not detach)
    assert all(not v.trainable for v in model.quantizer.weights)  # codebooks follow the EMA only


def test_scores_depend_on_the_query_only_through_its_codes(trained):
    model, _ = trained
    histories = pad_histories([np.arange(1, 6), np.arange(10, 20), np.array([33])], LENGTH)
    inputs = {"history": histories}
    codes = model.query_codes(inputs).numpy()
    table = model.code_item_scores().numpy()
    expected = table[codes].sum(axis=1)  # sum_k T[code_k, :]
    np.testing.assert_allclose(model.score_all(inputs).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (table >= 0).all() and (table[:, 0] == 0).all()
    np.testing.assert_allclose(model.item_embeddings().numpy(), table.T)


def _oracle_top_k(scores, k):
    """Best-first positive scores and item indices (NumPy); unfilled slots -inf / -1."""
    out_scores = np.full((len(scores), k), -np.inf, np.float32)
    out_ids = np.full((len(scores), k), -1, np.int64)
    for row, values in enumerate(scores):
        positive = np.flatnonzero(values > 0)
        order = positive[np.argsort(-values[positive], kind="stable")][:k]
        out_scores[row, : len(order)] = values[order]
        out_ids[row, : len(order)] = order
    return out_scores, out_ids


def test_index_at_full_cache_is_the_brute_force_top_k_of_the_quantized_scores(trained):
    model, _ = trained
    histories = pad_histories([np.arange(1, 6), np.arange(10, 20), np.array([33]), np.arange(20, 28)], LENGTH)
    inputs = {"history": histories}
    index = SparseCodeIndex(k_max=NUM_ITEMS).index(model.item_embeddings()[1:], tf.range(1, NUM_ITEMS + 1))
    assert index.is_exact()
    scores, ids = index(model.user_embedding(inputs), k=15)
    expected_scores, expected_ids = _oracle_top_k(model.score_all(inputs).numpy(), 15)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5)
    found = np.isfinite(expected_scores)
    np.testing.assert_array_equal(ids.numpy()[found], expected_ids[found])
    # The same answer as a dense brute-force index over the code-score columns.
    dense_scores, _ = BruteForceIndex(k_max=NUM_ITEMS).index(model.item_embeddings()[1:])(model.user_embedding(inputs), k=15)
    np.testing.assert_allclose(scores.numpy()[found], dense_scores.numpy()[found], rtol=1e-5)


def test_config_round_trip_and_save_reload_give_identical_retrievals(trained, tmp_path):
    model, _ = trained
    again = SparCode.from_config(model.get_config())
    assert again.get_config() == model.get_config()
    save_model(model, tmp_path / "model")
    reloaded = load_model(tmp_path / "model")
    assert isinstance(reloaded, SparCode)
    inputs = {"history": pad_histories([np.arange(1, 6), np.arange(30, 38)], LENGTH)}
    np.testing.assert_array_equal(reloaded.query_codes(inputs).numpy(), model.query_codes(inputs).numpy())
    np.testing.assert_allclose(reloaded.score_all(inputs).numpy(), model.score_all(inputs).numpy(), rtol=1e-6)
    np.testing.assert_allclose(reloaded.quantizer.codebooks.numpy(), model.quantizer.codebooks.numpy())
    # What `xmatch export --run-dir` does: export the model loaded from disk. Its quantizer had
    # never run a training step, so saving traced its training call for the first time, which
    # created the usage metrics inside a tf.function and failed every SparCode export.
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    path = export_retrieval_model(reloaded, vocab, tmp_path / "export", index_kind="sparse_code", k_max=10)
    request = tf.constant([list(vocab.ids(np.arange(1, 6))), list(vocab.ids(np.arange(30, 35)))])
    served = tf.saved_model.load(str(path)).signatures["top_k"](history=request, k=tf.constant(5))
    # The reference: the model as trained, served from memory rather than through a second export.
    expected = build_serving_module(model, vocab, index_kind="sparse_code", k_max=10).top_k(request, tf.constant(5))
    np.testing.assert_array_equal(served["item_ids"].numpy(), expected["item_ids"].numpy())


def test_export_serves_the_inverted_index_with_stock_ops(trained, tmp_path):
    model, _ = trained
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    path = export_retrieval_model(model, vocab, tmp_path / "export", index_kind="sparse_code", k_max=10)
    assert non_stock_ops(path) == set()
    served = tf.saved_model.load(str(path))
    histories = [np.arange(1, 6), np.arange(10, 20)]
    request = tf.constant([list(vocab.ids(h)) + [""] * (12 - len(h)) for h in histories])
    result = served.signatures["top_k"](history=request, k=tf.constant(5))
    scores = model.score_all({"history": pad_histories(histories, LENGTH)}).numpy()
    for row, history in enumerate(histories):
        scores[row, history] = 0.0  # the export removes the history
    expected_scores, expected_ids = _oracle_top_k(scores, 5)
    np.testing.assert_allclose(result["scores"].numpy(), expected_scores, rtol=1e-5)
    found = np.isfinite(expected_scores)
    assert (result["item_ids"].numpy().astype(str)[found] == vocab.ids(expected_ids[found])).all()


def test_unquantized_all_to_all_trains_and_scores_every_item():
    model = _model(quantize=False, loss="sampled_softmax", num_sampled_negatives=8)
    model.set_item_frequencies(np.ones(NUM_ITEMS + 1))
    history = model.fit(_batches(num_batches=2), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    inputs = {"history": pad_histories([np.arange(1, 6)], LENGTH)}
    scores = model.score_all(inputs).numpy()
    assert scores.shape == (1, NUM_ITEMS + 1) and scores[0, 0] == 0
    with pytest.raises(ValueError, match="no code bag"):
        model.user_embedding(inputs)
    # Scored in chunks of 64 users: 70 users (more than a chunk, not a multiple of it) get
    # sum_k ReLU(E(token_k, i) + b) of their own tokens, column 0 zero.
    rng = np.random.default_rng(1)
    many = {"history": pad_histories([rng.integers(1, NUM_ITEMS + 1, size=rng.integers(1, LENGTH + 1))
                                      for _ in range(70)], LENGTH)}
    tokens = model.last_position_tokens(many).numpy()
    items = tf.range(NUM_ITEMS + 1)
    expected = np.stack([model.pair_scores(tf.constant(user_tokens), items).numpy().sum(axis=0) for user_tokens in tokens])
    expected[:, 0] = 0.0
    np.testing.assert_allclose(model.score_all_unquantized(many).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_codebooks must be 1 or num_query_tokens=4, got 3"):
        SparCode(num_items=5, num_query_tokens=4, num_codebooks=3)
    with pytest.raises(ValueError, match="loss must be one of"):
        SparCode(num_items=5, loss="bpr")


def test_config_options_reach_the_model_and_unknown_ones_are_refused():
    config = load_config(None, ["model.name=sparcode", "model.options.num_codewords=32",
                                "model.options.num_query_tokens=3", "model.max_length=10"])
    dataset = make_synthetic(num_users=20, num_items=15, seed=0)
    model = build_model(config, dataset)
    assert (model.num_codewords, model.num_query_tokens) == (32, 3)
    config = load_config(None, ["model.name=sparcode", "model.options.num_codeword=32"])
    with pytest.raises(ConfigError, match=r"\['num_codeword'\] are not arguments of model 'sparcode'"):
        build_model(config, dataset)


@pytest.fixture(scope="module")
def sparse_export(trained, tmp_path_factory):
    model, _ = trained
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    base = tmp_path_factory.mktemp("sparse") / "sparcode"
    export_retrieval_model(model, vocab, base, index_kind="sparse_code", k_max=10,
                           index_options={"max_items_per_code": 20}, model_name="sparcode")
    return model, vocab, base


def test_sparse_code_export_answers_in_a_tensorflow_only_process_and_over_grpc(sparse_export):
    import grpc
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

    from tests.test_export import fresh_process_answer
    from tfx_xmatch.export import build_serving_module
    from tfx_xmatch.serving.model_manager import ModelConfig, VersionPolicy
    from tfx_xmatch.serving.server import ModelServer, ServerOptions

    model, vocab, base = sparse_export
    histories = [np.arange(1, 6), np.arange(10, 20), np.array([33])]
    request = [list(vocab.ids(h)) + [""] * (12 - len(h)) for h in histories]
    module = build_serving_module(model, vocab, index_kind="sparse_code", k_max=10,
                                  index_options={"max_items_per_code": 20})
    expected = module.top_k(tf.constant(request), tf.constant(4))

    answer = fresh_process_answer(base / "1", request)
    assert answer["item_ids"] == expected["item_ids"].numpy().astype(str).tolist()
    np.testing.assert_allclose(answer["scores"], expected["scores"].numpy(), rtol=1e-5)

    options = ServerOptions(model_configs=[ModelConfig("sparcode", str(base), VersionPolicy("latest", num_versions=1))],
                            grpc_port=0, rest_port=None, file_system_poll_wait_seconds=0.2)
    server = ModelServer(options).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            predict = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="sparcode", signature_name="top_k"))
            predict.inputs["history"].CopyFrom(tf.make_tensor_proto(np.asarray(request)))
            predict.inputs["k"].CopyFrom(tf.make_tensor_proto(np.int32(4)))
            response = stub.Predict(predict, timeout=30)
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["item_ids"]), expected["item_ids"].numpy())
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]), expected["scores"].numpy(), rtol=1e-5)
    finally:
        server.stop()


def test_model_options_are_typed_and_may_not_shadow_model_fields():
    dataset = make_synthetic(num_users=20, num_items=15, seed=0)
    config = load_config(None, ["model.name=sparcode", "model.options.sparsity_weight=1e-3",
                                "model.options.quantize=false"])
    model = build_model(config, dataset)
    assert model.sparsity_weight == 1e-3 and model.quantize is False
    cached = build_model(load_config(None, ["model.name=sparcode", "model.options.serving_cache_fraction=1e-2",
                                            "model.options.training_cache_fraction=null"]), dataset)
    assert cached.serving_cache_fraction == 0.01 and cached.training_cache_fraction is None
    for override, message in [("model.options.max_length=50", "duplicates model.max_length"),
                              ("model.options.num_items=3", "comes from the dataset"),
                              ("model.options.num_codewords=many", "must be like its default 512, got 'many'"),
                              ("model.options.quantize=1", "must be like its default True, got 1"),
                              # A None default is typed by its annotation (Optional[float]).
                              ("model.options.serving_cache_fraction=abc", "must be a number or null, got 'abc'"),
                              ("model.options.training_cache_fraction=[0.1]", r"must be a number or null, got \[0.1\]")]:
        with pytest.raises(ConfigError, match=message):
            build_model(load_config(None, ["model.name=sparcode", override]), dataset)


def test_export_refuses_models_an_index_cannot_serve(trained, tmp_path):
    from tfx_xmatch.models import TwoTower

    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    two_tower = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH)
    with pytest.raises(ValueError, match="'sparse_code' needs a SparCode model"):
        export_retrieval_model(two_tower, vocab, tmp_path / "a", index_kind="sparse_code")
    with pytest.raises(ValueError, match="unquantized SparCode"):
        export_retrieval_model(_model(quantize=False), vocab, tmp_path / "b")


def test_streamed_index_build_equals_indexing_the_whole_table(trained):
    model, _ = trained
    whole = SparseCodeIndex(k_max=10, max_items_per_code=7).index(
        model.item_embeddings()[1:], tf.range(1, NUM_ITEMS + 1, dtype=tf.int64))
    streamed = model.build_index(SparseCodeIndex(k_max=10, max_items_per_code=7), batch_size=6, verbose=0)
    for name in ("posting_items", "posting_scores", "posting_splits", "identifiers"):
        np.testing.assert_allclose(getattr(streamed, name).numpy(), getattr(whole, name).numpy(), rtol=1e-6)


def test_cache_aware_training_adds_a_softmax_over_the_cached_table():
    model = _model(training_cache_fraction=0.1)
    rng = np.random.default_rng(0)
    table = tf.constant(np.maximum(rng.normal(size=(16, 40)), 0.0), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(table)
        cached = model.as_cached(table)
        total = tf.reduce_sum(cached * tf.range(1.0, 41.0)[tf.newaxis, :])  # a distinct weight per item
    # NumPy oracle: the ceil(0.1 * 640) = 64 largest entries survive, the rest read 0.
    values = table.numpy()
    threshold = np.sort(values.ravel())[::-1][63]
    np.testing.assert_array_equal(cached.numpy(), np.where(values >= threshold, values, 0.0))
    assert np.count_nonzero(cached.numpy()) == 64
    # The gradient reaches the kept entries only.
    np.testing.assert_allclose(tape.gradient(total, table).numpy(),
                               np.where(values >= threshold, np.arange(1.0, 41.0)[np.newaxis, :], 0.0))
    # The same entries as a SparseCodeIndex with cache_fraction=0.1 stores (its candidates are T^T).
    index = SparseCodeIndex(k_max=40, cache_fraction=0.1).index(tf.transpose(table), tf.range(40))
    bag = tf.eye(16)  # one code per query: each query reads one posting list
    scores, ids = index(bag, k=40)
    served = np.zeros_like(values)
    for code in range(16):
        found = np.isfinite(scores.numpy()[code])
        served[code, ids.numpy()[code][found]] = scores.numpy()[code][found]
    np.testing.assert_allclose(served, cached.numpy(), rtol=1e-6)

    history = model.fit(_batches(), epochs=2, verbose=0)
    assert np.isfinite(history.history["retrieval_loss"]).all()
    # The cached softmax is logged, only when it is trained.
    assert np.isfinite(history.history["cached_retrieval_loss"]).all()
    assert "cached_retrieval_loss" not in _model().fit(_batches(num_batches=1), verbose=0).history
    again = SparCode.from_config(model.get_config())
    assert again.training_cache_fraction == 0.1 and again.get_config() == model.get_config()
    with pytest.raises(ValueError, match="cached_loss_weight must be a number in \\[0.0, inf\\), got -0.5"):
        SparCode(num_items=5, training_cache_fraction=0.1, cached_loss_weight=-0.5)
    with pytest.raises(ValueError, match=r"training_cache_fraction must be a number in \(0.0, 1.0\], got 1.5"):
        SparCode(num_items=5, training_cache_fraction=1.5)
    with pytest.raises(ValueError, match="training_cache_fraction needs quantize=True"):
        SparCode(num_items=5, training_cache_fraction=0.1, quantize=False)


def test_serving_cache_fraction_scores_validation_and_exports_through_that_cache(trained):
    """Selection on the served path: score_all (what validation ranks by) answers as the index of
    that cache does, and a sparse_code export without a budget builds that index."""
    source, _ = trained
    model = SparCode.from_config({**source.get_config(), "serving_cache_fraction": 0.1})
    inputs = {"history": pad_histories([np.arange(1, 6), np.arange(10, 20), np.array([33]), np.arange(20, 28)],
                                       LENGTH)}
    model.score_all(inputs)  # builds the variables
    before = training.pass_scorer(model)
    model.set_weights(source.get_weights())
    # NumPy oracle: the ceil(0.1 * codes * items) best entries of the real items' columns are kept.
    table = source.code_item_scores().numpy()[:, 1:]
    kept = int(np.ceil(0.1 * table.size))
    threshold = np.sort(table.ravel())[::-1][kept - 1]
    cached = np.concatenate([np.zeros((len(table), 1)), np.where(table >= threshold, table, 0.0)], axis=1)
    bag = source.user_embedding(inputs).numpy()
    scores = model.score_all(inputs).numpy()
    np.testing.assert_allclose(scores, bag @ cached, rtol=1e-5, atol=1e-6)
    assert not np.allclose(scores, source.score_all(inputs).numpy())  # the cache did remove entries
    # An evaluation pass computes the cached table once for all its batches; the next pass (after
    # the weights changed) computes it again.
    np.testing.assert_allclose(training.pass_scorer(model)(inputs).numpy(), scores, rtol=1e-5, atol=1e-6)
    assert not np.allclose(before(inputs).numpy(), scores)
    # The export's default budget is that cache, and it serves the top-k of those scores.
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    module = build_serving_module(model, vocab, index_kind="sparse_code", k_max=10, exclude_history=False)
    assert module.index.cache_fraction == 0.1
    assert int(module.index.posting_list_lengths().sum()) == min(kept, int(np.count_nonzero(table)))
    served, ids = module.index(model.user_embedding(inputs), k=10)
    expected_scores, expected_ids = _oracle_top_k(scores, 10)
    np.testing.assert_allclose(served.numpy(), expected_scores, rtol=1e-5)
    found = np.isfinite(expected_scores)
    np.testing.assert_array_equal(ids.numpy()[found], expected_ids[found])
    # A budget the caller passes wins over the model's.
    other = build_serving_module(model, vocab, index_kind="sparse_code", index_options={"max_items_per_code": 3},
                                 k_max=10)
    assert other.index.cache_fraction is None and other.index.max_items_per_code == 3
    # None counts as not given; cache_fraction=1 asks for the whole table.
    unset = build_serving_module(model, vocab, index_kind="sparse_code", index_options={"cache_fraction": None},
                                 k_max=10)
    assert unset.index.cache_fraction == 0.1
    whole = build_serving_module(model, vocab, index_kind="sparse_code", index_options={"cache_fraction": 1},
                                 k_max=10)
    assert whole.index.is_exact() and whole.index.num_postings == np.count_nonzero(table)
    assert model.get_config()["serving_cache_fraction"] == 0.1
    assert SparCode.from_config(model.get_config()).get_config() == model.get_config()
    with pytest.raises(ValueError, match=r"serving_cache_fraction must be a number in \(0.0, 1.0\], got 0"):
        SparCode(num_items=5, serving_cache_fraction=0)
    with pytest.raises(ValueError, match="serving_cache_fraction needs quantize=True"):
        SparCode(num_items=5, serving_cache_fraction=0.1, quantize=False)


def _reloads_and_exports_its_codes(model, tmp_path):
    """A reloaded ``model`` has its config, codes and scores, and its export serves those codes
    from the inverted index, with stock ops, equal to the top-k of its scores."""
    histories = [np.arange(1, 6), np.arange(30, 38)]
    inputs = {"history": pad_histories(histories, LENGTH)}
    save_model(model, tmp_path / "model")
    reloaded = load_model(tmp_path / "model")
    assert reloaded.get_config() == model.get_config()
    np.testing.assert_array_equal(reloaded.query_codes(inputs).numpy(), model.query_codes(inputs).numpy())
    np.testing.assert_allclose(reloaded.score_all(inputs).numpy(), model.score_all(inputs).numpy(), rtol=1e-6)
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    path = export_retrieval_model(reloaded, vocab, tmp_path / "export", index_kind="sparse_code", k_max=10)
    assert non_stock_ops(path) == set()
    request = tf.constant([list(vocab.ids(h)) + [""] * (12 - len(h)) for h in histories])
    result = tf.saved_model.load(str(path)).signatures["top_k"](history=request, k=tf.constant(5))
    scores = model.score_all(inputs).numpy()
    for row, history in enumerate(histories):
        scores[row, history] = 0.0
    np.testing.assert_allclose(result["scores"].numpy(), _oracle_top_k(scores, 5)[0], rtol=1e-5)


def test_slot_tokenizer_trains_reads_the_history_causally_and_reloads(tmp_path):
    """tokenizer="slots": K learned slots attend over the encoded history. Training reaches the
    slots; each training position's tokens read its own user's history up to itself; served
    tokens read the whole history; the config round-trips and a reloaded model gives the same
    codes and scores."""
    model = _model(tokenizer="slots")
    model.fit(_batches(num_batches=3), epochs=2, verbose=0)
    assert model.get_config()["tokenizer"] == "slots"
    again = SparCode.from_config(model.get_config())
    assert again.get_config() == model.get_config()

    batch = next(iter(_batches()))
    with tf.GradientTape() as tape:
        loss = model.compute_loss(batch, training=True)
    assert float(tf.reduce_max(tf.abs(tape.gradient(loss, model.token_slots)))) > 0

    # What compute_loss hands the tokenizer: each position's state with the mask and row it reads.
    calls = []
    original = model.query_tokens

    def recording(states, sequence=None, history_mask=None, rows=None):
        calls.append((states.numpy(), history_mask.numpy(), rows.numpy()))
        return original(states, sequence, history_mask, rows)

    model.query_tokens = recording
    model.compute_loss(batch, training=False)
    del model.query_tokens
    (states, masks, rows), = calls
    sequence = model.encode_sequence(batch).numpy()
    history = np.asarray(batch["history"])
    assert len(states) == min(64, int((np.asarray(batch["next_items"]) > 0).sum()))
    for state, mask, row in zip(states, masks, rows):
        position = int(np.flatnonzero(mask).max())  # a position reads up to itself
        np.testing.assert_allclose(state, sequence[row, position], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(mask, (history[row] > 0) & (np.arange(LENGTH) <= position))

    # Served tokens read the whole history, not only the last position.
    inputs = {"history": pad_histories([np.arange(1, 6), np.arange(30, 38)], LENGTH)}
    encoded = model.encode_sequence(inputs)
    last_only = np.zeros((2, LENGTH), bool)
    last_only[:, -1] = True
    served = model.last_position_tokens(inputs).numpy()
    assert np.abs(served - model.query_tokens(encoded[:, -1, :], encoded, last_only).numpy()).max() > 1e-4

    _reloads_and_exports_its_codes(model, tmp_path)
    with pytest.raises(ValueError, match="the 'slots' tokenizer needs the encoded sequence and history_mask"):
        model.query_tokens(tf.zeros([2, 16]))
    with pytest.raises(ValueError, match="tokenizer must be one of .* got 'attention'"):
        SparCode(num_items=5, tokenizer="attention")


def test_chunk_tokenizer_is_product_quantization_of_the_state_scored_by_lookup(tmp_path):
    """tokenizer="chunks": token k is chunk k of the state scaled to norm sqrt(d), in its own
    coordinates; codebook k's codewords stay zero outside chunk k; training scores codes by a
    sparse lookup equal to the bag product, its loss trains the interaction and not the
    encoder; a reloaded model gives the same codes and scores, and the export serves them from
    the inverted index with stock ops."""
    model = _model(tokenizer="chunks", num_query_tokens=4, num_codebooks=4)
    assert not hasattr(model, "tokenizer") and not model.codes_need_assignment_gradient
    model.fit(_batches(num_batches=3), epochs=2, verbose=0)

    states = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    tokens = model.query_tokens(tf.constant(states)).numpy()
    scaled = states / np.linalg.norm(states, axis=1, keepdims=True) * 4.0
    for k in range(4):
        np.testing.assert_allclose(tokens[:, k, 4 * k:4 * k + 4], scaled[:, 4 * k:4 * k + 4], rtol=1e-5, atol=1e-6)
        assert not np.delete(tokens[:, k, :], np.s_[4 * k:4 * k + 4], axis=1).any()
        assert not np.delete(model.quantizer.codebooks.numpy()[k], np.s_[4 * k:4 * k + 4], axis=1).any()
    # Each chunk's code is its nearest codeword in its own codebook.
    codes = model._quantize(tf.constant(tokens)).numpy()
    codebooks = model.quantizer.codebooks.numpy()
    for k in range(4):
        distances = ((tokens[:, k, None, :] - codebooks[k][None]) ** 2).sum(-1)
        # Nearest up to float32 rounding (the layer expands ||t - e||^2, NumPy subtracts first).
        chosen = codes[:, k] - k * 16
        assert np.all((chosen >= 0) & (chosen < 16))
        np.testing.assert_allclose(distances[np.arange(len(chosen)), chosen], distances.min(1), rtol=1e-5, atol=1e-5)

    table = tf.random.normal([model.num_codes, 7])
    repeated = tf.constant([[0, 17, 33, 49], [5, 5, 40, 63]])  # repeated codes add up, as in the bag
    np.testing.assert_allclose(model.lookup_scores(repeated, table).numpy(),
                               tf.matmul(model.code_bag(repeated), table).numpy(), rtol=1e-5, atol=1e-5)
    # The code-path loss trains the interaction and not the (detached) encoder.
    reached = _code_path_gradients(model, next(iter(_batches())))
    assert reached[0] and not any(reached[1:])

    _reloads_and_exports_its_codes(model, tmp_path)

    with pytest.raises(ValueError, match="num_codebooks must be num_query_tokens=4, got 1"):
        SparCode(num_items=5, tokenizer="chunks", num_query_tokens=4)
    with pytest.raises(ValueError, match="embedding_dim=10 is not divisible by it"):
        SparCode(num_items=5, embedding_dim=10, tokenizer="chunks", num_query_tokens=4, num_codebooks=4)


def test_readable_history_is_the_users_real_items_up_to_the_position():
    history = np.array([[0, 0, 3, 4, 5], [6, 7, 8, 9, 1]], np.int32)
    where = np.array([[0, 3], [1, 0], [1, 4], [0, 1]], np.int64)
    expected = np.array([[0, 0, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(readable_history(history, where).numpy(), expected)


@pytest.mark.parametrize("tokenizer", ["last_state", "chunks"])
def test_served_tokens_are_those_of_the_last_encoded_position(tokenizer):
    """Serving encodes the last position alone (SASRecEncoder's last_position_only); the tokens
    are those of the full encoding's last row."""
    options = dict(num_query_tokens=4, num_codebooks=4) if tokenizer == "chunks" else {}
    model = _model(tokenizer=tokenizer, **options)
    inputs = {"history": pad_histories([np.arange(1, 6), np.arange(30, 38), np.array([7])], LENGTH)}
    full = model.query_tokens(model.encode_sequence(inputs)[:, -1, :]).numpy()
    np.testing.assert_allclose(model.last_position_tokens(inputs).numpy(), full, rtol=1e-5, atol=1e-5)
