"""Loaders that turn interaction files into a SequenceDataset.

Three on-disk formats are read: one "user item" pair per line (SASRec's ml-1m.txt), one user
per line "uid item1 item2 ..." (Beauty.txt, LastFM.txt), and rating logs with timestamps
(MovieLens u.data / ratings.dat / ratings.csv), plus typed tables (CSV, TSV, Parquet) through
:func:`load_table`. MovieLens side files (genres, demographics) are joined in
``tfx_xmatch.data.movielens``, and ``tfx_xmatch.data.registry.load_dataset`` resolves the names
of the benchmark datasets to files under a data directory.

Raw ids that are all canonical non-negative integers ("1", "42", not "007") are kept as ints
and indexed in ascending order, so a file whose items are already 1..N keeps item i at index i
(results stay comparable with the literature); other ids are kept as strings, indexed in order
of first appearance. Ids are taken exactly as written, never stripped: fields of the
space-separated formats split at ASCII spaces and tabs only, a CSV or rating-log id with spaces
around it is refused (a Parquet string is kept as stored), and so is an id holding a control
character other than tab.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from typing import Any, Collection, Iterator, Optional, Sequence, Union

import numpy as np

from tfx_xmatch.data.dataset import SequenceDataset
from tfx_xmatch.data.vocabulary import PathLike, Vocabulary, string_array
from tfx_xmatch.user_errors import shortened

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"


class DataFormatError(ValueError):
    """A data file has a malformed line (or no interactions at all).

    Attributes:
      path: The file.
      line_number: 1-based line number of the bad line, or None for whole-file problems.
      problem: What is wrong, without the location prefix.
    """

    def __init__(self, path: PathLike, line_number: Optional[int], problem: str) -> None:
        self.path = os.fspath(path)
        self.line_number = line_number
        self.problem = problem
        location = self.path if line_number is None else f"{self.path}:{line_number}"
        super().__init__(f"{location}: {problem}")

    def __reduce__(self):
        # Needed because __init__ takes other arguments than the message (pickling, e.g.
        # across multiprocessing workers, would fail otherwise).
        return (type(self), (self.path, self.line_number, self.problem))


def _check_min_rating(min_rating: Any) -> None:
    if min_rating is not None and (isinstance(min_rating, bool) or not isinstance(min_rating, (int, float))
                                   or not math.isfinite(min_rating)):
        raise ValueError(f"min_rating must be a finite number, got {min_rating!r}")


class _BadLines:
    """Fails on the first malformed line, or counts them when asked to skip."""

    def __init__(self, path: str, skip: bool) -> None:
        self.path = path
        self.skip = skip
        self.count = 0
        self.first: Optional[DataFormatError] = None

    def report(self, line_number: int, problem: str) -> None:
        error = DataFormatError(self.path, line_number, problem)
        if not self.skip:
            raise error
        self.count += 1
        if self.first is None:
            self.first = error

    def log(self) -> None:
        if self.count:
            logger.warning(
                "skipped %d malformed line(s) in %s; first: %s", self.count, self.path, self.first
            )


def check_file(path: PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    return path


_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINE_BREAK_BYTES = re.compile(rb"\r\n|\r|\n")


def decoded_lines(data: bytes, encoding: str) -> Iterator[tuple[int, str, Optional[str]]]:
    """(line number, text, problem) of a text file's bytes, numbered from 1.

    A line that does not decode comes back as "" with a problem naming the bytes and column,
    so readers fail on it, or skip it, like any malformed line. Lines end at \\n, \\r\\n or \\r
    only: ``str.splitlines`` would also split a field at characters such as U+0085, which a
    latin-1 file holds as a plain byte.
    """
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        text = None
    if text is not None:
        lines = _LINE_BREAK.split(text)
        if lines and not lines[-1]:
            lines.pop()
        for number, line in enumerate(lines, start=1):
            yield number, line, None
        return
    raw_lines = _LINE_BREAK_BYTES.split(data)
    if raw_lines and not raw_lines[-1]:
        raw_lines.pop()
    for number, raw in enumerate(raw_lines, start=1):
        try:
            yield number, raw.decode(encoding), None
        except UnicodeDecodeError as error:
            yield number, "", (f"not valid {encoding}: byte(s) {raw[error.start:error.end]!r} at column "
                               f"{error.start + 1}")


# Fields of the whitespace-separated formats are separated by ASCII spaces and tabs only:
# str.split() also splits at U+00A0, U+3000, U+0085 and \x1c-\x1f, characters an id may hold
# (a name in another script), which turned one id into several without a word.
_SPACES = " \t"
_FIELD_SEPARATOR = re.compile(r"[ \t]+")


def split_fields(line: str) -> list[str]:
    """The fields of a line separated by runs of ASCII spaces and tabs (none for a blank line);
    every other character, Unicode spaces included, belongs to a field byte for byte."""
    line = line.strip(_SPACES)
    return _FIELD_SEPARATOR.split(line) if line else []


_UTF8_BOM = b"\xef\xbb\xbf"


def read_lines(path: str, encoding: str) -> list[str]:
    """The lines of a file in a fixed format; an undecodable line fails with its line number."""
    with open(path, "rb") as handle:
        data = handle.read()
    # A byte-order mark left by an editor: read as latin-1 it would be part of the first id.
    data = data[len(_UTF8_BOM):] if data.startswith(_UTF8_BOM) else data
    lines = []
    for number, line, problem in decoded_lines(data, encoding):
        if problem is not None:
            raise DataFormatError(path, number, problem)
        lines.append(line)
    return lines


def record_lines(data: bytes, encoding: str, has_header: bool = False):
    """(line number, line, problem) of a line-per-record file's bytes, without its header line.

    ``problem`` names an undecodable line, or the header line found again further down (files
    concatenated with their headers: with string ids it would load as one more event).
    """
    header = None
    for number, line, problem in decoded_lines(data, encoding):
        if has_header and number == 1:
            header = line.strip()
            continue
        if problem is None and header and line.strip() == header:
            problem = REPEATED_HEADER
        yield number, line, problem


REPEATED_HEADER = "the header line again (files concatenated with their headers?)"


def _parsed_text_lines(path: str, encoding: str, parser: "LineParser", skip_header: bool = False):
    """(line number, ParsedLine) of a line-per-record file; undecodable lines are malformed ones."""
    with open(path, "rb") as handle:
        data = handle.read()
    for number, line, problem in record_lines(data, encoding, skip_header):
        yield number, parser.parse(line) if problem is None else ParsedLine(problem=problem)


_INT64_MAX = str(2**63 - 1)


def is_canonical_int(token: str) -> bool:
    # isdigit alone accepts non-ASCII digits such as "²"; leading zeros would make "7" and
    # "007" collide once parsed, and ids past int64 do not fit the int64 id arrays, so such
    # files keep string ids.
    return (token.isascii() and token.isdigit() and (token == "0" or token[0] != "0")
            and (len(token), token) <= (len(_INT64_MAX), _INT64_MAX))


_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _typed_unique(tokens: Sequence[str], what: str = "ids",
                  header_tokens: Collection[str] = ()) -> tuple[list[str], list[Union[int, str]], bool]:
    """Distinct tokens in first-seen order, their typed ids, and whether the ids are ints.

    A few non-integer tokens among integer ones turn every id into a string (and reorder the
    indices), which is what a stray typo does too: that case is logged with the first such token.
    ``header_tokens`` are the tokens read from the first line of a file that may begin with a
    header line (a text file whose first line was not skipped as one).
    """
    unique = list(dict.fromkeys(tokens))
    odd = [token for token in unique if not is_canonical_int(token)]
    if unique and not odd:
        return unique, [int(token) for token in unique], True
    if unique and len(odd) * 2 < len(unique):
        if _NUMBER.fullmatch(odd[0]):  # "-5", "007", "1.5": a number, not a column name
            hint = "ids are integers only when all are digits without a sign or leading zeros, up to 2**63-1"
        elif odd[0] in header_tokens:  # what a header line ("user item") loaded as data gives
            hint = "the first line of the file, a header? drop it"
        else:
            hint = "a typo? integer ids keep their numeric order"
        logger.warning("%s are read as strings, indexed in order of first appearance: %d of %d are not canonical "
                       "integers, the first %r (%s)", what, len(odd), len(unique), odd[0], hint)
    return unique, list(unique), False


def _no_interactions(path: str, bad: _BadLines, reason: str = "") -> DataFormatError:
    detail = f" ({bad.count} malformed line(s) skipped)" if bad.count else ""
    return DataFormatError(path, None, f"file has no interactions{reason}{detail}")


_SEPARATOR_NAMES = {"::": "'::'", "\t": "tab", ",": "comma", None: "space/tab"}


def _detect_separator(line: str) -> Optional[str]:
    for separator in ("::", "\t", ","):
        if separator in line:
            return separator
    return None


@dataclasses.dataclass
class ParsedLine:
    """What one input line holds.

    Attributes:
      events: (user, item, timestamp) tokens in line order; timestamp is 0 without a column.
      problem: Why the line is malformed (without the location), or None.
      filtered: The line was well formed but dropped by ``min_rating``.
    """

    events: list = dataclasses.field(default_factory=list)
    problem: Optional[str] = None
    filtered: bool = False


class LineParser:
    """Parses the lines of one interaction file; the loaders and the Beam ``prepare`` pipeline
    both read through it, so they accept and reject exactly the same lines.

    A rating log without ``sep`` detects the separator from its first non-blank line, so use
    one parser per file.

    Args:
      format: "pairs" ("user item"), "sequences" ("uid item1 item2 ...") or "ratings".
      sep: Ratings only: field separator, or None to detect it.
      columns: Ratings only: the name of each field (see ``load_rating_log``).
      min_rating: Ratings only: drop events rated below it.

    Raises:
      ValueError: On an unknown format, or ``columns`` without "user"/"item", with a repeated
        known name, or without "rating" while ``min_rating`` is given.
    """

    def __init__(
        self,
        format: str,
        *,
        sep: Optional[str] = None,
        columns: Sequence[Optional[str]] = ("user", "item", "rating", "timestamp"),
        min_rating: Optional[float] = None,
    ) -> None:
        if format not in ("pairs", "sequences", "ratings"):
            raise ValueError(f"format must be 'pairs', 'sequences' or 'ratings', got {format!r}")
        self.format = format
        self.what, self.expected = {
            "pairs": ("pairs file", "user item"),
            "sequences": ("sequences file", "uid item1 item2 ..."),
            "ratings": ("rating log", "user item rating timestamp"),
        }[format]
        columns = tuple(columns)
        _check_min_rating(min_rating)
        if format == "ratings":
            for required in ("user", "item"):
                if required not in columns:
                    raise ValueError(f"columns must include {required!r}, got {columns!r}")
            for known in ("user", "item", "rating", "timestamp"):
                if columns.count(known) > 1:
                    raise ValueError(f"column {known!r} appears more than once in {columns!r}")
            if min_rating is not None and "rating" not in columns:
                raise ValueError(f"min_rating={min_rating!r} needs a 'rating' column, got columns {columns!r}")
        self.columns = columns
        self.min_rating = min_rating
        self.separator = sep
        self._detected = sep is not None
        self.has_timestamps = format == "ratings" and "timestamp" in columns

    def parse(self, line: str) -> ParsedLine:
        """Parses one line (blank lines give no events and no problem)."""
        if self.format == "ratings":
            return self._parse_rating(line)
        fields = split_fields(line)
        num_items = len(fields) - 1
        if num_items >= 1 and (self.format == "sequences" or num_items == 1):
            if _CONTROL_CHARACTER.search(line):  # rare: the fields are looked at one by one only then
                problem = next(filter(None, (_id_problem(field, role) for field, role in
                                             zip(fields, ["user id", *["item id"] * num_items]))))
                return ParsedLine(problem=problem)
            return ParsedLine([(fields[0], item, 0) for item in fields[1:]])
        if not fields:
            return ParsedLine()
        hint = " (a user with no items)" if self.format == "sequences" else ""
        return ParsedLine(problem=f"expected {self.expected!r}, got {shortened(line.strip(_SPACES))!r}{hint}")

    def _parse_rating(self, line: str) -> ParsedLine:
        if not split_fields(line):
            return ParsedLine()
        if not self._detected:
            self.separator = _detect_separator(line)
            self._detected = True
        columns = self.columns
        # Fields are not stripped: an id is taken as written (see _id_problem).
        fields = split_fields(line) if self.separator is None else line.split(self.separator)
        if len(fields) != len(columns):
            expected = " ".join(str(column) for column in columns)
            return ParsedLine(problem=(
                f"expected {len(columns)} {_SEPARATOR_NAMES.get(self.separator, repr(self.separator))}-separated "
                f"fields '{expected}', got {shortened(line.strip(_SPACES))!r}"))
        user, item = fields[columns.index("user")], fields[columns.index("item")]
        timestamp = fields[columns.index("timestamp")] if "timestamp" in columns else None
        rating = fields[columns.index("rating")] if "rating" in columns else None
        return _event(user, item, timestamp, rating, self.min_rating, line)


_TIMESTAMP = re.compile(r"-?[0-9]+")


# C0 control characters other than tab: NumPy's fixed-width strings drop a trailing NUL (so
# "a\x00" was once served as "a", or broke the export's lookup table), C strings end at one, and
# \x0b-\x0d, \x1c-\x1f break lines or fields for str.splitlines/str.split in the tools around
# the data. A tab is allowed where it is not the separator (a quoted CSV field, Parquet).
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f]")


def _id_problem(text: str, field: str, exact: bool = False) -> Optional[str]:
    """Why ``text`` cannot be an id, or None: it holds a control character, or, unless
    ``exact`` (a typed value, e.g. a Parquet string), spaces or tabs around it."""
    control = _CONTROL_CHARACTER.search(text)
    if control:
        return (f"{field} {shortened(repr(text))} holds the control character {control.group()!r} at "
                f"position {control.start() + 1}; ids may hold no control character U+0000-U+001F but tab")
    if not exact and text != text.strip(_SPACES):
        # Stripping would merge " a" with "a" and keeping both would split one id in two; both
        # silently. The field says which it meant only to its writer.
        return (f"{field} {shortened(repr(text))} has spaces or tabs around it; ids are taken exactly as "
                f"written, so it would be another id than {shortened(text.strip(_SPACES))!r}: remove them (a file "
                "written with ', ' between its fields: rewrite it with ',' alone, or read a rating log with "
                "sep=', ')")
    return None


def _id_text(value: Any, field: str, exact: bool) -> tuple[str, Optional[str]]:
    """(the id as text, a problem or None). Text files give strings; Parquet columns give
    Python values, of which only integers, strings and UTF-8 bytes are ids, kept as stored
    (``exact``)."""
    if value is None:
        return "", None
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return "", f"{field} {bytes(value)!r} is not valid UTF-8"
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        # A float column is most often integers with nulls (pandas stores those as floats):
        # "1.0" and "nan" would become ids of their own.
        return "", (f"{field} {value!r} is a {type(value).__name__}; ids must be integers or strings "
                    "(an integer column with nulls is stored as floats: drop the nulls or cast it)")
    text = str(value)
    return text, _id_problem(text, field, exact) if text.strip(_SPACES) else None


def _event(user: Any, item: Any, timestamp: Any, rating: Any, min_rating: Optional[float], record: str,
           fields: tuple[str, str] = ("user id", "item id"), exact: bool = False) -> ParsedLine:
    """One event from its fields (timestamp/rating None when the input has no such column);
    ``fields`` names the user and item fields in messages, ``exact`` is as for ``_id_problem``."""
    (user, user_problem), (item, item_problem) = _id_text(user, fields[0], exact), _id_text(item, fields[1], exact)
    if not user.strip(_SPACES) or not item.strip(_SPACES):
        return ParsedLine(problem=user_problem or item_problem or
                          f"empty user or item field in {shortened(record)!r}")
    if user_problem or item_problem:
        return ParsedLine(problem=user_problem or item_problem)
    time_value = 0
    if timestamp is not None:
        text = str(timestamp).strip()
        # Only plain ASCII digits: int() also reads "+100", "5_0" and other scripts' digits.
        if isinstance(timestamp, bool) or not _TIMESTAMP.fullmatch(text):
            return ParsedLine(problem=f"timestamp {timestamp!r} is not an integer")
        time_value = int(text)
        if not np.iinfo(np.int64).min <= time_value <= np.iinfo(np.int64).max:
            return ParsedLine(problem=f"timestamp {timestamp!r} is out of the int64 range")
    if rating is not None:
        try:
            # Ratings are read as numbers, not only integers: MovieLens-20M/latest logs have
            # half stars ("3.5").
            rating_value = float(str(rating).strip())
        except ValueError:
            return ParsedLine(problem=f"rating {rating!r} is not a number")
        if not math.isfinite(rating_value):
            # "nan" < min_rating is False: a NaN would pass any threshold.
            return ParsedLine(problem=f"rating {rating!r} is not a finite number")
        if min_rating is not None and rating_value < min_rating:
            return ParsedLine(filtered=True)
    return ParsedLine([(user, item, time_value)])


TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


class RowParser:
    """Parses rows with named columns (CSV/TSV with a header line, Parquet); shared by
    :func:`load_table` and the Beam ``prepare`` pipeline.

    Args:
      user_column: Name of the user id column.
      item_column: Name of the item id column.
      timestamp_column: Name of the integer unix-time column that orders events, or None.
      rating_column: Name of the rating column (needed for ``min_rating``), or None.
      min_rating: Drop events rated below it.

    Raises:
      ValueError: If ``min_rating`` is given without ``rating_column``, or a name is empty.
    """

    def __init__(self, user_column: str = "user", item_column: str = "item", timestamp_column: Optional[str] = None,
                 rating_column: Optional[str] = None, min_rating: Optional[float] = None) -> None:
        if not user_column or not item_column:
            raise ValueError(f"user_column and item_column must be names, got {user_column!r} and {item_column!r}")
        _check_min_rating(min_rating)
        if min_rating is not None and not rating_column:
            raise ValueError(f"min_rating={min_rating!r} needs rating_column")
        self.columns = {"user": user_column, "item": item_column, "timestamp": timestamp_column,
                        "rating": rating_column}
        self.min_rating = min_rating
        self.has_timestamps = timestamp_column is not None

    def check_header(self, path: str, header: Sequence[str]) -> None:
        """Raises DataFormatError if a configured column is missing from ``header``, or named twice."""
        missing = [name for name in self.columns.values() if name and name not in header]
        if missing:
            raise DataFormatError(path, 1, f"missing column(s) {missing}; the header has {list(header)}")
        # A row would keep only the last of them.
        repeated = sorted({name for name in self.columns.values() if name and list(header).count(name) > 1})
        if repeated:
            raise DataFormatError(path, 1, f"column(s) {repeated} appear more than once in the header {list(header)}")

    def parse(self, row: dict, *, typed: bool = False) -> ParsedLine:
        """Parses one row; a CSV row with more fields than the header holds them under None.

        ``typed``: the row's values are typed (Parquet, see ``is_typed_table``), and its string
        ids are kept exactly as stored; a CSV field's id may have no spaces around it.
        """
        # csv.DictReader keeps a long row's extra fields under the key None: shown as they are.
        record = ", ".join(f"{key}={value}" if key is not None else ", ".join(map(str, value))
                           for key, value in row.items())
        if row.get(None):
            extra = row[None]
            return ParsedLine(problem=f"{len(extra)} field(s) more than the header has: {shortened(repr(extra))} "
                                      f"in {shortened(record)!r}")
        values = {}
        for role, column in self.columns.items():
            value = row.get(column) if column else None
            if column and value is None:
                return ParsedLine(problem=f"no value for column {column!r} (a short row or a null) in "
                                          f"{shortened(record)!r}")
            if role in ("user", "item") and isinstance(value, str) and ("\n" in value or "\r" in value):
                return ParsedLine(problem=f"column {column!r} runs over several lines (an unclosed quote?): "
                                          f"{shortened(value)!r}")
            values[role] = value
        fields = tuple(f"{role} id" + ("" if self.columns[role] == role else f" (column {self.columns[role]!r})")
                       for role in ("user", "item"))
        return _event(values["user"], values["item"], values["timestamp"], values["rating"], self.min_rating,
                      record, fields, exact=typed)


def is_typed_table(path: str) -> bool:
    """Whether ``table_rows`` gives the file's values typed (Parquet), not as CSV text."""
    return os.path.splitext(path)[1].lower() == ".parquet"


def table_rows(data: bytes, path: str, parser: RowParser, *, sep: Optional[str] = None,
               encoding: str = "utf-8-sig") -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    """(line or row number, row dict, problem) of a CSV/TSV (header first) or Parquet file's bytes.

    CSV numbers are the physical line where the row starts (the header is line 1); Parquet
    numbers are 1-based row numbers. A line that does not decode gives no row and a problem.

    Raises:
      DataFormatError: If a configured column is missing, the header does not decode, or the
        file cannot be parsed.
      ValueError: If the file name has none of the suffixes in ``TABLE_SUFFIXES``.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"table files must end in one of {TABLE_SUFFIXES}, got {path!r}")
    if is_typed_table(path):
        import io

        try:
            import pyarrow.parquet as parquet
        except ImportError as error:
            raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from error
        try:
            table = parquet.read_table(io.BytesIO(data))
        except Exception as error:  # pyarrow raises several types for a broken file
            raise DataFormatError(path, None, f"not a readable Parquet file ({error})") from error
        parser.check_header(path, table.column_names)
        for number, row in enumerate(table.to_pylist(), start=1):
            yield number, row, None
        return
    import csv

    lines, undecodable = [], {}
    for number, line, problem in decoded_lines(data, encoding):
        if problem is not None:
            if number == 1:
                raise DataFormatError(path, 1, f"the header line is {problem}")
            undecodable[number] = problem
        lines.append(line + "\n")
    # An undecodable line reads as a blank one, which keeps the numbering and ends no row.
    reader = csv.reader(lines, delimiter=sep or ("\t" if suffix == ".tsv" else ","))
    try:
        header = next(reader, [])
        parser.check_header(path, header)
        previous = reader.line_num
        for fields in reader:
            start, previous = previous + 1, reader.line_num
            if start in undecodable:
                yield start, None, undecodable[start]
            elif reader.line_num > start:
                # A quote left open in any column, used or not (a title), reads the lines after
                # it as that field: rows lost without a word. Interaction files keep each row on
                # one line.
                column = next((name for name, value in zip(header, fields) if "\n" in value or "\r" in value),
                              f"#{len(fields)}")
                yield start, None, (f"column {column!r} runs over several lines (an unclosed quote?): lines "
                                    f"{start} to {reader.line_num} read as one row")
            elif fields and fields == header:
                yield start, None, REPEATED_HEADER
            elif fields and len(fields) < len(header):
                # Shifted or cut short: its values may sit under the wrong columns, used or not.
                yield start, None, (f"{len(header) - len(fields)} field(s) fewer than the header has: "
                                    f"{shortened(repr(fields))} under the header {shortened(repr(header))}")
            elif fields:
                row = dict(zip(header, fields))
                if len(fields) > len(header):
                    row[None] = fields[len(header):]
                yield start, row, None
    except csv.Error as error:
        raise DataFormatError(path, reader.line_num, f"not readable as CSV: {error}") from error


def load_table(
    path: PathLike,
    name: Optional[str] = None,
    *,
    user_column: str = "user",
    item_column: str = "item",
    timestamp_column: Optional[str] = None,
    rating_column: Optional[str] = None,
    min_rating: Optional[float] = None,
    sep: Optional[str] = None,
    skip_bad_lines: bool = False,
    encoding: str = "utf-8-sig",
) -> SequenceDataset:
    """Loads a table of events with named columns: CSV/TSV with a header line, or Parquet.

    Args:
      path: A ``.csv``, ``.tsv`` or ``.parquet`` file.
      name: Dataset name; defaults to the file name without extension.
      user_column: The user id column.
      item_column: The item id column.
      timestamp_column: Integer unix-time column ordering each user's events (ties keep file
        order), or None for file order.
      rating_column: Rating column, needed for ``min_rating``.
      min_rating: Keep only events rated at least this much.
      sep: CSV delimiter (default: comma, tab for ``.tsv``).
      skip_bad_lines: Skip (and count) malformed rows instead of failing.
      encoding: Text encoding of CSV/TSV files.

    Returns:
      The dataset, with timestamps when ``timestamp_column`` is given.

    Raises:
      FileNotFoundError: If the file does not exist.
      ValueError: On a bad suffix or ``min_rating`` without ``rating_column``.
      DataFormatError: On a missing column, a malformed row (unless skipped) or no events.
    """
    parser = RowParser(user_column, item_column, timestamp_column, rating_column, min_rating)
    path = check_file(path, "table of events")
    bad = _BadLines(path, skip_bad_lines)
    with open(path, "rb") as handle:
        data = handle.read()
    rows = table_rows(data, path, parser, sep=sep, encoding=encoding)
    typed = is_typed_table(path)
    users, items, times, _, _ = _collect(
        ((number, parser.parse(row, typed=typed) if problem is None else ParsedLine(problem=problem))
         for number, row, problem in rows), bad)
    if not items:
        raise _no_interactions(path, bad)
    timestamps = np.array(times, dtype=np.int64) if parser.has_timestamps else None
    return build_dataset(name or _default_name(path), users, items, timestamps, bad.count)


# The user and item tokens of a text file's first line, which may be a header read as data.
_HeaderTokens = tuple[Collection[str], Collection[str]]
_NO_HEADER: _HeaderTokens = ((), ())


def _collect(parsed_lines, bad: _BadLines) -> tuple[list[str], list[str], list[int], int, _HeaderTokens]:
    """(users, items, timestamps, lines filtered by min_rating, the user and item tokens of line 1)
    of (line number, ParsedLine) pairs; malformed lines go to ``bad`` (which fails or counts them)."""
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    filtered = 0
    line_one: _HeaderTokens = (set(), set())
    for line_number, parsed in parsed_lines:
        if parsed.problem is not None:
            bad.report(line_number, parsed.problem)
        filtered += parsed.filtered
        for user, item, timestamp in parsed.events:
            users.append(user)
            items.append(item)
            times.append(timestamp)
            if line_number == 1:
                line_one[0].add(user)
                line_one[1].add(item)
    bad.log()
    return users, items, times, filtered, line_one


def vocabulary_from_tokens(item_tokens: Sequence[str],
                           header_tokens: Collection[str] = ()) -> tuple[Vocabulary, dict[str, int]]:
    """The item vocabulary of item tokens in file order (repeats allowed), and token -> index.

    Canonical integer ids are indexed in ascending order, other ids in order of first
    appearance (see the module docstring). ``header_tokens``: the item tokens of the first line
    of a text file that may begin with a header line (only for the warning about odd ids).
    """
    unique_items, item_ids, items_are_ints = _typed_unique(item_tokens, "item ids", header_tokens)
    vocabulary = Vocabulary(sorted(item_ids) if items_are_ints else item_ids)
    return vocabulary, dict(zip(unique_items, vocabulary.lookup(item_ids).tolist()))


def build_dataset(
    name: str,
    user_tokens: list[str],
    item_tokens: list[str],
    timestamps: Optional[np.ndarray],
    skipped_lines: int,
    header_tokens: _HeaderTokens = _NO_HEADER,
) -> SequenceDataset:
    """Groups interactions by user (users in order of first appearance).

    Within a user, events keep file order, or are sorted by timestamp (stably, so ties keep
    file order) when timestamps are given. ``header_tokens``: see ``_collect``, for a text file
    whose first line may be a header read as data.
    """
    vocabulary, token_to_index = vocabulary_from_tokens(item_tokens, header_tokens[1])
    items = np.fromiter(map(token_to_index.__getitem__, item_tokens), np.int32, len(item_tokens))

    unique_users, user_ids, users_are_ints = _typed_unique(user_tokens, "user ids", header_tokens[0])
    user_to_row = {token: row for row, token in enumerate(unique_users)}
    rows = np.fromiter(map(user_to_row.__getitem__, user_tokens), np.int64, len(user_tokens))

    order = np.arange(len(rows))
    if timestamps is not None:
        order = np.argsort(timestamps, kind="stable")
    # A stable sort by row on top of the timestamp order gives (row, timestamp, file position).
    order = order[np.argsort(rows[order], kind="stable")]
    counts = np.bincount(rows, minlength=len(unique_users))
    boundaries = np.cumsum(counts)[:-1]
    sequences = np.split(items[order], boundaries)
    sequence_timestamps = None
    if timestamps is not None:
        sequence_timestamps = np.split(timestamps[order].astype(np.int64), boundaries)
        _warn_of_repeated_events(rows[order], items[order], timestamps[order], user_ids, vocabulary)

    user_array = np.array(user_ids, dtype=np.int64) if users_are_ints else string_array(user_ids)
    return SequenceDataset(
        name=name,
        sequences=sequences,
        item_vocab=vocabulary,
        user_ids=user_array,
        timestamps=sequence_timestamps,
        skipped_lines=skipped_lines,
    )


def _warn_of_repeated_events(rows: np.ndarray, items: np.ndarray, times: np.ndarray, user_ids, vocabulary) -> None:
    """Logs events that repeat an earlier (user, item, timestamp) exactly: kept, since a user may
    act twice in a second, but a log written twice (or files overlapping) looks the same."""
    same = (rows[1:] == rows[:-1]) & (times[1:] == times[:-1])
    if not same.any():
        return
    # Ties within a user's timestamp keep file order, so a repeat need not be adjacent: compare
    # (row, time, item) sorted.
    keys = np.lexsort((items, times, rows))
    repeated = np.flatnonzero((np.diff(rows[keys]) == 0) & (np.diff(times[keys]) == 0) & (np.diff(items[keys]) == 0))
    if len(repeated):
        first = keys[repeated[0]]
        logger.warning("%d event(s) repeat an earlier one exactly (user, item, timestamp), e.g. user %r item %r at %d: "
                       "kept; a log written twice or overlapping input files look like this", len(repeated),
                       user_ids[rows[first]], vocabulary.ids([items[first]]).tolist()[0], int(times[first]))


def _default_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _load_token_lines(
    path: PathLike,
    name: Optional[str],
    *,
    format: str,
    skip_bad_lines: bool,
    encoding: str,
) -> SequenceDataset:
    """Reads space/tab-separated lines "user item..." (pairs or sequences format)."""
    parser = LineParser(format)
    path = check_file(path, f"{parser.what} ({parser.expected!r} per line)")
    bad = _BadLines(path, skip_bad_lines)
    users, items, _, _, line_one = _collect(_parsed_text_lines(path, encoding, parser), bad)
    if not items:
        raise _no_interactions(path, bad)
    return build_dataset(name or _default_name(path), users, items, None, bad.count, line_one)


def load_pairs(
    path: PathLike,
    name: Optional[str] = None,
    *,
    skip_bad_lines: bool = False,
    encoding: str = "utf-8-sig",
) -> SequenceDataset:
    """Loads one "user item" pair per line (space or tab separated), oldest first per user.

    Users may appear in several blocks; their events are concatenated in file order, and users
    are ordered by first appearance.

    Args:
      path: The file, e.g. SASRec's ml-1m.txt.
      name: Dataset name; defaults to the file name without extension.
      skip_bad_lines: Skip (and count in ``skipped_lines``) lines that are not exactly two
        fields, instead of failing.
      encoding: Text encoding of the file (the default also accepts a UTF-8 byte-order mark).

    Returns:
      The dataset, without timestamps.

    Raises:
      FileNotFoundError: If the file does not exist.
      DataFormatError: On a malformed line (unless skipped) or when the file has no
        interactions.
    """
    return _load_token_lines(path, name, format="pairs", skip_bad_lines=skip_bad_lines, encoding=encoding)


def load_sequences(
    path: PathLike,
    name: Optional[str] = None,
    *,
    skip_bad_lines: bool = False,
    encoding: str = "utf-8-sig",
) -> SequenceDataset:
    """Loads one user per line, "uid item1 item2 ..." (space or tab separated), items oldest first.

    A user id appearing on several lines gets the lines' items concatenated in file order.

    Args:
      path: The file, e.g. Beauty.txt or LastFM.txt.
      name: Dataset name; defaults to the file name without extension.
      skip_bad_lines: Skip (and count) malformed lines, e.g. a user id with no items.
      encoding: Text encoding of the file (the default also accepts a UTF-8 byte-order mark).

    Returns:
      The dataset, without timestamps.

    Raises:
      FileNotFoundError: If the file does not exist.
      DataFormatError: On a malformed line (unless skipped) or when the file has no
        interactions.
    """
    return _load_token_lines(path, name, format="sequences", skip_bad_lines=skip_bad_lines, encoding=encoding)


def load_rating_log(
    path: PathLike,
    name: Optional[str] = None,
    sep: Optional[str] = None,
    columns: Sequence[Optional[str]] = ("user", "item", "rating", "timestamp"),
    min_rating: Optional[float] = None,
    has_header: bool = False,
    *,
    skip_bad_lines: bool = False,
    encoding: str = "utf-8-sig",
) -> SequenceDataset:
    """Loads a rating log (one event per line, with timestamps) and orders users' events in time.

    Args:
      path: The file, e.g. MovieLens-100K u.data (tab), ratings.dat ('::') or ratings.csv.
      name: Dataset name; defaults to the file name without extension.
      sep: Field separator; None detects it from the first data line ('::', then tab, then
        comma, else runs of spaces and tabs).
      columns: Name of each field in order. "user" and "item" are required; "timestamp"
        (integer unix seconds) orders each user's events and fills ``timestamps``; "rating"
        (a number) is needed for ``min_rating``; other names or None mark ignored fields.
        Every line must have exactly ``len(columns)`` fields.
      min_rating: Keep only events rated at least this much (e.g. 4 for "liked").
      has_header: The first line holds column names and is skipped.
      skip_bad_lines: Skip (and count) malformed lines instead of failing.
      encoding: Text encoding of the file (the default also accepts a UTF-8 byte-order mark).

    Returns:
      The dataset, with ``timestamps`` when a timestamp column is given. Each user's events
      are sorted by timestamp; ties keep file order.

    Raises:
      FileNotFoundError: If the file does not exist.
      ValueError: If ``columns`` lacks "user" or "item", names one twice, or ``min_rating``
        is given without a "rating" column.
      DataFormatError: On a malformed line (unless skipped), e.g. a wrong number of fields or
        a non-integer timestamp, or when the file has no (kept) interactions.
    """
    parser = LineParser("ratings", sep=sep, columns=columns, min_rating=min_rating)
    path = check_file(path, "rating log ('user item rating timestamp' per line)")
    bad = _BadLines(path, skip_bad_lines)
    users, items, times, filtered, line_one = _collect(
        _parsed_text_lines(path, encoding, parser, skip_header=has_header), bad)
    if not items:
        reason = f" rated at least {min_rating!r} ({filtered} below it)" if filtered else ""
        raise _no_interactions(path, bad, reason)
    timestamps = np.array(times, dtype=np.int64) if parser.has_timestamps else None
    # line_one is empty with has_header: line 1 was skipped as the header.
    return build_dataset(name or _default_name(path), users, items, timestamps, bad.count, line_one)
