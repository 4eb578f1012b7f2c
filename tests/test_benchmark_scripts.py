"""The benchmark scripts stay runnable: each one parses its arguments, and the serving benchmark
measures every index kind on a tiny catalogue with the right exact answers."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py") if path.name != "common.py")


def _run(args, timeout):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=BENCHMARKS.parent)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_imports_and_parses_its_arguments(script):
    # An import that a refactor broke only shows when a benchmark is next run, hours later.
    completed = _run([str(BENCHMARKS / script), "--help"], timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "usage:" in completed.stdout


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
        from common import merge_rows
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
    rows = [{"dataset": "ml-1m", "model": "two_tower_sasrec", "variant": "exact", "Recall@50": 0.5},
            {"dataset": "ml-1m", "model": "sparc", "variant": "hard (K=1)", "Recall@50": 0.4},
            {"dataset": "beauty", "model": "two_tower_sasrec", "variant": "exact", "Recall@50": 0.2}]
    (tmp_path / "sparc.json").write_text(json.dumps({"benchmark": "sparc", "rows": rows}))
    [row] = sparc.recorded_baseline_rows("ml-1m")
    assert row == {**rows[0], "variant": "exact (recorded: sparc.json)"}
    # A results file written by such a run, read again, keeps one label.
    (tmp_path / "sparc.json").write_text(json.dumps({"benchmark": "sparc", "rows": [row]}))
    assert sparc.recorded_baseline_rows("ml-1m") == [row]
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
