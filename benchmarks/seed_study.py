"""Does a model beat another over several training runs? (a benchmark report, not a test)

The quality benchmarks compare each row with a reference on the same test users (a paired
test), which treats the trained weights as fixed. On ML-1M two trainings of one two-tower
config differ by more than that test's interval (see the README's evaluation protocol), so a
claim that one model beats another needs several runs of each. This script reads the per-user
test ranks that ``t2diff.py`` and ``sparc.py`` keep beside their runs (``test_ranks/``; no
model is loaded or evaluated) and, for each comparison of a spec file, reports
``tfx_xmatch.evaluation.compare_run_groups``: the paired test over users of the run-averaged
gains, a t-test over the runs' values (Welch's; paired run by run when both sides are the same
trained runs), every run pairing's paired test, and a verdict that needs the test over users and
the test over runs to agree.

The spec (YAML) names the runs (directories under ``--runs-dir``) and the rank label of each:

    dataset_config: configs/ml1m_sasrec.yaml   # which split the ranks are of
    comparisons:
      - name: T2Diff (detached backbone), DDIM-10 vs two-tower
        metrics: [HR@10, MRR@20, NDCG@10]
        a: {label: DDIM-10, runs: [t2diff-leave_one_out-t2diff_sasrec_backbone_detached, ...]}
        b: {label: dot product, runs: [quality-two_tower_sasrec, quality-two_tower_sasrec-seed1]}
      - name: DDIM-10 vs DDPM-50 of the same runs
        paired_runs: true          # run i of A and of B are the same trained model
        ...

A comparison whose runs lack rank files is reported as missing (which ones). Rank files live
beside the runs, outside the repository, so they can be gone while the runs' results pages are
committed: a side may then name, per run, the results page (``benchmarks/results/<stem>.json``)
and the row variant that recorded it, and the comparison gets the test over runs from those
recorded values. That is half a verdict (no test over users), and the page says so:

        a:
          label: cache 100%
          runs: [sparcode_chunks_continued-sparcode, sparcode_chunks_seed1_continued-sparcode-seed1]
          recorded: {variant: "cache=100%", results: [sparcode_chunks_continued, sparcode_chunks_seed1_continued]}

The row of a run is the one of its model (from the run's name), that variant and its training
seed (a name ending ``-seed<N>``, else 0).

    python benchmarks/seed_study.py                       # benchmarks/seed_study.yaml
    python benchmarks/seed_study.py --spec my_study.yaml --output my_study
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tfx_xmatch  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from common import REPO_ROOT, RESULTS_DIR, default_data_dir, header, markdown_header, write_results  # noqa: E402
from conform_results import SEEDED_RUN, run_identity  # noqa: E402

import yaml  # noqa: E402

from tfx_xmatch import training  # noqa: E402
from tfx_xmatch.bench.paired import load_ranks  # noqa: E402
from tfx_xmatch.config import load_config  # noqa: E402
from tfx_xmatch.evaluation import (check_metric, compare_run_groups, compare_run_values,  # noqa: E402
                                   describe_recorded_tests,
                                   format_difference, format_recorded_difference, is_tail_target)

DEFAULT_SPEC = pathlib.Path(__file__).resolve().parent / "seed_study.yaml"


def read_spec(path: pathlib.Path) -> dict:
    """The spec at ``path``, checked.

    Raises:
      ValueError: a missing or malformed field, named with the file and the comparison.
    """
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("dataset_config"), str):
        raise ValueError(f"{path}: needs 'dataset_config' (a config file path) and 'comparisons'")
    comparisons = spec.get("comparisons")
    if not isinstance(comparisons, list) or not comparisons:
        raise ValueError(f"{path}: 'comparisons' must be a non-empty list, got {comparisons!r}")
    for number, comparison in enumerate(comparisons, 1):
        where = f"{path}: comparison {number}"
        if not isinstance(comparison, dict) or not isinstance(comparison.get("name"), str):
            raise ValueError(f"{where} needs a 'name', got {comparison!r}")
        where += f" ({comparison['name']!r})"
        metrics = comparison.get("metrics")
        if not isinstance(metrics, list) or not metrics:
            raise ValueError(f"{where}: 'metrics' must be a non-empty list, got {metrics!r}")
        for metric in metrics:
            try:
                check_metric(metric)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        for side in ("a", "b"):
            group = comparison.get(side)
            if (not isinstance(group, dict) or not isinstance(group.get("label"), str)
                    or not isinstance(group.get("runs"), list) or not group["runs"]
                    or not all(isinstance(run, str) for run in group["runs"])):
                raise ValueError(f"{where}: {side!r} must be {{label: <rank label>, runs: [<run dir>, ...]}}, "
                                 f"got {group!r}")
            repeated = sorted({run for run in group["runs"] if group["runs"].count(run) > 1})
            if repeated:
                raise ValueError(f"{where}: {side!r} names the same run more than once: {repeated}")
            recorded = group.get("recorded")
            if "recorded" in group and (
                    not isinstance(recorded, dict) or not isinstance(recorded.get("variant"), str)
                    or not isinstance(recorded.get("results"), list)
                    or not all(isinstance(stem, str) for stem in recorded["results"])
                    or len(recorded["results"]) != len(group["runs"])):
                raise ValueError(f"{where}: {side!r} 'recorded' must be {{variant: <row variant>, results: "
                                 f"[<results stem>, one per run]}} ({len(group['runs'])} runs), "
                                 f"got {recorded!r}")
        if ("recorded" in comparison["a"]) != ("recorded" in comparison["b"]):
            raise ValueError(f"{where}: 'recorded' on one side only: the test over runs needs both sides' values")
        if not isinstance(comparison.get("paired_runs", False), bool):
            raise ValueError(f"{where}: 'paired_runs' must be true or false, got {comparison['paired_runs']!r}")
        if comparison.get("paired_runs") and len(comparison["a"]["runs"]) != len(comparison["b"]["runs"]):
            raise ValueError(f"{where}: 'paired_runs' needs as many runs in 'a' as in 'b'")
        shared = set(comparison["a"]["runs"]) & set(comparison["b"]["runs"])
        if shared and not comparison.get("paired_runs"):
            raise ValueError(f"{where}: runs {sorted(shared)} are on both sides; set 'paired_runs: true' "
                             "to compare two paths of the same runs run by run")
    return spec


def _run_config(run_dir: pathlib.Path):
    """The run's own config (its saved ranks are checked against it), or None without one."""
    return training.load_run_config(run_dir) if (run_dir / "config.json").is_file() else None


def _recorded_rows(path: pathlib.Path, run: str) -> list:
    if not path.is_file():
        raise ValueError(f"{path}: no such results file (recorded values of run {run!r})")
    try:
        rows = json.loads(path.read_text()).get("rows")
    except (ValueError, AttributeError):
        rows = None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: not a results page (a JSON object with a list of 'rows')")
    return rows


def recorded_values(group: dict, metrics, results_dir: pathlib.Path = RESULTS_DIR) -> dict[str, list[float]]:
    """Each metric's value per run of a spec side, as the side's ``recorded`` results pages hold it.

    A run's row is the one of its model (``conform_results.run_identity``: the model its name
    ends with), ``recorded.variant``, its training seed (a name ending ``-seed<N>``, else 0) and,
    where the row records them, its split and dataset.

    Raises:
      ValueError: a missing or malformed results file, no row or several for a run (naming the
        file, the run, what was looked for and which rows the page has), or a row without one
        of ``metrics``.
    """
    recorded, values = group["recorded"], {metric: [] for metric in metrics}
    for run, stem in zip(group["runs"], recorded["results"]):
        path = results_dir / f"{stem}.json"
        rows = _recorded_rows(path, run)
        seeded = SEEDED_RUN.search(run)
        wanted = {**run_identity(run), "variant": recorded["variant"], "train_seed": int(seeded[1]) if seeded else 0}
        found = [row for row in rows
                 if row.get("model") == wanted["model"] and row.get("variant") == wanted["variant"]
                 and (row.get("train_seed") or 0) == wanted["train_seed"]
                 and all(row.get(key, wanted[key]) == wanted[key] for key in ("split", "dataset"))]
        if len(found) != 1:
            held = sorted({(str(row.get("model")), str(row.get("variant")), row.get("train_seed") or 0)
                           for row in rows})
            raise ValueError(f"{path}: {len(found)} rows of {wanted} (run {run!r}); need exactly one. The page "
                             f"holds (model, variant, train_seed): {held}")
        for metric in metrics:
            if not isinstance(found[0].get(metric), (int, float)):
                raise ValueError(f"{path}: the row of run {run!r} records no {metric!r}")
            values[metric].append(float(found[0][metric]))
    return values


def recorded_comparison(comparison: dict, results_dir: pathlib.Path = RESULTS_DIR) -> dict:
    """{metric: runs_a, runs_b, across_runs (``compare_run_values``), verdict} from recorded values."""
    a, b = (recorded_values(comparison[side], comparison["metrics"], results_dir) for side in ("a", "b"))
    result = {}
    for metric in comparison["metrics"]:
        across = compare_run_values(a[metric], b[metric], paired_runs=comparison.get("paired_runs", False))
        if across is None:
            verdict = "needs 2+ runs a side"
        elif across["p_value"] is None:
            verdict = "no test over runs (no spread)"
        elif across["p_value"] < 1.0 - across["confidence"]:
            verdict = f"{'A' if across['difference'] > 0 else 'B'} better over runs (not tested over users)"
        else:
            verdict = "no significant difference over runs"
        result[metric] = {"runs_a": a[metric], "runs_b": b[metric], "across_runs": across, "verdict": verdict}
    return result


def study(spec: dict, runs_dir: pathlib.Path, targets, is_tail, results_dir: pathlib.Path = RESULTS_DIR) -> list[dict]:
    """One entry per comparison: its runs, and ``compare_run_groups``'s result or what is missing
    (with the test over runs of the recorded values when both sides name them)."""
    entries = []
    for comparison in spec["comparisons"]:
        groups, missing = [], []
        for side in ("a", "b"):
            label, runs = comparison[side]["label"], comparison[side]["runs"]
            ranks = [load_ranks(runs_dir / run, label, targets, _run_config(runs_dir / run)) for run in runs]
            missing += [f"{run}/{label!r}" for run, r in zip(runs, ranks) if r is None]
            groups.append(ranks)
        entry = {"name": comparison["name"], "a": comparison["a"], "b": comparison["b"],
                 "paired_runs": comparison.get("paired_runs", False)}
        if missing:
            entry["missing"] = missing
            if "recorded" not in comparison["a"]:
                print(f"skipped {comparison['name']!r}: no saved ranks for {', '.join(missing)}", file=sys.stderr)
            else:
                print(f"{comparison['name']!r}: no saved ranks for {', '.join(missing)}; tested over runs only, "
                      "from the recorded values", file=sys.stderr)
                try:
                    entry["recorded"] = recorded_comparison(comparison, results_dir)
                except ValueError as error:  # the other comparisons still get their answer
                    print(f"{comparison['name']!r}: not tested over runs: {error}", file=sys.stderr)
                    entry["recorded_error"] = str(error)
            entries.append(entry)
            continue
        entries.append({**entry, "metrics": compare_run_groups(groups[0], groups[1], comparison["metrics"], is_tail,
                                                      paired_runs=comparison.get("paired_runs", False))})
    return entries


def comparison_rows(result: dict) -> list[dict]:
    """One DESIGN row per finished comparison: side a's model (named from its runs) and label as
    the variant, its mean over runs per metric, and ``vs`` side b (the users-averaged paired
    difference with its interval and p-value, and the test over runs)."""
    rows = []
    for entry in result["comparisons"]:
        if "metrics" not in entry:
            continue
        a, b = entry["a"], entry["b"]
        rows.append({
            "dataset": result["dataset"], "split": result["split"], "model": run_identity(a["runs"][0])["model"],
            "variant": a["label"], "comparison": entry["name"], "runs": len(a["runs"]),
            "compared_with": {"model": run_identity(b["runs"][0])["model"], "variant": b["label"],
                              "runs": len(b["runs"])},
            **{metric: values["averaged"]["mean_a"] for metric, values in entry["metrics"].items()},
            "vs": {metric: {**{key: values["averaged"][key] for key in ("difference", "ci_low", "ci_high", "p_value",
                                                                       "test") if key in values["averaged"]},
                            "across_runs_p_value": (values.get("across_runs") or {}).get("p_value")}
                   for metric, values in entry["metrics"].items()},
        })
    return rows


def to_markdown(result: dict) -> str:
    over_users = describe_recorded_tests([values["averaged"] for entry in result["comparisons"]
                                          for values in entry.get("metrics", {}).values()])
    recorded_only = any("missing" in entry and "recorded" in entry["a"] for entry in result["comparisons"])
    lines = markdown_header(result, "one model against another over several training runs") + [
        f"- ranks of: {result['dataset']} ({result['split']}, {result['num_users']:,} test users); full ranking, "
        "read from the runs' test_ranks/" + ("; where a run's ranks are gone, its comparison is tested over runs "
                                             "only, from the values its results page recorded" if recorded_only else ""),
        "- per metric: each run's value; over users: the gain of each user averaged over a "
        "model's runs (the runs held fixed); over runs: a t-test of the runs' values, the run-to-run spread as "
        "its noise (Welch's; paired run by run when both sides are the same runs; needs 2+ runs a side, and "
        "has little power with 2 or 3); the run pairings (paired over users) significant for each model; 95% "
        f"intervals; the test over users is {over_users}",
        "- verdict: 'A better' / 'B better' only when the test over users and the test over runs are both "
        "significant the same way",
        "",
    ]
    for entry in result["comparisons"]:
        a, b = entry["a"], entry["b"]
        lines += [f"## {entry['name']}", "",
                  f"- A = {a['label']!r} of {', '.join(a['runs'])}",
                  f"- B = {b['label']!r} of {', '.join(b['runs'])}"]
        lines += ["- the same trained runs on both sides: over runs is a paired t-test, run i against run i", ""] \
            if entry.get("paired_runs") else [""]
        if "missing" in entry:
            lines += [f"Not compared over users: no saved ranks for {', '.join(entry['missing'])}.", ""]
            if "recorded_error" in entry:
                lines += [f"Not tested over runs either: {entry['recorded_error']}", ""]
            if "recorded" in entry:
                pages = sorted({stem for side in (a, b) for stem in side["recorded"]["results"]})
                test = next(iter(entry["recorded"].values()))["across_runs"]
                lines += [f"Over runs only ({test['test'] if test else 'no test: one run a side'}), from the values "
                          f"recorded in {', '.join(f'`{p}.json`' for p in pages)} (A: variant "
                          f"{a['recorded']['variant']!r}, B: {b['recorded']['variant']!r}; rounded as recorded). "
                          "Half of the verdict: without the ranks there is no test over users.", "",
                          "| metric | A runs | B runs | A − B, over runs | verdict |", "|---|---|---|---|---|"]
                for metric, value in entry["recorded"].items():
                    across = format_difference(value["across_runs"]) if value["across_runs"] else "needs 2+ runs a side"
                    lines.append(f"| {metric} | {' '.join(f'{v:.4f}' for v in value['runs_a'])} | "
                                 f"{' '.join(f'{v:.4f}' for v in value['runs_b'])} | {across} | {value['verdict']} |")
                lines.append("")
            continue
        lines += ["| metric | A runs | B runs | A − B, over users (runs averaged) | A − B, over runs | "
                  "pairings for A / for B | verdict |", "|---|---|---|---|---|---|---|"]
        for metric, value in entry["metrics"].items():
            across = format_difference(value["across_runs"]) if value["across_runs"] else "needs 2+ runs a side"
            pairings = len(value["pairings"])
            lines.append(f"| {metric} | {' '.join(f'{v:.4f}' for v in value['runs_a'])} | "
                         f"{' '.join(f'{v:.4f}' for v in value['runs_b'])} | "
                         f"{format_recorded_difference(value['averaged'])} | {across} | "
                         f"{value['significant_for_a']} / {value['significant_for_b']} of {pairings} | "
                         f"{value['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="the comparisons (YAML; see above)")
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--runs-dir", default=str(pathlib.Path(__file__).resolve().parent / "runs"))
    parser.add_argument("--output", default="seed_study", help="results file stem under benchmarks/results/")
    args = parser.parse_args()

    if not pathlib.Path(args.spec).is_file():
        parser.error(f"--spec {args.spec!r}: no such file")
    spec = read_spec(pathlib.Path(args.spec))
    config = load_config(REPO_ROOT / spec["dataset_config"], [f"data.data_dir={args.data_dir}"])
    if not (pathlib.Path(args.data_dir) / config.data.dataset).is_dir():
        print(f"skipped: dataset {config.data.dataset!r} not found under {args.data_dir}", file=sys.stderr)
        return 0
    split = training.prepare_split(config)
    targets = split.test.targets
    result = {**header("seed_study"), "dataset": split.dataset.name, "split": split.name,
              "num_users": int(len(targets)), "spec": spec}
    result["comparisons"] = study(spec, pathlib.Path(args.runs_dir), targets,
                                  is_tail_target(targets, split.item_popularity()))
    result["rows"] = comparison_rows(result)
    write_results(result, args.output, to_markdown, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
