"""The benchmark scripts stay runnable: each one parses its arguments, and the serving benchmark
measures every index kind on a tiny catalogue with the right exact answers."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py") if path.name != "common.py")


def _run(args, timeout):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=BENCHMARKS.parent)


# Script calls, each run as `python benchmarks/<script> ARGS` would run it, one after another in
# a single process: most scripts import TensorFlow, which a process per call paid every time (16
# `--help` calls; 13 skips and refusals, 8 of which reach the import). "status" is what the process
# would exit with (0 for a script that returns, 1 and the message on stderr for sys.exit("...")),
# or the traceback of an exception. Only Python's own stderr is captured (not TensorFlow's C++
# logs), and each module's import-time code runs once for all calls.
RUN_SCRIPTS = """
import contextlib, io, json, runpy, sys, traceback
benchmarks, calls = sys.argv[1], json.loads(sys.argv[2])
sys.path[0] = benchmarks  # what `python benchmarks/<script>` puts first, in place of -c's current directory
results = []
for script, arguments in calls:
    path = f"{benchmarks}/{script}"
    sys.argv = [path, *arguments]
    stdout, stderr = io.StringIO(), io.StringIO()
    exited = True
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(path, run_name="__main__")
        status, exited = 0, False
    except SystemExit as exit_:
        status = 0 if exit_.code is None else exit_.code
        if not isinstance(status, int):
            stderr.write(f"{status}\\n")
            status = 1
    except BaseException:
        status = traceback.format_exc()
    results.append({"status": status, "exited": exited, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
print(json.dumps(results))
"""


def _run_scripts(calls: list) -> list:
    completed = _run(["-c", RUN_SCRIPTS, str(BENCHMARKS), json.dumps(calls)], timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def help_of_every_script():
    return dict(zip(SCRIPTS, _run_scripts([(script, ["--help"]) for script in SCRIPTS])))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_imports_and_parses_its_arguments(script, help_of_every_script):
    # An import that a refactor broke only shows when a benchmark is next run, hours later.
    result = help_of_every_script[script]
    assert result["status"] == 0 and result["exited"], (result["status"], result["stderr"][-3000:])
    assert "usage:" in result["stdout"]


# Calls that stop before any work: a skip without data ({empty} is an empty directory) or a
# refusal of an argument. Run together by the `stopped_calls` fixture.
STOPPED_CALLS = {
    "t2diff_xla without a run": ("t2diff_xla.py", ["--runs-dir", "{empty}"]),
    "t2diff_export without data": ("t2diff_export.py", ["--data-dir", "{empty}"]),
    "t2diff_export --requests 10": ("t2diff_export.py", ["--requests", "10"]),
    "t2diff_export --callers 3": ("t2diff_export.py", ["--requests", "12", "--callers", "3"]),
    "last_position without data": ("last_position.py", ["--data-dir", "{empty}"]),
    "sparcode_cache_selection --fraction 1.5": ("sparcode_cache_selection.py", ["--fraction", "1.5"]),
    "quality --minutes -5": ("quality.py", ["--data-dir", "{empty}", "--minutes", "two_tower_mean=-5"]),
}
COUNTS_OUT_OF_RANGE = [
    ("sparse_code_latency.py", ["--sizes", "0"], "--sizes"), ("sparse_code_latency.py", ["--queries", "0"], "--queries"),
    ("serving.py", ["--clients", "0"], "--clients"), ("partitioned_profile.py", ["--warmup", "-3"], "--warmup"),
    ("partitioned_profile.py", ["--probes", "0"], "--probes"),
    ("quality.py", ["--epochs", "-1"], "--epochs"),
]
STOPPED_CALLS.update({f"{script} {' '.join(arguments)}": (script, arguments)
                      for script, arguments, _ in COUNTS_OUT_OF_RANGE})
SKIPPING_SCRIPTS = ("t2diff_xla", "t2diff_export", "last_position")


@pytest.fixture(scope="module")
def stopped_calls(tmp_path_factory):
    """Runs STOPPED_CALLS; returns the empty directory, each call's result by name, and the bytes
    of the skipping scripts' results files before and after (None where there is none)."""
    empty = tmp_path_factory.mktemp("no_data")

    def results_files():
        paths = {script: BENCHMARKS / "results" / f"{script}.json" for script in SKIPPING_SCRIPTS}
        return {script: (path.read_bytes() if path.exists() else None) for script, path in paths.items()}

    before = results_files()
    calls = [(script, [argument.replace("{empty}", str(empty)) for argument in arguments])
             for script, arguments in STOPPED_CALLS.values()]
    results = dict(zip(STOPPED_CALLS, _run_scripts(calls)))
    return empty, results, before, results_files()


def test_the_serving_benchmark_measures_every_index_kind(tmp_path):
    completed = _run([str(BENCHMARKS / "serving.py"), "--sizes", "1500", "--queries", "6", "--warmup", "1",
                      "--no-served", "--probes", "2", "100", "--leaves-to-search", "39", "--soft-probes", "39",
                      "--intra-op-threads", "1", "--results-dir", str(tmp_path), "--output", "smoke"], timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert (result["settings"]["intra_op_threads"], result["settings"]["inter_op_threads"]) == (1, "default")
    rows = {(row["model"], row["variant"]): row for row in result["rows"]}
    assert {model for model, _ in rows} == {"brute_force", "partitioned", "scann", "sparse_code", "soft_search"}
    # Exact configurations must reproduce the NumPy references exactly.
    assert rows["brute_force", "n_items=1500"]["recall_vs_exact"] == 1.0
    assert rows["partitioned", "n_items=1500,partitions=39,probes=39"]["recall_vs_exact"] == 1.0
    assert rows["soft_search", "n_items=1500,base=brute_force"]["recall_vs_exact"] == 1.0
    assert rows["soft_search", "n_items=1500,base=partitioned,partitions=39,probes=39"]["recall_vs_exact"] == 1.0
    # 1500 items: no code list reaches the 1000-entry cap, so that budget stores the whole table.
    assert rows["sparse_code", "n_items=1500,cap=1000/code"]["recall_vs_exact"] == 1.0
    assert set(result["targets"]) >= {"partitioned_recall_and_speedup", "scann_p50_le_1ms",
                                      "partitioned_p50_le_1ms", "sparse_code_p50_le_1ms"}
    page = (tmp_path / "smoke.md").read_text()
    assert "sparse_code, in-process p50" in page and "soft_search" in page


def test_merged_results_replace_rows_by_key_and_list_every_command(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from common import markdown_header, merge_rows
    finally:
        sys.path.remove(str(BENCHMARKS))
    path = tmp_path / "t2diff.json"
    first = {"benchmark": "t2diff", "command": "run a", "date": "d1", "num_items": 7,
             "rows": [{"model": "x", "sampling": "s", "HR": 0.1}, {"model": "y", "sampling": "s", "HR": 0.2}]}
    assert merge_rows(first, path, ("model", "sampling")) is first  # nothing to merge with yet
    path.write_text(json.dumps(first))
    second = {"benchmark": "t2diff", "command": "run b", "date": "d2",
              "rows": [{"model": "y", "sampling": "s", "HR": 0.3}, {"model": "z", "sampling": "s", "HR": 0.4}]}
    merged = merge_rows(second, path, ("model", "sampling"))
    assert [(row["model"], row["HR"]) for row in merged["rows"]] == [("x", 0.1), ("y", 0.3), ("z", 0.4)]
    assert (merged["command"], merged["date"], merged["num_items"]) == ("run a", "d1", 7)
    assert merged["more_commands"] == [{"command": "run b", "date": "d2"}]
    path.write_text(json.dumps(merged))
    again = merge_rows({**second, "date": "d3"}, path, ("model", "sampling"))
    assert again["more_commands"] == [{"command": "run b", "date": "d3"}]  # one entry per command
    # Each merged command keeps the machine it ran on; the page names it when it is not the
    # header's (a merged row's latency was read as measured on the header's machine).
    intel = {"cpu": "Intel", "cpu_count": 2, "memory_gib": 23.5}
    amd = {**intel, "cpu": "AMD EPYC"}
    path.write_text(json.dumps({**first, "machine": intel, "versions": {"tf": "2.20"}}))
    on_amd = merge_rows({**second, "machine": amd, "versions": {"tf": "2.20"}}, path, ("model", "sampling"))
    assert on_amd["machine"] == intel and on_amd["more_commands"][0]["machine"] == amd
    page = markdown_header(on_amd, "t")
    assert "- machine: Intel (2 cores" in "\n".join(page)
    assert "- also: `run b` (d2; machine: AMD EPYC (2 cores, 23.5 GiB, no GPU))" in page
    path.write_text(json.dumps(on_amd))
    same = merge_rows({**second, "command": "run c", "machine": intel, "versions": {}}, path, ("model", "sampling"))
    assert "- also: `run c` (d2)" in markdown_header(same, "t")
    # The first command run again replaced its rows: the header is that run's.
    rerun = merge_rows({**first, "date": "d4", "machine": amd, "versions": {"tf": "2.20"}, "source": "abc"}, path,
                       ("model", "sampling"))
    assert (rerun["date"], rerun["machine"], rerun["source"]) == ("d4", amd, "abc")
    # A key field that older rows lack takes its default: seed 0 replaces them, seed 1 adds rows.
    seeded = {**second, "rows": [{"model": "x", "sampling": "s", "seed": 0, "HR": 0.5},
                                 {"model": "y", "sampling": "s", "seed": 1, "HR": 0.6}]}
    rows = merge_rows(seeded, path, ("model", "sampling", "seed"), {"seed": 0})["rows"]
    assert [(row["model"], row.get("seed"), row["HR"]) for row in rows] == [
        ("y", None, 0.3), ("z", None, 0.4), ("x", 0, 0.5), ("y", 1, 0.6)]
    path.write_text(json.dumps({**first, "benchmark": "sparc"}))
    with pytest.raises(ValueError, match="not a 't2diff' results file"):
        merge_rows(second, path, ("model", "sampling"))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a 't2diff' results file"):
        merge_rows(second, path, ("model", "sampling"))
    path.write_text("{truncated")
    with pytest.raises(ValueError, match="t2diff.json: not JSON"):
        merge_rows(second, path, ("model", "sampling"))


def test_a_skipped_two_tower_is_reported_from_the_recorded_sparc_results(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import sparc
    finally:
        sys.path.remove(str(BENCHMARKS))
    monkeypatch.setattr(sparc, "RESULTS_DIR", tmp_path)
    assert sparc.recorded_baseline_rows("ml-1m") == []  # nothing recorded yet
    rows = [{"dataset": "ml-1m", "model": "two_tower_sasrec", "path": "exact", "Recall@50": 0.5},
            {"dataset": "ml-1m", "model": "sparc_hard", "path": "hard (K=1)", "Recall@50": 0.4},
            {"dataset": "beauty", "model": "two_tower_sasrec", "path": "exact", "Recall@50": 0.2}]
    (tmp_path / "sparc.json").write_text(json.dumps({"benchmark": "sparc", "rows": rows}))
    [row] = sparc.recorded_baseline_rows("ml-1m")
    assert row == {**rows[0], "path": "exact (recorded: sparc.json)"}
    # A results file written by such a run, read again, keeps one label.
    (tmp_path / "sparc.json").write_text(json.dumps({"benchmark": "sparc", "rows": [row]}))
    assert sparc.recorded_baseline_rows("ml-1m") == [row]
    assert sparc.recorded_baseline_rows("ml-1m", train_seed=1) == []  # another seed's baseline is not this one
    (tmp_path / "sparc.json").write_text(json.dumps({"benchmark": "t2diff", "rows": rows}))
    with pytest.raises(ValueError, match="sparc.json: not a 'sparc' results file"):
        sparc.recorded_baseline_rows("ml-1m")


def test_the_partitioned_profile_times_every_stage_and_calling_path(tmp_path):
    def profile(*extra):
        # 8 partitions x 4 sub-partitions, all probed: the lookup is exact.
        completed = _run([str(BENCHMARKS / "partitioned_profile.py"), "--items", "1200", "--queries", "4",
                          "--warmup", "1", "--partitions", "8", "--subpartitions", "4", "--parent-probes", "8",
                          "--intra-op-threads", "1", "--results-dir", str(tmp_path), "--output", "profile", *extra],
                         timeout=600)
        assert completed.returncode == 0, completed.stderr[-3000:]
        return json.loads((tmp_path / "profile.json").read_text())

    result = profile("--probes", "32")
    [row] = result["rows"]
    assert row["recall_vs_exact"] == 1.0 and row["rows_scanned"] == 1200
    for stage in ("dispatch", "probes", "rows", "gather", "score", "lookup", "saved", "session"):
        assert row[f"{stage}_ms"] > 0, stage
    # A row written before the saved / session columns existed still renders, with dashes.
    for stage in ("saved", "session"):
        del row[f"{stage}_ms"]
    (tmp_path / "profile.json").write_text(json.dumps(result))
    # An int8 index with the same partitions, timed interleaved with the float32 one; rescoring
    # every member makes it exact.
    merged = profile("--probes", "16", "--scoring", "int8", "--reorder", "1200", "--merge")
    assert [(row["probes"], row["scoring"]) for row in merged["rows"]] == [(32, "float32"), (16, "float32"), (16, "int8")]
    compact = merged["rows"][2]
    assert compact["recall_vs_exact"] == merged["rows"][1]["recall_vs_exact"]
    assert compact["num_reordering_candidates"] == 1200 and compact["megabytes_gathered"] * 4 == pytest.approx(
        merged["rows"][1]["megabytes_gathered"], abs=0.02)
    for stage in ("dispatch", "lookup", "saved", "session"):
        assert compact[f"{stage}_ms"] > 0, stage
    assert "gather_ms" not in compact
    old, new, int8 = (tmp_path / "profile.md").read_text().splitlines()[-3:]
    # (GB/s may read "–" too on this tiny catalogue, when the gather stage times at or below 0.)
    assert "| – | – |" in old and "| – | – |" not in new and "| int8, reorder 1200 |" in int8
    # A spilled copy (every item listed twice), all partitions probed: still exact, twice the entries.
    spilled = profile("--probes", "32", "--soar-lambda", "1", "--spilled-probes", "32", "--merge")
    assert [(row["probes"], row["scoring"], row.get("soar_lambda")) for row in spilled["rows"]] == [
        (16, "float32", None), (16, "int8", None), (32, "float32", None), (32, "float32", 1.0)]
    row = spilled["rows"][-1]
    assert row["recall_vs_exact"] == 1.0 and row["rows_scanned"] == 2400
    for stage in ("dispatch", "probes", "rows", "gather", "score", "lookup", "saved", "session"):
        assert row[f"{stage}_ms"] > 0, stage
    assert "| float32, SOAR λ=1 |" in (tmp_path / "profile.md").read_text().splitlines()[-1]


def _import_benchmark(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


TINY_RUN = ["data.dataset=synthetic", "data.split=leave_one_out",
            "data.synthetic={num_users: 150, num_items: 300, min_length: 8, max_length: 20, num_clusters: 4}",
            "model.embedding_dim=8", "model.max_length=10", "model.num_blocks=1", "train.epochs=1",
            "train.verbose=0", "eval.ks=[10, 50]"]


@pytest.fixture(scope="module")
def tiny_two_tower(tmp_path_factory):
    """The two-tower run that `_tiny_runs` pairs every model with, trained once for the module
    (each test takes a copy: the benchmarks write ranks into it)."""
    from tfx_xmatch import training
    from tfx_xmatch.config import load_config

    config = load_config(None, TINY_RUN)
    run_dir = tmp_path_factory.mktemp("tiny") / "two_tower_sasrec"
    training.train(config, run_dir, split=training.prepare_split(config))
    return config, run_dir


def _tiny_runs(tmp_path, tiny_two_tower, model: str, options: list):
    """A two-tower (a copy of `tiny_two_tower`) and a ``model`` trained for one epoch on a tiny
    synthetic catalogue (runs under ``tmp_path``): their configs, the split and the two-tower's
    brute-force ranks."""
    from tfx_xmatch import training
    from tfx_xmatch.bench.serving_paths import brute_force_ranks
    from tfx_xmatch.config import load_config

    two_tower_config, two_tower_run = tiny_two_tower
    configs = {"two_tower_sasrec": two_tower_config,
               model: load_config(None, [*TINY_RUN, f"model.name={model}", *options])}
    split = training.prepare_split(configs[model])  # the same data settings: the two-tower's split
    shutil.copytree(two_tower_run, tmp_path / "two_tower_sasrec")
    training.train(configs[model], tmp_path / model, split=split)
    return configs, split, brute_force_ranks(tmp_path / "two_tower_sasrec", split, configs["two_tower_sasrec"])


def test_sparc_rows_are_compared_with_hard_search_and_the_two_tower_on_the_same_users(tmp_path, tiny_two_tower):
    """End to end on a tiny synthetic catalogue: ranks saved per path, the two-tower's computed
    once from its run and reused, every row paired with hard search and the two-tower."""
    from tfx_xmatch.bench.paired import load_ranks
    from tfx_xmatch.bench.serving_paths import brute_force_ranks

    from tfx_xmatch import training

    sparc = _import_benchmark("sparc")
    common = _import_benchmark("common")
    configs, split, reference = _tiny_runs(
        tmp_path, tiny_two_tower, "sparc", ["model.options.num_codewords=8", "model.options.num_levels=2"])
    assert reference.shape == (len(split.test),)
    np.testing.assert_array_equal(load_ranks(tmp_path / "two_tower_sasrec", "brute force", split.test.targets),
                                  reference)
    assert brute_force_ranks(tmp_path / "missing", split, configs["two_tower_sasrec"]) is None

    base = {"dataset": "synthetic", "model": "sparc", "epochs": 1, "best_epoch": 1, "train_seconds": 1.0,
            "num_items": split.num_items, "settings": configs["sparc"].to_dict()["model"]}
    rows = sparc.soft_search_rows(tmp_path / "sparc", split, configs["sparc"], base, 3, reference)
    assert [row["path"] for row in rows] == ["hard (K=1)", "soft K=2", "soft K=4", "soft K=8"]
    # DESIGN's names: model sparc_hard / sparc_soft, variants soft-k2 / soft-k4 / soft-k8.
    assert [(row["model"], row.get("variant")) for row in rows] == [
        ("sparc_hard", None), ("sparc_soft", "soft-k2"), ("sparc_soft", "soft-k4"), ("sparc_soft", "soft-k8")]
    assert all(row["p50_ms"] <= row["p99_ms"] for row in rows)
    assert "vs_hard" not in rows[0]  # hard search is not compared with itself
    model = training.load_model(tmp_path / "sparc" / "model")
    assert rows[0]["codebook_dead_codes"] == [round(share, 4) for share in
                                              model.rqvae.dead_codewords(model.item_codes())]
    assert all(0.0 <= share <= 1.0 for share in rows[0]["codebook_dead_codes"]) and len(rows[0]["codebook_dead_codes"]) == 2
    hard_ranks = load_ranks(tmp_path / "sparc", "hard (K=1)", split.test.targets)
    for row in rows:
        ranks = load_ranks(tmp_path / "sparc", row["path"], split.test.targets)
        assert ranks.shape == (len(split.test),)
        for key, other in (("vs_two_tower", reference), ("vs_hard", hard_ranks)):
            if key == "vs_hard" and row is rows[0]:
                continue
            assert set(row[key]) == {"Recall@50", "TailRecall@50"}
            paired = row[key]["Recall@50"]
            assert paired["mean_a"] == pytest.approx(row["Recall@50"], abs=1e-4)
            assert paired["mean_b"] == pytest.approx(float(np.mean(other < 50)), abs=1e-6)
            assert paired["difference"] == pytest.approx(paired["mean_a"] - paired["mean_b"], abs=2e-6)
    text = sparc.to_markdown({**common.header("sparc"), "rows": rows})
    assert "| soft K=8 | " in text and "Recall@50 vs two-tower" in text and "p=" in text
    assert "p-value of the paired test of tfx_xmatch.evaluation.paired_difference: the exact sign test" in text
    assert "†" not in text
    # A row compared before the tests were named holds a t-test's p: marked, beside the others.
    for difference in rows[1]["vs_two_tower"].values():
        difference.pop("test")
    text = sparc.to_markdown({**common.header("sparc"), "rows": rows})
    assert "p-values marked † were computed before the test was recorded: paired t-tests" in text
    marked = [line for line in text.splitlines() if "†" in line and line.startswith("| ")]
    assert len(marked) == 1 and marked[0].startswith(f"| {rows[1]['model']} | {rows[1]['path']} |")


def test_sparcode_rows_save_ranks_and_compare_with_the_two_tower_and_the_encoder_alone(tmp_path, tiny_two_tower):
    """End to end on a tiny synthetic catalogue: every SparCode path's ranks are saved, each row
    is paired with the two-tower's ranks and with the encoder alone, whose ranks are the encoder
    state's dot product with the item tower, computed here without the serving path."""
    import tensorflow as tf

    from tfx_xmatch import training
    from tfx_xmatch.bench.paired import load_ranks
    from tfx_xmatch.evaluation import evaluate_full_ranking

    sparcode = _import_benchmark("sparcode")
    common = _import_benchmark("common")
    configs, split, reference = _tiny_runs(
        tmp_path, tiny_two_tower, "sparcode", ["model.options.num_codewords=16", "model.options.num_query_tokens=2"])

    base = {"dataset": "synthetic", "model": "sparcode", "train_seed": 0, "epochs": 1, "best_epoch": 1,
            "train_seconds": 1.0, "settings": configs["sparcode"].to_dict()["model"]}
    rows = sparcode.sparcode_rows(tmp_path / "sparcode", split, configs["sparcode"], base, reference)
    variants = ["cache=100%", "cache=10%", "cache=1%", "unquantized", "encoder alone (codes off)"]
    assert [row["variant"] for row in rows] == variants
    labels = ["cache 100%", "cache 10%", "cache 1%", "unquantized", "encoder alone (codes off)"]
    ranks = {variant: load_ranks(tmp_path / "sparcode", label, split.test.targets)
             for variant, label in zip(variants, labels)}

    model = training.load_model(tmp_path / "sparcode" / "model")
    encoder_scores = tf.function(lambda inputs: tf.matmul(model.encode_sequence(inputs)[:, -1, :],
                                                          model.encoder_item_embeddings(), transpose_b=True))
    config = configs["sparcode"]
    _, oracle = evaluate_full_ranking(
        lambda histories, user_rows: encoder_scores(training.model_inputs(model, split.dataset, histories, user_rows)),
        split.test, num_items=split.num_items, max_length=config.model.max_length, ks=(10, 50),
        mask_history=True, return_ranks=True)
    # The served top-100 ranks items it does not return last, and it never returns the history,
    # where the evaluation still ranks a re-consumed target; elsewhere the ranks agree.
    repeated = np.array([target in history for target, history in zip(split.test.targets, split.test.histories)])
    shown = (oracle < 100) & ~repeated
    assert shown.sum() > 20
    np.testing.assert_array_equal(ranks["encoder alone (codes off)"][shown], oracle[shown])
    assert "vs_encoder" not in rows[-1]
    # The unquantized row ranks every item (a re-consumed target still ranks): not paired with searches.
    assert "vs_two_tower" not in rows[3] and "vs_encoder" not in rows[3]
    assert all("vs_two_tower" in row for row in rows if row["variant"] != "unquantized")
    for row in rows:
        assert ranks[row["variant"]].shape == (len(split.test),)
        for key, other in (("vs_two_tower", reference), ("vs_encoder", ranks["encoder alone (codes off)"])):
            if key not in row:
                continue
            paired = row[key]["Recall@50"]
            assert paired["mean_a"] == pytest.approx(row["Recall@50"], abs=1e-4)
            assert paired["mean_b"] == pytest.approx(float(np.mean(other < 50)), abs=1e-6)
    text = sparcode.to_markdown({**common.header("sparcode"), "rows": rows})
    assert "HR@10 vs two-tower (same seed)" in text and "vs its own encoder alone" in text
    assert "warm-started" not in text
    # A warm-started run says where its epochs start.
    text = sparcode.to_markdown({**common.header("sparcode"), "rows": [{**row, "warm_start": "runs/first"} for row in rows]})
    assert "  - warm-started from `runs/first`: the epochs and train seconds above are the ones trained after it" in text
    assert "selected on validation NDCG@10 through" not in text
    # A run selected on the served cache says so.
    served = [{**row, "settings": {**row["settings"], "options": {**row["settings"].get("options", {}),
                                                                    "serving_cache_fraction": 0.01}}} for row in rows]
    text = sparcode.to_markdown({**common.header("sparcode"), "rows": served})
    assert "  - selected on validation NDCG@10 through a 1% cache (`serving_cache_fraction`)" in text


def test_t2diff_rows_list_their_paired_differences_from_the_two_tower():
    t2diff = _import_benchmark("t2diff")
    common = _import_benchmark("common")
    difference = {"difference": 0.0016, "ci_low": -0.004, "ci_high": 0.0072, "p_value": 0.58, "test": "paired t-test"}
    row = {"split": "leave_one_out", "model": "t2diff", "sampling": "DDIM-10", "p50_ms": 1.0,
           "p99_ms": 2.0, "epochs": 3, "best_epoch": 2, "train_seconds": 5.0,
           **{key: 0.1 for key in t2diff.REPORTED}}
    text = t2diff.to_markdown({**common.header("t2diff"), "num_items": 9,
                               "rows": [row, {**row, "sampling": "DDIM-5",
                                              "vs_two_tower": {m: difference for m in t2diff.COMPARED}},
                                        {**row, "sampling": "DDIM-25",
                                         "vs_backbone": {m: {**difference, "p_value": 0.01}
                                                         for m in t2diff.COMPARED}}]})
    assert "| t2diff | DDIM-5 | +0.0016 [-0.0040, +0.0072] p=0.58 | " in text
    assert "| ΔHR@10 vs its backbone alone |" in text
    assert "| t2diff | DDIM-25 |  |  |  | +0.0016 [-0.0040, +0.0072] p=0.01 |" in text
    assert "| t2diff | DDIM-10 | +" not in text and "\n\n\n" not in text
    seeded = t2diff.to_markdown({**common.header("t2diff"), "num_items": 9,
                                 "rows": [{**row, "train_seed": 1, "vs_two_tower": {m: difference
                                                                                    for m in t2diff.COMPARED}}]})
    assert "| t2diff (seed 1) | DDIM-10 | 0.1000" in seeded and "| t2diff (seed 1) | DDIM-10 | +0.0016" in seeded
    assert [t2diff.design_variant(label) for label in ("DDPM-50", "DDIM-5", "DDIM-10 (serving default)",
                                                       t2diff.BACKBONE_ALONE, "dot product")] == [
        {"variant": "ddpm-50"}, {"variant": "ddim-5"}, {"variant": "ddim-10"}, {"variant": "backbone-alone"}, {}]


def test_t2diff_runs_are_named_so_every_output_and_seed_finds_its_two_tower(tmp_path, capsys):
    t2diff = _import_benchmark("t2diff")
    assert t2diff.run_name("two_tower_sasrec", "leave_one_out", "ablation") == "quality-two_tower_sasrec"
    assert t2diff.run_name("two_tower_sasrec", "user_level", "ablation") == "t2diff-user_level-two_tower_sasrec"
    assert t2diff.run_name("t2diff", "leave_one_out", "ablation", 2) == "ablation-leave_one_out-t2diff-seed2"
    assert t2diff.run_name("two_tower_sasrec", "leave_one_out", "x", 2) == "quality-two_tower_sasrec-seed2"

    class Split:  # only the test targets are read before the run is found missing
        class test:
            targets = np.array([1, 2])

    assert t2diff.reference_ranks(tmp_path / "missing", Split) is None
    assert "no two-tower run at" in capsys.readouterr().err


def test_seed_study_compares_saved_ranks_of_several_runs(tmp_path):
    from tfx_xmatch.bench.paired import save_ranks

    seed_study = _import_benchmark("seed_study")
    common = _import_benchmark("common")
    shipped = sorted(seed_study.DEFAULT_SPEC.parent.glob("seed_study*.yaml"))
    assert len(shipped) >= 3
    for spec_file in shipped:
        assert seed_study.read_spec(spec_file)["comparisons"], spec_file  # the shipped specs are valid
    rng = np.random.default_rng(0)
    targets = rng.integers(1, 50, 400)
    for run, shift in (("a0", 0), ("a1", 0), ("b0", 15), ("b1", 15)):
        save_ranks(tmp_path / run, "exact", rng.integers(0, 20, 400) + shift, targets)
        save_ranks(tmp_path / run, "slow", rng.integers(0, 20, 400) + shift + 10, targets)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "dataset_config: configs/ml1m_sasrec.yaml\ncomparisons:\n"
        "  - {name: A vs B, metrics: [HR@10, TailRecall@10], a: {label: exact, runs: [a0, a1]},"
        " b: {label: exact, runs: [b0, b1]}}\n"
        "  - {name: A vs missing, metrics: [HR@10], a: {label: exact, runs: [a0]}, b: {label: other, runs: [b0]}}\n"
        "  - {name: two paths, metrics: [HR@10], paired_runs: true, a: {label: exact, runs: [a0, a1]},"
        " b: {label: slow, runs: [a0, a1]}}\n")
    spec = seed_study.read_spec(spec_path)
    entries = seed_study.study(spec, tmp_path, targets, targets < 10)
    hr = entries[0]["metrics"]["HR@10"]
    assert hr["verdict"] == "A better" and hr["significant_for_a"] == 4 and not entries[0]["paired_runs"]
    assert hr["runs_b"] == [0.0, 0.0] and hr["across_runs"]["num_runs_a"] == 2
    assert entries[1]["missing"] == ["b0/'other'"] and "metrics" not in entries[1]
    paths = entries[2]["metrics"]["HR@10"]
    assert entries[2]["paired_runs"] and [(p["run_a"], p["run_b"]) for p in paths["pairings"]] == [(0, 0), (1, 1)]
    assert paths["across_runs"]["test"] == "paired t-test over runs"
    text = seed_study.to_markdown({**common.header("seed_study"), "dataset": "synthetic", "split": "leave_one_out",
                                   "num_users": 400, "comparisons": entries})
    assert "## A vs B" in text and "| HR@10 | " in text and "4 / 0 of 4 | A better |" in text
    assert "Not compared over users: no saved ranks for b0/'other'." in text
    assert "the test over users is the paired test of tfx_xmatch.evaluation.paired_difference: the exact sign" in text
    assert "†" not in text
    assert hr["averaged"]["test"] == "paired t-test"  # gains averaged over runs take more than two values
    # A study recorded before the tests were named used the t-test: its page must say so.
    for entry in entries:
        for values in entry.get("metrics", {}).values():
            values["averaged"].pop("test")
    text = seed_study.to_markdown({**common.header("seed_study"), "dataset": "synthetic", "split": "leave_one_out",
                                   "num_users": 400, "comparisons": entries})
    assert "p-values marked † were computed before the test was recorded: paired t-tests" in text
    assert "| HR@10 | " in text and " †" in text.split("| HR@10 | ")[1].split("\n")[0]
    # Ranks of other examples are refused, naming the file.
    with pytest.raises(ValueError, match="a0/test_ranks/exact.npz ranks other examples"):
        seed_study.study(spec, tmp_path, targets[::-1].copy(), targets < 10)


def test_seed_study_tests_recorded_values_over_runs_when_the_ranks_are_gone(tmp_path):
    from scipy import stats

    seed_study = _import_benchmark("seed_study")
    common = _import_benchmark("common")
    results = tmp_path / "results"
    results.mkdir()

    def row(model, variant, seed, hr, ndcg, **extra):
        return {"model": model, "variant": variant, "train_seed": seed, "HR@10": hr, "NDCG@10": ndcg, **extra}

    pages = {  # values chosen, not measured; pages mix models, seeds and splits as real ones do
        "sc0": [row("sparcode", "cache=100%", None, 0.300, 0.17), row("sparcode", "cache=1%", 0, 0.07, 0.04),
                row("sparcode", "encoder", 0, 0.295, 0.17), row("two_tower_sasrec", "cache=100%", 0, 0.1, 0.1),
                row("sparcode", "cache=100%", 0, 0.2, 0.1, split="user_level"),
                row("sparcode_all_to_all", "cache=100%", 0, 0.1, 0.1)],
        "sc1": [row("sparcode", "cache=100%", 1, 0.302, 0.17), row("sparcode", "encoder", 1, 0.296, 0.17)],
        "tt": [row("two_tower_sasrec", "exact", 0, 0.280, 0.16), row("two_tower_sasrec", "exact", 1, 0.281, 0.16),
               row("two_tower_sasrec", "exact", 2, 0.282, 0.16), row("sparcode", "exact", 1, 0.5, 0.5)],
        "a2a": [row("sparcode_all_to_all", "cache=100%", 0, 0.25, 0.13)],
    }
    for stem, rows in pages.items():
        (results / f"{stem}.json").write_text(json.dumps({"rows": rows}))
    sparcode = "[x-sparcode, x-sparcode-seed1]"
    two_tower = "[q-two_tower_sasrec, q-two_tower_sasrec-seed1, q-two_tower_sasrec-seed2]"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "dataset_config: configs/ml1m_sasrec.yaml\ncomparisons:\n"
        f"  - {{name: codes vs two-tower, metrics: [HR@10, NDCG@10], a: {{label: l, runs: {sparcode},"
        " recorded: {variant: cache=100%, results: [sc0, sc1]}},"
        f" b: {{label: l, runs: {two_tower}, recorded: {{variant: exact, results: [tt, tt, tt]}}}}}}\n"
        f"  - {{name: two-tower vs codes, metrics: [HR@10], a: {{label: l, runs: {two_tower},"
        " recorded: {variant: exact, results: [tt, tt, tt]}},"
        f" b: {{label: l, runs: {sparcode}, recorded: {{variant: cache=100%, results: [sc0, sc1]}}}}}}\n"
        f"  - {{name: codes vs encoder, paired_runs: true, metrics: [HR@10], a: {{label: l, runs: {sparcode},"
        " recorded: {variant: cache=100%, results: [sc0, sc1]}},"
        f" b: {{label: m, runs: {sparcode}, recorded: {{variant: encoder, results: [sc0, sc1]}}}}}}\n"
        "  - {name: all-to-all, metrics: [HR@10], a: {label: l, runs: [s-sparcode_all_to_all],"
        " recorded: {variant: cache=100%, results: [a2a]}},"
        " b: {label: l, runs: [q-two_tower_sasrec], recorded: {variant: exact, results: [tt]}}}\n"
        "  - {name: a page missing, metrics: [HR@10], a: {label: l, runs: [x-sparcode],"
        " recorded: {variant: cache=100%, results: [gone]}},"
        " b: {label: l, runs: [q-two_tower_sasrec], recorded: {variant: exact, results: [tt]}}}\n"
        "  - {name: no record, metrics: [HR@10], a: {label: x, runs: [x-sparcode]}, b: {label: y, runs: [y-sparcode]}}\n")
    spec = seed_study.read_spec(spec_path)
    entries = seed_study.study(spec, tmp_path / "runs", np.arange(1, 5), np.ones(4, bool), results_dir=results)
    assert all(entry["missing"] and "metrics" not in entry for entry in entries)  # no test over users: no rows
    hr = entries[0]["recorded"]["HR@10"]
    # Each run's own row: its model, variant and seed (from the name; None reads 0), its split.
    assert hr["runs_a"] == [0.300, 0.302] and hr["runs_b"] == [0.280, 0.281, 0.282]
    welch = stats.ttest_ind([0.300, 0.302], [0.280, 0.281, 0.282], equal_var=False)
    assert welch.pvalue < 0.05
    assert hr["across_runs"]["test"] == "Welch's t-test over runs"
    assert hr["across_runs"]["p_value"] == pytest.approx(welch.pvalue)
    assert hr["verdict"] == "A better over runs (not tested over users)"
    assert entries[1]["recorded"]["HR@10"]["verdict"] == "B better over runs (not tested over users)"
    ndcg = entries[0]["recorded"]["NDCG@10"]
    assert ndcg["across_runs"]["p_value"] is None and ndcg["verdict"] == "no test over runs (no spread)"
    paired = entries[2]["recorded"]["HR@10"]
    assert entries[2]["paired_runs"] and paired["runs_b"] == [0.295, 0.296]
    assert paired["across_runs"]["test"] == "paired t-test over runs"
    assert paired["across_runs"]["p_value"] == pytest.approx(stats.ttest_rel([0.300, 0.302], [0.295, 0.296]).pvalue)
    assert entries[3]["recorded"]["HR@10"]["runs_a"] == [0.25]  # the model the name ends with, not 'sparcode'
    assert entries[3]["recorded"]["HR@10"]["verdict"] == "needs 2+ runs a side"
    assert "gone.json: no such results file (recorded values of run 'x-sparcode')" in entries[4]["recorded_error"]
    assert "recorded" not in entries[4] and "recorded" not in entries[5]
    assert seed_study.comparison_rows({"dataset": "ml-1m", "split": "leave_one_out", "comparisons": entries}) == []
    text = seed_study.to_markdown({**common.header("seed_study"), "dataset": "synthetic", "split": "leave_one_out",
                                   "num_users": 4, "comparisons": entries})
    assert "its comparison is tested over runs only, from the values its results page recorded" in text
    assert ("Over runs only (Welch's t-test over runs), from the values recorded in `sc0.json`, `sc1.json`, "
            "`tt.json` (A: variant 'cache=100%', B: 'exact'; rounded as recorded). Half of the verdict") in text
    assert "| HR@10 | 0.3000 0.3020 | 0.2800 0.2810 0.2820 | +0.0200 [" in text
    assert "| NDCG@10 | 0.1700 0.1700 | 0.1600 0.1600 0.1600 | +0.0100 (no test: no spread) | no test over runs" in text
    section = text.split("## codes vs encoder")[1].split("## ")[0]
    assert "the same trained runs on both sides: over runs is a paired t-test" in section
    assert "Over runs only (paired t-test over runs)" in section
    assert "Not tested over runs either: " in text.split("## a page missing")[1]
    # Errors name the page and the run: no row, two rows, a row without the metric, not a page.
    for page, message in (
            ([row("sparcode", "cache=100%", 2, 0.3, 0.17)],
             "0 rows of .*'model': 'sparcode'.*'variant': 'cache=100%', 'train_seed': 1} \\(run 'x-sparcode-seed1'\\); "
             "need exactly one. The page holds \\(model, variant, train_seed\\): \\[\\('sparcode', 'cache=100%', 2\\)\\]"),
            ([row("sparcode", "cache=100%", 1, 0.3, 0.17)] * 2, "sc1.json: 2 rows of"),
            ([{"model": "sparcode", "variant": "cache=100%", "train_seed": 1, "HR@10": 0.3}],
             "sc1.json: the row of run 'x-sparcode-seed1' records no 'NDCG@10'"),
            ("[1, 2]", "sc1.json: not a results page"), ("{not json", "sc1.json: not a results page")):
        (results / "sc1.json").write_text(page if isinstance(page, str) else json.dumps({"rows": page}))
        with pytest.raises(ValueError, match=message):
            seed_study.recorded_values(spec["comparisons"][0]["a"], ["HR@10", "NDCG@10"], results)


def test_shipped_seed_study_specs_name_recorded_rows_that_exist():
    seed_study = _import_benchmark("seed_study")
    checked = 0
    for spec_file in sorted(seed_study.DEFAULT_SPEC.parent.glob("seed_study*.yaml")):
        for comparison in seed_study.read_spec(spec_file)["comparisons"]:
            for side in ("a", "b"):
                group = comparison[side]
                if "recorded" not in group:
                    continue
                present = [(run, stem) for run, stem in zip(group["runs"], group["recorded"]["results"])
                           if (seed_study.RESULTS_DIR / f"{stem}.json").is_file()]
                if present:  # a page a running benchmark has yet to write is skipped
                    runs, stems = zip(*present)
                    present_only = {"runs": list(runs), "recorded": {**group["recorded"], "results": list(stems)}}
                    seed_study.recorded_values(present_only, comparison["metrics"])
                    checked += len(present)
    assert checked >= 10


@pytest.mark.parametrize("text, message", [
    ("comparisons: []\n", "needs 'dataset_config'"),
    ("dataset_config: x.yaml\ncomparisons: []\n", "'comparisons' must be a non-empty list"),
    ("dataset_config: x.yaml\ncomparisons: [{metrics: [HR@10]}]\n", "comparison 1 needs a 'name'"),
    ("dataset_config: x.yaml\ncomparisons: [{name: n, metrics: [AUC@3]}]\n", "comparison 1 \\('n'\\): .*'AUC@3'"),
    ("dataset_config: x.yaml\ncomparisons: [{name: n, metrics: [HR@10], a: {label: x, runs: []}}]\n",
     "'a' must be \\{label"),
    ("dataset_config: x.yaml\ncomparisons: [{name: n, metrics: [HR@10], a: {label: x, runs: [r, r]},"
     " b: {label: y, runs: [s]}}]\n", "'a' names the same run more than once: \\['r'\\]"),
    ("dataset_config: x.yaml\ncomparisons: [{name: n, metrics: [HR@10], a: {label: x, runs: [r]},"
     " b: {label: y, runs: [r]}}]\n", "runs \\['r'\\] are on both sides; set 'paired_runs: true'"),
    ("dataset_config: x.yaml\ncomparisons: [{name: n, metrics: [HR@10], paired_runs: true, a: {label: x, runs: [r]},"
     " b: {label: y, runs: [r, s]}}]\n", "'paired_runs' needs as many runs"),
    ("dataset_config: x.yaml\ncomparisons: [{name: n, metrics: [HR@10], a: {label: x, runs: [r, s],"
     " recorded: {variant: v, results: [p]}}, b: {label: y, runs: [t]}}]\n",
     "'a' 'recorded' must be \\{variant: <row variant>, results: \\[<results stem>, one per run\\]\\} \\(2 runs\\)"),
    ("dataset_config: x.yaml\ncomparisons: [{name: n, metrics: [HR@10], a: {label: x, runs: [r], recorded: },"
     " b: {label: y, runs: [t], recorded: {variant: v, results: [p]}}}]\n", "'a' 'recorded' must be .*got None"),
    ("dataset_config: x.yaml\ncomparisons: [{name: n, metrics: [HR@10], a: {label: x, runs: [r]},"
     " b: {label: y, runs: [t], recorded: {variant: v, results: [p]}}}]\n", "'recorded' on one side only"),
])
def test_seed_study_spec_errors_name_the_comparison(tmp_path, text, message):
    seed_study = _import_benchmark("seed_study")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        seed_study.read_spec(path)


def _refused(stopped_calls, name: str, message: str) -> None:
    result = stopped_calls[1][name]
    assert result["status"] == 2 and message in result["stderr"], (name, result["status"], result["stderr"][-3000:])
    assert "Traceback" not in result["stderr"]


def _skipped_and_kept_its_results(stopped_calls, name: str, message: str) -> None:
    _, results, before, after = stopped_calls
    result = results[name]
    assert result["status"] == 0, (name, result["status"], result["stderr"][-3000:])
    assert message in result["stderr"]
    script = STOPPED_CALLS[name][0].removesuffix(".py")
    assert after[script] == before[script], f"{script} rewrote its results while skipping"


def test_the_xla_latency_benchmark_skips_cleanly_without_a_trained_run(stopped_calls):
    _skipped_and_kept_its_results(stopped_calls, "t2diff_xla without a run",
                                  f"skipped: no trained run at {stopped_calls[0]}")


def test_the_export_benchmark_skips_cleanly_without_ml_1m_and_pages_every_export(stopped_calls):
    _skipped_and_kept_its_results(stopped_calls, "t2diff_export without data",
                                  f"skipped: dataset 'ml-1m' not found under {stopped_calls[0]}")
    _refused(stopped_calls, "t2diff_export --requests 10",
             "--requests must be more than the 10 untimed warm-up requests, got 10")
    _refused(stopped_calls, "t2diff_export --callers 3",
             "--callers must be at most the 2 timed requests (--requests 12 less 10 warm-ups), got 3")
    t2diff_export = _import_benchmark("t2diff_export")
    row = {"dataset": "ml-1m", "split": "leave_one_out", "model": "t2diff", "export_s": 14.0, "saved_model_mib": 5.6,
           "load_s": 4.4, "first_request_s": 0.8, "p50_ms": 14.7, "p99_ms": 23.2}
    under_load = {"callers": 4, "callers_p50_ms": 20.5, "callers_p99_ms": 34.0, "callers_per_s": 187.7}
    page = t2diff_export.to_markdown({**t2diff_export.header("t2diff_export"), "weights": "run `r`", "num_items": 3416,
                                      "k": 100, "requests": 200,
                                      "rows": [{**row, "sampling": "DDPM-50", "xla": False},  # before threads were set
                                               {**row, **under_load, "sampling": "DDIM-10", "xla": True,
                                                "intra_op_threads": 1, "inter_op_threads": 0,
                                                "tf_enable_onednn_opts": "0"}]})
    assert "| DDPM-50 | graph | default / default | unset | 14.0 | 5.6 | 4.4 | 0.8 | 14.7 | 23.2 |  |  |  |  |" in page
    assert "| DDIM-10 | XLA | 1 / default | 0 | 14.0 | 5.6 | 4.4 | 0.8 | 14.7 | 23.2 | 4 | 20.5 | 34.0 | 187.7 |" in page
    assert "catalogue 3,416 items" in page


def test_the_export_benchmark_measures_the_variants_own_run_unless_told_another(tmp_path, monkeypatch):
    """--variant t2diff measured the detached-backbone run whenever that one existed."""
    import argparse

    t2diff_export = _import_benchmark("t2diff_export")
    for name in ("t2diff-leave_one_out-t2diff", "t2diff-leave_one_out-t2diff_sasrec_backbone_detached"):
        (tmp_path / name / "model").mkdir(parents=True)
    monkeypatch.setattr(t2diff_export, "load_finished_run", lambda run_dir, trained_by: (run_dir.name, None, None))
    args = argparse.Namespace(runs_dir=str(tmp_path), run=None, variant="t2diff", data_dir=tmp_path)
    assert t2diff_export._model(args) == ("t2diff-leave_one_out-t2diff", None, None, "run `t2diff-leave_one_out-t2diff`")
    args.run = "t2diff-leave_one_out-t2diff_sasrec_backbone_detached"
    assert t2diff_export._model(args)[0] == args.run


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the failing callers' own
def test_the_export_benchmark_under_load_makes_every_call_once_and_counts_them():
    import tensorflow as tf

    t2diff_export = _import_benchmark("t2diff_export")
    seen = []

    def signature(history, k):
        seen.append(int(history.numpy()[0, 0]))
        return {"item_ids": tf.fill([1, k], history[0, 0])}

    requests = [tf.constant([[row]], tf.int64) for row in range(11)]
    measured = t2diff_export._concurrent_calls(signature, requests, 3, tf)
    assert sorted(seen) == list(range(11))
    assert measured["callers"] == 3 and measured["callers_per_s"] > 0
    assert 0 < measured["callers_p50_ms"] <= measured["callers_p99_ms"]

    def failing(history, k):
        raise tf.errors.InvalidArgumentError(None, None, "bad request")

    with pytest.raises(RuntimeError, match="11 of 11 concurrent calls did not complete"):
        t2diff_export._concurrent_calls(failing, requests, 3, tf)


def test_the_evaluation_pass_benchmark_times_both_ways_with_the_same_ranking(tmp_path, tiny_two_tower):
    evaluation_pass = _import_benchmark("evaluation_pass")
    _tiny_runs(tmp_path, tiny_two_tower, "sparcode", ["model.options.num_codewords=16", "model.options.num_query_tokens=2",
                                                     "model.options.serving_cache_fraction=0.1"])
    row = evaluation_pass.measure(tmp_path / "sparcode", "validation", repeats=2)
    assert row["model"] == "sparcode" and row["serving_cache_fraction"] == 0.1 and row["users"] == 150
    assert len(row["per_batch_s"]) == len(row["per_pass_s"]) == 2
    assert row["max_metric_difference"] < 1e-6
    markdown = evaluation_pass.to_markdown({**evaluation_pass.header("evaluation_pass"), "which": "validation",
                                            "repeats": 2, "rows": [row]})
    assert "| sparcode | sparcode | 150 (" in markdown and "| 0.1 |" in markdown
    assert evaluation_pass.measure(tmp_path / "absent", "validation", repeats=1) is None


def test_the_last_position_benchmark_times_both_encodings_of_the_same_weights(tmp_path, stopped_calls):
    """Both paths answer alike, the "every position" copy really encodes every position, and the
    script skips cleanly without ML-1M."""
    from tfx_xmatch import training
    from tfx_xmatch.config import load_config

    last_position = _import_benchmark("last_position")
    config = load_config(None, ["data.dataset=synthetic", "model.embedding_dim=8", "model.max_length=10",
                                "model.name=t2diff", "model.user_tower=mixed_attention", "model.options.backbone=sasrec",
                                "model.options.diffusion_steps=8",
                                "model.options.sampling_steps=4", "model.options.session_length=4",
                                "model.options.history_length=6", "eval.ks=[10]"])
    split = training.prepare_split(config)
    every, last = last_position.measure("t2diff_sasrec_backbone_detached", config, split, num_requests=3, repeats=1)
    assert (every["path"], last["path"]) == ("every position", "last position")
    assert every["requests"] == 3 and len(every["pass_s"]) == len(last["pass_s"]) == 1
    assert last["user_side_difference"] < 1e-5 and last["max_metric_difference"] < 1e-6
    assert last["validation_users"] == len(split.validation.targets) and last["p50_ms"] > 0
    page = last_position.to_markdown({**last_position.header("last_position"), "repeats": 1, "warmup_requests": 10,
                                      "rows": [every, last]})
    assert "| t2diff_sasrec_backbone_detached | `user_embedding` | 2 x 10 |" in page

    model = training.build_model(config, split.dataset)
    inputs = {"history": np.arange(1, 11, dtype=np.int32)[np.newaxis]}
    model(inputs)
    copy = last_position.full_encoding_copy(model, config, split.dataset, inputs)
    calls = {"copy": [], "model": []}

    def recording(call, seen):
        @functools.wraps(call)  # keeps the signature that decides whether last_position_only is passed
        def recorded(*args, **kwargs):
            seen.append(kwargs)
            return call(*args, **kwargs)
        return recorded

    for name, built in (("copy", copy), ("model", model)):
        built.encoder.call = recording(built.encoder.call, calls[name])
    np.testing.assert_allclose(copy.user_embedding(inputs).numpy(), model.user_embedding(inputs).numpy(), atol=1e-5)
    assert calls["copy"] and not any(call.get("last_position_only") for call in calls["copy"])
    assert calls["model"] and all(call.get("last_position_only") for call in calls["model"])
    _skipped_and_kept_its_results(stopped_calls, "last_position without data",
                                  "skipped: the run's data is absent (dataset 'ml-1m' expects")


def test_product_quantizer_reconstructs_points_whose_slices_take_n_values():
    budget = _import_benchmark("sparcode_code_budget")
    rng = np.random.default_rng(0)
    values = (10.0 * rng.normal(size=(2, 4, 3))).astype(np.float32)  # 2 slices, 4 values each
    picks = rng.integers(0, 4, size=(400, 2))
    points = np.concatenate([values[0][picks[:, 0]], values[1][picks[:, 1]]], axis=1)
    quantizer = budget.ProductQuantizer(points, num_codebooks=2, num_codewords=4, iterations=20, seed=0)
    # Noisy points map back to the values they were drawn around: the quantizer does quantize.
    noisy = points + 0.01 * rng.normal(size=points.shape).astype(np.float32)
    np.testing.assert_allclose(quantizer.reconstruct(noisy), points, atol=1e-4)
    # Any input reconstructs to one of the 4 x 4 codeword pairs.
    anything = quantizer.reconstruct(rng.normal(size=(1000, 6)).astype(np.float32))
    assert len(np.unique(anything, axis=0)) <= 16
    with pytest.raises(ValueError, match="not divisible by 4 codebooks"):
        budget.ProductQuantizer(points, num_codebooks=4, num_codewords=4, iterations=1, seed=0)
    with pytest.raises(ValueError, match="needs as many points, got 400"):
        budget.ProductQuantizer(points, num_codebooks=1, num_codewords=500, iterations=1, seed=0)


@pytest.mark.parametrize("text", ["8", "8x", "0x16", "4x1", "axb"])
def test_code_budget_refuses_a_malformed_budget_quoting_it(text):
    import argparse

    budget = _import_benchmark("sparcode_code_budget")
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace("(", r"\(")):
        budget.parse_budget(text)
    assert budget.parse_budget("16X256") == (16, 256)


def test_code_budget_rows_pair_each_budget_with_the_unquantized_encoder(tmp_path, tiny_two_tower):
    """End to end on a tiny SparCode run: the unquantized row is the encoder alone (a NumPy
    oracle), a budget that keeps almost every state value ranks almost like it, and every budget
    is paired with the unquantized ranks."""
    from tfx_xmatch import training

    configs, split, _ = _tiny_runs(
        tmp_path, tiny_two_tower, "sparcode", ["model.options.num_codewords=8", "model.options.num_query_tokens=2"])
    script = str(BENCHMARKS / "sparcode_code_budget.py")
    completed = _run([script, "--runs-dir", str(tmp_path), "--run", "sparcode", "--budgets", "1x2", "8x64",
                      "--sample", "1000", "--results-dir", str(tmp_path), "--output", "budget"], timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "budget.json").read_text())
    exact, coarse, fine = result["rows"]
    # One bit per query: every test user gets one of two vectors, so the ranking changes.
    assert coarse["vs_unquantized"]["HR@10"]["difference"] != 0 or coarse["NDCG@10"] != exact["NDCG@10"]
    model = training.load_model(tmp_path / "sparcode" / "model")
    items = model.encoder_item_embeddings().numpy()

    def oracle(histories, user_rows):
        inputs = training.model_inputs(model, split.dataset, histories, user_rows)
        return model.encode_sequence(inputs).numpy()[:, -1, :] @ items.T

    from tfx_xmatch.evaluation import evaluate_full_ranking
    config = configs["sparcode"]
    expected = evaluate_full_ranking(oracle, split.test, num_items=split.num_items, max_length=config.model.max_length,
                                     batch_size=config.eval.batch_size, ks=(10, 50), mask_history=True,
                                     item_popularity=split.item_popularity())
    assert exact["HR@10"] == pytest.approx(expected["HR@10"], abs=1e-4)
    assert (coarse["bits"], fine["bits"], fine["slice_width"]) == (1.0, 48.0, 1)
    assert abs(fine["HR@10"] - exact["HR@10"]) <= 0.03
    for row in (coarse, fine):  # each budget is paired with the unquantized ranks of the same users
        paired = row["vs_unquantized"]["HR@10"]
        assert paired["difference"] == pytest.approx(row["HR@10"] - exact["HR@10"], abs=2e-4)
    page = (tmp_path / "budget.md").read_text()
    assert "| 8 x 64 (slices of 1) | 48 |" in page
    assert "p-value of the paired test of tfx_xmatch.evaluation.paired_difference" in page and "†" not in page
    # A two-tower run is read through its own item vectors; a budget that cannot apply is refused
    # before any fitting, naming it.
    completed = _run([script, "--runs-dir", str(tmp_path), "--run", "two_tower_sasrec", "--budgets", "8x16",
                      "--sample", "1000", "--results-dir", str(tmp_path), "--output", "budget_two_tower"], timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads((tmp_path / "budget_two_tower.json").read_text())["model"] == "TwoTower"
    completed = _run([script, "--runs-dir", str(tmp_path), "--run", "sparcode", "--budgets", "3x16",
                      "--results-dir", str(tmp_path), "--output", "refused"], timeout=600)
    assert completed.returncode == 2 and "budget 3x16: the state width 8 is not divisible by 3" in completed.stderr
    assert not (tmp_path / "refused.json").exists()


TINY_CONTINUOUS = [
    "data.dataset=synthetic", "data.split=leave_one_out",
    "data.synthetic={num_users: 150, num_items: 300, min_length: 8, max_length: 20, num_clusters: 4}",
    "model.embedding_dim=8", "model.max_length=10", "model.num_blocks=1", "train.epochs=2",
    "train.verbose=0", "eval.ks=[10, 50]"]


def test_the_continuous_training_benchmark_warm_starts_across_the_changed_catalogue(tmp_path):
    from tfx_xmatch import training
    from tfx_xmatch.config import load_config

    continuous = _import_benchmark("continuous_training")
    config = load_config(None, TINY_CONTINUOUS)
    dataset = training.prepare_split(config).dataset
    span = continuous.earlier_span(dataset, 40, 0.5)
    # Each kept user holds the oldest half of their own items (by raw id), never the last two,
    # numbered by a vocabulary of only the items the span holds.
    rows = {user_id: row for row, user_id in enumerate(dataset.user_ids)}
    assert 0 < span.num_users <= 40 and span.num_items < dataset.num_items
    for user_id, sequence in zip(span.user_ids, span.sequences):
        full = dataset.sequences[rows[user_id]]
        assert rows[user_id] < 40 and 3 <= len(sequence) == min(len(full) // 2, len(full) - 2)
        np.testing.assert_array_equal(span.item_vocab.ids(sequence), dataset.item_vocab.ids(full[:len(sequence)]))
    assert set(span.item_vocab.ids(np.arange(1, span.num_items + 1))) == {
        item for sequence in span.sequences for item in span.item_vocab.ids(sequence)}
    assert span.item_features["category"].shape == (span.num_items + 1, dataset.item_features["category"].shape[1])

    result = continuous.measure(config, tmp_path, [tmp_path / "scratch", tmp_path / "absent"], 40, 0.5, 1.0, "tiny")
    assert result["new_items"] == dataset.num_items - span.num_items > 0 and result["renumbered_items"] > 0
    warm = training.load_run_config(tmp_path / "tiny-warm_started").train.warm_start
    assert warm == str(tmp_path / "tiny-earlier_span" / "serving" / "1")
    assert [len(row["curve"]) for row in result["rows"]] == [row["epochs"] for row in result["rows"]]
    markdown = continuous.to_markdown(result)
    assert f"{result['new_items']:,} new since the earlier span" in markdown
    assert "| full data, warm-started from the earlier span's export | 2 (" in markdown
    # Run again, everything is reused: the same numbers.
    # Run again, everything is reused (the same numbers), and another seed of the scratch run is listed.
    training.train(load_config(None, [*TINY_CONTINUOUS, "train.seed=1"]), tmp_path / "seed1")
    again = continuous.measure(config, tmp_path, [tmp_path / "scratch", tmp_path / "seed1"], 40, 0.5, 1.0, "tiny")
    assert again["rows"][:2] == result["rows"] and again["rows"][2]["run"] == "full data, from scratch, seed 1"
    with pytest.raises(ValueError, match=r"warm_started is not scratch with another seed"):
        continuous.measure(config, tmp_path, [tmp_path / "scratch", tmp_path / "tiny-warm_started"], 40, 0.5, 1.0,
                           "tiny")


def test_cache_selection_rules_hold_their_budget_and_the_baseline_is_exact_with_room_for_everything():
    selection = _import_benchmark("sparcode_cache_selection")
    from tfx_xmatch.index.sparse_code_index import cache_budget

    rng = np.random.default_rng(0)
    num_codebooks, num_codewords, num_items = 2, 4, 20
    table = np.maximum(rng.normal(size=(num_codebooks * num_codewords, num_items + 1)), 0.0)
    table[:, 0] = 0.0  # the padding column
    usage = rng.integers(0, 9, size=num_codebooks * num_codewords).astype(np.float64)
    budget = cache_budget(0.2, num_codebooks * num_codewords, num_items)
    rules = list(selection.selections(table, usage, num_codebooks, budget))
    assert [name.split(" ")[0] for name, *_ in rules] == ["largest", "per-code", "usage-weighted", "item"]
    for name, cut, baseline, entries in rules:
        held = int(np.count_nonzero(cut)) + (0 if baseline is None else num_items)
        assert held <= entries <= budget, name
        assert not cut[:, 0].any(), name
    selection.check_index_rule(table, rules[0][1], 0.2)  # the index stores exactly the 'largest' cut
    with pytest.raises(AssertionError, match="differ"):
        selection.check_index_rule(table, rules[1][1], 0.2)
    # A baseline of N dense entries that does not fit in the budget is not offered.
    assert len(list(selection.selections(table, usage, num_codebooks, num_items - 1))) == 3
    # With room for every residual, baseline + residuals give back each query's exact scores: one
    # code per codebook (the chunk codes), or three codes of one shared codebook (the default).
    *_, (_, cut, baseline, _) = selection.selections(table, usage, num_codebooks, table.size + num_items)
    codes = np.stack([rng.integers(0, num_codewords, 50), num_codewords + rng.integers(0, num_codewords, 50)], axis=1)
    np.testing.assert_allclose(cut[codes].sum(axis=1) + baseline, table[codes].sum(axis=1), atol=1e-9)
    *_, (_, cut, baseline, _) = selection.selections(table, usage, 1, table.size + num_items, codes_per_codebook=3)
    codes = rng.integers(0, num_codebooks * num_codewords, (50, 3))
    np.testing.assert_allclose(cut[codes].sum(axis=1) + baseline, table[codes].sum(axis=1), atol=1e-9)


def test_cache_selection_ranks_through_the_models_codes_and_pairs_every_rule_with_the_full_table(tmp_path, tiny_two_tower, stopped_calls):
    from tfx_xmatch import training
    from tfx_xmatch.evaluation import evaluate_full_ranking

    configs, split, _ = _tiny_runs(
        tmp_path, tiny_two_tower, "sparcode", ["model.options.num_codewords=8", "model.options.num_query_tokens=2"])
    completed = _run([str(BENCHMARKS / "sparcode_cache_selection.py"), "--runs-dir", str(tmp_path), "--run", "sparcode",
                      "--fraction", "0.25", "--results-dir", str(tmp_path), "--output", "selection"], timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "selection.json").read_text())
    full, *rules = result["rows"]
    assert result["budget"] == 2 * split.num_items and len(rules) == 4
    assert {(row["dataset"], row["split"], row["model"]) for row in result["rows"]} == {
        ("synthetic", "leave_one_out", "sparcode")}
    assert full["variant"] == "cache=100%" and rules[0]["variant"] == "cache=25%,largest scores (the index's rule)"
    model = training.load_model(tmp_path / "sparcode" / "model")
    config = configs["sparcode"]
    expected = evaluate_full_ranking(
        lambda histories, user_rows: model.score_all(training.model_inputs(model, split.dataset, histories, user_rows)),
        split.test, num_items=split.num_items, max_length=config.model.max_length, batch_size=config.eval.batch_size,
        ks=(10, 50), mask_history=True, item_popularity=split.item_popularity())
    assert full["Recall@50"] == pytest.approx(expected["Recall@50"], abs=1e-4)
    for row in rules:
        assert row["entries"] <= result["budget"]
        assert row["vs_full"]["Recall@50"]["difference"] == pytest.approx(row["Recall@50"] - full["Recall@50"], abs=2e-4)
    page = (tmp_path / "selection.md").read_text()
    assert "| item baseline + residuals |" in page
    # The page names the test behind its p-values; a result recorded before tests were named
    # (the committed pages) gets its p-values marked as t-tests.
    assert "p-value of the paired test of tfx_xmatch.evaluation.paired_difference" in page and "†" not in page
    selection = _import_benchmark("sparcode_cache_selection")
    for row in rules:
        for difference in row["vs_full"].values():
            difference.pop("test")
    old = selection.to_markdown(result)
    assert "p-values marked † were computed before the test was recorded" in old
    assert all(line.count(" †") == 2 for line in old.splitlines() if line.startswith("| ") and "| 100% |" not in line
               and "---" not in line and "rule |" not in line)
    _refused(stopped_calls, "sparcode_cache_selection --fraction 1.5", "--fraction must be in (0, 1], got 1.5")


RESULTS = BENCHMARKS / "results"


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda path: str(path.relative_to(RESULTS)))
def test_every_committed_results_file_follows_the_design_schema(path):
    """DESIGN.md "Benchmarks": rows name their dataset, split and model; latency is p50_ms / p99_ms;
    and nothing is left for conform_results.py to rewrite."""
    from tfx_xmatch.bench.schema import check_rows

    conform = _import_benchmark("conform_results").conform
    result = json.loads(path.read_text())
    if "benchmark" not in result:  # e.g. xmatch compare's output
        return
    check_rows(result, path.stem)
    assert conform(result) == result


def test_a_results_pair_is_replaced_together(tmp_path, monkeypatch):
    """The JSON was replaced before the page was written, so a run that died while writing the
    page left the new numbers beside the old page."""
    common = _import_benchmark("common")
    row = {"dataset": "synthetic", "split": "-", "model": "two_tower_mean", "HR@10": 0.5}
    page = lambda result: f"# run {result['run']}\n"  # noqa: E731
    common.write_results({"rows": [row], "run": 1}, "demo", page, results_dir=tmp_path)
    before = {path.name: path.read_text() for path in tmp_path.iterdir()}
    assert sorted(before) == ["demo.json", "demo.md"]
    real_write_text = pathlib.Path.write_text

    def disk_full_on_the_page(self, *args, **kwargs):
        if self.name.startswith(".demo.md."):
            raise OSError(28, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full_on_the_page)
    with pytest.raises(OSError, match="No space left"):
        common.write_results({"rows": [row], "run": 2}, "demo", page, results_dir=tmp_path)
    monkeypatch.undo()
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == before  # no temporary left either
    common.write_results({"rows": [row], "run": 3}, "demo", page, results_dir=tmp_path)
    assert (tmp_path / "demo.md").read_text() == "# run 3\n" and '"run": 3' in (tmp_path / "demo.json").read_text()


def test_progress_of_a_run_does_not_replace_the_last_complete_results(tmp_path):
    """serving.py and sparse_code_latency.py rewrote their results after every catalogue size: a
    run interrupted after the first size replaced the committed 10^6-item numbers with its subset."""
    common = _import_benchmark("common")
    row = {"dataset": "synthetic", "split": "-", "model": "two_tower_mean", "p50_ms": 1.0}
    page = lambda result: f"# run {result['run']}\n"  # noqa: E731
    common.write_results({"rows": [row], "run": 1}, "demo", page, results_dir=tmp_path)
    complete = {path.name: path.read_text() for path in tmp_path.iterdir()}
    common.write_results({"rows": [row], "run": 2}, "demo", page, results_dir=tmp_path, partial=True)
    files = {path.name: path.read_text() for path in tmp_path.iterdir()}
    assert {name: text for name, text in files.items() if ".partial" not in name} == complete
    assert files["demo.partial.md"] == "# run 2\n"
    common.write_results({"rows": [row], "run": 2}, "demo", page, results_dir=tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo.json", "demo.md"]
    assert (tmp_path / "demo.md").read_text() == "# run 2\n"


def test_every_results_page_names_the_datasets_and_splits_of_its_rows():
    # Pages with model-quality numbers (the SparCode code budget and cache selection, T2Diff's
    # XLA timing, the pipeline run) named neither; their JSON rows did.
    common = _import_benchmark("common")
    result = {"benchmark": "demo", "command": "python benchmarks/demo.py", "date": "2026-12-06",
              "machine": {"cpu": "cpu", "cpu_count": 2, "memory_gib": 23.5}, "versions": {"tensorflow": "2.20.0"},
              "rows": [{"dataset": "ml-1m", "split": "leave_one_out", "model": "two_tower"},
                       {"dataset": "beauty", "split": "leave_one_out", "model": "sparc"}]}
    assert common.markdown_header(result, "demo")[-1] == \
        "- data: beauty (split: leave_one_out); ml-1m (split: leave_one_out)"
    for page in sorted(RESULTS.glob("*.md")):
        data = json.loads(page.with_suffix(".json").read_text()) if page.with_suffix(".json").exists() else {}
        named = {row["dataset"] for row in data.get("rows", []) if row.get("dataset") not in (None, "synthetic")}
        text = page.read_text().lower().replace("-", "")  # "ML-1M" names ml-1m
        assert all(dataset.lower().replace("-", "") in text for dataset in named), page.name


@pytest.mark.parametrize("script, arguments, flag", COUNTS_OUT_OF_RANGE)
def test_latency_benchmarks_refuse_counts_out_of_range_naming_the_flag(script, arguments, flag, stopped_calls):
    # They crashed with ZeroDivisionError or a layer's traceback, or were accepted (--warmup -3).
    _refused(stopped_calls, f"{script} {' '.join(arguments)}", f"argument {flag}: invalid")


def test_a_training_budget_out_of_range_is_refused_with_or_without_the_data(stopped_calls):
    # quality.py --minutes m=-5 ran into a ConfigError traceback naming train.max_train_seconds
    # and -300.0; without the data it exited 0 ("skipped").
    _refused(stopped_calls, "quality --minutes -5", "--minutes: 'two_tower_mean=-5' needs a number of minutes > 0")


def test_results_in_the_old_schema_are_refused_and_conformed_without_changing_a_value(tmp_path):
    from tfx_xmatch.bench.schema import check_rows

    common = _import_benchmark("common")
    conform = _import_benchmark("conform_results").conform
    legacy = {"benchmark": "sparc", "rows": [
        {"dataset": "ml-1m", "split": "leave_one_out", "model": "sparc", "variant": "soft K=4", "Recall@50": 0.48,
         "latency_ms_p50": 3.4, "latency_ms_p99": 6.2},
        {"dataset": "ml-1m", "split": "leave_one_out", "model": "sparc", "variant": "hard (K=1)", "Recall@50": 0.47},
        {"dataset": "ml-1m", "split": "leave_one_out", "model": "two_tower_sasrec", "variant": "exact"}]}
    with pytest.raises(ValueError, match=r"sparc.json row 0 \(model 'sparc'\): spells latency_ms_p50 \(DESIGN: "
                                         r"p50_ms\), latency_ms_p99 \(DESIGN: p99_ms\)"):
        common.write_results(legacy, "sparc", lambda result: "", results_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ValueError, match=r"t2diff.json row 0 \(model 't2diff'\): lacks \['dataset'\]"):
        check_rows({"rows": [{"split": "user_level", "model": "t2diff"}]}, "t2diff")

    rows = conform(legacy)["rows"]
    assert rows[0] == {"dataset": "ml-1m", "split": "leave_one_out", "model": "sparc_soft", "variant": "soft-k4",
                       "path": "soft K=4", "Recall@50": 0.48, "p50_ms": 3.4, "p99_ms": 6.2, "trained_model": "sparc"}
    assert rows[2]["trained_model"] == "two_tower_sasrec"
    assert (rows[1]["model"], rows[1]["path"], "variant" in rows[1]) == ("sparc_hard", "hard (K=1)", False)
    assert (rows[2]["model"], rows[2]["path"], "variant" in rows[2]) == ("two_tower_sasrec", "exact", False)
    t2diff = conform({"benchmark": "t2diff", "rows": [
        {"split": "user_level", "model": "t2diff", "sampling": "DDIM-10 (serving default)", "latency_ms_p50": 1.0},
        {"split": "user_level", "model": "two_tower_sasrec", "sampling": "dot product"}]})["rows"]
    assert t2diff == [{"dataset": "ml-1m", "split": "user_level", "model": "t2diff", "variant": "ddim-10",
                       "sampling": "DDIM-10 (serving default)", "p50_ms": 1.0},
                      {"dataset": "ml-1m", "split": "user_level", "model": "two_tower_sasrec", "sampling": "dot product"}]
    latency = conform({"benchmark": "sparse_code_latency", "rows": [
        {"dataset": "synthetic", "split": "-", "model": "tfrs_scann", "variant": "n_items=10000"},
        {"dataset": "synthetic", "split": "-", "model": "sparse_code", "variant": "n_items=10000, cache=1%"}]})["rows"]
    assert [(row["model"], row["variant"]) for row in latency] == [
        ("scann", "n_items=10000,tfrs_layer"), ("sparse_code", "n_items=10000,cache=1%")]
    check_rows(conform(legacy), "sparc")
    evaluation = conform({"benchmark": "evaluation_pass", "rows": [
        {"run": "quality-two_tower_sasrec", "model": "two_tower"}]})["rows"]
    assert evaluation == [{"dataset": "ml-1m", "split": "leave_one_out", "run": "quality-two_tower_sasrec",
                           "model": "two_tower_sasrec"}]
    # Merging into a file of the old schema conforms the rows it keeps; a SPARC re-run replaces
    # every row of its trained model, the hard, soft and backbone-alone ones alike.
    sparc = _import_benchmark("sparc")
    (tmp_path / "sparc.json").write_text(json.dumps({**legacy, "command": "old", "date": "d0", "rows": [
        *legacy["rows"], {"dataset": "ml-1m", "split": "leave_one_out", "model": "sparc",
                          "variant": "backbone alone (branch off)"}]}))
    rerun = {"dataset": "ml-1m", "split": "leave_one_out", "model": "sparc_hard", "trained_model": "sparc",
             "path": "hard (K=1)"}
    merged = common.merge_rows({"benchmark": "sparc", "command": "new", "date": "d1", "rows": [rerun]},
                               tmp_path / "sparc.json", sparc.ROW_KEY, {"train_seed": 0})
    check_rows(merged, "sparc")
    assert [(row["model"], row["path"]) for row in merged["rows"]] == [("two_tower_sasrec", "exact"),
                                                                       ("sparc_hard", "hard (K=1)")]
