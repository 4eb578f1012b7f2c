"""tfx_xmatch: cross-interaction retrieval models for TensorFlow Recommenders.

TFRS 0.7.7 is written against Keras 2, so ``tf.keras`` must resolve to ``tf_keras``. That is
decided when TensorFlow is first imported, which is why this module sets
``TF_USE_LEGACY_KERAS=1`` before anything imports TensorFlow, and refuses to run when the
process already imported TensorFlow with Keras 3 (the models would silently mix two Keras
versions and fail later with far less helpful errors).
"""

import os
import sys

__version__ = "0.1.0"


def _require_legacy_keras() -> None:
    if "tensorflow" not in sys.modules:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        return
    keras_module = getattr(sys.modules["tensorflow"], "keras", None)
    keras_name = getattr(keras_module, "__name__", "")
    if not keras_name.startswith("tf_keras"):
        raise ImportError(
            "tfx_xmatch needs tf.keras to be Keras 2 (the tf-keras package), but TensorFlow was "
            f"already imported with tf.keras = {keras_name or keras_module!r} (Keras 3). "
            "Import tfx_xmatch before tensorflow, or set TF_USE_LEGACY_KERAS=1 in the "
            "environment before starting Python."
        )


_require_legacy_keras()
