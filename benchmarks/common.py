"""What every benchmark records beside its numbers: machine, versions, date, command."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import sys

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def default_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XMATCH_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


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


def markdown_header(result: dict, title: str) -> list[str]:
    """The first lines of every results page: title, command, date, machine and versions."""
    machine, versions = result["machine"], result["versions"]
    return [
        f"# {result['benchmark']}: {title}",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}",
        f"- machine: {machine['cpu']} ({machine['cpu_count']} cores, {machine['memory_gib']} GiB, no GPU)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


def training_budgets(parser, minutes_args: list, defaults: dict) -> dict:
    """``--minutes MODEL=MINUTES`` arguments applied over ``defaults`` (parser errors name the bad one)."""
    budgets = dict(defaults)
    for item in minutes_args:
        name, _, minutes = item.partition("=")
        if name not in defaults:
            parser.error(f"--minutes: unknown model {name!r}; known: {list(defaults)}")
        try:
            budgets[name] = float(minutes)
        except ValueError:
            parser.error(f"--minutes: {item!r} is not MODEL=MINUTES")
    return budgets


def training_overrides(dataset: str, data_dir, epochs: int, patience: int, minutes: float) -> list[str]:
    """The config overrides every quality benchmark trains with (leave-one-out, budget, logging)."""
    return [
        f"data.dataset={dataset}", f"data.data_dir={data_dir}", "data.split=leave_one_out",
        f"train.epochs={epochs}", f"train.early_stopping_patience={patience}",
        f"train.max_train_seconds={minutes * 60}", "train.verbose=2",
    ]


def retrieval_score_fn(query_fn, num_items: int):
    """A full-ranking ``score_fn`` for a model served through an index, like an export answers:
    ``query_fn(histories, user_rows) -> (scores [B, k], item indices [B, k])`` gives each row's
    retrieved items; every item it did not return scores -inf (ranks last)."""
    import numpy as np

    def score_fn(histories, user_rows):
        scores, ids = query_fn(histories, user_rows)
        dense = np.full((len(histories), num_items + 1), -np.inf, np.float32)
        ids, scores = np.asarray(ids), np.asarray(scores)
        found = ids > 0
        rows = np.broadcast_to(np.arange(len(histories))[:, None], ids.shape)
        dense[rows[found], ids[found]] = scores[found]
        return dense

    return score_fn
