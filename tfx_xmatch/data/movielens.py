"""MovieLens side files (genres, user demographics) joined onto a loaded dataset, and
MovieLens-1M through TensorFlow Datasets.

The side files are read from a given folder (``load_dataset`` passes the interaction file's):
ML-1M's ``movies.dat`` and ``users.dat``, ML-100K's ``u.item`` and ``u.user`` (with
``u.genre`` and ``u.occupation`` when present). SASRec's ml-1m.txt renumbers users and items;
``sas_to_original_items.txt`` and ``sas_to_original_users.txt`` beside the side files map them
back to MovieLens ids.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import numpy as np

from tfx_xmatch.data.dataset import SequenceDataset
from tfx_xmatch.data.loaders import (UNKNOWN, DataFormatError, build_dataset, check_file, is_canonical_int,
                                     read_lines, split_fields)
from tfx_xmatch.data.vocabulary import PathLike
from tfx_xmatch.user_errors import shortened

logger = logging.getLogger(__name__)

_ML_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
_ML_AGE_NAMES = ("Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
_ML1M_OCCUPATIONS = (
    "other or not specified", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care", "executive/managerial",
    "farmer", "homemaker", "K-12 student", "lawyer", "programmer", "retired",
    "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
_GENDERS = ("F", "M")


def _age_bucket(age: int) -> int:
    """Index (1..7) of the MovieLens-1M age bucket holding ``age`` (years or an ML-1M code)."""
    return int(np.searchsorted(_ML_AGE_CODES, age, side="right")) or 1


def _once(first_lines: dict, key: int, path: str, line_number: int, field: str) -> None:
    """Refuses a second line for the same id: the later one would silently replace the first."""
    if key in first_lines:
        raise DataFormatError(path, line_number, f"{field} {key} appears again (first at line {first_lines[key]})")
    first_lines[key] = line_number


def _read_id_mapping(path: str) -> dict[int, int]:
    """Reads "remapped_id original_id" lines."""
    mapping: dict[int, int] = {}
    first_lines: dict[int, int] = {}
    for line_number, line in enumerate(read_lines(path, "utf-8"), start=1):
        fields = split_fields(line)
        if not fields:
            continue
        if len(fields) != 2 or not all(is_canonical_int(field) for field in fields):
            raise DataFormatError(
                path, line_number, f"expected 'remapped_id original_id', got {shortened(line.strip())!r}"
            )
        _once(first_lines, int(fields[0]), path, line_number, "remapped id")
        mapping[int(fields[0])] = int(fields[1])
    return mapping


def _original_ids(raw_ids: np.ndarray, mapping: Optional[dict[int, int]]) -> list[Optional[int]]:
    """Original MovieLens ids of ``raw_ids`` (None where an id has no integer original)."""
    originals: list[Optional[int]] = []
    for raw_id in raw_ids.tolist():
        if isinstance(raw_id, str):
            raw_id = int(raw_id) if is_canonical_int(raw_id) else None
        if raw_id is not None and mapping is not None:
            raw_id = mapping.get(raw_id)
        originals.append(raw_id)
    return originals


def _split_fields(path: str, line_number: int, line: str, sep: str, count: int, what: str) -> list[str]:
    fields = line.split(sep)
    if len(fields) < count:
        raise DataFormatError(path, line_number, f"expected {what}, got {shortened(line.strip())!r}")
    return fields


def _parse_int(path: str, line_number: int, value: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataFormatError(path, line_number, f"{field} {value!r} is not an integer") from None


def _parse_id(path: str, line_number: int, value: str, field: str) -> int:
    """An id of a side file, by the interactions' rule: int() would join "007" or "+8" to item 7
    or 8, which the interaction loaders keep as other (string) ids."""
    if not is_canonical_int(value):
        _parse_int(path, line_number, value, field)  # not a number at all: said so
        raise DataFormatError(path, line_number, f"{field} {value!r} is not written as the interactions' integer ids "
                                                 "are (digits without a sign, spaces or leading zeros): it would join "
                                                 f"id {int(value)}, which the interactions keep apart from {value!r}")
    return int(value)


def _ml1m_items(directory: str) -> tuple[dict[int, list[str]], list[str]]:
    path = os.path.join(directory, "movies.dat")
    genres_by_movie: dict[int, list[str]] = {}
    first_lines: dict[int, int] = {}
    for line_number, line in enumerate(read_lines(path, "latin-1"), start=1):
        if not line.strip():
            continue
        fields = _split_fields(path, line_number, line, "::", 3, "'MovieID::Title::Genres'")
        movie = _parse_id(path, line_number, fields[0], "MovieID")
        _once(first_lines, movie, path, line_number, "MovieID")
        genres_by_movie[movie] = [genre for genre in fields[-1].strip().split("|") if genre]
    names = sorted({genre for genres in genres_by_movie.values() for genre in genres})
    return genres_by_movie, names


def _ml1m_users(directory: str) -> dict[int, tuple[int, int, int]]:
    path = os.path.join(directory, "users.dat")
    users: dict[int, tuple[int, int, int]] = {}
    first_lines: dict[int, int] = {}
    for line_number, line in enumerate(read_lines(path, "latin-1"), start=1):
        if not line.strip():
            continue
        fields = _split_fields(
            path, line_number, line, "::", 4, "'UserID::Gender::Age::Occupation::Zip-code'"
        )
        user = _parse_id(path, line_number, fields[0], "UserID")
        _once(first_lines, user, path, line_number, "UserID")
        gender = _GENDERS.index(fields[1]) + 1 if fields[1] in _GENDERS else 0
        age_code = _parse_int(path, line_number, fields[2], "Age")
        age = _ML_AGE_CODES.index(age_code) + 1 if age_code in _ML_AGE_CODES else 0
        occupation_code = _parse_int(path, line_number, fields[3], "Occupation")
        occupation = occupation_code + 1 if 0 <= occupation_code < len(_ML1M_OCCUPATIONS) else 0
        users[user] = (gender, age, occupation)
    return users


def _ml100k_items(directory: str) -> tuple[dict[int, list[str]], list[str]]:
    genre_path = os.path.join(directory, "u.genre")
    names: list[str] = []
    if os.path.isfile(genre_path):
        for line in read_lines(genre_path, "latin-1"):
            if line.strip():
                names.append(line.rsplit("|", 1)[0])
    path = os.path.join(directory, "u.item")
    genres_by_movie: dict[int, list[str]] = {}
    first_lines: dict[int, int] = {}
    for line_number, line in enumerate(read_lines(path, "latin-1"), start=1):
        if not line.strip():
            continue
        # The title may not contain '|', but the 19 genre flags are always the last fields.
        fields = _split_fields(
            path, line_number, line, "|", 6, "'id|title|date|video date|url|19 genre flags'"
        )
        flags = fields[5:]
        if not names:
            names = [f"genre_{k}" for k in range(len(flags))]
        if len(flags) != len(names) or any(flag not in ("0", "1") for flag in flags):
            raise DataFormatError(
                path, line_number, f"expected {len(names)} genre flags (0/1) after the url, got {flags!r}"
            )
        movie = _parse_id(path, line_number, fields[0], "movie id")
        _once(first_lines, movie, path, line_number, "movie id")
        genres_by_movie[movie] = [name for name, flag in zip(names, flags) if flag == "1"]
    return genres_by_movie, names


def _ml100k_users(directory: str) -> tuple[dict[int, tuple[int, int, int]], list[str]]:
    occupation_path = os.path.join(directory, "u.occupation")
    path = os.path.join(directory, "u.user")
    lines = read_lines(path, "latin-1")
    if os.path.isfile(occupation_path):
        occupations = [line.strip() for line in read_lines(occupation_path, "latin-1") if line.strip()]
    else:
        occupations = sorted({line.split("|")[3] for line in lines if line.count("|") >= 4})
    users: dict[int, tuple[int, int, int]] = {}
    first_lines: dict[int, int] = {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = _split_fields(path, line_number, line, "|", 5, "'user id|age|gender|occupation|zip code'")
        user = _parse_id(path, line_number, fields[0], "user id")
        _once(first_lines, user, path, line_number, "user id")
        age = _age_bucket(_parse_int(path, line_number, fields[1], "age"))
        gender = _GENDERS.index(fields[2]) + 1 if fields[2] in _GENDERS else 0
        occupation = occupations.index(fields[3]) + 1 if fields[3] in occupations else 0
        users[user] = (gender, age, occupation)
    return users, occupations


_MOVIELENS_ITEM_FILES = ("movies.dat", "u.item")  # ML-1M, ML-100K


def has_movielens_side_files(directory: str) -> bool:
    """Whether ``directory`` holds an ML-1M or ML-100K item file."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in _MOVIELENS_ITEM_FILES)


def load_movielens_side_info(
    dataset: SequenceDataset, data_dir: PathLike, *, remap_ids: Optional[bool] = None
) -> SequenceDataset:
    """Joins MovieLens genres and user demographics onto a dataset.

    Adds ``item_features["genres"]`` (multi-hot float32 [N+1, G], row 0 and unmatched items
    all zero) and ``user_features`` "gender", "age" (the ML-1M buckets Under 18, 18-24, 25-34,
    35-44, 45-49, 50-55, 56+; ML-100K ages are bucketed the same way) and "occupation", each
    int32 with 0 meaning unknown, plus their category names in ``feature_vocabs`` (index k of
    a feature is name k).

    Args:
      dataset: A MovieLens dataset whose raw user and item ids are MovieLens ids, or SASRec's
        remapped ids (ml-1m.txt).
      data_dir: Folder with ML-1M's movies.dat/users.dat (and sas_to_original_*.txt) or
        ML-100K's u.item/u.user (also accepted: its parent holding a folder named like the
        dataset).
      remap_ids: Whether the dataset's ids are SASRec-remapped and must be translated through
        sas_to_original_items.txt / sas_to_original_users.txt. None decides automatically:
        for ML-1M side files, remap when the dataset has no timestamps (ml-1m.txt has none,
        while a raw MovieLens rating log, whose ids are original, always has them), and fail
        if the mapping files are then missing rather than guess.

    Returns:
      A copy of ``dataset`` with the features added (existing other features are kept).

    Raises:
      FileNotFoundError: If no MovieLens side files are found, or ``remap_ids=True`` but the
        mapping files are missing.
      ValueError: If ``remap_ids`` is None, the side files are ML-1M's, the dataset has no
        timestamps and the mapping files are missing (the ids may be remapped or original:
        pass ``remap_ids`` explicitly).
      DataFormatError: If a side file has a malformed line, e.g. a MovieID or UserID not
        written as the interactions' integer ids are ("007", "+8": they would join items 7, 8).
    """
    directory = os.fspath(data_dir)
    candidates = [directory, os.path.join(directory, dataset.name)]
    found = next((candidate for candidate in candidates if has_movielens_side_files(candidate)), None)
    if found is None:
        raise FileNotFoundError(
            f"no MovieLens side files in {os.fspath(data_dir)!r}: expected movies.dat and "
            "users.dat (ML-1M) or u.item and u.user (ML-100K)"
        )
    directory = found

    is_ml1m = os.path.isfile(os.path.join(directory, "movies.dat"))
    item_map_path = os.path.join(directory, "sas_to_original_items.txt")
    user_map_path = os.path.join(directory, "sas_to_original_users.txt")
    if remap_ids is None:
        # ml-1m.txt (no timestamps) holds SASRec-remapped ids; joining them as MovieLens ids
        # would attach the wrong movies' genres while most ids still "match". Without the
        # mappings the ids cannot be told apart, so the caller has to say which they are.
        remap_ids = is_ml1m and dataset.timestamps is None
        missing = [path for path in (item_map_path, user_map_path) if not os.path.isfile(path)]
        if remap_ids and missing:
            raise ValueError(
                f"cannot join MovieLens-1M side info from {directory!r} onto {dataset.name!r}: "
                "a dataset without timestamps is taken to hold SASRec-remapped ids (like "
                f"ml-1m.txt), but the id mapping file(s) {', '.join(map(repr, missing))} are "
                "missing. Add them, or pass remap_ids=False explicitly if the ids are original "
                "MovieLens ids (load_dataset(..., side_info=False) skips side info)"
            )
    item_mapping = user_mapping = None
    if remap_ids:
        for mapping_path in (item_map_path, user_map_path):
            check_file(mapping_path, "id mapping ('remapped_id original_id' per line)")
        item_mapping = _read_id_mapping(item_map_path)
        user_mapping = _read_id_mapping(user_map_path)

    if is_ml1m:
        check_file(os.path.join(directory, "users.dat"), "ML-1M users file")
        genres_by_movie, genre_names = _ml1m_items(directory)
        demographics = _ml1m_users(directory)
        occupation_names = list(_ML1M_OCCUPATIONS)
    else:
        check_file(os.path.join(directory, "u.user"), "ML-100K users file")
        genres_by_movie, genre_names = _ml100k_items(directory)
        demographics, occupation_names = _ml100k_users(directory)

    num_items = dataset.num_items
    genres = np.zeros((num_items + 1, len(genre_names)), dtype=np.float32)
    genre_column = {name: column for column, name in enumerate(genre_names)}
    item_raw_ids = dataset.item_vocab.ids(np.arange(1, num_items + 1)) if num_items else np.array([])
    matched_items = 0
    for index, original in enumerate(_original_ids(item_raw_ids, item_mapping), start=1):
        movie_genres = genres_by_movie.get(original) if original is not None else None
        if movie_genres is not None:
            matched_items += 1
            for genre in movie_genres:
                genres[index, genre_column[genre]] = 1.0

    user_columns = np.zeros((dataset.num_users, 3), dtype=np.int32)
    matched_users = 0
    for row, original in enumerate(_original_ids(np.asarray(dataset.user_ids), user_mapping)):
        values = demographics.get(original) if original is not None else None
        if values is not None:
            matched_users += 1
            user_columns[row] = values

    # A low match rate almost always means ids were (not) remapped by mistake.
    if matched_items < num_items or matched_users < dataset.num_users:
        mostly_unmatched = matched_items < num_items / 2 or matched_users < dataset.num_users / 2
        log = logger.warning if mostly_unmatched else logger.info
        log(
            "MovieLens side info from %s matched %d/%d items and %d/%d users (remap_ids=%s)",
            directory, matched_items, num_items, matched_users, dataset.num_users, remap_ids,
        )

    return dataclasses.replace(
        dataset,
        item_features={**dataset.item_features, "genres": genres},
        user_features={
            **dataset.user_features,
            "gender": user_columns[:, 0].copy(),
            "age": user_columns[:, 1].copy(),
            "occupation": user_columns[:, 2].copy(),
        },
        feature_vocabs={
            **dataset.feature_vocabs,
            "genres": list(genre_names),
            "gender": [UNKNOWN, *_GENDERS],
            "age": [UNKNOWN, *_ML_AGE_NAMES],
            "occupation": [UNKNOWN, *occupation_names],
        },
    )


# ----------------------------------------------------------------------------- TFDS

TFDS_MOVIELENS_1M = "movielens/1m-ratings"


def load_tfds_movielens_1m(data_dir: Optional[PathLike] = None, name: str = "ml-1m-tfds") -> SequenceDataset:
    """Loads MovieLens-1M ratings through TensorFlow Datasets (``movielens/1m-ratings``).

    The raw log is used (all 6,040 users and 3,706 rated movies, ordered by timestamp), which
    is not SASRec's filtered ml-1m.txt; use ``load_dataset("ml-1m", data_dir=...)`` for
    numbers comparable with the literature.

    Args:
      data_dir: TFDS data directory (None: TFDS's default, ~/tensorflow_datasets). If the data
        is already prepared there, no network is needed.
      name: Dataset name.

    Returns:
      The dataset with timestamps; raw ids are MovieLens ids (ints).

    Raises:
      RuntimeError: If tensorflow_datasets is missing or the data is not prepared and cannot be
        downloaded (e.g. no network access).
    """
    try:
        import tensorflow_datasets as tfds  # deferred: importing TFDS takes seconds
    except ImportError as error:
        raise RuntimeError(
            f"loading {TFDS_MOVIELENS_1M!r} needs the tensorflow-datasets package "
            f"({error}); use load_dataset('ml-1m', data_dir=...) with local files"
        ) from error
    where = os.fspath(data_dir) if data_dir is not None else "the default TFDS data directory"
    try:
        builder = tfds.builder(TFDS_MOVIELENS_1M, data_dir=None if data_dir is None else os.fspath(data_dir))
        builder.download_and_prepare()
        batches = tfds.as_numpy(builder.as_dataset(split="train", batch_size=1 << 16))
    except Exception as error:  # TFDS raises many kinds (DownloadError, OSError, ...)
        raise RuntimeError(
            f"tensorflow_datasets {TFDS_MOVIELENS_1M!r} is not prepared in {where}; preparing it "
            f"needs network access to download the data, and that failed "
            f"({type(error).__name__}: {error}); use load_dataset('ml-1m', data_dir=...) with "
            "local files"
        ) from error

    users: list[str] = []
    items: list[str] = []
    times: list[np.ndarray] = []
    for batch in batches:
        users.extend(_decode(value) for value in batch["user_id"])
        items.extend(_decode(value) for value in batch["movie_id"])
        times.append(np.asarray(batch["timestamp"], dtype=np.int64))
    if not items:
        raise RuntimeError(f"tensorflow_datasets {TFDS_MOVIELENS_1M!r} in {where} has no ratings")
    return build_dataset(name, users, items, np.concatenate(times), 0)


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
