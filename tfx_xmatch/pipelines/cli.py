"""``xmatch pipeline STAGE ...``: run one Beam pipeline, or the whole chain.

    xmatch pipeline prepare --dataset ml-1m --data-dir ../shared/data --output-dir out/prepared
    xmatch pipeline build-index --run-dir runs/x --output-dir out/index
    xmatch pipeline evaluate --export-dir models/xmatch/1 --prepared-dir out/prepared
    xmatch pipeline run --config configs/ml1m_sasrec.yaml --output-dir out --model-base-path models/xmatch

Flags a stage does not know are Beam pipeline options (``--runner=...``).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Optional, Sequence

STAGES = {
    "prepare": ("tfx_xmatch.pipelines.prepare", "raw interaction logs -> split TFRecords, vocabulary, statistics"),
    "build-index": ("tfx_xmatch.pipelines.build_index", "catalogue embeddings and SparCode posting lists"),
    "evaluate": ("tfx_xmatch.pipelines.evaluate", "full-ranking evaluation of an export over all users"),
    "run": ("tfx_xmatch.pipelines.run", "prepare -> train -> build index -> export -> evaluate -> publish"),
}


def usage() -> str:
    lines = [__doc__.strip(), "", "stages:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in STAGES.items()]
    return "\n".join(lines)


# What to do after an interruption, where there is something to say.
AFTER_AN_INTERRUPTION = {"run": "run the same command with --resume to keep the stages it finished"}


def _written(arguments: Sequence[str]) -> Optional[str]:
    """What a stage's arguments say it writes (``--output`` or ``--output-dir``), for an error
    that names no file (a full disk)."""
    for index, argument in enumerate(arguments):
        name, equals, value = argument.partition("=")
        if name in ("--output", "--output-dir"):
            return value if equals else (arguments[index + 1] if index + 1 < len(arguments) else None)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in STAGES:
        print(f"xmatch pipeline: unknown stage {argv[0]!r}; choose one of {', '.join(STAGES)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Beam logs a failing step's traceback before re-raising it; the error is printed below (one
    # line for the user's errors, the traceback for a bug), so that log only repeats it.
    logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
    import tfx_xmatch  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
    from tfx_xmatch.config import ConfigError
    from tfx_xmatch.data import DataFormatError
    from tfx_xmatch.interrupts import run_interruptibly
    from tfx_xmatch.user_errors import os_error_text, user_error_text

    try:
        return run_interruptibly(f"xmatch pipeline {argv[0]}",
                                 lambda: importlib.import_module(STAGES[argv[0]][0]).main(argv[1:]),
                                 AFTER_AN_INTERRUPTION.get(argv[0], ""))
    # A failure on a Beam worker comes back as the runner re-raised it, often a RuntimeError.
    except Exception as error:
        text = os_error_text(error, _written(argv[1:])) or user_error_text(error, (
            ConfigError, DataFormatError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError, ValueError, ImportError, RuntimeError))
        if text is None:
            raise
        print(f"xmatch pipeline {argv[0]}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
