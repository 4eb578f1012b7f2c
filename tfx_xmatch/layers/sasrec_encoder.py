"""SASRecEncoder: causal self-attention over a history of item embeddings."""

from __future__ import annotations

import tensorflow as tf

from tfx_xmatch import arguments
from tfx_xmatch.layers.causal_transformer_block import CausalTransformerBlock
from tfx_xmatch.layers.shapes import require_rank, require_sequence_mask


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class SASRecEncoder(tf.keras.layers.Layer):
    """Encodes every prefix of a left-padded history (Kang & McAuley, 2018).

    Output position t summarises items 0..t, so training can ask every position to predict
    the next item, and the last position is the user's representation at serving time.

    Args:
      max_length: Window length L (int >= 1); position embeddings have L rows, and histories may
        be shorter (the most recent rows are used) but not longer.
      num_blocks: Number of CausalTransformerBlocks (int >= 1, default 2).
      num_heads: Attention heads per block (int >= 1, default 1); must divide the width d.
      dropout: Dropout rate (float in [0, 1), default 0.2).

    Call args:
      item_embeddings: float [B, L, d] embeddings of the history items.
      padding_mask: bool [B, L], True where there is a real item.
      training: Python bool.
      last_position_only: Python bool (default False). Return the last position alone, float
        [B, 1, d], equal to the last row of the full output: what serving reads. The blocks
        before the last still encode every position (the last one attends to them); the last
        block computes one query instead of L, which takes about a third off the encoder's
        time (ML-1M sizes, 2 blocks over 200 items).

    Returns:
      float [B, L, d], or [B, 1, d] with ``last_position_only``.

    Raises:
      ValueError: On invalid hyperparameters (named, with the value); at call time, on item
        embeddings that are not [B, L, d], a padding mask that is not [B, L], or histories
        known to be longer than ``max_length``.
      tf.errors.InvalidArgumentError: At run time, on histories longer than ``max_length``
        whose length was not known when the call was traced.

    Example:
      >>> encoder = SASRecEncoder(max_length=6, num_blocks=1, dropout=0.0)
      >>> encoder(tf.random.normal([2, 6, 8]), tf.ones([2, 6], tf.bool)).shape
      TensorShape([2, 6, 8])
      >>> encoder(tf.random.normal([2, 6, 8]), tf.ones([2, 6], tf.bool), last_position_only=True).shape
      TensorShape([2, 1, 8])
    """

    def __init__(self, max_length: int, num_blocks: int = 2, num_heads: int = 1, dropout: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.max_length = arguments.integer("max_length", max_length, 1)
        self.num_blocks = arguments.integer("num_blocks", num_blocks, 1)
        self.num_heads = arguments.integer("num_heads", num_heads, 1)
        self.dropout = arguments.real("dropout", dropout, 0.0, 1.0, high_open=True)

    def build(self, input_shape):
        require_rank("item_embeddings", input_shape, "[B, L, d]")
        width = int(input_shape[-1])
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(self.max_length, width),
            initializer="glorot_uniform",
        )
        self.input_dropout = tf.keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.blocks = [
            CausalTransformerBlock(self.num_heads, dropout=self.dropout, name=f"block_{i}", dtype=self.dtype_policy)
            for i in range(self.num_blocks)
        ]
        self.output_norm = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="output_norm", dtype=self.dtype_policy)
        super().build(input_shape)

    def call(self, item_embeddings: tf.Tensor, padding_mask: tf.Tensor, training: bool = False,
             last_position_only: bool = False) -> tf.Tensor:
        padding_mask = tf.convert_to_tensor(padding_mask)
        require_rank("item_embeddings", item_embeddings, "[B, L, d]")
        require_sequence_mask("padding_mask", padding_mask, "item_embeddings", item_embeddings)
        width = tf.cast(tf.shape(item_embeddings)[-1], item_embeddings.dtype)
        length = tf.shape(item_embeddings)[1]
        # A longer history would slice the table from a negative start: one row broadcast to
        # every position, or a shape error that does not say why.
        static_length = item_embeddings.shape[1]
        if static_length is not None and static_length > self.max_length:
            raise ValueError(f"histories are {static_length} positions long, more than max_length={self.max_length}; "
                             "keep the most recent max_length items (pad_histories does)")
        if static_length is None:
            tf.debugging.assert_less_equal(length, self.max_length,
                                           message=f"histories are longer than max_length={self.max_length}")
        # Histories are left-padded, so the last rows of the table always mean "most recent".
        positions = self.position_embedding[self.max_length - length:]
        mask = tf.cast(padding_mask, item_embeddings.dtype)[..., tf.newaxis]
        hidden = (item_embeddings * tf.sqrt(width) + tf.cast(positions, item_embeddings.dtype)) * mask
        hidden = self.input_dropout(hidden, training=training)
        for block in self.blocks[:-1]:
            hidden = block(hidden, padding_mask, training=training)
        # Only when asked: a subclass's own block type need not take the argument.
        last_block_options = {"last_position_only": True} if last_position_only else {}
        hidden = self.blocks[-1](hidden, padding_mask, training=training, **last_block_options)
        return self.output_norm(hidden) * (mask[:, -1:] if last_position_only else mask)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            max_length=self.max_length,
            num_blocks=self.num_blocks,
            num_heads=self.num_heads,
            dropout=self.dropout,
        )
        return config
