"""RunConfig loading: files, overrides, and errors that name the bad key or value."""

import json
import re

import pytest

from tfx_xmatch.config import ConfigError, RunConfig, config_from_dict, load_config


def test_defaults_without_a_file():
    config = load_config()
    assert config == RunConfig()
    assert config.model.user_tower == "sasrec" and config.eval.mask_history is True


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  dataset: ml-1m\nmodel:\n  embedding_dim: 32\ntrain:\n  learning_rate: 1\n")
    config = load_config(path, ["model.embedding_dim=48", "eval.ks=[5, 10]", "data.synthetic={num_users: 9}"])
    assert config.data.dataset == "ml-1m"
    assert config.model.embedding_dim == 48
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
    assert config.eval.ks == [5, 10]
    assert config.data.synthetic == {"num_users": 9}


def test_json_file_and_dict_round_trip(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"train": {"epochs": 3, "max_train_seconds": None}}))
    config = load_config(path)
    assert config.train.epochs == 3
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.embeding_dim=3", "unknown config key 'model.embeding_dim'"),
        ("nosection.x=1", "unknown config key 'nosection.x'"),
        ("train.epochs=ten", "train.epochs must be of type int, got 'ten'"),
        ("train.epochs=true", "train.epochs must be an integer, got True"),
        ("eval.mask_history=3", "eval.mask_history must be true or false, got 3"),
        ("train.epochs", "must look like section.key=value"),
        # Ranges, checked before anything trains (they failed inside Keras or after an epoch).
        ("train.epochs=-1", "train.epochs must be at least 1, got -1"),
        ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
        ("train.validation_every=0", "train.validation_every must be at least 1, got 0"),
        ("eval.batch_size=0", "eval.batch_size must be at least 1, got 0"),
        ("train.learning_rate=-0.01", "train.learning_rate must be a finite number >= 0, got -0.01"),
        ("train.learning_rate=.nan", "train.learning_rate must be a finite number >= 0, got nan"),
        ("train.early_stopping_patience=-1", "train.early_stopping_patience must be >= 0 (0: never stop early), got -1"),
        ("train.max_train_seconds=0", "train.max_train_seconds must be a positive number of seconds"),
        ("train.verbose=3", "train.verbose must be 0, 1 or 2, got 3"),
        ("train.warm_start=''", "train.warm_start must be a run, saved model or serving SavedModel directory, "
                                "or null (train from scratch), got ''"),
        ("train.warm_start=3", "train.warm_start must be of type str, got 3"),
        ("eval.ks=[0, 10]", "eval.ks must be a non-empty list of integers >= 1, got [0, 10]"),
        ("eval.ks=[a, 10]", "eval.ks must be a non-empty list of integers >= 1, got ['a', 10]"),
        ("train.monitor=NDCG@5", "train.monitor must be METRIC@K with METRIC one of ['HR', 'Recall', 'NDCG', 'MRR', "
                                 "'P', 'TailRecall', 'Coverage'] and K one of eval.ks=[1, 10, 20, 50], got 'NDCG@5'"),
        ("train.monitor=ndcg@10", "train.monitor must be METRIC@K"),
    ],
)
def test_bad_overrides_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_bad_file_names_the_file(tmp_path):
    """And the line, in one line of text: PyYAML's report placed it in "<unicode string>", and
    a file that is not UTF-8 was only "'utf-8' codec can't decode byte 0xe9 in position 27"."""
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(
            "bad.yaml: not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1 "
            "(while parsing a flow sequence at line 1, column 8)")):
        load_config(path)
    path.write_text("train:\n\tepochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML: found character '\\t' .* at line 2, column 1"):
        load_config(path)
    path.write_bytes(b"train:\n  epochs: 3  # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: not valid UTF-8 \(byte 0xe9 at column 19\)"):
        load_config(path)
    json_path = tmp_path / "bad.json"
    json_path.write_text('{"train":\n {"epochs": 3,}}')
    with pytest.raises(ConfigError, match=r"bad.json:2: not valid JSON: Expecting property name .* \(column 15\)"):
        load_config(json_path)
    path.write_text("model:\n  layers: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.layers'"):
        load_config(path)


def test_a_config_file_that_is_empty_a_directory_or_repeats_a_key_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty.yaml: the config file is empty"):
        load_config(empty)  # it used to train the synthetic defaults for 200 epochs
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    repeated = tmp_path / "dup.yaml"
    repeated.write_text("train:\n  epochs: 9\n  epochs: 10\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'epochs' is given twice in one mapping \(line 3\)"):
        load_config(repeated)
    repeated_json = tmp_path / "dup.json"
    repeated_json.write_text('{"train": {"epochs": 9, "epochs": 10}}')
    with pytest.raises(ConfigError, match="dup.json: key 'epochs' is given twice in one mapping"):
        load_config(repeated_json)


def test_a_byte_order_mark_is_read_in_json_as_in_yaml(tmp_path):
    for name, text in (("bom.json", '{"train": {"epochs": 3}}'), ("bom.yaml", "train:\n  epochs: 3\n")):
        path = tmp_path / name
        path.write_bytes("\ufeff".encode() + text.encode())
        assert load_config(path).train.epochs == 3, name


def test_missing_file(tmp_path, monkeypatch):
    from tfx_xmatch import config

    with pytest.raises(FileNotFoundError, match="config file '/nonexistent/run.yaml' does not exist$"):
        load_config("/nonexistent/run.yaml")
    # A README command run outside the checkout names the copy the wheel installed.
    monkeypatch.chdir(tmp_path)
    installed = tmp_path / "share"
    installed.mkdir()
    monkeypatch.setattr(config, "SHIPPED_CONFIGS", (tmp_path / "prefix", installed))
    (installed / "ml1m_sasrec.yaml").write_text("train: {epochs: 3}\n")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"config file 'configs/ml1m_sasrec.yaml' does not exist; the shipped ml1m_sasrec.yaml is installed at "
            f"{installed / 'ml1m_sasrec.yaml'}")):
        load_config("configs/ml1m_sasrec.yaml")


def test_the_wheel_installs_every_config_the_readme_names():
    """setup.py's data_files hold every config of configs/, among them each one the README's
    commands name, for an install without the checkout."""
    import setuptools

    from tests.conftest import REPO_ROOT

    captured = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
        patch.chdir(REPO_ROOT)
        exec(compile((REPO_ROOT / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
    (target, files), = captured["data_files"]
    assert target == "share/tfx_xmatch/configs"
    assert files == sorted(f"configs/{path.name}" for path in (REPO_ROOT / "configs").glob("*.yaml"))
    named = set(re.findall(r"configs/[a-z0-9_]+\.yaml", (REPO_ROOT / "README.md").read_text()))
    assert named and named <= set(files), named - set(files)


def test_shipped_configs_load():
    from tests.conftest import REPO_ROOT

    paths = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    assert paths, "configs/ should ship example configurations"
    for path in paths:
        load_config(path)


def test_the_sasrec_config_holds_the_reference_settings():
    """configs/ml1m_sasrec.yaml is what benchmarks/quality.py trains: SASRec's published setup."""
    from tests.conftest import REPO_ROOT

    shipped = load_config(REPO_ROOT / "configs" / "ml1m_sasrec.yaml")
    model = shipped.model
    assert (model.user_tower, model.embedding_dim, model.num_blocks, model.num_heads, model.max_length,
            model.loss) == ("sasrec", 64, 2, 1, 200, "full_softmax")
    assert (shipped.data.dataset, shipped.data.split) == ("ml-1m", "leave_one_out")


def test_overrides_read_scientific_floats_and_hashes_in_paths_and_share_nothing():
    # PyYAML reads "1e-3" as a string (YAML 1.1), and " #" started a comment that cut a path.
    config = load_config(None, ["train.learning_rate=1e-3", "model.options.rate=2.5E-4",
                                "data.data_dir=/mnt/my data #2"])
    assert config.train.learning_rate == 0.001 and config.model.options["rate"] == 0.00025
    assert config.data.data_dir == "/mnt/my data #2"
    raw = {"eval": {"ks": [10]}}
    config_from_dict(raw).eval.ks.append(5)
    assert raw == {"eval": {"ks": [10]}}  # the config once shared the caller's list


def test_a_config_file_at_a_url_is_read_through_tf_io_gfile(tmp_path):
    # A TFX custom_config naming gs://.../run.yaml failed as a missing local "gs:/..." file.
    import tensorflow as tf

    url = f"ram://configs-{tmp_path.name}/run.yaml"
    with tf.io.gfile.GFile(url, "w") as handle:
        handle.write("train: {epochs: 7}\n")
    assert load_config(url).train.epochs == 7
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(f"ram://configs-{tmp_path.name}/missing.yaml")
