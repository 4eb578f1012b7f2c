"""Warm start: a new run begins from the weights of an earlier model.

The source is a finished run, a ``save_model`` directory, or a serving SavedModel written by
``tfx_xmatch.export`` (what a TFX Trainer receives as ``base_model`` in continuous training).

Continuous training sees a catalogue that changes between runs: new items arrive, old ones
leave, and a vocabulary built from new data numbers the items afresh. An embedding row is an
item *index*, so rows are carried over by item *id*: every item the source knew starts from its
learnt vector wherever its index is now, and a new item from its initialization (as the TF
Estimator's ``warm_start_from`` with a ``VocabInfo`` did). Item data — the per-item feature
tables and the logQ frequencies — describe this run's training data and stay the run's own.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Optional

import numpy as np
import tensorflow as tf

from tfx_xmatch.config import ConfigError
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.training import SERVING_MODEL_DESCRIPTION, build_all_variables, model_kind

logger = logging.getLogger(__name__)


def warm_start(model: tf.keras.Model, source: str | pathlib.Path, learning_rate: float,
               item_vocab: Optional[Vocabulary] = None) -> str:
    """Loads into ``model`` the weights of a finished run (its ``model/``), of a ``save_model``
    directory, or of a serving SavedModel written by ``tfx_xmatch.export``.

    With the same items in the same order, a checkpoint also brings its optimizer state (Adam
    starts fresh when it holds none, as a serving SavedModel never does). When the items
    differ, item embedding rows are moved to this run's indices by id, new items keep their
    initialization, and Adam starts fresh (its moments are per row of the old catalogue). The
    optimizer then runs at ``learning_rate`` whatever rate the source trained with.

    Args:
      model: A compiled, built model (see ``training.compile_for_training``) whose optimizer
        has a float learning rate.
      source: A run directory, a saved model directory or a serving SavedModel directory: local,
        or any URL ``tf.io.gfile`` reads (``gs://...``, where a TFX Trainer on Vertex leaves its
        ``model_run_dir`` and a Pusher its models).
      learning_rate: The learning rate to continue with.
      item_vocab: This run's item vocabulary (``model.num_items`` ids). When given, the source's
        items (saved beside a run's model, or inside a serving SavedModel) are matched to it by
        id. Default None: the source must have exactly this model's shapes, and its rows are
        taken as they are.

    Returns:
      The directory the weights came from.

    Raises:
      ConfigError: ``source`` holds no model, one of another kind, one whose variables are not
        ``model``'s apart from its number of items (names the first difference), one with no
        item id in common with ``item_vocab``, or one that cannot be read.
      ValueError: ``item_vocab`` does not have ``model.num_items`` items, or ``model`` is a
        subclass not registered with Keras (see ``training.model_kind``).
    """
    source = str(source).rstrip("/")
    if item_vocab is not None and item_vocab.num_items != model.num_items:
        raise ValueError(f"item_vocab has {item_vocab.num_items:,} items but the model {model.num_items:,}: "
                         "give the vocabulary the model was built for")
    serving = tf.io.gfile.exists(f"{source}/saved_model.pb")
    directory, saved = _read_description(source, serving)
    name = model_kind(model)
    if saved.get("model") != name:
        raise ConfigError(f"train.warm_start={source!r} holds a {saved.get('model')!r} model; "
                          f"this run trains a {name!r} model")
    try:
        source_model = type(model).from_config(saved["config"])  # the same kind: checked above
        build_all_variables(source_model)
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"train.warm_start={source!r}: its model cannot be built from its description "
                          f"({_first_line(error)})") from error
    rows = None
    source_ids = None if item_vocab is None else _source_item_ids(source, directory, serving)
    if source_ids is not None and len(source_ids) != source_model.num_items:
        # Rows would be paired with the wrong ids, or an id would point past the table.
        raise ConfigError(f"train.warm_start={source!r}: {_where_ids(directory, serving)} holds {len(source_ids):,} "
                          f"item ids, but its model has {source_model.num_items:,} items")
    if source_ids is not None and source_ids != _item_ids(item_vocab):
        rows = _rows_by_id(source, source_ids, item_vocab)
    elif source_model.num_items != model.num_items:
        missing = "no item vocabulary was given" if item_vocab is None else "it keeps no item vocabulary"
        raise ConfigError(f"train.warm_start={source!r} has {source_model.num_items:,} items, this model "
                          f"{model.num_items:,}, and {missing}: its item rows cannot be matched to this run's")
    learnt_rows, item_data = _item_indexed_paths(model)
    _check_same_variables(source, model, source_model, learnt_rows | item_data if rows is not None else set())
    checkpoint = f"{directory}/variables/variables" if serving else f"{directory}/weights"
    # Item data describes this run's training data, not the source's.
    targets = model.get_weight_paths()
    kept = {path: targets[path].numpy() for path in item_data}
    try:
        if serving or rows is not None:
            # Through the source's own model (the serving module holds it as its ``model``
            # attribute, beside the index and without an optimizer), where every variable must be
            # found, then copied over.
            _restore_every_weight(source_model, checkpoint, serving)
            sources = source_model.get_weight_paths()
            for path in _weight_shapes(model):
                if path in learnt_rows and rows is not None:
                    targets[path].assign(_moved_rows(targets[path].numpy(), sources[path].numpy(), rows))
                elif path not in item_data:
                    targets[path].assign(sources[path])
        else:
            # Adam's moments exist only after its first step: TF restores them when they are created.
            model.load_weights(checkpoint).expect_partial()
    except (tf.errors.OpError, AssertionError, ValueError) as error:
        raise ConfigError(f"train.warm_start={source!r}: cannot read {checkpoint}: {_first_line(error)}") from error
    for path, value in kept.items():
        targets[path].assign(value)
    model.optimizer.learning_rate = learning_rate
    if rows is None:
        logger.info("warm start from %s", directory)
    else:
        carried = int(np.sum(rows[1:] >= 0))
        logger.info("warm start from %s: %s of this run's %s items carried over by id, %s new ones from their "
                    "initialization, %s of the source's %s items no longer present; Adam starts afresh",
                    directory, f"{carried:,}", f"{model.num_items:,}", f"{model.num_items - carried:,}",
                    f"{source_model.num_items - carried:,}", f"{source_model.num_items:,}")
    return directory


def _read_description(source: str, serving: bool) -> tuple[str, dict]:
    """(the directory holding the weights, the model description found there)."""
    if serving:
        directory, description = source, f"{source}/{SERVING_MODEL_DESCRIPTION}"
        if not tf.io.gfile.exists(description):
            raise ConfigError(f"train.warm_start={source!r} is a SavedModel without {SERVING_MODEL_DESCRIPTION}: "
                              "not exported by tfx_xmatch, or by a version that did not record its model; "
                              "warm-start from its training run's directory instead")
    else:
        directory = f"{source}/model" if tf.io.gfile.exists(f"{source}/model/config.json") else source
        description = f"{directory}/config.json"
        if not (tf.io.gfile.exists(description) and tf.io.gfile.exists(f"{directory}/weights.index")):
            versions = sorted(int(name.strip("/")) for name in (tf.io.gfile.listdir(source) if tf.io.gfile.isdir(source)
                                                                 else []) if name.strip("/").isdigit())
            hint = f" (it holds versions {versions}: give one, e.g. {source}/{versions[-1]})" if versions else ""
            raise ConfigError(f"train.warm_start={source!r} is neither a finished run directory (with model/), "
                              f"a saved model directory (config.json + weights) nor a serving SavedModel{hint}")
    try:
        with tf.io.gfile.GFile(description, "r") as file:
            return directory, json.loads(file.read())
    except json.JSONDecodeError as error:
        raise ConfigError(f"train.warm_start={source!r}: {description} is not JSON ({error})") from error


# Where a source keeps its item ids: a serving SavedModel in its index's id table
# (RetrievalServingModule.index_to_id, row 0 the padding id), a run beside its model.
SERVING_ITEM_IDS = "index_to_id/.ATTRIBUTES/VARIABLE_VALUE"


def _where_ids(directory: str, serving: bool) -> str:
    return f"index_to_id in {directory}/variables" if serving else f"{directory}/item_vocab.json"


def _source_item_ids(source: str, directory: str, serving: bool) -> Optional[list]:
    """The raw ids of a warm-start source's items 1..I, typed as a ``Vocabulary`` types them (int
    or str: 42 and "42" are different items); None when it keeps none (a model saved without)."""
    try:
        if serving:
            # Not tf.train.load_checkpoint: on stores without real directories (ram://) it takes
            # the prefix for a directory, since files start with it.
            reader = tf.compat.v1.train.NewCheckpointReader(f"{directory}/variables/variables")
            if not reader.has_tensor(SERVING_ITEM_IDS):
                return None
            return [value.decode("utf-8") if isinstance(value, bytes) else int(value)
                    for value in reader.get_tensor(SERVING_ITEM_IDS)[1:]]
        if not tf.io.gfile.exists(f"{directory}/item_vocab.json"):
            return None
        return _item_ids(Vocabulary.load(f"{directory}/item_vocab.json"))  # reads gs:// too
    except (tf.errors.OpError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"train.warm_start={source!r}: cannot read its item ids from "
                          f"{_where_ids(directory, serving)}: {_first_line(error)}") from error


def _item_ids(vocab: Vocabulary) -> list:
    ids = vocab.ids(np.arange(1, vocab.num_items + 1))
    return [str(value) if isinstance(value, str) else int(value) for value in ids]


def _rows_by_id(source: str, source_ids: list, item_vocab: Vocabulary) -> np.ndarray:
    """For each of this run's item indices 0..I, the source's index of the same item id, or -1
    for an item the source never saw. The padding row 0 maps to the source's padding row."""
    source_index = {item_id: index for index, item_id in enumerate(source_ids, start=1)}
    ours = _item_ids(item_vocab)
    rows = np.array([0] + [source_index.get(item_id, -1) for item_id in ours], np.int64)
    if not np.any(rows[1:] >= 0):
        # Most likely the ids are spelt or typed differently ("item_12" or "12" against 12), not a
        # new catalogue.
        raise ConfigError(f"train.warm_start={source!r} shares no item id with this run (its first ids "
                          f"{source_ids[:3]}, this run's {ours[:3]}): nothing to carry over "
                          "by id; train from scratch, or check that both vocabularies spell and type ids alike")
    return rows


def _moved_rows(current: np.ndarray, learnt: np.ndarray, rows: np.ndarray) -> np.ndarray:
    moved = current.copy()
    known = rows >= 0
    moved[known] = learnt[rows[known]]
    return moved


def _item_indexed_paths(model: tf.keras.Model) -> tuple[set, set]:
    """Paths of the variables whose rows are item indices: (learnt ones, item data). Every
    model keeps its item side in the shared ``item_tower`` and ``item_frequency``."""
    learnt = {id(model.item_tower.id_embedding.embeddings)}
    data = {id(model.item_frequency), *(id(table) for table in model.item_tower.feature_tables.values())}
    paths = model.get_weight_paths()
    return ({path for path, variable in paths.items() if id(variable) in learnt},
            {path for path, variable in paths.items() if id(variable) in data})


def _check_same_variables(source: str, model: tf.keras.Model, source_model: tf.keras.Model,
                          resized: set) -> None:
    """Refuses a source whose variables are not ``model``'s, naming the first difference; the
    variables at the paths in ``resized`` may have another number of rows."""
    # Both directions: a variable the source lacks would stay random, and one the model lacks
    # (an extra block, a side-feature table) would be dropped, both without a word from TF.
    # Compared as built from the source's config, leaving out metric trackers (reset every epoch;
    # options such as training_cache_fraction add or remove some).
    wanted, stored = _weight_shapes(model), _weight_shapes(source_model)

    def fits(path):
        return wanted[path][1:] == stored[path][1:] if path in resized else wanted[path] == stored[path]

    differences = ([f"{key} is missing" for key in sorted(wanted.keys() - stored.keys())]
                   + [f"{key} is not in this model" for key in sorted(stored.keys() - wanted.keys())]
                   + [f"{key} has shape {stored[key]}, this model {wanted[key]}"
                      for key in sorted(wanted.keys() & stored.keys()) if not fits(key)])
    if differences:
        raise ConfigError(f"train.warm_start={source!r} does not fit this model (another architecture or "
                          f"options?): {len(differences)} difference(s), first: {differences[0]}")


def _restore_every_weight(source_model: tf.keras.Model, checkpoint: str, serving: bool) -> None:
    """Restores ``source_model`` from ``checkpoint`` and checks that every weight was in it.

    Metric trackers may be missing: a checkpoint of an older version lacks the ones added since
    (TF's ``assert_existing_objects_matched`` refused it, naming only a tracker's 'count:0').
    Whether a weight was restored is read from its value: each is first filled with a value no
    trained model holds (NaN, or the integer minimum). A boolean (a quantizer's ``initialized``
    flag) has no such value and is not checked.

    Raises:
      ValueError: A weight is not in the checkpoint (naming it).
    """
    own = _weight_shapes(source_model)
    weights = {path: variable for path, variable in source_model.get_weight_paths().items()
               if path in own and variable.shape.num_elements()
               and (variable.dtype.is_floating or variable.dtype.is_integer)}
    for variable in weights.values():
        variable.assign(tf.fill(tf.shape(variable), _sentinel(variable.dtype)))
    if serving:
        # The serving module holds the model as its ``model`` attribute, beside the index.
        tf.train.Checkpoint(model=source_model).read(checkpoint).expect_partial()
    else:
        source_model.load_weights(checkpoint).expect_partial()
    missing = [path for path, variable in weights.items()
               if bool(tf.reduce_all(tf.math.is_nan(variable) if variable.dtype.is_floating
                                     else tf.equal(variable, _sentinel(variable.dtype))))]
    if missing:
        raise ValueError(f"{len(missing)} of its model's weights are not in it, first: {missing[0]}")


def _sentinel(dtype: tf.DType) -> tf.Tensor:
    return tf.constant(float("nan") if dtype.is_floating else dtype.min, dtype)


def _weight_shapes(model: tf.keras.Model) -> dict:
    """{path: shape} of a model's own variables (not its metric trackers' or optimizer's)."""
    trackers = {id(variable) for metric in model.metrics for variable in metric.variables}
    return {path: tuple(variable.shape) for path, variable in model.get_weight_paths().items()
            if id(variable) not in trackers and not path.startswith("optimizer.")}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
