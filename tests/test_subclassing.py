"""A user's own classes, TFRS style.

A subclass of a built-in model (its own layer and argument) goes through save_model,
load_model, warm starts and the export as itself, or is refused by name: it was saved as its
built-in base class and came back without its layer, or failed to load with "Keyword argument
not understood". An index kind written as ``RetrievalIndex``'s docstring says is exported by
name and follows a re-index in functions traced before it.
"""

import functools
import importlib
import json
import re
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from tfx_xmatch import cli, training
from tfx_xmatch.config import ConfigError, load_config
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.export import check_export_settings, export_retrieval_model
from tfx_xmatch.index import INDEX_KINDS, RetrievalIndex, make_index
from tfx_xmatch.models import SparCode, TwoTower
from tfx_xmatch.pipelines.build_index import load_sparse_code_index, run_build_index
from tfx_xmatch.warm_start import warm_start
from tests.test_training import TINY

NUM_ITEMS, LENGTH = 20, 5
HISTORY = tf.constant([[0, 1, 2, 3, 4], [0, 0, 5, 6, 7]], tf.int32)


@tf.keras.utils.register_keras_serializable(package="test_subclassing")
class HeadTwoTower(TwoTower):
    """A two-tower with a dense head on the user side and an argument of its own."""

    def __init__(self, *args, head_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_scale = head_scale
        self.user_head = tf.keras.layers.Dense(self.embedding_dim, name="user_head")

    def encode_sequence(self, inputs, training=False):
        return self.head_scale * self.user_head(super().encode_sequence(inputs, training=training))

    def get_config(self):
        return {**super().get_config(), "head_scale": self.head_scale}


class UnregisteredTwoTower(HeadTwoTower):
    pass


def _trained(cls):
    tf.keras.utils.set_random_seed(0)
    model = cls(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, head_scale=2.0)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    data = {"history": HISTORY, "next_items": tf.roll(HISTORY, -1, axis=1) * tf.cast(HISTORY > 0, tf.int32)}
    model.fit(tf.data.Dataset.from_tensors(data), epochs=2, verbose=0)
    return model


def test_a_registered_subclass_is_saved_loaded_warm_started_and_exported_as_itself(tmp_path):
    model = _trained(HeadTwoTower)
    expected = model.score_all({"history": HISTORY}).numpy()
    vocab = Vocabulary(list(range(1, NUM_ITEMS + 1)))
    training.save_model(model, tmp_path / "saved", vocab)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model"] == "test_subclassing>HeadTwoTower"
    loaded = training.load_model(tmp_path / "saved")
    assert type(loaded) is HeadTwoTower and loaded.head_scale == 2.0
    np.testing.assert_allclose(loaded.score_all({"history": HISTORY}).numpy(), expected, rtol=1e-6)

    export = export_retrieval_model(model, vocab, tmp_path / "serving", k_max=5)
    fresh = HeadTwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, head_scale=2.0)
    fresh.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    fresh.build_all_variables()
    warm_start(fresh, str(export), 1e-3)  # failed: "user_head.bias is missing" from the source
    np.testing.assert_allclose(fresh.score_all({"history": HISTORY}).numpy(), expected, rtol=1e-6)

    plain = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH)
    plain.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    plain.build_all_variables()
    with pytest.raises(Exception, match="holds a 'test_subclassing>HeadTwoTower' model; this run trains a 'two_tower'"):
        warm_start(plain, str(export), 1e-3)


USER_MODULE = """
import tensorflow as tf
from tfx_xmatch.models import TwoTower


@tf.keras.utils.register_keras_serializable(package="user_models")
class ScaledTwoTower(TwoTower):
    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def encode_sequence(self, inputs, training=False):
        return self.scale * super().encode_sequence(inputs, training=training)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}
"""


def _forget(module_name, registered_name):
    """As a new process (an ``xmatch`` command, a Beam worker) starts: neither the user's module
    nor its Keras registration is there."""
    sys.modules.pop(module_name, None)
    tf.keras.utils.get_custom_objects().pop(registered_name, None)


def test_a_subclass_is_loaded_by_a_process_that_never_imported_its_module(tmp_path, monkeypatch):
    """It was refused with "import the module that registers it": `xmatch export`, `xmatch
    evaluate` and the Beam workers, which load saved runs, could not load a user's model at all."""
    (tmp_path / "user_models_1.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    user_models = importlib.import_module("user_models_1")
    model = user_models.ScaledTwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, scale=3.0)
    model.build_all_variables()
    expected = model.score_all({"history": HISTORY}).numpy()
    training.save_model(model, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["model"], saved["module"]) == ("user_models>ScaledTwoTower", "user_models_1")
    _forget("user_models_1", "user_models>ScaledTwoTower")

    loaded = training.load_model(tmp_path / "saved")
    assert type(loaded).__name__ == "ScaledTwoTower" and loaded.scale == 3.0
    np.testing.assert_allclose(loaded.score_all({"history": HISTORY}).numpy(), expected, rtol=1e-6)

    _forget("user_models_1", "user_models>ScaledTwoTower")
    (tmp_path / "user_models_1.py").rename(tmp_path / "moved_away.py")
    with pytest.raises(ValueError, match=r"config.json: the model 'user_models>ScaledTwoTower' is defined in the "
                                         r"module 'user_models_1': the module 'user_models_1' is not found; install "
                                         r"it or add its directory to PYTHONPATH\.$"):
        training.load_model(tmp_path / "saved")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "user_models_1.py").write_text("import a_dependency_not_installed\n")
    monkeypatch.chdir(tmp_path / "cwd")  # where the file is, but not on the path: the xmatch command
    with pytest.raises(ValueError, match="It is in the current directory, which the xmatch command does not search"):
        training.load_model(tmp_path / "saved")
    monkeypatch.syspath_prepend(str(tmp_path / "cwd"))
    with pytest.raises(ValueError, match="importing the module 'user_models_1' failed: No module named "
                                         "'a_dependency_not_installed'"):
        training.load_model(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text(json.dumps({**saved, "module": "__main__"}))
    with pytest.raises(ValueError, match=r"was defined in a script \(__main__\), which this process cannot import"):
        training.load_model(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text(json.dumps({**saved, "module": "json"}))
    with pytest.raises(ValueError, match="no such class is registered by its module 'json'"):
        training.load_model(tmp_path / "saved")


def test_xmatch_trains_a_subclass_named_by_its_import_path_and_other_processes_export_and_evaluate_it(
        tmp_path, monkeypatch, capsys):
    """`model.name` took the four built-in names only: a user's subclass could not be trained by
    `xmatch train` (nor by the TFX Trainer or `xmatch pipeline run`, which build models with the
    same `training.build_model`; not run here), and so never reached `xmatch export`."""
    (tmp_path / "user_models_2.py").write_text(USER_MODULE + UNREGISTERED)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--run-dir", str(run_dir), *[f"--set={o}" for o in TINY],
                     "--set=model.name=user_models_2.ScaledTwoTower", "--set=model.options.scale=2.0"]) == 0
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert (saved["model"], saved["module"], saved["config"]["scale"]) == ("user_models>ScaledTwoTower",
                                                                           "user_models_2", 2.0)
    _forget("user_models_2", "user_models>ScaledTwoTower")
    assert cli.main(["evaluate", "--run-dir", str(run_dir), "--output", str(tmp_path / "metrics.json")]) == 0
    trained = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert json.loads((tmp_path / "metrics.json").read_text())["HR@10"] == trained["HR@10"]
    _forget("user_models_2", "user_models>ScaledTwoTower")
    assert cli.main(["export", "--run-dir", str(run_dir), "--export-base-path", str(tmp_path / "serving"),
                     "--k-max", "5"]) == 0
    assert json.loads((tmp_path / "serving" / "1" / training.SERVING_MODEL_DESCRIPTION).read_text())["module"] == \
        "user_models_2"

    capsys.readouterr()
    for name, options, message in [
            ("user_models_2.Missing", [], "user_models_2.Missing is missing"),
            ("nowhere_at_all.ScaledTwoTower", [], "the module 'nowhere_at_all' is not found"),
            ("json.JSONDecoder", [], "json.JSONDecoder is not a subclass of a tfx_xmatch model"),
            ("user_models_2.UnregisteredTwoTower", [], "is not registered with Keras"),
            ("dssm", [], r"unknown model 'dssm' \(model.name\)"),
            ("user_models_2.ScaledTwoTower", ["--set=model.options.scal=2.0"], r"it accepts \[.*'scale'"),
            ("user_models_2.ScaledTwoTower", ["--set=model.options.scale=big"], "model.options.scale must be"),
            ("user_models_2.ScaledTwoTower", ["--set=model.options.num_codewords=8"],
             r"not arguments of model 'ScaledTwoTower'")]:
        assert cli.main(["train", "--run-dir", str(tmp_path / "refused"), *[f"--set={o}" for o in TINY],
                         f"--set=model.name={name}", *options]) == 2, name
        error = capsys.readouterr().err
        assert re.search(message, error), (name, error)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match=r"serves model.name='sparcode' only, got 'user_models_2.ScaledTwoTower' \(a subclass of SparCode"):
        check_export_settings("user_models_2.ScaledTwoTower", "sparse_code")
    check_export_settings(f"{__name__}.PlainSparCode", "sparse_code")


UNREGISTERED = """

class UnregisteredTwoTower(TwoTower):
    pass
"""


@tf.keras.utils.register_keras_serializable(package="test_subclassing")
class PlainSparCode(SparCode):
    pass


def test_the_beam_index_build_finds_the_codes_of_a_registered_sparcode_subclass(tmp_path):
    """It tested the saved name against "sparcode": a subclass got no posting lists, and a budget
    was refused as asked of a model "without codes"."""
    model = PlainSparCode(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, num_codewords=8,
                          num_query_tokens=2)
    model.build_all_variables()
    training.save_model(model, tmp_path / "run" / "model", Vocabulary(list(range(1, NUM_ITEMS + 1))))
    summary = run_build_index(tmp_path / "run", tmp_path / "index", cache_fraction=0.5, batch_size=8)
    assert (tmp_path / "index" / "sparse_code_index.npz").exists(), summary
    assert load_sparse_code_index(tmp_path / "index", k_max=5).num_candidates == NUM_ITEMS


def test_an_unregistered_subclass_is_refused_before_anything_is_written(tmp_path):
    model = _trained(UnregisteredTwoTower)
    vocab = Vocabulary(list(range(1, NUM_ITEMS + 1)))
    refused = r"test_subclassing.UnregisteredTwoTower is a subclass of a tfx_xmatch model, but not registered"
    with pytest.raises(ValueError, match=refused):
        training.save_model(model, tmp_path / "saved", vocab)
    with pytest.raises(ValueError, match=refused):
        export_retrieval_model(model, vocab, tmp_path / "serving", k_max=5)
    assert not list(tmp_path.iterdir())


def test_a_saved_subclass_whose_module_is_not_imported_is_named(tmp_path):
    model = _trained(HeadTwoTower)
    training.save_model(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    del config["module"]  # as a run saved before the module was recorded
    (tmp_path / "saved" / "config.json").write_text(json.dumps({**config, "model": "elsewhere>HeadTwoTower"}))
    with pytest.raises(ValueError, match="'elsewhere>HeadTwoTower' has the form of a registered Keras class's name, "
                                         "but no such class is registered in this process, and the config names no "
                                         r"module that defines it \(saved before modules were recorded; saving it "
                                         r"again records it\): import the module"):
        training.load_model(tmp_path / "saved")


@tf.keras.utils.register_keras_serializable(package="test_subclassing")
class ColumnIndex(RetrievalIndex):
    """Exact, written from RetrievalIndex's docstring: the catalogue stored as [d, N] columns."""

    def __init__(self, k_max: int = 100, **kw):
        super().__init__(k_max=k_max, **kw)
        self.columns = None

    def _index(self, candidates):
        return functools.partial(self._assign_states, {"columns": tf.transpose(candidates)})

    def _top_k(self, queries, k):
        scores = tf.matmul(queries, self.columns)
        return tf.math.top_k(scores, k=tf.minimum(k, tf.shape(scores)[1]))

    def is_exact(self):
        return True


def test_an_index_kind_of_ones_own_is_exported_by_name_and_follows_a_re_index(tmp_path, monkeypatch):
    monkeypatch.setitem(INDEX_KINDS, "columns", ColumnIndex)
    model = _trained(HeadTwoTower)
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    request = {"history": tf.constant([["item-1", "item-2", ""]]), "k": tf.constant(4)}
    answers = [tf.saved_model.load(str(export_retrieval_model(model, vocab, tmp_path / kind, index_kind=kind,
                                                               k_max=5))).signatures["top_k"](**request)
               for kind in ("columns", "brute_force")]
    np.testing.assert_array_equal(answers[0]["item_ids"].numpy(), answers[1]["item_ids"].numpy())
    np.testing.assert_allclose(answers[0]["scores"].numpy(), answers[1]["scores"].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="index kind 'columns' takes no option 'kw'; its options: exclude_padding, k, "
                                         "k_max, padding_identifier$"):  # its **kw, listed as an option
        make_index("columns", kw=1)

    index = ColumnIndex(k_max=3).index(tf.eye(4), tf.constant([10, 11, 12, 13], tf.int64))
    search = tf.function(lambda queries: index(queries, k=tf.constant(1)))
    query = tf.constant([[0.0, 1.0, 0.0, 0.0]])
    assert search(query)[1].numpy().tolist() == [[11]]
    # Another catalogue size, stored in place: the function traced before answers from it.
    index.index(tf.concat([tf.eye(4)[::-1], tf.zeros([1, 4])], 0), tf.constant([20, 21, 22, 23, 24], tf.int64))
    assert search(query)[1].numpy().tolist() == [[22]] and search.experimental_get_tracing_count() == 1


class Mixin:
    def __init__(self, *args, extra: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = extra


@tf.keras.utils.register_keras_serializable(package="test_subclassing")
class OptionsTwoTower(Mixin, TwoTower):
    """Arguments a user's subclass may add: required and keyword-only, annotated against an int
    default, from a mixin."""

    def __init__(self, *args, scale: float, ratio: float = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale, self.ratio = scale, ratio


@tf.keras.utils.register_keras_serializable(package="test_subclassing")
class FixedTwoTower(TwoTower):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, l2=0.0, **kwargs)  # l2 is a model.* field: build_model passes it too


@tf.keras.utils.register_keras_serializable(package="test_subclassing")
class NoneDefaultSparCode(SparCode):
    def __init__(self, *args, num_codewords=None, **kwargs):
        super().__init__(*args, num_codewords=num_codewords or 8, **kwargs)


@pytest.mark.parametrize("name, options, message", [
    ("OptionsTwoTower", {"ratio": 0.5}, r"needs model.options \['scale'\]"),
    ("OptionsTwoTower", {"scale": "big"}, "model.options.scale must be a number, got 'big'"),
    ("OptionsTwoTower", {"scale": None}, "model.options.scale must be a number, got None"),
    ("OptionsTwoTower", {"scale": 2.0, "extra": "x"}, "model.options.extra must be like its default 0.5"),
    ("OptionsTwoTower", {"scale": 2.0, "max_loss_positions": 8}, "duplicates model.max_loss_positions"),
    ("NoneDefaultSparCode", {"num_codewords": "lots"}, "model.options.num_codewords must be an int or null"),
    ("FixedTwoTower", {}, r"model 'FixedTwoTower' cannot be built from model.options \{\}: .*got multiple values "
                          "for keyword argument 'l2'"),
])
def test_a_subclass_options_are_checked_against_its_own_and_its_bases_annotations(name, options, message):
    """Reviewed: a required `scale: float` took 'big' and failed in a traceback, a float argument
    with the default 1 refused 0.5, a mixin's argument was unknown, and a constructor's TypeError
    was a traceback."""
    config = load_config(None, [*TINY, f"model.name={__name__}.{name}"])
    config.model.options = options
    with pytest.raises(ConfigError, match=message):
        training.build_model(config, num_items=NUM_ITEMS)


def test_a_subclass_takes_its_annotated_mixin_and_none_default_options():
    config = load_config(None, [*TINY, f"model.name={__name__}.OptionsTwoTower"])
    config.model.options = {"scale": 2, "ratio": 0.5, "extra": 0.25}
    model = training.build_model(config, num_items=NUM_ITEMS)
    assert (model.scale, model.ratio, model.extra) == (2.0, 0.5, 0.25)
    config = load_config(None, [*TINY, f"model.name={__name__}.NoneDefaultSparCode"])
    config.model.options = {"num_codewords": None}
    assert training.build_model(config, num_items=NUM_ITEMS).num_codewords == 8


def test_a_class_of_a_module_run_with_python_m_is_recorded_under_the_modules_name(monkeypatch):
    """It was recorded as __main__, which other processes refused to import."""
    cls = type("MainTwoTower", (TwoTower,), {"__module__": "__main__"})
    tf.keras.utils.register_keras_serializable(package="test_subclassing_main")(cls)
    model = cls(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH)
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", types.SimpleNamespace(name="revpkg.trainer"),
                        raising=False)
    assert training.model_description(model)["module"] == "revpkg.trainer"
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # a script: python trainer.py
    assert training.model_description(model)["module"] == "__main__"


class AuxiliaryLossTwoTower(TwoTower):
    """A loss term of one's own whose layer only the loss calls: Keras builds it at the first
    train step, after ``build_all_variables``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.auxiliary = tf.keras.layers.Dense(1, name="auxiliary")

    def compute_loss(self, inputs, training=False):
        users = self.user_embedding(inputs, training=training)
        return super().compute_loss(inputs, training=training) + 0.1 * tf.reduce_mean(tf.square(self.auxiliary(users)))


def test_a_layer_that_only_a_subclass_loss_builds_is_trained():
    """fit creates the optimizer's slots before tracing its step, from the variables that exist
    then; a subclass's loss-only layer, built inside the step, must still be trained."""
    tf.keras.utils.set_random_seed(0)
    model = AuxiliaryLossTwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    data = {"history": HISTORY, "next_items": tf.roll(HISTORY, -1, axis=1) * tf.cast(HISTORY > 0, tf.int32)}
    history = model.fit(tf.data.Dataset.from_tensors(data).repeat(3), epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"])), history
    first = model.auxiliary.kernel.numpy()
    model.fit(tf.data.Dataset.from_tensors(data), epochs=1, verbose=0)
    assert not np.array_equal(first, model.auxiliary.kernel.numpy())
