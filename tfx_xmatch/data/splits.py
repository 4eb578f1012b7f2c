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

from typing import Any, Optional, Sequence

import numpy as np

from tfx_xmatch.data.dataset import EvalExamples, SequenceDataset, Split

MIN_USERS_FOR_USER_LEVEL = 10


def _examples(user_rows: list[int], histories: list[np.ndarray], targets: list[int]) -> EvalExamples:
    return EvalExamples(
        user_rows=np.asarray(user_rows, dtype=np.int64),
        histories=[np.asarray(history, dtype=np.int32) for history in histories],
        targets=np.asarray(targets, dtype=np.int32),
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
    if min_length < 3:
        raise ValueError(
            f"min_length must be at least 3 (one training item, a validation and a test "
            f"target), got {min_length!r}"
        )
    lengths = [len(sequence) for sequence in dataset.sequences]
    if not lengths or max(lengths) < min_length:
        longest = max(lengths) if lengths else 0
        raise ValueError(
            f"leave_one_out needs at least one user with >= {min_length} interactions; the "
            f"longest of the {len(lengths)} sequences in {dataset.name!r} has {longest}"
        )
    train_rows: list[int] = []
    train_sequences: list[np.ndarray] = []
    validation: tuple[list, list, list] = ([], [], [])
    test: tuple[list, list, list] = ([], [], [])
    for row, sequence in enumerate(dataset.sequences):
        if len(sequence) >= min_length:
            train = sequence[:-2]
            for examples, history, target in (
                (validation, sequence[:-2], sequence[-2]),
                (test, sequence[:-1], sequence[-1]),
            ):
                examples[0].append(row)
                examples[1].append(history)
                examples[2].append(target)
        else:
            train = sequence
        if len(train):
            train_rows.append(row)
            train_sequences.append(np.asarray(train, dtype=np.int32))
    return Split(
        name="leave_one_out",
        dataset=dataset,
        train_user_rows=np.asarray(train_rows, dtype=np.int64),
        train_sequences=train_sequences,
        validation=_examples(*validation),
        test=_examples(*test),
    )


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
    fractions = tuple(float(fraction) for fraction in fractions)
    valid = len(fractions) == 3 and all(fraction >= 0 for fraction in fractions)
    if not valid or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three non-negative shares (train, validation, test) summing "
            f"to 1, got {fractions!r}"
        )
    num_users = dataset.num_users
    if num_users < MIN_USERS_FOR_USER_LEVEL:
        raise ValueError(
            f"user_level needs at least {MIN_USERS_FOR_USER_LEVEL} users, dataset "
            f"{dataset.name!r} has {num_users}"
        )
    order = np.random.default_rng(seed).permutation(num_users)
    num_validation = int(round(fractions[1] * num_users))
    num_test = int(round(fractions[2] * num_users))
    num_train = num_users - num_validation - num_test
    if fractions[0] > 0 and num_train < 1:
        raise ValueError(f"fractions {fractions!r} leave no training user among {num_users}")
    # Sorting within each part keeps dataset order, which makes results easier to inspect.
    train_rows = np.sort(order[:num_train])
    validation_rows = np.sort(order[num_train : num_train + num_validation])
    test_rows = np.sort(order[num_train + num_validation :])

    def held_out(rows: np.ndarray, part: str, fraction: float) -> EvalExamples:
        kept = [int(row) for row in rows if len(dataset.sequences[row]) >= 2]
        if fraction > 0 and not kept:
            raise ValueError(
                f"user_level {part} users need at least 2 interactions each (a history and a "
                f"target); none of the {len(rows)} {part} users of {dataset.name!r} has"
            )
        return _examples(
            kept,
            [dataset.sequences[row][:-1] for row in kept],
            [int(dataset.sequences[row][-1]) for row in kept],
        )

    train_rows = np.asarray([row for row in train_rows if len(dataset.sequences[row])], dtype=np.int64)
    return Split(
        name="user_level",
        dataset=dataset,
        train_user_rows=train_rows,
        train_sequences=[np.asarray(dataset.sequences[row], dtype=np.int32) for row in train_rows],
        validation=held_out(validation_rows, "validation", fractions[1]),
        test=held_out(test_rows, "test", fractions[2]),
    )


def _time_cuts(
    dataset: SequenceDataset,
    validation_time: Optional[int],
    test_time: Optional[int],
    quantiles: Sequence[float],
) -> tuple[int, int]:
    if len(quantiles) != 2 or not 0.0 < quantiles[0] <= quantiles[1] < 1.0:
        raise ValueError(
            f"quantiles must be (validation, test) with 0 < validation <= test < 1, got {tuple(quantiles)!r}"
        )
    if validation_time is None or test_time is None:
        every = np.concatenate([np.asarray(times, dtype=np.int64) for times in dataset.timestamps])
        # "higher" picks an actual event time, so the first event at the cut is held out.
        cuts = np.quantile(every, quantiles, method="higher")
        validation_time = int(cuts[0]) if validation_time is None else validation_time
        test_time = int(cuts[1]) if test_time is None else test_time
    if validation_time > test_time:
        raise ValueError(
            f"validation_time must not be after test_time, got validation_time={validation_time!r} "
            f"and test_time={test_time!r}"
        )
    return int(validation_time), int(test_time)


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
    validation_time, test_time = _time_cuts(dataset, validation_time, test_time, quantiles)

    train_rows: list[int] = []
    train_sequences: list[np.ndarray] = []
    validation: tuple[list, list, list] = ([], [], [])
    test: tuple[list, list, list] = ([], [], [])
    for row, (sequence, times) in enumerate(zip(dataset.sequences, dataset.timestamps)):
        times = np.asarray(times, dtype=np.int64)
        if len(times) != len(sequence):
            raise ValueError(
                f"dataset {dataset.name!r} user row {row} has {len(sequence)} items but "
                f"{len(times)} timestamps"
            )
        # Loaders already sort by time; sorting again makes hand-built datasets safe too.
        order = np.argsort(times, kind="stable")
        sequence, times = np.asarray(sequence, dtype=np.int32)[order], times[order]
        before_validation = int(np.searchsorted(times, validation_time, side="left"))
        before_test = int(np.searchsorted(times, test_time, side="left"))
        if before_validation:
            train_rows.append(row)
            train_sequences.append(sequence[:before_validation])
            if before_test > before_validation:
                validation[0].append(row)
                validation[1].append(sequence[:before_validation])
                validation[2].append(int(sequence[before_validation]))
        if before_test and before_test < len(sequence):
            test[0].append(row)
            test[1].append(sequence[:before_test])
            test[2].append(int(sequence[before_test]))

    if not train_sequences:
        raise ValueError(
            f"time_split found no event before validation_time={validation_time} in "
            f"{dataset.name!r}; choose a later cut"
        )
    if not test[0]:
        raise ValueError(
            f"time_split needs a user with events both before and at/after test_time="
            f"{test_time}; none of the {dataset.num_users} users of {dataset.name!r} has"
        )
    if not validation[0] and validation_time < test_time:
        raise ValueError(
            f"time_split needs a user with events both before validation_time={validation_time} "
            f"and in [validation_time, test_time={test_time}); none of the "
            f"{dataset.num_users} users of {dataset.name!r} has"
        )
    return Split(
        name="time",
        dataset=dataset,
        train_user_rows=np.asarray(train_rows, dtype=np.int64),
        train_sequences=train_sequences,
        validation=_examples(*validation),
        test=_examples(*test),
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
    return function(dataset, **kwargs)
