"""The layers refuse bad constructor arguments and wrong-rank inputs naming the argument, as the
models and indexes already did (README: "Constructors check their arguments ... and name the
one the caller passed")."""

import pytest
import tensorflow as tf

import tfx_xmatch  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads Keras)
from tfx_xmatch.layers import (AllToAllInteraction, CausalTransformerBlock, DriftDenoiser, ItemTower,
                               MeanPoolingEncoder, MixedAttention, NoiseSchedule, ResidualQuantizer, SASRecEncoder,
                               TargetAttention, VectorQuantizer)
from tfx_xmatch.models import SPARC, SparCode, T2Diff


def _raises(build, message: str) -> None:
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


@pytest.mark.parametrize("build, message", [
    (lambda: AllToAllInteraction(hidden_units="64"), "hidden_units must be a list of widths (integers >= 1), got '64'"),
    (lambda: AllToAllInteraction(bilinear="no"), "bilinear must be true or false, got 'no'"),
    (lambda: DriftDenoiser(hidden_units="64"), "hidden_units must be a list of widths (integers >= 1), got '64'"),
    (lambda: DriftDenoiser(hidden_units=(8, "x")), "hidden_units must be one or more widths (integers >= 1), "
                                                   "got (8, 'x')"),
    (lambda: DriftDenoiser(step_embedding_dim="64"), "step_embedding_dim must be an integer >= 2, got '64'"),
    (lambda: SASRecEncoder(max_length=20.5), "max_length must be an integer >= 1, got 20.5"),
    (lambda: SASRecEncoder(max_length="200"), "max_length must be an integer >= 1, got '200'"),
    (lambda: SASRecEncoder(max_length=20, num_blocks=1.5), "num_blocks must be an integer >= 1, got 1.5"),
    (lambda: ItemTower(num_items=5.9, embedding_dim=4), "num_items must be an integer >= 1, got 5.9"),
    (lambda: ItemTower(num_items=5, embedding_dim=4.5), "embedding_dim must be an integer >= 1, got 4.5"),
    (lambda: ItemTower(5, 4, feature_dims=[3]), "feature_dims must be a dict keyed by feature name, got a list"),
    (lambda: VectorQuantizer(16.5), "num_codewords must be an integer >= 2, got 16.5"),
    (lambda: VectorQuantizer("16"), "num_codewords must be an integer >= 2, got '16'"),
    (lambda: VectorQuantizer(16, num_codebooks=2.0), "num_codebooks must be an integer >= 1, got 2.0"),
    (lambda: VectorQuantizer(16, product_quantization="yes"), "product_quantization must be true or false, got 'yes'"),
    (lambda: TargetAttention(key_dim=2.5), "key_dim must be an integer >= 1 or None, got 2.5"),
    (lambda: TargetAttention(num_heads="2"), "num_heads must be an integer >= 1, got '2'"),
    (lambda: TargetAttention(dropout=None), "dropout must be a number in [0.0, 1.0), got None"),
    (lambda: CausalTransformerBlock(num_heads=2.5), "num_heads must be an integer >= 1, got 2.5"),
    (lambda: CausalTransformerBlock(dropout="0.1"), "dropout must be a number in [0.0, 1.0), got '0.1'"),
    (lambda: ResidualQuantizer(num_levels=2.5), "num_levels must be an integer >= 1, got 2.5"),
    (lambda: ResidualQuantizer(latent_dim=3.3), "latent_dim must be an integer >= 1 or None, got 3.3"),
    (lambda: ResidualQuantizer(usage_decay=None), "usage_decay must be a number in (0.0, 1.0), got None"),
    (lambda: MeanPoolingEncoder(projection="no"), "projection must be true or false, got 'no'"),
])
def test_layer_constructors_name_the_bad_argument(build, message):
    """Floats were truncated (max_length=20.5 -> 20, num_codewords=16.5 -> 16), strings split
    into widths ("64" -> (6, 4)) or taken as True ("no"), and the rest failed with a TypeError
    from a comparison or int() that named no argument."""
    _raises(build, message)


@pytest.mark.parametrize("build, message", [
    (lambda: SparCode(5, quantize="no"), "quantize must be true or false, got 'no'"),
    (lambda: SparCode(5, detach_code_path="no"), "detach_code_path must be true or false, got 'no'"),
    (lambda: SparCode(5, num_query_tokens=2.5), "num_query_tokens must be an integer >= 1, got 2.5"),
    (lambda: SparCode(5, num_query_tokens="3"), "num_query_tokens must be an integer >= 1, got '3'"),
    (lambda: SparCode(5, num_query_tokens=8, num_codebooks=8.0), "num_codebooks must be an integer >= 1, got 8.0"),
    (lambda: SparCode(5, training_cache_fraction="0.5"),
     "training_cache_fraction must be a number in (0.0, 1.0], got '0.5'"),
    (lambda: SparCode(5, embedding_dim="64", tokenizer="chunks", num_codebooks=8),
     "embedding_dim must be an integer >= 2, got '64'"),
    (lambda: SPARC(5, num_codewords="8"), "num_codewords must be an integer >= 2, got '8'"),
    (lambda: SPARC(5, serving_interests=2.5), "serving_interests must be an integer >= 1, got 2.5"),
    (lambda: SPARC(5, max_contrastive_positions=10.5), "max_contrastive_positions must be an integer >= 1, got 10.5"),
    (lambda: SPARC(5, mixture_interests=1.5), "mixture_interests must be an integer >= 0, got 1.5"),
    (lambda: SPARC(5, codeword_query_rate="0.5"), "codeword_query_rate must be a number in [0.0, 1.0], got '0.5'"),
    (lambda: SPARC(5, detach_interests="no", backbone_loss_weight=1.0),
     "detach_interests must be true or false, got 'no'"),
    (lambda: T2Diff(5, backbone="sasrec", backbone_blocks=1.5), "backbone_blocks must be an integer >= 1, got 1.5"),
    (lambda: T2Diff(5, session_length=5.5), "session_length must be an integer >= 1, got 5.5"),
    (lambda: T2Diff(5, history_length=20.5), "history_length must be an integer >= 1, got 20.5"),
    (lambda: T2Diff(5, diffusion_steps=50.5), "diffusion_steps must be an integer >= 1, got 50.5"),
    (lambda: T2Diff(5, sampling_steps="5"), "sampling_steps must be an integer >= 1, got '5'"),
    (lambda: T2Diff(5, prior_drift_rate="0.5"), "prior_drift_rate must be a number in [0.0, 1.0], got '0.5'"),
    (lambda: T2Diff(5, stop_gradient="no"), "stop_gradient must be true or false, got 'no'"),
    (lambda: T2Diff(5, condition_on_backbone="no"), "condition_on_backbone must be true or false, got 'no'"),
    (lambda: T2Diff(5, backbone="sasrec", detach_branch=True, backbone_loss_weight="1"),
     "backbone_loss_weight must be a number in [0.0, inf), got '1'"),
])
def test_model_constructors_name_the_bad_argument(build, message):
    """The models' own arguments, checked by hand before: floats were truncated
    (num_query_tokens=2.5 -> 2, session_length=5.5 -> 5), "no" was taken as True, and strings
    failed with a TypeError from a comparison (or embedding_dim % K) that named no argument."""
    _raises(build, message)


def _x(*shape):
    return tf.random.normal(shape)


def _mask(*shape):
    return tf.ones(shape, tf.bool)


@pytest.mark.parametrize("call, message", [
    (lambda: SASRecEncoder(10)(_x(2, 8), _mask(2, 8)), "item_embeddings must be [B, L, d], got shape (2, 8)"),
    (lambda: SASRecEncoder(10)(_x(2, 5, 8), _mask(2, 4)),
     "padding_mask must be [B, L] like the first two axes of item_embeddings, got shapes (2, 4) and (2, 5, 8)"),
    (lambda: CausalTransformerBlock()(_x(2, 8), _mask(2, 8)), "inputs must be [B, L, d], got shape (2, 8)"),
    (lambda: MeanPoolingEncoder()(_x(2, 8), _mask(2, 8)), "item_embeddings must be [B, L, d], got shape (2, 8)"),
    (lambda: TargetAttention()(_x(2, 3, 8), _x(2, 5, 8), _mask(2, 5)), "mask must be [B, Q, L], got shape (2, 5)"),
    (lambda: MixedAttention()(_x(2, 4, 8), _mask(2, 4), _x(2, 8), _x(2, 6, 8), _mask(2, 5)),
     "history_mask must be [B, H] like the first two axes of history, got shapes (2, 5) and (2, 6, 8)"),
    (lambda: DriftDenoiser("mlp", (8,))(_x(2, 8), tf.constant(3), _x(2, 3, 8), _mask(2, 3)),
     "steps must be [B], got shape ()"),
])
def test_wrong_rank_inputs_name_the_argument(call, message):
    """They failed inside a TensorFlow op, naming no argument: "Incompatible shapes [Op:AddV2]",
    an Einsum rank error, or an error from the attention's softmax."""
    _raises(call, message)


SCHEDULE = NoiseSchedule("linear", 10)
Z = tf.ones([2, 4])


@pytest.mark.parametrize("call, message", [
    (lambda: SCHEDULE.q_sample(Z, tf.constant([1, 11]), Z), "steps must be in [1, T=10], got 11"),
    (lambda: SCHEDULE.q_sample(Z, tf.constant([0, 3]), Z), "steps must be in [1, T=10], got 0"),
    (lambda: SCHEDULE.ddpm_step(Z, Z, [12, 1], Z), "steps must be in [1, T=10], got 12"),
    (lambda: SCHEDULE.ddim_step(Z, Z, tf.constant([5, 5]), tf.constant([-1, 2])),
     "previous_steps must be in [0, T=10], got -1"),
    (lambda: SCHEDULE.ddim_timesteps(2.5), "num_sampling_steps must be an integer, got 2.5"),
    (lambda: DriftDenoiser("mlp", (8,))(_x(2, 8), tf.constant([1, 2]), _x(2, 3, 6), _mask(2, 3)),
     "session items must be as wide as noisy: session is 6 wide"),
    (lambda: DriftDenoiser("unet", (8, 16), step_embedding_dim=8)(_x(2, 8), tf.constant([1, 2]), _x(2, 3, 6),
                                                                  _mask(2, 3)),
     "session items must be as wide as noisy: session is 6 wide"),
])
def test_diffusion_steps_and_widths_are_checked(call, message):
    """A step past T failed as "indices[1] = 11 is not in [0, 11) [Op:GatherV2]" and step 0
    returned the clean input; ddim_timesteps(2.5) raised "'float' object cannot be interpreted
    as an integer"; the MLP denoiser ran on a session narrower than z_s."""
    _raises(call, message)
