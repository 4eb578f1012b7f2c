"""T2Diff, its denoiser and mixed attention: stop-gradient in both directions, deterministic
DDIM serving, sampler settings, config round trips, save/reload and export."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

from tests.successor_data import successor_batches
from tfx_xmatch.config import load_config
from tfx_xmatch.data import make_synthetic
from tfx_xmatch.data.dataset import pad_histories
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.export import build_serving_module, export_retrieval_model, non_stock_ops, xla_compiled
from tfx_xmatch.layers import DriftDenoiser, MixedAttention
from tfx_xmatch.models import T2Diff
from tfx_xmatch.training import build_model, load_model, save_model

NUM_ITEMS, LENGTH = 40, 16
HISTORIES = [np.arange(1, 12), np.arange(10, 14), np.array([33])]


def _batches(num_batches=4, batch=16, seed=0):
    return successor_batches(NUM_ITEMS, LENGTH, num_batches=num_batches, batch=batch, seed=seed, padding=5)


def _model(**kwargs):
    defaults = dict(num_items=NUM_ITEMS, embedding_dim=16, max_length=LENGTH, dropout=0.0, session_length=4,
                    history_length=6, diffusion_steps=10, denoiser_units=(16, 32), sampling_steps=5)
    tf.keras.utils.set_random_seed(7)
    model = T2Diff(**{**defaults, **kwargs})
    model.compile(optimizer=tf.keras.optimizers.Adam(5e-3))
    return model


@pytest.fixture(scope="module")
def trained():
    model = _model()
    history = model.fit(_batches(), epochs=3, verbose=0)
    return model, history


def _inputs():
    return {"history": pad_histories(HISTORIES, LENGTH)}


def test_training_logs_both_losses_and_learns(trained):
    _, history = trained
    for name in ("retrieval_loss", "diffusion_loss"):
        assert np.isfinite(history.history[name]).all()
    assert history.history["retrieval_loss"][-1] < history.history["retrieval_loss"][0]


def _split_losses(model, with_backbone=False, random_projection=False):
    """(retrieval loss, diffusion loss[, backbone loss]) of one batch, each differentiable.

    ``random_projection``: the zero-initialised projection of a backbone model gets random
    weights first, so that gradients flow back through the mixed attention at all.
    """
    batch = next(iter(_batches(num_batches=1)))
    model.compute_loss(batch, training=True)
    if random_projection:
        model.mixed_projection.kernel.assign(tf.random.normal(model.mixed_projection.kernel.shape))
    losses = {}
    original = model.trackers
    model.trackers = {name: _Capture(losses, name) for name in original}
    tape = tf.GradientTape(persistent=True)
    with tape:
        model.compute_loss(batch, training=True)
    model.trackers = original
    if with_backbone:
        return tape, losses["retrieval_loss"], losses["diffusion_loss"], losses["backbone_loss"]
    return tape, losses["retrieval_loss"], losses["diffusion_loss"]


class _Capture:
    def __init__(self, store, name):
        self.store, self.name = store, name

    def update_state(self, value):
        self.store[self.name] = value


def _nonzero(gradients):
    return any(g is not None and np.abs(tf.convert_to_tensor(g).numpy()).sum() > 0 for g in gradients)


def test_stop_gradient_separates_the_diffusion_module_from_the_towers():
    model = _model()
    tape, retrieval, diffusion = _split_losses(model)
    denoiser = model.denoiser.trainable_variables
    towers = model.item_tower.trainable_variables + model.mixed_attention.trainable_variables
    assert not _nonzero(tape.gradient(retrieval, denoiser))  # the tower loss does not train the denoiser
    assert not _nonzero(tape.gradient(diffusion, towers))  # the diffusion loss does not train the towers
    assert _nonzero(tape.gradient(retrieval, towers)) and _nonzero(tape.gradient(diffusion, denoiser))


def test_without_stop_gradient_both_losses_reach_both_modules():
    model = _model(stop_gradient=False)
    tape, retrieval, diffusion = _split_losses(model)
    assert _nonzero(tape.gradient(retrieval, model.denoiser.trainable_variables))
    assert _nonzero(tape.gradient(diffusion, model.item_tower.trainable_variables))


def test_ddim_with_eta_zero_serves_the_same_answer_in_any_batch(trained):
    model, _ = trained
    inputs = _inputs()
    first = model.user_embedding(inputs).numpy()
    np.testing.assert_array_equal(first, model.user_embedding(inputs).numpy())
    alone = model.user_embedding({"history": inputs["history"][1:2]}).numpy()
    np.testing.assert_allclose(alone[0], first[1], rtol=1e-5, atol=1e-6)
    traced = tf.function(lambda h: model.user_embedding({"history": h}))
    np.testing.assert_allclose(traced(inputs["history"]).numpy(), first, rtol=1e-5, atol=1e-6)


def test_samplers_steps_and_seeds(trained):
    model, _ = trained
    inputs = _inputs()
    ddpm = model.user_embedding(inputs, sampler="ddpm", seed=1).numpy()
    np.testing.assert_array_equal(ddpm, model.user_embedding(inputs, sampler="ddpm", seed=1).numpy())
    assert not np.allclose(ddpm, model.user_embedding(inputs, sampler="ddpm", seed=2).numpy())
    full = model.user_embedding(inputs, steps=10).numpy()
    assert not np.allclose(full, model.user_embedding(inputs, steps=2).numpy())
    with pytest.raises(ValueError, match=r"sampling steps must be in \[1, T=10\], got 11"):
        model.user_embedding(inputs, steps=11)
    with pytest.raises(ValueError, match="sampler must be one of"):
        model.user_embedding(inputs, sampler="euler")


def test_reverse_processes_return_a_constant_denoisers_prediction(trained):
    """With a denoiser that always predicts c, DDIM (eta = 0) and DDPM both end exactly at c:
    DDIM's last step returns the prediction and DDPM's last posterior has mean c, variance 0."""
    model, _ = trained
    constant = tf.constant(np.linspace(-1, 1, 16), tf.float32)
    original = model.denoiser
    model.denoiser = lambda noisy, steps, session, mask: tf.broadcast_to(constant, tf.shape(noisy))
    try:
        session, mask = tf.random.normal([3, 4, 16]), tf.ones([3, 4], tf.bool)
        for sampling in ({"sampler": "ddim", "steps": 3}, {"sampler": "ddim", "steps": 10},
                         {"sampler": "ddpm", "seed": 4}, {"sampler": "ddim", "steps": 5, "eta": 1.0, "seed": 1}):
            np.testing.assert_allclose(model.sample_drift(session, mask, **sampling).numpy(),
                                       np.broadcast_to(constant.numpy(), (3, 16)), rtol=1e-5, atol=1e-6)
    finally:
        model.denoiser = original


def _reference_sampling(model, session, mask, sampler, steps=None, eta=0.0, seed=None):
    """The reverse process step by step in Python, eagerly: what the sampler's graph loop must give."""
    batch, dim = session.shape[0], model.embedding_dim
    draw = iter(range(1, 100))
    normal = lambda: tf.random.stateless_normal([batch, dim], seed=[seed, next(draw)], alg="philox")  # noqa: E731
    z, schedule = tf.zeros([batch, dim]), model.schedule
    predicted = lambda z, step: model.denoiser(z, tf.fill([batch], step), session, mask)  # noqa: E731
    if sampler == "ddpm":
        for step in range(model.diffusion_steps, 0, -1):
            noise = normal() if step > 1 else tf.zeros([batch, dim])
            z = schedule.ddpm_step(z, predicted(z, step), tf.fill([batch], step), noise)
        return z.numpy()
    visited = schedule.ddim_timesteps(steps)
    for step, previous in zip(visited, visited[1:]):
        noise = normal() if eta > 0 else None
        z = schedule.ddim_step(z, predicted(z, step), tf.fill([batch], step), tf.fill([batch], previous), eta, noise)
    return predicted(z, visited[-1]).numpy()


def test_the_sampler_is_one_graph_loop_that_takes_every_step_of_the_reference(trained):
    """Unrolled, a traced sampler held one denoiser per step, in every signature an export
    traces: a DDPM-50 export of the ML-1M model took 108 s and loaded in 22 s (23.5 s and 4.1 s
    as a loop). The loop must still take each step, and each seeded draw, of the plain recurrence."""
    model, _ = trained
    session = tf.constant(np.random.default_rng(0).normal(size=(3, 4, 16)), tf.float32)
    mask = tf.constant([[True] * 4, [False, True, True, True], [False, False, False, True]])
    spec = [tf.TensorSpec([None, 4, 16], tf.float32), tf.TensorSpec([None, 4], tf.bool)]
    for sampling in ({"sampler": "ddim", "steps": 1}, {"sampler": "ddim", "steps": 4},
                     {"sampler": "ddim", "steps": 10}, {"sampler": "ddim", "steps": 4, "eta": 0.7, "seed": 3},
                     {"sampler": "ddpm", "seed": 5}):
        traced = tf.function(lambda s, m: model.sample_drift(s, m, **sampling), input_signature=spec)  # noqa: B023
        np.testing.assert_allclose(traced(session, mask).numpy(), _reference_sampling(model, session, mask, **sampling),
                                   rtol=1e-5, atol=1e-6, err_msg=str(sampling))

    def graph_size(**sampling):
        traced = tf.function(lambda s, m: model.sample_drift(s, m, **sampling), input_signature=spec)
        definition = traced.get_concrete_function().graph.as_graph_def()
        return len(definition.node) + sum(len(function.node_def) for function in definition.library.function)

    assert graph_size(sampler="ddim", steps=10) == graph_size(sampler="ddim", steps=2)
    # The batch known from the mask but not from the session (as in a backbone model's serving)
    # traces too: the loop's rows must not stay pinned to it.
    single = tf.function(lambda s, m: model.sample_drift(s, m, sampler="ddim", steps=4),
                         input_signature=[spec[0], tf.TensorSpec([1, 4], tf.bool)])
    np.testing.assert_allclose(single(session[:1], mask[:1]).numpy(),
                               _reference_sampling(model, session[:1], mask[:1], "ddim", 4), rtol=1e-5, atol=1e-6)


def test_sampling_overrides_are_checked(trained):
    model, _ = trained
    for sampling, message in [({"steps": 0}, r"sampling steps must be in \[1, T=10\], got 0"),
                              ({"eta": -1.0}, "eta must be a number in \\[0.0, inf\\), got -1.0"),
                              ({"sampler": "ddpm", "steps": 3}, "ddpm runs all T=10 steps; got steps=3"),
                              ({"initial_noise": "ones"}, "initial_noise must be 'zeros' or 'random'")]:
        with pytest.raises(ValueError, match=message):
            model.user_embedding(_inputs(), **sampling)


def test_raw_diffusion_ablation_trains():
    model = _model(diffuse="raw", denoiser="mlp", denoiser_units=(32,))
    history = model.fit(_batches(num_batches=2), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.score_all(_inputs()).shape == (3, NUM_ITEMS + 1)


def test_config_round_trip_and_save_reload_give_identical_retrievals(trained, tmp_path):
    model, _ = trained
    again = T2Diff.from_config(model.get_config())
    assert again.get_config() == model.get_config()
    save_model(model, tmp_path / "model")
    reloaded = load_model(tmp_path / "model")
    assert isinstance(reloaded, T2Diff)
    np.testing.assert_allclose(reloaded.score_all(_inputs()).numpy(), model.score_all(_inputs()).numpy(), rtol=1e-5)


def test_export_is_deterministic_portable_and_equal_after_reload(trained, tmp_path):
    model, _ = trained
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    module = build_serving_module(model, vocab, k_max=10)
    path = export_retrieval_model(model, vocab, tmp_path / "export", k_max=10)
    assert non_stock_ops(path) == set() and not xla_compiled(path)  # XLA only when asked for
    served = tf.saved_model.load(str(path))
    request = tf.constant([list(vocab.ids(h)) + [""] * (12 - len(h)) for h in HISTORIES])
    expected = module.top_k(request, tf.constant(5))
    for _ in range(2):
        result = served.signatures["top_k"](history=request, k=tf.constant(5))
        np.testing.assert_array_equal(result["item_ids"].numpy(), expected["item_ids"].numpy())
        np.testing.assert_allclose(result["scores"].numpy(), expected["scores"].numpy(), rtol=1e-5)
    from tests.test_export import fresh_process_answer

    answer = fresh_process_answer(path, request.numpy().astype(str).tolist())  # top_k with k = 4
    assert answer["item_ids"] == expected["item_ids"].numpy()[:, :4].astype(str).tolist()


def test_xla_compiled_export_answers_like_the_plain_one_after_reload(trained, tmp_path):
    model, _ = trained
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    plain = build_serving_module(model, vocab, k_max=10)
    path = export_retrieval_model(model, vocab, tmp_path / "export", k_max=10, jit_compile=True)
    assert xla_compiled(path)
    assert non_stock_ops(path) == set()
    served = tf.saved_model.load(str(path))
    request = tf.constant([list(vocab.ids(h)) + [""] * (12 - len(h)) for h in HISTORIES])
    # Every batch size compiles anew; one user and the whole batch must both agree.
    for rows in (request[:1], request):
        expected = plain.top_k(rows, tf.constant(5))
        result = served.signatures["top_k"](history=rows, k=tf.constant(5))
        np.testing.assert_array_equal(result["item_ids"].numpy(), expected["item_ids"].numpy())
        np.testing.assert_allclose(result["scores"].numpy(), expected["scores"].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(served.signatures["user_embedding"](history=rows)["user_embedding"].numpy(),
                                   plain.user_embedding(rows)["user_embedding"].numpy(), rtol=1e-4, atol=1e-5)
    # Seeded DDPM draws the same noise compiled or not, with fixed shapes and with the unknown
    # batch and length of a serving signature (the case that once drew other noise under XLA).
    ddpm = lambda inputs: model.user_embedding(inputs, sampler="ddpm", seed=3)  # noqa: E731
    for spec in (None, [{"history": tf.TensorSpec([None, None], tf.int32)}]):
        compiled = tf.function(ddpm, input_signature=spec, jit_compile=True)
        np.testing.assert_allclose(compiled(_inputs()).numpy(), tf.function(ddpm, input_signature=spec)(_inputs()),
                                   rtol=1e-4, atol=1e-5)
    # A DDPM export compiles too; unseeded, it draws fresh noise per request either way.
    noisy = export_retrieval_model(_model(sampler="ddpm"), vocab, tmp_path / "ddpm", k_max=10, jit_compile=True)
    answer = tf.saved_model.load(str(noisy)).signatures["top_k"](history=request, k=tf.constant(5))
    assert answer["item_ids"].shape == (len(HISTORIES), 5)


def test_layers_round_trip_their_config():
    denoiser = DriftDenoiser("unet", (8, 16), step_embedding_dim=8, name="d")
    assert DriftDenoiser.from_config(denoiser.get_config()).get_config() == denoiser.get_config()
    attention = MixedAttention(num_heads=2, num_blocks=2, dropout=0.1, max_session_length=5, name="m")
    assert MixedAttention.from_config(attention.get_config()).get_config() == attention.get_config()
    out = attention(tf.zeros([2, 5, 8]), tf.ones([2, 5], tf.bool), tf.zeros([2, 8]), tf.zeros([2, 7, 8]),
                    tf.ones([2, 7], tf.bool))
    assert out.shape == (2, 8)
    unet = denoiser(tf.zeros([3, 8]), tf.constant([1, 2, 3]), tf.zeros([3, 5, 8]), tf.ones([3, 5], tf.bool))
    assert unet.shape == (3, 8)
    with pytest.raises(ValueError, match="the unet has two levels"):
        DriftDenoiser("unet", (8,))


def test_predicted_pooling_reads_the_x_hat_position_and_round_trips():
    attention = MixedAttention(num_blocks=1, dropout=0.0, max_session_length=4, pooling="predicted", name="p")
    assert MixedAttention.from_config(attention.get_config()).pooling == "predicted"
    rng = np.random.default_rng(0)
    session = tf.constant(rng.normal(size=(2, 4, 8)), tf.float32)
    predicted = tf.constant(rng.normal(size=(2, 8)), tf.float32)
    history, history_mask = tf.constant(rng.normal(size=(2, 6, 8)), tf.float32), tf.ones([2, 6], tf.bool)
    mask = tf.ones([2, 4], tf.bool)
    base = attention(session, mask, predicted, history, history_mask).numpy()
    # Only the x_hat row is read out, so the user vector moves when x_hat moves...
    moved = attention(session, mask, predicted + 1.0, history, history_mask).numpy()
    assert not np.allclose(base, moved)
    mean = MixedAttention(num_blocks=1, dropout=0.0, max_session_length=4, name="m")
    mean(session, mask, predicted, history, history_mask)
    mean.set_weights(attention.get_weights())
    # ...and with shared weights the two poolings differ (the mean also averages the session rows).
    assert not np.allclose(mean(session, mask, predicted, history, history_mask).numpy(), base)
    # With every session row masked, x_hat's row is the only real one: both poolings read just it,
    # and what the masked rows hold cannot matter (reading any session row would break both).
    empty = tf.zeros([2, 4], tf.bool)
    alone = attention(session, empty, predicted, history, history_mask).numpy()
    np.testing.assert_allclose(mean(session, empty, predicted, history, history_mask).numpy(), alone, rtol=1e-5)
    np.testing.assert_allclose(attention(session * 3.0 + 1.0, empty, predicted, history, history_mask).numpy(),
                               alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of \\('mean', 'predicted'\\), got 'max'"):
        MixedAttention(pooling="max")
    with pytest.raises(ValueError, match="session_pooling must be one of"):
        T2Diff(num_items=5, session_pooling="max")
    model = T2Diff(num_items=5, session_pooling="predicted", max_length=12, session_length=3, history_length=4)
    assert T2Diff.from_config(model.get_config()).mixed_attention.pooling == "predicted"


def test_config_options_reach_the_model_and_bad_arguments_are_named():
    config = load_config(None, ["model.name=t2diff", "model.user_tower=mixed_attention",
                                "model.options.sampling_steps=5", "model.options.denoiser=mlp",
                                "model.options.denoiser_units=[32]", "model.max_length=20"])
    model = build_model(config, make_synthetic(num_users=20, num_items=15, seed=0))
    assert (model.sampling_steps, model.denoiser_kind) == (5, "mlp")
    with pytest.raises(ValueError, match="set model.user_tower: mixed_attention"):
        T2Diff(num_items=5, user_tower="sasrec")
    with pytest.raises(ValueError, match=r"sampling_steps must be in \[1, diffusion_steps=50\], got 60"):
        T2Diff(num_items=5, sampling_steps=60)
    with pytest.raises(ValueError, match="diffuse must be 'drift' or 'raw', got 'delta'"):
        T2Diff(num_items=5, diffuse="delta")
    with pytest.raises(ValueError, match="denoiser must be 'unet' or 'mlp', got 'transformer'"):
        T2Diff(num_items=5, denoiser="transformer")


def test_a_window_longer_than_the_histories_fed_is_warned_of():
    """max_length 20 with the default session 10 + history 40 read 10 history items and 30
    padding rows, without a word."""
    with pytest.warns(UserWarning, match=r"session_length \+ history_length = 50 items, but is fed histories of "
                                         r"max_length = 20: its long history holds at most 10 items, not "
                                         r"history_length = 40"):
        T2Diff(num_items=5, max_length=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T2Diff(num_items=5, max_length=50)


@pytest.fixture(scope="module")
def backbone_trained():
    model = _model(backbone="sasrec", backbone_blocks=1, session_pooling="predicted")
    history = model.fit(_batches(), epochs=3, verbose=0)
    return model, history


def test_backbone_starts_from_the_sasrec_state_and_trains_all_three_losses(backbone_trained):
    untrained = _model(backbone="sasrec", backbone_blocks=1)
    # The zero-initialised projection: before training the user vector is the backbone's state.
    np.testing.assert_allclose(untrained.user_embedding(_inputs()).numpy(),
                               untrained.encode_sequence(_inputs())[:, -1, :].numpy(), rtol=1e-6, atol=1e-7)
    model, history = backbone_trained
    for name in ("retrieval_loss", "diffusion_loss", "backbone_loss"):
        assert np.isfinite(history.history[name]).all()
    assert history.history["backbone_loss"][-1] < history.history["backbone_loss"][0]
    # After training the mixed-attention branch contributes.
    assert np.abs(model.mixed_projection.kernel.numpy()).sum() > 0
    assert not np.allclose(model.user_embedding(_inputs()).numpy(),
                           model.encode_sequence(_inputs())[:, -1, :].numpy(), atol=1e-4)
    assert "backbone_loss" not in _model().trackers
    with pytest.raises(ValueError, match="encode_sequence needs a backbone"):
        _model().encode_sequence(_inputs())


@pytest.mark.parametrize("condition_on_backbone", [False, True])
def test_backbone_keeps_the_stop_gradients(condition_on_backbone):
    model = _model(backbone="sasrec", backbone_blocks=1, condition_on_backbone=condition_on_backbone)
    tape, retrieval, diffusion = _split_losses(model)
    towers = (model.item_tower.trainable_variables + model.encoder.trainable_variables
              + model.mixed_attention.trainable_variables + model.mixed_projection.trainable_variables)
    assert not _nonzero(tape.gradient(retrieval, model.denoiser.trainable_variables))
    assert not _nonzero(tape.gradient(diffusion, towers))
    assert _nonzero(tape.gradient(retrieval, model.encoder.trainable_variables))
    assert _nonzero(tape.gradient(retrieval, model.mixed_projection.trainable_variables))


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_a_detached_branch_leaves_the_backbone_and_item_table_to_the_backbone_loss(stop_gradient):
    model = _model(backbone="sasrec", backbone_blocks=1, detach_branch=True, stop_gradient=stop_gradient)
    assert T2Diff.from_config(model.get_config()).detach_branch
    tape, retrieval, diffusion, backbone = _split_losses(model, with_backbone=True, random_projection=True)
    shared = model.item_tower.trainable_variables + model.encoder.trainable_variables
    branch = model.mixed_attention.trainable_variables + model.mixed_projection.trainable_variables
    assert not _nonzero(tape.gradient(retrieval, shared))
    assert not _nonzero(tape.gradient(diffusion, shared))
    assert _nonzero(tape.gradient(retrieval, model.mixed_projection.trainable_variables))
    assert _nonzero(tape.gradient(retrieval, model.mixed_attention.trainable_variables))
    # Without stop_gradient the denoiser and the towers still share gradients; the shared
    # representation stays the backbone loss's either way.
    assert _nonzero(tape.gradient(retrieval, model.denoiser.trainable_variables)) is not stop_gradient
    assert not _nonzero(tape.gradient(diffusion, branch))
    assert _nonzero(tape.gradient(backbone, model.item_tower.trainable_variables))
    assert _nonzero(tape.gradient(backbone, model.encoder.trainable_variables))
    assert not _nonzero(tape.gradient(backbone, branch))
    # Attached (the default), the branch's loss reaches the shared representation too.
    attached = _model(backbone="sasrec", backbone_blocks=1)
    tape, retrieval, _ = _split_losses(attached)
    assert _nonzero(tape.gradient(retrieval, attached.item_tower.trainable_variables + attached.encoder.trainable_variables))


def test_backbone_round_trips_saves_and_exports(backbone_trained, tmp_path):
    model, _ = backbone_trained
    again = T2Diff.from_config(model.get_config())
    assert again.get_config() == model.get_config()
    assert (again.backbone, again.backbone_blocks, again.backbone_loss_weight) == ("sasrec", 1, 1.0)
    save_model(model, tmp_path / "model")
    reloaded = load_model(tmp_path / "model")
    np.testing.assert_allclose(reloaded.score_all(_inputs()).numpy(), model.score_all(_inputs()).numpy(), rtol=1e-5)
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    path = export_retrieval_model(model, vocab, tmp_path / "export", k_max=10)
    assert non_stock_ops(path) == set()
    request = tf.constant([list(vocab.ids(h)) + [""] * (12 - len(h)) for h in HISTORIES])
    expected = build_serving_module(model, vocab, k_max=10).top_k(request, tf.constant(5))
    result = tf.saved_model.load(str(path)).signatures["top_k"](history=request, k=tf.constant(5))
    np.testing.assert_array_equal(result["item_ids"].numpy(), expected["item_ids"].numpy())


def test_a_denoiser_conditioned_on_the_backbone_reads_its_state():
    model = _model(backbone="sasrec", backbone_blocks=1, condition_on_backbone=True)
    assert T2Diff.from_config(model.get_config()).condition_on_backbone
    inputs = _inputs()
    session, mask, *_ = model._split_window(model._last_window(inputs))
    base = model.encode_sequence(inputs)[:, -1, :]
    condition, condition_mask = model._denoiser_condition(session, mask, base)
    # One more position after the session, always present, holding the backbone state.
    assert condition.shape[1] == session.shape[1] + 1 and bool(tf.reduce_all(condition_mask[:, -1]))
    np.testing.assert_allclose(condition[:, -1, :].numpy(), base.numpy())
    drift = model.sample_drift(condition, condition_mask).numpy()
    assert not np.allclose(model.sample_drift(*model._denoiser_condition(session, mask, base + 1.0)).numpy(), drift)
    # Without the option the denoiser sees the session only.
    plain = _model(backbone="sasrec", backbone_blocks=1)
    assert plain._denoiser_condition(session, mask, base)[0] is session


def test_backbone_arguments_are_checked():
    with pytest.raises(ValueError, match="condition_on_backbone=True needs a backbone; got backbone='none'"):
        T2Diff(num_items=5, condition_on_backbone=True)
    with pytest.raises(ValueError, match="detach_branch=True needs a backbone; got backbone='none'"):
        T2Diff(num_items=5, detach_branch=True)
    with pytest.raises(ValueError, match="detach_branch=True needs backbone_loss_weight > 0.*got backbone_loss_weight=0"):
        T2Diff(num_items=5, backbone="sasrec", detach_branch=True, backbone_loss_weight=0)
    # Without a backbone there is no branch to switch off in a benchmark's serving path.
    from tfx_xmatch.bench.serving_paths import serving_path
    with pytest.raises(ValueError, match="needs a model with a sequence backbone, got T2Diff"):
        serving_path(_model(), NUM_ITEMS, {"kind": "brute_force", "backbone_only": True})
    with pytest.raises(ValueError, match="backbone must be one of \\('none', 'sasrec'\\), got 'gru'"):
        T2Diff(num_items=5, backbone="gru")
    with pytest.raises(ValueError, match="backbone_blocks must be an integer >= 1, got 0"):
        T2Diff(num_items=5, backbone="sasrec", backbone_blocks=0)
    with pytest.raises(ValueError, match="backbone_loss_weight must be a number in \\[0.0, inf\\), got -1"):
        T2Diff(num_items=5, backbone="sasrec", backbone_loss_weight=-1)


def test_the_drift_is_the_next_item_minus_the_last_in_a_window_that_ends_at_the_position():
    """Training diffuses z0 = x_{n+1} - x_n over the window ending at each position (the target
    never inside it); serving adds the sampled drift back to x_n."""
    model = _model()
    history = np.array([[0, 0, 0, 3, 5, 8, 13, 21, 34, 2, 7, 11, 17, 19, 23, 29]], np.int32)
    next_items = np.where(history > 0, np.concatenate([history[:, 1:], [[31]]], axis=1), 0).astype(np.int32)
    captured = {}
    split_window, q_sample = model._split_window, model.schedule.q_sample

    def recording_split(windows):
        captured.setdefault("windows", windows.numpy())
        return split_window(windows)

    def recording_q_sample(clean, steps, noise):
        captured["clean"] = clean.numpy()
        return q_sample(clean, steps, noise)

    model._split_window, model.schedule.q_sample = recording_split, recording_q_sample
    model.compute_loss({"history": tf.constant(history), "next_items": tf.constant(next_items)}, training=False)
    del model._split_window
    model.schedule.q_sample = q_sample
    items = model.item_tower(tf.range(NUM_ITEMS + 1)).numpy()
    padded = np.concatenate([np.zeros((1, model.window - 1), np.int32), history], axis=1)
    assert len(captured["windows"]) == int((next_items > 0).sum())
    for window, clean in zip(captured["windows"], captured["clean"]):
        position = int(np.flatnonzero(history[0] == window[-1])[0])
        np.testing.assert_array_equal(window, padded[0, position:position + model.window])
        assert next_items[0, position] not in window
        np.testing.assert_allclose(clean, items[next_items[0, position]] - items[window[-1]], rtol=1e-5, atol=1e-6)

    received = {}
    user_vector = model._user_vector

    def recording_user_vector(session, session_mask, predicted, *args, **kwargs):
        received["predicted"] = predicted.numpy()
        return user_vector(session, session_mask, predicted, *args, **kwargs)

    model._user_vector = recording_user_vector
    model.sample_drift = lambda *args, **kwargs: tf.fill([1, model.embedding_dim], 0.5)
    model.user_embedding({"history": tf.constant(history)})
    np.testing.assert_allclose(received["predicted"][0], items[29] + 0.5, rtol=1e-5, atol=1e-6)
