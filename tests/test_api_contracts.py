"""What every public layer, index and model promises a Keras / TFRS user, checked across all of
them: bad arguments fail at construction naming the argument the caller passed (not an inner
layer's), NumPy integers count as integers, every class deserializes without custom_objects,
and misuse of an index or an export fails before the first request."""

import numpy as np
import pytest
import tensorflow as tf

import tfx_xmatch  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads Keras)
from tfx_xmatch import arguments
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.export import build_serving_module
from tfx_xmatch.index import BruteForceIndex, PartitionedIndex, ScaNNIndex, SoftSearchIndex, SparseCodeIndex
from tfx_xmatch.layers import (AllToAllInteraction, CausalTransformerBlock, DriftDenoiser, ItemTower,
                               MeanPoolingEncoder, MixedAttention, NoiseSchedule, ResidualQuantizer, SASRecEncoder,
                               TargetAttention, VectorQuantizer)
from tfx_xmatch.models import SPARC, SparCode, T2Diff, TwoTower

MODELS = (TwoTower, SparCode, SPARC, T2Diff)


def test_argument_checks_name_the_argument_and_take_numpy_integers():
    assert arguments.integer("n", np.int64(3), 1) == 3 and type(arguments.integer("n", np.int32(3))) is int
    assert arguments.real("r", np.float32(0.5), 0.0, 1.0) == 0.5
    assert arguments.widths("units", [np.int64(4), 8]) == (4, 8)
    for call, message in [
        (lambda: arguments.integer("n", 2.7, 1), "n must be an integer >= 1, got 2.7"),
        (lambda: arguments.integer("n", True, 0), "n must be an integer >= 0, got True"),
        (lambda: arguments.integer("n", "3", 1), "n must be an integer >= 1, got '3'"),
        (lambda: arguments.real("r", 1.0, 0.0, 1.0, high_open=True), r"r must be a number in [0.0, 1.0), got 1.0"),
        (lambda: arguments.real("r", float("nan"), 0.0), "r must be a number in [0.0, inf), got nan"),
        (lambda: arguments.widths("units", 8), "units must be a list of widths (integers >= 1), got 8"),
        (lambda: arguments.widths("units", (4, 0)), "units must be a list of widths (integers >= 1), got (4, 0)"),
        (lambda: arguments.widths("units", (), allow_empty=False), "units must be one or more widths"),
    ]:
        with pytest.raises(ValueError) as error:
            call()
        assert message in str(error.value)


@pytest.mark.parametrize("model_class", MODELS)
@pytest.mark.parametrize("bad, name", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(max_loss_positions=0), "max_loss_positions"), (dict(num_sampled_negatives=-5), "num_sampled_negatives"),
    (dict(dropout=1.0), "dropout"), (dict(num_heads=0), "num_heads"), (dict(l2=-1.0), "l2"),
    (dict(item_hidden_units=(8, 0)), "item_hidden_units"), (dict(embedding_dim=0), "embedding_dim"),
    (dict(embedding_dim=1), "embedding_dim"),  # trained, but the SASRec user vector ignored the history
])
def test_every_model_refuses_the_shared_hyperparameters_out_of_range(model_class, bad, name):
    # temperature 0 gave T2Diff a NaN loss and -1 silently ranked the worst items first.
    with pytest.raises(ValueError, match=f"^{name} must be"):
        model_class(num_items=5, **bad)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("build, message", [
    (lambda: VectorQuantizer(8, commitment_weight=NAN), "commitment_weight must be a number in [0.0, inf), got nan"),
    (lambda: VectorQuantizer(8, epsilon=INF), "epsilon must be a number in (0.0, inf), got inf"),
    (lambda: ResidualQuantizer(2, 8, reconstruction_weight=NAN), "reconstruction_weight must be a number in [0.0, inf), got nan"),
    (lambda: SparCode(num_items=5, sparsity_weight=NAN), "sparsity_weight must be a number in [0.0, inf), got nan"),
    (lambda: SparCode(num_items=5, assignment_temperature=NAN), "assignment_temperature must be a number in (0.0, inf), got nan"),
    (lambda: SparCode(num_items=5, encoder_loss_weight=NAN), "encoder_loss_weight must be a number in [0.0, inf), got nan"),
    (lambda: SPARC(num_items=5, bpr_weight=NAN), "bpr_weight must be a number in [0.0, inf), got nan"),
    (lambda: SPARC(num_items=5, contrastive_temperature=INF), "contrastive_temperature must be a number in (0.0, inf), got inf"),
    (lambda: T2Diff(num_items=5, diffusion_weight=NAN), "diffusion_weight must be a number in [0.0, inf), got nan"),
    (lambda: TwoTower(num_items=5, temperature=INF), "temperature must be a number in (0.0, inf), got inf"),
    (lambda: TwoTower(num_items=5, l2=INF), "l2 must be a number in [0.0, inf), got inf"),
])
def test_nan_and_infinite_weights_are_refused_by_name(build, message):
    """They passed the `value < 0` checks: a NaN commitment weight made the loss NaN, an infinite
    epsilon NaN codebooks, and from the CLI a NaN sparsity weight ended in "indices[0,0] = 16 is
    not in [0, 16)"."""
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


@pytest.mark.parametrize("build, name", [
    (lambda: SPARC(num_items=5, attention_heads=0), "attention_heads"),  # was reported as num_heads
    (lambda: SPARC(num_items=5, rq_hidden_units=(0,)), "rq_hidden_units"),  # ran with a zero-width layer
    (lambda: T2Diff(num_items=5, denoiser_units=(4, 4, 4)), "denoiser_units"),  # was hidden_units
    (lambda: SparCode(num_items=5, codebook_decay=1.5), "codebook_decay"),  # was decay
    (lambda: SparCode(num_items=5, interaction_units=()), "interaction_units"),  # was hidden_units
])
def test_composite_models_name_their_own_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()


@pytest.mark.parametrize("build, message", [
    (lambda: ItemTower(5, 4, l2=-1.0), "l2 must be a number in [0.0, inf), got -1.0"),
    (lambda: ItemTower(5, 4, hidden_units=(-2,)), "hidden_units must be a list of widths"),
    (lambda: ItemTower(5, 4, feature_tables={"g": np.ones((6, 2))}), "add 'g' to feature_dims"),
    # A NaN feature trained a NaN model, silently.
    (lambda: ItemTower(5, 4, feature_dims={"g": 2}, feature_tables={"g": np.where(np.eye(6, 2) > 0, np.nan, 1.0)}),
     "item feature table 'g' must be finite; row 0 (item index 0) holds nan in column 0"),
    (lambda: ResidualQuantizer(2, 4, hidden_units=(0,)), "hidden_units must be a list of widths"),
    (lambda: CausalTransformerBlock(ffn_units=-3), "ffn_units must be an integer >= 1 or None, got -3"),
    (lambda: SASRecEncoder(5, dropout=1.5), "dropout must be a number in [0.0, 1.0), got 1.5"),
    (lambda: SASRecEncoder(5, num_heads=0), "num_heads must be an integer >= 1, got 0"),
    (lambda: MixedAttention(dropout=-0.1), "dropout must be a number in [0.0, 1.0), got -0.1"),
    (lambda: PartitionedIndex(seed=-1), "seed must be an integer >= 0, got -1"),
])
def test_layers_refuse_bad_arguments_at_construction(build, message):
    # Each of these used to be accepted, then failed at the first call under a Keras message
    # naming an inner layer's argument (or, for l2 and a zero width, never failed at all).
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


def test_numpy_integers_are_integers():
    assert NoiseSchedule("linear", np.int64(5)).num_steps == 5
    index = SoftSearchIndex(BruteForceIndex(k_max=5), num_interests=np.int64(2), k_max=5)
    assert index.num_interests == 2 and type(index.get_config()["num_interests"]) is int


def test_mixed_attention_refuses_a_session_longer_than_its_position_table():
    layer = MixedAttention(max_session_length=3, dropout=0.0)
    inputs = lambda length: (tf.random.normal([2, length, 8]), tf.ones([2, length], tf.bool),  # noqa: E731
                             tf.random.normal([2, 8]), tf.random.normal([2, 6, 8]), tf.ones([2, 6], tf.bool))
    assert layer(*inputs(3)).shape == (2, 8)
    # One item longer used to broadcast a single position row over the whole session, silently.
    with pytest.raises(ValueError, match="sessions are 4 items long, more than max_session_length=3"):
        layer(*inputs(4))
    traced = tf.function(layer, input_signature=[
        tf.TensorSpec([None, None, 8]), tf.TensorSpec([None, None], tf.bool), tf.TensorSpec([None, 8]),
        tf.TensorSpec([None, None, 8]), tf.TensorSpec([None, None], tf.bool)])
    assert traced(*inputs(2)).shape == (2, 8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="longer than max_session_length=3"):
        traced(*inputs(4))


LAYERS = [
    lambda: AllToAllInteraction(hidden_units=(8, 4), name="a"),
    lambda: CausalTransformerBlock(num_heads=2, ffn_units=16, dropout=0.1),
    lambda: DriftDenoiser("mlp", hidden_units=(8,), step_embedding_dim=4),
    lambda: ItemTower(7, 4, hidden_units=(8,), l2=0.01),
    lambda: MeanPoolingEncoder(),
    lambda: MixedAttention(num_heads=2, num_blocks=2, max_session_length=5, pooling="predicted"),
    lambda: ResidualQuantizer(num_levels=2, num_codewords=8, hidden_units=(8,)),
    lambda: SASRecEncoder(12, num_blocks=1, num_heads=2, dropout=0.1),
    lambda: TargetAttention(num_heads=2, key_dim=5),
    lambda: VectorQuantizer(16, num_codebooks=2, decay=0.9),
    lambda: BruteForceIndex(k_max=7),
    lambda: PartitionedIndex(num_partitions=4, num_probes=2, k_max=7, seed=3),
    lambda: ScaNNIndex(k_max=7, num_leaves=4, num_leaves_to_search=2),
    lambda: SparseCodeIndex(k_max=7, max_items_per_code=3),
    lambda: SoftSearchIndex(PartitionedIndex(num_partitions=4, k_max=9), num_interests=3, k_max=7, temperature=0.5),
]


@pytest.mark.parametrize("build", LAYERS)
def test_every_layer_and_index_deserializes_without_custom_objects(build):
    # Unregistered, deserialize returned the string "TargetAttention" and Model.from_config
    # failed with "'str' object is not callable".
    layer = build()
    restored = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()


def test_a_functional_model_with_our_layer_rebuilds_from_its_config():
    query, states = tf.keras.Input((2, 4)), tf.keras.Input((3, 4))
    mask = tf.keras.Input((2, 3), dtype=tf.bool)
    model = tf.keras.Model([query, states, mask], TargetAttention(num_heads=2)(query, states, mask))
    rebuilt = tf.keras.Model.from_config(model.get_config())
    assert isinstance(rebuilt.layers[-1], TargetAttention) and rebuilt.layers[-1].num_heads == 2


@pytest.mark.parametrize("model_class", MODELS)
def test_models_keep_their_name_and_deserialize(model_class):
    model = model_class(num_items=5, embedding_dim=8, max_length=12, name="custom_name")
    assert model_class.from_config(model.get_config()).name == "custom_name"
    restored = tf.keras.utils.deserialize_keras_object(tf.keras.utils.serialize_keras_object(model))
    assert type(restored) is model_class and restored.get_config() == model.get_config()


def test_soft_search_refuses_integer_queries_like_every_other_index():
    index = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=2, k_max=10)
    index = index.index(tf.random.normal([5, 4]))
    with pytest.raises(TypeError, match="queries must be a float tensor, got dtype int32"):
        index(tf.constant([[[1, 0, 0, 0], [0, 1, 0, 0]]]), k=3)


def test_index_from_an_unbatched_dataset_says_to_batch_it():
    candidates = tf.random.normal([10, 4])
    for dataset in (tf.data.Dataset.from_tensor_slices(candidates),
                    tf.data.Dataset.from_tensor_slices((tf.range(10), candidates))):
        for index in (BruteForceIndex(k_max=5), SparseCodeIndex(k_max=5)):  # SparCode's said "a [N, d] matrix"
            with pytest.raises(ValueError, match=r"batches of \[n, d\] embeddings.*call \.batch"):
                index.index_from_dataset(dataset)
    index = BruteForceIndex(k_max=5).index_from_dataset(tf.data.Dataset.from_tensor_slices(candidates).batch(3))
    assert int(tf.shape(index.identifiers)[0]) == 10


def test_an_export_refuses_an_index_its_model_cannot_serve_before_the_first_request():
    vocab = Vocabulary([f"i{j}" for j in range(1, 11)])
    model = TwoTower(num_items=10, embedding_dim=4, max_length=5, user_tower="mean")
    soft = SoftSearchIndex(BruteForceIndex(k_max=5), num_interests=2, k_max=5)
    soft = soft.index(tf.random.normal([10, 4]), tf.range(1, 11))
    with pytest.raises(ValueError, match="the given SoftSearchIndex needs a multi-interest model"):
        build_serving_module(model, vocab, k_max=5, index=soft)
    with pytest.raises(ValueError, match="the given SparseCodeIndex needs a SparCode model"):
        build_serving_module(model, vocab, k_max=5, index=SparseCodeIndex(k_max=5))
    with pytest.raises(ValueError, match="the given BruteForceIndex is empty"):
        build_serving_module(model, vocab, k_max=5, index=BruteForceIndex(k_max=5))
    with pytest.raises(ValueError, match="k_max must be an integer >= 1, got 0"):
        build_serving_module(model, vocab, k_max=0)
    filled = BruteForceIndex(k_max=5).index(model.item_embeddings()[1:], tf.range(1, 11, dtype=tf.int64))
    served = build_serving_module(model, vocab, k_max=5, index=filled)
    assert served.serving_default(tf.constant([["i1", "i2"]]))["item_ids"].shape == (1, 5)


HISTORY = tf.constant(np.random.default_rng(0).integers(1, 31, (4, 12)), tf.int32)


def _tiny(model_class, **overrides):
    common = dict(num_items=30, embedding_dim=8, max_length=12, num_blocks=1, dropout=0.0)
    extra = {SparCode: dict(num_query_tokens=2, num_codewords=8, interaction_units=(8,)),
             SPARC: dict(num_codewords=8, num_levels=2),
             T2Diff: dict(denoiser="mlp", denoiser_units=(8,), session_length=3, history_length=5,
                          diffusion_steps=5, sampling_steps=2),
             TwoTower: {}}[model_class]
    return model_class(**{**common, **extra, **overrides})


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("extension", ["", ".keras"], ids=["savedmodel", "keras"])
def test_a_keras_save_and_load_answers_like_the_saved_model(model_class, extension, tmp_path):
    """tf.keras.models.load_model gives back the same model. After a SavedModel-format round trip
    every model with attention answered differently (its MultiHeadAttention re-initialised at
    the first call), and a .keras T2Diff lost its mixed attention's blocks, without a warning."""
    tf.keras.utils.set_random_seed(0)
    model = _tiny(model_class)
    expected = model({"history": HISTORY}).numpy()
    path = str(tmp_path / f"model{extension}")
    model.save(path)
    reloaded = tf.keras.models.load_model(path)
    np.testing.assert_allclose(reloaded({"history": HISTORY}).numpy(), expected, rtol=1e-6, atol=1e-6)


def _batches():
    sequences = np.random.default_rng(1).integers(1, 31, (16, 13))
    return tf.data.Dataset.from_tensor_slices({"history": sequences[:, :-1], "next_items": sequences[:, 1:]}).batch(8)


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_sample_and_class_weights_are_refused_not_ignored(model_class):
    """They were dropped with y: a run weighted by zeros trained as fully as an unweighted one.
    After the refusal the model trains and evaluates (Keras kept the half-traced step function:
    "Creating variables on a non-first call to a function decorated with tf.function")."""
    model = _tiny(model_class)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    refused = "sample_weight .* is not supported: the retrieval losses weigh every target position alike"
    weighted = _batches().map(lambda x: (x, tf.zeros([1]), tf.zeros(tf.shape(x["history"])[:1])))
    with pytest.raises(ValueError, match=refused):
        model.fit(weighted, verbose=0)
    with pytest.raises(ValueError, match=refused):
        model.evaluate(weighted, verbose=0)
    sequences = np.random.default_rng(1).integers(1, 31, (8, 13))
    inputs = {"history": sequences[:, :-1], "next_items": sequences[:, 1:]}
    with pytest.raises(ValueError, match=refused):
        model.fit(inputs, np.zeros(8), class_weight={0: 0.0}, verbose=0)
    with pytest.raises(ValueError, match=refused):
        model.train_on_batch(inputs, np.zeros(8), sample_weight=np.zeros(8))
    with pytest.raises(ValueError, match=refused):  # Keras kept the refused validation data for the next fit
        model.fit(_batches(), validation_data=weighted, verbose=0)
    history = model.fit(_batches().map(lambda x: (x, tf.zeros([1]))), validation_data=_batches(), verbose=0).history
    assert np.isfinite(history["loss"][0]) and np.isfinite(history["val_loss"][0])
    assert np.isfinite(model.evaluate(_batches(), verbose=0, return_dict=True)["loss"])


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_call_builds_every_weight_that_scoring_and_training_use(model_class):
    """A model restored from a .keras file is built by call() alone; a weight created later (at
    the first score or training step) is skipped by the restore and drawn anew. SparCode's
    interaction network was: a .keras SparCode scored with random weights, without a warning."""
    model = _tiny(model_class)
    model({"history": HISTORY})
    built = {variable.name for variable in model.variables}
    model.score_all({"history": HISTORY})
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    model.fit(_batches(), epochs=1, verbose=0)
    assert {variable.name for variable in model.variables} - built == set()


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_user_features_of_shape_b_1_are_read_as_b_and_ids_that_are_not_indices_are_refused(model_class):
    """A [B, 1] feature (TFRS's usual shape for a scalar one) was embedded as [B, 1, d]: the
    user vectors came out [B, L, d], [B * L, d] or [B, B, d] (other users' features mixed in),
    and fit failed on a rank mismatch. A float history was truncated (3.9 read as item 3); a
    string one failed deep inside a layer."""
    tf.keras.utils.set_random_seed(0)
    model = _tiny(model_class, user_feature_cardinalities={"gender": 2})
    history = HISTORY.numpy()[:3]
    flat = model.user_embedding({"history": history, "gender": np.array([1, 2, 0])}).numpy()
    column = model.user_embedding({"history": history, "gender": np.array([[1], [2], [0]])}).numpy()
    assert flat.shape[0] == 3
    np.testing.assert_array_equal(column, flat)
    with pytest.raises(ValueError, match=r"user feature 'gender' must have shape \[batch\] \(or \[batch, 1\]\)"):
        model.user_embedding({"history": history, "gender": np.int32(1)})
    with pytest.raises(TypeError, match="input 'history' must hold integer indices .*got string.* the item vocabulary"):
        model.user_embedding({"history": history.astype(str), "gender": np.array([1, 2, 0])})
    with pytest.raises(TypeError, match="input 'gender' .*got string.* the user feature 'gender' vocabulary"):
        model.user_embedding({"history": history, "gender": np.array(["f", "m", "f"])})
    with pytest.raises(tf.errors.InvalidArgumentError, match="input history must hold integer indices, but a value"):
        model.user_embedding({"history": history.astype(np.float32) + 0.9, "gender": np.array([1, 2, 0])})
    np.testing.assert_array_equal(  # whole numbers in floats, as Keras' Embedding takes them
        model.user_embedding({"history": history.astype(np.float32), "gender": np.array([1, 2, 0])}).numpy(), flat)
    # Traced without a known shape (Dataset.from_generator), checked when it runs.
    traced = tf.function(lambda gender: model.user_embedding({"history": history, "gender": gender}),
                         input_signature=[tf.TensorSpec(None, tf.int64)])
    np.testing.assert_allclose(traced(np.array([[1], [2], [0]])).numpy(), flat, rtol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="user feature gender must have shape"):
        traced(np.array([[1, 1], [2, 2], [0, 0]]))
    # fit takes the [B, 1] feature as tf.data batches it, and whole-number float targets.
    batches = tf.data.Dataset.from_tensor_slices({
        "history": HISTORY, "next_items": np.roll(HISTORY.numpy(), -1, axis=1).astype(np.float32),
        "gender": np.array([[1], [2], [0], [1]])}).batch(2)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    assert np.isfinite(model.fit(batches, epochs=1, verbose=0).history["loss"][0])
    with pytest.raises(TypeError, match="input 'history' must hold integer indices"):
        model.fit(tf.data.Dataset.from_tensor_slices({"history": HISTORY.numpy().astype(str),
                                                      "next_items": HISTORY}).batch(2), verbose=0)
    # Variable-length sequences as tf.data batches them (ragged_batch) failed with "object of
    # type 'RaggedTensor' has no len()".
    ragged = tf.ragged.constant([[1, 2, 3], [4, 5, 6, 7]])
    pad_it = r"input 'history' is a RaggedTensor, but the models take dense .*\.left_pad_ragged"
    with pytest.raises(TypeError, match=pad_it):
        model.user_embedding({"history": ragged, "gender": np.array([1, 2])})
    with pytest.raises(TypeError, match=r"input 'gender' is a SparseTensor, but a user feature takes one index per row"):
        model.user_embedding({"history": history[:2], "gender": tf.sparse.from_dense([[1], [2]])})
    with pytest.raises(TypeError, match=pad_it):
        model.fit(tf.data.Dataset.from_tensor_slices({"history": ragged, "next_items": ragged,
                                                      "gender": np.array([1, 2])}).ragged_batch(2), verbose=0)


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_fit_then_save_and_checkpoint_without_calling_the_model_first(model_class, tmp_path):
    """fit never goes through __call__, so Keras refused model.save after it ("the forward pass
    of the model is not defined"), a full-model ModelCheckpoint stopped fit at its first epoch,
    and a .keras file saved after it could not be loaded."""
    tf.keras.utils.set_random_seed(0)
    model = _tiny(model_class)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    checkpoint = tf.keras.callbacks.ModelCheckpoint(str(tmp_path / "checkpoint"))
    model.fit(_batches(), epochs=1, verbose=0, callbacks=[checkpoint])
    # The optimizer's slots exist before the first trace, which tf.function would otherwise
    # trace again (the whole train step traced twice).
    assert model.train_function.experimental_get_tracing_count() == 1
    expected = model.score_all({"history": HISTORY}).numpy()
    for path in (tmp_path / "checkpoint", tmp_path / "saved", tmp_path / "saved.keras"):
        if path != tmp_path / "checkpoint":
            model.save(str(path))
        reloaded = tf.keras.models.load_model(str(path))
        np.testing.assert_allclose(reloaded.score_all({"history": HISTORY}).numpy(), expected, rtol=1e-5, atol=1e-5,
                                   err_msg=str(path))


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_weights_only_checkpoints_in_every_format_load_into_a_fresh_model(model_class, tmp_path):
    """SparCode's interaction network built its Dense sublayers outside their name scopes: four
    variables were all named "kernel:0", so a weights-only ModelCheckpoint to an .h5 path (the
    legacy HDF5 format, one dataset per variable name) stopped fit with "name already exists"."""
    tf.keras.utils.set_random_seed(0)
    model = _tiny(model_class)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    paths = [str(tmp_path / "legacy.h5"), str(tmp_path / "keras.weights.h5"), str(tmp_path / "checkpoint.ckpt")]
    callbacks = [tf.keras.callbacks.ModelCheckpoint(path, save_weights_only=True) for path in paths]
    model.fit(_batches(), epochs=1, verbose=0, callbacks=callbacks)
    names = [variable.name for variable in model.trainable_variables + model.non_trainable_variables
             if not any(variable is tracked for metric in model.metrics for tracked in metric.variables)]
    assert sorted({name for name in names if names.count(name) > 1}) == []
    expected = model.score_all({"history": HISTORY}).numpy()
    for path in paths:
        fresh = _tiny(model_class)
        fresh.build_all_variables()
        fresh.load_weights(path)
        np.testing.assert_allclose(fresh.score_all({"history": HISTORY}).numpy(), expected, rtol=1e-5, atol=1e-5,
                                   err_msg=path)


@pytest.fixture
def mixed_float16():
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


# The sublayers that carry each model's compute, which a mixed policy must run in float16.
HEAVY_LAYERS = {TwoTower: ("encoder",), SparCode: ("encoder", "interaction"), SPARC: ("encoder", "target_attention"),
                T2Diff: ("denoiser", "mixed_attention")}


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loss", ["full_softmax", "sampled_softmax"])
def test_mixed_float16_trains_with_loss_scaling_and_answers_like_float32(model_class, loss, mixed_float16, tmp_path):
    """Under mixed_float16 every model failed its first train step (float16 and float32 operands
    of one op), and its train step differentiated the loss unscaled."""
    tf.keras.utils.set_random_seed(0)
    options = dict(loss=loss, num_sampled_negatives=5)
    model = _tiny(model_class, **options)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    for name in HEAVY_LAYERS[model_class]:
        assert getattr(model, name).compute_dtype == "float16", name
    assert model.item_tower.compute_dtype == "float32"
    model.build_all_variables()
    heavy = {name: getattr(model, name).trainable_variables for name in HEAVY_LAYERS[model_class]}
    before = {name: [variable.numpy() for variable in variables] for name, variables in heavy.items()}
    # The loss scale starts at 2**15 and halves on every step whose float16 gradients overflow
    # (that step is skipped); enough steps for it to settle and the rest to train.
    history = model.fit(_batches().repeat(8), epochs=2, verbose=0)
    assert model.train_function.experimental_get_tracing_count() == 1  # LossScaleOptimizer too
    assert np.all(np.isfinite(history.history["loss"])), history.history["loss"]
    assert history.history["loss"][-1] < history.history["loss"][0], history.history["loss"]
    for name, variables in heavy.items():
        assert any(not np.array_equal(old, new.numpy()) for old, new in zip(before[name], variables)), name

    inputs = {"history": HISTORY}
    users, scores = model.user_embedding(inputs), model.score_all(inputs)
    assert users.dtype == tf.float32 and scores.dtype == tf.float32 and model.item_embeddings().dtype == tf.float32
    if loss == "full_softmax":  # the loss only shapes training: one save per model covers serving
        saved = tmp_path / "mixed"
        model.save(str(saved))
        np.testing.assert_allclose(tf.keras.models.load_model(str(saved)).score_all(inputs).numpy(),
                                   scores.numpy(), rtol=1e-5, atol=1e-5)

    tf.keras.mixed_precision.set_global_policy("float32")
    twin = _tiny(model_class, **options)
    twin.build_all_variables()
    twin.set_weights(model.get_weights())
    # float16 keeps about three significant digits through the heavy layers.
    np.testing.assert_allclose(scores.numpy(), twin.score_all(inputs).numpy(), rtol=0.05, atol=0.05)


def test_a_models_own_dtype_reaches_its_heavy_sublayers_and_the_global_policy_is_left_alone(mixed_float16):
    own = TwoTower(num_items=30, embedding_dim=8, max_length=12, dtype="float32")
    assert {own.dtype_policy.name, own.encoder.dtype_policy.name, own.item_tower.dtype_policy.name} == {"float32"}
    tf.keras.mixed_precision.set_global_policy(None)  # unset: layers follow floatx
    model = _tiny(TwoTower, loss="sampled_softmax", num_sampled_negatives=5)
    model.compute_loss({"history": HISTORY, "next_items": tf.roll(HISTORY, -1, 1)}, training=True)
    tf.keras.backend.set_floatx("float64")
    try:
        assert tf.keras.layers.Dense(1).dtype == "float64"  # still unset, not pinned to float32
    finally:
        tf.keras.backend.set_floatx("float32")


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_jit_compile_trains_or_is_refused_by_name(model_class):
    """compile(jit_compile=True), the Keras switch to XLA: SPARC's step has data-dependent
    shapes, and it failed at its first step with an XLA error that named no setting."""
    tf.keras.utils.set_random_seed(0)
    model = _tiny(model_class)
    if model_class is SPARC:
        with pytest.raises(ValueError, match="SPARC cannot train with jit_compile=True"):
            model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), jit_compile=True)
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
        with pytest.raises(ValueError, match="SPARC cannot train with jit_compile=True"):
            model.jit_compile = True  # Keras' own switch, after compile
        model.jit_compile = False
        assert not model.jit_compile
        return
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), jit_compile=True)
    assert model.jit_compile
    history = model.fit(_batches().repeat(2), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])), history.history["loss"]
    assert history.history["loss"][-1] < history.history["loss"][0], history.history["loss"]


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_a_models_own_dtype_survives_its_config_and_a_save_model_round_trip(model_class, tmp_path):
    """get_config left the dtype out: a model built with dtype="mixed_float16" came back from its
    config (save_model / load_model, warm start, export's description) in the loading process'
    global policy."""
    from tfx_xmatch.training import load_model, save_model

    model = _tiny(model_class, dtype="mixed_float16")
    assert model.get_config()["dtype"] == "mixed_float16"
    assert _tiny(model_class).get_config()["dtype"] == "float32"
    heavy = HEAVY_LAYERS[model_class][-1]
    assert model_class.from_config(model.get_config()).dtype_policy.name == "mixed_float16"
    model.build_all_variables()
    save_model(model, tmp_path / "model")
    reloaded = load_model(tmp_path / "model")
    assert reloaded.dtype_policy.name == "mixed_float16"
    assert getattr(reloaded, heavy).compute_dtype == "float16" and reloaded.item_tower.compute_dtype == "float32"
    inputs = {"history": HISTORY}
    np.testing.assert_allclose(reloaded.score_all(inputs).numpy(), model.score_all(inputs).numpy(), rtol=1e-6)


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_a_batch_of_no_rows_moves_no_weight_and_no_logged_loss(model_class):
    """What a replica gets from a last batch smaller than the number of replicas: it scores a
    placeholder row whose loss weighs nothing (it failed the step before: "a batch has no target")."""
    tf.keras.utils.set_random_seed(0)
    model = _tiny(model_class)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.1))
    model.fit(_batches(), epochs=1, verbose=0)
    # Every loss and rate the model logs, its quantizers' usage metrics included, and every
    # weight, the quantizers' EMA codebooks and usage included.
    logged = {metric.name: float(metric.result()) for metric in model.metrics}
    assert any(name.endswith("perplexity") for name in logged) == (model_class in (SparCode, SPARC))
    before = [variable.numpy() for variable in model.weights]
    empty = {"history": tf.zeros([0, 12], tf.int32), "next_items": tf.zeros([0, 12], tf.int32)}
    model.train_step(empty)
    for old, variable in zip(before, model.weights):
        np.testing.assert_array_equal(old, variable.numpy(), err_msg=variable.name)
    assert {metric.name: float(metric.result()) for metric in model.metrics} == logged
    model.test_step(empty)
    assert {metric.name: float(metric.result()) for metric in model.metrics} == logged


def test_evaluate_alone_leaves_a_model_that_saves(tmp_path):
    model = _tiny(TwoTower)
    model.compile()
    model.evaluate(_batches(), verbose=0)
    model.save(str(tmp_path / "evaluated"))


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_a_model_used_only_through_score_all_saves_and_reloads(model_class, tmp_path):
    """As the TwoTower docstring's example uses it: the SavedModel save was refused ("the input
    shape is not available") and the .keras file failed to load ("expected 0 variables")."""
    model = _tiny(model_class)
    expected = model.score_all({"history": HISTORY}).numpy()
    for path in (tmp_path / "saved", tmp_path / "saved.keras"):
        model.save(str(path))
        reloaded = tf.keras.models.load_model(str(path))
        np.testing.assert_allclose(reloaded.score_all({"history": HISTORY}).numpy(), expected, rtol=1e-5, atol=1e-5,
                                   err_msg=str(path))


def test_mixed_attention_weights_round_trip_through_a_weights_h5_file(tmp_path):
    class Holder(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.mixed = MixedAttention(num_blocks=2)

        def call(self, inputs):
            return self.mixed(*inputs)

    inputs = (tf.random.normal([2, 4, 8]), tf.ones([2, 4], tf.bool), tf.random.normal([2, 8]),
              tf.random.normal([2, 6, 8]), tf.ones([2, 6], tf.bool))
    saved, fresh = Holder(), Holder()
    expected = saved(inputs).numpy()
    fresh(inputs)
    saved.save_weights(str(tmp_path / "mixed.weights.h5"))
    fresh.load_weights(str(tmp_path / "mixed.weights.h5"))
    np.testing.assert_allclose(fresh(inputs).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_target_attention_is_told_the_history_width():
    attention = TargetAttention(state_width=16)
    out = attention(tf.random.normal([2, 3, 8]), tf.random.normal([2, 5, 16]), tf.ones([2, 3, 5], tf.bool))
    assert out.shape == (2, 3, 8) and TargetAttention.from_config(attention.get_config()).state_width == 16
    with pytest.raises(ValueError, match=r"history states are 16 wide but the attention was built for 8; "
                                         r"construct TargetAttention\(state_width=16\)"):
        TargetAttention()(tf.random.normal([2, 3, 8]), tf.random.normal([2, 5, 16]), tf.ones([2, 3, 5], tf.bool))


def test_layers_take_float64_in_every_argument_not_only_the_first():
    d64 = tf.float64
    assert AllToAllInteraction()(tf.ones([4, 8], d64), tf.ones([10, 2, 8], d64)).shape == (4, 10)
    assert MixedAttention()(tf.zeros([2, 10, 8], d64), tf.ones([2, 10], tf.bool), tf.zeros([2, 8], d64),
                            tf.zeros([2, 40, 8], d64), tf.ones([2, 40], tf.bool)).shape == (2, 8)
    for architecture in ("unet", "mlp"):
        denoiser = DriftDenoiser(architecture, hidden_units=(8, 16) if architecture == "unet" else (8,))
        assert denoiser(tf.zeros([2, 8], d64), tf.constant([1, 5]), tf.zeros([2, 3, 8], d64),
                        tf.ones([2, 3], tf.bool)).shape == (2, 8)


def test_an_empty_batch_gets_an_empty_answer():
    # The U-Net denoiser (T2Diff's default) failed on it: TensorFlow's Conv1D gives an empty batch
    # back with the input's channels.
    model = T2Diff(num_items=30, embedding_dim=8, max_length=12, session_length=3, history_length=5,
                   diffusion_steps=5, sampling_steps=2)
    assert model({"history": tf.zeros([0, 12], tf.int32)}).shape == (0, 8)
    assert model({"history": HISTORY}).shape == (4, 8)
    # Excluding history items from an empty batch failed for every kind but brute force.
    embeddings = tf.random.normal([40, 8])
    for index in (BruteForceIndex(k_max=5), PartitionedIndex(num_partitions=4, num_probes=2, k_max=5),
                  ScaNNIndex(num_leaves=4, num_leaves_to_search=2, k_max=5)):
        scores, ids = index.index(embeddings)(tf.zeros([0, 8]), k=3, exclude=tf.zeros([0, 2], tf.int64))
        assert scores.shape == ids.shape == (0, 3), type(index).__name__
    codes = SparseCodeIndex(k_max=5).index(np.maximum(np.random.default_rng(0).normal(size=(40, 6)), 0))
    assert codes(tf.zeros([0, 6]), k=3, exclude=tf.zeros([0, 2], tf.int64))[1].shape == (0, 3)


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_an_unbatched_history_is_refused_naming_its_shape(model_class):
    """One user's history [L] was embedded as a batch of L: "histories are 16 positions long, more
    than max_length" named the embedding width as the history's length."""
    model = _tiny(model_class)
    single = tf.constant([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    message = r"input 'history' must be item indices of shape \[batch, length\], got shape \(12,\)"
    for use in (model, model.score_all, lambda inputs: model.compute_loss({**inputs, "next_items": single})):
        with pytest.raises(ValueError, match=message):
            use({"history": single})


@pytest.mark.parametrize("model_class", [SparCode, SPARC], ids=lambda c: c.__name__)
def test_evaluate_measures_the_quantizer_metrics_and_serving_leaves_them_alone(model_class):
    """evaluate() listed quantizer_perplexity 0.0 (a perplexity is at least 1): the metrics were
    updated only in training, so every val_ column of them read 0."""
    tf.keras.utils.set_random_seed(0)
    model = _tiny(model_class)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    data = tf.data.Dataset.from_tensor_slices({"history": HISTORY, "next_items": tf.roll(HISTORY, -1, 1)}).batch(2)
    history = model.fit(data, epochs=1, verbose=0, validation_data=data).history
    results = model.evaluate(data, verbose=0, return_dict=True)
    perplexities = {name: value for name, value in results.items() if name.endswith("perplexity")}
    assert perplexities and all(value >= 1.0 for value in perplexities.values()), results
    # Dead codes are measured by the training step only (before it restarts them): evaluate
    # and val_ leave them out rather than read 0, "none dead".
    assert [name for name in history if name.endswith("dead_codes")]
    assert not [name for name in (*results, *history) if name.endswith("dead_codes") and name.startswith("val_")]
    assert not [name for name in results if name.endswith("dead_codes")], results
    if model_class is SPARC:
        assert results["rqvae_reconstruction_error"] > 0, results
    # Serving paths (no compute_loss) update no metric: exports hold no metric updates.
    counts = {metric.name: metric.count.numpy() for metric in model.metrics if hasattr(metric, "count")}
    if model_class is SparCode:
        model.query_codes({"history": HISTORY})
    else:
        model.interest_vectors({"history": HISTORY})
    model.score_all({"history": HISTORY})
    assert counts == {metric.name: metric.count.numpy() for metric in model.metrics if hasattr(metric, "count")}
    # metrics_names listed the dead codes in the middle: zipped with evaluate()'s list, their name
    # took the commitment loss's value and the commitment loss was lost.
    assert dict(zip(model.metrics_names, model.evaluate(data, verbose=0))) == pytest.approx(results)
    assert len(model.train_on_batch(next(iter(data)))) == len(model.metrics_names)
    assert all(name.endswith("dead_codes") for name in model.metrics_names[len(results):])
