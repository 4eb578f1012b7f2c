"""ItemTower: item id embedding plus optional dense item features."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch import arguments


@tf.keras.utils.register_keras_serializable(package="tfx_xmatch")
class ItemTower(tf.keras.layers.Layer):
    """Embeds item indices from an id table and optional per-item feature tables.

    Feature tables (e.g. multi-hot genres) are data, not hyperparameters: they are kept in
    non-trainable variables so checkpoints and SavedModels carry them, and ``get_config`` only
    records their widths.

    Args:
      num_items: Number of real items (int >= 1); index 0 is padding, so tables have
        num_items + 1 rows.
      embedding_dim: Output width (int >= 1).
      feature_dims: Width of each item feature table (dict of str to int >= 1), e.g.
        ``{"genres": 18}``. Default none.
      feature_tables: Initial values of those tables, ``{name: float array [num_items + 1,
        width]}``, finite. Default zeros (values then come from a checkpoint).
      hidden_units: Widths of an optional MLP applied after the sum of embeddings (sequence of
        int >= 1); the last layer is linear with ``embedding_dim`` units. Default none (no MLP).
      l2: L2 penalty on the id embedding (float >= 0, default 0).

    Call args:
      item_indices: int [...] item indices in 0..num_items (0 is padding).

    Returns:
      float [..., embedding_dim]: the id embedding plus the projected features, through the
      MLP if there is one.

    Raises:
      ValueError: On invalid hyperparameters (named, with the value), a feature table without
        a width in ``feature_dims``, of another shape than [num_items + 1, width], or holding a
        NaN or infinite value.
      tf.errors.InvalidArgumentError: When called on an index outside [0, num_items], naming
        the smallest and largest index given (not checked under XLA, which drops assertions).

    Example:
      >>> tower = ItemTower(num_items=100, embedding_dim=8)
      >>> tower(tf.constant([1, 2])).shape
      TensorShape([2, 8])
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int,
        feature_dims: Optional[dict[str, int]] = None,
        feature_tables: Optional[dict[str, np.ndarray]] = None,
        hidden_units: Sequence[int] = (),
        l2: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_items = arguments.integer("num_items", num_items, 1)
        self.embedding_dim = arguments.integer("embedding_dim", embedding_dim, 1)
        for name, value in (("feature_dims", feature_dims), ("feature_tables", feature_tables)):
            # Duck-typed: a model hands over the dict Keras tracks, a wrapper that is no Mapping.
            # The message names the type, not the value: a table's repr runs to thousands of numbers.
            if value is not None and not callable(getattr(value, "items", None)):
                raise ValueError(f"{name} must be a dict keyed by feature name, got a {type(value).__name__}")
        self.feature_dims = {str(k): arguments.integer(f"feature_dims[{k!r}]", v, 1)
                             for k, v in (feature_dims or {}).items()}
        self.hidden_units = arguments.widths("hidden_units", hidden_units)
        # A negative weight would reward large embeddings through the regularization loss.
        self.l2 = arguments.real("l2", l2, 0.0)
        self._initial_tables = dict(feature_tables or {})
        for name, table in self._initial_tables.items():
            if name not in self.feature_dims:
                raise ValueError(f"item feature table {name!r} has no width in feature_dims={self.feature_dims}; "
                                 f"add {name!r} to feature_dims")
            expected = (self.num_items + 1, self.feature_dims[name])
            if tuple(np.shape(table)) != expected:
                raise ValueError(
                    f"item feature table {name!r} has shape {np.shape(table)}, expected "
                    f"{expected} from num_items={self.num_items} and feature_dims={self.feature_dims}"
                )
            # One NaN feature value made the loss NaN at the first step, and every weight after it.
            finite = np.isfinite(np.asarray(table))
            if not finite.all():
                row, column = (int(i) for i in np.argwhere(~finite)[0])
                raise ValueError(f"item feature table {name!r} must be finite; row {row} (item index {row}) holds "
                                 f"{np.asarray(table)[row, column]} in column {column}")

    def build(self, input_shape):
        self.id_embedding = tf.keras.layers.Embedding(
            self.num_items + 1,
            self.embedding_dim,
            embeddings_initializer="glorot_uniform",
            embeddings_regularizer=tf.keras.regularizers.l2(self.l2) if self.l2 else None,
            name="id_embedding", dtype=self.dtype_policy,
        )
        self.feature_tables = {}
        self.feature_projections = {}
        for name, width in sorted(self.feature_dims.items()):
            initial = self._initial_tables.get(name)
            self.feature_tables[name] = self.add_weight(
                name=f"{name}_table",
                shape=(self.num_items + 1, width),
                initializer=(
                    tf.keras.initializers.Constant(np.asarray(initial, np.float32))
                    if initial is not None
                    else "zeros"
                ),
                trainable=False,
            )
            self.feature_projections[name] = tf.keras.layers.Dense(
                self.embedding_dim, use_bias=False, name=f"{name}_projection", dtype=self.dtype_policy
            )
        self.mlp = [
            tf.keras.layers.Dense(units, activation="relu", name=f"mlp_{i}", dtype=self.dtype_policy)
            for i, units in enumerate(self.hidden_units)
        ]
        if self.mlp:
            self.mlp.append(tf.keras.layers.Dense(self.embedding_dim, name="mlp_out", dtype=self.dtype_policy))
        super().build(input_shape)

    def call(self, item_indices: tf.Tensor) -> tf.Tensor:
        item_indices = self._checked_indices(item_indices)
        embeddings = self.id_embedding(item_indices)
        for name, table in self.feature_tables.items():
            features = tf.gather(table, item_indices)
            embeddings += self.feature_projections[name](features)
        for layer in self.mlp:
            embeddings = layer(embeddings)
        return embeddings

    def tokens(self, item_indices: tf.Tensor) -> tf.Tensor:
        """The item's separate tokens, id embedding first, then one per feature table.

        Cross-interaction models (e.g. SparCode) attend over these instead of their sum.

        Args:
          item_indices: int [...] item indices.

        Returns:
          float [..., 1 + number of feature tables, embedding_dim].
        """
        item_indices = tf.convert_to_tensor(item_indices)
        if not self.built:
            self.build(item_indices.shape)
        item_indices = self._checked_indices(item_indices)
        tokens = [self.id_embedding(item_indices)]
        for name, table in self.feature_tables.items():
            tokens.append(self.feature_projections[name](tf.gather(table, item_indices)))
        return tf.stack(tokens, axis=-2)

    def _checked_indices(self, item_indices: tf.Tensor) -> tf.Tensor:
        """The indices, once each is known to be in [0, num_items]: past the table, a CPU gather
        fails with a bare "indices[3,2] = 45 is not in [0, 41)" and a GPU one reads zeros,
        silently, so a wrong vocabulary would train on and serve nonsense."""
        item_indices = tf.convert_to_tensor(item_indices)
        if not item_indices.dtype.is_integer:
            return item_indices  # the embedding lookup names the dtype
        return checked_item_indices(item_indices, self.num_items, f"{self.name}: item indices")

    def all_items(self) -> tf.Tensor:
        """Embeddings of every item index, padding included: [num_items + 1, embedding_dim]."""
        return self(tf.range(self.num_items + 1))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_items=self.num_items,
            embedding_dim=self.embedding_dim,
            feature_dims=dict(self.feature_dims),
            hidden_units=list(self.hidden_units),
            l2=self.l2,
        )
        return config


def checked_item_indices(item_indices: tf.Tensor, num_items: int, what: str, hint: str = "") -> tf.Tensor:
    """``item_indices`` (an integer tensor), once every one is known to be in [0, num_items].

    Values known when traced (eager tensors, constants such as a ``tf.range``) are checked here,
    once, in Python; other values get a stock ``Assert`` op (no custom op, so TF Serving loads
    it), which XLA (``jit_compile``) drops like every assertion.

    Args:
      item_indices: int tensor of any shape.
      num_items: The number of real items (int); 0 is padding.
      what: What the indices are, leading the error, e.g. "items: item indices".
      hint: What to do about it, ending the error (default none).

    Returns:
      ``item_indices``, behind the check.

    Raises:
      tf.errors.InvalidArgumentError: An index is negative or past ``num_items``; the message
        names ``what``, the valid range and the smallest and largest index given.
    """
    message = (f"{what} must be in [0, {num_items}] (0 is padding, num_items={num_items}), "
               "got indices from")
    known = tf.get_static_value(item_indices)
    if known is not None:
        if known.size and (known.min() < 0 or known.max() > num_items):
            raise tf.errors.InvalidArgumentError(None, None, f"{message} {known.min()} to {known.max()}"
                                                             + (f"; {hint}" if hint else ""))
        return item_indices
    smallest, largest = tf.reduce_min(item_indices), tf.reduce_max(item_indices)
    in_range = tf.logical_or(
        tf.equal(tf.size(item_indices), 0),  # no rows: the reductions give the dtype's extremes
        tf.logical_and(smallest >= 0, largest <= tf.cast(num_items, item_indices.dtype)),
    )
    check = tf.debugging.Assert(in_range, [message, smallest, "to", largest] + ([hint] if hint else []))
    with tf.control_dependencies([check]):
        return tf.identity(item_indices)
