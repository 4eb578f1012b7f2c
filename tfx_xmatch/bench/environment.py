"""What every benchmark records beside its numbers: the machine, the versions, the date."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Optional, Sequence


def machine_info() -> dict:
    cpu_model = platform.processor()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": "none",
    }


def versions() -> dict:
    import numpy
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    import tfx_xmatch

    return {
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "tensorflow_recommenders": tfrs.__version__,
        "numpy": numpy.__version__,
        "tfx_xmatch": tfx_xmatch.__version__,
    }


def source_checkout() -> Optional[pathlib.Path]:
    """The tfx_xmatch source checkout this package runs from (an editable install or the
    checkout on ``sys.path``), or None for an installed package, whose parent directory is
    ``site-packages``."""
    root = pathlib.Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() and (root / "tfx_xmatch" / "__init__.py").is_file() else None


def source_revision() -> dict:
    """The git commit of the tfx_xmatch checkout and whether it had uncommitted changes
    (``None`` for both outside a git checkout that tracks tfx_xmatch's files: not the commit of
    another repository an installed package or an untracked copy happens to sit in)."""
    root = source_checkout()

    def git(*args) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # The checkout's own files must be tracked by the repository git finds (a monorepo is fine;
    # a copy dropped untracked into another project is not).
    if root is None or git("ls-files", "--error-unmatch", "setup.py", "tfx_xmatch/__init__.py") is None:
        return {"commit": None, "uncommitted_changes": None}
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "uncommitted_changes": None if status is None else bool(status)}


# Environment variables that change how fast TensorFlow computes: the same arguments measure
# something else under them (TF_ENABLE_ONEDNN_OPTS=0 alone made a T2Diff export answer 3.9x faster).
PERFORMANCE_ENVIRONMENT = ("TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                           "OMP_NUM_THREADS", "TF_XLA_FLAGS", "XLA_FLAGS")


def header(benchmark: str, argv: Optional[Sequence[str]] = None, program: str = "") -> dict:
    """Date, command, machine, versions and source revision of a benchmark run.

    The command starts with the ``PERFORMANCE_ENVIRONMENT`` variables this process has set
    (``TF_ENABLE_ONEDNN_OPTS=0 python ...``), so it reruns as it ran.

    Args:
      benchmark: The benchmark's name.
      argv: The command's arguments (default: this process's ``python`` command line).
      program: The command that ``argv`` was given to, e.g. "xmatch bench".
    """
    environment = [f"{name}={shlex.quote(os.environ[name])}" for name in PERFORMANCE_ENVIRONMENT if name in os.environ]
    command = [*environment, *(["python", *sys.argv] if argv is None else [program, *argv])]
    return {
        "benchmark": benchmark,
        "command": " ".join(command).strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "versions": versions(),
        "source": source_revision(),
    }
