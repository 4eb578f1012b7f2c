"""SPARC: every loss logged in fit, retrieval gradients reach the codebooks, codeword-shuffle BPR,
soft search against hard search and the exact mixture, config round trip, save/reload, export."""

import numpy as np
import pytest
import tensorflow as tf

from tests.successor_data import successor_batches
from tfx_xmatch.config import load_config
from tfx_xmatch.data import make_synthetic
from tfx_xmatch.data.dataset import pad_histories
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.export import build_serving_module, export_retrieval_model, non_stock_ops, xla_compiled
from tfx_xmatch.index import BruteForceIndex, SoftSearchIndex
from tfx_xmatch.models import SPARC
from tfx_xmatch.models.sparc import codeword_shuffle_bpr
from tfx_xmatch.training import build_model, load_model, save_model

NUM_ITEMS, LENGTH = 40, 8
HISTORIES = [np.arange(1, 6), np.arange(10, 20), np.array([33])]


def _batches(num_batches=6, batch=16, seed=0):
    return successor_batches(NUM_ITEMS, LENGTH, num_batches=num_batches, batch=batch, seed=seed, padding=2)


def _model(**kwargs):
    defaults = dict(num_items=NUM_ITEMS, embedding_dim=16, max_length=LENGTH, dropout=0.0, num_codewords=6,
                    serving_interests=3, max_contrastive_positions=32)
    tf.keras.utils.set_random_seed(5)
    model = SPARC(**{**defaults, **kwargs})
    model.compile(optimizer=tf.keras.optimizers.Adam(5e-3))
    return model


@pytest.fixture(scope="module")
def trained():
    model = _model()
    history = model.fit(_batches(), epochs=4, verbose=0)
    return model, history


def _inputs():
    return {"history": pad_histories(HISTORIES, LENGTH)}


def test_training_logs_every_loss_and_codebook_usage_per_level(trained):
    _, history = trained
    for name in ("retrieval_loss", "rqvae_loss", "bpr_loss", "contrastive_loss", "interest_loss",
                 "interest_accuracy", "rqvae_level0_perplexity", "rqvae_level2_dead_codes",
                 "rqvae_reconstruction_error"):
        assert name in history.history and np.isfinite(history.history[name]).all(), name
    assert history.history["retrieval_loss"][-1] < history.history["retrieval_loss"][0]
    # Terms the model does not have are not logged (mixture_loss read a constant 0).
    assert "mixture_loss" not in history.history and "backbone_loss" not in history.history


def test_each_loss_has_its_own_weight_and_logged_value():
    """The total is the weighted sum of the logged terms; the two InfoNCE terms (user-item and
    z-z_rec) are weighted and logged separately."""
    model = _model(rqvae_weight=0.5, bpr_weight=0.2, contrastive_weight=0.3, reconstruction_contrastive_weight=0.7,
                   interest_weight=0.4)
    assert _model().reconstruction_contrastive_weight == _model().contrastive_weight  # shared by default
    assert SPARC.from_config(model.get_config()).reconstruction_contrastive_weight == 0.7
    batch = next(iter(_batches(num_batches=1)))
    model.compute_loss(batch, training=True)  # builds
    for tracker in model.trackers.values():
        tracker.reset_state()
    loss = float(model.compute_loss(batch, training=False))
    logged = {name: float(tracker.result()) for name, tracker in model.trackers.items()}
    assert logged["contrastive_loss"] == pytest.approx(
        logged["user_item_contrastive_loss"] + logged["reconstruction_contrastive_loss"], rel=1e-5)
    assert logged["user_item_contrastive_loss"] != pytest.approx(logged["reconstruction_contrastive_loss"])
    expected = (logged["retrieval_loss"] + 0.5 * logged["rqvae_loss"] + 0.2 * logged["bpr_loss"]
                + 0.3 * logged["user_item_contrastive_loss"] + 0.7 * logged["reconstruction_contrastive_loss"]
                + 0.4 * logged["interest_loss"])
    assert loss == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="reconstruction_contrastive_weight must be a number in \\[0.0, inf\\), got -1"):
        _model(reconstruction_contrastive_weight=-1)


def test_compute_loss_builds_the_bpr_negative_from_another_code():
    """The BPR term compares the user vector under the target's code with one under a shuffled
    code: every shuffled code differs, and given back the true codes it ties at log 2."""
    model = _model()
    batch = next(iter(_batches(num_batches=1)))
    model.compute_loss(batch, training=True)  # builds; the projection starts at zero (queries read nothing)
    model.interest_projection.kernel.assign(tf.random.normal(model.interest_projection.kernel.shape))
    calls = []
    shuffle = model.shuffled_codes

    def recording(codes, draws=None):
        shuffled = shuffle(codes, draws)
        calls.append((codes.numpy(), shuffled.numpy()))
        return shuffled

    model.shuffled_codes = recording
    model.trackers["bpr_loss"].reset_state()
    model.compute_loss(batch, training=False)
    (codes, shuffled), = calls
    assert len(codes) > 0 and (codes != shuffled).all() and ((0 <= shuffled) & (shuffled < 6)).all()
    assert float(model.trackers["bpr_loss"].result()) != pytest.approx(np.log(2.0), abs=1e-4)
    model.shuffled_codes = lambda codes, draws=None: codes  # a "negative" that is the true code
    model.trackers["bpr_loss"].reset_state()
    model.compute_loss(batch, training=False)
    assert float(model.trackers["bpr_loss"].result()) == pytest.approx(np.log(2.0), abs=1e-5)


def test_the_retrieval_loss_alone_reaches_every_codebook_level():
    model = _model(rqvae_weight=0.0, bpr_weight=0.0, contrastive_weight=0.0, interest_weight=0.0)
    batch = next(iter(_batches(num_batches=1)))
    model.compute_loss(batch, training=True)  # builds; the projection starts at zero
    model.interest_projection.kernel.assign(tf.random.normal(model.interest_projection.kernel.shape))
    with tf.GradientTape() as tape:
        loss = model.compute_loss(batch, training=False)
    gradient = tf.convert_to_tensor(tape.gradient(loss, model.rqvae.codebooks)).numpy()
    assert all(np.abs(gradient[level]).sum() > 0 for level in range(model.num_levels))


def test_codeword_shuffle_bpr_is_positive_and_log_two_at_a_tie():
    model = _model()
    codes = tf.constant(np.arange(600) % 6, tf.int32)
    shuffled = model.shuffled_codes(codes).numpy()
    assert (shuffled != codes.numpy()).all() and shuffled.min() >= 0 and shuffled.max() < 6
    true, other = tf.constant([2.0, -1.0, 0.5]), tf.constant([1.0, 3.0, 0.5])
    loss = float(codeword_shuffle_bpr(true, other))
    assert loss > 0
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(other.numpy() - true.numpy()))), rtol=1e-6)
    np.testing.assert_allclose(float(codeword_shuffle_bpr(true, true)), np.log(2.0), rtol=1e-6)


def test_score_all_is_the_exact_mixture_of_interest_softmaxes(trained):
    model, _ = trained
    scores = model.score_all(_inputs()).numpy()
    assert scores.shape == (3, NUM_ITEMS + 1) and np.isneginf(scores[:, 0]).all()
    np.testing.assert_allclose(np.exp(scores[:, 1:]).sum(1), 1.0, rtol=1e-5)
    vectors, log_probs = model.interest_vectors(_inputs(), 3)
    logits = np.einsum("bkd,id->bki", vectors.numpy(), model.item_embeddings().numpy()[1:])
    weights = np.exp(log_probs.numpy()) / np.exp(log_probs.numpy()).sum(1, keepdims=True)
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(scores[:, 1:]), (weights[:, :, None] * softmax).sum(1), rtol=1e-4, atol=1e-7)


def test_interests_are_the_most_probable_codes_and_hard_search_uses_the_first(trained):
    model, _ = trained
    vectors, log_probs = model.interest_vectors(_inputs(), 3)
    all_log_probs = model.interest_log_probs(_inputs()).numpy()
    np.testing.assert_allclose(log_probs.numpy(), -np.sort(-all_log_probs, axis=1)[:, :3], rtol=1e-5)
    np.testing.assert_allclose(model.user_embedding(_inputs()).numpy(), vectors.numpy()[:, 0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(vectors.numpy()[:, 0], vectors.numpy()[:, 1])  # interests give different users


def test_soft_search_with_one_interest_equals_hard_search(trained):
    model, _ = trained
    vocab = Vocabulary(list(range(1, NUM_ITEMS + 1)))
    hard = build_serving_module(model, vocab, index_kind="brute_force", k_max=10)
    soft = build_serving_module(model, vocab, index_kind="soft_search", k_max=10, index_options={"num_interests": 1})
    request = tf.constant([list(h) + [0] * (10 - len(h)) for h in HISTORIES], tf.int64)
    np.testing.assert_array_equal(soft.serving_default(request)["item_ids"].numpy(),
                                  hard.serving_default(request)["item_ids"].numpy())


def test_config_round_trip_and_save_reload_give_identical_retrievals(trained, tmp_path):
    model, _ = trained
    again = SPARC.from_config(model.get_config())
    assert again.get_config() == model.get_config()
    save_model(model, tmp_path / "model")
    reloaded = load_model(tmp_path / "model")
    assert isinstance(reloaded, SPARC)
    np.testing.assert_allclose(reloaded.score_all(_inputs()).numpy(), model.score_all(_inputs()).numpy(), rtol=1e-5)
    np.testing.assert_array_equal(reloaded.item_codes().numpy(), model.item_codes().numpy())
    index = SoftSearchIndex(BruteForceIndex(k_max=10), num_interests=3, k_max=10)
    results = []
    for m in (model, reloaded):
        index.index(m.item_embeddings()[1:], tf.range(1, NUM_ITEMS + 1))
        vectors, log_probs = m.interest_vectors(_inputs(), 3)
        results.append(index(vectors, k=5, log_weights=log_probs))
    np.testing.assert_array_equal(results[0][1].numpy(), results[1][1].numpy())
    # `xmatch export --run-dir` exports the model loaded from disk, whose quantizer never ran a
    # training step: saving must not create its metrics inside a traced function.
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    path = export_retrieval_model(reloaded, vocab, tmp_path / "export", index_kind="soft_search", k_max=10)
    request = tf.constant([list(vocab.ids(np.arange(1, 6)))])
    served = tf.saved_model.load(str(path)).signatures["serving_default"](history=request)["item_ids"]
    # The reference: the model as trained, served from memory rather than through a second export.
    expected = build_serving_module(model, vocab, index_kind="soft_search", k_max=10).serving_default(request)
    np.testing.assert_array_equal(served.numpy(), expected["item_ids"].numpy())


def test_soft_search_export_uses_stock_ops_and_answers_the_same_after_reload_and_in_a_fresh_process(trained, tmp_path):
    model, _ = trained
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    options = {"num_interests": 3, "base": "partitioned", "base_options": {"num_partitions": 4, "num_probes": 4}}
    module = build_serving_module(model, vocab, index_kind="soft_search", k_max=10, index_options=options)
    path = export_retrieval_model(model, vocab, tmp_path / "export", index_kind="soft_search", k_max=10,
                                  index_options=options)
    assert non_stock_ops(path) == set()
    served = tf.saved_model.load(str(path))
    request = tf.constant([list(vocab.ids(h)) + [""] * (12 - len(h)) for h in HISTORIES])
    expected = module.top_k(request, tf.constant(6))
    result = served.signatures["top_k"](history=request, k=tf.constant(6))
    np.testing.assert_array_equal(result["item_ids"].numpy(), expected["item_ids"].numpy())
    np.testing.assert_allclose(result["scores"].numpy(), expected["scores"].numpy(), rtol=1e-5)
    from tests.test_export import fresh_process_answer

    answer = fresh_process_answer(path, request.numpy().astype(str).tolist())  # top_k with k = 4
    assert answer["item_ids"] == expected["item_ids"].numpy()[:, :4].astype(str).tolist()
    for row, history in enumerate(HISTORIES):  # the history is excluded, nothing repeats
        ids = [i for i in result["item_ids"].numpy()[row].astype(str) if i]
        assert len(ids) == len(set(ids)) and not set(ids) & set(vocab.ids(history))


def test_xla_compiled_soft_search_export_answers_like_the_plain_one(trained, tmp_path):
    model, _ = trained
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    options = {"num_interests": 3}
    plain = build_serving_module(model, vocab, index_kind="soft_search", k_max=10, index_options=options)
    path = export_retrieval_model(model, vocab, tmp_path / "export", index_kind="soft_search", k_max=10,
                                  index_options=options, jit_compile=True)
    assert xla_compiled(path)
    served = tf.saved_model.load(str(path))
    request = tf.constant([list(vocab.ids(h)) + [""] * (12 - len(h)) for h in HISTORIES])
    expected = plain.top_k(request, tf.constant(6))
    result = served.signatures["top_k"](history=request, k=tf.constant(6))
    np.testing.assert_array_equal(result["item_ids"].numpy(), expected["item_ids"].numpy())
    np.testing.assert_allclose(result["scores"].numpy(), expected["scores"].numpy(), rtol=1e-4, atol=1e-5)


def test_export_refuses_soft_search_for_a_single_interest_model(tmp_path):
    from tfx_xmatch.models import TwoTower

    vocab = Vocabulary(list(range(1, NUM_ITEMS + 1)))
    with pytest.raises(ValueError, match="'soft_search' needs a multi-interest model"):
        export_retrieval_model(TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH), vocab,
                               tmp_path / "a", index_kind="soft_search")


def test_training_with_only_drawn_interests_does_not_break_the_auxiliary_losses():
    model = _model(predicted_query_rate=1.0)
    history = model.fit(_batches(num_batches=2), epochs=1, verbose=0)
    assert all(np.isfinite(history.history[name]).all() for name in ("loss", "bpr_loss", "contrastive_loss"))


def test_export_takes_the_models_interest_count_and_temperature(trained):
    model, _ = trained
    vocab = Vocabulary(list(range(1, NUM_ITEMS + 1)))
    module = build_serving_module(model, vocab, index_kind="soft_search", k_max=10)
    assert module.index.num_interests == model.serving_interests and module.index.temperature == model.temperature
    with pytest.raises(ValueError, match="unknown soft_search base 'annoy'"):
        build_serving_module(model, vocab, index_kind="soft_search", k_max=10, index_options={"base": "annoy"})
    # More interests than level-1 codes: one line before the index is built, not a failure while
    # the SavedModel is traced.
    too_many = model.num_codewords + 1
    with pytest.raises(ValueError, match=f"num_interests={too_many} exceeds the model's {model.num_codewords} "
                                         "interest codes"):
        build_serving_module(model, vocab, index_kind="soft_search", k_max=10,
                             index_options={"num_interests": too_many})


def test_sampled_softmax_and_user_features_train():
    model = _model(loss="sampled_softmax", num_sampled_negatives=8, user_feature_cardinalities={"age": 3})
    model.set_item_frequencies(np.ones(NUM_ITEMS + 1))
    data = _batches(num_batches=2).map(lambda b: {**b, "age": tf.ones([tf.shape(b["history"])[0]], tf.int32)})
    history = model.fit(data, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    with pytest.raises(KeyError, match="'age' is missing"):
        model.score_all(_inputs())


def test_config_options_reach_the_model_and_bad_arguments_are_named():
    config = load_config(None, ["model.name=sparc", "model.options.num_codewords=16", "model.options.bpr_weight=0.5",
                                "model.max_length=10"])
    model = build_model(config, make_synthetic(num_users=20, num_items=15, seed=0))
    assert (model.num_codewords, model.bpr_weight) == (16, 0.5)
    with pytest.raises(ValueError, match=r"codeword_query_rate must be a number in \[0.0, 1.0\], got 1.5"):
        SPARC(num_items=5, codeword_query_rate=1.5)
    with pytest.raises(ValueError, match=r"serving_interests \(9\) cannot exceed num_codewords \(8\)"):
        SPARC(num_items=5, num_codewords=8, serving_interests=9)
    with pytest.raises(ValueError, match="bpr_weight must be a number in \\[0.0, inf\\), got -1"):
        SPARC(num_items=5, bpr_weight=-1)


def test_mixture_loss_is_the_soft_search_likelihood_of_the_target(trained):
    model, _ = trained
    histories = pad_histories(HISTORIES, LENGTH)
    targets = np.array([6, 20, 34])
    states = model.encode_sequence({"history": histories})
    last = LENGTH - 1
    where = tf.constant([[row, last] for row in range(3)], tf.int64)
    present = tf.constant(histories) > 0
    model.mixture_interests = 3
    try:
        loss = model._mixture_loss(model.interest_tower(states[:, last, :]), where, tf.constant(targets, tf.int32),
                                   states, present, model.item_tower, training=False)
    finally:
        model.mixture_interests = 0
    expected = -np.mean(model.score_all({"history": histories}, 3).numpy()[np.arange(3), targets])
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_user_vectors_at_sampled_positions_equal_one_causal_attention_per_position_and_query(trained):
    # Training packs each row's positions (unsorted, several queries each) into one attention
    # call; serving attends one user at a time. Both must give the same vectors.
    model, _ = trained
    rng = np.random.default_rng(0)
    histories = np.zeros([5, LENGTH], np.int32)
    for row, size in enumerate([1, 3, LENGTH, 5, 2]):
        histories[row, LENGTH - size:] = rng.integers(1, NUM_ITEMS + 1, size)
    present = histories > 0
    states = model.encode_sequence({"history": histories})
    where = np.argwhere(present)[rng.permutation(int(present.sum()))][:9]
    queries = rng.normal(size=[len(where), 3, 16]).astype(np.float32)
    vectors = model._user_vectors_at(tf.constant(queries), tf.constant(where, tf.int64), states,
                                     tf.constant(present), training=False).numpy()
    assert vectors.shape == (9, 3, 16)
    for p, (row, t) in enumerate(where):
        mask = np.repeat((present[row] & (np.arange(LENGTH) <= t))[np.newaxis, np.newaxis], 3, axis=1)
        expected = model._attend(queries[p:p + 1], states[row:row + 1], mask, states[row:row + 1, t:t + 1])
        np.testing.assert_allclose(vectors[p], expected.numpy()[0], rtol=1e-5, atol=1e-6)


def test_mixture_training_logs_its_loss_and_trains_the_interest_tower_through_it():
    model = _model(mixture_interests=3, interest_weight=0.0, bpr_weight=0.0, contrastive_weight=0.0)
    batch = next(iter(_batches(num_batches=1)))
    model.compute_loss(batch, training=True)  # builds every layer
    with tf.GradientTape() as tape:
        total = model.compute_loss(batch, training=True)
    gradients = tape.gradient(total, model.interest_tower.trainable_variables)
    assert any(float(tf.reduce_sum(tf.abs(g))) > 0 for g in gradients if g is not None)
    history = model.fit(_batches(num_batches=2), epochs=1, verbose=0)
    assert np.isfinite(history.history["mixture_loss"]).all() and history.history["mixture_loss"][0] > 0
    with pytest.raises(ValueError, match=r"mixture_interests \(9\) cannot exceed num_codewords \(6\)"):
        _model(mixture_interests=9)


def _losses_with_tape(model):
    """Every tracked loss of one training batch, recorded on one persistent tape."""
    batch = next(iter(_batches(num_batches=1)))
    model.compute_loss(batch, training=True)  # builds every layer
    model.interest_projection.kernel.assign(tf.random.normal(model.interest_projection.kernel.shape))
    losses, original = {}, model.trackers

    class Capture:
        def __init__(self, name):
            self.name = name

        def update_state(self, value):
            losses[self.name] = value

    model.trackers = {name: Capture(name) for name in original}
    try:
        with tf.GradientTape(persistent=True) as tape:
            model.compute_loss(batch, training=True)
    finally:
        model.trackers = original
    return tape, losses


def _reaches(tape, loss, variables):
    return any(g is not None and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0
               for g in tape.gradient(loss, variables))


def test_detached_interests_leave_the_encoder_and_item_table_to_the_backbone_loss():
    model = _model(backbone_loss_weight=1.0, detach_interests=True, mixture_interests=2)
    again = SPARC.from_config(model.get_config())
    assert (again.backbone_loss_weight, again.detach_interests) == (1.0, True)
    tape, losses = _losses_with_tape(model)
    shared = model.item_tower.trainable_variables + model.encoder.trainable_variables
    for name in ("retrieval_loss", "rqvae_loss", "bpr_loss", "contrastive_loss", "interest_loss", "mixture_loss"):
        assert not _reaches(tape, losses[name], shared), name
    assert _reaches(tape, losses["backbone_loss"], model.item_tower.trainable_variables)
    assert _reaches(tape, losses["backbone_loss"], model.encoder.trainable_variables)
    # The interest branch still learns from the retrieval loss, codebooks included (joint training).
    assert _reaches(tape, losses["retrieval_loss"], model.interest_projection.trainable_variables)
    assert _reaches(tape, losses["retrieval_loss"], [model.rqvae.codebooks])
    # Attached (the default), the retrieval loss trains the encoder and the item table.
    attached = _model(backbone_loss_weight=0.5)
    tape, losses = _losses_with_tape(attached)
    assert _reaches(tape, losses["retrieval_loss"], attached.encoder.trainable_variables)
    assert "backbone_loss" not in _model().trackers
    with pytest.raises(ValueError, match="detach_interests=True needs backbone_loss_weight > 0"):
        SPARC(num_items=5, detach_interests=True)
    with pytest.raises(ValueError, match="backbone_loss_weight must be a number in \\[0.0, inf\\), got -1"):
        SPARC(num_items=5, backbone_loss_weight=-1)


def test_interest_probabilities_read_the_last_encoded_position():
    """Serving encodes the last position alone (SASRecEncoder's last_position_only)."""
    model = _model()
    full = model.encode_sequence(_inputs())[:, -1, :]
    np.testing.assert_allclose(model.interest_log_probs(_inputs()).numpy(),
                               tf.nn.log_softmax(model.interest_tower(full), axis=-1).numpy(), rtol=1e-5, atol=1e-5)
