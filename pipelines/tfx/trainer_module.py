"""TFX Trainer module: ``run_fn(fn_args)`` trains a tfx_xmatch model on TFRecords and writes a
serving SavedModel with its retrieval index baked in.

The TFX Trainer contract, as this module honours it:

  * ``fn_args.train_files`` / ``fn_args.eval_files``: globs (a list) of tf.Example TFRecords as
    written by ``tfx_xmatch.data.write_split_tfrecords`` / the ``prepare`` pipeline (plain, or
    GZIP ``.gz`` as ExampleGen writes them). Train records are training sequences, eval records
    are (history, next item) examples used for model selection with full ranking.
  * ``fn_args.custom_config``: ``{"config": <RunConfig YAML/JSON path or dict>,
    "overrides": ["train.epochs=5", ...], "item_vocab": <item_vocab.json path>,
    "export": {"index_kind": "brute_force", "index_options": {}, "k_max": 100, "padding_id": None}}``;
    only ``item_vocab`` is required (``padding_id``: the id that pads request histories, default 0
    or "", needed when 0 is a real item id).
    Types are checked before training (a string of overrides was read character by
    character); a ``k_max`` below the k of ``train.monitor`` (the depth the model is selected
    at) is warned about. ``train_files`` may also name ExampleGen's split directories.
  * ``fn_args.hyperparameters`` (a TFX Tuner's best values): applied as overrides, each named by
    its config key (``train.learning_rate``); another name is refused, not ignored (Hyperband's
    ``tuner/...`` bookkeeping is skipped).
  * ``fn_args.transform_output`` / ``schema_file``: not applied (a warning says so): the records
    are read as the prepare pipeline wrote them.
  * ``fn_args.train_steps``: if set, the total number of training batches, spread evenly over
    ``train.epochs`` epochs (the data repeats); otherwise one pass over the data per epoch.
    ``eval_steps`` is not used: validation always ranks every eval example against every item.
  * ``fn_args.model_run_dir``: the run (history.json, best weights, the selected model,
    metrics.json); ``fn_args.serving_model_dir``: the SavedModel, written atomically.
  * ``fn_args.base_model`` (the Trainer's ``base_model`` input, e.g. the latest trained model
    from a ``Resolver``): the serving SavedModel whose weights this run starts from, applied as
    ``train.warm_start`` (the optimizer starts fresh: a serving model holds none). Items are
    matched by id, so a catalogue that changed since (new items, removed ones, another order)
    is fine: known items start from their learnt vectors, new ones from their initialization;
    a model that shares no item id with this run is refused.
    A retried Trainer resumes its local ``model_run_dir`` rather than starting over (a finished
    run is exported again without training; a run directory of other records is refused);
    with a ``gs://`` run directory it trains in a fresh local directory, so it starts from
    ``base_model`` again. Setting ``train.warm_start`` as well is refused unless both name the
    same model.

Errors propagate: a TFX component that swallows them reports success with no model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from typing import Any, Mapping, Optional

from tfx_xmatch.config import ConfigError, RunConfig, apply_overrides, check_values, config_from_dict, load_config
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.export import build_serving_module, check_export_settings, resolve_padding_id, save_serving_module
from tfx_xmatch.io_utils import copy_directory
from tfx_xmatch.pipelines.record_training import train_on_records

CUSTOM_CONFIG_KEYS = ("config", "overrides", "item_vocab", "export")
logger = logging.getLogger(__name__)


def run_config_from(custom_config: Mapping[str, Any]) -> RunConfig:
    """The RunConfig named by ``custom_config["config"]`` (path or dict) with its ``overrides``.

    Raises:
      ConfigError: unknown custom_config keys, or a bad config.
    """
    unknown = sorted(set(custom_config) - set(CUSTOM_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"custom_config has unknown keys {unknown}; expected some of {list(CUSTOM_CONFIG_KEYS)}")
    source = custom_config.get("config")
    overrides = custom_config.get("overrides", [])
    # A string was read character by character ("override 't' must look like ..."), None failed
    # with "'NoneType' object is not iterable".
    if isinstance(overrides, (str, bytes, Mapping)) or not isinstance(overrides, (list, tuple)) or not all(
            isinstance(override, str) for override in overrides):
        raise ConfigError(f"custom_config['overrides'] must be a list of 'section.key=value' strings, got "
                          f"{overrides!r}")
    if source is not None and not isinstance(source, (str, os.PathLike, Mapping)):
        raise ConfigError(f"custom_config['config'] must be a RunConfig file path or a dict, got {source!r}")
    overrides = list(overrides)
    if isinstance(source, Mapping):
        return apply_overrides(config_from_dict(dict(source), "custom_config['config']"), overrides)
    return load_config(source, overrides)


def with_hyperparameters(config: RunConfig, hyperparameters: Any) -> RunConfig:
    """``config`` with the values a TFX Tuner hands the Trainer (``fn_args.hyperparameters``: a
    KerasTuner ``HyperParameters``, or its ``get_config()`` dict), each named by its config key
    (``train.learning_rate``, ``model.embedding_dim``).

    Raises:
      ConfigError: A name that is not a ``section.key`` of the config (it was ignored).
    """
    if not hyperparameters:
        return config
    if isinstance(hyperparameters, Mapping):  # get_config()'s {"space": ..., "values": ...}, or the values
        values = hyperparameters.get("values", hyperparameters)
    else:  # KerasTuner HyperParameters
        values = getattr(hyperparameters, "values", None)
    if not isinstance(values, Mapping):
        raise ConfigError(f"fn_args.hyperparameters must be KerasTuner HyperParameters or a dict of values, "
                          f"got {hyperparameters!r}")
    # Hyperband's own bookkeeping (tuner/epochs, tuner/bracket, ...) is no model setting.
    values = {name: value for name, value in values.items() if not str(name).startswith("tuner/")}
    plain = sorted(name for name in values if "." not in str(name))
    if plain:
        raise ConfigError(f"hyperparameter(s) {plain} must be named by their config key, e.g. train.learning_rate "
                          "or model.embedding_dim, to be applied")
    return apply_overrides(config, [f"{name}={json.dumps(value)}" for name, value in values.items()])


def with_base_model(config: RunConfig, base_model: Optional[str]) -> RunConfig:
    """``config`` warm-started from TFX's ``base_model`` (a serving SavedModel directory), if any.

    Raises:
      ConfigError: ``train.warm_start`` names another model than ``base_model``.
    """
    if not base_model:
        return config
    warm_start = config.train.warm_start
    if warm_start is not None and warm_start.rstrip("/") != str(base_model).rstrip("/"):
        raise ConfigError(f"train.warm_start={warm_start!r} and the Trainer's base_model={str(base_model)!r} "
                          "both name a model to start from; set one of them")
    return dataclasses.replace(config, train=dataclasses.replace(config.train, warm_start=str(base_model)))


def run_fn(fn_args) -> None:
    """Trains, selects on the eval files, and writes the serving SavedModel (TFX Trainer entry point).

    Raises:
      KeyError: ``custom_config`` has no ``item_vocab``.
      ConfigError, ValueError, FileNotFoundError: bad configuration or inputs (never swallowed).
    """
    custom_config = dict(getattr(fn_args, "custom_config", None) or {})
    if "item_vocab" not in custom_config:
        raise KeyError("custom_config['item_vocab'] is required: the item_vocab.json written beside the "
                       "TFRecords by the prepare pipeline (it maps raw item ids to the records' indices)")
    if not isinstance(custom_config["item_vocab"], (str, os.PathLike)):
        raise ConfigError(f"custom_config['item_vocab'] must be the path of item_vocab.json, got "
                          f"{custom_config['item_vocab']!r}")
    export = custom_config.get("export", {})
    if not isinstance(export, Mapping) or not isinstance(export.get("index_options") or {}, Mapping):
        raise ConfigError(f"custom_config['export'] must be a dict (its index_options a dict too), got {export!r}")
    export = dict(export)
    unknown = sorted(set(export) - {"index_kind", "index_options", "k_max", "padding_id"})
    if unknown:  # checked before training, not after it
        raise ValueError(f"unknown custom_config['export'] key(s) {unknown}; known: index_kind, index_options, k_max, "
                         "padding_id")
    config = with_hyperparameters(run_config_from(custom_config), getattr(fn_args, "hyperparameters", None))
    config = with_base_model(config, getattr(fn_args, "base_model", None))
    for name in ("transform_output", "transform_graph_path", "schema_file", "schema_path"):
        if getattr(fn_args, name, None):
            logger.warning("fn_args.%s is not applied: this module reads the prepare pipeline's records as they "
                           "are (no Transform graph, no schema)", name)
    index_kind, index_options = export.get("index_kind", "brute_force"), export.get("index_options")
    k_max = export.get("k_max", 100)
    check_export_settings(config.model.name, index_kind, index_options, k_max)  # before training, not after
    check_values(config)  # a config given as a dict is checked here, before anything trains
    monitored_k = int(config.train.monitor.rsplit("@", 1)[1])
    if monitored_k > k_max:
        # Legitimate (selection ranks in process), but a request for that depth will be refused.
        logger.warning("custom_config['export']['k_max']=%d is below the k of train.monitor=%r: the export cannot "
                       "answer the depth the model is selected at", k_max, config.train.monitor)
    vocab = Vocabulary.load(custom_config["item_vocab"])
    padding_id = resolve_padding_id(vocab, export.get("padding_id"))  # before training, not after
    run_dir = str(fn_args.model_run_dir)
    # On Kubeflow/Vertex the run directory is a gs:// URL, which the run's local file writes
    # cannot reach: train in a local directory and copy the run there at the end.
    with (tempfile.TemporaryDirectory() if "://" in run_dir else contextlib.nullcontext(run_dir)) as local_run_dir:
        try:
            model, _ = train_on_records(config, fn_args.train_files, fn_args.eval_files, vocab, local_run_dir,
                                        train_steps=getattr(fn_args, "train_steps", None))
        except ConfigError as error:
            base_model = getattr(fn_args, "base_model", None)
            if base_model and str(error).startswith("train.warm_start="):
                raise ConfigError(f"the Trainer's base_model (the model it warm-starts from; in this pipeline "
                                  f"configs.WARM_START_FROM_LATEST_MODEL) cannot be used: {error}") from error
            raise
        if local_run_dir != run_dir:
            copy_directory(local_run_dir, run_dir)
    module = build_serving_module(model, vocab, index_kind=index_kind, index_options=index_options, k_max=k_max,
                                  padding_id=padding_id)
    # overwrite: a retried Trainer (Kubeflow / Vertex retry the task) writes to the same place.
    save_serving_module(module, fn_args.serving_model_dir, vocab, overwrite=True)


@dataclasses.dataclass
class FnArgs:
    """The fields of ``tfx.components.FnArgs`` that ``run_fn`` reads, for running it without TFX."""

    train_files: list
    eval_files: list
    serving_model_dir: str
    model_run_dir: str
    custom_config: dict = dataclasses.field(default_factory=dict)
    train_steps: int | None = None
    eval_steps: int | None = None
    base_model: str | None = None
    hyperparameters: Any = None
