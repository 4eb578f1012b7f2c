"""`xmatch bench --quick` on tiny synthetic data: every model and every plot makes it into the report."""

import json
import pathlib

import yaml

from tfx_xmatch.bench import cli
from tfx_xmatch.bench.suite import load_suite

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


def test_a_bad_suite_file_is_named(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text("seeds: [0]\ncolour: blue\n")
    assert cli.main(["--suite", str(path)]) == 2
    error = capsys.readouterr().err
    assert "unknown key(s) ['colour']" in error and str(path) in error


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
    # A target inside its own history is excluded by a served index but ranked by the protocol;
    # keep the examples where the two agree.
    keep = [i for i, (history, target) in enumerate(zip(split.test.histories, split.test.targets))
            if target not in history]
    split.test = EvalExamples(split.test.user_rows[keep], [split.test.histories[i] for i in keep],
                              split.test.targets[keep])
    assert len(keep) >= 10 and min(len(history) for history in split.test.histories) > 100
    tf.keras.utils.set_random_seed(0)
    model = training.build_model(config, split.dataset)
    exact = training.evaluate(model, split, "test", config)
    served = evaluate_path(serving_path(model, split.num_items, {"kind": "brute_force"}), model, split, config)
    for key in ("HR@10", "NDCG@10", "MRR@20", "Recall@50", "TailRecall@50", "Coverage@50"):
        assert abs(served[key] - exact[key]) < 1e-9, key
