"""Brings results files written before DESIGN's row schema was enforced up to it (not a test).

``write_results`` (and ``xmatch bench``) now refuse rows that do not name their dataset, split
and model, or that spell latency ``latency_ms_p50`` / ``latency_ms_p99`` instead of ``p50_ms`` /
``p99_ms`` (``tfx_xmatch.bench.schema``). Files written earlier are rewritten here: keys are
renamed and the missing names filled in from what identifies them (the fixed dataset and split of
the script that wrote them, or the run the file names); no measured value changes. SPARC rows also
take DESIGN's model names (``sparc_hard``, ``sparc_soft`` with ``soft-k2``...), T2Diff rows a
``variant`` (``ddim-10``...), and ``sparse_code_latency`` rows the index kind as model. Pages
whose text shows those names are rendered again by their own script's ``to_markdown``. Each
rewritten file records ``schema_conformed`` (this script, the date, what changed).

``merge_rows`` applies the same conversion to the rows it keeps from an earlier file.

    python benchmarks/conform_results.py            # every file under results/
    python benchmarks/conform_results.py --check    # exit 1 if a file would change
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)

from tfx_xmatch.bench.schema import RENAMED_KEYS, check_rows  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
# Every script below trains and evaluates on ML-1M's leave-one-out split unless its rows say
# otherwise (sparc and quality rows name theirs; t2diff rows name their split).
ML1M = {"dataset": "ml-1m", "split": "leave_one_out"}
SYNTHETIC = {"dataset": "synthetic", "split": "-"}
# Pages that show a renamed value (a model or variant name) and are rendered again.
RENDERED_AGAIN = {"sparc": "sparc", "sparse_code_latency": "sparse_code_latency"}


def _sparc_row(row: dict) -> dict:
    """A SPARC row named by ``sparc.design_identity`` from its page label, and keyed by its
    trained model; the label moves to ``path``."""
    import sparc

    if "path" not in row:
        row = dict(row)
        row["path"] = row.pop("variant")
        if row["model"] == "sparc":
            soft = re.fullmatch(r"soft K=(\d+)", row["path"])
            if row["path"] == "hard (K=1)":
                path_variant = {"interests": 1}
            elif soft:
                path_variant = {"interests": int(soft.group(1))}
            elif row["path"].startswith("backbone alone"):
                path_variant = {}
            else:
                raise ValueError(f"sparc row with an unknown path {row['path']!r}")
            row.update(sparc.design_identity(path_variant))
    return {**row, "trained_model": sparc.trained_model(row)}


def _t2diff_row(row: dict) -> dict:
    import t2diff

    return {"dataset": "ml-1m", **row, **t2diff.design_variant(row["sampling"])}


def _sparse_code_latency_targets(targets: dict) -> dict:
    """The top-level ``targets`` naming variants and models as the rows now do."""
    if not targets:
        return targets
    flat = {**targets["flat_latency"], **{key: targets["flat_latency"][key].replace(", ", ",")
                                           for key in ("smallest", "largest")}}
    speed = {**targets["speedup_vs_brute_force"],
             "target": targets["speedup_vs_brute_force"]["target"].replace("tfrs_brute_force", "brute_force")}
    return {**targets, "flat_latency": flat, "speedup_vs_brute_force": speed}


def _sparse_code_latency_row(row: dict) -> dict:
    row = dict(row)
    if row["model"].startswith("tfrs_"):
        row.update(model=row["model"][len("tfrs_"):], variant=row["variant"] + ",tfrs_layer")
    row["variant"] = row["variant"].replace(", ", ",")
    return row


MODELS = ("two_tower_sasrec", "two_tower_mean", "sparcode_all_to_all", "sparcode", "t2diff", "sparc")
SEEDED_RUN = re.compile(r"-seed(\d+)$")  # the suffix of common.seeded_run_dir's names


def run_identity(run: str) -> dict:
    """Dataset, split and model of a run of these benchmarks, from its directory name: the model
    it ends with (``<output>-<model>[-seed<N>]``, as the benchmarks name them), else the first
    model named in it (older names, ``t2diff-<split>-<variant>``)."""
    split = "user_level" if "-user_level-" in run else "leave_one_out"
    last = SEEDED_RUN.sub("", run).rsplit("-", 1)[-1]
    for model in ((last,) if last in MODELS else MODELS):
        if model in run:
            return {"dataset": "ml-1m", "split": split, "model": model}
    raise ValueError(f"cannot tell the model of run {run!r}")


def _renamed(entry: dict) -> dict:
    """``entry`` with latency keys respelled, also inside derived keys (``..._std``, ``..._vs_two_tower``)."""
    fresh = {}
    for key, value in entry.items():
        for old, new in RENAMED_KEYS.items():
            key = key.replace(old, new)
        fresh[key] = value
    return fresh


def conform(result: dict) -> dict:
    """``result`` with DESIGN's row keys and names (a new dict; rows already conforming stay as they are).

    Raises:
      ValueError: a row this script cannot name (it quotes the benchmark and the value).
    """
    benchmark = result.get("benchmark")
    if "rows" not in result and benchmark == "pipeline":  # ml1m_sasrec.yaml, leave-one-out
        import pipeline

        result = {**result, "split": result.get("split", "leave_one_out"),
                  "model": result.get("model", "two_tower_sasrec")}
        return {**result, "rows": pipeline.pipeline_rows(result)}
    if "rows" not in result and benchmark == "seed_study":
        import seed_study

        return {**result, "rows": seed_study.comparison_rows(result)}
    rows = result.get("rows")
    if rows is None:
        return result
    result = {**result, **{name: [_renamed(entry) for entry in result[name]]  # the suite's other tables
                           for name in ("sweeps", "summary") if isinstance(result.get(name), list)}}
    converted = []
    for row in rows:
        row = _renamed(row)
        if row.get("model") == "two_tower":  # the config's name; DESIGN names the user tower too
            tower = result.get("settings", {}).get("model", {}).get("user_tower")
            row = {**row, "model": f"two_tower_{tower}" if tower else run_identity(row["run"])["model"]}
        if benchmark == "sparc":
            row = _sparc_row(row)
        elif benchmark == "t2diff":
            row = _t2diff_row(row)
        elif benchmark == "sparse_code_latency":
            row = _sparse_code_latency_row(row)
        elif benchmark == "bench":  # the suite always runs leave-one-out (tfx_xmatch.bench.suite)
            row = {"split": "leave_one_out", **row}
        elif benchmark == "partitioned_profile":
            row = {**SYNTHETIC, "model": "partitioned", **row}
        elif benchmark == "evaluation_pass":
            row = {**ML1M, **row}
        elif benchmark == "continuous_training":
            row = {**ML1M, "model": "two_tower_" + result["settings"]["model"]["user_tower"], **row}
        elif benchmark in ("sparcode_code_budget", "t2diff_xla"):
            row = {**run_identity(result["run"]), **row}
        converted.append(row)
    if benchmark == "sparse_code_latency":
        result = {**result, "targets": _sparse_code_latency_targets(result.get("targets", {}))}
    return {**result, "rows": converted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = parser.parse_args()
    from tfx_xmatch.io_utils import json_text, write_texts_atomic

    changed = []
    if not pathlib.Path(args.results_dir).is_dir():  # rglob of a missing folder finds nothing: a false pass
        parser.error(f"--results-dir {args.results_dir!r} is not a directory")
    for path in sorted(pathlib.Path(args.results_dir).rglob("*.json")):
        if path.name.endswith(".partial.json"):  # a suite's progress, rewritten as it runs
            continue
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or "benchmark" not in result:
            continue
        fresh = conform(result)
        check_rows(fresh, str(path.with_suffix("")))
        if fresh == result:
            continue
        changed.append(path)
        if args.check:
            continue
        fresh["schema_conformed"] = {
            "script": "benchmarks/conform_results.py",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "changes": "row keys and names only (DESIGN.md 'Benchmarks'); no measured value changed",
        }
        texts = {path: json_text(fresh)}
        script = RENDERED_AGAIN.get(fresh["benchmark"])
        if script:
            texts[path.with_suffix(".md")] = importlib.import_module(script).to_markdown(fresh)
        write_texts_atomic(texts)  # the JSON and its page are replaced together
        print(f"conformed: {path}")
    if args.check and changed:
        print("would change: " + ", ".join(str(path) for path in changed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
