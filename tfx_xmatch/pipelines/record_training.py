"""Training on prepared TFRecords: what the TFX Trainer's ``run_fn`` and ``xmatch pipeline run``
both do between ``prepare`` and the export.

The records are the ``prepare`` pipeline's (or ``write_split_tfrecords``'): training sequences
for ``fit`` and held-out (history, next item) examples for model selection with full ranking.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
from typing import Optional, Sequence, Union

import tensorflow as tf

from tfx_xmatch import training
from tfx_xmatch.config import ConfigError, RunConfig, check_values
from tfx_xmatch.data.tfrecord import matching_files, read_eval_examples, read_training_tfrecords
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.evaluation import evaluate_full_ranking
from tfx_xmatch.data.tfrecord import record_counts
from tfx_xmatch.io_utils import (
    absolute_unless_url, check_checkpoint_directory, claimed_directory, json_text, remove_stale_temporaries,
    write_json_atomic,
)

Files = Union[str, Sequence[str]]
logger = logging.getLogger(__name__)


def _inputs_of(train_files: Files, eval_files: Files, item_vocab: Vocabulary) -> dict:
    """What identifies a run's data: each record file's path and size, and the vocabulary."""
    def described(pattern) -> list:
        # Absolute: "d/*", "./d/*" and "/abs/d/*" name the same files.
        return [[absolute_unless_url(path), tf.io.gfile.stat(path).length]
                for path in matching_files(pattern)]

    ids = json.dumps(item_vocab.to_json()["ids"]).encode("utf-8")
    return {"train": described(train_files), "eval": described(eval_files), "num_items": item_vocab.num_items,
            "item_ids_sha256": hashlib.sha256(ids).hexdigest()}


def train_on_records(config: RunConfig, train_files: Files, eval_files: Files, item_vocab: Vocabulary,
                     run_dir: Union[str, pathlib.Path], *, train_steps: Optional[int] = None):
    """Trains ``config``'s model on TFRecords, selecting epochs on ``eval_files`` with full ranking.

    Writes the run to ``run_dir``: ``config.json``, ``history.json``, the best weights, the
    selected model under ``model/`` (loadable with ``training.load_model``) and ``metrics.json``
    (epochs, best epoch, training seconds, validation metrics).

    Args:
      config: The run configuration (its ``data`` section is not used: the records are the data).
      train_files: Glob(s) of training-sequence records (plain or ``.gz``).
      eval_files: Glob(s) of (history, next item) records for model selection.
      item_vocab: The vocabulary written beside the records.
      run_dir: The run directory (created if missing).
      train_steps: If set, the total number of training batches spread over ``train.epochs``
        epochs (the data repeats); otherwise one pass over the data per epoch.

    A run directory that holds this configuration's run on the same records resumes it; one
    whose run finished returns its model without training again (a retried TFX Trainer); one
    that holds a run with another configuration, or on other records (paths, sizes) or another
    vocabulary, is refused (``inputs.json`` records them).

    Returns:
      (the selected model, the metrics dict).

    Raises:
      ConfigError: If ``train.strategy`` is multi_worker (this trains in one process).
      ValueError: If ``run_dir`` holds a run with another configuration or on other records,
        ``train_steps`` is negative, or on bad records.
      FileNotFoundError: On files matching nothing.
      DirectoryBeingWritten: Another process is training in ``run_dir``.
    """
    if config.train.strategy == "multi_worker":
        raise ConfigError("training on records runs in one process; use train.strategy default or mirrored")
    check_values(config)
    if train_steps is not None:  # checked before config.json claims the run directory
        try:
            valid = int(train_steps) >= 0 and float(train_steps) == int(train_steps)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"train_steps must be an integer >= 0 or None, got {train_steps!r}")
    check_checkpoint_directory(run_dir, "run directory")
    inputs = _inputs_of(train_files, eval_files, item_vocab)
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Claimed before config.json is looked for: two trainings into one new directory both found
    # none and mixed their files (a retried Trainer whose first attempt still runs, say).
    with claimed_directory(run_dir, "run directory"):
        return _train_claimed(config, train_files, eval_files, item_vocab, run_dir, inputs, train_steps)


def _train_claimed(config: RunConfig, train_files: Files, eval_files: Files, item_vocab: Vocabulary,
                   run_dir: pathlib.Path, inputs: dict, train_steps: Optional[int]):
    """``train_on_records`` once this process holds the claim on ``run_dir``."""
    config_path = run_dir / "config.json"
    inputs_path = run_dir / "inputs.json"
    if config_path.exists() and inputs_path.exists() and json.loads(inputs_path.read_text(encoding="utf-8")) != inputs:
        # Resumed on other records, the run would keep the first data's best weights and export
        # them under the new data's history.
        raise ValueError(f"{run_dir} holds a run on other records or another vocabulary; use a new run directory")
    # An earlier run's history would be resumed (its best epoch, its time budget): only the
    # same configuration may continue in the same directory.
    # Compared as configs, so a run written before a key existed (it has its default) still resumes.
    if config_path.exists() and json.loads(json_text(training.load_run_config(run_dir).to_dict())) != json.loads(
            json_text(config.to_dict())):
        raise ValueError(f"{run_dir} holds a run with another configuration; use a new run directory")

    if (run_dir / "metrics.json").exists() and (run_dir / "model").is_dir():
        # A retried Trainer after the run finished: fit would run again on top of it.
        logger.warning("%s already holds a finished run; loading its model without training", run_dir)
        return training.load_model(run_dir / "model"), json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    tf.keras.utils.set_random_seed(config.train.seed)
    target_counts, popularity = record_counts(train_files, item_vocab.num_items)
    validation, _ = read_eval_examples(eval_files)
    strategy = training.make_strategy(config.train.strategy)
    with strategy.scope():
        model = training.build_model(config, num_items=item_vocab.num_items)
        training.compile_for_training(model, config, target_counts)
    training.warm_start_unless_resuming(model, config, run_dir, item_vocab)
    # Claimed only now: bad records or a model that cannot be built must not leave a
    # config.json that refuses the corrected run.
    write_json_atomic(config_path, config.to_dict())
    write_json_atomic(inputs_path, inputs)
    remove_stale_temporaries(run_dir, (*training.RUN_OUTPUTS, "inputs.json"))  # what a killed attempt left half-written
    train_data = read_training_tfrecords(train_files, max_length=config.model.max_length,
                                         batch_size=config.train.batch_size, seed=config.train.seed)
    steps_per_epoch = None
    if train_steps:
        # TFX's train_steps counts batches in all: fewer than train.epochs means fewer epochs
        # of one batch (5 steps over 20 epochs once trained 20 batches). A remainder that does
        # not divide into the epochs (fewer batches than epochs) is left out.
        epochs = min(config.train.epochs, int(train_steps))
        steps_per_epoch = int(train_steps) // epochs
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))
        train_data = train_data.repeat()

    def validate() -> dict:
        score = training.pass_scorer(model)
        return evaluate_full_ranking(
            lambda histories, rows: score({"history": histories}), validation, max_length=config.model.max_length,
            batch_size=config.eval.batch_size, ks=tuple(config.eval.ks), mask_history=config.eval.mask_history,
            item_popularity=popularity, num_items=item_vocab.num_items)

    state = training.fit_with_selection(model, config, train_data, validate, run_dir, run_dir / "backup",
                                        steps_per_epoch=steps_per_epoch)
    training.save_model(model, run_dir / "model", item_vocab)
    metrics = {"model": config.model.name, "epochs": len(state["epochs"]), "best_epoch": state["best_epoch"],
               "train_seconds": round(state["train_seconds"], 1), "validation": validate()}
    write_json_atomic(run_dir / "metrics.json", metrics)
    # The Keras backup only serves to resume an interrupted fit; the run is complete now.
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    return model, metrics
