"""Training and evaluation runs: data -> split -> model.fit with model selection -> metrics.

A run directory holds everything a run produced, so it can be inspected, resumed after an
interruption, and evaluated again later:

  config.json          the resolved RunConfig
  history.json         one row per epoch: loss, validation metrics, elapsed seconds
  metrics.json         best validation and test metrics, epochs, train time
  training_curves.png  loss and validation metric per epoch
  model/               the selected model (config + weights), loadable with ``load_model``
  backup/              Keras BackupAndRestore state while training (removed when done)
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import time
import types
import typing
import weakref
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfx_xmatch.config import ConfigError, RunConfig, check_values, config_from_dict
from tfx_xmatch.data import DataFormatError, load_dataset, make_split, make_synthetic, sequence_training_dataset
from tfx_xmatch.data.dataset import SequenceDataset, Split
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.evaluation import evaluate_full_ranking
from tfx_xmatch.io_utils import (
    CLAIM_FILE, atomic_directory, atomic_path, check_checkpoint_directory, claimed_directory,
    remove_stale_temporaries, temporary_of, write_json_atomic,
)
from tfx_xmatch.models import MODELS
from tfx_xmatch.models.base import RetrievalModel
from tfx_xmatch.user_errors import clean_tf_message, shortened, user_error_text

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------- data and model
def prepare_split(config: RunConfig) -> Split:
    """Loads the configured dataset and splits it.

    Raises:
      ConfigError: ``data.synthetic``, ``data.split`` or ``data.split_options`` is refused
        (the message names the section: "num_users must be at least 1" did not).
    """
    data = config.data
    synthetic = data.dataset == "synthetic"
    kwargs = _synthetic_arguments(data.synthetic) if synthetic else {}
    if data.format:
        kwargs["format"] = data.format
    with _settings_named("data.synthetic", when=synthetic):
        dataset = load_dataset(
            data.dataset,
            data_dir=data.data_dir,
            side_info=data.side_info,
            skip_bad_lines=data.skip_bad_lines,
            **kwargs,
        )
    with _settings_named(f"data.split={data.split!r} with data.split_options={data.split_options!r}"):
        return make_split(dataset, data.split, **data.split_options)


def data_fingerprint(split: Split) -> dict:
    """What identifies the data a run trains on: the counts and digests of the item ids, the
    training sequences and the validation and test targets (a digest of ML-1M takes ~10 ms)."""
    def digest(arrays) -> str:
        arrays = [np.asarray(array, np.int64) for array in arrays]
        hashed = hashlib.sha256(np.asarray([len(array) for array in arrays], np.int64).tobytes())
        hashed.update(np.concatenate(arrays).tobytes() if arrays else b"")
        return hashed.hexdigest()

    ids = json.dumps(split.dataset.item_vocab.to_json()["ids"]).encode("utf-8")
    return {"dataset": split.dataset.name, "users": len(split.train_sequences), "items": split.num_items,
            "item_ids_sha256": hashlib.sha256(ids).hexdigest(), "train_sha256": digest(split.train_sequences),
            "validation_sha256": digest([split.validation.targets]), "test_sha256": digest([split.test.targets])}


def _check_same_data(run_dir: pathlib.Path, fingerprint: dict) -> None:
    """Refuses to resume a run on data other than the data it started on: the backed-up item
    rows were restored by index, so a changed file silently gave them to other items."""
    path = run_dir / "data.json"
    if not path.exists():  # a run started before data.json was written
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    differing = [key for key in fingerprint if before.get(key) != fingerprint[key]]
    if differing:
        shown = ", ".join(f"{key} {before.get(key)!r} -> {fingerprint[key]!r}" if "sha256" not in key else key
                          for key in differing)
        raise ValueError(f"{run_dir} was started on other data than it is given now ({shown} differ): resuming "
                         "would give its learnt item rows to other items; train in a new run directory (warm "
                         "starting from this one carries the items over by id)")


@contextlib.contextmanager
def _settings_named(settings: str, when: bool = True) -> Iterator[None]:
    """Names ``settings`` in a ValueError raised by the code they configure (a data file's own
    DataFormatError already names its file and line)."""
    try:
        yield
    except (ConfigError, DataFormatError):
        raise
    except ValueError as error:
        if not when:
            raise
        raise ConfigError(f"{settings}: {error}") from error


def _synthetic_arguments(arguments: dict) -> dict:
    """``data.synthetic`` checked against ``make_synthetic``'s parameters, naming the key (a
    string for an integer failed inside NumPy with a TypeError)."""
    parameters = inspect.signature(make_synthetic).parameters
    for key, value in arguments.items():
        if key not in parameters:
            raise ConfigError(f"unknown key data.synthetic.{key}; make_synthetic takes {sorted(parameters)}")
        integer = isinstance(parameters[key].default, int)
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise ConfigError(f"data.synthetic.{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return dict(arguments)


def _user_feature_cardinalities(dataset: SequenceDataset) -> dict[str, int]:
    return {
        name: int(max(np.max(values, initial=0), len(dataset.feature_vocabs.get(name, []))))
        for name, values in dataset.user_features.items()
    }


def build_model(config: RunConfig, dataset: Optional[SequenceDataset] = None, *,
                num_items: Optional[int] = None) -> tf.keras.Model:
    """Instantiates the configured model for ``dataset``'s catalogue (and features, if asked),
    or for ``num_items`` items without features (e.g. from TFRecords and a vocabulary).

    Raises:
      ValueError: unknown model, or neither/both of ``dataset`` and ``num_items``.
      ConfigError: bad model options, or ``data.side_info`` without a dataset to read them from.
    """
    if (dataset is None) == (num_items is None):
        raise ValueError("build_model needs exactly one of dataset and num_items")
    model_type, kwargs = model_arguments(config)
    if config.data.side_info:
        if dataset is None:
            raise ConfigError("data.side_info needs the dataset's feature tables; this entry point has only "
                              "item ids (set data.side_info=false)")
        kwargs["item_feature_dims"] = {k: int(v.shape[1]) for k, v in dataset.item_features.items()}
        kwargs["item_feature_tables"] = dict(dataset.item_features)
        kwargs["user_feature_cardinalities"] = _user_feature_cardinalities(dataset)
    try:
        return model_type(num_items=dataset.num_items if dataset is not None else int(num_items), **kwargs)
    except TypeError as error:  # a user's constructor that does not take what its signature says
        if model_type in MODELS.values():
            raise
        raise ConfigError(f"model {model_type.__name__!r} cannot be built from model.options "
                          f"{shortened(repr(config.model.options), 200)}: {error}") from error


def import_user_module(module_name: str, what: str):
    """Imports the module that defines a user's model class; ``what`` (e.g. "model.name='x.Y'")
    starts the error.

    Raises:
      ValueError: The module is not found (with where the ``xmatch`` command looks), or raised
        while importing (its error quoted).
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if not (error.name and (module_name == error.name or module_name.startswith(error.name + "."))):
            raise ValueError(f"{what}: importing the module {module_name!r} failed: {error}") from error
        top = module_name.split(".")[0]
        here = (" It is in the current directory, which the xmatch command does not search: run it with "
                "PYTHONPATH=." if os.path.exists(f"{top}.py") or os.path.isdir(top) else "")
        raise ValueError(f"{what}: the module {module_name!r} is not found; install it or add its directory to "
                         f"PYTHONPATH.{here}") from error
    except Exception as error:  # whatever the user's module raises while importing
        raise ValueError(f"{what}: importing the module {module_name!r} failed "
                         f"({type(error).__name__}: {error})") from error


def model_arguments(config: RunConfig) -> tuple[type, dict]:
    """The class ``config.model.name`` names and its constructor arguments from ``config.model``
    (but ``num_items`` and what the dataset adds), checked without building the model: what a
    pipeline checks before its first stage.

    Raises:
      ConfigError: See ``configured_model_class`` and ``model.options``' checks.
    """
    kwargs = dataclasses.asdict(config.model)
    model_type = configured_model_class(kwargs.pop("name"))
    kwargs.update(_model_options(model_type, kwargs.pop("options"), shared=set(kwargs)))
    return model_type, kwargs


def configured_model_class(name: str) -> type:
    """The class a config's ``model.name`` names: a built-in model ("two_tower", "sparcode",
    "sparc", "t2diff"), or a user's subclass of one by its import path
    ("my_package.models.MyTwoTower"), which is imported here (so on every Beam or TFX worker).

    Raises:
      ConfigError: An unknown name, a module that cannot be imported (its error quoted), a class
        that is not a tfx_xmatch model, or one not registered with Keras (its runs could not be
        loaded as themselves).
    """
    if name in MODELS:
        return MODELS[name]
    module_name, _, class_name = name.rpartition(".")
    if not module_name or not class_name:
        raise ConfigError(f"unknown model {name!r} (model.name): give one of {sorted(MODELS)}, or the import path "
                          "of your own subclass of one (my_package.models.MyTwoTower)")
    try:
        module = import_user_module(module_name, f"model.name={name!r}")
    except ValueError as error:
        raise ConfigError(str(error)) from error.__cause__
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, RetrievalModel)):
        raise ConfigError(f"model.name={name!r}: {module_name}.{class_name} is "
                          f"{'missing' if cls is None else 'not a subclass of a tfx_xmatch model'}; give one of "
                          f"{sorted(MODELS)} or a subclass of one")
    if cls not in MODELS.values() and tf.keras.utils.get_registered_object(
            tf.keras.utils.get_registered_name(cls)) is not cls:
        raise ConfigError(f"model.name={name!r} is not registered with Keras, so its runs could not be loaded as "
                          "themselves; decorate the class with @tf.keras.utils.register_keras_serializable(package=...)")
    return cls


def _expected_type(hint, default) -> tuple[Optional[type], bool]:
    """(the type an option's value must have, whether null is allowed), from the argument's
    annotation where it says something simple (``float``, ``Optional[int]``, ``dict[str, int]``:
    its origin), else from the type of its default (``inspect.Parameter.empty`` for none);
    (None, ...) when neither says anything."""
    nullable = default is None
    if hint is not None:
        arguments = typing.get_args(hint)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = [t for t in arguments if t is not type(None)] if union else [hint]
        nullable = nullable or (union and type(None) in arguments)
        kind = (typing.get_origin(allowed[0]) or allowed[0]) if len(allowed) == 1 else None
        if isinstance(kind, type):
            return kind, nullable
    return (None if default is None or default is inspect.Parameter.empty else type(default)), nullable


def _constructor_arguments(model_type: type) -> tuple[dict, dict]:
    """(name: default, name: type hint) of the keyword arguments ``model_type`` takes: its own
    ``__init__``'s and, where that passes ``**kwargs`` on, its base classes' (a user's subclass
    adds an argument to a built-in model's)."""
    defaults, hints = {}, {}
    # Up to RetrievalModel: Keras's own constructor arguments (name, dtype, trainable) are not options.
    for cls in model_type.__mro__[:model_type.__mro__.index(RetrievalModel) + 1]:
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters
        try:
            cls_hints = typing.get_type_hints(cls.__init__)
        except (NameError, TypeError):  # an unresolvable annotation: None defaults stay untyped
            cls_hints = {}
        for key, parameter in parameters.items():
            if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and key != "self":
                defaults.setdefault(key, parameter.default)
                if key in cls_hints:
                    hints.setdefault(key, cls_hints[key])
        if not any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
            break
    return defaults, hints


def _model_options(model_type: type, options: dict, shared: set[str]) -> dict:
    """Checks ``model.options`` against the model's constructor: known names only, not a shared
    ``model.*`` field (which would silently disagree with the data pipeline), every argument
    without a default given, and values of the type of the argument's annotation (``float``,
    ``Optional[float]``: a number, or null too) or, without one, of its default (YAML reads
    ``1e-3`` as a string, for one)."""
    name = next((key for key, cls in MODELS.items() if cls is model_type), model_type.__name__)
    defaults, hints = _constructor_arguments(model_type)
    own = {key: default for key, default in defaults.items() if key not in shared | {"num_items"}}
    required = sorted(key for key, default in own.items() if default is inspect.Parameter.empty)
    if set(required) - set(options):
        raise ConfigError(f"model {name!r} needs model.options {sorted(set(required) - set(options))}: its "
                          "constructor has no default for them")
    checked = {}
    for key, value in options.items():
        if key == "num_items":
            raise ConfigError("model.options.num_items cannot be set: it comes from the dataset")
        if key in shared:
            raise ConfigError(f"model.options.{key} duplicates model.{key}; set model.{key} instead")
        if key not in own:
            raise ConfigError(f"model.options {[key]} are not arguments of model {name!r}; it accepts {sorted(own)}")
        expected, nullable = _expected_type(hints.get(key), own[key])
        default = None if own[key] is inspect.Parameter.empty else own[key]
        if value is None and nullable or expected is None:
            valid = True
        elif expected is bool:
            valid = isinstance(value, bool)
        elif expected is float:
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            valid = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if valid else value
        elif expected is int:
            valid = isinstance(value, int) and not isinstance(value, bool)
        elif expected in (tuple, list, collections.abc.Sequence):
            valid = isinstance(value, (tuple, list))
        else:
            valid = isinstance(value, expected)
        if not valid:
            kind = "a number" if expected is float else ("an " if expected.__name__[0] in "aeiou" else "a ") + \
                expected.__name__
            what = (f"like its default {default!r}" if default is not None and isinstance(default, expected)
                    else kind + (" or null" if nullable else ""))
            raise ConfigError(f"model.options.{key} must be {what}, got {value!r}")
        checked[key] = value
    return checked


def model_inputs(model: tf.keras.Model, dataset: SequenceDataset, histories: np.ndarray, user_rows: np.ndarray) -> dict:
    """The model's input dict for padded histories of the given dataset rows."""
    inputs = {"history": histories}
    for name in getattr(model, "user_feature_cardinalities", {}):
        inputs[name] = dataset.user_features[name][user_rows].astype(np.int32)
    return inputs


_SCORING_FUNCTIONS: "weakref.WeakKeyDictionary[tf.keras.Model, tuple]" = weakref.WeakKeyDictionary()
# Seed of a T2Diff's sampling noise in evaluation passes (stateless draws: a row's noise
# depends on its place in the batch, so on eval.batch_size too).
EVALUATION_SEED = 0


def pass_scorer(model: tf.keras.Model) -> Callable[[dict], tf.Tensor]:
    """``score(inputs) -> [B, num_items + 1]`` for one evaluation pass over fixed weights.

    A model with a ``scoring_table()`` (SparCode: every code against every item through the
    interaction network, then its serving cache's cut) has it computed once for the pass, not
    once per batch: call this again after the weights change. A T2Diff whose sampling draws
    noise (DDPM, ``initial_noise="random"``, eta > 0) draws it from ``EVALUATION_SEED``, so that
    two evaluations of the same weights (``xmatch evaluate`` and the run's own test report,
    validation passes, ``xmatch compare``) agree instead of each drawing other noise.
    """
    # One tf.function per model: re-wrapping on every validation would retrace every epoch. Kept
    # beside the model, not on it: Keras tracks a model's attributes, so a SavedModel of the model
    # would carry these evaluation graphs too.
    functions = _SCORING_FUNCTIONS.get(model)
    if functions is None:
        score_all = (functools.partial(model.score_all, seed=EVALUATION_SEED) if hasattr(model, "sample_drift")
                     else model.score_all)
        functions = (tf.function(score_all, reduce_retracing=True),
                     tf.function(model.scoring_table) if hasattr(model, "scoring_table") else None)
        _SCORING_FUNCTIONS[model] = functions
    score_all, scoring_table = functions
    table = None if scoring_table is None else scoring_table()
    if table is None:
        return score_all
    return lambda inputs: score_all(inputs, table)


def make_score_fn(model: tf.keras.Model, dataset: SequenceDataset) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A ``score_fn(histories, user_rows) -> [B, num_items + 1]`` for one full-ranking
    evaluation pass (see ``pass_scorer``)."""
    score = pass_scorer(model)

    def score_fn(histories: np.ndarray, user_rows: np.ndarray) -> tf.Tensor:
        return score(model_inputs(model, dataset, histories, user_rows))

    return score_fn


def load_run_config(run_dir) -> RunConfig:
    """The config a run directory was trained with (its ``config.json``).

    Raises:
      FileNotFoundError: ``run_dir`` holds no ``config.json`` (not a run directory of ``train``).
    """
    config_path = pathlib.Path(run_dir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: {run_dir} is not a run directory of `xmatch train`")
    return config_from_dict(json.loads(config_path.read_text(encoding="utf-8")), str(config_path))


def evaluate(model: tf.keras.Model, split: Split, which: str, config: RunConfig, return_ranks: bool = False):
    """Full-ranking metrics of ``model`` on the split's "validation" or "test" examples; with
    ``return_ranks``, the pair ``(metrics, ranks)`` with each example's 0-based target rank."""
    if which not in ("validation", "test"):
        raise ValueError(f"which must be 'validation' or 'test', got {which!r}")
    return evaluate_full_ranking(
        make_score_fn(model, split.dataset),
        getattr(split, which),
        num_items=split.num_items,
        max_length=config.model.max_length,
        batch_size=config.eval.batch_size,
        ks=tuple(config.eval.ks),
        mask_history=config.eval.mask_history,
        item_popularity=split.item_popularity(),
        return_ranks=return_ranks,
    )


# ------------------------------------------------------------------------- persistence
def build_all_variables(model: tf.keras.Model) -> None:
    """Creates every variable with inference calls, so weights can be loaded into them
    (``RetrievalModel.build_all_variables``)."""
    model.build_all_variables()


def model_kind(model: tf.keras.Model) -> str:
    """The name that rebuilds a model of ``model``'s class: for the built-in models, the
    ``model.name`` a config gives ("two_tower", "sparcode", ...); for a subclass (a user's own
    tower or loss term), its Keras registered name ("my_package>MyTwoTower").

    Raises:
      ValueError: ``model`` is neither a built-in model nor a ``RetrievalModel`` subclass
        registered with ``tf.keras.utils.register_keras_serializable``. A subclass was saved
        as its built-in base class, and came back without its own layers or arguments.
    """
    cls = type(model)
    for key, built_in in MODELS.items():
        if cls is built_in:
            return key
    registered = tf.keras.utils.get_registered_name(cls)
    if not issubclass(cls, RetrievalModel):
        raise ValueError(f"{cls.__module__}.{cls.__qualname__} is not a tfx_xmatch model: save_model, export and "
                         f"warm starts take one of {sorted(MODELS)} or a subclass of tfx_xmatch.models.base."
                         "RetrievalModel (a plain tfrs.Model has no num_items, item_embeddings or user_embedding)")
    if tf.keras.utils.get_registered_object(registered) is not cls:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__} is a subclass of a tfx_xmatch model, but not registered "
                         "with Keras, so a saved copy could not be rebuilt as it is (it would come back as its base "
                         "class, without its own layers); decorate the class with "
                         "@tf.keras.utils.register_keras_serializable(package=...) and import its module before "
                         "loading")
    return registered


def model_class(kind: str, module: Optional[str] = None) -> Optional[type]:
    """The class ``model_kind`` named ``kind``: a built-in model, or a registered subclass; None
    for any other name.

    Args:
      kind: A built-in model's name, or a registered subclass's Keras name ("pkg>Class").
      module: The module that defines the subclass (what ``model_description`` recorded). When
        ``kind`` is not registered in this process yet, it is imported first, as pickle and
        Keras 3 do: ``xmatch`` commands and Beam workers load a user's model without being told
        where it lives. Default None: look the name up only.

    Raises:
      ValueError: ``module`` cannot be imported (its error quoted), or is ``__main__``, a script
        that no other process can import.
    """
    if kind in MODELS:
        return MODELS[kind]
    if module is not None and tf.keras.utils.get_registered_object(kind) is None:
        if module == "__main__":
            raise ValueError(f"the model {kind!r} was defined in a script (__main__), which this process cannot "
                             "import: move the class into a module on the Python path, and save the model again")
        import_user_module(module, f"the model {kind!r} is defined in the module {module!r}")
    cls = tf.keras.utils.get_registered_object(kind)
    return cls if isinstance(cls, type) and issubclass(cls, RetrievalModel) else None


def unregistered_because(module: object) -> str:
    """Why a saved model's class name found no class: completes "no such class is ...".
    ``module`` is what its config recorded (a module name, or nothing)."""
    if isinstance(module, str):
        return f"registered by its module {module!r}"
    return ("registered in this process, and the config names no module that defines it (saved before modules "
            "were recorded; saving it again records it)")


def model_description(model: tf.keras.Model) -> dict:
    """``{"model": kind, "config": model.get_config()}``, and for a registered subclass also
    ``"module"``, the module that defines it: what rebuilds ``model`` (without its weights). A
    saved model's ``config.json`` and a serving SavedModel's ``SERVING_MODEL_DESCRIPTION`` hold it.

    Loading a description imports its module (``model_class``): load model directories you trust,
    as with pickle or a Keras 3 ``.keras`` file."""
    kind = model_kind(model)
    module = type(model).__module__
    if module == "__main__":  # `python -m package.module` runs it as __main__; its spec keeps its name
        module = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None) or module
    return {"model": kind, **({} if kind in MODELS else {"module": module}), "config": model.get_config()}


# Where a serving SavedModel (tfx_xmatch.export) keeps its model's description, so that it can
# warm-start a new run (TFX's ``base_model`` is a Trainer's *serving* model).
SERVING_MODEL_DESCRIPTION = "assets.extra/xmatch_model.json"


def save_model(model: tf.keras.Model, directory: str | pathlib.Path, item_vocab: Optional[Vocabulary] = None) -> None:
    """Writes ``model`` as config.json + a TF checkpoint (+ item_vocab.json), replacing
    ``directory`` atomically. The vocabulary is what export needs to serve raw item ids."""
    with atomic_directory(directory) as temporary:
        write_json_atomic(temporary / "config.json", model_description(model))
        model.save_weights(str(temporary / "weights"))
        if item_vocab is not None:
            item_vocab.save(temporary / "item_vocab.json")


def load_item_vocab(directory: str | pathlib.Path) -> Vocabulary:
    """The item vocabulary saved beside a model by ``save_model``.

    Raises:
      FileNotFoundError: The model was saved without one.
    """
    path = pathlib.Path(directory) / "item_vocab.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the model in {directory} was saved without its item vocabulary")
    return Vocabulary.load(path)


def load_model(directory: str | pathlib.Path) -> tf.keras.Model:
    """Loads a model written by ``save_model``.

    Raises:
      FileNotFoundError: ``directory`` has no config.json.
      ValueError: Its config.json is not a saved model's (a run directory given for its
        ``model/``), or its weights are missing, cut short or damaged (naming them).
    """
    # tf.io.gfile and os.path, so that the directory may be a URL (gs://...): Beam workers load
    # the model this way. pathlib would turn "gs://b/x" into the local "gs:/b/x".
    directory = os.fspath(directory)
    config_path = os.path.join(directory, "config.json")
    if not tf.io.gfile.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: is {directory} a saved model directory?")
    with tf.io.gfile.GFile(config_path, "rb") as handle:
        saved = json.loads(handle.read())
    named = saved.get("model") if isinstance(saved, dict) else None
    module = saved.get("module") if isinstance(saved, dict) else None
    try:
        cls = model_class(named, module if isinstance(module, str) else None) if isinstance(named, str) else None
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from error.__cause__
    if cls is None or not isinstance(saved.get("config"), dict):
        hint = (f"; the model is in {os.path.join(directory, 'model')}"
                if tf.io.gfile.exists(os.path.join(directory, "model", "config.json")) else "")
        if isinstance(named, str) and ">" in named and tf.keras.utils.get_registered_object(named) is None:
            hint += (f"; {named!r} has the form of a registered Keras class's name, but no such class is "
                     f"{unregistered_because(module)}: import the module that registers it before loading")
        raise ValueError(f"{config_path} is not a saved model's config: its 'model' is {shortened(repr(named), 60)}, not one "
                         f"of {sorted(MODELS)} or a registered subclass (a training run's config?){hint}")
    model = cls.from_config(saved["config"])
    build_all_variables(model)
    weights = os.path.join(directory, "weights")
    try:
        model.load_weights(weights).expect_partial()
    except (IndexError, tf.errors.OpError) as error:
        # TensorFlow names neither the file nor the problem clearly ("Read less bytes than
        # requested", an IndexError that read as a bug).
        reason = clean_tf_message(getattr(error, "message", None) or str(error)).splitlines()[0]
        raise ValueError(f"the weights {weights}.* of {directory} cannot be read ({reason}): the saved model is "
                         "incomplete or damaged; save or copy it again") from None
    return model


# ------------------------------------------------------------------------- model selection
class ModelSelection(tf.keras.callbacks.Callback):
    """Evaluates on validation, keeps the best weights, stops early, survives restarts.

    Its state (per-epoch history, best epoch) is a JSON file in the run directory, so a
    resumed run continues with the same patience count and the same best model.
    """

    def __init__(self, evaluate_fn: Callable[[], dict], run_dir: pathlib.Path, monitor: str,
                 patience: int, every: int, max_seconds: Optional[float]):
        super().__init__()
        self.evaluate_fn = evaluate_fn
        self.run_dir = run_dir
        self.monitor = monitor
        self.patience = patience
        self.every = max(1, every)
        self.max_seconds = max_seconds
        self.state_path = run_dir / "history.json"
        self.best_dir = run_dir / "best_weights"
        self.state = {"epochs": [], "best_epoch": None, "best": -math.inf, "train_seconds": 0.0}

    def on_train_begin(self, logs=None):
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
            self.state["best"] = -math.inf if self.state["best"] is None else self.state["best"]
            if self.state.pop("stopped", None):
                # Training again (its time budget was raised): on disk too, in case no epoch
                # follows before the run ends.
                write_json_atomic(self.state_path, {**self.state, "best": _finite_or_none(self.state["best"])})
        self._epoch_start = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        self.state["train_seconds"] += time.time() - self._epoch_start
        row = {"epoch": epoch + 1, "loss": float(logs.get("loss", float("nan")))}
        # Every training log of the epoch (each loss term, codebook usage), not only the loss:
        # collapse or a runaway term is diagnosed from these after the run.
        row.update({key: float(value) for key, value in logs.items()
                    if not key.startswith("val_") and key not in row and np.ndim(value) == 0})
        weights_finite = _all_finite(self.model.trainable_weights)
        if not math.isfinite(row["loss"]) or not weights_finite:
            self._stop_diverged(epoch, row, weights_finite)
            return
        out_of_time = self.max_seconds is not None and self.state["train_seconds"] >= self.max_seconds
        # The last epoch, planned or cut by the time budget, is validated too: with
        # validation_every > epochs no epoch was, and the run kept unselected final weights.
        validated = (epoch + 1) % self.every == 0 or epoch + 1 == self.params.get("epochs") or out_of_time
        if validated:
            metrics = self.evaluate_fn()
            if self.monitor not in metrics:
                raise KeyError(f"monitor {self.monitor!r} is not a validation metric; have {sorted(metrics)}")
            if math.isnan(metrics[self.monitor]):
                # NaN never beats the best: no epoch would be selected and patience never run out.
                raise ValueError(f"val {self.monitor} is NaN at epoch {epoch + 1}: no validation example counts "
                                 "for it (TailRecall needs validation targets outside the 20% most popular "
                                 "items); choose another train.monitor, in a new run directory")
            for key, value in metrics.items():
                row[f"val_{key}"] = value
            # The progress bar shows the selection metric; history.json keeps every metric.
            for key in dict.fromkeys((self.monitor, "HR@10")):
                if key in metrics:
                    logs[f"val_{key}"] = metrics[key]
            if metrics[self.monitor] > self.state["best"]:
                self.state["best"], self.state["best_epoch"] = metrics[self.monitor], epoch + 1
                with atomic_directory(self.best_dir) as temporary:
                    self.model.save_weights(str(temporary / "weights"))
        row["train_seconds"] = round(self.state["train_seconds"], 2)
        self.state["epochs"] = [r for r in self.state["epochs"] if r["epoch"] < epoch + 1] + [row]
        # Patience is judged only where there is a fresh validation result, and never before
        # the first one, so validation_every > patience cannot stop a run unvalidated.
        since_best = epoch + 1 - (self.state["best_epoch"] or epoch + 1)
        stopped = None
        if validated and self.patience and since_best >= self.patience:
            logger.info("early stopping: no better val %s for %d epochs", self.monitor, since_best)
            stopped = "early_stopping"
        elif out_of_time:
            logger.info("stopping: training time budget of %.0f s reached", self.max_seconds)
            stopped = "time_budget"
        if stopped:
            # Saved with the epoch, so a run killed after it (in its final save or evaluation)
            # does not resume into epochs the uninterrupted run never trained.
            self.state["stopped"] = stopped
            self.model.stop_training = True
        write_json_atomic(self.state_path, {**self.state, "best": _finite_or_none(self.state["best"])})

    def _stop_diverged(self, epoch: int, row: dict, weights_finite: bool) -> None:
        """Stops a run whose loss or weights are no longer finite, keeping the best epoch so far.

        Raises:
          TrainingDiverged: no epoch was validated before (there is nothing to keep).
        """
        row["train_seconds"] = round(self.state["train_seconds"], 2)
        self.state["epochs"] = [r for r in self.state["epochs"] if r["epoch"] < epoch + 1] + [row]
        weights = "finite" if weights_finite else "not finite"
        what = f"training diverged at epoch {epoch + 1} (loss {row['loss']:.4g}, weights {weights})"
        if self.state["best_epoch"] is None:
            # This directory keeps its config (another is refused there), so: a new one.
            raise TrainingDiverged(f"{what} before any epoch was validated: lower train.learning_rate, in a new "
                                   "run directory")
        logger.warning("%s: stopping; the model kept is epoch %d's (val %s %.4f). Lower train.learning_rate "
                       "to train further, in a new run directory", what, self.state["best_epoch"], self.monitor,
                       self.state["best"])
        self.state["stopped"] = "diverged"
        self.model.stop_training = True
        write_json_atomic(self.state_path, {**self.state, "best": _finite_or_none(self.state["best"])})

    @staticmethod
    def finished(state: dict, max_seconds: Optional[float]) -> bool:
        """Whether a saved selection ``state`` had stopped for good: early stopping, divergence
        (the same settings would diverge again), or a time budget that the (possibly raised)
        ``max_seconds`` still leaves spent."""
        stopped = state.get("stopped")
        return stopped in ("early_stopping", "diverged") or (
            stopped == "time_budget" and max_seconds is not None and state["train_seconds"] >= max_seconds)


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite before any epoch could be kept."""


def _all_finite(variables) -> bool:
    # Reduced where the variables live: no copy of every weight to the host each epoch.
    return all(bool(tf.reduce_all(tf.math.is_finite(variable))) for variable in variables)


def _finite_or_none(value: float) -> Optional[float]:
    return None if value is None or math.isinf(value) else value


# ------------------------------------------------------------------------- runs
def train(
    config: RunConfig,
    run_dir: str | pathlib.Path,
    split: Optional[Split] = None,
    callbacks: Sequence[tf.keras.callbacks.Callback] = (),
) -> dict:
    """Trains the configured model, selects it on validation and reports test metrics.

    Re-running with the same ``run_dir`` resumes an interrupted run from its last epoch; a run
    directory that holds a different config is refused rather than mixed.

    Args:
      config: The run configuration.
      run_dir: Where the run's artifacts go (created if needed).
      split: An already prepared split (skips loading the dataset again).
      callbacks: Extra Keras callbacks for ``model.fit``.

    Returns:
      The metrics dict also written to ``metrics.json``.

    Raises:
      ValueError: ``run_dir`` belongs to a run with another configuration.
      NotADirectoryError: ``run_dir`` is a file.
      FileNotFoundError: ``run_dir`` is a symlink to nothing.
      ValueError: ``run_dir``'s path holds a glob character (see ``check_checkpoint_directory``).
      DirectoryBeingWritten: Another process is training in ``run_dir``.
    """
    check_values(config)  # a config built in code has not been through load_config
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run directory {str(run_dir)!r} is a file, not a directory")
    if run_dir.is_symlink() and not run_dir.exists():  # mkdir said only "File exists"
        raise FileNotFoundError(f"run directory {str(run_dir)!r} is a dangling symlink (to "
                                f"{os.readlink(run_dir)!r}, which does not exist)")
    check_checkpoint_directory(run_dir, "run directory")
    made = [directory for directory in (run_dir, *run_dir.parents) if not directory.exists()]
    try:
        return _train_in(config, run_dir, split, callbacks)
    except BaseException:
        # A run refused before it wrote anything (a bad option, a missing data file) leaves
        # none of the directories it made; a failure to remove one must not hide the error.
        for directory in made:
            try:
                directory.rmdir()  # only while empty
            except OSError:
                break
        raise


def _train_in(config: RunConfig, run_dir: pathlib.Path, split: Optional[Split],
              callbacks: Sequence[tf.keras.callbacks.Callback]) -> dict:
    """``train`` once ``run_dir`` is known to be a directory or to be made."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.train.strategy == "multi_worker" and config.train.max_train_seconds is not None:
        # Each worker would time itself and stop at a different epoch, and the collective ops
        # of the one still training would wait forever for the other.
        raise ConfigError("train.max_train_seconds cannot be used with train.strategy=multi_worker "
                          "(workers would stop at different epochs); bound train.epochs instead")
    strategy = make_strategy(config.train.strategy)
    chief = is_chief(strategy)
    # Claimed before config.json is looked for: two new runs given one directory each found
    # none, and both trained into it. The other workers of a cluster share it by design.
    with claimed_directory(run_dir, "run directory") if chief else contextlib.nullcontext():
        return _train_claimed(config, run_dir, split, callbacks, strategy, chief)


def _train_claimed(config: RunConfig, run_dir: pathlib.Path, split: Optional[Split],
                   callbacks: Sequence[tf.keras.callbacks.Callback], strategy: tf.distribute.Strategy,
                   chief: bool) -> dict:
    """``train`` once this process may write ``run_dir`` (its chief holds the claim)."""
    # Non-chief workers write their copies under the run directory and delete them at the end.
    output_dir = run_dir if chief else run_dir / ".workers" / worker_name(strategy)
    if not (run_dir / "config.json").exists():
        foreign = sorted(entry.name for entry in run_dir.iterdir() if entry.name not in RUN_OUTPUTS + RUN_SCRATCH
                         and temporary_of(entry.name, RUN_OUTPUTS) is None)
        if foreign:
            raise ConfigError(f"run directory {run_dir} is not empty and holds no run ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); give a new or empty directory")
    if (run_dir / "config.json").exists():
        previous = load_run_config(run_dir)
        changed = _changed_keys(previous, config) - RESUMABLE_KEYS
        if changed:
            raise ValueError(f"{run_dir} holds a run with a different config ({sorted(changed)} differ); "
                             "use another run directory")
        if (run_dir / "metrics.json").exists():
            # Said where it is seen (the CLI prints warnings): re-running a finished run trains
            # nothing, which a user who expected training must not have to guess.
            logger.warning("%s already holds a finished run; returning its metrics without training", run_dir)
            return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    tf.keras.utils.set_random_seed(config.train.seed)
    # The data and split options are checked before the directory is claimed: a typo must not
    # leave a config.json that refuses the corrected run.
    split = split if split is not None else prepare_split(config)
    empty = [part for part in ("validation", "test") if len(getattr(split, part)) == 0]
    if empty:  # found by the first validation pass otherwise, as "examples is empty"
        raise ConfigError(f"the {split.name} split of {split.dataset.name!r} leaves no {' and no '.join(empty)} "
                          f"examples (data.split_options={config.data.split_options!r}); model selection and the "
                          "test report need both")
    fingerprint = data_fingerprint(split)
    _check_same_data(run_dir, fingerprint)
    too_deep = [k for k in config.eval.ks if k > split.num_items]
    if too_deep:  # found by the first validation pass otherwise, after an epoch of training
        raise ConfigError(f"eval.ks={list(config.eval.ks)} has cutoff(s) {too_deep} above the {split.num_items} "
                          f"items of {split.dataset.name!r}; every cutoff must be at most the catalogue size")
    # So is the model (its options, their values): a bad one must not leave a config.json behind.
    with strategy.scope():
        try:
            model = build_model(config, split.dataset)
        except ConfigError:
            raise
        except ValueError as error:  # a layer's own check: "embedding_dim must be ..." said not where
            raise ConfigError(f"the model settings (model.*) are refused: {user_error_text(error, (ValueError,))}") \
                from error
        compile_for_training(model, config, target_counts(split))
    warm_start_unless_resuming(model, config, run_dir, split.dataset.item_vocab)
    if chief:
        write_json_atomic(run_dir / "data.json", fingerprint)
        write_json_atomic(run_dir / "config.json", config.to_dict())
        # A run killed mid-write left temporaries (and maybe its only copy of the best weights
        # under .best_weights.old); the resumed run must start from what was last complete.
        cleaned = remove_stale_temporaries(run_dir, RUN_OUTPUTS)
        if cleaned:
            logger.info("%s: cleaned up after an interrupted write: %s", run_dir, ", ".join(cleaned))
    output_dir.mkdir(parents=True, exist_ok=True)
    train_data = sequence_training_dataset(
        split.train_sequences,
        max_length=config.model.max_length,
        batch_size=config.train.batch_size,
        shuffle=True,
        seed=config.train.seed,
        user_rows=split.train_user_rows,
        user_features=split.dataset.user_features if config.data.side_info else None,
    )
    selection = fit_with_selection(model, config, train_data, lambda: evaluate(model, split, "validation", config),
                                   output_dir, run_dir / "backup", callbacks)
    save_model(model, output_dir / "model", split.dataset.item_vocab)
    validation = evaluate(model, split, "validation", config)
    test = evaluate(model, split, "test", config)
    history = selection
    metrics = {
        "dataset": split.dataset.name,
        "split": split.name,
        "model": config.model.name,
        "epochs": len(history["epochs"]),
        "best_epoch": history["best_epoch"],
        "train_seconds": round(history["train_seconds"], 1),
        "skipped_input_lines": split.dataset.skipped_lines,
        "validation": validation,
        "test": test,
    }
    if not chief:
        shutil.rmtree(output_dir, ignore_errors=True)
        return metrics
    plot_training_curves(history["epochs"], run_dir / "training_curves.png", config.train.monitor)
    write_json_atomic(run_dir / "metrics.json", metrics)
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    shutil.rmtree(run_dir / ".workers", ignore_errors=True)
    return metrics


def compile_for_training(model: tf.keras.Model, config: RunConfig, counts: np.ndarray) -> None:
    """Sets the logQ counts, compiles with Adam and creates every variable (call it inside the
    strategy's scope)."""
    if hasattr(model, "set_item_frequencies"):
        model.set_item_frequencies(counts)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.train.learning_rate))
    build_all_variables(model)  # BackupAndRestore can only restore into a built model


def fit_with_selection(
    model: tf.keras.Model,
    config: RunConfig,
    train_data: tf.data.Dataset,
    validate: Callable[[], dict],
    output_dir: pathlib.Path,
    backup_dir: pathlib.Path,
    callbacks: Sequence[tf.keras.callbacks.Callback] = (),
    steps_per_epoch: Optional[int] = None,
) -> dict:
    """``model.fit`` with validation-based selection, early stopping and resumption; leaves the
    best weights loaded and returns the selection state (epochs, best epoch, train seconds).

    Args:
      model: A compiled, built model.
      config: The run configuration (train.* settings).
      train_data: Training batches.
      validate: Returns the validation metrics of the current weights.
      output_dir: Where ``history.json`` and ``best_weights/`` go.
      backup_dir: Keras ``BackupAndRestore`` directory (kept until the caller removes it).
      callbacks: Extra Keras callbacks.
      steps_per_epoch: Batches per epoch (default: one pass over ``train_data``).
    """
    if config.train.strategy == "multi_worker":
        # Every worker builds the same dataset; each takes its share of every batch.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train_data = train_data.with_options(options)
    selection = ModelSelection(
        validate,
        output_dir,
        monitor=config.train.monitor,
        patience=config.train.early_stopping_patience,
        every=config.train.validation_every,
        max_seconds=config.train.max_train_seconds,
    )
    # ModelSelection comes first so its state is on disk before the backup of the same epoch.
    # The backup outlives fit() until the caller has its final metrics, so a crash in the final
    # evaluation still resumes instead of retraining.
    backup = tf.keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False)
    saved = json.loads(selection.state_path.read_text(encoding="utf-8")) if selection.state_path.exists() else {}
    if ModelSelection.finished(saved, config.train.max_train_seconds):
        logger.info("%s: training had already stopped (%s); not training further", output_dir, saved["stopped"])
        selection.state = {**saved, "best": -math.inf if saved["best"] is None else saved["best"]}
    else:
        model.fit(train_data, epochs=config.train.epochs, steps_per_epoch=steps_per_epoch,
                  callbacks=[selection, backup, *callbacks], verbose=config.train.verbose)
    if selection.state["best_epoch"] is not None:
        model.load_weights(str(output_dir / "best_weights" / "weights")).expect_partial()
    return selection.state


def warm_start_unless_resuming(model: tf.keras.Model, config: RunConfig, run_dir: str | pathlib.Path,
                               item_vocab: Optional[Vocabulary] = None) -> None:
    """Applies ``train.warm_start`` to a run that starts now. Call it before the run directory is
    claimed, so a bad source leaves nothing that refuses the corrected run. A run being resumed
    is left alone: its own backup (or its finished state) is where it continues from, and the
    source may be gone by then."""
    if config.train.warm_start is None:
        return
    run_dir = pathlib.Path(run_dir)
    history = run_dir / "history.json"
    if (run_dir / "backup").exists() or (history.exists() and ModelSelection.finished(
            json.loads(history.read_text(encoding="utf-8")), config.train.max_train_seconds)):
        logger.info("%s: resuming, so train.warm_start is not applied again", run_dir)
        return
    # Imported here: tfx_xmatch.warm_start builds its source model with this module's persistence.
    from tfx_xmatch.warm_start import warm_start

    warm_start(model, config.train.warm_start, config.train.learning_rate, item_vocab)


# What a run writes into its directory (all atomically, so only these can have temporaries).
RUN_OUTPUTS = ("config.json", "data.json", "history.json", "metrics.json", "training_curves.png", "model",
               "best_weights")
# Also written there: the Keras backup while training, the non-chief workers' copies, the
# benchmarks' per-user ranks beside a finished run, and the claim of the process writing it.
RUN_SCRATCH = ("backup", ".workers", "test_ranks", CLAIM_FILE)

# Settings that may change when a run is resumed: they do not change what is being trained.
RESUMABLE_KEYS = {"train.verbose", "train.max_train_seconds", "train.strategy"}
STRATEGIES = ("default", "mirrored", "multi_worker")


def replaces_run_file(path: str | pathlib.Path, run_dir: str | pathlib.Path) -> bool:
    """Whether writing ``path`` would replace the run directory ``run_dir`` or a file in it: one
    that exists, or one of those a run writes (``RUN_OUTPUTS``, ``RUN_SCRATCH``)."""
    path, root = pathlib.Path(path).resolve(), pathlib.Path(run_dir).resolve()
    return path == root or (path.is_relative_to(root) and (
        path.exists() or path.relative_to(root).parts[0] in RUN_OUTPUTS + RUN_SCRATCH))


# One strategy object per kind and cluster for the whole process. Every new MirroredStrategy
# numbers its collective instances from the same start, so a second model trained in the same
# process (a notebook, a sweep, the benchmarks) would meet the first model's gradient all-reduce
# at the same instance key and abort with "Shape mismatch in the collective instance 100"
# (tensorflow/tensorflow#62790). Reusing the strategy keeps the numbering going.
_STRATEGIES: dict[tuple[str, str], tf.distribute.Strategy] = {}


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy called ``name`` (see ``TrainConfig.strategy``).

    "mirrored" and "multi_worker" strategies are created once per process (per TF_CONFIG for
    "multi_worker") and reused by later calls, so several models can be trained one after the
    other in one process.

    Raises:
      ConfigError: unknown name, or "multi_worker" without a TF_CONFIG cluster.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi_worker" and "TF_CONFIG" not in os.environ:
        raise ConfigError("train.strategy=multi_worker needs the cluster in the TF_CONFIG environment variable, "
                          'e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", '
                          '"index": 0}}')
    key = (name, os.environ.get("TF_CONFIG", "") if name == "multi_worker" else "")
    if key not in _STRATEGIES:
        _STRATEGIES[key] = (tf.distribute.MirroredStrategy() if name == "mirrored"
                            else tf.distribute.MultiWorkerMirroredStrategy())
    return _STRATEGIES[key]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's outputs: the chief, or worker 0 of a chief-less cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def worker_name(strategy: tf.distribute.Strategy) -> str:
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type}_{resolver.task_id}"


def _changed_keys(old: RunConfig, new: RunConfig) -> set[str]:
    old_dict, new_dict = old.to_dict(), new.to_dict()
    return {f"{section}.{key}" for section in new_dict for key in new_dict[section]
            if old_dict[section].get(key) != new_dict[section][key]}


def target_counts(split: Split) -> np.ndarray:
    """How often each item index is a training target (every item after a sequence's first).

    This is the sampling distribution of in-batch candidates, i.e. the logQ of the sampled loss.
    """
    counts = np.zeros(split.num_items + 1, dtype=np.int64)
    for sequence in split.train_sequences:
        np.add.at(counts, sequence[1:], 1)
    return counts


def plot_training_curves(rows: list[dict], path: pathlib.Path, monitor: str) -> None:
    """Loss and the validation ``monitor`` against epochs, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["loss"] for row in rows], marker=".")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    validated = [row for row in rows if f"val_{monitor}" in row]
    for key in (f"val_{monitor}", "val_HR@10"):
        if validated and key in validated[0]:
            metric_axis.plot([r["epoch"] for r in validated], [r[key] for r in validated], marker=".", label=key[4:])
    metric_axis.set(xlabel="epoch", ylabel="validation", title="Validation (full ranking)")
    metric_axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
