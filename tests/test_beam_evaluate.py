"""The Beam evaluate pipeline (DirectRunner): metrics equal the in-process full-ranking evaluation
of the same model and examples, a re-run writes the same file, bad inputs fail clearly; and the
evaluator's top-k accumulation and merging that the pipeline relies on."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("apache_beam")

from tfx_xmatch.data.dataset import pad_histories  # noqa: E402
from tfx_xmatch.data.tfrecord import read_eval_examples, record_counts, write_tfrecords  # noqa: E402
from tfx_xmatch.data.vocabulary import Vocabulary  # noqa: E402
from tfx_xmatch.evaluation.full_ranking import FullRankingEvaluator, evaluate_full_ranking  # noqa: E402
from tfx_xmatch.export import export_retrieval_model  # noqa: E402
from tfx_xmatch.models import TwoTower  # noqa: E402
from tfx_xmatch.pipelines import evaluate  # noqa: E402

NUM_ITEMS, LENGTH, K_MAX, KS = 30, 5, 12, (1, 5, 10)


def make_examples(rng, count, target_in_history=0):
    """Histories of 1..12 items (some longer than the model's window, some with repeats); the
    target is outside its history except in the last ``target_in_history`` examples."""
    histories, targets = [], []
    for row in range(count):
        target = int(rng.integers(1, NUM_ITEMS + 1))
        others = np.setdiff1d(np.arange(1, NUM_ITEMS + 1), [target])
        history = rng.choice(others, size=int(rng.integers(1, 13)), replace=True)
        if row >= count - target_in_history:
            history[0] = target
        histories.append(history.astype(np.int64))
        targets.append(target)
    return histories, np.array(targets)


def prepare(directory, vocab, rng, target_in_history=0):
    """A prepared directory as write_split_tfrecords lays it out (train/test shards, vocabulary)."""
    write_tfrecords(str(directory / "train"), *make_examples(rng, 40), num_shards=2)
    write_tfrecords(str(directory / "test"), *make_examples(rng, 23, target_in_history), num_shards=2)
    vocab.save(directory / "item_vocab.json")
    (directory / "statistics.json").write_text("{}")  # the mark of a finished preparation


@pytest.fixture(scope="module")
def model():
    tf.keras.utils.set_random_seed(7)
    model = TwoTower(num_items=NUM_ITEMS, embedding_dim=8, max_length=LENGTH, dropout=0.0)
    model.score_all({"history": np.zeros((1, LENGTH), np.int32)})
    return model


@pytest.fixture(scope="module")
def setup(model, tmp_path_factory):
    """(export version dir, prepared dir) with string item ids."""
    root = tmp_path_factory.mktemp("beam_evaluate")
    vocab = Vocabulary([f"item-{i}" for i in range(1, NUM_ITEMS + 1)])
    prepare(root, vocab, np.random.default_rng(0))
    return export_retrieval_model(model, vocab, root / "export", k_max=K_MAX), root


def evaluate_pad(histories, width=LENGTH):
    return pad_histories([np.asarray(h, np.int32) for h in histories], width)


def in_process(model, prepared):
    examples, _ = read_eval_examples(str(prepared / "test-*"))
    popularity = record_counts(str(prepared / "train-*"), NUM_ITEMS)[1]
    return evaluate_full_ranking(
        lambda histories, rows: model.score_all({"history": histories}), examples, max_length=LENGTH,
        batch_size=8, ks=KS, mask_history=True, item_popularity=popularity, num_items=NUM_ITEMS)


def assert_metrics_equal(actual, expected):
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=1e-12, err_msg=key)


def test_metrics_equal_the_in_process_evaluation(model, setup):
    export_dir, prepared = setup
    metrics = evaluate.run_evaluate(str(export_dir), str(prepared), ks=KS, batch_size=4)
    expected = in_process(model, prepared)
    names = ("HR", "NDCG", "MRR", "Recall", "Coverage", "TailRecall")
    assert {f"{name}@{k}" for name in names for k in KS} <= set(metrics)
    assert_metrics_equal(metrics, expected)
    assert metrics["num_examples"] == 23 and metrics["targets_in_history"] == 0
    assert 0 < metrics["HR@10"] < 1 and metrics["num_tail_examples"] > 0  # not a degenerate case


def test_integer_ids_and_rerun_through_the_command_line_write_identical_json(model, tmp_path, capsys):
    vocab = Vocabulary(list(range(501, 501 + NUM_ITEMS)))
    prepare(tmp_path, vocab, np.random.default_rng(1))
    export_dir = export_retrieval_model(model, vocab, tmp_path / "export", k_max=K_MAX)
    outputs = [tmp_path / "first.json", tmp_path / "second.json"]
    for output in outputs:
        argv = ["--export-dir", str(export_dir), "--prepared-dir", str(tmp_path), "--ks", "10", "5", "1",
                "--output", str(output), "--runner=DirectRunner"]
        assert evaluate.main(argv) == 0
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    written = json.loads(outputs[0].read_text())
    assert written["settings"]["ks"] == [1, 5, 10] and written["settings"]["split"] == "test"
    assert_metrics_equal(written["metrics"], in_process(model, tmp_path))
    assert "HR@10:" in capsys.readouterr().out


def test_an_empty_evaluation_leaves_an_earlier_output_alone(model, setup, tmp_path):
    export_dir, prepared = setup
    output = tmp_path / "metrics.json"
    evaluate.run_evaluate(str(export_dir), str(prepared), ks=KS, output_path=str(output))
    earlier = output.read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_tfrecords(str(empty / "test"), [], np.zeros([0], np.int64), num_shards=1)
    shutil.copy(prepared / "item_vocab.json", empty / "item_vocab.json")
    shutil.copy(prepared / "statistics.json", empty / "statistics.json")
    with pytest.raises(ValueError, match="no examples in"):
        evaluate.run_evaluate(str(export_dir), str(empty), ks=KS, output_path=str(output))
    assert output.read_bytes() == earlier  # once deleted by the empty run
    assert sorted(os.listdir(tmp_path)) == ["empty", "metrics.json"]  # no partial file left


def test_targets_in_their_history_are_counted_and_missed(model, tmp_path):
    vocab = Vocabulary(list(range(1, NUM_ITEMS + 1)))
    prepare(tmp_path, vocab, np.random.default_rng(2), target_in_history=3)
    export_dir = export_retrieval_model(model, vocab, tmp_path / "export", k_max=K_MAX)
    metrics = evaluate.run_evaluate(str(export_dir), str(tmp_path), ks=KS)
    assert metrics["targets_in_history"] == 3
    # The export removed those targets, so they are misses; the 20 others rank as in-process.
    examples, _ = read_eval_examples(str(tmp_path / "test-*"))
    scores = model.score_all({"history": evaluate_pad(examples.histories)}).numpy()
    ranks = FullRankingEvaluator(NUM_ITEMS, KS).update(scores[:20], examples.targets[:20],
                                                       evaluate_pad(examples.histories[:20], 12))
    assert metrics["HR@10"] * 23 == pytest.approx(np.sum(ranks < 10))


def test_bad_inputs_fail_clearly(model, setup, tmp_path):
    export_dir, prepared = setup
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.run_evaluate(str(tmp_path / "nowhere"), str(prepared), ks=KS)
    with pytest.raises(FileNotFoundError, match=r"holds versions \['1'\]"):
        evaluate.run_evaluate(str(export_dir.parent), str(prepared), ks=KS)
    with pytest.raises(ValueError, match=r"max\(ks\) = 20 exceeds the export's k_max = 12"):
        evaluate.run_evaluate(str(export_dir), str(prepared), ks=(5, 20))
    with pytest.raises(FileNotFoundError, match="no validation TFRecords"):
        evaluate.run_evaluate(str(export_dir), str(prepared), split="validation")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(prepared, unfinished, ignore=shutil.ignore_patterns("export", "statistics.json"))
    with pytest.raises(FileNotFoundError, match="has no statistics.json, the mark of a finished preparation"):
        evaluate.run_evaluate(str(export_dir), str(unfinished), ks=KS)
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate.run_evaluate(str(export_dir), str(prepared), split="train")
    with pytest.raises(ValueError, match=r"got 0 in ks=\(0, 5\)"):
        evaluate.run_evaluate(str(export_dir), str(prepared), ks=(0, 5))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        evaluate.run_evaluate(str(export_dir), str(prepared), ks=KS, batch_size=0)
    other = export_retrieval_model(model, Vocabulary(list(range(1, NUM_ITEMS + 1))), tmp_path / "int")
    with pytest.raises(ValueError, match="another item vocabulary than the prepared data"):
        evaluate.run_evaluate(str(other), str(prepared), ks=KS)
    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x}, input_signature=[tf.TensorSpec([None], tf.int64)])
    tf.saved_model.save(module, str(tmp_path / "plain"), signatures={"serving_default": module.f})
    with pytest.raises(ValueError, match="has no 'top_k' signature"):
        evaluate.run_evaluate(str(tmp_path / "plain"), str(prepared), ks=KS)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--export-dir", str(export_dir), "--prepared-dir", str(tmp_path)])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------- the evaluator's top-k side
def test_update_from_top_k_equals_update_on_the_same_scores():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(16, NUM_ITEMS + 1))
    histories, targets = make_examples(rng, 16)
    seen = evaluate_pad(histories, 12)
    popularity = rng.integers(0, 50, NUM_ITEMS + 1)
    expected = FullRankingEvaluator(NUM_ITEMS, KS, item_popularity=popularity)
    expected.update(scores, targets, seen)
    masked = scores.copy()
    masked[:, 0] = -np.inf
    np.put_along_axis(masked, seen.astype(np.int64), -np.inf, axis=1)
    top = np.argsort(-masked, axis=1, kind="stable")[:, :10]
    actual = FullRankingEvaluator(NUM_ITEMS, KS, item_popularity=popularity)
    actual.update_from_top_k(top, targets)
    assert actual.result() == expected.result()


def test_empty_slots_and_repeats_take_no_position_in_a_top_k_list():
    evaluator = FullRankingEvaluator(NUM_ITEMS, ks=(1, 2))
    ranks = evaluator.update_from_top_k(np.array([[0, 7, 3], [4, 4, 9], [5, 0, 5]]), np.array([7, 9, 6]))
    assert ranks.tolist() == [0, 1, 2]
    assert evaluator.result()["HR@1"] == pytest.approx(1 / 3) and evaluator.result()["HR@2"] == pytest.approx(2 / 3)
    # Coverage@2 counts the returned items 7, 3, 4, 9 and 5 (once each).
    assert evaluator.result()["Coverage@2"] == pytest.approx(5 / NUM_ITEMS)


def test_merge_equals_one_evaluator_and_checks_settings():
    rng = np.random.default_rng(4)
    top = rng.integers(0, NUM_ITEMS + 1, size=(12, 10))
    targets = rng.integers(1, NUM_ITEMS + 1, size=12)
    whole, first, second = (FullRankingEvaluator(NUM_ITEMS, KS) for _ in range(3))
    whole.update_from_top_k(top, targets)
    first.update_from_top_k(top[:5], targets[:5])
    second.update_from_top_k(top[5:], targets[5:])
    assert first.merge(second) is first and first.result() == whole.result()
    assert second.num_examples == 7  # other is left unchanged
    with pytest.raises(ValueError, match=r"different ks: \(1, 5, 10\) vs \(1, 5\)"):
        whole.merge(FullRankingEvaluator(NUM_ITEMS, (1, 5)))
    with pytest.raises(ValueError, match="different tail items"):
        whole.merge(FullRankingEvaluator(NUM_ITEMS, KS, item_popularity=np.ones(NUM_ITEMS + 1)))
    with pytest.raises(ValueError, match=r"width >= max\(ks\) = 10"):
        whole.update_from_top_k(top[:, :5], targets)
    with pytest.raises(ValueError, match=r"got 31 at row 0, column 0"):
        whole.update_from_top_k(np.full((1, 10), 31), targets[:1])


def test_an_output_that_cannot_be_written_is_refused_before_the_evaluation(model, setup, tmp_path, capsys):
    """`--output <a directory>` failed after the whole evaluation, naming a temporary
    ('...partial-<hex>'; Is a directory) in a traceback."""
    from tfx_xmatch.pipelines import cli as pipeline_cli

    export_dir, prepared = setup
    assert pipeline_cli.main(["evaluate", "--export-dir", str(export_dir), "--prepared-dir", str(prepared),
                              "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"xmatch pipeline evaluate: error: --output '{tmp_path}' is a directory; give a file path")
    assert os.listdir(tmp_path) == []


def test_a_prepared_directory_with_glob_characters_in_its_name_is_read(model, setup, tmp_path):
    """`exp[1]/` was written, then its records were looked for with the pattern 'exp[1]/test-*',
    which matches 'exp1/...' and not 'exp[1]/...'."""
    export_dir, prepared = setup
    named = tmp_path / "exp[1]"
    shutil.copytree(prepared, named, ignore=shutil.ignore_patterns("export"))
    metrics = evaluate.run_evaluate(str(export_dir), str(named), ks=KS, batch_size=4)
    assert_metrics_equal(metrics, in_process(model, prepared))


def test_records_prepared_without_one_item_sequences_report_no_tail_recall(model, setup, tmp_path, caplog):
    """A preparation before 2026-12-06 left one-item training sequences out of the train records:
    their items were missing from the popularity, and TailRecall differed from the in-process
    evaluation's without a word."""
    export_dir, prepared = setup
    older = tmp_path / "older"
    shutil.copytree(prepared, older)
    statistics = json.loads((older / "statistics.json").read_text())
    statistics.update(examples={"train": 20, "validation": 23, "test": 23}, train_sequences=23)  # as it counted them
    (older / "statistics.json").write_text(json.dumps(statistics))
    with caplog.at_level("WARNING", logger="tfx_xmatch.pipelines.evaluate"):
        metrics = evaluate.run_evaluate(str(export_dir), str(older), ks=KS, batch_size=4)
    assert not [key for key in metrics if key.startswith("TailRecall")] and "HR@10" in metrics
    assert "train records leave out one-item training sequences: TailRecall is not reported" in caplog.text
