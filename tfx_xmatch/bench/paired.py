"""Per-user test ranks kept beside a benchmark run, and the table of paired comparisons.

A quality benchmark saves each serving path's 0-based target ranks (one per test user, in the
split's order) under ``<run dir>/test_ranks/``. Another benchmark, or a later re-run, reads them
back to test whether a row really beats a reference on the same users
(``tfx_xmatch.evaluation.compare_metrics``) instead of comparing two means by eye.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Optional, Sequence

import numpy as np

from tfx_xmatch.evaluation import describe_recorded_tests, format_recorded_difference
from tfx_xmatch.io_utils import atomic_path

RANKS_DIR = "test_ranks"


def ranks_protocol(config) -> dict:
    """What makes two runs' ranks comparable: the data, its split and the history masking (not
    the data directory, which differs between machines, nor model settings such as the window)."""
    data = {key: value for key, value in dataclasses.asdict(config.data).items() if key != "data_dir"}
    return {"data": data, "mask_history": bool(config.eval.mask_history)}


def _ranks_file(run_dir, label: str) -> pathlib.Path:
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"a ranks label must be a non-empty string, got {label!r}")
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", label.strip()).strip("_")
    return pathlib.Path(run_dir) / RANKS_DIR / f"{slug}.npz"


def save_ranks(run_dir, label: str, ranks: np.ndarray, targets: np.ndarray, config=None) -> pathlib.Path:
    """Writes a path's test ranks (int [num_users]) under the run directory, atomically, with the
    targets they rank and (given the run's ``config``) its ``ranks_protocol``, so a later reader
    can tell whether they rank its examples the way it would.

    Raises:
      ValueError: an empty label, ranks that are not 1-D integers, or targets of another length.
    """
    ranks, targets = np.asarray(ranks), np.asarray(targets)
    if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks of {label!r} must be 1-D integers, got dtype {ranks.dtype} shape {ranks.shape}")
    if targets.shape != ranks.shape:
        raise ValueError(f"ranks of {label!r} need one target each: {ranks.size} ranks, {targets.size} targets")
    path = _ranks_file(run_dir, label)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            protocol = json.dumps(ranks_protocol(config), sort_keys=True) if config is not None else ""
            np.savez(handle, ranks=ranks.astype(np.int64), targets=targets.astype(np.int64), protocol=protocol)
    return path


def load_ranks(run_dir, label: str, targets: np.ndarray, config=None) -> Optional[np.ndarray]:
    """The ranks ``save_ranks`` wrote for ``label`` in the run, or None when there are none.

    Raises:
      ValueError: the saved ranks are of other examples than ``targets`` (another split or
        dataset), or were ranked under another ``ranks_protocol`` than ``config``'s (e.g. with
        the history unmasked); the message names the file, which can be deleted to recompute
        them.
    """
    path = _ranks_file(run_dir, label)
    if not path.is_file():
        return None
    with np.load(path) as saved:
        ranks, saved_targets = saved["ranks"], saved["targets"]
        saved_protocol = str(saved["protocol"]) if "protocol" in saved.files else ""
    if config is not None and saved_protocol:
        expected = ranks_protocol(config)
        differing = sorted(key for key, value in json.loads(saved_protocol).items() if expected.get(key) != value)
        if differing:
            raise ValueError(f"{path} was ranked under other settings ({', '.join(differing)} differ): "
                             "delete it to recompute")
    targets = np.asarray(targets)
    if saved_targets.shape != targets.shape or not np.array_equal(saved_targets, targets):
        where = ("" if saved_targets.shape != targets.shape
                 else f", first differing at example {int(np.flatnonzero(saved_targets != targets)[0])}")
        raise ValueError(f"{path} ranks other examples ({saved_targets.size} targets) than the "
                         f"{targets.size} being compared{where}: delete it to recompute")
    return ranks


def paired_table(rows: Sequence[dict], label_columns: Sequence[str], references: dict,
                 metrics: Sequence[str]) -> list[str]:
    """Markdown lines of the rows' paired differences (none when no row has one).

    Args:
      rows: Result rows; ``row[key][metric]`` is a ``compare_metrics`` result for each ``key`` of
        ``references`` the row was compared with.
      label_columns: Row fields that name a row, e.g. ("model", "sampling").
      references: {row key: what the row was compared with}, e.g. {"vs_hard": "hard"}.
      metrics: The compared metrics, in column order.
    """
    paired = [row for row in rows if any(key in row for key in references)]
    if not paired:
        return []
    columns = [(key, metric) for key in references for metric in metrics if any(key in row for row in paired)]
    cells = [row[key][metric] for row in paired for key, metric in columns if key in row]
    lines = ["Paired differences on the same test users (row minus the named model; 95% confidence interval of "
             f"the mean difference; p-value of {describe_recorded_tests(cells)}):", "",
             "| " + " | ".join(label_columns) + " | "
             + " | ".join(f"Δ{metric} vs {references[key]}" for key, metric in columns) + " |",
             "|" + "---|" * (len(label_columns) + len(columns))]
    for row in paired:
        cells = [format_recorded_difference(row[key][metric]) if key in row else "" for key, metric in columns]
        lines.append("| " + " | ".join(str(row[column]) for column in label_columns) + " | " + " | ".join(cells) + " |")
    return lines
