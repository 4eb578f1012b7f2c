"""What the command lines print for an error in the user's input instead of a traceback."""

from __future__ import annotations

import errno
import re
import sys
from typing import Optional

# Where in the graph an op failed ("[[{{node Assert/AssertGuard/Assert}}]]"), which traced
# function ran it ("[Op:__inference_signature_wrapper_..._3819]", "{{function_node
# __wrapped__IteratorGetNext_...}}") and eager TF's empty " name: " suffix: names of
# TensorFlow's internals, which say nothing to a user about their input.
_GRAPH_LOCATIONS = re.compile(
    r"\s*\[\[\{\{node [^}]*\}\}\]\]|\s*\[Op:[^\]]*\]( name: ?$)?|\{\{function_node [^}]*\}\}\s*")


def shortened(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (the last three "...") when longer, for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_tf_message(message: str) -> str:
    """The op's own message (e.g. "assertion failed: [k must be > 0] ..."), without eager TF's
    "Graph execution error: Detected at node ... (stack)" preamble or the node and function
    names TensorFlow adds."""
    message = _GRAPH_LOCATIONS.sub("", message).strip()
    lines = message.split("\n")
    if not lines or not lines[0].startswith("Graph execution error"):
        return message
    index = 1
    while index < len(lines):
        line = lines[index]
        if (
            not line.strip()
            or line.startswith("Detected at node")
            or line.startswith("<stack traces unavailable>")
            or line[:1].isspace()
        ):
            index += 1
            continue
        break
    rest = "\n".join(lines[index:]).strip()
    return rest or message


# Keras 2 wraps what a layer's call raised: "Exception encountered when calling layer 'x' (type
# X).\n\n<the error>\n\nCall arguments received by layer ...". The error is what the user needs.
_KERAS_CALL_WRAPPER = re.compile(
    r"^Exception encountered when calling layer '(?P<layer>[^']*)' \(type [\w.]+\)\.\s*?\n\s*\n"
    r"(?P<inner>.*?)(?:\n\s*\nCall arguments received by layer.*)?\Z", re.DOTALL)


def _unwrapped(message: str) -> str:
    """``message`` without Keras' wrapper of an error raised in a layer's call, naming the layer."""
    match = _KERAS_CALL_WRAPPER.match(message)
    if match is None:
        return message
    inner = clean_tf_message(match["inner"].strip())
    return f"in layer '{match['layer']}': {inner}" if inner else message


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
        return (clean_tf_message(_unwrapped(error.message)).splitlines() or [type(error).__name__])[0]
    worker = beam_worker_error(error)
    if worker is not None:
        cause, message = worker
        ours = cause is not None and (issubclass(cause, handled) or (
            tf is not None and issubclass(cause, tf.errors.OpError)))
        return (clean_tf_message(message).splitlines() or [cause.__name__])[0] if ours else None
    return _unwrapped(str(error)) if isinstance(error, handled) else None


# "[module.]Type: message", the line a traceback ends with.
_EXCEPTION_LINE = re.compile(r"^(?:RuntimeError: )?(?P<type>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*): (?P<message>.*)")


def beam_worker_error(error: BaseException) -> Optional[tuple[Optional[type], str]]:
    """(the exception type, its message) a Beam worker raised, when ``error`` is the runner's
    RuntimeError around it; else None.

    A runner re-raises a worker's exception as a RuntimeError reading "<module.Type>: <message>
    [while running '<step>']", after the worker's whole traceback when the workers are other
    processes or threads (``--direct_running_mode=multi_processing``), so the type is read back
    from its last exception line. None stands for a type this process cannot name.
    """
    text = str(error)
    if not isinstance(error, RuntimeError) or "[while running '" not in text:
        return None
    lines = text.rstrip().splitlines()
    for index in range(len(lines) - 1, -1, -1):
        match = _EXCEPTION_LINE.match(lines[index])
        if match:
            module, _, name = match["type"].rpartition(".")
            cause = getattr(sys.modules.get(module or "builtins"), name, None)
            if not (isinstance(cause, type) and issubclass(cause, BaseException)):
                cause = None
            return cause, "\n".join([match["message"], *lines[index + 1:]])
    return None


# The errors of a path or of the file system under it.
FILE_SYSTEM_ERRNOS = frozenset({
    errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EEXIST,
    errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG, errno.ENOTEMPTY,
    errno.EXDEV, errno.EBUSY,
})


def os_error_text(error: BaseException, writing: Optional[str] = None) -> Optional[str]:
    """The line said for a file system error (read-only, not permitted, disk full): its reason
    and the path it names, else ``writing`` (the output being written; a full disk's failed
    write names no file); None for anything else, an OSError without an errno included (a bug
    or a message of ours, which the command's handled types decide on), and an OSError that is
    not the file system's (a connection reset is no path's fault)."""
    if not isinstance(error, OSError) or error.errno not in FILE_SYSTEM_ERRNOS:
        return None
    reason = error.strerror or str(error)
    if error.filename is not None:
        paths = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 is not None else "")
        return f"{paths}: {reason}"
    return f"{reason} (writing {writing})" if writing else reason
