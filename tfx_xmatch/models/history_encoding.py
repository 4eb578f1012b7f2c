"""What every sequence retrieval model shares: encoding histories and the logQ item frequencies."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def encode_history(item_tower, encoder, user_feature_embeddings: dict, inputs: dict,
                   training: bool = False) -> tf.Tensor:
    """Encodes every history position, adding user-feature embeddings: float [B, L, d].

    Raises:
      KeyError: A user feature the model was built with is missing from ``inputs``.
    """
    history = tf.convert_to_tensor(inputs["history"])
    padding_mask = history > 0
    encoded = encoder(item_tower(history), padding_mask, training=training)
    for name, embedding in user_feature_embeddings.items():
        if name not in inputs:
            raise KeyError(f"input {name!r} is missing: the model was built with user features "
                           f"{sorted(user_feature_embeddings)}")
        user_vector = embedding(tf.convert_to_tensor(inputs[name]))[:, tf.newaxis, :]
        encoded += user_vector * tf.cast(padding_mask, encoded.dtype)[..., tf.newaxis]
    return encoded


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
