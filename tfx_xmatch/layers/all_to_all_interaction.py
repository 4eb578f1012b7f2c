"""AllToAllInteraction: one shared network scores every (query token, item) pair."""

from __future__ import annotations

from typing import Optional, Sequence

import functools

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.sublayers import build_sublayer


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class AllToAllInteraction(tf.keras.layers.Layer):
    """Scores (query token, item) pairs from the token and all of the item's tokens.

    Unlike a dot product, the score E(q, i) is an MLP over ``[q ; item tokens]`` (the item's id
    embedding and each feature embedding), so query and item features interact freely. An
    optional bilinear term ``(q W) . id_token`` is added, which makes a dot-product model a
    special case and eases early training.

    Every query row is scored against every item row ("all pairs"). The first MLP layer is
    linear in the concatenation, so it is computed as ``q A + items B`` and broadcast to the
    [P, I, H] pair grid: the per-pair cost is the hidden layers only, which is what makes
    scoring a whole codebook against a whole catalogue per training step affordable.

    Args:
      hidden_units: Widths of the MLP's hidden ReLU layers (sequence of int, default (64,)).
        At least one.
      bilinear: Add the bilinear term (bool, default True).
      num_item_tokens: T, tokens per item (int >= 1), or None (default) to learn it at the first
        call. Given, ``build`` creates every weight, so a saved model that never scored an item
        before it was saved restores them instead of re-initialising them at the first call.

    Call args:
      query_tokens: float [P, d] query (or code) tokens.
      item_tokens: float [I, T, d] tokens of I items (T tokens each, e.g. from
        ``ItemTower.tokens``).

    Returns:
      float [P, I] pre-activation pair scores E(q, i).

    Raises:
      ValueError: On invalid hyperparameters (named, with the value: ``hidden_units`` empty or
        holding a width that is not an integer >= 1, included), inputs of the wrong rank, or
        query and item tokens of different widths.

    Example:
      >>> interaction = AllToAllInteraction(hidden_units=(32,))
      >>> interaction(tf.random.normal([4, 8]), tf.random.normal([10, 2, 8])).shape
      TensorShape([4, 10])
    """

    def __init__(self, hidden_units: Sequence[int] = (64,), bilinear: bool = True,
                 num_item_tokens: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = arguments.widths("hidden_units", hidden_units, allow_empty=False)
        self.bilinear = arguments.boolean("bilinear", bilinear)
        self.num_item_tokens = arguments.optional_integer("num_item_tokens", num_item_tokens, 1)

    def build(self, input_shape=None):
        """Builds the sublayers; ``input_shape`` is the query tokens' [P, d] (d must be known)."""
        width = None if input_shape is None else tf.TensorShape(input_shape)[-1]
        if self.bilinear and width is None:
            raise ValueError(f"{self.name} needs the query tokens' width, got input shape {input_shape}")
        first = self.hidden_units[0]
        # Sublayers take this layer's dtype policy (Keras gives them the global one otherwise).
        dense = functools.partial(tf.keras.layers.Dense, dtype=self.dtype_policy)
        self.query_projection = dense(first, use_bias=True, name="query_projection")
        self.item_projection = dense(first, use_bias=False, name="item_projection")
        self.hidden_layers = [
            dense(units, activation="relu", name=f"hidden_{i + 1}")
            for i, units in enumerate(self.hidden_units[1:])
        ]
        self.output_layer = dense(1, name="output")
        if self.bilinear:
            # Query and item tokens share the width d.
            self.bilinear_projection = dense(int(width), use_bias=False, name="bilinear")
        if width is not None and self.num_item_tokens is not None:
            build_sublayer(self.query_projection, [None, int(width)])
            build_sublayer(self.item_projection, [None, self.num_item_tokens * int(width)])
            units = first
            for layer in self.hidden_layers:
                build_sublayer(layer, [None, None, units])
                units = layer.units
            build_sublayer(self.output_layer, [None, None, units])
            if self.bilinear:
                build_sublayer(self.bilinear_projection, [None, int(width)])
        super().build(input_shape)

    def call(self, query_tokens: tf.Tensor, item_tokens: tf.Tensor) -> tf.Tensor:
        query_tokens = tf.convert_to_tensor(query_tokens)
        item_tokens = tf.convert_to_tensor(item_tokens)
        if item_tokens.dtype.is_floating:  # Keras casts only the first argument to the layer's dtype
            item_tokens = tf.cast(item_tokens, self.compute_dtype)
        if query_tokens.shape.rank != 2:
            raise ValueError(f"query_tokens must be [P, d], got shape {query_tokens.shape}")
        if item_tokens.shape.rank != 3:
            raise ValueError(f"item_tokens must be [I, T, d], got shape {item_tokens.shape}")
        num_tokens, width = item_tokens.shape[1], item_tokens.shape[2]
        if None not in (num_tokens, self.num_item_tokens) and num_tokens != self.num_item_tokens:
            raise ValueError(f"item_tokens hold {num_tokens} tokens per item but {self.name} was built for "
                             f"num_item_tokens={self.num_item_tokens}, got shape {item_tokens.shape}")
        if None not in (width, query_tokens.shape[1]) and width != query_tokens.shape[1]:
            raise ValueError(f"query tokens [P, d] and item tokens [I, T, d] must share d, got shapes "
                             f"{query_tokens.shape} and {item_tokens.shape}")
        flat_items = tf.reshape(item_tokens, [-1, num_tokens * width])
        hidden = tf.nn.relu(
            self.query_projection(query_tokens)[:, tf.newaxis, :]
            + self.item_projection(flat_items)[tf.newaxis, :, :]
        )
        for layer in self.hidden_layers:
            hidden = layer(hidden)
        scores = tf.squeeze(self.output_layer(hidden), axis=-1)
        if self.bilinear:
            scores += tf.matmul(self.bilinear_projection(query_tokens), item_tokens[:, 0, :], transpose_b=True)
        return scores

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(hidden_units=list(self.hidden_units), bilinear=self.bilinear,
                      num_item_tokens=self.num_item_tokens)
        return config
