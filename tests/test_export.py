"""SavedModel export: answers equal a NumPy oracle over the in-process model, before and after
reload, in a fresh TensorFlow-only process, with clear errors for bad requests."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs
from tensorflow.core.protobuf import saved_model_pb2

from tfx_xmatch.data.dataset import check_user_feature_names, pad_histories
from tfx_xmatch.data.tfrecord import feature_spec
from tfx_xmatch.data.vocabulary import Vocabulary
from tfx_xmatch.export import build_serving_module, export_retrieval_model, non_stock_ops
from tfx_xmatch.index import BruteForceIndex
from tfx_xmatch.models import TwoTower

NUM_ITEMS, LENGTH, K_MAX = 40, 6, 10


@pytest.fixture(scope="module")
def model():
    tf.keras.utils.set_random_seed(4)
    model = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, dropout=0.0)
    model.score_all({"history": np.zeros((1, LENGTH), np.int32)})
    return model


def string_vocab():
    return Vocabulary([f"movie-{i}" for i in range(1, NUM_ITEMS + 1)])


def int_vocab():
    return Vocabulary(list(range(101, 101 + NUM_ITEMS)))


def test_the_user_side_signatures_call_one_traced_user_tower():
    """serving_default, top_k and user_embedding each traced the user tower anew: the SavedModel
    held T2Diff's sampler three times."""
    tf.keras.utils.set_random_seed(4)
    model = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, dropout=0.0)
    model.build_all_variables()
    traced = []
    user_embedding = model.user_embedding
    model.user_embedding = lambda inputs, **kwargs: traced.append(1) or user_embedding(inputs, **kwargs)
    module = build_serving_module(model, string_vocab(), k_max=5)
    for signature in module.signatures().values():
        signature.get_concrete_function()
    assert len(traced) == 1
    history = tf.constant([["movie-3", "movie-7"]])
    np.testing.assert_allclose(module.user_embedding(history)["user_embedding"].numpy(),
                               user_embedding({"history": tf.constant([[0] * (LENGTH - 2) + [3, 7]])}).numpy(),
                               rtol=1e-6)


def oracle(model, histories, k, exclude_history=True):
    """Top-k item indices and scores by brute force over model.score_all (NumPy)."""
    scores = model.score_all({"history": pad_histories(histories, LENGTH)}).numpy()
    scores[:, 0] = -np.inf
    if exclude_history:
        for row, history in enumerate(histories):
            scores[row, history] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, axis=1)


HISTORIES = [np.array([3, 7, 7, 12]), np.array([40]), np.arange(1, 15)]  # repeats, one item, longer than L


def right_padded(vocab, histories, width, padding):
    rows = [list(vocab.ids(h)) + [padding] * (width - len(h)) for h in histories]
    return np.array(rows)


@pytest.mark.parametrize("vocab_fn, padding", [(string_vocab, ""), (int_vocab, 0)])
def test_serving_signatures_match_the_oracle(model, vocab_fn, padding):
    vocab = vocab_fn()
    module = build_serving_module(model, vocab, k_max=K_MAX, default_k=5)
    expected_top, expected_scores = oracle(model, HISTORIES, 5)
    for request in (right_padded(vocab, HISTORIES, 16, padding),
                    right_padded(vocab, HISTORIES, 16, padding)[:, ::-1][:, ::-1]):
        result = module.serving_default(tf.constant(request))
        np.testing.assert_array_equal(result["item_ids"].numpy().astype(str if vocab.id_type == "str" else np.int64),
                                      vocab.ids(expected_top.ravel()).reshape(expected_top.shape))
        np.testing.assert_allclose(result["scores"].numpy(), expected_scores, rtol=1e-5)
    # Left padding gives the same answer as right padding.
    left = np.array([[padding] * (16 - len(h)) + list(vocab.ids(h)) for h in HISTORIES])
    np.testing.assert_array_equal(module.serving_default(tf.constant(left))["item_ids"].numpy(),
                                  module.serving_default(tf.constant(right_padded(vocab, HISTORIES, 16, padding)))["item_ids"].numpy())
    # k per request, up to k_max, without retracing into a frozen k.
    for k in (1, 3, K_MAX):
        top = module.top_k(tf.constant(right_padded(vocab, HISTORIES, 16, padding)), tf.constant(k))
        assert top["item_ids"].shape == (3, k)
        np.testing.assert_allclose(top["scores"].numpy(), oracle(model, HISTORIES, k)[1], rtol=1e-5)


def tf_serving_batch(requests: list) -> dict:
    """Merges requests as TF Serving's BatchingSession does with pad_variable_length_inputs:
    every input is concatenated along the first axis (a scalar is refused), a narrower tensor
    padded at the end of each dimension with its own first element."""
    merged = {}
    for name in requests[0]:
        parts = [np.asarray(request[name]) for request in requests]
        if any(part.ndim == 0 for part in parts):
            raise ValueError("Batching session Run() input tensors must have at least one dimension")
        width = [max(part.shape[d] for part in parts) for d in range(1, parts[0].ndim)]
        merged[name] = np.concatenate([
            np.pad(part, [(0, 0)] + [(0, w - part.shape[d + 1]) for d, w in enumerate(width)],
                   constant_values=part.flat[0]) for part in parts])
    return merged


def test_top_k_takes_one_k_per_row_as_tf_serving_batching_and_row_format_send_it(model):
    vocab = string_vocab()
    module = build_serving_module(model, vocab, k_max=K_MAX)
    histories = tf.constant(right_padded(vocab, HISTORIES, 16, ""))
    per_row = module.top_k(histories, tf.constant([2, K_MAX, 5]))
    assert per_row["item_ids"].shape == (3, K_MAX)
    for row, k in enumerate((2, K_MAX, 5)):
        alone = module.top_k(histories[row:row + 1], tf.constant(k))
        np.testing.assert_array_equal(per_row["item_ids"][row, :k].numpy(), alone["item_ids"][0].numpy())
        np.testing.assert_allclose(per_row["scores"][row, :k].numpy(), alone["scores"][0].numpy(), rtol=1e-6)
        # Past its own k, a row holds what an unfilled slot holds.
        assert set(per_row["item_ids"][row, k:].numpy().tolist()) <= {b""}
        assert np.all(per_row["scores"][row, k:].numpy() == -np.inf)
    # One k for every row, as a scalar, a single value or a column (row format with [k] per instance).
    for k in (tf.constant(4), tf.constant([4]), tf.constant([[4], [4], [4]])):
        np.testing.assert_array_equal(module.top_k(histories, k)["item_ids"].numpy(),
                                      module.top_k(histories, tf.constant(4))["item_ids"].numpy())
    empty = module.top_k(tf.zeros([0, 4], tf.string), tf.constant(4))
    assert empty["item_ids"].shape == (0, 4) and empty["scores"].shape == (0, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"one value per history row; history rows:.*3.*k shape"):
        module.top_k(histories, tf.constant([2, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"k must be in \[1, k_max={K_MAX}\], got k =\] \[0\]"):
        module.top_k(histories, tf.constant([2, 0, 3]))


@pytest.mark.parametrize("vocab_fn, padding", [(string_vocab, ""), (int_vocab, 0)])
def test_tf_serving_batching_of_left_padded_requests_answers_each_as_alone(model, vocab_fn, padding):
    """Stock TF Serving (--enable_batching, pad_variable_length_inputs) merges requests of
    different widths by padding each at the end with its first element: a history that starts
    with the padding id, as the serving docs ask, comes through unchanged."""
    vocab = vocab_fn()
    module = build_serving_module(model, vocab, k_max=K_MAX)
    requests = [{"history": np.array([[padding] * (width - len(h)) + list(vocab.ids(h))]), "k": np.array([k], np.int32)}
                for h, width, k in zip(HISTORIES, (6, 3, 20), (3, 7, K_MAX))]
    with pytest.raises(ValueError, match="at least one dimension"):
        tf_serving_batch([{**requests[0], "k": np.array(3, np.int32)}, requests[1]])
    merged = tf_serving_batch(requests)
    merged = module.top_k(tf.constant(merged["history"]), tf.constant(merged["k"]))
    for row, request in enumerate(requests):
        alone = module.top_k(tf.constant(request["history"]), tf.constant(request["k"]))
        k = int(request["k"][0])
        np.testing.assert_array_equal(merged["item_ids"][row, :k].numpy(), alone["item_ids"][0].numpy())


def test_history_is_kept_when_asked(model):
    vocab = int_vocab()
    module = build_serving_module(model, vocab, k_max=K_MAX, exclude_history=False)
    result = module.serving_default(tf.constant(right_padded(vocab, HISTORIES, 16, 0)))
    np.testing.assert_allclose(result["scores"].numpy(), oracle(model, HISTORIES, K_MAX, exclude_history=False)[1],
                               rtol=1e-5)


def test_embedding_signatures(model):
    vocab = string_vocab()
    module = build_serving_module(model, vocab, k_max=K_MAX)
    user = module.user_embedding(tf.constant(right_padded(vocab, HISTORIES, 16, "")))["user_embedding"]
    np.testing.assert_allclose(user.numpy(), model.user_embedding({"history": pad_histories(HISTORIES, LENGTH)}).numpy(),
                               rtol=1e-5, atol=1e-6)
    items = module.item_embeddings(tf.constant(["movie-3", "movie-1"]))["item_embeddings"]
    np.testing.assert_allclose(items.numpy(), model.item_embeddings().numpy()[[3, 1]], rtol=1e-6)


@pytest.mark.parametrize(
    "request_rows, k, message",
    [
        ([["movie-1", "unknown-movie"]], 3, "outside the vocabulary"),
        ([["movie-1", ""], ["", ""]], 3, r"empty history.*first empty row \(from 0\):[^0-9]*1"),
        ([["movie-1"]], 0, "k must be in"),
        ([["movie-1"]], K_MAX + 1, "k must be in"),
    ],
)
def test_bad_requests_fail_with_a_clear_message(model, request_rows, k, message):
    module = build_serving_module(model, string_vocab(), k_max=K_MAX)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        module.top_k(tf.constant(request_rows), tf.constant(k))


def test_export_arguments_are_checked(model, tmp_path, caplog):
    vocab = int_vocab()
    with caplog.at_level("WARNING", logger="tfx_xmatch.export"):
        build_serving_module(model, vocab, k_max=vocab.num_items + 1)
    assert f"k_max={vocab.num_items + 1} exceeds the catalogue's {vocab.num_items} items" in caplog.text
    with pytest.raises(ValueError, match="default_k"):
        build_serving_module(model, int_vocab(), k_max=5, default_k=6)
    with pytest.raises(ValueError, match="padding_id 101 is also a real item id"):
        build_serving_module(model, int_vocab(), padding_id=101)
    # Past int64 it was TensorFlow's "Can't convert Python sequence with out-of-range integer".
    with pytest.raises(ValueError, match="padding_id 9223372036854775808 is outside the range of int64"):
        build_serving_module(model, int_vocab(), padding_id="9223372036854775808")
    with pytest.raises(ValueError, match="vocabulary has 3 items"):
        build_serving_module(model, Vocabulary([1, 2, 3]))
    with pytest.raises(ValueError, match="unknown index kind"):
        build_serving_module(model, int_vocab(), index_kind="annoy")
    # Index arguments the export sets itself: padding_identifier=7 once served history item 7.
    for option, value, why in (("padding_identifier", 7, "pads history exclusions with item index 0"),
                               ("k", 5, "a request chooses k"), ("k_max", 5, "give k_max"),
                               ("exclude_padding", False, "keeps the padding id out")):
        with pytest.raises(ValueError, match=f"index option '{option}' is set by the export.*{why}"):
            build_serving_module(model, int_vocab(), index_options={option: value})


def test_a_given_index_must_answer_with_item_indices_each_once(model):
    """Filled the TFRS way, without identifiers, an index numbers its rows from 0: the export
    served every item id shifted by one (its neighbour's), and excluded the wrong history."""
    embeddings = model.item_embeddings()[1:]
    rows = tf.range(1, NUM_ITEMS + 1, dtype=tf.int64)
    for identifiers, problem in (
            (None, r"holds identifiers outside the item indices 1\.\.40: 1 of 40, e.g. 0 \(filled without identifiers"),
            (rows + 1, "holds identifiers outside the item indices 1..40: 1 of 40, e.g. 41"),
            (tf.strings.as_string(rows), "holds string identifiers")):
        index = BruteForceIndex(k_max=K_MAX).index(embeddings, identifiers)
        with pytest.raises(ValueError, match=rf"the given BruteForceIndex {problem}.*identifiers=tf.range\(1, 40 \+ 1\)"):
            build_serving_module(model, int_vocab(), k_max=K_MAX, index=index)
    tfrs_index = tfrs.layers.factorized_top_k.BruteForce(k=K_MAX)
    tfrs_index.index(embeddings, rows)
    with pytest.raises(TypeError, match="index must be a tfx_xmatch index .* got tensorflow_recommenders"):
        build_serving_module(model, int_vocab(), k_max=K_MAX, index=tfrs_index)
    # A subset of the catalogue, in any order, is served as it is.
    subset = BruteForceIndex(k_max=K_MAX).index(tf.gather(embeddings, [4, 0, 2]), [5, 1, 3])
    served = build_serving_module(model, int_vocab(), k_max=K_MAX, index=subset, exclude_history=False)
    item_ids = served.top_k(tf.constant([[101, 0]], tf.int64), tf.constant(3))["item_ids"].numpy()
    assert sorted(item_ids[0]) == [101, 103, 105]


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    paths = {
        kind: export_retrieval_model(model, string_vocab(), base / kind, index_kind=kind, k_max=K_MAX,
                                     index_options=options)
        for kind, options in [("brute_force", {}), ("partitioned", {"num_partitions": 4, "num_probes": 4})]
    }
    return base, paths


def test_export_writes_versions_atomically_with_warmup(model, exported):
    base, paths = exported
    assert paths["brute_force"] == base / "brute_force" / "1"
    assert [p.name for p in (base / "brute_force").iterdir()] == ["1"]  # no temporary left behind
    second = export_retrieval_model(model, string_vocab(), base / "brute_force", k_max=K_MAX)
    assert second.name == "2"
    with pytest.raises(FileExistsError):
        export_retrieval_model(model, string_vocab(), base / "brute_force", version=2, k_max=K_MAX)
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(str(second / "assets.extra" / "tf_serving_warmup_requests")))
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request for record in records]
    assert [log.model_spec.signature_name for log in logs] == ["serving_default", "top_k"]
    assert "history" in logs[0].inputs
    # top_k warms up with k given once per row, the only form TF Serving's batching accepts, and
    # every warm-up request answers through the exported signatures (TF Serving refuses a version
    # whose warm-up fails).
    assert tf.make_ndarray(logs[1].inputs["k"]).tolist() == [K_MAX]
    loaded = tf.saved_model.load(str(second))
    for log in logs:
        inputs = {name: tf.constant(tf.make_ndarray(tensor)) for name, tensor in log.inputs.items()}
        assert loaded.signatures[log.model_spec.signature_name](**inputs)["item_ids"].shape[0] == 1


def test_warmup_requests_are_the_same_bytes_in_every_process(tmp_path):
    """The inputs map was written in the order of the process's protobuf map seed, so two exports
    of one model differed by chance: each request must be the canonical (key-sorted) serialization,
    and the processes' files must agree."""
    from tensorflow_serving.apis import prediction_log_pb2

    script = ("import pathlib, sys, tensorflow as tf; from tfx_xmatch.export import write_warmup_requests; "
              "write_warmup_requests(pathlib.Path(sys.argv[1]), 'm', [[3, 5]], tf.int64, ['age'], top_k=4)")
    written = set()
    for seed in ("1", "2", "3"):
        directory = tmp_path / seed
        subprocess.run([sys.executable, "-c", script, str(directory)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": seed, "TF_CPP_MIN_LOG_LEVEL": "3"})
        written.add((directory / "assets.extra" / "tf_serving_warmup_requests").read_bytes())
    assert len(written) == 1
    records = list(tf.data.TFRecordDataset(str(tmp_path / "1" / "assets.extra" / "tf_serving_warmup_requests")))
    assert len(records) == 2  # serving_default and top_k
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        assert set(log.predict_log.request.inputs) >= {"history", "age"}
        assert log.SerializeToString(deterministic=True) == record.numpy()


def test_version_directories_are_readable_by_other_users(exported):
    base, paths = exported
    umask = os.umask(0)
    os.umask(umask)
    # tempfile.mkdtemp's 0700 once survived the rename, locking out a server running as another user.
    assert paths["brute_force"].stat().st_mode & 0o777 == 0o777 & ~umask


def test_export_to_a_url_goes_through_tf_io_gfile(model):
    # ram:// stands in for gs://: pathlib once made "gs://b/x" the local directory "gs:/b/x".
    base = f"ram://exports-{os.getpid()}/xmatch"
    first = export_retrieval_model(model, string_vocab(), base, k_max=K_MAX)
    second = export_retrieval_model(model, string_vocab(), base, k_max=K_MAX)
    assert (first, second) == (f"{base}/1", f"{base}/2")
    assert not os.path.exists("ram:")
    assert tf.io.gfile.exists(f"{second}/assets.extra/tf_serving_warmup_requests")
    served = tf.saved_model.load(second)
    history = tf.constant([list(string_vocab().ids(HISTORIES[0]))])
    top, _ = oracle(model, HISTORIES[:1], 3)
    answer = served.signatures["top_k"](history=history, k=tf.constant(3))["item_ids"].numpy().astype(str)
    assert answer.tolist() == [list(string_vocab().ids(top[0]))]
    with pytest.raises(FileExistsError, match="ram://.*/2 already exists"):
        export_retrieval_model(model, string_vocab(), base, version=2, k_max=K_MAX)


def _another_exporter_publishes(base: str, name: str) -> None:
    tf.io.gfile.makedirs(f"{base}/{name}")
    tf.io.gfile.GFile(f"{base}/{name}/other-exporter", "w").write("theirs")


def test_a_version_published_during_the_build_is_never_replaced(model, tmp_path, monkeypatch):
    """Two exporters into one base path both took version 1 (read before the slow build), and
    the later one's rename silently replaced the earlier one's published version."""
    import tfx_xmatch.export as export

    base = str(tmp_path / "models")
    real_write_extras = export._write_extras

    def another_exporter_publishes_meanwhile(*args, **kwargs):
        _another_exporter_publishes(base, "1")
        return real_write_extras(*args, **kwargs)

    monkeypatch.setattr(export, "_write_extras", another_exporter_publishes_meanwhile)
    published = export_retrieval_model(model, string_vocab(), base, k_max=K_MAX)
    assert published == tmp_path / "models" / "2"  # the next free number, not 1 over the other's
    assert os.listdir(tmp_path / "models" / "1") == ["other-exporter"]
    assert (published / "saved_model.pb").exists()
    assert sorted(os.listdir(tmp_path / "models")) == ["1", "2"]  # no temporary left


@pytest.mark.parametrize("scheme", ["", "file://", "ram://"])
def test_publishing_never_replaces_a_version_taken_meanwhile(tmp_path, scheme):
    from tfx_xmatch.export import publish_new_version

    base = f"{scheme}{tmp_path}/models"

    def write(taken: str):
        def written_while_another_exporter_publishes(directory):
            (directory / "saved_model.pb").write_text("ours")
            (directory / "variables").mkdir()
            (directory / "variables" / "variables.index").write_text("ours")
            _another_exporter_publishes(base, taken)
        return written_while_another_exporter_publishes

    assert str(publish_new_version(base, write("1"))) == f"{base}/2"
    with pytest.raises(FileExistsError, match=f"{base}/3 already exists"):
        publish_new_version(base, write("3"), version=3)
    with pytest.raises(FileExistsError, match=f"{base}/0004 already exists"):  # a spelling of 4
        publish_new_version(base, write("0004"), version=4)
    for name in ("1", "3", "0004"):
        assert tf.io.gfile.GFile(f"{base}/{name}/other-exporter").read() == "theirs", name
    assert tf.io.gfile.GFile(f"{base}/2/variables/variables.index").read() == "ours"
    assert sorted(tf.io.gfile.listdir(base)) == ["0004", "1", "2", "3"]  # no temporary or staging copy left


def test_the_portability_of_an_export_to_a_url_is_read_through_tf_io_gfile(model, tmp_path):
    """non_stock_ops / xla_compiled read saved_model.pb with pathlib: an export to file:// (or
    gs://) was published, then `xmatch export` failed reading it back."""
    from tfx_xmatch.export import xla_compiled

    published = export_retrieval_model(model, string_vocab(), f"file://{tmp_path}/models", k_max=K_MAX)
    assert published == f"file://{tmp_path}/models/1"
    assert non_stock_ops(published) == set() and not xla_compiled(published)


def test_version_names_are_read_as_the_server_reads_them(model, tmp_path, monkeypatch):
    """export read names with isdigit()+int(): "²" crashed it, 99999999999999999999 made it write
    a version no server loads, and version 7 was written beside an existing 007."""
    import tfx_xmatch.export as export
    from tfx_xmatch.serving.model_manager import list_versions

    base = tmp_path / "models"
    for name in ("²", "99999999999999999999", "007", "notes"):
        (base / name).mkdir(parents=True)
    assert sorted(list_versions(str(base))) == [7]
    assert export.next_version(str(base)) == 8
    monkeypatch.setattr(export, "build_serving_module", lambda *args, **kwargs: pytest.fail("built"))
    with pytest.raises(FileExistsError, match=r"models/007 already exists \(version 7\)"):
        export_retrieval_model(model, string_vocab(), base, version=7, k_max=K_MAX)
    with pytest.raises(ValueError, match="at most 9223372036854775807"):
        export_retrieval_model(model, string_vocab(), base, version=2**63, k_max=K_MAX)


def test_an_export_base_path_that_is_a_file_is_refused_before_the_build(model, tmp_path, monkeypatch):
    """It was found only after the build, as "[Errno 17] File exists"."""
    import tfx_xmatch.export as export

    base = tmp_path / "models"
    base.write_text("not a directory")
    monkeypatch.setattr(export, "build_serving_module", lambda *args, **kwargs: pytest.fail("built"))
    for path in (base, f"file://{base}"):
        with pytest.raises(NotADirectoryError, match=f"export base path {path} is a file"):
            export_retrieval_model(model, string_vocab(), path, k_max=K_MAX)


def _files(directory, names=None) -> dict:
    """{relative name: bytes or None} of the files under a local ``directory``, or of ``names``
    under any directory (ram:// lists "assets" with "assets.extra"'s files, so it is not walked)."""
    directory = str(directory)
    if names is None:
        names = [os.path.relpath(os.path.join(root, name), directory)
                 for root, _, files in os.walk(directory) for name in files]
    found = {}
    for name in names:
        path = f"{directory}/{name}"
        found[name] = tf.io.gfile.GFile(path, "rb").read() if tf.io.gfile.exists(path) else None
    return found


def test_an_overwrite_that_fails_leaves_the_previous_savedmodel(model, tmp_path, monkeypatch):
    """On an object store the old SavedModel was deleted before the upload, which a dropped
    connection left half-written; locally, a crash between the two renames left the old one
    under a random hidden name that nothing restored."""
    from tfx_xmatch.export import save_serving_module

    module = build_serving_module(model, string_vocab(), k_max=K_MAX)
    reference = tmp_path / "reference"
    save_serving_module(module, reference, string_vocab())
    names = sorted(_files(reference))
    assert {"saved_model.pb", "variables/variables.index", "assets.extra/xmatch_model.json"} <= set(names)
    # file:// takes the object-store path (ram:// cannot delete a directory tree).
    remote = f"file://{tmp_path}/store/serving"
    save_serving_module(module, remote, string_vocab())
    before = _files(remote, names)
    assert None not in before.values()
    real_copy = tf.io.gfile.copy
    for failing in (1, len(names) // 2, len(names)):  # the connection drops early, midway, at the last file
        calls = []

        def connection_reset(*args, **kwargs):
            calls.append(args)
            if len(calls) == failing:
                raise tf.errors.UnavailableError(None, None, "connection reset")
            return real_copy(*args, **kwargs)

        monkeypatch.setattr(tf.io.gfile, "copy", connection_reset)
        with pytest.raises(tf.errors.UnavailableError):
            save_serving_module(module, remote, string_vocab(), overwrite=True)
        monkeypatch.undo()
        assert _files(remote, names) == before, failing
        assert os.listdir(tmp_path / "store") == ["serving"], failing  # no staging copy left
    save_serving_module(module, remote, string_vocab(), overwrite=True)
    assert None not in _files(remote, names).values() and os.listdir(tmp_path / "store") == ["serving"]

    local = tmp_path / "serving"
    save_serving_module(module, local, string_vocab())
    before = _files(local)
    os.replace(local, tmp_path / ".serving.old")  # killed between moving it aside and the new one's rename
    with pytest.raises(FileExistsError):  # restored first, so it still counts as there
        save_serving_module(module, local, string_vocab())
    assert _files(local) == before and sorted(os.listdir(tmp_path)) == ["reference", "serving", "store"]
    save_serving_module(module, local, string_vocab(), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["reference", "serving", "store"]


@pytest.mark.parametrize("kind", ["brute_force", "partitioned"])
def test_reloaded_export_equals_the_in_process_model_and_uses_stock_ops(model, exported, kind):
    _, paths = exported
    assert non_stock_ops(paths[kind]) == set()
    reloaded = tf.saved_model.load(str(paths[kind]))
    assert set(reloaded.signatures) == {"serving_default", "top_k", "user_embedding", "item_embeddings"}
    request = tf.constant(right_padded(string_vocab(), HISTORIES, 16, ""))
    result = reloaded.signatures["top_k"](history=request, k=tf.constant(4))
    expected_top, expected_scores = oracle(model, HISTORIES, 4)
    np.testing.assert_array_equal(result["item_ids"].numpy().astype(str),
                                  string_vocab().ids(expected_top.ravel()).reshape(expected_top.shape))
    np.testing.assert_allclose(result["scores"].numpy(), expected_scores, rtol=1e-5)


def test_user_features_named_with_any_character_a_signature_takes_are_served_under_that_name(tmp_path):
    """The shape check's op is named after the feature, which need not be a valid op name; TF's
    signature builder renames some Python arguments ("a.b" -> "a_b") but not the SignatureDef
    input, which is what TF Serving clients send."""
    names = {"age": 3, "age-group": 2, "a.b": 2, "1st": 2, "x/y": 2, "p>q": 2}
    model = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, dropout=0.0,
                     user_feature_cardinalities=names)
    path = export_retrieval_model(model, int_vocab(), tmp_path, k_max=K_MAX)
    saved = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    for signature in ("serving_default", "top_k", "user_embedding"):
        assert set(saved.meta_graphs[0].signature_def[signature].inputs) - {"history", "k"} == set(names), signature
    top_k = tf.saved_model.load(str(path)).signatures["top_k"]
    history = tf.constant(right_padded(int_vocab(), [np.array([3, 7])], 4, 0))
    features = {name: tf.constant([1], tf.int64) for name in names}
    assert top_k(history=history, k=tf.constant(3), **features)["item_ids"].shape == (1, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="user_feature_age-group_must_be_one_value_per_row"):
        top_k(history=history, k=tf.constant(3), **{**features, "age-group": tf.constant([[2]], tf.int64)})


@pytest.mark.parametrize("name, problem", [
    ("_age", "cannot name an input"), ("âge", "cannot name an input"), ("age group", "cannot name an input"),
    ("class", "cannot name an input"), ("self", "cannot name an input"), ("m\\n", "cannot name an input"),
    ("a/", "cannot name an input"), ("k", "is the name of a serving input"),
    ("item_ids", "is the name of a serving input"), ("history", "is reserved")])
def test_a_user_feature_name_no_signature_takes_is_refused_before_training(name, problem, tmp_path):
    """Such a model trained, then failed at export with TF's "more than one argument ... was
    named '_age'" (or "'class' is not a valid parameter name")."""
    refused = rf"user feature name {re.escape(repr(name))} {problem}"
    with pytest.raises(ValueError, match=refused):
        feature_spec([name])
    # Built (a run saved before names were checked still loads), but neither trained nor exported.
    model = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, user_feature_cardinalities={name: 2})
    history = tf.constant([[1, 2, 3]])
    with pytest.raises(ValueError, match=refused):
        model.fit(tf.data.Dataset.from_tensors({"history": history, "next_items": history, name: tf.constant([1])}))
    assert not model.built
    with pytest.raises(ValueError, match=refused):
        export_retrieval_model(model, int_vocab(), tmp_path, k_max=K_MAX)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("names, clash, argument", [
    (["a.b", "a_b"], "user feature name 'a.b'", "a_b"), (["1st", "arg_1st"], "user feature name '1st'", "arg_1st"),
    (["history.v2", "history_v2"], "user feature name 'history.v2'", "history_v2"),
    (["Age", "age"], "user feature name 'Age'", "age"), (["K"], "the serving input 'k'", "k"),
    (["History"], "the serving input 'history'", "history"), (["Age", "age.v2"], None, None)])
def test_user_feature_names_that_tf_would_make_one_argument_are_refused_before_training(names, clash, argument,
                                                                                        tmp_path):
    """TF makes each signature input a Python argument ("a.b" -> "a_b", "1st" -> "arg_1st") and
    tells graph names apart regardless of case: two that became one failed the export with "Name
    collision after sanitization" or "more than one argument ... was named 'K'"."""
    cardinalities = {name: 2 for name in names}
    if clash is None:  # distinct after the rename: accepted
        check_user_feature_names(names)
        return
    with pytest.raises(ValueError, match=rf"user feature name '{re.escape(names[-1])}' and {re.escape(clash)} "
                                         rf"are one input .* read both as '{argument}'"):
        check_user_feature_names(names)
    model = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, user_feature_cardinalities=cardinalities)
    with pytest.raises(ValueError, match="are one input"):  # an older run's model still loads; export refuses it
        export_retrieval_model(model, int_vocab(), tmp_path, k_max=K_MAX)


def test_a_reloaded_export_names_an_input_of_the_wrong_rank(exported):
    """TF Serving feeds tensors as the request holds them: a one-row history sent as [items]
    failed deep inside the graph ("Invalid reduction dimension"), naming no input."""
    _, paths = exported
    reloaded = tf.saved_model.load(str(paths["brute_force"]))
    one_row = tf.constant(["movie-3", "movie-7"])
    calls = {
        "serving_default": lambda: reloaded.signatures["serving_default"](history=one_row),
        "top_k": lambda: reloaded.signatures["top_k"](history=one_row, k=tf.constant(3)),
        "user_embedding": lambda: reloaded.signatures["user_embedding"](history=one_row),
    }
    for name, call in calls.items():
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"Shape of tensor history \[2\] is not compatible with expected shape \[\?,\?\]"
                                 r"(.|\n)*history_must_be_batch_by_items"):
            call()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"Shape of tensor item_ids \[1,2\] is not compatible(.|\n)*item_ids_must_be_a_list"):
        reloaded.signatures["item_embeddings"](item_ids=tf.constant([["movie-3", "movie-7"]]))


FRESH_PROCESS = """
import json, sys
import numpy as np, tensorflow as tf
assert "tfx_xmatch" not in sys.modules
model = tf.saved_model.load(sys.argv[1])
request = tf.constant(json.loads(sys.argv[2]))
result = model.signatures["top_k"](history=request, k=tf.constant(4))
print(json.dumps({"item_ids": result["item_ids"].numpy().astype(str).tolist(),
                  "scores": result["scores"].numpy().tolist()}))
"""


def fresh_process_answer(saved_model_dir, request: list) -> dict:
    """``top_k(request, k=4)`` of an export, answered by a Python process that imports only TensorFlow."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(saved_model_dir), json.dumps(request)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["brute_force", "partitioned"])
def test_export_answers_in_a_fresh_tensorflow_only_process(model, exported, kind):
    _, paths = exported
    request = right_padded(string_vocab(), HISTORIES, 16, "").tolist()
    answer = fresh_process_answer(paths[kind], request)
    expected_top, expected_scores = oracle(model, HISTORIES, 4)
    assert answer["item_ids"] == string_vocab().ids(expected_top.ravel()).reshape(expected_top.shape).tolist()
    np.testing.assert_allclose(answer["scores"], expected_scores, rtol=1e-5)


def test_exporting_a_model_that_never_trained_warns_about_nothing(tmp_path):
    # The unused TFRS Retrieval task made every full-softmax or reloaded two-tower export log
    # "Skipping full serialization of TF-Keras layer ... Retrieval ..., because it is not built".
    import io
    import logging

    model = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH)
    model({"history": np.ones((1, LENGTH), np.int32)})  # built as training.load_model builds it
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("tensorflow").addHandler(handler)
    try:
        export_retrieval_model(model, string_vocab(), tmp_path / "export", k_max=K_MAX)
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
    assert "Skipping full serialization" not in stream.getvalue()


def test_models_trained_with_user_features_export_them_as_inputs(tmp_path):
    """Every user-side signature takes each user feature the model was built with (it used to
    serve only the history, and the first request failed with a KeyError)."""
    from tensorflow_serving.apis import prediction_log_pb2

    from tfx_xmatch.models import SPARC

    tf.keras.utils.set_random_seed(4)
    two_tower = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, dropout=0.0,
                         user_feature_cardinalities={"age": 3, "gender": 2})
    sparc = SPARC(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, dropout=0.0, num_codewords=4,
                  serving_interests=2, user_feature_cardinalities={"age": 3, "gender": 2})
    vocab = int_vocab()
    histories = [np.array([3, 7, 12]), np.array([40, 2])]
    age, gender = np.array([3, 0], np.int64), np.array([1, 2], np.int64)
    zeros = tf.zeros([2], tf.int64)
    window = pad_histories(histories, LENGTH)
    for model, kind in ((two_tower, "brute_force"), (sparc, "soft_search")):
        path = export_retrieval_model(model, vocab, tmp_path / kind, index_kind=kind, k_max=K_MAX)
        loaded = tf.saved_model.load(str(path))
        request = right_padded(vocab, histories, 4, 0)
        top_k = loaded.signatures["top_k"]
        assert set(top_k.structured_input_signature[1]) == {"history", "k", "age", "gender"}
        answer = top_k(history=tf.constant(request), k=tf.constant(5), age=tf.constant(age), gender=tf.constant(gender))
        if kind == "brute_force":
            scores = model.score_all({"history": window, "age": age.astype(np.int32),
                                      "gender": gender.astype(np.int32)}).numpy()
            scores[:, 0] = -np.inf
            for row, history in enumerate(histories):
                scores[row, history] = -np.inf
            expected = np.sort(scores, axis=1)[:, ::-1][:, :5]
            np.testing.assert_allclose(answer["scores"].numpy(), expected, rtol=1e-5)
            embedding = loaded.signatures["user_embedding"](
                history=tf.constant(request), age=tf.constant(age), gender=tf.constant(gender))["user_embedding"]
            np.testing.assert_allclose(embedding.numpy(), model.user_embedding(
                {"history": window, "age": age.astype(np.int32), "gender": gender.astype(np.int32)}).numpy(), rtol=1e-5)
        # The features change the answer, and bad values are refused by name.
        other = top_k(history=tf.constant(request), k=tf.constant(5), age=zeros, gender=zeros)
        assert not np.allclose(other["scores"].numpy(), answer["scores"].numpy())
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"user feature age must be in \[0, 3\]"):
            top_k(history=tf.constant(request), k=tf.constant(5), age=tf.constant([4, 0], tf.int64),
                  gender=tf.constant(gender))
        with pytest.raises(tf.errors.InvalidArgumentError, match="user feature gender needs one value per history row"):
            top_k(history=tf.constant(request), k=tf.constant(5), age=tf.constant(age),
                  gender=tf.constant([1], tf.int64))
        with pytest.raises(tf.errors.InvalidArgumentError, match="user_feature_gender_must_be_one_value_per_row"):
            top_k(history=tf.constant(request), k=tf.constant(5), age=tf.constant(age),
                  gender=tf.constant(gender[:, np.newaxis]))
        # TF Serving replays the warm-up requests at load: they carry the features too.
        record = next(iter(tf.data.TFRecordDataset(str(path / "assets.extra" / "tf_serving_warmup_requests"))))
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        assert set(log.predict_log.request.inputs) == {"history", "age", "gender"}


def test_an_index_that_cannot_fill_k_max_is_reported_at_export_built_here_or_given(model, caplog):
    """A top-k_max search that comes back mostly padding warns at export, whether the export
    builds the index or is handed one (the pipeline fills it from build-index)."""
    from tfx_xmatch.index import PartitionedIndex

    vocab = int_vocab()
    options = {"num_partitions": 20, "num_probes": 1}
    with caplog.at_level("WARNING", logger="tfx_xmatch.export"):
        build_serving_module(model, vocab, index_kind="partitioned", index_options=options, k_max=K_MAX)
    assert "'partitioned': a top-10 search returned only" in caplog.text and "num_partitions=20" in caplog.text
    caplog.clear()
    given = PartitionedIndex(k_max=K_MAX, **options).index(model.item_embeddings()[1:],
                                                            tf.range(1, NUM_ITEMS + 1, dtype=tf.int64))
    with caplog.at_level("WARNING", logger="tfx_xmatch.export"):
        build_serving_module(model, vocab, index=given, k_max=K_MAX)
    assert "a top-10 search returned only" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tfx_xmatch.export"):
        build_serving_module(model, vocab, index_kind="partitioned", index_options={"num_partitions": 4,
                                                                                   "num_probes": 4}, k_max=K_MAX)
    assert "search returned only" not in caplog.text  # every partition probed: exact


def test_a_move_into_a_url_version_that_fails_leaves_no_version_and_a_collision_is_named(tmp_path, monkeypatch):
    """makedirs made the version's directories before the first file moved, so a first move
    that failed left an empty version that servers failed to load and exports skipped; a file
    of another exporter met later was a bare AlreadyExistsError, and the cleanup then removed
    that exporter's files."""
    from tfx_xmatch.export import publish_new_version

    base = f"ram://move-{tmp_path.name}"

    def write(directory):
        (directory / "variables").mkdir()
        (directory / "variables" / "variables.index").write_text("ours")
        (directory / "saved_model.pb").write_text("ours")

    real_rename = tf.io.gfile.rename

    def refused(source, destination, overwrite=False):
        raise tf.errors.PermissionDeniedError(None, None, "permission denied")

    monkeypatch.setattr(tf.io.gfile, "rename", refused)
    with pytest.raises(tf.errors.PermissionDeniedError):
        publish_new_version(base, write)
    assert tf.io.gfile.listdir(base) == []

    def another_exporter_moves_its_graph_meanwhile(source, destination, overwrite=False):
        if destination.endswith("variables.index"):
            tf.io.gfile.GFile(destination.replace("variables/variables.index", "saved_model.pb"), "w").write("theirs")
        return real_rename(source, destination, overwrite=overwrite)

    monkeypatch.setattr(tf.io.gfile, "rename", another_exporter_moves_its_graph_meanwhile)
    with pytest.raises(RuntimeError, match=f"{base}/1/saved_model.pb was written by another export publishing into "
                                           f"{base}/1 at the same time"):
        publish_new_version(base, write)
    assert tf.io.gfile.GFile(f"{base}/1/saved_model.pb").read() == "theirs"  # theirs is left for the operator
