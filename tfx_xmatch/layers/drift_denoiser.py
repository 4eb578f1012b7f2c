"""DriftDenoiser: predicts the clean drift z_0 from a noisy z_s, its step and the session."""

from __future__ import annotations

import functools
import math

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.shapes import require_rank, require_sequence_mask

ARCHITECTURES = ("unet", "mlp")


def sinusoidal_embedding(steps: tf.Tensor, width: int) -> tf.Tensor:
    """Transformer-style sinusoidal embedding of integer steps [B]: float [B, width] (width even)."""
    half = width // 2
    frequencies = tf.exp(-math.log(10000.0) * tf.range(half, dtype=tf.float32) / max(half - 1, 1))
    angles = tf.cast(steps, tf.float32)[:, tf.newaxis] * frequencies[tf.newaxis, :]
    return tf.concat([tf.sin(angles), tf.cos(angles)], axis=-1)


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class DriftDenoiser(tf.keras.layers.Layer):
    """The diffusion approximator of T2Diff: (z_s, s, session) -> z_0.

    ``unet`` (as in the official code): the sequence [session items ; z_s] is a 1-D signal with
    d channels; the step embedding (sinusoidal -> MLP) is added to every position; two
    convolution levels go down (stride 2) and come back up with skip connections; the output
    at the z_s position is projected to z_0. ``mlp``: the light option, an MLP over
    [z_s ; mean of the session ; last session item ; step embedding].

    Args:
      architecture: "unet" or "mlp" (default "unet").
      hidden_units: Channels of the U-Net levels (two) or widths of the MLP (one or more)
        (sequence of int >= 1, default (64, 128)).
      step_embedding_dim: Width of the sinusoidal step embedding (even int >= 2, default 64).

    Call args:
      noisy: float [B, d] z_s.
      steps: int [B] diffusion steps s.
      session: float [B, S, d] session item embeddings (zeros at padding), as wide as ``noisy``.
      session_mask: bool [B, S], True at real items.

    Returns:
      float [B, d]: the predicted z_0.

    Raises:
      ValueError: On invalid hyperparameters (named, with the value), or at call time on inputs
        of the wrong rank or a session of another width than ``noisy``.

    Example:
      >>> denoiser = DriftDenoiser("mlp", hidden_units=(32,))
      >>> denoiser(tf.zeros([2, 8]), tf.constant([1, 5]), tf.zeros([2, 3, 8]), tf.ones([2, 3], tf.bool)).shape
      TensorShape([2, 8])
    """

    def __init__(self, architecture: str = "unet", hidden_units=(64, 128), step_embedding_dim: int = 64, **kwargs):
        super().__init__(**kwargs)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        hidden_units = arguments.widths("hidden_units", hidden_units, allow_empty=False)
        if architecture == "unet" and len(hidden_units) != 2:
            raise ValueError(f"the unet has two levels: hidden_units needs two widths, got {hidden_units!r}")
        step_embedding_dim = arguments.integer("step_embedding_dim", step_embedding_dim, 2)
        if step_embedding_dim % 2:  # half sines, half cosines
            raise ValueError(f"step_embedding_dim must be an even integer >= 2, got {step_embedding_dim!r}")
        self.architecture = architecture
        self.hidden_units = hidden_units
        self.step_embedding_dim = step_embedding_dim

    def build(self, noisy_shape):
        require_rank("noisy", noisy_shape, "[B, d]")
        width = int(noisy_shape[-1])
        # Sublayers take this layer's dtype policy (Keras gives them the global one otherwise).
        dense = functools.partial(tf.keras.layers.Dense, dtype=self.dtype_policy)
        if self.architecture == "mlp":
            self.step_mlp = dense(self.step_embedding_dim, activation="swish", name="step_mlp")
            self.hidden = [dense(u, activation="swish", name=f"hidden_{i}") for i, u in enumerate(self.hidden_units)]
        else:
            low, high = self.hidden_units
            conv = functools.partial(tf.keras.layers.Conv1D, dtype=self.dtype_policy)
            self.step_mlp = dense(width, activation="swish", name="step_mlp")
            self.down_1 = conv(low, 3, padding="same", activation="swish", name="down_1")
            self.down_2 = conv(high, 3, strides=2, padding="same", activation="swish", name="down_2")
            self.middle = conv(high, 3, padding="same", activation="swish", name="middle")
            self.up = tf.keras.layers.Conv1DTranspose(low, 3, strides=2, padding="same", activation="swish", name="up",
                                                      dtype=self.dtype_policy)
            self.merge = conv(low, 3, padding="same", activation="swish", name="merge")
        self.output_layer = dense(width, name="output")
        super().build(noisy_shape)

    def call(self, noisy: tf.Tensor, steps: tf.Tensor, session: tf.Tensor, session_mask: tf.Tensor) -> tf.Tensor:
        session = tf.cast(session, self.compute_dtype)  # Keras casts only the first argument
        session_mask, steps = tf.convert_to_tensor(session_mask), tf.convert_to_tensor(steps)
        require_rank("noisy", noisy, "[B, d]")
        require_rank("steps", steps, "[B]")
        require_rank("session", session, "[B, S, d]")
        require_sequence_mask("session_mask", session_mask, "session", session, "[B, S]")
        # The MLP concatenates them feature-wise, so a session of another width ran silently (the
        # unet failed in a concat that names no argument).
        if None not in (noisy.shape[-1], session.shape[-1]) and noisy.shape[-1] != session.shape[-1]:
            raise ValueError(f"session items must be as wide as noisy: session is {session.shape[-1]} wide "
                             f"(shape {session.shape}), noisy {noisy.shape[-1]} (shape {noisy.shape})")
        if self.architecture == "unet":
            return self._unet(noisy, steps, session, session_mask)
        return self._mlp(noisy, steps, session, session_mask)

    def _mlp(self, noisy, steps, session, session_mask) -> tf.Tensor:
        step_embedding = self.step_mlp(sinusoidal_embedding(steps, self.step_embedding_dim))
        mask = tf.cast(session_mask, noisy.dtype)[..., tf.newaxis]
        mean = tf.reduce_sum(session * mask, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1.0)
        hidden = tf.concat([noisy, mean, session[:, -1, :], step_embedding], axis=-1)
        for layer in self.hidden:
            hidden = layer(hidden)
        return self.output_layer(hidden)

    def _unet(self, noisy, steps, session, session_mask) -> tf.Tensor:
        step_embedding = self.step_mlp(sinusoidal_embedding(steps, self.step_embedding_dim))
        mask = tf.cast(session_mask, noisy.dtype)[..., tf.newaxis]
        signal = tf.concat([session * mask, noisy[:, tf.newaxis, :]], axis=1) + step_embedding[:, tf.newaxis, :]
        batch, length = tf.shape(signal)[0], tf.shape(signal)[1]
        # TensorFlow's Conv1D gives an empty batch back with the input's channels, which the next
        # layer cannot add its bias to: an empty batch runs on one row of zeros, dropped after.
        signal = tf.concat([signal, tf.zeros(tf.stack([tf.cast(batch == 0, tf.int32), length,
                                                       tf.shape(signal)[2]]), signal.dtype)], axis=0)
        skip = self.down_1(signal)
        hidden = self.middle(self.down_2(skip))
        hidden = self.up(hidden)[:, :length, :]  # the transposed conv may add one position
        hidden = self.merge(tf.concat([hidden, skip], axis=-1))
        return self.output_layer(hidden[:batch, -1, :])

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(architecture=self.architecture, hidden_units=list(self.hidden_units),
                      step_embedding_dim=self.step_embedding_dim)
        return config
