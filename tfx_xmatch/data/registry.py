"""The named benchmark datasets and :func:`load_dataset`, which resolves a name (or the path of
an interaction file) to a loaded SequenceDataset with MovieLens side info where it exists."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Any, Callable, Optional, Union

from tfx_xmatch.data.dataset import SequenceDataset
from tfx_xmatch.data.loaders import load_pairs, load_rating_log, load_sequences, load_table
from tfx_xmatch.data.movielens import (TFDS_MOVIELENS_1M, has_movielens_side_files, load_movielens_side_info,
                                       load_tfds_movielens_1m)
from tfx_xmatch.data.vocabulary import PathLike

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """How :func:`load_dataset` finds and reads one named dataset.

    Attributes:
      kind: "file" (under a data directory), "synthetic" or "tfds".
      relative_path: For files, the path under the data directory.
      format: For files, "pairs", "sequences" or "ratings".
      options: Extra keyword arguments for the loader.
      side_info: Whether MovieLens side info can be joined.
      description: One line for listings.
    """

    kind: str
    relative_path: str = ""
    format: str = ""
    options: dict = dataclasses.field(default_factory=dict)
    side_info: bool = False
    description: str = ""


DATASETS: dict[str, DatasetInfo] = {
    "ml-1m": DatasetInfo(
        "file", "ml-1m/ml-1m.txt", "pairs", side_info=True,
        description="MovieLens-1M, SASRec preprocessing (6,040 users, 3,416 items)",
    ),
    "ml-100k": DatasetInfo(
        "file", "ml-100k/u.data", "ratings", {"sep": "\t"}, side_info=True,
        description="MovieLens-100K raw rating log with timestamps (943 users, 1,682 items)",
    ),
    "beauty": DatasetInfo(
        "file", "beauty/Beauty.txt", "sequences",
        description="Amazon Beauty 5-core (22,363 users, 12,101 items)",
    ),
    "lastfm": DatasetInfo(
        "file", "lastfm/LastFM.txt", "sequences",
        description="HetRec-2011 Last.fm artists 5-core (1,090 users, 3,646 items)",
    ),
    "synthetic": DatasetInfo(
        "synthetic", description="Generated sequences with planted successor structure",
    ),
    "tfds:" + TFDS_MOVIELENS_1M: DatasetInfo(
        "tfds", description="MovieLens-1M raw ratings via TensorFlow Datasets (needs network once)",
    ),
}  # fmt: skip

_FORMATS: dict[str, Callable[..., SequenceDataset]] = {
    "pairs": load_pairs,
    "sequences": load_sequences,
    "ratings": load_rating_log,
    "table": load_table,
}


def load_dataset(
    name_or_path: Union[str, "os.PathLike[str]"],
    data_dir: Optional[PathLike] = None,
    *,
    side_info: bool = True,
    skip_bad_lines: bool = False,
    **kwargs: Any,
) -> SequenceDataset:
    """Loads a named benchmark dataset or an interaction file.

    Args:
      name_or_path: A name from ``DATASETS`` ("ml-1m", "ml-100k", "beauty", "lastfm",
        "synthetic", "tfds:movielens/1m-ratings") or the path of a file (then pass
        ``format="pairs"|"sequences"|"ratings"|"table"``).
      data_dir: For file datasets, the folder holding e.g. ``ml-1m/ml-1m.txt`` (the dataset's
        own folder is accepted too); defaults to ``$XMATCH_DATA_DIR``, else the current
        directory. For "tfds:..." the TFDS data directory.
      side_info: Join MovieLens genres and demographics when the dataset has them (for a path:
        when its folder holds MovieLens side files).
      skip_bad_lines: Skip and count malformed lines instead of failing.
      **kwargs: For "synthetic", arguments of ``make_synthetic``; for files, extra loader
        arguments (e.g. ``min_rating`` for rating logs) and ``format`` for paths.

    Returns:
      The dataset.

    Raises:
      ValueError: If the name is unknown (the message lists the known names), a path is
        given without a valid ``format``, or "synthetic" gets an argument ``make_synthetic``
        does not take (the message lists the accepted ones).
      FileNotFoundError: If the dataset's file is missing (the message names the path tried).
      DataFormatError: If the file is malformed.
      RuntimeError: For "tfds:..." when the data cannot be downloaded.
    """
    name = os.fspath(name_or_path)
    info = DATASETS.get(name)
    if info is None:
        return _load_path(name, side_info=side_info, skip_bad_lines=skip_bad_lines, **kwargs)
    if info.kind == "synthetic":
        from tfx_xmatch.data.synthetic import make_synthetic  # synthetic does not need loaders

        accepted = list(inspect.signature(make_synthetic).parameters)
        unknown = [key for key in kwargs if key not in accepted]
        if unknown:
            raise ValueError(
                f"unknown argument(s) for dataset 'synthetic': {', '.join(unknown)}; accepted "
                f"(arguments of make_synthetic): {', '.join(accepted)}"
            )
        return make_synthetic(**kwargs)
    if info.kind == "tfds":
        return load_tfds_movielens_1m(data_dir=data_dir, **kwargs)

    requested_format = kwargs.pop("format", None)
    if requested_format is not None and requested_format != info.format:
        raise ValueError(
            f"dataset {name!r} is a {info.format!r} file, got format={requested_format!r}"
        )
    base = os.fspath(data_dir) if data_dir is not None else os.environ.get("XMATCH_DATA_DIR", ".")
    tried = [os.path.join(base, info.relative_path), os.path.join(base, os.path.basename(info.relative_path))]
    path = next((candidate for candidate in tried if os.path.isfile(candidate)), None)
    if path is None:
        raise FileNotFoundError(
            f"dataset {name!r} expects its {info.format} file at {tried[0]!r} (or {tried[1]!r}); "
            f"not found. Pass data_dir= the folder holding {info.relative_path!r}"
            + ("" if data_dir is not None else " (or set $XMATCH_DATA_DIR)")
        )
    options = {**info.options, **kwargs}
    dataset = _FORMATS[info.format](path, name=name, skip_bad_lines=skip_bad_lines, **options)
    if side_info and info.side_info and has_movielens_side_files(os.path.dirname(path)):
        dataset = load_movielens_side_info(dataset, os.path.dirname(path))
    elif side_info and info.side_info:
        logger.warning("no MovieLens side files beside %s; loading %r without side info", path, name)
    return dataset


def _load_path(
    path: str, *, side_info: bool, skip_bad_lines: bool, format: Optional[str] = None, **kwargs: Any
) -> SequenceDataset:
    looks_like_path = os.sep in path or "/" in path or os.path.splitext(path)[1] or os.path.exists(path)
    if not looks_like_path:
        raise ValueError(
            f"unknown dataset {path!r}; known names: {', '.join(sorted(DATASETS))} "
            "(or pass the path of a file with format='pairs'|'sequences'|'ratings')"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{format or 'data'} file not found: {path!r} (and it is not a dataset name; known "
            f"names: {', '.join(sorted(DATASETS))})"
        )
    if format not in _FORMATS:
        raise ValueError(
            f"loading the file {path!r} needs format= one of {sorted(_FORMATS)}, got {format!r}"
        )
    dataset = _FORMATS[format](path, skip_bad_lines=skip_bad_lines, **kwargs)
    directory = os.path.dirname(os.path.abspath(path))
    if side_info and has_movielens_side_files(directory):
        dataset = load_movielens_side_info(dataset, directory)
    return dataset
