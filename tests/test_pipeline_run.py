"""``xmatch pipeline run`` chains every stage, publishes a servable version only at the end, and
its evaluation through the export equals the in-process evaluation of the trained model."""

import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("apache_beam")

import tensorflow as tf  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.config import ConfigError, load_config  # noqa: E402
from tfx_xmatch.data.tfrecord import read_eval_examples, record_counts  # noqa: E402
from tfx_xmatch.evaluation import evaluate_full_ranking  # noqa: E402
from tfx_xmatch.pipelines import cli  # noqa: E402
from tfx_xmatch.pipelines.run import run_pipeline  # noqa: E402
from tfx_xmatch.serving.server import build_parser, options_from_args  # noqa: E402
from tests.conftest import shared_data_dir  # noqa: E402

OVERRIDES = ["data.format=pairs", "model.embedding_dim=16", "model.max_length=12", "model.num_blocks=1",
             "train.epochs=2", "train.verbose=0", "train.batch_size=32", "eval.ks=[5,10]"]


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> pathlib.Path:
    """Users with distinct items (no repeats, so export and in-process ranking agree exactly)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("events") / "events.txt"
    lines = []
    for user in range(1, 121):
        start = rng.integers(1, 60)
        length = rng.integers(4, 15)
        lines += [f"{user} {1 + (start + 3 * step) % 60}" for step in range(length)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_chains_every_stage_and_publishes(events, tmp_path, capsys):
    config = load_config(None, [f"data.dataset={events}", *OVERRIDES])
    summary = run_pipeline(config, str(tmp_path / "out"), str(tmp_path / "models"), k_max=10, item_shards=3)
    # The printed serving command is one the server takes as it stands.
    hint = capsys.readouterr().out.rsplit("serve it: xmatch serve ", 1)[1].split(")")[0]
    served = options_from_args(build_parser().parse_args(hint.split())).model_configs[0]
    assert (served.name, served.base_path) == ("xmatch", str(tmp_path / "models"))
    assert list(summary["stage_seconds"]) == ["prepare", "train", "build_index", "export", "evaluate", "publish"]
    assert summary["published"] == str(tmp_path / "models" / "1")
    assert json.loads((tmp_path / "out" / "pipeline_summary.json").read_text())["test"] == summary["test"]

    # The published version answers, and its test metrics are the trained model's in-process ones.
    loaded = tf.saved_model.load(str(tmp_path / "models" / "1"))
    answer = loaded.signatures["top_k"](history=tf.constant([[1, 4, 7]], tf.int64), k=tf.constant(3))
    assert answer["item_ids"].shape == (1, 3)
    prepared = tmp_path / "out" / "prepared"
    model = training.load_model(tmp_path / "out" / "run" / "model")
    test, _ = read_eval_examples(str(prepared / "test-*"))
    expected = evaluate_full_ranking(
        lambda histories, rows: model.score_all({"history": histories}), test, num_items=60,
        max_length=12, ks=(5, 10), mask_history=True,
        item_popularity=record_counts(str(prepared / "train-*"), 60)[1])
    assert summary["test"]["targets_in_history"] == 0
    for key in ("HR@5", "NDCG@10", "MRR@10", "Coverage@10", "TailRecall@10"):
        assert summary["test"][key] == pytest.approx(expected[key], abs=1e-9), key

    # A second run publishes the next version beside the first.
    second = run_pipeline(config, str(tmp_path / "out2"), str(tmp_path / "models"), k_max=10, item_shards=2)
    assert second["published"] == str(tmp_path / "models" / "2")


def test_an_interrupted_run_resumes_keeping_the_stages_it_finished(events, tmp_path, monkeypatch):
    """An interrupted run could only be refused ("not empty") or deleted and run again from the
    start (--overwrite), its finished prepare, training and index thrown away."""
    from tfx_xmatch.pipelines import build_index, evaluate, run

    calls = {"prepare": 0, "build_index": 0, "evaluate": 0}

    def counted(name, function, interrupt_first=False):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            if interrupt_first and calls[name] == 1:
                raise KeyboardInterrupt()
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(run, "run_prepare", counted("prepare", run.run_prepare))
    monkeypatch.setattr(build_index, "run_build_index", counted("build_index", build_index.run_build_index))
    monkeypatch.setattr(evaluate, "run_evaluate", counted("evaluate", evaluate.run_evaluate, interrupt_first=True))
    config = load_config(None, [f"data.dataset={events}", *OVERRIDES])
    output, models = str(tmp_path / "out"), str(tmp_path / "models")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, output, models, k_max=10, item_shards=2)
    assert not (tmp_path / "models").exists()
    history = (tmp_path / "out" / "run" / "history.json").read_text()

    with pytest.raises(ConfigError, match="pass --resume to go on"):
        run_pipeline(config, output, models, k_max=10, item_shards=2)
    with pytest.raises(ConfigError, match="other settings or inputs.*: item_shards differs"):
        run_pipeline(config, output, models, k_max=10, item_shards=3, resume=True)
    longer = load_config(None, [f"data.dataset={events}", *OVERRIDES, "train.epochs=3"])
    with pytest.raises(ConfigError, match="config.train differs"):
        run_pipeline(longer, output, models, k_max=10, item_shards=2, resume=True)
    with pytest.raises(ConfigError, match="holds no pipeline run to resume"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        run_pipeline(config, str(tmp_path / "other"), models, k_max=10, item_shards=2, resume=True)

    summary = run_pipeline(config, output, models, k_max=10, item_shards=2, resume=True)
    assert calls == {"prepare": 1, "build_index": 1, "evaluate": 2}
    assert (tmp_path / "out" / "run" / "history.json").read_text() == history  # not trained again
    assert summary["published"] == str(tmp_path / "models" / "1")
    assert summary["index"]["wall_seconds"] > 0  # the kept build's, as an uninterrupted run reports it
    assert sorted(path.name for path in (tmp_path / "out" / "staging").iterdir()) == ["1"]
    # Resumed once more, a finished run publishes nothing new.
    assert run_pipeline(config, output, models, k_max=10, item_shards=2, resume=True) == summary
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["1"]


def test_nothing_is_published_when_a_stage_cannot_run(events, tmp_path):
    config = load_config(None, [f"data.dataset={events}", *OVERRIDES])
    with pytest.raises(ConfigError, match="k_max=5"):
        run_pipeline(config, str(tmp_path / "out"), str(tmp_path / "models"), k_max=5)
    with pytest.raises(ConfigError, match="side_info"):
        run_pipeline(load_config(None, [f"data.dataset={events}", *OVERRIDES, "data.side_info=true"]),
                     str(tmp_path / "out"), str(tmp_path / "models"))
    with pytest.raises(ConfigError, match="'synthetic' is generated"):
        run_pipeline(load_config(None, ["data.dataset=synthetic"]), str(tmp_path / "out"), str(tmp_path / "models"))
    with pytest.raises(ConfigError, match="'soft_search' serves model.name='sparc' only, got 'two_tower'"):
        run_pipeline(config, str(tmp_path / "out"), str(tmp_path / "models"), index_kind="soft_search")
    # A misspelt or mistyped index option once failed at the export stage, after training.
    with pytest.raises(ConfigError, match="index kind 'partitioned' takes no option 'num_partitons'"):
        run_pipeline(config, str(tmp_path / "out"), str(tmp_path / "models"), index_kind="partitioned",
                     index_options={"num_partitons": 4})
    with pytest.raises(ConfigError, match="num_partitions must be an integer >= 1, got 'abc'"):
        run_pipeline(config, str(tmp_path / "out"), str(tmp_path / "models"), index_kind="partitioned",
                     index_options={"num_partitions": "abc"})
    # A misspelt model option or name failed at the train stage, after the prepare stage.
    for override, message in [("model.options.colour=1", r"model.options \['colour'\] are not arguments"),
                              ("model.name=dssm", "unknown model 'dssm'")]:
        with pytest.raises(ConfigError, match=message):
            run_pipeline(load_config(None, [f"data.dataset={events}", *OVERRIDES, override]),
                         str(tmp_path / "out"), str(tmp_path / "models"))
    assert not (tmp_path / "out").exists()
    # A padding id that is a real item id would fail the export stage: refused before training.
    real_id = int(events.read_text().split()[1])
    with pytest.raises(ConfigError, match=rf"padding_id {real_id} is also a real item id"):
        run_pipeline(config, str(tmp_path / "padded"), str(tmp_path / "models"), k_max=10, padding_id=real_id)
    assert not (tmp_path / "padded" / "run").exists()
    # A URL working directory became a local "gs:/..." directory, and the run "succeeded".
    with pytest.raises(ConfigError, match="output_dir 'gs://bucket/out' is a URL"):
        run_pipeline(config, "gs://bucket/out", str(tmp_path / "models"))
    assert not pathlib.Path("gs:").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "run").mkdir()
    with pytest.raises(ConfigError, match="is not empty"):
        run_pipeline(config, str(tmp_path / "used"), str(tmp_path / "models"))
    # An overwrite whose input is missing keeps the earlier run (it was once deleted first).
    typo = load_config(None, [f"data.dataset={events}.typo", *OVERRIDES])
    with pytest.raises(FileNotFoundError, match=r"\.typo' matches no file"):
        run_pipeline(typo, str(tmp_path / "used"), str(tmp_path / "models"), overwrite=True)
    assert (tmp_path / "used" / "run").is_dir()
    assert not (tmp_path / "models").exists()


def test_command_line_reports_bad_stage_and_input(tmp_path, capsys):
    assert cli.main(["nonsense"]) == 2
    assert "unknown stage 'nonsense'" in capsys.readouterr().err
    assert cli.main(["prepare", "--input", str(tmp_path / "none*.txt"), "--format", "pairs",
                     "--output-dir", str(tmp_path)]) == 2
    assert "matches no file" in capsys.readouterr().err


DATA_DIR = shared_data_dir()  # $XMATCH_DATA_DIR, else ../shared/data


@pytest.mark.skipif(not (DATA_DIR / "ml-100k" / "u.data").is_file(), reason="ML-100K not under ../shared/data")
def test_run_on_movielens_100k_matches_the_in_process_code(tmp_path):
    """Every Beam stage on real data: prepare, build_index and evaluate equal the in-process code."""
    from tfx_xmatch.data import load_dataset, make_split, write_split_tfrecords

    config = load_config(None, ["data.dataset=ml-100k", f"data.data_dir={DATA_DIR}", "model.embedding_dim=16",
                                "model.max_length=30", "model.num_blocks=1", "train.epochs=1", "train.verbose=0",
                                "train.batch_size=256", "eval.ks=[10,50]"])
    summary = run_pipeline(config, str(tmp_path / "out"), str(tmp_path / "models"), num_shards=2, item_shards=4)
    prepared, run_dir = tmp_path / "out" / "prepared", tmp_path / "out" / "run"

    expected = tmp_path / "in-process"
    write_split_tfrecords(make_split(load_dataset("ml-100k", str(DATA_DIR), side_info=False), "leave_one_out"),
                          str(expected), num_shards=2)
    for name in ("train-00001-of-00002.tfrecord", "test-00000-of-00002.tfrecord", "item_vocab.json",
                 "statistics.json"):
        assert (prepared / name).read_bytes() == (expected / name).read_bytes(), name

    model = training.load_model(run_dir / "model")
    np.testing.assert_allclose(np.load(tmp_path / "out" / "index" / "item_embeddings.npy"),
                               model.item_embeddings().numpy(), rtol=1e-6, atol=1e-6)
    test, _ = read_eval_examples(str(prepared / "test-*"))
    metrics = evaluate_full_ranking(
        lambda histories, rows: model.score_all({"history": histories}), test, num_items=1682, max_length=30,
        ks=(10, 50), mask_history=True, item_popularity=record_counts(str(prepared / "train-*"), 1682)[1])
    assert summary["test"]["num_examples"] == 943 and summary["test"]["targets_in_history"] == 0
    for key in ("HR@10", "NDCG@10", "Recall@50", "Coverage@50", "TailRecall@50"):
        assert summary["test"][key] == pytest.approx(metrics[key], abs=1e-9), key


def _staged(tmp_path) -> pathlib.Path:
    staged = tmp_path / "staged"
    (staged / "variables").mkdir(parents=True)
    (staged / "saved_model.pb").write_bytes(b"graph")
    (staged / "variables" / "variables.index").write_bytes(b"index")
    return staged


def test_publish_to_an_object_store_path_goes_through_tf_io_gfile(tmp_path):
    from tfx_xmatch.pipelines.run import publish

    staged = _staged(tmp_path)
    base = f"ram://models-{tmp_path.name}"
    assert publish(staged, base) == f"{base}/1"
    assert publish(staged, base + "/") == f"{base}/2"
    assert tf.io.gfile.exists(f"{base}/2/variables/variables.index")
    assert not pathlib.Path("ram:").exists()  # pathlib once made such paths local directories
    # Locally: renamed into place whole, readable by a server running as another user.
    local = publish(staged, str(tmp_path / "models"))
    umask = os.umask(0)
    os.umask(umask)
    assert local == tmp_path / "models" / "1" and (local / "saved_model.pb").read_bytes() == b"graph"
    assert local.stat().st_mode & 0o777 == 0o777 & ~umask
    assert [path.name for path in (tmp_path / "models").iterdir()] == ["1"]


@pytest.mark.parametrize("failing", ["copy", "rename"])
def test_a_failed_publish_to_an_object_store_leaves_no_version(failing, tmp_path, monkeypatch):
    """A half-copied version stayed: every server failed to load it and later publishes skipped
    it. The upload (copy) or the move into the version's number (rename) fails on the graph."""
    from tfx_xmatch.pipelines.run import publish

    staged = _staged(tmp_path)
    base = f"ram://publish-{failing}-{tmp_path.name}"
    assert publish(staged, base) == f"{base}/1"
    real = getattr(tf.io.gfile, failing)

    def connection_reset(source, destination, overwrite=False):
        if destination.endswith("saved_model.pb"):
            raise tf.errors.UnavailableError(None, None, "connection reset")
        return real(source, destination, overwrite=overwrite)

    monkeypatch.setattr(tf.io.gfile, failing, connection_reset)
    with pytest.raises(tf.errors.UnavailableError):
        publish(staged, base)
    monkeypatch.undo()
    assert [name.rstrip("/") for name in tf.io.gfile.listdir(base)] == ["1"]
    assert publish(staged, base) == f"{base}/2"


def test_a_model_base_path_that_is_a_file_is_refused_before_the_stages(events, tmp_path):
    """All five stages ran (~20 s), then the publish failed with a NotADirectoryError traceback
    naming a temporary under the file; an output directory with [ ] in its name was written,
    then its checkpoints and records could not be read back."""
    config = load_config(None, [f"data.dataset={events}", *OVERRIDES])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"model_base_path '.*afile' is a file, not a directory"):
        run_pipeline(config, str(tmp_path / "out"), str(tmp_path / "afile"), k_max=10)
    with pytest.raises(ValueError, match=r"output_dir '.*exp\[1\]': .* holds \[, \* or \?"):
        run_pipeline(config, str(tmp_path / "exp[1]"), str(tmp_path / "models"), k_max=10)
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # no stage ran
