"""`xmatch bench --quick` on tiny synthetic data: every model and every plot makes it into the report."""

import json
import pathlib
import re

import numpy as np
import pytest
import yaml

from tfx_xmatch.bench import cli
from tfx_xmatch.bench.suite import load_suite, summarize
from tfx_xmatch.config import ConfigError

SUITE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "suite.yaml"
TINY = ["model.embedding_dim=8", "model.max_length=12", "model.num_blocks=1", "train.batch_size=64",
        "eval.batch_size=256", "data.synthetic={num_users: 120, num_items: 60, min_length: 6, max_length: 14}"]


def test_shipped_suite_parses_in_both_modes():
    full, quick = load_suite(SUITE), load_suite(SUITE, quick=True)
    assert set(full.models) == {"two_tower_mean", "two_tower_sasrec", "sparcode", "sparc", "t2diff"}
    assert list(quick.datasets) == ["ml-100k"] and quick.models == full.models
    assert max(full.index_latency["sizes"]) == 10**6


def test_quick_run_writes_report_with_every_model_and_plot(tmp_path):
    suite = yaml.safe_load(SUITE.read_text())
    for model in suite["models"].values():
        model["config"] = str((SUITE.parent / model["config"]).resolve())
    suite["quick"]["datasets"] = {"synthetic": {"budget_minutes": 0.05, "overrides": TINY}}
    suite["quick"].update(epochs=1, latency_users=3, index_latency={"sizes": [300], "queries": 5, "warmup": 1})
    suite["models"]["sparcode"]["overrides"] = ["model.options.num_codewords=16", "model.options.num_query_tokens=2"]
    suite["models"]["sparc"]["overrides"] = ["model.options.num_codewords=8", "model.options.num_levels=2"]
    suite["models"]["t2diff"]["overrides"] = ["model.options.session_length=4", "model.options.history_length=8",
                                              "model.options.denoiser=mlp"]
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))

    assert cli.main(["--suite", str(path), "--quick", "--runs-dir", str(tmp_path / "runs"),
                     "--output-dir", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "quick" / "REPORT.md").read_text()
    for model in ("two_tower_mean", "two_tower_sasrec", "sparcode", "sparc", "t2diff"):
        assert f"| {model} |" in report, model
    for path_label in ("hard (K=1)", "soft K=4", "DDPM-50", "DDIM-10", "cache 10%", "brute force"):
        assert path_label in report, path_label
    for plot in ("report_quality.png", "report_index_latency.png", "report_t2diff_steps.png",
                 "report_sparcode_cache.png"):
        assert (tmp_path / "out" / "quick" / plot).stat().st_size > 1000, plot
        assert f"]({plot})" in report
    result = json.loads((tmp_path / "out" / "bench_quick.json").read_text())
    assert result["machine"]["cpu_count"] and result["versions"]["tensorflow"] and result["seeds"] == [0]
    assert {row["kind"] for row in result["index_latency"]} == {"brute_force", "partitioned", "scann", "sparse_code"}
    assert all(0.0 <= row["HR@10"] <= 1.0 for row in result["rows"])
    assert result["complete"] and not result["failures"] and not any(row["reused"] for row in result["rows"])
    assert all(row["train_sequences_per_second"] > 0 for row in result["rows"])
    assert result["command"].startswith("xmatch bench --suite")  # this call's arguments, not pytest's
    # The settings that made the numbers: the suite as run and each training's resolved config.
    assert result["settings"]["epochs"] == 1 and result["settings"]["patience"] == suite["quick"]["patience"]
    assert result["settings"]["models"]["sparc"]["overrides"] == suite["models"]["sparc"]["overrides"]
    sparc = result["configs"]["synthetic/sparc/seed0"]
    assert sparc["model"]["options"]["num_levels"] == 2 and sparc["train"]["epochs"] == 1
    assert sparc["train"]["max_train_seconds"] == 3.0 and sparc["data"]["dataset"] == "synthetic"
    assert "- sparc overrides: `model.options.num_codewords=8 model.options.num_levels=2`" in report
    assert "at most 1 epochs, early-stopping patience 3" in report


def _tiny_suite(tmp_path, models: dict) -> pathlib.Path:
    suite = yaml.safe_load(SUITE.read_text())
    suite["models"] = models
    suite["quick"] = {"datasets": {"synthetic": {"budget_minutes": 0.05, "overrides": TINY}}, "epochs": 1,
                      "latency_users": 3, "sweeps": {}, "index_latency": {"sizes": [300], "queries": 5, "warmup": 1,
                                                                          "kinds": ["brute_force"]}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_a_failing_model_is_reported_and_a_resumed_run_says_what_it_reused(tmp_path, capsys):
    mean = {"config": str((SUITE.parent / "../configs/ml1m_mean.yaml").resolve()), "paths": [{"kind": "brute_force"}]}
    # A config that loads but whose model cannot be built: it fails in the run, not when the suite loads.
    broken = {**mean, "overrides": ["model.user_tower=nope"]}
    suite = _tiny_suite(tmp_path, {"two_tower_mean": mean, "broken": broken})
    arguments = ["--suite", str(suite), "--quick", "--runs-dir", str(tmp_path / "runs"), "--output-dir",
                 str(tmp_path / "out")]

    assert cli.main(arguments) == 1  # the suite finishes, and the exit status says a model failed
    assert "FAILED synthetic / broken / seed 0" in capsys.readouterr().err
    report = (tmp_path / "out" / "quick" / "REPORT.md").read_text()
    assert "## Failed" in report and "broken" in report and "| two_tower_mean | brute force |" in report

    assert cli.main(arguments) == 2  # a non-empty runs directory is not silently reused
    assert "pass --resume" in capsys.readouterr().err

    assert cli.main([*arguments, "--resume"]) == 1
    result = json.loads((tmp_path / "out" / "bench_quick.json").read_text())
    (row,) = result["rows"]
    assert row["reused"] and row["trained_on"] and result["resume"]
    report = (tmp_path / "out" / "quick" / "REPORT.md").read_text()
    assert "1 of 1 trainings were reused" in report and "| two_tower_mean ↺ |" in report


def test_a_run_cut_short_leaves_the_last_complete_result_and_report(tmp_path, monkeypatch):
    """Progress replaced bench.json after the first model, so a run killed then left a one-row
    result beside the previous run's REPORT.md."""
    from tfx_xmatch.bench import suite as bench_suite

    mean = {"config": str((SUITE.parent / "../configs/ml1m_mean.yaml").resolve()), "paths": [{"kind": "brute_force"}]}
    arguments = ["--suite", str(_tiny_suite(tmp_path, {"two_tower_mean": mean})), "--quick", "--output-dir",
                 str(tmp_path / "out")]
    assert cli.main([*arguments, "--runs-dir", str(tmp_path / "runs")]) == 0
    out = tmp_path / "out"
    complete = {path: path.read_bytes() for path in (out / "bench_quick.json", out / "quick" / "REPORT.md")}
    assert not (out / "bench_quick.partial.json").exists()

    def killed_after_one_model(suite, data_dir, runs_dir, on_progress=None):
        on_progress({"rows": [], "failures": [], "index_latency": [], "seeds": [0]})
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_suite, "run_suite", killed_after_one_model)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*arguments, "--runs-dir", str(tmp_path / "runs2")])
    assert {path: path.read_bytes() for path in complete} == complete
    assert json.loads((out / "bench_quick.partial.json").read_text())["complete"] is False  # what it measured
    # A report that fails to render replaces no plot either (they were written first).
    from tfx_xmatch.bench import report

    files = {path: path.read_bytes() for path in (out / "quick").iterdir()}
    assert {path.name for path in files} >= {"REPORT.md", *report.PLOTS.values()}

    def fails(*args):
        raise RuntimeError("cannot render")

    monkeypatch.setattr(report, "markdown", fails)
    result = json.loads((out / "bench_quick.json").read_text())
    result["summary"][0]["HR@10"] = 0.0  # other numbers, other plots
    with pytest.raises(RuntimeError, match="cannot render"):
        report.write_report(result, out / "quick")
    assert {path: path.read_bytes() for path in (out / "quick").iterdir()} == files


def test_summary_is_the_mean_and_sample_std_over_seeds_with_ratios_to_the_baseline():
    def row(model, path, seed, hr, p50, build):
        return {"dataset": "d", "model": model, "path": path, "seed": seed, "HR@10": hr, "p50_ms": p50,
                "p99_ms": 2 * p50, "index_build_seconds": build, "index_bytes": 100,
                "train_sequences_per_second": 10.0 * (seed + 1)}

    summary = summarize([row("two_tower_sasrec", "brute force", 0, 0.2, 1.0, 0.001),
                         row("two_tower_sasrec", "brute force", 1, 0.4, 3.0, 0.001),
                         row("sparcode", "cache 10%", 0, 0.1, 4.0, 2.0)])
    baseline = next(entry for entry in summary if entry["model"] == "two_tower_sasrec")
    other = next(entry for entry in summary if entry["model"] == "sparcode")
    assert baseline["seeds"] == 2 and baseline["HR@10"] == pytest.approx(0.3)
    assert baseline["HR@10_std"] == pytest.approx(0.1414213, rel=1e-5)  # sample (n - 1) std
    assert other["HR@10_std"] is None  # one seed: no spread to report
    assert other["p50_ms_vs_two_tower"] == pytest.approx(2.0)
    assert other["p99_ms_vs_two_tower"] == pytest.approx(2.0)
    assert other["train_sequences_per_second_vs_two_tower"] == pytest.approx(10.0 / 15.0)
    assert other["index_bytes_vs_two_tower"] == pytest.approx(1.0)
    assert "index_build_seconds_vs_two_tower" not in other  # a ~0 s baseline makes no ratio


@pytest.mark.parametrize("change, message", [
    (lambda s: s["datasets"]["ml-1m"].update(budget_minute=5), "unknown key(s) ['budget_minute']"),
    (lambda s: s["datasets"]["ml-1m"].pop("budget_minutes"), "needs 'budget_minutes'"),
    (lambda s: s["models"]["sparc"].update(overrides=["train.seed=3"]), "overrides 'train.seed'"),
    (lambda s: s["datasets"]["beauty"].update(overrides=["data.split=time"]), "overrides 'data.split'"),
    # These were read only after every training: a typo crashed the run or measured something else.
    (lambda s: s["index_latency"].update(size=[10]), "index_latency has unknown key(s) ['size']"),
    (lambda s: s["sweeps"].update(t2dif=[]), "sweeps name model(s) ['t2dif']"),
    (lambda s: s["models"]["sparcode"]["paths"][0].update(cache_fration=0.1),
     "has unknown key(s) ['cache_fration']; a sparse_code path takes ['cache_fraction']"),
    (lambda s: s["models"]["sparc"]["paths"].append({"kind": "soft"}), "whose kind is not one of"),
    # Settings the configs own but every model must share: a different split, masking or
    # selection metric would rank one model on other terms than the rest.
    (lambda s: s["models"]["sparc"].update(overrides=["data.side_info=true"]),
     "must share data.side_info, but the configs (with their overrides) give sparc True, sparcode False"),
    (lambda s: s["models"]["t2diff"].update(overrides=["eval.mask_history=false"]),
     "t2diff False"),
    (lambda s: s["models"]["sparcode"].update(overrides=["train.validation_every=2"]),
     "sparcode 2"),
    (lambda s: s["models"]["sparcode"].update(overrides=["data.split_options={min_length: 5}"]),
     "sparcode {'min_length': 5}"),
    (lambda s: s["models"]["sparc"].update(config="missing.yaml"), "model 'sparc':"),
])
def test_suite_entries_are_checked(tmp_path, change, message):
    suite = yaml.safe_load(SUITE.read_text())
    for model in suite["models"].values():
        model["config"] = str((SUITE.parent / model["config"]).resolve())
    change(suite)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_suite(path)


def test_a_bad_suite_file_is_named(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text("seeds: [0]\ncolour: blue\n")
    assert cli.main(["--suite", str(path)]) == 2
    error = capsys.readouterr().err
    assert "unknown key(s) ['colour']" in error and str(path) in error
    # Not UTF-8: it ended in a UnicodeDecodeError traceback.
    path.write_bytes(b"seeds: [0]\n# caf\xe9\n")
    assert cli.main(["--suite", str(path), "--output-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]) == 2
    error = capsys.readouterr().err
    assert f"cannot read the suite file {str(path)!r}" in error and "can't decode byte 0xe9" in error


def test_an_installed_package_asks_for_the_paths_it_cannot_default_to(tmp_path, monkeypatch, capsys):
    """Installed, the defaults pointed into site-packages: the suite was "not found" there and
    the runs directory under it was the one cleared."""
    monkeypatch.setattr(cli, "REPO_ROOT", None)
    assert cli.main(["--quick"]) == 2
    error = capsys.readouterr().err
    assert "give --suite, --output-dir, --runs-dir" in error and "site-packages" not in error
    assert cli.main(["--suite", str(SUITE), "--output-dir", str(tmp_path)]) == 2
    assert "give --runs-dir" in capsys.readouterr().err


def test_the_source_revision_is_tfx_xmatch_s_own_commit_or_none(tmp_path, monkeypatch):
    """A package sitting inside another git repository reported that repository's commit."""
    import subprocess

    from tfx_xmatch.bench import environment

    outer = tmp_path / "project"
    package = outer / "vendor" / "tfx_xmatch_copy"
    (package / "tfx_xmatch").mkdir(parents=True)
    (package / "setup.py").write_text("")
    (package / "tfx_xmatch" / "__init__.py").write_text("")

    def git(*args):
        return subprocess.run(["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "the user's project")
    monkeypatch.setattr(environment, "source_checkout", lambda: package)
    assert environment.source_revision() == {"commit": None, "uncommitted_changes": None}  # untracked copy
    git("add", "vendor")
    git("commit", "-q", "-m", "tracked: a monorepo")
    assert environment.source_revision() == {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": False}
    monkeypatch.setattr(environment, "source_checkout", lambda: None)
    assert environment.source_revision() == {"commit": None, "uncommitted_changes": None}


def test_the_command_names_the_environment_that_changes_tensorflow_s_speed(monkeypatch):
    """A oneDNN-off run and a default run of the same arguments were recorded as one command."""
    from tfx_xmatch.bench import environment

    for name in environment.PERFORMANCE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # logging only: not part of the command
    assert environment.header("b", ["--merge"], "xmatch bench")["command"] == "xmatch bench --merge"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false --xla_dump_to=/tmp/a b")
    assert environment.header("b", ["--merge"], "xmatch bench")["command"] == (
        "TF_ENABLE_ONEDNN_OPTS=0 XLA_FLAGS='--xla_cpu_enable_fast_math=false --xla_dump_to=/tmp/a b' "
        "xmatch bench --merge")
    monkeypatch.setattr(environment.sys, "argv", ["benchmarks/t2diff_export.py", "--merge"])
    assert environment.header("b")["command"].startswith("TF_ENABLE_ONEDNN_OPTS=0 XLA_FLAGS=")
    assert environment.header("b")["command"].endswith(" python benchmarks/t2diff_export.py --merge")


def test_no_available_dataset_is_named(tmp_path, capsys):
    assert cli.main(["--suite", str(SUITE), "--quick", "--data-dir", str(tmp_path)]) == 2
    assert "none of the suite's datasets ['ml-100k']" in capsys.readouterr().err


def test_a_brute_force_serving_path_equals_exact_full_ranking_beyond_the_window():
    """Histories longer than the model's window: the path must exclude the whole history."""
    import tensorflow as tf

    from tfx_xmatch import training
    from tfx_xmatch.bench.serving_paths import evaluate_path, serving_path
    from tfx_xmatch.config import load_config
    from tfx_xmatch.data import EvalExamples

    config = load_config(None, ["data.synthetic={num_users: 80, num_items: 200, min_length: 120, max_length: 160}",
                                "model.embedding_dim=8", "model.max_length=6", "model.num_blocks=1"])
    split = training.prepare_split(config)
    # Targets inside their own history are ranked by the protocol: the served search must not
    # drop them (it did, and ranked them last).
    assert sum(target in history for history, target in zip(split.test.histories, split.test.targets)) >= 10
    assert min(len(history) for history in split.test.histories) > 100
    tf.keras.utils.set_random_seed(0)
    model = training.build_model(config, split.dataset)
    exact = training.evaluate(model, split, "test", config)
    served = evaluate_path(serving_path(model, split.num_items, {"kind": "brute_force"}), model, split, config)
    # A two-tower's user vector is its encoder state: the backbone-alone path answers the same.
    backbone = serving_path(model, split.num_items, {"kind": "brute_force", "backbone_only": True})
    assert backbone.label == "backbone alone (branch off)"
    backbone_metrics = evaluate_path(backbone, model, split, config)
    for key in ("HR@10", "NDCG@10", "MRR@20", "Recall@50", "TailRecall@50", "Coverage@50"):
        assert abs(served[key] - exact[key]) < 1e-9, key
        assert abs(backbone_metrics[key] - exact[key]) < 1e-9, key
    # Per-user ranks agree too, so a paired comparison of the two paths finds no difference.
    _, served_ranks = evaluate_path(serving_path(model, split.num_items, {"kind": "brute_force"}), model, split,
                                    config, return_ranks=True)
    _, backbone_ranks = evaluate_path(backbone, model, split, config, return_ranks=True)
    assert served_ranks.shape == (len(split.test.targets),)
    np.testing.assert_array_equal(served_ranks, backbone_ranks)
    # The XLA-compiled user side answers as the plain one does (up to float rounding).
    compiled = serving_path(model, split.num_items, {"kind": "brute_force", "jit_compile": True})
    assert compiled.label == "brute force (XLA)"
    _, compiled_ranks = evaluate_path(compiled, model, split, config, return_ranks=True)
    np.testing.assert_array_equal(compiled_ranks, served_ranks)
    # Without history masking the protocol ranks the history too: so does the served search.
    unmasked = load_config(None, ["data.synthetic={num_users: 80, num_items: 200, "
                                  "min_length: 120, max_length: 160}", "model.embedding_dim=8", "model.max_length=6",
                                  "model.num_blocks=1", "eval.mask_history=false"])
    exact_unmasked = training.evaluate(model, split, "test", unmasked)
    served_unmasked = evaluate_path(serving_path(model, split.num_items, {"kind": "brute_force"}), model, split,
                                    unmasked)
    assert exact_unmasked["HR@10"] != exact["HR@10"]
    for key in ("HR@10", "NDCG@10", "Recall@50"):
        assert abs(served_unmasked[key] - exact_unmasked[key]) < 1e-9, key
    # A batch whose every history is empty excludes nothing (it used to fail building the
    # exclusion list, zero items wide).
    split.test = EvalExamples(split.test.user_rows[:1], [np.zeros(0, np.int64)], split.test.targets[:1])
    alone = evaluate_path(serving_path(model, split.num_items, {"kind": "brute_force"}), model, split, config)
    assert alone["num_examples"] == 1.0
    with pytest.raises(ValueError, match="needs a model with a sequence backbone, got object"):
        serving_path(object(), split.num_items, {"kind": "brute_force", "backbone_only": True})


def test_latencies_of_several_paths_time_each_path_once_per_user_in_a_rotating_order():
    import tensorflow as tf

    from tfx_xmatch import training
    from tfx_xmatch.bench.serving_paths import per_user_latencies, per_user_latency, serving_path
    from tfx_xmatch.config import load_config

    config = load_config(None, ["data.synthetic={num_users: 30, num_items: 50, min_length: 5, max_length: 12}",
                                "model.embedding_dim=8", "model.max_length=6", "model.num_blocks=1"])
    split = training.prepare_split(config)
    tf.keras.utils.set_random_seed(0)
    model = training.build_model(config, split.dataset)
    calls = []

    def counted(label):
        path = serving_path(model, split.num_items, {"kind": "brute_force"})
        search = path.search

        def search_and_count(inputs, exclude):
            calls.append(label)
            return search(inputs, exclude)

        path.search, path.label = search_and_count, label
        return path

    paths = {label: counted(label) for label in ("a", "b", "c")}
    timings = per_user_latencies(paths, model, split, config, users=4, warmup=2)
    assert set(timings) == {"a", "b", "c"}
    assert all(0 < p50 <= p99 for p50, p99 in timings.values())
    # Six users' rounds (two of them warm-up), every path once a round, the first of a round rotating.
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]
    single = per_user_latency(paths["a"], model, split, config, users=2, warmup=1)
    assert len(single) == 2 and single[0] > 0


def test_ranks_are_kept_per_label_and_rows_are_compared_on_the_same_users(tmp_path):
    from tfx_xmatch.bench.paired import load_ranks, save_ranks
    from tfx_xmatch.evaluation import compare_metrics as compare, format_difference

    ranks, targets = np.array([0, 4, 60, 2, 9, 70]), np.array([5, 3, 9, 9, 1, 2])
    path = save_ranks(tmp_path, "soft K=4 (recorded)", ranks, targets)
    assert path.parent == tmp_path / "test_ranks" and " " not in path.name
    np.testing.assert_array_equal(load_ranks(tmp_path, "soft K=4 (recorded)", targets), ranks)
    assert load_ranks(tmp_path, "soft K=8", targets) is None
    # Ranks of other examples (another split or dataset) are never compared silently.
    with pytest.raises(ValueError, match="ranks other examples .* first differing at example 2: delete it"):
        load_ranks(tmp_path, "soft K=4 (recorded)", np.array([5, 3, 8, 9, 1, 2]))
    with pytest.raises(ValueError, match="ranks other examples \\(6 targets\\) than the 5 being compared"):
        load_ranks(tmp_path, "soft K=4 (recorded)", targets[:5])
    # Ranks saved with their run's config are checked against the reader's protocol: the same
    # targets ranked with the history unmasked are not silently reused.
    from tfx_xmatch.config import load_config

    masked = load_config(None, ["data.data_dir=/here"])
    save_ranks(tmp_path, "exact", ranks, targets, masked)
    elsewhere = load_config(None, ["data.data_dir=/there", "model.max_length=20"])  # same protocol
    np.testing.assert_array_equal(load_ranks(tmp_path, "exact", targets, elsewhere), ranks)
    with pytest.raises(ValueError, match=r"ranked under other settings \(mask_history differ\): delete it"):
        load_ranks(tmp_path, "exact", targets, load_config(None, ["eval.mask_history=false"]))
    with pytest.raises(ValueError, match=r"ranked under other settings \(data differ\)"):
        load_ranks(tmp_path, "exact", targets, load_config(None, ["data.split=user_level"]))

    reference = np.array([3, 60, 60, 1, 9, 2])
    is_tail = np.array([True, True, False, False, True, True])
    paired = compare(ranks, reference, ("HR@10", "TailRecall@50"), is_tail, confidence=0.9)
    assert paired["HR@10"]["difference"] == pytest.approx((4 - 4) / 6)
    assert paired["TailRecall@50"]["metric"] == "TailRecall@50"
    assert paired["TailRecall@50"]["num_examples"] == 4
    assert paired["TailRecall@50"]["mean_a"] == pytest.approx(3 / 4)
    assert paired["TailRecall@50"]["mean_b"] == pytest.approx(3 / 4)
    assert paired["HR@10"]["confidence"] == 0.9
    assert format_difference({"difference": -0.01, "ci_low": -0.02, "ci_high": 0.0, "p_value": 0.049}) == \
        "-0.0100 [-0.0200, +0.0000] p=0.049"

    with pytest.raises(ValueError, match="'TailRecall@50' needs is_tail_target"):
        compare(ranks, reference, ("TailRecall@50",))
    with pytest.raises(ValueError, match="got 'TailRecall50'"):
        compare(ranks, reference, ("TailRecall50",), is_tail)
    with pytest.raises(ValueError, match="compare Recall@50, got 0 after the mask \\(6 before\\)"):
        compare(ranks, reference, ("TailRecall@50",), np.zeros(6, bool))
    with pytest.raises(ValueError, match="label must be a non-empty string, got ' '"):
        save_ranks(tmp_path, " ", ranks, targets)
    with pytest.raises(ValueError, match="ranks of 'x' must be 1-D integers"):
        save_ranks(tmp_path, "x", ranks.astype(float), targets)
    with pytest.raises(ValueError, match="ranks of 'x' need one target each: 6 ranks, 5 targets"):
        save_ranks(tmp_path, "x", ranks, targets[:5])
