"""Tiny training batches with a learnable structure, shared by the model tests."""

import numpy as np
import tensorflow as tf


def successor_batches(num_items: int, length: int, *, num_batches: int, batch: int = 16, seed: int = 0,
                      padding: int = 2) -> tf.data.Dataset:
    """Histories where item i is followed by i + 1; every third row has ``padding`` leading pads."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(1, num_items - length, size=num_batches * batch)
    rows = np.array([np.arange(start, start + length + 1) % num_items + 1 for start in starts], np.int32)
    history, next_items = rows[:, :-1].copy(), rows[:, 1:].copy()
    history[::3, :padding] = 0
    next_items[history == 0] = 0
    return tf.data.Dataset.from_tensor_slices({"history": history, "next_items": next_items}).batch(batch)
