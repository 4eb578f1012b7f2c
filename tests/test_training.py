"""Training runs on tiny synthetic data: artifacts, model selection, early stopping, resume."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch import io_utils, training
from tfx_xmatch.config import ConfigError, load_config
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.export import build_serving_module, export_retrieval_model, save_serving_module
from tfx_xmatch.models import MODELS
from tfx_xmatch.warm_start import warm_start

TINY = (
    "data.dataset=synthetic",
    "data.synthetic={num_users: 150, num_items: 40, min_length: 8, max_length: 20, num_clusters: 4, noise: 0.1}",
    "model.embedding_dim=16",
    "model.max_length=12",
    "model.num_blocks=1",  # what the tests check does not need a second block, and tracing it costs
    "model.dropout=0.0",
    "train.batch_size=32",
    "train.learning_rate=0.01",
    "train.verbose=0",
    "eval.ks=[1, 10]",
)


def tiny_config(*overrides):
    return load_config(None, [*TINY, *overrides])


def model_state(model):
    """The model's variables but its metrics' (which every epoch resets): what a resumed run must
    start from."""
    metric_variables = {id(variable) for metric in model.metrics for variable in metric.variables}
    return [variable.numpy().copy() for variable in model.weights if id(variable) not in metric_variables]


class Interrupt(tf.keras.callbacks.Callback):
    """Simulates a crash (e.g. a preempted machine) at the end of a given epoch."""

    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch
        self.weights = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.at_epoch:
            self.weights = model_state(self.model)
            raise RuntimeError("simulated interruption")


class EpochRecorder(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []
        self.first_weights = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch + 1)
        if self.first_weights is None:
            self.first_weights = model_state(self.model)


def test_train_writes_every_artifact_and_learns(tmp_path):
    metrics = training.train(tiny_config("train.epochs=6", "train.early_stopping_patience=0"), tmp_path)
    for name in ("config.json", "history.json", "metrics.json", "training_curves.png", "model/config.json"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert metrics["epochs"] == 6 and 1 <= metrics["best_epoch"] <= 6
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in history["epochs"]] == list(range(1, 7))
    assert history["epochs"][-1]["loss"] < history["epochs"][0]["loss"]
    # Every training log of the epoch is kept, not only the loss.
    assert {"regularization_loss", "total_loss"} <= set(history["epochs"][0])
    # The planted successor structure is learnable: far above chance (10 / 40 items).
    assert metrics["test"]["HR@10"] > 0.5
    # The kept model is the best validation epoch, reloadable, and scores the same.
    best = max(r["val_NDCG@10"] for r in history["epochs"])
    assert history["epochs"][metrics["best_epoch"] - 1]["val_NDCG@10"] == best
    split = training.prepare_split(tiny_config())
    reloaded = training.load_model(tmp_path / "model")
    assert training.evaluate(reloaded, split, "test", tiny_config()) == metrics["test"]
    # The run directory given for its model/ was "TypeError: unhashable type: 'dict'".
    with pytest.raises(ValueError, match=r"config.json is not a saved model's config: its 'model' is \{'name'.*"
                                         r"not one of .*the model is in .*model"):
        training.load_model(tmp_path)


def test_early_stopping_on_validation(tmp_path):
    # With a zero learning rate validation never improves after the first epoch.
    metrics = training.train(
        tiny_config("train.epochs=10", "train.early_stopping_patience=2", "train.learning_rate=0.0"), tmp_path
    )
    assert metrics["epochs"] == 3 and metrics["best_epoch"] == 1


class Poison(tf.keras.callbacks.Callback):
    """Makes the weights NaN from the start of an epoch: a run that diverged there."""

    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 == self.at_epoch:
            self.model.trainable_weights[0].assign(tf.fill(self.model.trainable_weights[0].shape, np.nan))


def test_a_run_that_diverges_stops_and_keeps_its_best_epoch(tmp_path, caplog):
    """A diverged run's validation failed with "scores contain NaN (row 0, item 1); cannot rank
    it", a usage error: no model, no metrics, and every resume diverged the same way."""
    config = tiny_config("train.epochs=6", "train.early_stopping_patience=0")
    with caplog.at_level("WARNING", logger="tfx_xmatch.training"):
        metrics = training.train(config, tmp_path / "run", callbacks=[Poison(at_epoch=3)])
    assert metrics["epochs"] == 3 and metrics["best_epoch"] in (1, 2)
    assert np.isfinite(metrics["test"]["HR@10"])
    assert re.search(r"training diverged at epoch 3 \(loss nan, weights not finite\): stopping; the model kept is "
                     r"epoch [12]'s", caplog.text)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["stopped"] == "diverged" and [row["epoch"] for row in history["epochs"]] == [1, 2, 3]
    assert "train_seconds" in history["epochs"][-1]  # what the benchmark suite reads of every epoch
    # Resumed after its final evaluation was lost, it does not train into the same divergence again.
    (tmp_path / "run" / "metrics.json").unlink()
    shutil.rmtree(tmp_path / "run" / "model")
    with caplog.at_level("INFO", logger="tfx_xmatch.training"):
        assert training.train(config, tmp_path / "run")["epochs"] == 3
    assert "training had already stopped (diverged)" in caplog.text
    # Diverged before any epoch was validated: nothing to keep, said so.
    with pytest.raises(training.TrainingDiverged, match="training diverged at epoch 1 .* before any epoch was "
                                                        "validated: lower train.learning_rate, in a new run directory"):
        training.train(config, tmp_path / "first", callbacks=[Poison(at_epoch=1)])


def test_a_monitor_that_validation_cannot_measure_is_refused(tmp_path):
    """A NaN monitor (TailRecall on a validation set without tail targets) never beats the best:
    no epoch was selected, patience never ran out, and the last weights were kept unsaid."""
    model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
    model.build((None, 2))
    selection = training.ModelSelection(lambda: {"TailRecall@10": float("nan")}, tmp_path, "TailRecall@10",
                                        patience=1, every=1, max_seconds=None)
    selection.set_model(model)
    selection.set_params({"epochs": 3})
    selection.on_train_begin()
    selection.on_epoch_begin(0)
    with pytest.raises(ValueError, match="val TailRecall@10 is NaN at epoch 1: no validation example counts for "
                                         "it .*choose another train.monitor, in a new run directory"):
        selection.on_epoch_end(0, {"loss": 1.0})


def test_time_budget_stops_training(tmp_path):
    metrics = training.train(tiny_config("train.epochs=10", "train.max_train_seconds=0.001"), tmp_path)
    assert metrics["epochs"] == 1


@pytest.mark.parametrize("override, message", [
    ("data.synthetic={num_users: -5}", "data.synthetic: num_users must be at least 1, got -5"),
    ("data.synthetic={min_length: 9, max_length: 5}", "data.synthetic: max_length must be at least min_length"),
    ("data.split=foo", "data.split='foo' with data.split_options={}: unknown split 'foo'"),
])
def test_data_settings_errors_name_their_section(override, message):
    """They said "num_users must be at least 1, got -5" and "max_length must be at least
    min_length", easily read as model.max_length."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        training.prepare_split(tiny_config(override))


def test_the_last_epoch_is_validated_whatever_validation_every_says(tmp_path):
    """validation_every above the epochs trained (planned, or cut by the time budget) validated no
    epoch: no best_weights, and the run kept its unselected final weights."""
    metrics = training.train(tiny_config("train.epochs=2", "train.validation_every=5"), tmp_path / "planned")
    history = json.loads((tmp_path / "planned" / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"] if "val_NDCG@10" in r] == [2]
    assert metrics["best_epoch"] == 2 and (tmp_path / "planned" / "best_weights").is_dir()
    metrics = training.train(tiny_config("train.epochs=10", "train.validation_every=5", "train.max_train_seconds=0.001"),
                             tmp_path / "budget")
    assert metrics["epochs"] == 1 and metrics["best_epoch"] == 1


def test_resume_after_interruption_continues_from_the_last_epoch(tmp_path):
    config = tiny_config("train.epochs=4", "train.early_stopping_patience=0")
    interrupt = Interrupt(at_epoch=2)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        training.train(config, tmp_path, callbacks=[interrupt])
    assert not (tmp_path / "metrics.json").exists()
    # What a kill mid-write leaves: temporaries, and the best weights moved aside but not yet
    # replaced (atomic_directory's two renames).
    (tmp_path / ".best_weights.0123abcd.tmp").mkdir()
    (tmp_path / ".history.json.x1y2.tmp").write_text("{")
    os.replace(tmp_path / "best_weights", tmp_path / ".best_weights.old")
    recorder = EpochRecorder()
    metrics = training.train(config, tmp_path, callbacks=[recorder])
    assert sorted(path.name for path in tmp_path.glob(".*")) == []  # cleaned up, none left behind
    assert (tmp_path / "best_weights").is_dir()
    assert recorder.epochs == [3, 4]
    # Training continues from the weights the interrupted run had reached, not from scratch.
    for resumed, reached in zip(recorder.first_weights, interrupt.weights):
        np.testing.assert_array_equal(resumed, reached)
    assert not (tmp_path / "backup").exists()
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3, 4]
    assert metrics["epochs"] == 4


def test_a_run_is_not_resumed_on_other_data(tmp_path):
    """A data file changed between an interruption and the re-run (one item renumbered, or users
    dropped) resumed silently: the backed-up item rows went to other items."""
    config = tiny_config("train.epochs=3", "train.early_stopping_patience=0")
    with pytest.raises(RuntimeError, match="simulated interruption"):
        training.train(config, tmp_path, callbacks=[Interrupt(at_epoch=1)])
    fingerprint = json.loads((tmp_path / "data.json").read_text())
    assert fingerprint == training.data_fingerprint(training.prepare_split(config))
    changed = training.prepare_split(tiny_config("data.synthetic={num_users: 140, num_items: 40, min_length: 8, "
                                                 "max_length: 20, num_clusters: 4, noise: 0.1}"))
    with pytest.raises(ValueError, match=r"was started on other data than it is given now \(users 150 -> 140, "
                                         r"train_sha256, validation_sha256, test_sha256 differ\)"):
        training.train(config, tmp_path, split=changed)
    assert training.train(config, tmp_path)["epochs"] == 3  # the same data resumes


def test_a_finished_run_is_not_retrained(tmp_path):
    first = training.train(tiny_config("train.epochs=2"), tmp_path)
    recorder = EpochRecorder()
    again = training.train(tiny_config("train.epochs=2", "train.verbose=1"), tmp_path, callbacks=[recorder])
    assert again == json.loads(json.dumps(first)) and recorder.epochs == []


def test_warm_start_continues_a_finished_run_with_its_adam_state_at_the_new_learning_rate(tmp_path):
    training.train(tiny_config("train.epochs=2"), tmp_path / "first")
    source = training.load_model(tmp_path / "first" / "model")
    config = tiny_config("train.epochs=1", f"train.warm_start={tmp_path / 'first'}", "train.learning_rate=0.003")
    split = training.prepare_split(config)
    model = training.build_model(config, split.dataset)
    training.compile_for_training(model, config, training.target_counts(split))
    assert warm_start(model, tmp_path / "first", 0.003) == f"{tmp_path}/first/model"
    for started, finished in zip(model_state(model), model_state(source)):
        np.testing.assert_array_equal(started, finished)
    checkpoint = tf.train.load_checkpoint(str(tmp_path / "first" / "model" / "weights"))
    assert model.optimizer.iterations.numpy() == checkpoint.get_tensor(
        "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") > 0
    assert model.optimizer.learning_rate.numpy() == pytest.approx(0.003)
    # Adam's moments are restored when the optimizer creates them at the first step.
    model.optimizer.build(model.trainable_variables)
    moments = [name for name in checkpoint.get_variable_to_shape_map() if name.startswith("optimizer/_variables/")]
    assert moments
    for name in moments:
        index = int(name.split("/")[2])
        np.testing.assert_array_equal(model.optimizer.variables[index].numpy(), checkpoint.get_tensor(name))
    # Through train(): the first epoch starts from the source's selected weights.
    recorder = EpochRecorder()
    metrics = training.train(config, tmp_path / "second", callbacks=[recorder])
    assert recorder.epochs == [1] and metrics["epochs"] == 1
    for started, finished in zip(recorder.first_weights, model_state(source)):
        np.testing.assert_array_equal(started, finished)


def test_warm_start_refuses_what_does_not_fit_and_names_it(tmp_path):
    # Two blocks, so that a model with fewer and one with more both differ from the source.
    training.train(tiny_config("train.epochs=1", "model.num_blocks=2"), tmp_path / "first")
    split = training.prepare_split(tiny_config())

    def start(source, *overrides):
        config = tiny_config("model.num_blocks=2", *overrides)
        model = training.build_model(config, split.dataset)
        training.compile_for_training(model, config, training.target_counts(split))
        return model, warm_start(model, source, 0.01)

    with pytest.raises(ConfigError, match=r"train.warm_start='.*nowhere' is neither a finished run directory"):
        start(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"does not fit this model .*first: encoder\..*\.bias has shape \(1, 16\), "
                                          r"this model \(1, 8\)"):
        start(tmp_path / "first", "model.embedding_dim=8")
    # Neither direction of a layer mismatch passes silently.
    with pytest.raises(ConfigError, match=r"does not fit this model .*first: encoder\.blocks\.1\..* is not in this model"):
        start(tmp_path / "first", "model.num_blocks=1")
    with pytest.raises(ConfigError, match=r"does not fit this model .*first: encoder\.blocks\.2\..* is missing"):
        start(tmp_path / "first", "model.num_blocks=3")
    relabelled = tmp_path / "relabelled"
    shutil.copytree(tmp_path / "first" / "model", relabelled)
    saved = json.loads((relabelled / "config.json").read_text())
    (relabelled / "config.json").write_text(json.dumps({**saved, "model": "sparc"}))
    with pytest.raises(ConfigError, match=r"holds a 'sparc' model; this run trains a 'two_tower' model"):
        start(relabelled)
    (relabelled / "config.json").write_text(json.dumps(saved))
    next(relabelled.glob("weights.data-*")).unlink()
    with pytest.raises(ConfigError, match=r"relabelled': cannot read .*weights"):
        start(relabelled)
    # A model saved without an optimizer (never compiled) starts Adam afresh.
    bare = tmp_path / "bare"
    training.save_model(training.load_model(tmp_path / "first" / "model"), bare)
    model, _ = start(bare)
    assert model.optimizer.iterations.numpy() == 0
    for started, saved_weights in zip(model_state(model), model_state(training.load_model(bare))):
        np.testing.assert_array_equal(started, saved_weights)


SERVED_KINDS = {
    "two_tower": ("model.name=two_tower",),
    "sparcode": ("model.name=sparcode", "model.options={tokenizer: chunks, num_query_tokens: 4, num_codebooks: 4, "
                 "num_codewords: 8, interaction_units: [8]}"),
    "sparc": ("model.name=sparc",),
    "t2diff": ("model.name=t2diff", "model.user_tower=mixed_attention",
               "model.options={session_length: 4, history_length: 8, diffusion_steps: 10}"),
}


@pytest.mark.parametrize("kind", sorted(SERVED_KINDS))
def test_warm_start_from_a_serving_savedmodel_takes_every_weight_and_a_fresh_optimizer(kind, tmp_path):
    # TFX hands the Trainer the last pushed *serving* SavedModel as base_model.
    config = tiny_config(*SERVED_KINDS[kind])
    split = training.prepare_split(config)

    def compiled(seed):
        tf.keras.utils.set_random_seed(seed)
        model = training.build_model(config, split.dataset)
        training.compile_for_training(model, config, training.target_counts(split))
        return model

    source = compiled(1)
    source.optimizer.iterations.assign(5)  # a serving model carries no optimizer state
    source.set_item_frequencies(np.arange(split.num_items + 1))  # trained on other data
    save_serving_module(build_serving_module(source, split.dataset.item_vocab, k_max=5), tmp_path / "serving",
                        split.dataset.item_vocab)
    model = compiled(2)
    frequencies = model.item_frequency.numpy()

    def learnt(of):  # the model's variables but the logQ frequencies, which describe the run's own data
        return {path: variable.numpy() for path, variable in of.get_weight_paths().items()
                if variable is not of.item_frequency and not path.startswith("optimizer.")}

    assert any(not np.array_equal(value, learnt(source)[path]) for path, value in learnt(model).items())
    assert warm_start(model, tmp_path / "serving", 0.004, split.dataset.item_vocab) == str(tmp_path / "serving")
    exported = learnt(source)
    for path, value in learnt(model).items():
        np.testing.assert_array_equal(value, exported[path], err_msg=path)
    np.testing.assert_array_equal(model.item_frequency.numpy(), frequencies)
    assert model.optimizer.iterations.numpy() == 0
    assert model.optimizer.learning_rate.numpy() == pytest.approx(0.004)


def test_warm_start_from_a_serving_savedmodel_refuses_what_it_cannot_use(tmp_path):
    config = tiny_config()
    split = training.prepare_split(config)
    model = training.build_model(config, split.dataset)
    training.compile_for_training(model, config, training.target_counts(split))
    save_serving_module(build_serving_module(model, split.dataset.item_vocab, k_max=5), tmp_path / "serving",
                        split.dataset.item_vocab)
    wider = training.build_model(tiny_config("model.embedding_dim=8"), split.dataset)
    training.compile_for_training(wider, config, training.target_counts(split))
    with pytest.raises(ConfigError, match=r"serving' does not fit this model .* has shape \(.*16\), this model \(.*8\)"):
        warm_start(wider, tmp_path / "serving", 0.01)
    # A variable the description promises but the SavedModel lacks is an error, not a random start.
    description = json.loads((tmp_path / "serving" / training.SERVING_MODEL_DESCRIPTION).read_text())
    description["config"]["item_hidden_units"] = [16]
    (tmp_path / "serving" / training.SERVING_MODEL_DESCRIPTION).write_text(json.dumps(description))
    deeper = training.build_model(tiny_config("model.item_hidden_units=[16]"), split.dataset)
    training.compile_for_training(deeper, config, training.target_counts(split))
    with pytest.raises(ConfigError, match=r"serving': cannot read .*variables/variables: 4 of its model's weights are "
                                         r"not in it, first: item_tower.mlp.0.kernel"):
        warm_start(deeper, tmp_path / "serving", 0.01)
    (tmp_path / "serving" / training.SERVING_MODEL_DESCRIPTION).write_text("{not json")
    with pytest.raises(ConfigError, match=r"serving'.*xmatch_model.json is not JSON"):
        warm_start(model, tmp_path / "serving", 0.01)
    (tmp_path / "serving" / training.SERVING_MODEL_DESCRIPTION).unlink()
    with pytest.raises(ConfigError, match=r"serving' is a SavedModel without assets.extra/xmatch_model.json"):
        warm_start(model, tmp_path / "serving", 0.01)
    # An export base path rather than one of its versions.
    export_retrieval_model(model, split.dataset.item_vocab, str(tmp_path / "models"), k_max=5)
    with pytest.raises(ConfigError, match=r"models' is neither .* \(it holds versions \[1\]: give one, e\.g\. .*models/1\)"):
        warm_start(model, tmp_path / "models", 0.01)


def _changed_catalogue(kind, tmp_path):
    """A run's model, and a source trained on another catalogue saved as a serving SavedModel
    ("serving") and as a compiled saved model ("saved"): it knew the first 30 of the run's items
    in reverse order, and 5 items the run no longer has. With item features (a table per item
    that is data, not learnt). Returns (model, source, source ids, split)."""
    config = tiny_config(*SERVED_KINDS[kind], "data.side_info=true")
    split = training.prepare_split(config)
    ids = [int(value) for value in split.dataset.item_vocab.ids(np.arange(1, split.num_items + 1))]
    source_ids = [*reversed(ids[:30]), *range(1001, 1006)]
    tf.keras.utils.set_random_seed(1)
    template = training.build_model(config, split.dataset)
    source = MODELS[kind].from_config({**template.get_config(), "num_items": len(source_ids)})
    training.compile_for_training(source, config, np.ones(len(source_ids) + 1))
    training.build_all_variables(source)
    source.optimizer.iterations.assign(5)
    source_vocab = Vocabulary(source_ids)
    save_serving_module(build_serving_module(source, source_vocab, k_max=5), tmp_path / "serving", source_vocab)
    training.save_model(source, tmp_path / "saved", source_vocab)
    tf.keras.utils.set_random_seed(2)
    model = training.build_model(config, split.dataset)
    training.compile_for_training(model, config, training.target_counts(split))
    return model, source, source_ids, split


@pytest.mark.parametrize("kind", sorted(SERVED_KINDS))
def test_warm_start_carries_item_rows_over_by_id_when_the_catalogue_changed(kind, tmp_path):
    # Continuous training: the next run's data brings new items, loses old ones and numbers them afresh.
    model, source, source_ids, split = _changed_catalogue(kind, tmp_path)
    ids = [int(value) for value in split.dataset.item_vocab.ids(np.arange(1, split.num_items + 1))]
    item_rows = "item_tower.id_embedding.embeddings"
    own_data = {id(model.item_frequency), *(id(table) for table in model.item_tower.feature_tables.values())}
    assert model.item_tower.feature_tables  # item data to keep
    before = {path: variable.numpy() for path, variable in model.get_weight_paths().items()}
    for name in ("serving", "saved"):
        for path, variable in model.get_weight_paths().items():  # each source on its own
            variable.assign(before[path])
        assert warm_start(model, tmp_path / name, 0.004, split.dataset.item_vocab) == str(tmp_path / name)
        learnt, now = source.get_weight_paths(), model.get_weight_paths()
        expected_rows = before[item_rows].copy()
        expected_rows[0] = learnt[item_rows].numpy()[0]
        for index, item_id in enumerate(ids, start=1):
            if item_id in source_ids:
                expected_rows[index] = learnt[item_rows].numpy()[source_ids.index(item_id) + 1]
        np.testing.assert_array_equal(now[item_rows].numpy(), expected_rows)
        for path, variable in now.items():
            if path.startswith("optimizer.") or path == item_rows:
                continue
            expected = before[path] if id(variable) in own_data else learnt[path].numpy()
            np.testing.assert_array_equal(variable.numpy(), expected, err_msg=f"{name}: {path}")
        # Adam's moments were per row of the old catalogue: it starts afresh even from a checkpoint that has them.
        assert model.optimizer.iterations.numpy() == 0
        assert model.optimizer.learning_rate.numpy() == pytest.approx(0.004)


def test_warm_start_refuses_items_it_cannot_match_by_id(tmp_path):
    model, source, source_ids, split = _changed_catalogue("two_tower", tmp_path)
    # Ids are typed as a Vocabulary types them: "30" is not the item 30.
    strangers = Vocabulary([str(value) for value in split.dataset.item_vocab.ids(np.arange(1, split.num_items + 1))])
    for name in ("serving", "saved"):
        with pytest.raises(ConfigError, match=rf"{name}' shares no item id with this run \(its first ids \[30, 29, "
                                              r"28\], this run's \['1', '2', '3'\]\)"):
            warm_start(model, tmp_path / name, 0.01, strangers)
    # A source whose ids and rows disagree, or whose ids cannot be read, is named as such.
    ids_file = tmp_path / "saved" / "item_vocab.json"
    Vocabulary(source_ids[:-1]).save(ids_file)
    with pytest.raises(ConfigError, match=r"saved': .*saved/item_vocab.json holds 34 item ids, but its model has "
                                          r"35 items"):
        warm_start(model, tmp_path / "saved", 0.01, split.dataset.item_vocab)
    ids_file.write_text("{not json")
    with pytest.raises(ConfigError, match=r"saved': cannot read its item ids from .*saved/item_vocab.json"):
        warm_start(model, tmp_path / "saved", 0.01, split.dataset.item_vocab)
    Vocabulary(source_ids).save(ids_file)
    with pytest.raises(ConfigError, match=r"saved' has 35 items, this model 40, and no item vocabulary was given"):
        warm_start(model, tmp_path / "saved", 0.01)
    (tmp_path / "saved" / "item_vocab.json").unlink()
    with pytest.raises(ConfigError, match=r"saved' has 35 items, this model 40, and it keeps no item vocabulary"):
        warm_start(model, tmp_path / "saved", 0.01, split.dataset.item_vocab)
    with pytest.raises(ValueError, match=r"item_vocab has 35 items but the model 40"):
        warm_start(model, tmp_path / "serving", 0.01, Vocabulary(source_ids))
    # The same items in the same order take the rows as they are (and a run's Adam state); the
    # item data stays this run's even where the checkpoint restores everything at once.
    trained = tmp_path / "run"
    training.train(tiny_config(*SERVED_KINDS["two_tower"], "data.side_info=true", "train.epochs=1"), trained,
                   split=split)
    model.set_item_frequencies(np.arange(split.num_items + 1))
    own_data = [model.item_frequency, *model.item_tower.feature_tables.values()]
    own_data[-1].assign(own_data[-1] + 1.0)
    expected = [variable.numpy() for variable in own_data]
    warm_start(model, trained, 0.01, split.dataset.item_vocab)
    assert model.optimizer.iterations.numpy() > 0
    for variable, value in zip(own_data, expected):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_warm_start_ignores_metric_trackers_that_options_add(tmp_path):
    # Cache-aware SparCode logs one more loss than the plain model, with the same weights.
    sparcode = ("model.name=sparcode", "model.options={tokenizer: chunks, num_query_tokens: 4, num_codebooks: 4, "
                "num_codewords: 8, interaction_units: [8], detach_code_path: true}")
    training.train(tiny_config(*sparcode, "train.epochs=1"), tmp_path / "plain")
    config = tiny_config(*sparcode, "model.options.training_cache_fraction=0.01", "train.epochs=1")
    split = training.prepare_split(config)
    model = training.build_model(config, split.dataset)
    training.compile_for_training(model, config, training.target_counts(split))
    warm_start(model, tmp_path / "plain", 0.01)
    for started, saved in zip(model_state(model), model_state(training.load_model(tmp_path / "plain" / "model"))):
        np.testing.assert_array_equal(started, saved)


def test_a_bad_warm_start_leaves_the_run_unclaimed_and_a_resumed_one_does_not_need_its_source(tmp_path):
    with pytest.raises(ConfigError, match="is neither a finished run directory"):
        training.train(tiny_config("train.epochs=1", f"train.warm_start={tmp_path / 'nowhere'}"), tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()
    training.train(tiny_config("train.epochs=1"), tmp_path / "first")
    config = tiny_config("train.epochs=2", "train.early_stopping_patience=0", f"train.warm_start={tmp_path / 'first'}")
    interrupt = Interrupt(at_epoch=1)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        training.train(config, tmp_path / "run", callbacks=[interrupt])
    shutil.rmtree(tmp_path / "first")
    recorder = EpochRecorder()
    metrics = training.train(config, tmp_path / "run", callbacks=[recorder])
    # From its own backup (epoch 1's weights), not from the (deleted) source.
    assert recorder.epochs == [2] and metrics["epochs"] == 2
    for resumed, reached in zip(recorder.first_weights, interrupt.weights):
        np.testing.assert_array_equal(resumed, reached)


def test_patience_is_judged_only_at_validation_epochs(tmp_path):
    metrics = training.train(
        tiny_config("train.epochs=9", "train.validation_every=3", "train.early_stopping_patience=2",
                    "train.learning_rate=0.0"),
        tmp_path,
    )
    history = json.loads((tmp_path / "history.json").read_text())
    # Validated at 3 (best) and 6 (no better): stops at 6, never before the first validation.
    assert metrics["epochs"] == 6 and metrics["best_epoch"] == 3
    assert [r["epoch"] for r in history["epochs"] if "val_NDCG@10" in r] == [3, 6]


def test_a_run_killed_after_it_stopped_early_does_not_train_on_when_resumed(tmp_path, monkeypatch):
    config = tiny_config("train.epochs=9", "train.validation_every=3", "train.early_stopping_patience=2",
                         "train.learning_rate=0.0")

    def killed(*args, **kwargs):
        raise RuntimeError("killed while saving")

    with monkeypatch.context() as patched:
        patched.setattr(training, "save_model", killed)
        with pytest.raises(RuntimeError, match="killed while saving"):
            training.train(config, tmp_path)
    assert json.loads((tmp_path / "history.json").read_text())["stopped"] == "early_stopping"
    recorder = EpochRecorder()
    metrics = training.train(config, tmp_path, callbacks=[recorder])
    # It used to resume into epoch 7 (and, had that epoch improved, to train on).
    assert recorder.epochs == [] and metrics["epochs"] == 6 and metrics["best_epoch"] == 3


def test_a_run_its_time_budget_stopped_trains_on_when_the_budget_is_raised(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise RuntimeError("killed while saving")

    with monkeypatch.context() as patched:
        patched.setattr(training, "save_model", killed)
        with pytest.raises(RuntimeError, match="killed while saving"):
            training.train(tiny_config("train.epochs=3", "train.max_train_seconds=0.001"), tmp_path)
    assert json.loads((tmp_path / "history.json").read_text())["stopped"] == "time_budget"
    recorder = EpochRecorder()
    metrics = training.train(tiny_config("train.epochs=3", "train.max_train_seconds=3600"), tmp_path,
                             callbacks=[recorder])
    assert recorder.epochs == [2, 3] and metrics["epochs"] == 3
    # Ended by train.epochs, not by the old budget: no stale stop reason is left behind.
    assert "stopped" not in json.loads((tmp_path / "history.json").read_text())


def test_synthetic_arguments_are_checked_by_name():
    with pytest.raises(ConfigError, match="data.synthetic.num_users must be an integer, got 'abc'"):
        training.prepare_split(tiny_config("data.synthetic.num_users=abc"))
    with pytest.raises(ConfigError, match="data.synthetic.noise must be a number, got 'x'"):
        training.prepare_split(tiny_config("data.synthetic.noise=x"))
    with pytest.raises(ConfigError, match=r"unknown key data.synthetic.users; make_synthetic takes \["):
        training.prepare_split(tiny_config("data.synthetic.users=5"))


def test_a_directory_of_other_files_is_not_taken_as_a_run_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"is not empty and holds no run \(notes.txt\)"):
        training.train(tiny_config("train.epochs=1"), tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_run_dir_of_another_config_is_refused(tmp_path):
    training.train(tiny_config("train.epochs=1"), tmp_path)
    with pytest.raises(ValueError, match="different config"):
        training.train(tiny_config("train.epochs=2"), tmp_path)


def test_a_bad_split_option_leaves_the_run_directory_unclaimed(tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['min_len'\] for the 'leave_one_out' split"):
        training.train(tiny_config("data.split_options={min_len: 4}"), tmp_path)
    assert not (tmp_path / "config.json").exists()  # once written first, it refused the corrected run


@pytest.mark.parametrize("override, message", [
    ("model.options.colour=1", "colour"),  # an option the model does not take
    ("model.temperature=0.0", "temperature must be"),  # a value the model refuses
    ("eval.ks=[1, 10, 100000]", r"eval.ks=\[1, 10, 100000\] has cutoff\(s\) \[100000\] above the"),
])
def test_a_model_or_cutoff_that_cannot_train_leaves_the_run_directory_unclaimed(tmp_path, override, message):
    # The model was built after config.json was written, so the corrected command was refused
    # ("holds a run with a different config"); too deep a cutoff failed only after an epoch.
    with pytest.raises((ValueError, ConfigError), match=message):
        training.train(tiny_config(override), tmp_path)
    assert not (tmp_path / "config.json").exists()
    assert training.train(tiny_config("train.epochs=1"), tmp_path)["epochs"] == 1


def test_unknown_model_name_is_reported(tmp_path):
    config = tiny_config("model.name=dssm")
    with pytest.raises(ValueError, match="unknown model 'dssm'"):
        training.build_model(config, training.prepare_split(config).dataset)


def test_run_directories_are_readable_by_other_users(tmp_path):
    from tfx_xmatch.io_utils import atomic_directory

    with atomic_directory(tmp_path / "model") as directory:
        (directory / "weights").write_text("w")
    umask = os.umask(0)
    os.umask(umask)
    # tempfile.mkdtemp's 0700 once survived the rename: a server running as another user could not read it.
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("name, options", [("TwoTower", {}), ("SparCode", {"num_codewords": 8, "num_query_tokens": 2}),
                                           ("SPARC", {"num_codewords": 8}), ("T2Diff", {})])
def test_a_batch_without_targets_or_with_targets_past_the_catalogue_is_refused_naming_next_items(name, options):
    """Every loss was a mean over nothing (NaN, which fit applied to the weights) or failed deep in
    a layer (a quantizer's restart drew from an empty batch) without saying why."""
    from tfx_xmatch import models

    model = getattr(models, name)(num_items=20, embedding_dim=8, max_length=5, **options)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.1))
    history = tf.constant([[0, 1, 2, 3, 4], [0, 0, 5, 6, 7]], tf.int32)
    trainable = {"history": history, "next_items": tf.constant([[0, 2, 3, 4, 5], [0, 0, 6, 7, 8]], tf.int32)}
    model.fit(tf.data.Dataset.from_tensors(trainable), epochs=1, verbose=0)
    metric_variables = {id(variable) for metric in model.metrics for variable in metric.variables}

    def state():  # weights and quantizer state, not the metrics (fit resets them)
        return [variable.numpy() for variable in model.variables if id(variable) not in metric_variables]

    before = state()
    empty = {"history": history, "next_items": tf.zeros_like(history)}
    with pytest.raises(tf.errors.InvalidArgumentError, match="every next_items entry is 0"):
        model.fit(tf.data.Dataset.from_tensors(empty), epochs=1, verbose=0)
    for old, new in zip(before, state(), strict=True):
        np.testing.assert_array_equal(old, new)
    for training_mode in (True, False):
        with pytest.raises(tf.errors.InvalidArgumentError, match="every next_items entry is 0"):
            model.compute_loss(empty, training=training_mode)
    with pytest.raises(KeyError, match="needs the input 'next_items'"):
        model.compute_loss({"history": history})
    # A target past the catalogue failed as a bare "Received a label value of 25" on CPU and
    # trained on NaN on a GPU; a negative one was skipped as padding.
    for bad, low, high in ((25, 0, 25), (-1, -1, 7)):
        targets = {"history": history, "next_items": tf.tensor_scatter_nd_update(
            trainable["next_items"], [[1, 4]], [bad])}
        match = (rf"input next_items: target item indices must be in \[0, 20\](.|\n)*"
                 rf"(\[{low}\] \[to\] \[{high}\]|from {low} to {high})(.|\n)*item vocabulary the model was built with")
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            model.fit(tf.data.Dataset.from_tensors(targets), epochs=1, verbose=0)
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            model.compute_loss(targets, training=True)
    for old, new in zip(before, state(), strict=True):
        np.testing.assert_array_equal(old, new)
    assert np.isfinite(float(model.compute_loss(trainable)))


@pytest.mark.parametrize("name, options", [
    ("TwoTower", {"loss": "sampled_softmax", "num_sampled_negatives": 5, "max_loss_positions": 3}),
    ("SparCode", {"num_codewords": 8, "num_query_tokens": 2, "loss": "sampled_softmax", "num_sampled_negatives": 5,
                  "max_loss_positions": 3}),
    ("SPARC", {"num_codewords": 8}), ("T2Diff", {"max_loss_positions": 3})])
def test_the_evaluation_loss_is_the_same_on_the_same_data(name, options):
    """Sampled positions, negatives, codeword choices, diffusion steps and noise were stateful
    draws in evaluation too, so two evaluate() calls on the same data reported other losses."""
    from tfx_xmatch import models

    model = getattr(models, name)(num_items=30, embedding_dim=8, max_length=6, **options)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
    batch = {"history": tf.constant([[0, 1, 2, 3, 4, 5], [0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]], tf.int32),
             "next_items": tf.constant([[0, 2, 3, 4, 5, 6], [0, 0, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]], tf.int32)}
    data = tf.data.Dataset.from_tensors(batch)
    model.fit(data, epochs=1, verbose=0)
    first, second = (model.evaluate(data, verbose=0, return_dict=True) for _ in range(2))
    assert first == second
    eager = [float(model.compute_loss(batch, training=False)) for _ in range(2)]
    assert eager[0] == eager[1]
    if name in ("SPARC", "T2Diff"):  # training keeps drawing afresh
        trained = {float(model.compute_loss(batch, training=True)) for _ in range(3)}
        assert len(trained) > 1


def test_loss_draws_repeat_between_evaluations_and_not_within_one():
    from tfx_xmatch.models.history_encoding import LossDraws

    def evaluation_draws():
        draws = LossDraws(training=False)
        return [draws.uniform([4]).numpy(), draws.uniform([4], 1, 9, dtype=tf.int32).numpy(),
                draws.normal([4]).numpy(), draws.shuffle(tf.range(6)).numpy(),
                draws.categorical(tf.zeros([1, 5]), 4).numpy()]

    once, again = evaluation_draws(), evaluation_draws()
    for a, b in zip(once, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(once[0], LossDraws(training=False, seed=1).uniform([4]).numpy())
    draws = LossDraws(training=False)
    assert not np.array_equal(draws.uniform([4]).numpy(), draws.uniform([4]).numpy())
    assert sorted(once[3].tolist()) == list(range(6)) and ((1 <= once[1]) & (once[1] < 9)).all()
    training = LossDraws(training=True)
    assert not np.array_equal(training.uniform([8]).numpy(), LossDraws(training=True).uniform([8]).numpy())


def test_stale_temporaries_are_removed_and_a_lone_moved_aside_copy_is_restored(tmp_path):
    from tfx_xmatch.io_utils import remove_stale_temporaries

    (tmp_path / ".model.ab12.tmp").mkdir()
    (tmp_path / ".metrics.json.cd34.tmp").write_text("{")
    (tmp_path / "model").mkdir()
    (tmp_path / ".model.old").mkdir()  # superseded: the new model is in place
    (tmp_path / ".best_weights.old").mkdir()  # the only copy: its replacement never arrived
    (tmp_path / ".best_weights.old" / "weights").write_text("w")
    (tmp_path / ".workers").mkdir()  # not ours to touch
    # Nor are a user's own dot files that merely look like temporaries (they were deleted, and
    # .notes.old renamed to notes, when every .X.tmp / .X.old counted).
    (tmp_path / ".cache.tmp").mkdir()
    (tmp_path / ".notes.old").write_text("mine")
    (tmp_path / ".model.tmp").write_text("no random part: not an atomic_path temporary")
    changed = remove_stale_temporaries(tmp_path, training.RUN_OUTPUTS)
    assert sorted(changed) == [".best_weights.old", ".metrics.json.cd34.tmp", ".model.ab12.tmp", ".model.old"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".cache.tmp", ".model.tmp", ".notes.old", ".workers", "best_weights", "model"]
    assert (tmp_path / "best_weights" / "weights").read_text() == "w"
    assert remove_stale_temporaries(tmp_path / "missing", training.RUN_OUTPUTS) == []


def test_a_saved_model_with_damaged_weights_is_named_not_a_bare_index_error(tmp_path):
    """A cut-short weights file raised IndexError("Read less bytes than requested"), which the
    command lines took for a bug (a traceback, exit 1)."""
    import glob

    from tfx_xmatch.models import TwoTower

    model = TwoTower(num_items=30, embedding_dim=8, user_tower="mean", max_length=5)
    model({"history": np.zeros((1, 5), np.int32)})
    directory = tmp_path / "model"
    training.save_model(model, directory)
    (data,) = glob.glob(str(directory / "weights.data*"))
    content = open(data, "rb").read()
    damages = [
        ("Read less bytes than requested", data, content[: len(content) // 2]),
        ("too short to be an sstable", str(directory / "weights.index"), b"garbage"),
        ("No such file", data, None),
    ]
    for reason, path, replacement in damages:
        training.save_model(model, directory)
        if replacement is None:
            os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(replacement)
        with pytest.raises(ValueError, match=rf"the weights {directory}/weights\.\* of {directory} cannot be read "
                                             rf"\(.*{reason}.*\): the saved model is incomplete or damaged"):
            training.load_model(directory)


def test_a_noisy_t2diff_sampler_evaluates_the_same_twice_and_as_the_run_reported(tmp_path):
    """With DDPM (or random initial noise) every evaluation drew other noise: `xmatch evaluate`
    gave another HR@10 at each call, and neither was the run's own test report."""
    config = tiny_config("model.name=t2diff", "model.user_tower=mixed_attention", "model.num_blocks=1",
                         "model.options={session_length: 3, history_length: 5, diffusion_steps: 5, sampling_steps: 5, sampler: ddpm, "
                         "initial_noise: random, denoiser: mlp, denoiser_units: [16]}", "train.epochs=1")
    reported = training.train(config, tmp_path)["test"]
    model = training.load_model(tmp_path / "model")
    split = training.prepare_split(config)
    first = training.evaluate(model, split, "test", config)
    assert training.evaluate(model, split, "test", config) == first
    for key, value in reported.items():
        assert first[key] == pytest.approx(value, abs=1e-12), key


def test_a_run_directory_another_process_is_writing_is_refused_before_its_config_is_read(tmp_path):
    """Two trainings into one new run directory both found no config.json, both trained, and
    left config.json, model/ and metrics.json of different runs (both exited 0)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with io_utils.claimed_directory(run_dir, "run directory"):  # the first process, still training
        with pytest.raises(io_utils.DirectoryBeingWritten,
                           match=rf"run directory '{run_dir}' is being written by another process \(pid "
                                 rf"{os.getpid()}\); wait for it to end, or give another directory"):
            training.train(tiny_config("train.epochs=1"), run_dir)
        assert os.listdir(run_dir) == [training.CLAIM_FILE]
    assert os.listdir(run_dir) == []  # released with the block
    # A writer killed without releasing leaves the file, unlocked: the next run takes it over.
    (run_dir / training.CLAIM_FILE).write_text("12345\n")
    assert training.train(tiny_config("train.epochs=1"), run_dir)["epochs"] == 1
    assert not (run_dir / training.CLAIM_FILE).exists()


def test_run_directories_that_could_not_be_used_are_refused_up_front(tmp_path):
    """A dangling symlink failed with "[Errno 17] File exists"; weights saved under a path with
    [ ] could not be read back after the first epoch ("Failed to find any matching files")."""
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"run directory '.*dangling' is a dangling symlink \(to '.*gone', "
                                                r"which does not exist\)"):
        training.train(tiny_config("train.epochs=1"), tmp_path / "dangling")
    with pytest.raises(ValueError, match=r"run directory '.*exp\[1\]': .* holds \[, \* or \?, which TensorFlow"):
        training.train(tiny_config("train.epochs=1"), tmp_path / "exp[1]")
    assert sorted(os.listdir(tmp_path)) == ["dangling"]


def test_an_output_location_that_cannot_be_written_is_named_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    for path, directory, error, message in [
        (tmp_path / "afile", True, NotADirectoryError, r"--out '.*afile' is a file, not a directory"),
        (tmp_path, False, IsADirectoryError, r"--out '.*' is a directory; give a file path"),
        (tmp_path / "afile" / "new" / "m.json", False, NotADirectoryError, r"'.*afile' is a file, not a directory"),
    ]:
        with pytest.raises(error, match=message):
            io_utils.check_output_location(path, "--out", directory=directory)
    io_utils.check_output_location(tmp_path / "new" / "deeper", "--out", directory=True)
    io_utils.check_output_location("gs://bucket/x", "--out", directory=True)  # left to the write
    # A read-only mount or an immutable directory (as root, the permission bits do not say it).
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))
    with pytest.raises(PermissionError, match=rf"--out '.*m.json' cannot be written: '{tmp_path}' is read-only"):
        io_utils.check_output_location(tmp_path / "new" / "m.json", "--out", directory=False)


def test_warm_start_across_a_changed_catalogue_takes_an_older_versions_checkpoint_without_a_metric_tracker(tmp_path):
    """A SparCode saved by an older version had fewer loss trackers: a warm start that moves item
    rows (a changed catalogue, or any serving source) refused it with TF's "Found 2 Python
    objects that were not bound to checkpointed values", naming a tracker's 'count:0'."""
    model, source, source_ids, split = _changed_catalogue("sparcode", tmp_path)
    older = tmp_path / "older"
    shutil.copytree(tmp_path / "saved", older)
    # Built from this description, the source model has a tracker (cached_retrieval_loss) that
    # its checkpoint lacks, as this version's model has trackers an older checkpoint lacks.
    description = json.loads((older / "config.json").read_text())
    description["config"]["training_cache_fraction"] = 0.01
    (older / "config.json").write_text(json.dumps(description))
    warm_start(model, older, 0.004, split.dataset.item_vocab)
    rows = "item_tower.id_embedding.embeddings"
    ids = [int(value) for value in split.dataset.item_vocab.ids(np.arange(1, split.num_items + 1))]
    np.testing.assert_array_equal(model.get_weight_paths()[rows].numpy()[ids.index(source_ids[0]) + 1],
                                  source.get_weight_paths()[rows].numpy()[1])
    np.testing.assert_array_equal(model.get_weight_paths()["quantizer.codebooks"].numpy(),
                                  source.get_weight_paths()["quantizer.codebooks"].numpy())
