"""In-memory containers shared by loaders, splits, input pipelines and evaluation.

Item indices are dense integers: 0 is reserved for padding (and never a real item), real items
are 1..num_items. Raw ids (strings or integers from the source files) live in a Vocabulary.
"""

from __future__ import annotations

import dataclasses
import keyword
import re
from typing import Any, Iterable, Optional

import numpy as np

from tfx_xmatch.data.vocabulary import Vocabulary

PAD_INDEX = 0

# Keys of the pipeline dicts (training, evaluation and TFRecord records); no user feature may
# take one of these names.
RESERVED_FEATURE_NAMES = ("history", "next_items", "target", "user_row")
# The serving signatures' own inputs; each user feature is one more input beside them.
SERVING_INPUT_NAMES = ("history", "k", "item_ids")
# What TensorFlow takes as a SavedModel signature's input name. Outside it, an export of a
# trained model failed ("more than one argument ... was named '_age'" for "_age", "âge" or
# "age group"), as it did for a Python keyword ("'class' is not a valid parameter name") and
# for "self", the serving functions' own first parameter. TF's Python check lets a backslash
# through, but its graph then refuses the embedding layer named after the feature.
# A trailing "/" makes the name a name scope, which fails the same way.
_SERVING_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_./>-]*(?<!/)")


def check_user_feature_names(names: Iterable[str]) -> None:
    """Refuses user feature names that a pipeline dict or a serving signature cannot take.

    Checked where features enter (records, input pipelines, a model's ``fit``) and at export, so
    a bad name fails before training, not at the export after it.

    Args:
      names: The user features' names (iterable of str).

    Raises:
      ValueError: A name is one of :data:`RESERVED_FEATURE_NAMES` or :data:`SERVING_INPUT_NAMES`,
        a Python keyword or "self", or has a character a signature input name cannot hold (it
        must start with a letter, digit or "." and go on with letters, digits and ``_.-/>``, not
        ending in "/"); or two names, or a name and a serving input, differ only in case or
        where TensorFlow replaces characters in argument names ("a.b" and "a_b", "Age" and
        "age", "K" and "k"). The message quotes the names and suggests one that works.
    """
    names = list(names)
    for name in names:
        _check_one_user_feature_name(name)
    # TF's tf.function turns each input name into a Python argument name (every character but
    # letters and digits becomes "_", and one that does not start with a letter gets "arg_"),
    # and its graph tells names apart regardless of case.
    argument_names: dict[str, str] = {name: name for name in SERVING_INPUT_NAMES}
    for name in names:
        swapped = "".join(c if c.isalnum() else "_" for c in name)
        argument = (swapped if swapped[0].isalpha() else "arg_" + swapped).lower()
        other = argument_names.setdefault(argument, name)
        if other == name:
            continue
        clash = (f"the serving input {other!r}" if other in SERVING_INPUT_NAMES and other not in names
                 else f"user feature name {other!r}")
        raise ValueError(
            f"user feature name {name!r} and {clash} are one input to TensorFlow's serving signatures, "
            f"which read both as {argument!r} (case ignored, characters other than letters and digits "
            "made '_'), so a model trained on them could not be exported; rename the feature")


def _check_one_user_feature_name(name: str) -> None:
    if name in RESERVED_FEATURE_NAMES:
        raise ValueError(
            f"user feature name {name!r} is reserved (one of {RESERVED_FEATURE_NAMES}): it "
            "clashes with a pipeline key"
        )
    if name in SERVING_INPUT_NAMES:
        raise ValueError(f"user feature name {name!r} is the name of a serving input (one of "
                         f"{SERVING_INPUT_NAMES}); rename the feature")
    if not isinstance(name, str) or not _SERVING_NAME.fullmatch(name) or keyword.iskeyword(name) or name == "self":
        suggestion = "user_" + re.sub(r"[^A-Za-z0-9_]", "_", str(name)).lstrip("_")
        raise ValueError(
            f"user feature name {name!r} cannot name an input of a TensorFlow serving signature, so "
            "a model trained on it could not be exported: a name starts with a letter, a digit or '.', "
            "goes on with letters, digits and _.-/> only, and is neither a Python keyword nor 'self'; "
            f"rename the feature, e.g. to {suggestion!r}")


@dataclasses.dataclass
class SequenceDataset:
    """Chronological item sequences, one per user.

    Attributes:
      name: Dataset name, e.g. "ml-1m" or "synthetic".
      sequences: One int32 array per user of item indices in [1, num_items], oldest first.
      item_vocab: Maps raw item ids to indices (index 0 is padding).
      user_ids: Raw user id of each sequence (same order as ``sequences``): int64, or object
        holding ``str``.
      timestamps: Optional int64 array per user, aligned with ``sequences`` (unix seconds).
      item_features: Optional per-item feature arrays indexed by item index, each with first
        dimension num_items + 1 (row 0 is the padding item), e.g. ``{"genres": [N+1, G]}``
        multi-hot float32.
      user_features: Optional per-user int32 feature arrays aligned with ``sequences``, e.g.
        ``{"gender": [U], "age": [U], "occupation": [U]}`` with 0 meaning unknown.
      feature_vocabs: Names of the categories of categorical features, keyed like the
        features (e.g. the genre names), for display and export.
      skipped_lines: How many malformed input lines a loader skipped (only non-zero when the
        caller asked to skip bad lines instead of failing).
      metadata: Free-form provenance, e.g. the synthetic generator's parameters and planted
        ground truth (``metadata["successor"]``). Not meant as model input.
    """

    name: str
    sequences: list[np.ndarray]
    item_vocab: Vocabulary
    user_ids: np.ndarray
    timestamps: Optional[list[np.ndarray]] = None
    item_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    user_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    feature_vocabs: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped_lines: int = 0
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return self.item_vocab.num_items

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def statistics(self) -> dict:
        return sequence_statistics(self.name, [len(s) for s in self.sequences], self.num_items)


def sequence_statistics(name: str, lengths, num_items: int) -> dict:
    """Users, items, interactions and the sequence length distribution of a dataset."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return {
        "name": name,
        "users": len(lengths),
        "items": int(num_items),
        "interactions": int(lengths.sum()),
        "length_min": int(lengths.min()) if len(lengths) else 0,
        "length_median": float(np.median(lengths)) if len(lengths) else 0.0,
        "length_mean": float(lengths.mean()) if len(lengths) else 0.0,
        "length_max": int(lengths.max()) if len(lengths) else 0,
    }


@dataclasses.dataclass
class EvalExamples:
    """Held-out next-item examples: for each user, a history and the item that followed it.

    Attributes:
      user_rows: Row of each example's user in the SequenceDataset (for user features).
      histories: One int32 array per example, item indices oldest first (not padded).
      targets: int32 [E] index of the held-out next item.
    """

    user_rows: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


@dataclasses.dataclass
class Split:
    """Train sequences plus validation and test examples over one dataset.

    Attributes:
      name: "leave_one_out", "user_level" or "time".
      dataset: The dataset the split was made from (for item/user features and vocabularies).
      train_user_rows: Row in ``dataset`` of each training sequence's user.
      train_sequences: Sequences the model may train on (no validation or test target inside).
      validation: Examples for model selection.
      test: Examples for the final report.
    """

    name: str
    dataset: SequenceDataset
    train_user_rows: np.ndarray
    train_sequences: list[np.ndarray]
    validation: EvalExamples
    test: EvalExamples

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    def item_popularity(self) -> np.ndarray:
        """Training interaction count per item index (length num_items + 1, index 0 is 0)."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for sequence in self.train_sequences:
            np.add.at(counts, sequence, 1)
        counts[0] = 0
        return counts


def pad_histories(histories: list[np.ndarray], max_length: int) -> np.ndarray:
    """Left-pads (or truncates to the most recent ``max_length`` items) each history.

    The most recent item always lands in the last column, so position embeddings mean
    "distance from now" whatever the history length.

    Args:
      histories: Item-index arrays, oldest first.
      max_length: Width of the result; must be positive.

    Returns:
      int32 array [len(histories), max_length], PAD_INDEX where there is no item.

    Raises:
      ValueError: If ``max_length`` is not positive.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length!r}")
    padded = np.full((len(histories), max_length), PAD_INDEX, dtype=np.int32)
    for row, history in enumerate(histories):
        recent = np.asarray(history, dtype=np.int32)[-max_length:]
        if len(recent):
            padded[row, max_length - len(recent):] = recent
    return padded
