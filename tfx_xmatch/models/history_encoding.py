"""What every sequence retrieval model shares: encoding histories, the logQ item frequencies and
the dot-product softmax over the catalogue."""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch.layers.item_tower import checked_item_indices


def history_indices(inputs: dict) -> tf.Tensor:
    """``inputs["history"]`` as ``item_indices``, refused unless it is [batch, length]: one user's
    unbatched history [L] was embedded as a batch of L and refused as "histories are d
    positions long" (d the embedding width).

    Raises:
      TypeError, tf.errors.InvalidArgumentError: as ``item_indices``.
      ValueError: its rank is known and is not 2.
    """
    history = item_indices("history", inputs["history"])
    if history.shape.rank is not None and history.shape.rank != 2:
        raise ValueError(f"input 'history' must be item indices of shape [batch, length], got shape "
                         f"{tuple(history.shape)}; batch a single history as [1, length]")
    return history


def item_indices(name: str, value, vocabulary: str = "item") -> tf.Tensor:
    """``value`` as a tensor of integer indices, refused naming the input otherwise: a float
    history was truncated (3.9 read as item 3) and a string one failed deep in a layer.

    Floats holding whole numbers pass, cast to int32, as Keras' Embedding takes them: Keras
    builds a model loaded from a ``.keras`` file by calling it on float placeholders.

    Raises:
      TypeError: as ``check_index_dtype``.
      tf.errors.InvalidArgumentError: a float value is not a whole number (NaN included), when
        the check runs.
    """
    tensor = check_index_dtype(name, value, vocabulary)
    if tensor.dtype.is_integer:
        return tensor
    whole = tf.debugging.assert_equal(tf.math.floor(tensor), tensor,
                                      message=f"input {name} must hold integer indices, but a value has a fraction")
    with tf.control_dependencies([whole]):
        return tf.cast(tensor, tf.int32)


def check_index_dtype(name: str, value, vocabulary: str = "item") -> tf.Tensor:
    """``value`` as a tensor, when its dtype can hold indices (an integer or a float one).

    ``vocabulary`` names, in the error, whose vocabulary maps raw values to indices.

    Raises:
      TypeError: ``value`` is neither of an integer nor of a float dtype, or is ragged or sparse.
    """
    if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
        # A tf.data pipeline of variable-length sequences (ragged_batch) fed as it is failed with
        # "object of type 'RaggedTensor' has no len()". Which end to pad and which items to keep
        # past max_length are the data's choice, so they are not guessed here.
        if vocabulary != "item":  # a user feature, e.g. a VarLenFeature parsed as sparse
            raise TypeError(f"input {name!r} is a {type(value).__name__}, but a user feature takes one index per "
                            "row, dense int [batch] (0 for unknown)")
        raise TypeError(f"input {name!r} is a {type(value).__name__}, but the models take dense [batch, length] "
                        "item indices, left-padded with 0 (the most recent item last); pad it first, e.g. "
                        "tfx_xmatch.data.tfrecord.left_pad_ragged(values, max_length), as the input pipelines "
                        "of tfx_xmatch.data do")
    tensor = tf.convert_to_tensor(value)
    if not (tensor.dtype.is_integer or tensor.dtype.is_floating):
        # Only item ids have an in-graph vocabulary in the export; a user feature is served as
        # its index too.
        where = "the export's signatures take raw item ids" if vocabulary == "item" else "the export takes the index too"
        raise TypeError(f"input {name!r} must hold integer indices (int32 or int64), got {tensor.dtype.name}; "
                        f"map raw values to indices with the {vocabulary} vocabulary ({where})")
    return tensor


def user_feature_values(name: str, inputs: dict, known: Sequence[str]) -> tf.Tensor:
    """The user feature ``name`` of ``inputs`` as int [B]; [B, 1] (TFRS's and tf.data's usual
    shape for a scalar feature) is squeezed. It was embedded as [B, 1, d], which broadcast
    against the history positions or against the other users of the batch.

    Raises:
      KeyError: ``inputs`` lacks the feature.
      TypeError: it is not of an integer dtype.
      ValueError: its shape is neither [B] nor [B, 1].
    """
    if name not in inputs:
        raise KeyError(f"input {name!r} is missing: the model was built with user features {sorted(known)}")
    values = item_indices(name, inputs[name], vocabulary=f"user feature {name!r}")
    if values.shape.rank == 2 and values.shape[1] == 1:
        return tf.squeeze(values, axis=1)
    if values.shape.rank is None or (values.shape.rank == 2 and values.shape[1] is None):
        # Traced without a shape (Dataset.from_generator, padded_batch): checked when it runs.
        rank = tf.rank(values)
        fits = tf.logical_and(tf.logical_or(tf.equal(rank, 1), tf.equal(rank, 2)),
                              tf.equal(tf.reduce_prod(tf.shape(values)[1:]), 1))
        # No quotes: TensorFlow's assertion text escapes them.
        check = tf.debugging.Assert(fits, [f"user feature {name} must have shape [batch] (or [batch, 1]), got shape",
                                           tf.shape(values)])
        with tf.control_dependencies([check]):
            return tf.reshape(values, [-1])
    if values.shape.rank != 1:
        raise ValueError(f"user feature {name!r} must have shape [batch] (or [batch, 1]), got shape {values.shape}")
    return values


def encode_history(item_tower, encoder, user_feature_embeddings: dict, inputs: dict,
                   training: bool = False, last_position_only: bool = False) -> tf.Tensor:
    """Encodes every history position, adding user-feature embeddings: float [B, L, d].

    With ``last_position_only`` it returns the last position alone, float [B, 1, d], computed
    by the encoder's ``last_position_only`` path when its ``call`` has one (ours do), else cut
    from the full output.

    Raises:
      KeyError: A user feature the model was built with is missing from ``inputs``.
      TypeError, ValueError: As ``item_indices`` and ``user_feature_values``.
    """
    history = history_indices(inputs)
    padding_mask = history > 0
    embedded = item_tower(history)
    if last_position_only and "last_position_only" in inspect.signature(encoder.call).parameters:
        encoded = encoder(embedded, padding_mask, training=training, last_position_only=True)
    else:
        encoded = encoder(embedded, padding_mask, training=training)
        encoded = encoded[:, -1:] if last_position_only else encoded
    # Under a mixed policy the encoder computes in float16; the model goes on in the tower's dtype.
    encoded = tf.cast(encoded, embedded.dtype)
    if last_position_only:
        padding_mask = padding_mask[:, -1:]
    for name, embedding in user_feature_embeddings.items():
        user_vector = embedding(user_feature_values(name, inputs, list(user_feature_embeddings)))[:, tf.newaxis, :]
        encoded += user_vector * tf.cast(padding_mask, encoded.dtype)[..., tf.newaxis]
    return encoded


def last_position_state(encode_sequence, inputs: dict, training: bool = False) -> tf.Tensor:
    """The state after each user's most recent item, float [B, d], from a model's
    ``encode_sequence``: through its ``last_position_only`` path when it takes one, so only that
    position's last block is computed; a subclass's own ``encode_sequence`` without it is
    called as written and its last position read, so its override still decides the state.
    """
    if "last_position_only" in inspect.signature(encode_sequence).parameters:
        return encode_sequence(inputs, training=training, last_position_only=True)[:, -1, :]
    return encode_sequence(inputs, training=training)[:, -1, :]


class LossDraws:
    """The random draws of one loss computation: the usual random ops when training, stateless
    draws from a fixed seed when not, so ``evaluate`` on the same data reports the same loss
    (with stateful ops the validation loss of a SPARC or T2Diff moved between two identical
    calls: other positions, diffusion steps and noise).

    Args:
      training: Whether the loss trains (bool).
      seed: Seed of the evaluation draws (int, default 0). Each draw of the computation takes the
        next counter value, so draws differ from one another but not from call to call.
    """

    def __init__(self, training: bool, seed: int = 0):
        self.training = bool(training)
        self.seed = int(seed)
        self._counter = 0

    def _next_seed(self) -> list[int]:
        self._counter += 1
        return [self.seed, self._counter]

    def uniform(self, shape, minval=0, maxval=None, dtype=tf.float32) -> tf.Tensor:
        """As ``tf.random.uniform``; integer dtypes need ``maxval``."""
        if maxval is None and not dtype.is_integer:
            maxval = 1
        if self.training:
            return tf.random.uniform(shape, minval, maxval, dtype=dtype)
        return tf.random.stateless_uniform(shape, self._next_seed(), minval, maxval, dtype=dtype)

    def normal(self, shape) -> tf.Tensor:
        """As ``tf.random.normal``."""
        if self.training:
            return tf.random.normal(shape)
        return tf.random.stateless_normal(shape, self._next_seed())

    def shuffle(self, values: tf.Tensor) -> tf.Tensor:
        """As ``tf.random.shuffle`` (along the first axis)."""
        if self.training:
            return tf.random.shuffle(values)
        order = tf.argsort(tf.random.stateless_uniform(tf.shape(values)[:1], self._next_seed()))
        return tf.gather(values, order)

    def categorical(self, logits: tf.Tensor, num_samples: int, dtype=tf.int64) -> tf.Tensor:
        """As ``tf.random.categorical``."""
        if self.training:
            return tf.random.categorical(logits, num_samples, dtype=dtype)
        return tf.random.stateless_categorical(logits, num_samples, self._next_seed(), dtype=dtype)


def training_targets(inputs: dict, num_items: int) -> tf.Tensor:
    """``inputs["next_items"]`` (int [B, L], 0 = no target), checked to hold a target and to
    index the catalogue of ``num_items`` items.

    A batch without a target has nothing to learn from, and every loss would be a mean over
    nothing: NaN, which ``fit`` would apply to the weights, or a failure deep in a layer that does
    not say why. A target past the catalogue failed as a bare "Received a label value of 25 which
    is outside the valid range" on CPU and trained on NaN on a GPU; a negative one was skipped
    as padding. Both are refused here instead, naming the input. Under XLA (``jit_compile``),
    which drops assertions, neither is checked: a target past the catalogue then trains NaN
    into the weights, as it would without this check.

    Raises:
      KeyError: ``inputs`` has no "next_items".
      tf.errors.InvalidArgumentError: every entry is 0, or one is negative or past
        ``num_items`` (raised when the check runs: at once in eager mode, at the step inside
        ``fit``).
    """
    if "next_items" not in inputs:
        raise KeyError(f"the loss needs the input 'next_items' (the item after each history position); "
                       f"got inputs {sorted(inputs)}")
    next_items = checked_item_indices(
        item_indices("next_items", inputs["next_items"]), num_items, "input next_items: target item indices",
        hint="map the targets through the item vocabulary the model was built with")
    has_target = tf.debugging.assert_greater(
        tf.reduce_max(tf.concat([tf.reshape(next_items, [-1]), tf.zeros([1], next_items.dtype)], 0)),
        tf.zeros([], next_items.dtype),
        message="a batch has no target: every next_items entry is 0 (padding), so there is no loss to "
                "compute; drop such examples (histories of a single item) before batching")
    with tf.control_dependencies([has_target]):
        return tf.identity(next_items)


def frozen_tower(item_tower):
    """The item tower behind stop-gradient: a loss scored through it does not train the table."""
    return lambda item_indices: tf.stop_gradient(item_tower(item_indices))


def target_frequencies(counts: np.ndarray, num_items: int) -> np.ndarray:
    """Training counts per item index ([num_items + 1]) -> the sampling probability of the
    logQ correction (add-one smoothed, so unseen items keep a finite log q; padding 0).

    Raises:
      ValueError: ``counts`` has the wrong shape.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (num_items + 1,):
        raise ValueError(f"item counts have shape {counts.shape}, expected ({num_items + 1},)")
    smoothed = counts + 1.0
    smoothed[0] = 0.0
    return (smoothed / smoothed.sum()).astype(np.float32)


def dot_product_softmax_loss(users: tf.Tensor, targets: tf.Tensor, item_tower, *, num_items: int, loss: str,
                             temperature: float, num_sampled_negatives: int, max_loss_positions: int,
                             item_frequency: tf.Tensor, draws: Optional[LossDraws] = None) -> tf.Tensor:
    """Softmax cross-entropy of ``users`` [P, d] against their ``targets`` [P] (item indices).

    ``loss="full_softmax"``: over the whole catalogue. ``"sampled_softmax"``: at most
    ``max_loss_positions`` random positions, against their in-batch targets plus
    ``num_sampled_negatives`` uniform items (each candidate once), logQ-corrected with the
    probability that one draw of that mixed sampler yields the candidate. ``draws`` makes those
    draws (default: the usual random ops).
    """
    if loss == "full_softmax":
        logits = tf.matmul(users, item_tower(tf.range(1, num_items + 1)), transpose_b=True) / temperature
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets - 1, logits=logits))
    draws = draws or LossDraws(training=True)
    keep = draws.shuffle(tf.range(tf.shape(targets)[0]))[:max_loss_positions]
    users, targets = tf.gather(users, keep), tf.gather(targets, keep)
    extra = draws.uniform([num_sampled_negatives], 1, num_items + 1, dtype=targets.dtype)
    candidates, positions = tf.unique(tf.concat([targets, extra], axis=0))
    kept = tf.cast(tf.shape(targets)[0], tf.float32)
    log_q = tf.math.log((kept * tf.gather(item_frequency, candidates) + num_sampled_negatives / num_items)
                        / (kept + num_sampled_negatives))
    logits = tf.matmul(users, item_tower(candidates), transpose_b=True) / temperature - log_q
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=positions[: tf.shape(targets)[0]], logits=logits))
