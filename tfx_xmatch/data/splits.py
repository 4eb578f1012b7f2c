"""Train / validation / test splits of a SequenceDataset for next-item evaluation.

Three protocols:
  * leave_one_out: SASRec's standard; every user's last item is the test target and the one
    before it the validation target.
  * user_level: users are partitioned; held-out users' last items are the targets (measures
    generalisation to users never seen in training).
  * time: a global time cut; the model trains on the past and predicts the first event after
    the cut (no leakage of future interactions of other users).
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from tfx_xmatch.arguments import integer, is_integer
from tfx_xmatch.data.dataset import EvalExamples, SequenceDataset, Split

MIN_USERS_FOR_USER_LEVEL = 10


def _examples(user_rows: list[int], histories: list[np.ndarray], targets: list[int]) -> EvalExamples:
    return EvalExamples(
        user_rows=np.asarray(user_rows, dtype=np.int64),
        histories=[np.asarray(history, dtype=np.int32) for history in histories],
        targets=np.asarray(targets, dtype=np.int32),
    )


@dataclasses.dataclass
class UserSplit:
    """One user's share of a split; the whole-dataset splits and the Beam ``prepare`` pipeline
    both build splits from it, user by user.

    Attributes:
      train: The user's training sequence, or None when the user has none.
      validation: (history, target) of the user's validation example, or None.
      test: (history, target) of the user's test example, or None.
    """

    train: Optional[np.ndarray] = None
    validation: Optional[tuple[np.ndarray, int]] = None
    test: Optional[tuple[np.ndarray, int]] = None


def _assemble(name: str, dataset: SequenceDataset, users: Iterable[tuple[int, UserSplit]]) -> Split:
    train_rows: list[int] = []
    train_sequences: list[np.ndarray] = []
    parts: dict[str, tuple[list, list, list]] = {"validation": ([], [], []), "test": ([], [], [])}
    for row, user in users:
        if user.train is not None:
            train_rows.append(row)
            train_sequences.append(np.asarray(user.train, dtype=np.int32))
        for part, example in (("validation", user.validation), ("test", user.test)):
            if example is not None:
                parts[part][0].append(row)
                parts[part][1].append(example[0])
                parts[part][2].append(example[1])
    return Split(
        name=name,
        dataset=dataset,
        train_user_rows=np.asarray(train_rows, dtype=np.int64),
        train_sequences=train_sequences,
        validation=_examples(*parts["validation"]),
        test=_examples(*parts["test"]),
    )


def leave_one_out_user(sequence: np.ndarray, min_length: int = 3) -> UserSplit:
    """One user's leave-one-out share (see :func:`leave_one_out`)."""
    sequence = np.asarray(sequence, dtype=np.int32)
    if len(sequence) < min_length:
        return UserSplit(train=sequence if len(sequence) else None)
    return UserSplit(
        train=sequence[:-2],
        validation=(sequence[:-2], int(sequence[-2])),
        test=(sequence[:-1], int(sequence[-1])),
    )


def leave_one_out(dataset: SequenceDataset, min_length: int = 3) -> Split:
    """Holds out each user's last item for test and second-to-last for validation.

    For a user with sequence ``seq`` of at least ``min_length`` items: train on ``seq[:-2]``;
    validation predicts ``seq[-2]`` from ``seq[:-2]``; test predicts ``seq[-1]`` from
    ``seq[:-1]`` (the validation item is part of the test history, as in SASRec). Shorter users
    keep their whole sequence for training and have no evaluation examples.

    Args:
      dataset: The dataset.
      min_length: Minimum sequence length for a user to be evaluated; at least 3 so that the
        validation history is not empty.

    Returns:
      The split (name "leave_one_out").

    Raises:
      ValueError: If ``min_length`` is below 3 or no user has ``min_length`` interactions.
    """
    min_length = check_min_length(min_length)
    lengths = [len(sequence) for sequence in dataset.sequences]
    if not lengths or max(lengths) < min_length:
        longest = max(lengths) if lengths else 0
        raise ValueError(
            f"leave_one_out needs at least one user with >= {min_length} interactions; the "
            f"longest of the {len(lengths)} sequences in {dataset.name!r} has {longest}"
        )
    users = (
        (row, leave_one_out_user(sequence, min_length)) for row, sequence in enumerate(dataset.sequences)
    )
    return _assemble("leave_one_out", dataset, users)


def user_level(
    dataset: SequenceDataset, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> Split:
    """Partitions users into train, validation and test users.

    Train users contribute their full sequences; each validation/test user with at least two
    items contributes one example: history ``seq[:-1]``, target ``seq[-1]`` (held-out users
    with a single item have no example).

    Args:
      dataset: The dataset; needs at least 10 users.
      fractions: Shares of users for (train, validation, test); non-negative, summing to 1.
      seed: Seed of the user shuffle.

    Returns:
      The split (name "user_level").

    Raises:
      ValueError: If ``fractions`` is invalid, the dataset has fewer than 10 users, or a
        share with a positive fraction would be empty.
    """
    parts = user_level_parts(dataset.num_users, fractions, seed, dataset.name)
    split = _assemble(
        "user_level", dataset,
        ((row, user_level_user(sequence, parts[row])) for row, sequence in enumerate(dataset.sequences)),
    )
    check_user_level(split_counts(split), parts, fractions, dataset.name)
    return split


USER_LEVEL_PARTS = ("train", "validation", "test")


def user_level_parts(
    num_users: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, name: str = "dataset"
) -> np.ndarray:
    """The part (0 train, 1 validation, 2 test) of each user row in a user-level split.

    Raises:
      ValueError: If ``fractions`` is invalid, there are fewer than 10 users, or no user is
        left for training.
    """
    fractions = check_fractions(fractions)
    seed = integer("seed", seed, 0)
    if num_users < MIN_USERS_FOR_USER_LEVEL:
        raise ValueError(
            f"user_level needs at least {MIN_USERS_FOR_USER_LEVEL} users, dataset "
            f"{name!r} has {num_users}"
        )
    order = np.random.default_rng(seed).permutation(num_users)
    num_validation = int(round(fractions[1] * num_users))
    num_test = int(round(fractions[2] * num_users))
    num_train = num_users - num_validation - num_test
    if fractions[0] > 0 and num_train < 1:
        raise ValueError(f"fractions {fractions!r} leave no training user among {num_users}")
    parts = np.zeros(num_users, dtype=np.int8)
    parts[order[num_train : num_train + num_validation]] = 1
    parts[order[num_train + num_validation :]] = 2
    return parts


def user_level_user(sequence: np.ndarray, part: int) -> UserSplit:
    """One user's user-level share: a training sequence, or one held-out example."""
    sequence = np.asarray(sequence, dtype=np.int32)
    if part == 0:
        return UserSplit(train=sequence if len(sequence) else None)
    if len(sequence) < 2:
        return UserSplit()
    example = (sequence[:-1], int(sequence[-1]))
    return UserSplit(validation=example) if part == 1 else UserSplit(test=example)


def split_counts(split: Split) -> dict[str, int]:
    """Examples per part: train sequences, validation and test examples."""
    return {"train": len(split.train_sequences), "validation": len(split.validation), "test": len(split.test)}


def check_user_level(counts: dict[str, int], parts: np.ndarray, fractions: Sequence[float], name: str) -> None:
    """Raises ValueError when a held-out part with a positive share got no example."""
    for code, part in ((1, "validation"), (2, "test")):
        if float(fractions[code]) > 0 and not counts[part]:
            raise ValueError(
                f"user_level {part} users need at least 2 interactions each (a history and a "
                f"target); none of the {int(np.sum(parts == code))} {part} users of {name!r} has"
            )


def time_cuts(
    timestamps: Sequence[np.ndarray],
    validation_time: Optional[int],
    test_time: Optional[int],
    quantiles: Sequence[float],
) -> tuple[int, int]:
    """(validation_time, test_time): the given cuts, or quantiles of every event time.

    Raises:
      ValueError: If ``quantiles`` are not 0 < validation <= test < 1, or the cuts are in the
        wrong order.
    """
    check_quantiles(quantiles)
    check_cut("validation_time", validation_time)
    check_cut("test_time", test_time)
    if validation_time is None or test_time is None:
        every = np.concatenate([np.asarray(times, dtype=np.int64) for times in timestamps])
        # "higher" picks an actual event time, so the first event at the cut is held out.
        cuts = np.quantile(every, quantiles, method="higher")
        validation_time = int(cuts[0]) if validation_time is None else validation_time
        test_time = int(cuts[1]) if test_time is None else test_time
    check_cut_order(validation_time, test_time)
    return int(validation_time), int(test_time)


def check_min_length(min_length) -> int:
    """The leave-one-out ``min_length`` as an int, if it is an integer of at least 3."""
    if not is_integer(min_length) or min_length < 3:
        raise ValueError(f"min_length must be an integer >= 3 (one training item, a validation and a test "
                         f"target), got {min_length!r}")
    return int(min_length)


def check_cut(name: str, value) -> None:
    """A time cut is an integer timestamp, or None for a quantile of the event times."""
    if value is not None and not is_integer(value):
        raise ValueError(f"{name} must be an integer timestamp or None, got {value!r}")


def check_quantiles(quantiles) -> None:
    """The time split's quantiles are (validation, test) with 0 < validation <= test < 1."""
    values = tuple(quantiles) if isinstance(quantiles, Iterable) and not isinstance(quantiles, str) else ()
    numbers_ok = len(values) == 2 and all(isinstance(q, numbers.Real) and not isinstance(q, bool) for q in values)
    if not numbers_ok or not 0.0 < values[0] <= values[1] < 1.0:
        raise ValueError(f"quantiles must be (validation, test) with 0 < validation <= test < 1, got {quantiles!r}")


def check_fractions(fractions: Sequence[float]) -> tuple:
    """The user-level shares as floats, if they are three non-negative numbers summing to 1."""
    try:
        fractions = tuple(float(fraction) for fraction in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"fractions must be three numbers (train, validation, test), got {fractions!r}") from None
    valid = len(fractions) == 3 and all(fraction >= 0 for fraction in fractions)
    if not valid or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three non-negative shares (train, validation, test) summing "
            f"to 1, got {fractions!r}"
        )
    return fractions


def check_cut_order(validation_time, test_time) -> None:
    if validation_time > test_time:
        raise ValueError(
            f"validation_time must not be after test_time, got validation_time={validation_time!r} "
            f"and test_time={test_time!r}"
        )


def time_split(
    dataset: SequenceDataset,
    validation_time: Optional[int] = None,
    test_time: Optional[int] = None,
    quantiles: Sequence[float] = (0.8, 0.9),
) -> Split:
    """Splits at global time cuts: train on the past, predict the first event after a cut.

    Train sequences are every user's events before ``validation_time``. A user gets a
    validation example when they have events before ``validation_time`` (the history) and one
    in [validation_time, test_time) (the first is the target), and a test example when they
    have events before ``test_time`` (the history, including the validation period) and one at
    or after ``test_time`` (the first is the target). Users with no history before a cut get
    no example for it.

    Args:
      dataset: A dataset with timestamps.
      validation_time: Start of the validation period (unix seconds); None takes the
        ``quantiles[0]`` quantile of all event times.
      test_time: Start of the test period; None takes the ``quantiles[1]`` quantile.
      quantiles: Default cut quantiles (validation, test).

    Returns:
      The split (name "time").

    Raises:
      ValueError: If the dataset has no timestamps, the cuts are inconsistent, or there is no
        event before the validation cut, or no test example (the message gives the cut and
        what was found).
    """
    if dataset.timestamps is None:
        raise ValueError(
            f"time_split needs timestamps, but dataset {dataset.name!r} has no timestamps "
            "(load a rating log with a timestamp column, or use leave_one_out)"
        )
    if dataset.num_interactions == 0:
        raise ValueError(f"time_split needs interactions, dataset {dataset.name!r} has none")
    validation_time, test_time = time_cuts(dataset.timestamps, validation_time, test_time, quantiles)

    for row, (sequence, times) in enumerate(zip(dataset.sequences, dataset.timestamps)):
        if len(times) != len(sequence):
            raise ValueError(
                f"dataset {dataset.name!r} user row {row} has {len(sequence)} items but "
                f"{len(times)} timestamps"
            )
    split = _assemble(
        "time", dataset,
        ((row, time_user(sequence, times, validation_time, test_time))
         for row, (sequence, times) in enumerate(zip(dataset.sequences, dataset.timestamps))),
    )
    check_time_split(split_counts(split), validation_time, test_time, dataset.num_users, dataset.name)
    return split


def time_user(sequence: np.ndarray, times: np.ndarray, validation_time: int, test_time: int) -> UserSplit:
    """One user's share of a time split at the given cuts (see :func:`time_split`)."""
    times = np.asarray(times, dtype=np.int64)
    # Loaders already sort by time; sorting again makes hand-built datasets safe too.
    order = np.argsort(times, kind="stable")
    sequence, times = np.asarray(sequence, dtype=np.int32)[order], times[order]
    before_validation = int(np.searchsorted(times, validation_time, side="left"))
    before_test = int(np.searchsorted(times, test_time, side="left"))
    user = UserSplit()
    if before_validation:
        user.train = sequence[:before_validation]
        if before_test > before_validation:
            user.validation = (sequence[:before_validation], int(sequence[before_validation]))
    if before_test and before_test < len(sequence):
        user.test = (sequence[:before_test], int(sequence[before_test]))
    return user


def check_time_split(counts: dict[str, int], validation_time: int, test_time: int, num_users: int, name: str) -> None:
    """Raises ValueError when a time split has no training sequence, test or validation example."""
    if not counts["train"]:
        raise ValueError(
            f"time_split found no event before validation_time={validation_time} in "
            f"{name!r}; choose a later cut"
        )
    if not counts["test"]:
        raise ValueError(
            f"time_split needs a user with events both before and at/after test_time="
            f"{test_time}; none of the {num_users} users of {name!r} has"
        )
    if not counts["validation"] and validation_time < test_time:
        raise ValueError(
            f"time_split needs a user with events both before validation_time={validation_time} "
            f"and in [validation_time, test_time={test_time}); none of the "
            f"{num_users} users of {name!r} has"
        )


SPLITS = {"leave_one_out": leave_one_out, "user_level": user_level, "time": time_split}


def make_split(dataset: SequenceDataset, name: str, **kwargs: Any) -> Split:
    """Makes a split by protocol name.

    Args:
      dataset: The dataset.
      name: "leave_one_out", "user_level" or "time".
      **kwargs: Arguments of the protocol's function.

    Returns:
      The split.

    Raises:
      ValueError: If the name is unknown (the message lists the known ones), or as raised by
        the protocol.
    """
    try:
        function = SPLITS[name]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}") from None
    check_split_options(name, kwargs)
    return function(dataset, **kwargs)


def check_split_options(name: str, options: dict) -> None:
    """Raises ValueError naming any option the ``name`` split does not take, and the accepted ones."""
    accepted = [parameter for parameter in inspect.signature(SPLITS[name]).parameters if parameter != "dataset"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for the {name!r} split; accepted: {accepted}")
    # Values that need no data are checked here too: a Beam run would otherwise find them on a
    # worker, after reading and grouping everything.
    if name == "leave_one_out" and "min_length" in options:
        check_min_length(options["min_length"])
    if name == "user_level" and "fractions" in options:
        check_fractions(options["fractions"])
    if name == "user_level" and "seed" in options:
        integer("seed", options["seed"], 0)
    if name == "time":
        for cut in ("validation_time", "test_time"):
            check_cut(cut, options.get(cut))
        if "quantiles" in options:
            check_quantiles(options["quantiles"])
        if options.get("validation_time") is not None and options.get("test_time") is not None:
            check_cut_order(options["validation_time"], options["test_time"])
