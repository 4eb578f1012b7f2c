"""Builds a sublayer under its own name, as a layer building itself at its first call would."""

from __future__ import annotations

import tensorflow as tf


def build_sublayer(layer: tf.keras.layers.Layer, input_shape) -> None:
    """``layer.build(input_shape)`` inside ``tf.name_scope(layer.name)``.

    Keras names a layer's variables after the layer (``query_projection/kernel:0``) when the
    layer builds itself inside its first ``__call__``. A composite layer that builds a sublayer
    explicitly, so that its weights exist before the first call, gets bare names otherwise
    (``kernel:0``): two Dense sublayers then share a name, which a legacy HDF5 weights file
    (``save_weights("weights.h5")``, ``ModelCheckpoint(..., save_weights_only=True)`` to an
    ``.h5`` path) cannot hold, and TensorBoard's histograms merge.

    Args:
      layer: The sublayer to build (a ``tf.keras.layers.Layer``).
      input_shape: What its ``build`` takes (a shape, or whatever that layer's ``build`` expects).
    """
    with tf.name_scope(layer.name):
        layer.build(input_shape)
