"""What every Beam pipeline here shares: importing Beam with a helpful error, and options.

Runner flags pass through untouched (``--runner=FlinkRunner --flink_master=...``,
``--runner=DataflowRunner --project=... --temp_location=gs://...``); without ``--runner`` the
pipelines run on the DirectRunner in this process.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import uuid
from typing import Iterator, Optional, Sequence

BEAM_INSTALL_HINT = "pip install 'tfx_xmatch[beam]'  (apache-beam >= 2.60)"


def require_beam():
    """Imports ``apache_beam``, or raises ImportError saying how to install it."""
    try:
        beam = importlib.import_module("apache_beam")
    except ImportError as error:
        raise ImportError(f"the Beam pipelines need Apache Beam, which is not installed: {BEAM_INSTALL_HINT}") from error
    return beam


def split_arguments(parser, argv: Optional[Sequence[str]]) -> tuple:
    """(our arguments, Beam's): ``parse_known_args``, except that a misspelt flag of ours
    (``--num_shards`` for ``--num-shards``, ``--trian-minutes`` for ``--train-minutes``) is an
    error instead of a Beam option that Beam discards with a warning while the command exits 0.
    """
    args, rest = parser.parse_known_args(argv)
    ours = {option.lstrip("-").replace("_", "-"): option
            for action in parser._actions for option in action.option_strings if option.startswith("--")}
    for argument in rest:
        name = argument.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        key = name.lstrip("-").replace("_", "-")
        # A flag of ours spelt with "_", or misspelt ("--trian-minutes"): Beam would drop it.
        spelt = ours.get(key) or next((ours[close] for close in difflib.get_close_matches(key, ours, 1, 0.85)), None)
        if spelt is not None:
            parser.error(f"unrecognized argument {name}; did you mean {spelt}?")
    return args, rest


def pipeline_options(beam_args: Sequence[str] = ()):
    """``PipelineOptions`` from runner flags; the DirectRunner in-process when none is given.

    Args:
      beam_args: Beam flags, e.g. ``["--runner=FlinkRunner", "--parallelism=4"]``.

    Returns:
      The options, with ``save_main_session`` off (the DoFns here import what they need).
    """
    require_beam()
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(list(beam_args))
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"
    return options


@contextlib.contextmanager
def gfile_temporary(path: str) -> Iterator[str]:
    """Yields a temporary name beside ``path``; renames it onto ``path`` only on success.

    Goes through ``tf.io.gfile``, so ``path`` may be local or on any file system TensorFlow
    reads (``gs://``, ``hdfs://``): Beam workers write their outputs with it. A failed write or
    rename (a retried bundle) leaves no temporary behind. On an object store the rename is a
    copy then a delete, and a reader sees the old object or the whole new one.
    """
    import tensorflow as tf

    directory = os.path.dirname(path) or "."
    tf.io.gfile.makedirs(directory)
    temporary = f"{directory}/.{os.path.basename(path)}.tmp-{uuid.uuid4().hex}"
    try:
        yield temporary
        tf.io.gfile.rename(temporary, path, overwrite=True)
    finally:
        remove_if_present(temporary)


def remove_if_present(path: str) -> None:
    """Removes the file at ``path`` (any ``tf.io.gfile`` path) if there is one."""
    import tensorflow as tf

    try:
        tf.io.gfile.remove(path)
    except tf.errors.NotFoundError:  # none, or another worker removed it first
        pass


def write_bytes(path: str, content: bytes) -> None:
    """Writes ``content`` to ``path`` (any ``tf.io.gfile`` path) under a temporary name first."""
    import tensorflow as tf

    with gfile_temporary(path) as temporary, tf.io.gfile.GFile(temporary, "wb") as handle:
        handle.write(content)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` as UTF-8 to ``path`` (any ``tf.io.gfile`` path) under a temporary name first."""
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path: str) -> bytes:
    """The content of ``path``, any ``tf.io.gfile`` path."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "rb") as handle:
        return handle.read()
