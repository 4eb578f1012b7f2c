"""The xmatch command line: train, evaluate, quickstart and error reporting."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tfx_xmatch.cli import main
from tests.test_training import TINY


def test_train_then_evaluate(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = [arg for override in (*TINY, "train.epochs=2") for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(run_dir), *overrides]) == 0
    assert "test" in capsys.readouterr().out
    output = tmp_path / "test_metrics.json"
    assert main(["evaluate", "--run-dir", str(run_dir), "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "@10" in out and "NDCG" in out
    assert json.loads(output.read_text()) == json.loads((run_dir / "metrics.json").read_text())["test"]
    assert main(["evaluate", "--run-dir", str(run_dir), "--split", "validation",
                 "--set", "eval.mask_history=false"]) == 0


@pytest.fixture(scope="module")
def compared_runs(tmp_path_factory):
    """Runs that the compare tests read: a0 and a1 (6 epochs, seeds 0 and 1), b0 (1 epoch, seed 0)."""
    base = tmp_path_factory.mktemp("compared")
    runs = {}
    for name, epochs, seed in (("a0", 6, 0), ("a1", 6, 1), ("b0", 1, 0)):
        runs[name] = base / name
        overrides = [arg for override in (*TINY, f"train.epochs={epochs}", f"train.seed={seed}")
                     for arg in ("--set", override)]
        assert main(["train", "--run-dir", str(runs[name]), *overrides]) == 0
    return runs


def test_compare_tests_two_runs_on_the_same_users(compared_runs, tmp_path, capsys):
    # b is a copy: this test rewrites its config.
    runs = {"a": compared_runs["a0"], "b": tmp_path / "b0"}
    shutil.copytree(compared_runs["b0"], runs["b"])
    capsys.readouterr()
    output = tmp_path / "compare.json"
    assert main(["compare", "--run-dir", str(runs["a"]), "--run-dir", str(runs["b"]), "--metric", "HR@10",
                 "NDCG@10", "TailRecall@10", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "A = a0, B = b0" in printed and "paired test" in printed and "TailRecall@10" in printed
    assert "(exact sign test)" in printed  # HR@10's test, named on its line
    written = json.loads(output.read_text())
    # Like every benchmark result, it says what ran, when, where and with which versions.
    assert written["command"] == f"xmatch compare --run-dir {runs['a']} --run-dir {runs['b']} --metric HR@10 " \
                                 f"NDCG@10 TailRecall@10 --output {output}"
    assert {"date", "machine", "versions"} <= set(written) and written["benchmark"] == "compare"
    result = written["metrics"]
    tests = {name: json.loads((run / "metrics.json").read_text())["test"] for name, run in runs.items()}
    for metric in ("HR@10", "NDCG@10", "TailRecall@10"):
        assert result[metric]["mean_a"] == pytest.approx(tests["a"][metric])
        assert result[metric]["mean_b"] == pytest.approx(tests["b"][metric])
        assert result[metric]["ci_low"] <= result[metric]["difference"] <= result[metric]["ci_high"]

    assert main(["compare", "--run-dir", str(runs["a"]), "--run-dir", str(runs["a"]), "--metric", "HR@10"]) == 0
    assert "+0.0000 [+0.0000, +0.0000] p=1  no significant difference" in capsys.readouterr().out

    config = json.loads((runs["b"] / "config.json").read_text())
    config["data"]["split"] = "user_level"
    (runs["b"] / "config.json").write_text(json.dumps(config))
    _refused(capsys, "same examples.*data.split = 'leave_one_out' vs 'user_level'",
             ["compare", "--run-dir", str(runs["a"]), "--run-dir", str(runs["b"])])
    # A run evaluated without history masking ranks other candidates: refused too.
    unmasked = tmp_path / "unmasked"
    shutil.copytree(runs["a"], unmasked)
    config = json.loads((unmasked / "config.json").read_text())
    config["eval"]["mask_history"] = False
    (unmasked / "config.json").write_text(json.dumps(config))
    _refused(capsys, "eval.mask_history = True vs False",
             ["compare", "--run-dir", str(runs["a"]), "--run-dir", str(unmasked)])
    _refused(capsys, "exactly two --run-dir", ["compare", "--run-dir", str(runs["a"])])
    _refused(capsys, "not both",
             ["compare", "--run-dir", str(runs["a"]), "--runs-a", str(runs["a"]), "--runs-b", str(runs["a"])])
    _refused(capsys, "--runs-b is missing", ["compare", "--runs-a", str(runs["a"])])
    _refused(capsys, "--runs-a A1 \\[A2 ...\\] and --runs-b", ["compare"])
    _refused(capsys, "--runs-a names the same run more than once",
             ["compare", "--runs-a", str(runs["a"]), str(runs["a"]), "--runs-b", str(runs["b"])])
    _refused(capsys, f"{runs['a']} and {unmasked} do not rank the same examples",
             ["compare", "--runs-a", str(runs["a"]), "--runs-b", str(runs["a"]), str(unmasked)])
    _refused(capsys, "--confidence must be in \\(0, 1\\), e.g. 0.95, got 95.0",
             ["compare", "--run-dir", str(runs["a"]), "--run-dir", str(runs["a"]), "--confidence", "95"])
    for metric in ("AUC@3", "TailRecall10", "TailNDCG@10"):
        assert main(["compare", "--run-dir", str(runs["a"]), "--run-dir", str(runs["a"]), "--metric", metric]) == 2
        assert f"got {metric!r}" in capsys.readouterr().err
    # A cutoff past the catalogue (40 items) would count every user a hit, as evaluate refuses too.
    _refused(capsys, r"metric 'HR@500': K must be in \[1, num_items=40\], got 500",
             ["compare", "--run-dir", str(runs["a"]), "--run-dir", str(runs["a"]), "--metric", "HR@500"])


def test_compare_runs_of_two_models_over_seeds(compared_runs, tmp_path, capsys):
    runs = compared_runs
    capsys.readouterr()
    output = tmp_path / "compare.json"
    assert main(["compare", "--runs-a", str(runs["a0"]), "--runs-a", str(runs["a1"]), "--runs-b", str(runs["b0"]),
                 "--metric", "HR@10", "TailRecall@10", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "A = a0, a1; B = b0" in printed and "pairings significant" in printed
    assert "over runs: needs 2+ runs a side" in printed and "-> needs 2+ runs a side" in printed
    result = json.loads(output.read_text())
    assert result["runs_a"] == [str(runs["a0"]), str(runs["a1"])]
    hr = result["metrics"]["HR@10"]
    tests = {name: json.loads((run / "metrics.json").read_text())["test"] for name, run in runs.items()}
    assert hr["runs_a"] == pytest.approx([tests["a0"]["HR@10"], tests["a1"]["HR@10"]], abs=1e-6)
    assert hr["runs_b"] == pytest.approx([tests["b0"]["HR@10"]], abs=1e-6)
    assert len(hr["pairings"]) == 2 and hr["across_runs"] is None and hr["verdict"] == "needs 2+ runs a side"
    assert hr["significant_for_a"] == sum(p["p_value"] < 0.05 and p["difference"] > 0 for p in hr["pairings"])
    # Two runs a side: the test over runs is there (Welch), and the verdict follows both tests.
    assert main(["compare", "--runs-a", str(runs["a0"]), str(runs["a1"]), "--runs-b", str(runs["b0"]),
                 str(runs["a0"]), "--metric", "HR@10", "--output", str(output)]) == 0
    hr = json.loads(output.read_text())["metrics"]["HR@10"]
    assert hr["across_runs"]["test"] == "Welch's t-test over runs" and len(hr["pairings"]) == 4
    significant = (hr["across_runs"]["p_value"] or 1.0) < 0.05 and hr["averaged"]["p_value"] < 0.05
    assert (hr["verdict"] in ("A better", "B better")) == significant


def test_export_builds_the_cache_a_sparcode_run_was_selected_on(tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    settings = [*TINY, "train.epochs=1", "model.name=sparcode",
                "model.options={tokenizer: chunks, num_query_tokens: 4, num_codebooks: 4, num_codewords: 8, "
                "interaction_units: [8], serving_cache_fraction: 0.1}"]
    assert main(["train", "--run-dir", str(run_dir), *[arg for item in settings for arg in ("--set", item)]]) == 0
    export = ["export", "--run-dir", str(run_dir), "--export-base-path", str(tmp_path / "models"), "--k-max", "10"]
    capsys.readouterr()
    # The option survived training's save and reload: the export's default budget is the model's.
    assert main([*export, "--index", "sparse_code"]) == 0
    assert "(index sparse_code cache_fraction=0.1, k_max 10)" in capsys.readouterr().out
    assert main([*export, "--index", "sparse_code", "--index-option", "cache_fraction=null"]) == 0
    assert "(index sparse_code cache_fraction=0.1, k_max 10)" in capsys.readouterr().out
    assert main([*export, "--index", "sparse_code", "--index-option", "max_items_per_code=5"]) == 0
    assert "(index sparse_code max_items_per_code=5, k_max 10)" in capsys.readouterr().out
    with caplog.at_level("WARNING", logger="tfx_xmatch.export"):
        assert main([*export, "--index", "brute_force"]) == 0
    assert "selected through a 0.1 cache (serving_cache_fraction), but index kind 'brute_force'" in caplog.text



def test_export_refuses_bad_index_options_in_one_line_and_leaves_no_base_directory(tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    overrides = [arg for override in (*TINY, "train.epochs=1") for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(run_dir), *overrides]) == 0
    base = tmp_path / "models"
    export = ["export", "--run-dir", str(run_dir), "--export-base-path", str(base), "--k-max", "10"]
    capsys.readouterr()
    # Once a raw TypeError traceback ("'<' not supported between instances of 'str' and 'int'").
    _refused(capsys, "num_partitions must be an integer >= 1, got 'abc'",
             [*export, "--index", "partitioned", "--index-option", "num_partitions=abc"])
    _refused(capsys, "needs a SparCode model", [*export, "--index", "sparse_code"])
    assert not base.exists()  # a failed export once left an empty base directory behind
    # An approximate index that cannot fill k_max slots says so at export, not only in the answers.
    with caplog.at_level("WARNING", logger="tfx_xmatch.export"):
        assert main([*export, "--index", "partitioned", "--index-option", "num_partitions=40",
                     "--index-option", "num_probes=1"]) == 0
    assert "index kind 'partitioned': a top-10 search returned only" in caplog.text
    assert "num_partitions=40, num_probes=1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tfx_xmatch.export"):
        assert main([*export, "--index", "partitioned", "--index-option", "num_partitions=2",
                     "--index-option", "num_probes=2"]) == 0
    assert "search returned only" not in caplog.text  # every partition probed: exact, no warning


def test_export_of_item_ids_that_include_zero_takes_another_padding_id(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    table = tmp_path / "plays.csv"
    table.write_text("user,item\n" + "".join(f"u{user},{item}\n" for user in range(40)
                                             for item in rng.integers(0, 20, size=8)))
    run_dir = tmp_path / "run"
    overrides = [arg for override in (*TINY, f"data.dataset={table}", "data.format=table", "train.epochs=1")
                 for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(run_dir), *overrides]) == 0
    export = ["export", "--run-dir", str(run_dir), "--export-base-path", str(tmp_path / "models"), "--k-max", "5"]
    capsys.readouterr()
    _refused(capsys, r"padding_id 0 is also a real item id; choose another one, e.g. -1 \(xmatch export / xmatch "
                     r"pipeline run --padding-id", export)
    _refused(capsys, "padding_id 'none': the item ids are integers", [*export, "--padding-id", "none"])
    assert main([*export, "--padding-id=-1"]) == 0
    version = tmp_path / "models" / "1"
    served = json.loads((version / "assets.extra" / "xmatch_model.json").read_text())["serving"]
    assert served == {"padding_id": -1, "max_length": 12, "k_max": 5, "default_k": 5}
    import tensorflow as tf

    answer = tf.saved_model.load(str(version)).signatures["top_k"](
        history=tf.constant([[-1, -1, 0, 3]], tf.int64), k=tf.constant([5], tf.int32))
    items = answer["item_ids"].numpy()[0].tolist()
    assert len(items) == 5 and 0 not in items and 3 not in items  # item 0 is an item here, excluded as history


@pytest.mark.parametrize("argv, level", [
    (["compare", "--log-level", "DEBUG"], "DEBUG"),  # where the error messages suggest it
    (["--log-level", "INFO", "compare"], "INFO"),
    (["--log-level", "INFO", "export", "--run-dir", "r", "--export-base-path", "m", "--log-level", "ERROR"], "ERROR"),
    (["quickstart"], "WARNING"),
])
def test_the_log_level_may_come_before_or_after_the_command(argv, level):
    from tfx_xmatch.cli import build_parser

    assert build_parser().parse_args(argv).log_level == level


def test_config_file_and_bad_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  embeding_dim: 8\n")
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown config key 'model.embeding_dim'" in capsys.readouterr().err


def _refused(capsys, pattern, arguments):
    """The command fails as every other bad input does: exit status 2 and one error line."""
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert re.search(pattern, error) and f"xmatch {arguments[0]}: error: " in error, error


@pytest.mark.parametrize("level", [["--log-level", "INFO"], ["--log-level=INFO"]])
def test_the_global_log_level_reaches_the_passthrough_commands(level, capsys):
    # Once, a leading --log-level hid the command: its flags were "unrecognized arguments".
    with pytest.raises(SystemExit) as exit_info:
        main([*level, "pipeline", "prepare", "--help"])
    assert exit_info.value.code == 0
    assert "--input" in capsys.readouterr().out


def test_evaluate_needs_a_run_directory(tmp_path, capsys):
    assert main(["evaluate", "--run-dir", str(tmp_path / "missing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_evaluate_refuses_to_change_the_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    _refused(capsys, "only eval", ["evaluate", "--run-dir", str(tmp_path), "--set", "model.embedding_dim=3"])


def test_a_run_on_a_file_given_by_relative_path_evaluates_from_elsewhere(tmp_path, monkeypatch, capsys):
    """data.dataset is stored as given; from another directory the file's path may be given
    again, and a file with other items is refused rather than ranked with the wrong ids."""
    from tfx_xmatch.data import make_synthetic

    sequences = make_synthetic(num_users=120, num_items=30, min_length=6, max_length=12, seed=0).sequences
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.txt").write_text(
        "".join(f"{user + 1} {item}\n" for user, items in enumerate(sequences) for item in items))
    (tmp_path / "data" / "other.txt").write_text("".join(f"{user} {item}\n" for user in range(1, 60)
                                                         for item in (user, user + 100, user + 200)))
    monkeypatch.chdir(tmp_path)
    train = [arg for override in ("data.dataset=data/pairs.txt", "data.format=pairs", "model.embedding_dim=8",
                                  "model.max_length=8", "train.epochs=1", "train.verbose=0", "eval.ks=[1, 10]")
             for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(tmp_path / "run"), *train]) == 0
    monkeypatch.chdir(tmp_path / "data")
    capsys.readouterr()
    _refused(capsys, "not found", ["evaluate", "--run-dir", str(tmp_path / "run")])
    assert main(["evaluate", "--run-dir", str(tmp_path / "run"), "--set", "data.dataset=pairs.txt"]) == 0
    _refused(capsys, "does not hold the items the model .* was trained on",
             ["evaluate", "--run-dir", str(tmp_path / "run"), "--set", "data.dataset=other.txt"])


def test_quickstart_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tfx_xmatch.cli", "quickstart", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-10 retrieved" in result.stdout and "ground truth of the generator" in result.stdout
    assert (tmp_path / "training_curves.png").exists()


def test_help_is_not_interleaved_with_tensorflow_start_up_notes():
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "tfx_xmatch.cli", "query", "--help"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0 and "usage: xmatch query" in result.stdout
    # "oneDNN custom operations are on" and the CPU-instructions note are INFO lines.
    assert "oneDNN" not in result.stderr and "cpu_feature_guard" not in result.stderr, result.stderr


def test_a_tensorflow_error_from_the_data_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    import tensorflow as tf

    from tfx_xmatch import training

    def corrupt(*args, **kwargs):
        # As eager tf.data words it: the function and op names are TensorFlow's, not the user's.
        raise tf.errors.DataLossError(None, None, (
            "{{function_node __wrapped__IteratorGetNext_output_types_1_device_/job:localhost/replica:0/"
            "task:0/device:CPU:0}} truncated record at 54 [Op:IteratorGetNext] name: "))

    monkeypatch.setattr(training, "train", corrupt)
    assert main(["train", "--run-dir", str(tmp_path / "run"), *[arg for o in TINY for arg in ("--set", o)]]) == 2
    assert capsys.readouterr().err.strip() == ("xmatch train: error: truncated record at 54 "
                                               "(--log-level DEBUG shows the traceback)")


def test_a_pipeline_stage_prints_tensorflow_errors_as_one_line(capsys, monkeypatch):
    import importlib

    import tensorflow as tf

    from tfx_xmatch.pipelines import cli as pipeline_cli

    stage = importlib.import_module(pipeline_cli.STAGES["evaluate"][0])

    def corrupt(argv):
        raise tf.errors.DataLossError(None, None, "corrupted record at 0\n\t [[{{node ReadRecord}}]]")

    monkeypatch.setattr(stage, "main", corrupt)
    assert pipeline_cli.main(["evaluate"]) == 2
    assert capsys.readouterr().err.strip() == "xmatch pipeline evaluate: error: corrupted record at 0"


SIGNAL_AT_EPOCH_2 = """
import os, signal, sys
import tensorflow as tf
from tfx_xmatch import cli, training

# As from a terminal: a pytest-xdist worker starts its children with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

class SignalAtEpoch2(tf.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            os.kill(os.getpid(), getattr(signal, os.environ["XMATCH_TEST_SIGNAL"]))

train = training.train
training.train = lambda config, run_dir, split=None, callbacks=(): train(config, run_dir, split,
                                                                          [*callbacks, SignalAtEpoch2()])
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signal_name, exit_code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_ends_train_with_one_line_and_the_run_resumes(signal_name, exit_code, tmp_path):
    """SIGTERM ended the process at once (no clean-up, no message) and Ctrl-C printed a
    traceback of 20 to 115 lines, in every command."""
    run_dir = tmp_path / "run"
    overrides = [arg for override in (*TINY, "train.epochs=3", "train.early_stopping_patience=0")
                 for arg in ("--set", override)]
    env = dict(os.environ, XMATCH_TEST_SIGNAL=signal_name, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", SIGNAL_AT_EPOCH_2, "train", "--run-dir", str(run_dir), *overrides],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == exit_code, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"xmatch train: interrupted by {signal_name}; run the same command again to resume from the last "
        "finished epoch")
    assert not (run_dir / "metrics.json").exists()
    assert [path.name for path in run_dir.glob(".*")] == []  # the atomic writes' temporaries went with it
    assert main(["train", "--run-dir", str(run_dir), *overrides]) == 0
    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3]


def test_an_interruption_inside_a_beam_transform_is_an_interruption_not_a_usage_error(monkeypatch, capsys):
    """Beam re-raises a KeyboardInterrupt that reached a transform as RuntimeError("KeyboardInterrupt
    [while running ...]"): `xmatch pipeline prepare` printed it as an error and exited 2."""
    import apache_beam as beam

    from tfx_xmatch.pipelines import cli as pipeline_cli, prepare

    def interrupted(argv):
        def stop(element):
            raise KeyboardInterrupt()

        with beam.Pipeline() as pipeline:
            _ = pipeline | beam.Create([1]) | beam.Map(stop)

    monkeypatch.setattr(prepare, "main", interrupted)
    assert pipeline_cli.main(["prepare"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "xmatch pipeline prepare: interrupted by SIGINT"
    # An interrupted `pipeline run` says how to go on, as `xmatch train` does.
    from tfx_xmatch.pipelines import run

    monkeypatch.setattr(run, "main", interrupted)
    assert pipeline_cli.main(["run"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "xmatch pipeline run: interrupted by SIGINT; run the same command with --resume to keep the stages it finished")


def test_outputs_that_would_replace_a_run_s_files_or_fail_after_the_work_are_refused_first(tmp_path, capsys):
    """`evaluate --output RUN/config.json` replaced the run's config (exit 0); an --output that
    is a directory failed only after the evaluation, naming a temporary file; an export into the
    run directory mixed with its files."""
    run_dir = tmp_path / "run"
    overrides = [arg for override in (*TINY, "train.epochs=1") for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(run_dir), *overrides]) == 0
    config = (run_dir / "config.json").read_text()
    capsys.readouterr()
    _refused(capsys, r"--output '.*config.json' would replace a file of the run",
             ["evaluate", "--run-dir", str(run_dir), "--output", str(run_dir / "config.json")])
    assert (run_dir / "config.json").read_text() == config
    _refused(capsys, r"--output '.*' is a directory; give a file path",
             ["evaluate", "--run-dir", str(run_dir), "--output", str(tmp_path)])
    (tmp_path / "afile").write_text("x")
    _refused(capsys, r"'.*afile' is a file, not a directory",
             ["evaluate", "--run-dir", str(run_dir), "--output", str(tmp_path / "afile" / "m.json")])
    _refused(capsys, r"--output '.*metrics.json' would replace a file of the run",
             ["compare", "--run-dir", str(run_dir), "--run-dir", str(tmp_path / "other"), "--metric", "HR@10",
              "--output", str(run_dir / "metrics.json")])
    _refused(capsys, "is the run's own directory",
             ["export", "--run-dir", str(run_dir), "--export-base-path", str(run_dir)])
    # A new name beside the run's files replaces nothing.
    assert main(["evaluate", "--run-dir", str(run_dir), "--output", str(run_dir / "test_eval.json")]) == 0
    (run_dir / "test_eval.json").unlink()
    assert sorted(path.name for path in run_dir.iterdir()) == sorted(
        ["config.json", "data.json", "history.json", "metrics.json", "training_curves.png", "model", "best_weights"])


def test_a_refused_training_leaves_no_directory_and_no_config_that_blocks_the_corrected_run(tmp_path, capsys):
    """Refused options left an empty run directory; a split without validation users trained,
    then failed with "examples is empty" and left a config.json that refused the corrected
    re-run ("holds a run with a different config"): it is refused before the config is written."""
    run_dir = tmp_path / "run"
    overrides = [arg for override in (*TINY, "train.epochs=1") for arg in ("--set", override)]
    for bad, message in [("model.embedding_dim=0", r"the model settings \(model.\*\) are refused: embedding_dim"),
                         ("model.num_heads=3", "in layer 'sasrec_encoder': model width 16 is not divisible by "
                                               "num_heads=3 \\(--log-level"),
                         ("data.split=user_level", "leaves no validation and no test examples")]:
        extra = ["--set", "data.split_options={fractions: [1.0, 0.0, 0.0]}"] if "split" in bad else []
        _refused(capsys, message, ["train", "--run-dir", str(run_dir), *overrides, "--set", bad, *extra])
        assert not run_dir.exists(), bad
    _refused(capsys, "leaves no validation and no test examples",  # nor the parents it made
             ["train", "--run-dir", str(tmp_path / "new" / "seed0"), *overrides, "--set", "data.split=user_level",
              "--set", "data.split_options={fractions: [1.0, 0.0, 0.0]}"])
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    _refused(capsys, "run directory '.*afile' is a file, not a directory",
             ["train", "--run-dir", str(tmp_path / "afile"), *overrides])


@pytest.mark.parametrize("arguments, message", [
    (["--log-level", "FOO", "train"], "unknown logging level 'FOO'"),
    (["train", "--log-level", "FOO"], "unknown logging level 'FOO'"),
    (["--log-level", "FOO", "pipeline", "prepare", "--help"], "unknown logging level 'FOO'"),
    (["serve", "--model_base_path", "m", "--port", "-1"], "a port number is in 0..65535, got -1"),
    (["serve", "--model_base_path", "m", "--rest_api_port", "70000"], "a port number is in 0..65535, got 70000"),
    (["query", "--server", "localhost:1", "--status", "--timeout", "-5"], "the timeout must be a positive number"),
])
def test_bad_flag_values_are_usage_errors(arguments, message, capsys):
    """A bad --log-level ended in a ValueError traceback; --port -1 served on 65535 and 70000 on
    4464; --timeout -5 was sent and came back DEADLINE_EXCEEDED."""
    try:
        code = main(arguments)
    except SystemExit as exit_info:  # argparse's own exit
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_keras_wrapped_layer_errors_print_as_the_layer_s_own_message():
    import tensorflow as tf

    from tfx_xmatch.user_errors import user_error_text

    class Failing(tf.keras.layers.Layer):
        def call(self, inputs):
            raise ValueError("model width 8 is not divisible by num_heads=3")

    with pytest.raises(ValueError) as info:
        Failing(name="encoder")(tf.zeros([2, 3]))
    assert "Call arguments received" in str(info.value)  # what Keras says around it
    assert user_error_text(info.value, (ValueError,)) == (
        "in layer 'encoder': model width 8 is not divisible by num_heads=3")


def test_a_warm_start_says_what_it_carried_over_at_the_default_log_level(tmp_path, caplog):
    """The warm start, and with a changed catalogue how many items it carried over by id, were
    logged at INFO, which the default --log-level WARNING hid: such a run looked like any other."""
    import logging

    overrides = [arg for override in (*TINY, "train.epochs=1") for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(tmp_path / "source"), *overrides]) == 0
    logging.getLogger("tfx_xmatch.warm_start").setLevel(logging.NOTSET)  # as a fresh process has it
    caplog.clear()
    assert main(["train", "--run-dir", str(tmp_path / "warm"), *overrides,
                 "--set", f"train.warm_start={tmp_path / 'source'}"]) == 0
    assert f"warm start from {tmp_path / 'source' / 'model'}" in caplog.text


def test_file_system_errors_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    """A read-only, immutable or full output location ended `evaluate --output`, `train` and
    `export` with a traceback, the full disk's naming no path; `pipeline` stages had no
    NotADirectoryError, IsADirectoryError nor FileExistsError among their handled errors."""
    import errno

    from tfx_xmatch import io_utils
    from tfx_xmatch.pipelines import cli as pipeline_cli
    from tfx_xmatch.pipelines import prepare

    run_dir = tmp_path / "run"
    overrides = [arg for override in (*TINY, "train.epochs=1") for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(run_dir), *overrides]) == 0
    capsys.readouterr()

    def full(path, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_utils, "write_json_atomic", full)
    output = tmp_path / "m.json"
    _refused(capsys, rf"error: No space left on device \(writing {output}\) \(--log-level",
             ["evaluate", "--run-dir", str(run_dir), "--output", str(output)])

    def read_only(argv):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/out/.statistics.json.tmp")

    monkeypatch.setattr(prepare, "main", read_only)
    assert pipeline_cli.main(["prepare", "--output-dir", "/mnt/ro/out"]) == 2
    assert capsys.readouterr().err.strip() == (
        "xmatch pipeline prepare: error: /mnt/ro/out/.statistics.json.tmp: Read-only file system")
    for error in (NotADirectoryError("'x' is a file, not a directory"), FileExistsError("'x' exists")):
        monkeypatch.setattr(prepare, "main", lambda argv, error=error: (_ for _ in ()).throw(error))
        assert pipeline_cli.main(["prepare"]) == 2
        assert capsys.readouterr().err.strip() == f"xmatch pipeline prepare: error: {error}"
    # An OSError without an errno is no file system's: a bug keeps its traceback.
    monkeypatch.setattr(prepare, "main", lambda argv: (_ for _ in ()).throw(OSError("bad call")))
    with pytest.raises(OSError, match="bad call"):
        pipeline_cli.main(["prepare"])


def test_only_file_system_errors_are_said_as_a_path_and_its_reason():
    """Every OSError with an errno was said as a file problem: a connection reset became
    "Connection reset by peer (writing runs/x)", in place of its traceback."""
    from tfx_xmatch.user_errors import os_error_text

    assert os_error_text(ConnectionResetError(104, "Connection reset by peer"), "runs/x") is None
    assert os_error_text(OSError(28, "No space left on device"), "runs/x") == "No space left on device (writing runs/x)"
    assert os_error_text(PermissionError(13, "Permission denied", "/ro/m.json")) == "/ro/m.json: Permission denied"
