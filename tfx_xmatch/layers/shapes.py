"""Static checks of the layers' call inputs, so a wrong-rank tensor fails naming the argument.

Only the static shape is read: an unknown rank or size passes. A runtime assert would have to be
carried by every traced function, XLA program and SavedModel signature, and a wrong rank is
nearly always known when the layer is traced, where it otherwise surfaced as an op error that
names no argument ("Incompatible shapes [Op:AddV2]", an Einsum rank error).
"""

from __future__ import annotations

import tensorflow as tf


def require_rank(name: str, tensor, layout: str) -> None:
    """Refuses ``tensor`` if its static rank is known and differs from the axes ``layout`` names.

    Args:
      name: The call argument, named in the error.
      tensor: A tensor (anything with a ``shape``), or a shape (what ``build`` is given).
      layout: Its expected axes, e.g. "[B, L, d]": as many axes as commas plus one.

    Raises:
      ValueError: e.g. "inputs must be [B, L, d], got shape (2, 8)".
    """
    shape = tf.TensorShape(getattr(tensor, "shape", tensor))
    if shape.rank is not None and shape.rank != len(layout.split(",")):
        raise ValueError(f"{name} must be {layout}, got shape {shape}")


def require_sequence_mask(name: str, mask, inputs_name: str, inputs, layout: str = "[B, L]") -> None:
    """Refuses a mask that is not [B, L] or whose known sizes differ from the inputs' [B, L, ...].

    Args:
      name: The mask's call argument, named in the error.
      mask: A tensor, one bool per sequence position.
      inputs_name: The argument holding the sequence, named in the error.
      inputs: The sequence (a tensor, or its shape), [B, L, ...].
      layout: The mask's axes as the layer's docstring names them (default "[B, L]").

    Raises:
      ValueError: A mask of another rank, or of other static sizes than the inputs' first two axes.
    """
    require_rank(name, mask, layout)
    mask_shape, inputs_shape = tf.TensorShape(mask.shape), tf.TensorShape(getattr(inputs, "shape", inputs))
    if mask_shape.rank is not None and inputs_shape.rank is not None \
            and not mask_shape.is_compatible_with(inputs_shape[:2]):
        raise ValueError(f"{name} must be {layout} like the first two axes of {inputs_name}, got shapes "
                         f"{mask_shape} and {inputs_shape}")
