"""Per-user test ranks kept beside a benchmark run, and paired comparisons of two runs' rows.

A quality benchmark saves each serving path's 0-based target ranks (one per test user, in the
split's order) under ``<run dir>/test_ranks/``. Another benchmark, or a later re-run, reads them
back to test whether a row really beats a reference on the same users
(``tfx_xmatch.evaluation.paired_difference``) instead of comparing two means by eye.
"""

from __future__ import annotations

import pathlib
import re
from typing import Optional, Sequence

import numpy as np

from tfx_xmatch.evaluation import paired_difference
from tfx_xmatch.io_utils import atomic_path

RANKS_DIR = "test_ranks"
TAIL_PREFIX = "Tail"


def _ranks_file(run_dir: pathlib.Path, label: str) -> pathlib.Path:
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"a ranks label must be a non-empty string, got {label!r}")
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", label.strip()).strip("_")
    return pathlib.Path(run_dir) / RANKS_DIR / f"{slug}.npy"


def save_ranks(run_dir, label: str, ranks: np.ndarray) -> pathlib.Path:
    """Writes a path's test ranks (int [num_users]) under the run directory, atomically.

    Raises:
      ValueError: an empty label, or ranks that are not 1-D integers.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks of {label!r} must be 1-D integers, got dtype {ranks.dtype} shape {ranks.shape}")
    path = _ranks_file(run_dir, label)
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.save(handle, ranks.astype(np.int64))
    return path


def load_ranks(run_dir, label: str) -> Optional[np.ndarray]:
    """The ranks ``save_ranks`` wrote for ``label`` in the run, or None when there are none."""
    path = _ranks_file(run_dir, label)
    return np.load(path) if path.is_file() else None


def compare(ranks: np.ndarray, reference: np.ndarray, metrics: Sequence[str],
            is_tail_target: Optional[np.ndarray] = None) -> dict:
    """Paired differences (row minus reference) of each metric: {metric: PairedDifference dict}.

    ``TailRecall@K`` compares ``Recall@K`` over the users whose target is a tail item
    (``is_tail_target``, bool [num_users]).

    Raises:
      ValueError: a tail metric without ``is_tail_target``, or ranks of different users.
    """
    result = {}
    for metric in metrics:
        if metric.startswith(TAIL_PREFIX):
            if is_tail_target is None:
                raise ValueError(f"{metric!r} needs is_tail_target (which users' targets are tail items)")
            difference = paired_difference(ranks, reference, metric[len(TAIL_PREFIX):], mask=is_tail_target)
        else:
            difference = paired_difference(ranks, reference, metric)
        result[metric] = {**difference.to_dict(), "metric": metric}
    return result


def format_difference(difference: dict) -> str:
    """``+0.0016 [-0.0040, +0.0072] p=0.58`` (difference, confidence interval, p-value)."""
    return (f"{difference['difference']:+.4f} [{difference['ci_low']:+.4f}, {difference['ci_high']:+.4f}] "
            f"p={difference['p_value']:.2g}")


def paired_table(rows: Sequence[dict], label_columns: Sequence[str], references: dict,
                 metrics: Sequence[str]) -> list[str]:
    """Markdown lines of the rows' paired differences (none when no row has one).

    Args:
      rows: Result rows; ``row[key][metric]`` is a ``compare`` result for each ``key`` of
        ``references`` the row was compared with.
      label_columns: Row fields that name a row, e.g. ("model", "sampling").
      references: {row key: what the row was compared with}, e.g. {"vs_hard": "hard"}.
      metrics: The compared metrics, in column order.
    """
    paired = [row for row in rows if any(key in row for key in references)]
    if not paired:
        return []
    columns = [(key, metric) for key in references for metric in metrics if any(key in row for row in paired)]
    lines = ["Paired differences on the same test users (row minus the named model; 95% confidence interval of "
             "the mean difference; p-value of a paired t-test):", "",
             "| " + " | ".join(label_columns) + " | "
             + " | ".join(f"Δ{metric} vs {references[key]}" for key, metric in columns) + " |",
             "|" + "---|" * (len(label_columns) + len(columns))]
    for row in paired:
        cells = [format_difference(row[key][metric]) if key in row else "" for key, metric in columns]
        lines.append("| " + " | ".join(str(row[column]) for column in label_columns) + " | " + " | ".join(cells) + " |")
    return lines
