"""Beam build_index on the DirectRunner: embeddings and SparCode posting lists equal the in-process
build for every budget and shard layout, the loaded index answers identically, re-runs write
identical bytes, and bad inputs are named."""

import itertools
import json
import pathlib
import shutil

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam")

import tensorflow as tf  # noqa: E402

from tests.successor_data import successor_batches  # noqa: E402
from tfx_xmatch.data.dataset import pad_histories  # noqa: E402
from tfx_xmatch.index import SparseCodeIndex  # noqa: E402
from tfx_xmatch.models import SparCode, TwoTower  # noqa: E402
from tfx_xmatch.pipelines import build_index as bi  # noqa: E402
from tfx_xmatch.pipelines.beam_utils import pipeline_options  # noqa: E402
from tfx_xmatch.training import load_model, save_model  # noqa: E402

NUM_ITEMS, LENGTH = 40, 8
BUDGETS = [(None, None), (3, None), (None, 0.1), (4, 0.05)]
# (item_shards, code_shards, batch_size): uneven shards; more shards than items and codes; one block.
LAYOUTS = [(3, 5, 4), (50, 20, 1), (1, 1, 4096)]
CONFIGS = [*itertools.product(BUDGETS, LAYOUTS[:2]), (BUDGETS[0], LAYOUTS[2]), (BUDGETS[3], LAYOUTS[2])]
RERUN = (BUDGETS[3], LAYOUTS[1])


def _name(config):
    (per_code, fraction), (items, codes, batch) = config
    return f"L{per_code}-f{fraction}-i{items}-c{codes}-b{batch}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained SparCode run and an untrained two-tower run (the pipeline only reads weights)."""
    base = tmp_path_factory.mktemp("runs")
    tf.keras.utils.set_random_seed(3)
    sparcode = SparCode(num_items=NUM_ITEMS, embedding_dim=16, max_length=LENGTH, num_blocks=1, dropout=0.0,
                        num_query_tokens=2, num_codewords=8, num_codebooks=2, interaction_units=(16,),
                        max_loss_positions=64)
    sparcode.compile(optimizer=tf.keras.optimizers.Adam(5e-3))
    sparcode.fit(successor_batches(NUM_ITEMS, LENGTH, num_batches=3, batch=16), epochs=1, verbose=0)
    save_model(sparcode, base / "sparcode" / "model")
    two_tower = TwoTower(num_items=30, embedding_dim=8, user_tower="mean", max_length=LENGTH)
    two_tower({"history": np.zeros((1, LENGTH), np.int32)})
    save_model(two_tower, base / "two_tower" / "model")
    return base


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory):
    """Every config (and the two-tower run) built by one pipeline: output dir per config name."""
    out = tmp_path_factory.mktemp("built")
    with beam.Pipeline(options=pipeline_options()) as pipeline:
        for config in CONFIGS:
            (per_code, fraction), (items, codes, batch) = config
            bi.build_index_pipeline(pipeline, runs / "sparcode", out / _name(config), item_shards=items,
                                    code_shards=codes, max_items_per_code=per_code, cache_fraction=fraction,
                                    batch_size=batch)
        bi.build_index_pipeline(pipeline, runs / "two_tower", out / "two_tower", item_shards=4, code_shards=3,
                                batch_size=8)
    return out


@pytest.fixture(scope="module")
def model(runs):
    return load_model(runs / "sparcode" / "model")


def _in_process(model, per_code, fraction, batch):
    index = SparseCodeIndex(k_max=10, max_items_per_code=per_code, cache_fraction=fraction)
    return model.build_index(index, batch_size=batch, verbose=0)


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_outputs_equal_the_in_process_build(config, built, model):
    (per_code, fraction), (items, codes, batch) = config
    out = built / _name(config)
    embeddings = np.load(out / bi.EMBEDDINGS_FILE)
    expected_embeddings = model.item_embeddings().numpy()
    assert embeddings.shape == expected_embeddings.shape == (NUM_ITEMS + 1, model.num_codes)
    np.testing.assert_allclose(embeddings, expected_embeddings, rtol=1e-6, atol=1e-6)
    assert np.all(embeddings[0] == 0)

    expected = _in_process(model, per_code, fraction, batch)
    with np.load(out / bi.POSTINGS_FILE) as postings:
        for name in ("posting_items", "posting_scores", "posting_splits", "identifiers"):
            np.testing.assert_array_equal(postings[name], getattr(expected, name).numpy(), err_msg=name)
            assert postings[name].dtype == getattr(expected, name).numpy().dtype
    stats = json.loads((out / bi.STATS_FILE).read_text())
    assert (stats["positive_entries"], stats["postings"]) == (expected.num_positive_entries, expected.num_postings)
    assert stats["is_exact"] == expected.is_exact() == (per_code is None and fraction is None)
    assert stats["item_shards"] == min(items, -(-NUM_ITEMS // batch)) and stats["code_shards"] == min(codes, 16)
    assert 0 < stats["postings"] < NUM_ITEMS * model.num_codes  # a budget that prunes, a table that is sparse


@pytest.mark.parametrize("config", CONFIGS[1::3], ids=_name)
def test_the_loaded_index_answers_like_the_in_process_one(config, built, model):
    (per_code, fraction), (_, _, batch) = config
    loaded = bi.load_sparse_code_index(built / _name(config), k_max=10)
    expected = _in_process(model, per_code, fraction, batch)
    histories = [np.arange(1, 6), np.arange(10, 20), np.array([33]), np.arange(20, 28)]
    queries = model.user_embedding({"history": pad_histories(histories, LENGTH)})
    exclude = tf.constant(pad_histories(histories, LENGTH), tf.int64)
    for kwargs in ({"k": 10}, {"k": 3, "exclude": exclude}):
        for got, want in zip(loaded(queries, **kwargs), expected(queries, **kwargs)):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert loaded.is_exact() == expected.is_exact() and loaded.num_candidates == NUM_ITEMS
    assert (loaded.max_items_per_code, loaded.cache_fraction) == (per_code, fraction)


def test_without_a_budget_the_models_serving_cache_is_built(runs, model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "sparcode", run)
    config_path = run / "model" / "config.json"
    saved = json.loads(config_path.read_text())
    saved["config"]["serving_cache_fraction"] = 0.1
    config_path.write_text(json.dumps(saved))
    bi.run_build_index(run, tmp_path / "out", item_shards=2, code_shards=2, batch_size=4)
    loaded = bi.load_sparse_code_index(tmp_path / "out", k_max=10)
    expected = _in_process(model, None, 0.1, 4)
    assert (loaded.max_items_per_code, loaded.cache_fraction) == (None, 0.1)
    assert loaded.num_postings == expected.num_postings < expected.num_positive_entries
    # A budget on the command line wins over the model's.
    bi.run_build_index(run, tmp_path / "capped", item_shards=2, code_shards=2, max_items_per_code=3, batch_size=4)
    capped = bi.load_sparse_code_index(tmp_path / "capped", k_max=10)
    assert (capped.max_items_per_code, capped.cache_fraction) == (3, None)


def test_a_model_without_codes_gets_embeddings_only(built, runs):
    out = built / "two_tower"
    model = load_model(runs / "two_tower" / "model")
    np.testing.assert_allclose(np.load(out / bi.EMBEDDINGS_FILE), model.item_embeddings().numpy(), rtol=1e-6)
    stats = json.loads((out / bi.STATS_FILE).read_text())
    assert stats == {"batch_size": 8, "code_shards": None, "dimension": 8, "files": [bi.EMBEDDINGS_FILE],
                     "item_shards": 4, "model": "two_tower", "num_items": 30}
    assert not (out / bi.POSTINGS_FILE).exists()
    with pytest.raises(FileNotFoundError, match="was build_index run on a SparCode model"):
        bi.load_sparse_code_index(out)


def test_rerun_is_byte_identical(built, runs, tmp_path, capsys, monkeypatch):
    (per_code, fraction), (items, codes, batch) = config = RERUN
    argv = ["--run-dir", str(runs / "sparcode"), "--output-dir", str(tmp_path), "--item-shards", str(items),
            "--code-shards", str(codes), "--max-items-per-code", str(per_code), "--cache-fraction", str(fraction),
            "--batch-size", str(batch), "--direct_num_workers=1"]
    assert bi.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    first = {name: (tmp_path / name).read_bytes() for name in (bi.EMBEDDINGS_FILE, bi.POSTINGS_FILE, bi.STATS_FILE)}
    summary = bi.run_build_index(runs / "sparcode", tmp_path, item_shards=items, code_shards=codes,
                                 max_items_per_code=per_code, cache_fraction=fraction, batch_size=batch)
    for name, content in first.items():
        assert (tmp_path / name).read_bytes() == content, name
        assert (built / _name(config) / name).read_bytes() == content, name  # built in a shared pipeline
    assert summary["wall_seconds"] > 0 and summary.keys() == printed.keys()
    assert json.loads((tmp_path / bi.SUMMARY_FILE).read_text()) == summary
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporaries left
    finished = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    settings = dict(item_shards=items, code_shards=codes, max_items_per_code=per_code, cache_fraction=fraction,
                    batch_size=batch)
    # A rebuild that fails before it writes leaves the finished build whole: its statistics were
    # deleted first, so a run directory without weights made a good index unloadable.
    with pytest.raises(Exception):
        bi.run_build_index(runs / "sparcode", tmp_path, beam_args=["--runner=NoSuchRunner"], **settings)
    no_weights = tmp_path.parent / "no_weights"
    (no_weights / "model").mkdir(parents=True)
    (no_weights / "model" / "config.json").write_bytes((runs / "sparcode" / "model" / "config.json").read_bytes())
    with pytest.raises(Exception, match="weights"):
        bi.run_build_index(no_weights, tmp_path, **settings)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == finished
    # One that fails part-way leaves no statistics, so nothing loads old and new files together.
    def disk_full(path, content):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bi, "write_bytes", disk_full)
    with pytest.raises(Exception, match="No space left"):
        bi.run_build_index(runs / "sparcode", tmp_path, beam_args=["--direct_num_workers=1"], **settings)
    assert not (tmp_path / bi.STATS_FILE).exists() and not (tmp_path / bi.SUMMARY_FILE).exists()
    with pytest.raises(FileNotFoundError, match="has no index_stats.json: no build_index finished there"):
        bi.load_sparse_code_index(tmp_path)


def test_block_pruning_and_merging_equal_one_build_on_a_table_full_of_ties():
    rng = np.random.default_rng(0)
    table = np.round(np.maximum(rng.normal(size=(150, 12)) - 0.5, 0.0) * 2) / 2  # many equal scores
    table = table.astype(np.float32)
    table[:, 0] = 0.0  # an empty posting list
    for per_code, fraction in [(None, None), (1, None), (5, None), (None, 0.02), (3, 0.01), (50, 0.3)]:
        expected = SparseCodeIndex(max_items_per_code=per_code, cache_fraction=fraction).index(table)
        total = bi.cache_budget(fraction, 12, 150)
        for item_step, code_step in [(150, 12), (7, 5), (1, 1), (64, 13)]:
            blocks = [bi._prune_block((c, i + 1, table[i:i + item_step, c:c + code_step]), 12, per_code, total)
                      for i in range(0, 150, item_step) for c in range(0, 12, code_step)]
            merge = bi._MergePostings(12, per_code, total)
            order = rng.permutation(len(blocks))
            groups = [order[start::3] for start in range(3)]  # three partial accumulators, merged
            partial = []
            for group in groups:
                accumulator = merge.create_accumulator()
                for position in group:
                    accumulator = merge.add_input(accumulator, blocks[position])
                partial.append(accumulator)
            items, scores, splits, positives = merge.extract_output(merge.merge_accumulators(partial))
            np.testing.assert_array_equal(items, expected.posting_items.numpy())
            np.testing.assert_array_equal(scores, expected.posting_scores.numpy())
            np.testing.assert_array_equal(splits, expected.posting_splits.numpy())
            assert positives == expected.num_positive_entries


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(run_dir="missing"), FileNotFoundError, "run directory '.*missing' does not exist"),
    (dict(item_shards=0), ValueError, "item_shards must be an integer >= 1, got 0"),
    (dict(code_shards=True), ValueError, "code_shards must be an integer >= 1, got True"),
    (dict(batch_size=2.0), ValueError, "batch_size must be an integer >= 1, got 2.0"),
    (dict(cache_fraction=1.5), ValueError, r"cache_fraction must be in \(0, 1\] or None, got 1.5"),
    (dict(run_dir="two_tower", max_items_per_code=5), ValueError,
     "max_items_per_code=5, cache_fraction=None.* asks for SparCode posting lists.* is 'two_tower'"),
])
def test_bad_inputs_are_named(kwargs, error, message, runs, tmp_path):
    arguments = dict(item_shards=2, code_shards=2, max_items_per_code=None, cache_fraction=None, batch_size=4)
    run_dir = runs / kwargs.pop("run_dir", "sparcode")
    with pytest.raises(error, match=message):
        bi.run_build_index(run_dir, tmp_path / "out", **{**arguments, **kwargs})
    assert not (tmp_path / "out").exists()


def test_a_directory_without_a_model_and_the_command_line_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="model/config.json not found: is '.*' a training run directory"):
        bi.run_build_index(tmp_path, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        bi.main(["--run-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out"), "--item-shards", "2"])
    assert exit_info.value.code == 2 and "run directory" in capsys.readouterr().err
    assert pathlib.Path(tmp_path).exists()


@pytest.mark.parametrize("module, reason", [
    (None, "registered in this process, and the config names no module that defines it .saved before modules"),
    ("json", "registered by its module 'json'"),
])
def test_a_model_class_that_no_module_registers_is_refused_before_the_workers_start(module, reason, tmp_path):
    (tmp_path / "model").mkdir()
    saved = {"model": "nowhere>Retriever", **({"module": module} if module else {}), "config": {"num_items": 3}}
    (tmp_path / "model" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="names the model 'nowhere>Retriever', neither a built-in one nor a class "
                                         + reason):
        bi.run_build_index(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_postings_restores_an_index_and_refuses_inconsistent_lists():
    rng = np.random.default_rng(1)
    table = np.maximum(rng.normal(size=(30, 6)) - 0.3, 0.0).astype(np.float32)
    ids = np.array([f"item-{i}" for i in range(30)], dtype=object)
    built = SparseCodeIndex(k_max=5, max_items_per_code=4).index(table, ids)
    arrays = [built.posting_items.numpy(), built.posting_scores.numpy(), built.posting_splits.numpy()]
    loaded = SparseCodeIndex(k_max=5, max_items_per_code=4).load_postings(*arrays, ids)
    queries = np.eye(6, dtype=np.float32) + np.roll(np.eye(6, dtype=np.float32), 1, axis=1)
    for got, want in zip(loaded(queries, k=5), built(queries, k=5)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert not loaded.is_exact() and loaded.dimension == 6  # a budget, and no positive count given
    items, scores, splits = arrays
    for bad, message in [
        ((items, scores, splits[::-1]), r"splits must rise from 0 to \d+"),
        ((items + 30, scores, splits), r"items must be row positions in \[0, 30\), got values in \[30, "),
        ((items, scores[1:], splits), "items and scores must be vectors of one length"),
    ]:
        with pytest.raises(ValueError, match=message):
            SparseCodeIndex().load_postings(*bad, num_candidates=30)
    with pytest.raises(ValueError, match="needs identifiers or num_candidates"):
        SparseCodeIndex().load_postings(*arrays)


def test_a_run_and_an_output_on_a_remote_file_system(runs, built, model, tmp_path):
    """ram:// stands in for gs://: every read and write goes through tf.io.gfile, none through
    pathlib, which once turned "gs://b/x" into the local directory "gs:/b/x"."""
    from tfx_xmatch.io_utils import copy_directory

    (per_code, fraction), (items, codes, batch) = config = RERUN
    remote = f"ram://build-index-{tmp_path.name}"
    copy_directory(runs / "sparcode", f"{remote}/run")
    summary = bi.run_build_index(f"{remote}/run", f"{remote}/index", item_shards=items, code_shards=codes,
                                 max_items_per_code=per_code, cache_fraction=fraction, batch_size=batch)
    for name in (bi.EMBEDDINGS_FILE, bi.POSTINGS_FILE, bi.STATS_FILE):
        with tf.io.gfile.GFile(f"{remote}/index/{name}", "rb") as handle:
            assert handle.read() == (built / _name(config) / name).read_bytes(), name
    assert sorted(tf.io.gfile.listdir(f"{remote}/index")) == sorted(
        [bi.EMBEDDINGS_FILE, bi.POSTINGS_FILE, bi.STATS_FILE, bi.SUMMARY_FILE])  # no temporaries left
    assert summary == bi.finished_build(f"{remote}/index") | {"wall_seconds": summary["wall_seconds"]}
    assert not pathlib.Path("ram:").exists()  # nothing went to a local "ram:/..." directory
    np.testing.assert_array_equal(bi.load_item_embeddings(f"{remote}/index"), np.load(built / _name(config) /
                                                                                       bi.EMBEDDINGS_FILE))
    loaded, local = (bi.load_sparse_code_index(out, k_max=10) for out in (f"{remote}/index", built / _name(config)))
    queries = model.user_embedding({"history": pad_histories([np.arange(1, 6), np.array([33])], LENGTH)})
    for got, want in zip(loaded(queries, k=10), local(queries, k=10)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    # The model a worker loads from a URL is the saved one.
    remote_model = load_model(f"{remote}/run/model")
    np.testing.assert_array_equal(remote_model.item_embeddings().numpy(), model.item_embeddings().numpy())
    with pytest.raises(FileNotFoundError, match=f"run directory '{remote}/nothing' does not exist"):
        bi.run_build_index(f"{remote}/nothing", f"{remote}/index2", item_shards=1, code_shards=1)
    with pytest.raises(FileNotFoundError, match=f"'{remote}/run' has no index_stats.json"):
        bi.load_item_embeddings(f"{remote}/run")
