"""tfx_xmatch: cross-interaction retrieval models for TensorFlow Recommenders.

TFRS 0.7.7 is written against Keras 2, so ``tf.keras`` must resolve to ``tf_keras``. TensorFlow
decides that lazily, on the first access to ``tf.keras``, from ``TF_USE_LEGACY_KERAS``. This
module therefore sets the variable before anything else, which works even after a bare
``import tensorflow``, and refuses to run when ``tf.keras`` had already resolved to Keras 3
(the models would silently mix two Keras versions and fail later with far less helpful errors).
"""

import os
import sys

__version__ = "0.1.0"


def _require_legacy_keras() -> None:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    if "tensorflow" not in sys.modules:
        return
    keras_module = getattr(sys.modules["tensorflow"], "keras", None)
    keras_name = getattr(keras_module, "__name__", "")
    if not keras_name.startswith("tf_keras"):
        raise ImportError(
            "tfx_xmatch needs tf.keras to be Keras 2 (the tf-keras package), but this process "
            f"already uses tf.keras = {keras_name or keras_module!r} (Keras 3). Import tfx_xmatch "
            "before using tf.keras, or set TF_USE_LEGACY_KERAS=1 in the environment before "
            "starting Python."
        )


_require_legacy_keras()
