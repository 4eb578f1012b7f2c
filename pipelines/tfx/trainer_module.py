"""TFX Trainer module: ``run_fn(fn_args)`` trains a tfx_xmatch model on TFRecords and writes a
serving SavedModel with its retrieval index baked in.

The TFX Trainer contract, as this module honours it:

  * ``fn_args.train_files`` / ``fn_args.eval_files``: globs (a list) of tf.Example TFRecords as
    written by ``tfx_xmatch.data.write_split_tfrecords`` / the ``prepare`` pipeline (plain, or
    GZIP ``.gz`` as ExampleGen writes them). Train records are training sequences, eval records
    are (history, next item) examples used for model selection with full ranking.
  * ``fn_args.custom_config``: ``{"config": <RunConfig YAML/JSON path or dict>,
    "overrides": ["train.epochs=5", ...], "item_vocab": <item_vocab.json path>,
    "export": {"index_kind": "brute_force", "index_options": {}, "k_max": 100}}``; only
    ``item_vocab`` is required.
  * ``fn_args.train_steps``: if set, the total number of training batches, spread evenly over
    ``train.epochs`` epochs (the data repeats); otherwise one pass over the data per epoch.
    ``eval_steps`` is not used: validation always ranks every eval example against every item.
  * ``fn_args.model_run_dir``: the run (history.json, best weights, the selected model,
    metrics.json); ``fn_args.serving_model_dir``: the SavedModel, written atomically.

Errors propagate: a TFX component that swallows them reports success with no model.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from tfx_xmatch import training
from tfx_xmatch.config import ConfigError, RunConfig, apply_overrides, config_from_dict, load_config
from tfx_xmatch.data.tfrecord import read_eval_examples, read_training_tfrecords
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.evaluation import evaluate_full_ranking
from tfx_xmatch.export import build_serving_module, save_serving_module
from tfx_xmatch.io_utils import write_json_atomic

CUSTOM_CONFIG_KEYS = ("config", "overrides", "item_vocab", "export")


def run_config_from(custom_config: Mapping[str, Any]) -> RunConfig:
    """The RunConfig named by ``custom_config["config"]`` (path or dict) with its ``overrides``.

    Raises:
      ConfigError: unknown custom_config keys, or a bad config.
    """
    unknown = sorted(set(custom_config) - set(CUSTOM_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"custom_config has unknown keys {unknown}; expected some of {list(CUSTOM_CONFIG_KEYS)}")
    source = custom_config.get("config")
    overrides = list(custom_config.get("overrides", []))
    if isinstance(source, Mapping):
        return apply_overrides(config_from_dict(dict(source), "custom_config['config']"), overrides)
    return load_config(source, overrides)


def record_counts(train_files, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(target counts for the logQ correction, interaction counts for tail metrics) per item
    index, from training-sequence records."""
    targets = np.zeros(num_items + 1, np.int64)
    interactions = np.zeros(num_items + 1, np.int64)
    examples, _ = read_eval_examples(train_files)
    for history, target in zip(examples.histories, examples.targets):
        sequence = np.append(history, target)
        np.add.at(targets, sequence[1:], 1)
        np.add.at(interactions, sequence, 1)
    interactions[0] = targets[0] = 0
    return targets, interactions


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
    config = run_config_from(custom_config)
    if config.train.strategy == "multi_worker":
        raise ConfigError("run_fn trains in one process; use train.strategy default or mirrored")
    vocab = Vocabulary.load(custom_config["item_vocab"])
    run_dir = pathlib.Path(fn_args.model_run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", config.to_dict())

    tf.keras.utils.set_random_seed(config.train.seed)
    target_counts, popularity = record_counts(fn_args.train_files, vocab.num_items)
    validation, _ = read_eval_examples(fn_args.eval_files)
    strategy = training.make_strategy(config.train.strategy)
    with strategy.scope():
        model = training.build_model(config, num_items=vocab.num_items)
        training.compile_for_training(model, config, target_counts)
    train_data = read_training_tfrecords(fn_args.train_files, max_length=config.model.max_length,
                                         batch_size=config.train.batch_size, seed=config.train.seed)
    steps_per_epoch = None
    train_steps = getattr(fn_args, "train_steps", None)
    if train_steps:
        steps_per_epoch = max(1, int(train_steps) // config.train.epochs)
        train_data = train_data.repeat()

    score_all = tf.function(model.score_all, reduce_retracing=True)

    def validate() -> dict:
        return evaluate_full_ranking(
            lambda histories, rows: score_all({"history": histories}), validation, max_length=config.model.max_length,
            batch_size=config.eval.batch_size, ks=tuple(config.eval.ks), mask_history=config.eval.mask_history,
            item_popularity=popularity, num_items=vocab.num_items)

    state = training.fit_with_selection(model, config, train_data, validate, run_dir, run_dir / "backup",
                                        steps_per_epoch=steps_per_epoch)
    training.save_model(model, run_dir / "model", vocab)
    metrics = {"model": config.model.name, "epochs": len(state["epochs"]), "best_epoch": state["best_epoch"],
               "train_seconds": round(state["train_seconds"], 1), "validation": validate()}
    write_json_atomic(run_dir / "metrics.json", metrics)

    export = dict(custom_config.get("export", {}))
    module = build_serving_module(model, vocab, index_kind=export.get("index_kind", "brute_force"),
                                  index_options=export.get("index_options"), k_max=int(export.get("k_max", 100)))
    save_serving_module(module, fn_args.serving_model_dir, vocab)


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
