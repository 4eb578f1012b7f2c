"""The TFX Trainer module's run_fn on TFRecords from write_split_tfrecords (plain and GZIP, as
ExampleGen writes them): its model, metrics and SavedModel equal the in-process code's, and
errors propagate. The pipeline definition is checked only where tfx is installed."""

import gzip
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.test_training import TINY, tiny_config
from tfx_xmatch import training, warm_start
from tfx_xmatch.config import ConfigError, load_config
from tfx_xmatch.data.dataset import pad_histories
from tfx_xmatch.data import write_split_tfrecords
from tfx_xmatch.data.vocabulary import Vocabulary

TFX_DIR = pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "tfx"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"xmatch_tfx_{name}", TFX_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


trainer_module = _load("trainer_module")
RUN_OVERRIDES = [o for o in TINY if not o.startswith("data.")] + ["train.epochs=3", "train.early_stopping_patience=0"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = tiny_config()
    split = training.prepare_split(config)
    directory = tmp_path_factory.mktemp("prepared")
    write_split_tfrecords(split, str(directory), num_shards=2)
    return split, directory


def _fn_args(directory, out, **kwargs):
    custom = {"overrides": RUN_OVERRIDES, "item_vocab": str(directory / "item_vocab.json")}
    custom.update(kwargs.pop("custom", {}))
    return trainer_module.FnArgs(
        train_files=[str(directory / "train-*")], eval_files=[str(directory / "validation-*")],
        serving_model_dir=str(out / "serving"), model_run_dir=str(out / "run"), custom_config=custom, **kwargs)


def test_run_fn_trains_selects_and_exports_like_the_in_process_code(prepared, tmp_path):
    split, directory = prepared
    trainer_module.run_fn(_fn_args(directory, tmp_path))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["best_epoch"] is not None
    # The TFRecord validation equals the in-process full-ranking evaluation of the same model.
    model = training.load_model(tmp_path / "run" / "model")
    config = tiny_config()
    expected = training.evaluate(model, split, "validation", config)
    for key in ("HR@10", "NDCG@10", "TailRecall@10", "Coverage@10"):
        np.testing.assert_allclose(metrics["validation"][key], expected[key], rtol=1e-6, err_msg=key)
    # The SavedModel sits directly in serving_model_dir and answers like the model.
    served = tf.saved_model.load(str(tmp_path / "serving"))
    history = split.validation.histories[0]
    raw = split.dataset.item_vocab.ids(history)
    result = served.signatures["top_k"](history=tf.constant([raw], tf.int64), k=tf.constant(5))
    scores = model.score_all({"history": pad_histories([history], model.max_length)}).numpy()[0]
    scores[0] = -np.inf
    scores[history] = -np.inf
    expected_ids = split.dataset.item_vocab.ids(np.argsort(-scores, kind="stable")[:5])
    assert result["item_ids"].numpy()[0].tolist() == list(expected_ids)
    assert (tmp_path / "serving" / "assets.extra" / "tf_serving_warmup_requests").exists()
    # Validation's scoring functions stay out of the SavedModel (Keras tracked them on the model).
    assert b"score_all" not in (tmp_path / "serving" / "saved_model.pb").read_bytes()
    # A retried Trainer task writes to the same places: it must succeed and leave one
    # SavedModel there (it failed with FileExistsError after training again).
    trainer_module.run_fn(_fn_args(directory, tmp_path))
    again = tf.saved_model.load(str(tmp_path / "serving"))
    retried = again.signatures["top_k"](history=tf.constant([raw], tf.int64), k=tf.constant(5))
    assert retried["item_ids"].numpy()[0].tolist() == list(expected_ids)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run", "serving"]


def test_run_fn_reads_gzip_records_and_honours_train_steps(prepared, tmp_path):
    _, directory = prepared
    gzipped = tmp_path / "gz"
    gzipped.mkdir()
    for path in directory.glob("*.tfrecord"):
        with open(path, "rb") as source, gzip.open(gzipped / (path.name + ".gz"), "wb") as target:
            shutil.copyfileobj(source, target)
    shutil.copy(directory / "item_vocab.json", gzipped / "item_vocab.json")
    args = _fn_args(gzipped, tmp_path, train_steps=6)
    trainer_module.run_fn(args)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["epochs"]) == 3
    assert (tmp_path / "serving" / "saved_model.pb").exists()
    # Fewer steps than epochs: that many one-batch epochs, not one batch per configured epoch.
    trainer_module.run_fn(_fn_args(gzipped, tmp_path / "short", train_steps=2))
    assert len(json.loads((tmp_path / "short" / "run" / "history.json").read_text())["epochs"]) == 2


def test_run_fn_writes_to_url_paths_through_tf_io_gfile(prepared, tmp_path, caplog):
    # ram:// stands in for the gs:// paths of Kubeflow/Vertex, which pathlib once turned into a
    # local "gs:/..." directory inside the container (lost when it exits).
    _, directory = prepared
    base = f"ram://tfx-{os.getpid()}"
    tf.io.gfile.makedirs(base)
    tf.io.gfile.copy(str(directory / "item_vocab.json"), f"{base}/item_vocab.json")
    args = _fn_args(directory, tmp_path, custom={"item_vocab": f"{base}/item_vocab.json"}, train_steps=3)
    args.model_run_dir, args.serving_model_dir = f"{base}/run", f"{base}/serving"
    trainer_module.run_fn(args)
    assert json.loads(tf.io.gfile.GFile(f"{base}/run/metrics.json").read())["epochs"] == 3
    assert tf.io.gfile.exists(f"{base}/run/model") and tf.io.gfile.exists(f"{base}/serving/saved_model.pb")
    assert not os.path.exists("ram:") and not (tmp_path / "run").exists()
    # The next Trainer run can start from this one's run directory where it lies.
    overrides = [*RUN_OVERRIDES, f"train.warm_start={base}/run"]
    args = _fn_args(directory, tmp_path, custom={"item_vocab": f"{base}/item_vocab.json", "overrides": overrides},
                    train_steps=1)
    args.model_run_dir, args.serving_model_dir = f"{base}/next-run", f"{base}/next-serving"
    with caplog.at_level(logging.INFO, logger=warm_start.logger.name):
        trainer_module.run_fn(args)
    assert f"warm start from {base}/run/model" in caplog.text
    # ...or from the serving SavedModel it pushed: TFX's base_model.
    args = _fn_args(directory, tmp_path, custom={"item_vocab": f"{base}/item_vocab.json"}, train_steps=1,
                    base_model=f"{base}/serving")
    args.model_run_dir, args.serving_model_dir = f"{base}/based-run", f"{base}/based-serving"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=warm_start.logger.name):
        trainer_module.run_fn(args)
    assert f"warm start from {base}/serving" in caplog.text
    assert json.loads(tf.io.gfile.GFile(f"{base}/based-run/config.json").read())["train"]["warm_start"] == f"{base}/serving"


@pytest.fixture(scope="module")
def first_run(prepared, tmp_path_factory):
    """A run of three steps that the warm-start tests start from; they only read it."""
    _, directory = prepared
    out = tmp_path_factory.mktemp("warm_start") / "first"
    trainer_module.run_fn(_fn_args(directory, out, train_steps=3))
    return out


def test_run_fn_warm_starts_from_base_model_and_refuses_a_second_source(prepared, first_run, tmp_path, caplog):
    _, directory = prepared
    served = tf.saved_model.load(str(first_run / "serving"))
    # Another seed: a run that ignored base_model would start from other random weights.
    args = _fn_args(directory, tmp_path / "second", custom={"overrides": [*RUN_OVERRIDES, "train.seed=7"]},
                    train_steps=1, base_model=str(first_run / "serving"))
    with caplog.at_level(logging.INFO, logger=warm_start.logger.name):
        trainer_module.run_fn(args)
    assert f"warm start from {first_run / 'serving'}" in caplog.text
    # It started from the served weights: one step of a fresh Adam moves each by at most the
    # learning rate (0.01).
    items = tf.constant(np.arange(1, 11), tf.int64)
    before = served.signatures["item_embeddings"](item_ids=items)["item_embeddings"].numpy()
    after = tf.saved_model.load(str(tmp_path / "second" / "serving")).signatures["item_embeddings"](
        item_ids=items)["item_embeddings"].numpy()
    assert 0 < np.abs(after - before).max() <= 0.0101
    # A second, different source is ambiguous: refused before any training.
    overrides = [*RUN_OVERRIDES, f"train.warm_start={first_run / 'run'}"]
    args = _fn_args(directory, tmp_path / "third", custom={"overrides": overrides},
                    base_model=str(first_run / "serving"))
    with pytest.raises(ConfigError, match=r"train.warm_start='.*first/run' and the Trainer's "
                                          r"base_model='.*first/serving' both name a model"):
        trainer_module.run_fn(args)
    assert not (tmp_path / "third" / "run").exists()
    # The same model named both ways is no conflict.
    config = load_config(None, [*RUN_OVERRIDES, f"train.warm_start={first_run / 'serving'}/"])
    assert trainer_module.with_base_model(config, str(first_run / "serving")).train.warm_start == str(
        first_run / "serving")
    # A base_model it cannot start from says so as the Trainer's input, not as a setting the user never made.
    args = _fn_args(directory, tmp_path / "fourth", base_model=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"the Trainer's base_model .* cannot be used: train.warm_start='.*nowhere' "
                                          r"is neither"):
        trainer_module.run_fn(args)


def test_run_fn_warm_starts_across_a_changed_catalogue_by_item_id(prepared, first_run, tmp_path, caplog):
    # Continuous training: the next span's data numbers the items afresh, keeps 30 of them (now
    # at other indices), drops 10 and brings 10 new ones.
    split, directory = prepared
    renamed = tmp_path / "renamed"
    shutil.copytree(directory, renamed)
    ids = [int(value) for value in split.dataset.item_vocab.ids(np.arange(1, split.num_items + 1))]
    Vocabulary([*reversed(ids[:30]), *range(1001, 1011)]).save(renamed / "item_vocab.json")
    args = _fn_args(renamed, tmp_path / "second", custom={"overrides": [*RUN_OVERRIDES, "train.seed=7"]},
                    train_steps=1, base_model=str(first_run / "serving"))
    with caplog.at_level(logging.INFO, logger=warm_start.logger.name):
        trainer_module.run_fn(args)
    assert "30 of this run's 40 items carried over by id, 10 new ones" in caplog.text
    assert "10 of the source's 40 items no longer present" in caplog.text

    def served(run_dir, item_ids):
        signature = tf.saved_model.load(str(run_dir / "serving")).signatures["item_embeddings"]
        return signature(item_ids=tf.constant(item_ids, tf.int64))["item_embeddings"].numpy()

    # Each kept item starts from its own learnt vector: one step of a fresh Adam moves it by at
    # most the learning rate (0.01), where another item's vector would be far away.
    kept = np.array(ids[:30])
    distance = np.abs(served(tmp_path / "second", kept) - served(first_run, kept)).max(axis=1)
    assert distance.max() <= 0.0101
    assert np.abs(served(tmp_path / "second", kept) - served(first_run, kept[::-1])).max(axis=1).min() > 0.0101


def _first_item_id(directory):
    from tfx_xmatch.data.vocabulary import Vocabulary

    return Vocabulary.load(directory / "item_vocab.json").ids([1])[0].item()


def test_run_fn_errors_propagate(prepared, tmp_path):
    _, directory = prepared
    with pytest.raises(KeyError, match="item_vocab"):
        trainer_module.run_fn(trainer_module.FnArgs([], [], str(tmp_path / "s"), str(tmp_path / "r"), {}))
    with pytest.raises(ConfigError, match="unknown config key"):
        trainer_module.run_fn(_fn_args(directory, tmp_path / "a", custom={"overrides": ["train.epoch=3"]}))
    with pytest.raises(ConfigError, match=r"unknown keys \['modul_file'\]"):
        trainer_module.run_fn(_fn_args(directory, tmp_path / "b", custom={"modul_file": "x"}))
    with pytest.raises(ValueError, match=r"unknown custom_config\['export'\] key\(s\) \['kmax'\]"):
        trainer_module.run_fn(_fn_args(directory, tmp_path / "d", custom={"export": {"kmax": 10}}))
    assert not (tmp_path / "d" / "run").exists()  # refused before any training
    # Export settings the export would refuse are refused before training too, not after it.
    for export, message in (({"index_kind": "partitoned"}, "unknown index kind 'partitoned'"),
                            ({"index_kind": "partitioned", "index_options": {"num_partitons": 4}},
                             "takes no option 'num_partitons'"),
                            ({"k_max": 0}, "k_max must be an integer >= 1, got 0"),
                            ({"index_kind": "sparse_code"}, "'sparse_code' serves model.name='sparcode' only"),
                            ({"padding_id": _first_item_id(directory)}, "is also a real item id; choose another one")):
        with pytest.raises(ValueError, match=message):
            trainer_module.run_fn(_fn_args(directory, tmp_path / "e", custom={"export": export}))
        assert not (tmp_path / "e" / "run").exists()
    args = _fn_args(directory, tmp_path / "c")
    args.train_files = [str(directory / "nothing-*")]
    with pytest.raises(FileNotFoundError, match="no TFRecord file matches"):
        trainer_module.run_fn(args)
    assert not (tmp_path / "c" / "serving").exists()


def test_a_model_that_cannot_be_built_leaves_the_record_run_directory_unclaimed(prepared, tmp_path):
    from tfx_xmatch.data.vocabulary import Vocabulary
    from tfx_xmatch.pipelines.record_training import train_on_records

    _, directory = prepared
    vocab = Vocabulary.load(directory / "item_vocab.json")
    files = ([str(directory / "train-*")], [str(directory / "validation-*")])
    bad = load_config(None, [*RUN_OVERRIDES, "model.temperature=-1.0"])
    with pytest.raises(ValueError, match="temperature must be"):
        train_on_records(bad, *files, vocab, tmp_path / "run")
    # config.json was written first, and refused the corrected run as "another configuration".
    assert not (tmp_path / "run" / "config.json").exists()
    _, metrics = train_on_records(load_config(None, RUN_OVERRIDES), *files, vocab, tmp_path / "run")
    assert metrics["epochs"] == 3


def test_run_fn_on_movielens_100k(real_data_dir, tmp_path):
    config = load_config(None, ["data.dataset=ml-100k", f"data.data_dir={real_data_dir}"])
    split = training.prepare_split(config)
    write_split_tfrecords(split, str(tmp_path / "prepared"))
    overrides = ["model.embedding_dim=16", "model.max_length=20", "train.epochs=1", "train.verbose=0",
                 "train.batch_size=256", "eval.ks=[10]"]
    trainer_module.run_fn(trainer_module.FnArgs(
        [str(tmp_path / "prepared" / "train-*")], [str(tmp_path / "prepared" / "validation-*")],
        str(tmp_path / "serving"), str(tmp_path / "run"),
        {"overrides": overrides, "item_vocab": str(tmp_path / "prepared" / "item_vocab.json")}))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["validation"]["HR@10"] > 0 and (tmp_path / "serving" / "saved_model.pb").exists()


def test_create_pipeline_wires_examplegen_trainer_and_pusher(tmp_path):
    pytest.importorskip("tfx", reason="the tfx package is not installable with this stack (see DESIGN.md); "
                                      "the pipeline definition is exercised where tfx is installed")
    pipeline = _load("pipeline").create_pipeline(
        "xmatch", str(tmp_path / "root"), str(tmp_path / "data"), str(TFX_DIR / "trainer_module.py"),
        str(tmp_path / "serving"), {"model": {"name": "two_tower"}}, train_steps=10)
    assert [type(c).__name__ for c in pipeline.components] == ["ImportExampleGen", "Trainer", "Pusher"]
    warm = _load("pipeline").create_pipeline(
        "xmatch", str(tmp_path / "root"), str(tmp_path / "data"), str(TFX_DIR / "trainer_module.py"),
        str(tmp_path / "serving"), {"model": {"name": "two_tower"}}, warm_start_from_latest_model=True)
    assert [c.id for c in warm.components][:2] == ["ImportExampleGen", "latest_model_resolver"]
    trainer = next(c for c in warm.components if type(c).__name__ == "Trainer")
    assert "base_model" in trainer.inputs


def test_a_retried_trainer_does_not_train_a_finished_run_again_nor_on_other_records(prepared, tmp_path, caplog):
    """A retry trained the finished run again (train_seconds doubled); a run directory reused on
    other records exported the first records' best weights under the new history."""
    _, directory = prepared
    args = _fn_args(directory, tmp_path)
    trainer_module.run_fn(args)
    run = tmp_path / "run"
    finished = {name: (run / name).read_bytes() for name in ("history.json", "metrics.json", "inputs.json")}
    with caplog.at_level("WARNING"):
        trainer_module.run_fn(args)
    assert "already holds a finished run; loading its model without training" in caplog.text
    assert {name: (run / name).read_bytes() for name in finished} == finished
    assert (tmp_path / "serving" / "saved_model.pb").exists()
    args.train_files = [str(directory / "train-00000-*")]
    with pytest.raises(ValueError, match="holds a run on other records or another vocabulary; use a new run directory"):
        trainer_module.run_fn(args)


def test_what_tfx_hands_run_fn_is_used_or_refused_by_name(prepared, tmp_path, caplog):
    _, directory = prepared
    bad = [
        ({"overrides": "train.epochs=1"}, ConfigError, r"custom_config\['overrides'\] must be a list of"),
        ({"overrides": None}, ConfigError, r"custom_config\['overrides'\] must be a list of"),
        ({"config": 5}, ConfigError, r"custom_config\['config'\] must be a RunConfig file path or a dict, got 5"),
        ({"export": ["k_max", 10]}, ConfigError, r"custom_config\['export'\] must be a dict"),
        ({"export": {"index_options": [1]}}, ConfigError, r"custom_config\['export'\] must be a dict"),
        ({"item_vocab": None}, ConfigError, r"custom_config\['item_vocab'\] must be the path of item_vocab.json"),
        ({"config": {"train": {"monitor": "NDCG@ten"}}}, ConfigError, "train.monitor"),  # was a bare int() error
    ]
    for custom, error, message in bad:
        with pytest.raises(error, match=message):
            trainer_module.run_fn(_fn_args(directory, tmp_path / "bad", custom=custom))
        assert not (tmp_path / "bad" / "run").exists()
    with pytest.raises(ValueError, match="train_steps must be an integer >= 0 or None, got -1"):
        trainer_module.run_fn(_fn_args(directory, tmp_path / "steps", train_steps=-1))
    assert not (tmp_path / "steps" / "run" / "config.json").exists()
    # A Tuner's values are applied by config key; a bare name was silently ignored.
    with pytest.raises(ConfigError, match=r"hyperparameter\(s\) \['learning_rate'\] must be named by their config key"):
        trainer_module.run_fn(_fn_args(directory, tmp_path / "hp", hyperparameters={"values": {"learning_rate": 0.5}}))
    # ExampleGen's split directories are read like their files; a Transform graph is named as not applied.
    # Hyperband's own tuner/... entries are skipped, not refused.
    args = _fn_args(directory, tmp_path / "tuned", custom={"export": {"k_max": 5}},
                    hyperparameters={"values": {"train.learning_rate": 0.005, "tuner/epochs": 4, "tuner/bracket": 1}})
    split_dir = tmp_path / "Split-train"
    split_dir.mkdir()
    for path in directory.glob("train-*"):
        (split_dir / path.name).write_bytes(path.read_bytes())
    args.train_files = [str(split_dir)]
    args.transform_output = str(tmp_path / "transform")
    with caplog.at_level("WARNING"):
        trainer_module.run_fn(args)
    assert json.loads((tmp_path / "tuned" / "run" / "config.json").read_text())["train"]["learning_rate"] == 0.005
    assert "fn_args.transform_output is not applied" in caplog.text
    assert "k_max']=5 is below the k of train.monitor='NDCG@10'" in caplog.text  # legitimate, but said
    # The same records named relatively resume the run (paths were compared as written).
    relative = _fn_args(directory, tmp_path / "tuned", custom={"export": {"k_max": 5}},
                        hyperparameters={"values": {"train.learning_rate": 0.005}})
    relative.train_files = [os.path.relpath(split_dir)]
    caplog.clear()
    with caplog.at_level("WARNING"):
        trainer_module.run_fn(relative)
    assert "already holds a finished run" in caplog.text


def test_a_string_hyperparameter_with_a_hash_keeps_its_text():
    from tfx_xmatch.config import RunConfig

    config = trainer_module.with_hyperparameters(RunConfig(), {"values": {"train.warm_start": "/data/run #2"}})
    assert config.train.warm_start == "/data/run #2"  # was '"/data/run #2"', quotes included
