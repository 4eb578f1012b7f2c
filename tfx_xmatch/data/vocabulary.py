"""Mapping between raw item ids (from source files) and dense item indices.

Index 0 is reserved for padding and never maps to a raw id; real items are 1..num_items.
Raw ids are either all strings or all integers, and keep their type through save/load, so an
integer id 42 and a string id "42" are never confused.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterable, Optional, Union

import numpy as np

from tfx_xmatch.io_utils import write_json_atomic

RawId = Union[str, int]
PathLike = Union[str, "os.PathLike[str]"]

_FORMAT = "tfx_xmatch.Vocabulary"
_FORMAT_VERSION = 1
_ORDERS = ("first_seen", "frequency", "sorted")


def _normalise_id(raw_id: Any) -> RawId:
    """Returns ``raw_id`` as a plain ``str`` or ``int`` (numpy scalars included)."""
    # bool is an int subclass, but an id True/False is almost certainly a bug upstream.
    if isinstance(raw_id, (bool, np.bool_)):
        raise TypeError(f"item ids must be str or int, got bool {raw_id!r}")
    if isinstance(raw_id, (int, np.integer)):
        return int(raw_id)
    if isinstance(raw_id, str):
        return str(raw_id)
    raise TypeError(
        f"item ids must be str or int, got {type(raw_id).__name__} {raw_id!r}"
    )


def string_array(strings: list[str]) -> np.ndarray:
    """A 1-d object array holding ``strings``, for raw string ids: a fixed-width unicode array
    takes 4 bytes per character of the longest string for every one (one 2,000-character id
    among 50,000 short ones: 400 MB instead of 4 MB) and drops trailing NULs."""
    array = np.empty(len(strings), dtype=object)
    array[:] = strings
    return array


def _id_type_of(ids: list[RawId]) -> str:
    """Returns "int" or "str" for a homogeneous id list; raises on a mix."""
    if not ids:
        return "int"
    first = type(ids[0])
    for raw_id in ids:
        if type(raw_id) is not first:
            raise TypeError(
                "item ids must be all str or all int, got both "
                f"{ids[0]!r} ({first.__name__}) and {raw_id!r} ({type(raw_id).__name__})"
            )
    return "int" if first is int else "str"


class Vocabulary:
    """Raw item ids <-> dense indices, with index 0 reserved for padding.

    Example:
      >>> vocab = Vocabulary(["b", "a"])
      >>> vocab.lookup(["a", "b"])
      array([2, 1], dtype=int32)
      >>> vocab.ids([1])
      array(['b'], dtype=object)
    """

    def __init__(self, ids: Iterable[RawId]) -> None:
        """Creates a vocabulary where ``ids[k]`` gets index ``k + 1``.

        Args:
          ids: Distinct raw ids (all str or all int) in index order 1..N.

        Raises:
          ValueError: If an id occurs twice.
          TypeError: If an id is neither str nor int, or the ids mix both types.
        """
        normalised = [_normalise_id(raw_id) for raw_id in ids]
        self._id_type = _id_type_of(normalised)
        self._index: dict[RawId, int] = {}
        for position, raw_id in enumerate(normalised, start=1):
            previous = self._index.setdefault(raw_id, position)
            if previous != position:
                raise ValueError(
                    f"duplicate item id {raw_id!r} at indices {previous} and {position}; "
                    "vocabulary ids must be distinct"
                )
        self._ids = normalised
        # Position 0 holds a placeholder so ids()[index] needs no offset arithmetic.
        if self._id_type == "int":
            self._id_array = np.array([0] + normalised, dtype=np.int64)
        else:
            self._id_array = string_array([""] + normalised)

    @classmethod
    def build(
        cls, raw_ids: Iterable[RawId], order: str = "first_seen", min_count: int = 1
    ) -> "Vocabulary":
        """Builds a vocabulary from raw ids as they occur in interactions (with repeats).

        Args:
          raw_ids: Raw ids, repeated as often as they occur.
          order: "first_seen" (order of first occurrence), "frequency" (most frequent first,
            ties by first occurrence) or "sorted" (ascending raw id; for integer ids 1..N this
            keeps id i at index i).
          min_count: Ids occurring fewer times are left out.

        Returns:
          The vocabulary.

        Raises:
          ValueError: If ``order`` is unknown or ``min_count`` is below 1.
          TypeError: If the ids are not all str or all int.
        """
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count!r}")
        # Counter preserves first-occurrence order, which "first_seen" and frequency ties use.
        counts = collections.Counter(_normalise_id(raw_id) for raw_id in raw_ids)
        kept = [raw_id for raw_id, count in counts.items() if count >= min_count]
        _id_type_of(kept)
        if order == "frequency":
            kept.sort(key=lambda raw_id: -counts[raw_id])
        elif order == "sorted":
            kept.sort()
        return cls(kept)

    @property
    def num_items(self) -> int:
        """Number of real items (indices 1..num_items)."""
        return len(self._ids)

    @property
    def id_type(self) -> str:
        """"int" or "str": the type of the raw ids."""
        return self._id_type

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, raw_id: object) -> bool:
        try:
            return _normalise_id(raw_id) in self._index
        except TypeError:
            return False

    def __iter__(self):
        return iter(self._ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._id_type == other._id_type and self._ids == other._ids

    __hash__ = None  # equal vocabularies must hash equal; ids lists are not hashable cheaply

    def __repr__(self) -> str:
        preview = ", ".join(repr(raw_id) for raw_id in self._ids[:3])
        more = ", ..." if len(self._ids) > 3 else ""
        return f"Vocabulary(num_items={self.num_items}, id_type={self._id_type!r}, ids=[{preview}{more}])"

    def index(self, raw_id: RawId) -> int:
        """Returns the index of one raw id.

        Args:
          raw_id: A raw id of this vocabulary's type.

        Returns:
          Its index in 1..num_items.

        Raises:
          KeyError: If the id is unknown.
        """
        try:
            return self._index[_normalise_id(raw_id)]
        except (KeyError, TypeError):
            raise KeyError(self._unknown_message(raw_id)) from None

    def lookup(self, raw_ids: Union[RawId, Iterable[RawId]], default: Optional[int] = None) -> np.ndarray:
        """Maps raw ids to indices.

        Args:
          raw_ids: One raw id or an iterable of them.
          default: Index to return for unknown ids (e.g. 0, the padding index). When None,
            unknown ids raise.

        Returns:
          int32 array of indices, shaped like ``raw_ids`` (0-d for a single id).

        Raises:
          KeyError: If an id is unknown and ``default`` is None; the message names the id.
        """
        if isinstance(raw_ids, (str, int, np.integer, np.str_)):
            return np.asarray(self._lookup_one(raw_ids, default), dtype=np.int32)
        values = raw_ids.tolist() if isinstance(raw_ids, np.ndarray) else list(raw_ids)
        return np.fromiter(
            (self._lookup_one(raw_id, default) for raw_id in values), dtype=np.int32, count=len(values)
        )

    def _lookup_one(self, raw_id: Any, default: Optional[int]) -> int:
        index = self._index.get(raw_id) if isinstance(raw_id, (str, int)) else None
        if index is not None and not isinstance(raw_id, bool):
            return index
        if default is not None:
            return default
        # Slow path: numpy scalars and wrong types get a precise error.
        return self.index(raw_id)

    def _unknown_message(self, raw_id: Any) -> str:
        hint = ""
        if self._id_type == "int" and isinstance(raw_id, str):
            hint = " (this vocabulary has integer ids; pass int, not str)"
        elif self._id_type == "str" and isinstance(raw_id, (int, np.integer)):
            hint = " (this vocabulary has string ids; pass str, not int)"
        return f"unknown item id {raw_id!r}{hint}"

    def ids(self, indices: Union[int, Iterable[int]]) -> np.ndarray:
        """Maps indices back to raw ids.

        Args:
          indices: One index or an iterable/array of indices in 1..num_items.

        Returns:
          Array of raw ids shaped like ``indices``: int64, or object holding ``str`` (not a
          fixed-width unicode array, whose size follows the longest id); one index gives one
          id (``np.int64`` or ``str``).

        Raises:
          IndexError: If an index is 0 (padding) or out of range; the message names it.
        """
        array = np.asarray(indices)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"indices must be integers, got dtype {array.dtype} ({array!r})")
        array = array.astype(np.int64)
        bad = (array < 1) | (array > self.num_items)
        if np.any(bad):
            first_bad = int(array[bad].flat[0])
            raise IndexError(
                f"item index {first_bad} is out of range 1..{self.num_items}"
                + (" (0 is padding, it has no raw id)" if first_bad == 0 else "")
            )
        return self._id_array[array]

    def to_json(self) -> dict:
        """Returns the JSON-serialisable form written by :meth:`save`."""
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "id_type": self._id_type,
            "num_items": self.num_items,
            "ids": list(self._ids),
        }

    @classmethod
    def from_json(cls, value: dict, source: str = "<json>") -> "Vocabulary":
        """Rebuilds a vocabulary from :meth:`to_json` output.

        Args:
          value: The decoded JSON object.
          source: Where it came from, for error messages.

        Returns:
          The vocabulary.

        Raises:
          ValueError: If the object is not a vocabulary of a known version, or its ids do not
            have the declared type.
        """
        if not isinstance(value, dict) or value.get("format") != _FORMAT:
            raise ValueError(f"{source}: not a tfx_xmatch vocabulary (missing format {_FORMAT!r})")
        if value.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"{source}: vocabulary version {value.get('version')!r} is not supported "
                f"(expected {_FORMAT_VERSION})"
            )
        id_type = value.get("id_type")
        expected = {"int": int, "str": str}.get(id_type)
        if expected is None:
            raise ValueError(f"{source}: id_type must be 'int' or 'str', got {id_type!r}")
        ids = value.get("ids")
        if not isinstance(ids, list):
            raise ValueError(f"{source}: 'ids' must be a list, got {type(ids).__name__}")
        for raw_id in ids:
            if type(raw_id) is not expected:
                raise ValueError(f"{source}: id {raw_id!r} is not of declared id_type {id_type!r}")
            if expected is int and not np.iinfo(np.int64).min <= raw_id <= np.iinfo(np.int64).max:
                raise ValueError(f"{source}: id {raw_id!r} is out of the int64 range")
        if "num_items" in value and value["num_items"] != len(ids):
            raise ValueError(f"{source}: num_items is {value['num_items']!r} but it lists {len(ids):,} ids")
        try:
            vocabulary = cls(ids)
        except ValueError as error:  # duplicate ids: named with the file they came from
            raise ValueError(f"{source}: {error}") from error
        vocabulary._id_type = id_type  # an empty list would otherwise default to "int"
        return vocabulary

    def save(self, path: PathLike) -> None:
        """Writes the vocabulary as JSON (with its id type), atomically.

        Args:
          path: Destination file (missing parent directories are created).
        """
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: PathLike) -> "Vocabulary":
        """Reads a vocabulary written by :meth:`save`.

        Args:
          path: The JSON file.

        Returns:
          The vocabulary.

        Raises:
          FileNotFoundError: If the file does not exist.
          ValueError: If the file is not a valid vocabulary.
        """
        path = os.fspath(path)
        if "://" in path:  # gs://... as TFX hands it over: read through tf.io.gfile
            import tensorflow as tf

            if not tf.io.gfile.exists(path):
                raise FileNotFoundError(f"item vocabulary {path!r} not found")
            text = tf.io.gfile.GFile(path).read()
        else:
            with open(path, "rb") as handle:
                text = handle.read()
        try:
            value = json.loads(text.decode("utf-8-sig") if isinstance(text, bytes) else text)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not valid UTF-8 ({error})") from error
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        return cls.from_json(value, source=path)
