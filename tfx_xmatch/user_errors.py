"""What the command lines print for an error in the user's input instead of a traceback."""

from __future__ import annotations

import sys
from typing import Optional


def user_error_text(error: BaseException, handled: tuple) -> Optional[str]:
    """The one line a command prints for ``error``, or None when it is not a usage or data error
    (a bug, whose traceback is wanted).

    Handled are the ``handled`` exception types and TensorFlow's own errors (``OpError``: a
    corrupt or out-of-range TFRecord fails inside tf.data), of which the first line is kept.
    TensorFlow is looked up, not imported: commands that never load it should not pay for it.

    Args:
      error: What the command raised.
      handled: The exception types that are the user's errors.

    Returns:
      The text to print after "error: ", or None.
    """
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, tf.errors.OpError):
        return (error.message.strip().splitlines() or [type(error).__name__])[0]
    return str(error) if isinstance(error, handled) else None
