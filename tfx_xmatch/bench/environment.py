"""What every benchmark records beside its numbers: the machine, the versions, the date."""

from __future__ import annotations

import datetime
import os
import platform
import sys


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


def header(benchmark: str) -> dict:
    return {
        "benchmark": benchmark,
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "versions": versions(),
    }
