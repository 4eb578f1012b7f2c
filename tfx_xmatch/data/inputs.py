"""tf.data input pipelines for training (every position predicts its next item) and evaluation.

Padded numpy arrays are built once and fed through ``from_tensor_slices``: cheaper than a
Python generator per epoch, and the pipeline stays serialisable and deterministic.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch.data.dataset import EvalExamples, check_user_feature_names, pad_histories


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _user_feature_columns(
    user_features: Optional[Mapping[str, np.ndarray]], user_rows: np.ndarray
) -> dict[str, np.ndarray]:
    """Looks up each user feature (indexed by dataset row) for the given rows, as int32."""
    columns: dict[str, np.ndarray] = {}
    check_user_feature_names(user_features or {})
    for name, values in (user_features or {}).items():
        values = np.asarray(values)
        if values.ndim != 1:
            raise ValueError(
                f"user feature {name!r} must be 1-D (one value per user), got shape {values.shape}"
            )
        if len(user_rows) and (user_rows.min() < 0 or user_rows.max() >= len(values)):
            raise ValueError(
                f"user row {int(user_rows.max())} is out of range for user feature {name!r} "
                f"with {len(values)} users"
            )
        columns[name] = values[user_rows].astype(np.int32)
    return columns


def training_arrays(
    sequences: Sequence[np.ndarray],
    *,
    max_length: int,
    user_rows: Optional[np.ndarray] = None,
    user_features: Optional[Mapping[str, np.ndarray]] = None,
) -> dict[str, np.ndarray]:
    """The numpy arrays behind :func:`sequence_training_dataset` (one row per sequence).

    Sequences with fewer than two items have no next-item pair and are left out.

    Args:
      sequences: Item-index sequences, oldest first.
      max_length: Width L of the rows; longer sequences keep their most recent part.
      user_rows: Dataset row of each sequence's user (to look up user features); None means
        sequence k belongs to row k.
      user_features: Per-user int features indexed by dataset row, e.g. ``dataset.user_features``.

    Returns:
      ``{"history": int32 [S, L], "next_items": int32 [S, L], <feature>: int32 [S]}``.

    Raises:
      ValueError: If ``max_length`` is not positive, ``user_rows`` does not match
        ``sequences``, or a user feature is malformed.
    """
    _check_positive("max_length", max_length)
    if user_rows is None:
        user_rows = np.arange(len(sequences), dtype=np.int64)
    user_rows = np.asarray(user_rows, dtype=np.int64)
    if len(user_rows) != len(sequences):
        raise ValueError(f"user_rows has {len(user_rows)} entries but there are {len(sequences)} sequences")
    keep = [k for k, sequence in enumerate(sequences) if len(sequence) >= 2]
    histories = [np.asarray(sequences[k])[:-1] for k in keep]
    next_items = [np.asarray(sequences[k])[1:] for k in keep]
    # Both lists have equal lengths per row, so left padding keeps position t of history and
    # next_items aligned, and padding positions coincide (next_items is 0 where history is).
    arrays = {
        "history": pad_histories(histories, max_length),
        "next_items": pad_histories(next_items, max_length),
    }
    arrays.update(_user_feature_columns(user_features, user_rows[keep]))
    return arrays


def sequence_training_dataset(
    sequences: Sequence[np.ndarray],
    *,
    max_length: int,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    user_rows: Optional[np.ndarray] = None,
    user_features: Optional[Mapping[str, np.ndarray]] = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches of training sequences where every position predicts the next item (SASRec).

    For a sequence ``seq``, ``history = seq[:-1]`` and ``next_items = seq[1:]``, both cut to
    the most recent ``max_length`` and left-padded with 0, so ``next_items[t]`` is the item that
    followed ``history[t]`` (and 0 where ``history[t]`` is padding). Sequences shorter than two
    items are left out.

    Args:
      sequences: Item-index sequences, oldest first (e.g. ``split.train_sequences``).
      max_length: Width L of the batches.
      batch_size: Sequences per batch.
      shuffle: Shuffle sequences, differently every epoch (deterministic given ``seed``).
      seed: Shuffle seed.
      user_rows: Dataset row of each sequence's user (e.g. ``split.train_user_rows``); None
        means sequence k belongs to row k.
      user_features: Per-user int features indexed by dataset row (e.g.
        ``dataset.user_features``); each becomes an int32 [B] entry.
      drop_remainder: Drop the last incomplete batch (static batch size).

    Returns:
      A dataset of ``{"history": int32 [B, L], "next_items": int32 [B, L], <feature>: int32 [B]}``.

    Raises:
      ValueError: If ``max_length`` or ``batch_size`` is not positive, no sequence has two
        items, or the user rows/features are inconsistent.
    """
    _check_positive("batch_size", batch_size)
    arrays = training_arrays(
        sequences, max_length=max_length, user_rows=user_rows, user_features=user_features
    )
    num_rows = len(arrays["history"])
    if num_rows == 0:
        raise ValueError(
            f"no training sequence has at least 2 items (got {len(sequences)} sequences); "
            "nothing to predict"
        )
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        dataset = dataset.shuffle(num_rows, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def eval_arrays(
    examples: EvalExamples,
    *,
    max_length: int,
    user_features: Optional[Mapping[str, np.ndarray]] = None,
) -> dict[str, np.ndarray]:
    """The numpy arrays behind :func:`eval_dataset` (one row per example, in order).

    Args:
      examples: Held-out examples.
      max_length: Width L of the histories.
      user_features: Per-user int features indexed by dataset row.

    Returns:
      ``{"history": int32 [E, L], "target": int32 [E], "user_row": int32 [E], <feature>: int32 [E]}``.

    Raises:
      ValueError: If ``max_length`` is not positive or a user feature is malformed.
    """
    _check_positive("max_length", max_length)
    user_rows = np.asarray(examples.user_rows, dtype=np.int64)
    arrays = {
        "history": pad_histories(examples.histories, max_length),
        "target": np.asarray(examples.targets, dtype=np.int32),
        "user_row": user_rows.astype(np.int32),
    }
    arrays.update(_user_feature_columns(user_features, user_rows))
    return arrays


def eval_dataset(
    examples: EvalExamples,
    *,
    max_length: int,
    batch_size: int,
    user_features: Optional[Mapping[str, np.ndarray]] = None,
) -> tf.data.Dataset:
    """Batches of held-out examples, in example order (not shuffled).

    Args:
      examples: E.g. ``split.validation`` or ``split.test``.
      max_length: Width L of the histories (most recent items kept, left-padded with 0).
      batch_size: Examples per batch (the last batch may be smaller).
      user_features: Per-user int features indexed by dataset row (e.g.
        ``dataset.user_features``); each becomes an int32 [B] entry.

    Returns:
      A dataset of ``{"history": int32 [B, L], "target": int32 [B], "user_row": int32 [B],
      <feature>: int32 [B]}``.

    Raises:
      ValueError: If ``max_length`` or ``batch_size`` is not positive, or a user feature is
        malformed.
    """
    _check_positive("batch_size", batch_size)
    arrays = eval_arrays(examples, max_length=max_length, user_features=user_features)
    return tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size).prefetch(tf.data.AUTOTUNE)
