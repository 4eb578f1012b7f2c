"""``REPORT.md`` and its plots, generated from one suite run's result (nothing else is read)."""

from __future__ import annotations

import io
import math
import pathlib
from typing import Optional

from tfx_xmatch.bench.suite import QUALITY_KEYS
from tfx_xmatch.io_utils import atomic_paths

PLOTS = {"quality": "report_quality.png", "index_latency": "report_index_latency.png",
         "t2diff_steps": "report_t2diff_steps.png", "sparcode_cache": "report_sparcode_cache.png"}


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _with_std(entry: dict, key: str, digits: int = 4) -> str:
    value, std = entry.get(key), entry.get(f"{key}_std")
    return _number(value, digits) + (f" ± {std:.{digits}f}" if std is not None else "")


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    content = io.BytesIO()
    figure.savefig(content, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return content.getvalue()


def _first_run_paths(result: dict) -> list[dict]:
    """The sweeps plus the main paths measured on the first dataset and seed (where the sweeps
    run), one row per distinct serving variant."""
    first = [row for row in result["rows"] if row["dataset"] == result["datasets"][0]
             and row["seed"] == result["seeds"][0] and "variant" in row]
    unique = {}
    for row in [*result["sweeps"], *first]:
        unique.setdefault((row["model"], repr(sorted(row["variant"].items()))), row)
    return list(unique.values())


def plot(result: dict) -> dict[str, tuple[str, bytes]]:
    """Draws the four plots; returns {plot: (file name, PNG bytes)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    summary = result["summary"]
    labels = sorted({(entry["model"], entry["path"]) for entry in summary})
    figure, axis = plt.subplots(figsize=(min(16, max(6, 1.2 * len(labels) * max(1, len(result["datasets"])))), 4))
    width = 0.8 / max(1, len(labels))
    for offset, (model, path) in enumerate(labels):
        # A model missing on a dataset (failed) draws no bar rather than a bar at zero.
        values = [next((entry.get("HR@10", math.nan) for entry in summary if entry["dataset"] == dataset
                        and (entry["model"], entry["path"]) == (model, path)), math.nan)
                  for dataset in result["datasets"]]
        axis.bar([d + offset * width for d in range(len(result["datasets"]))], values, width, label=f"{model} / {path}")
    axis.set_xticks([d + 0.4 - width / 2 for d in range(len(result["datasets"]))], result["datasets"])
    axis.set_ylabel("HR@10 (test, full ranking)")
    axis.legend(fontsize=7, ncol=2)
    written["quality"] = (PLOTS["quality"], _png(figure))

    figure, axis = plt.subplots(figsize=(6, 4))
    for kind in sorted({row["kind"] for row in result["index_latency"]}):
        points = sorted((row["n_items"], row["p50_ms"]) for row in result["index_latency"] if row["kind"] == kind)
        axis.plot(*zip(*points), marker="o", label=kind)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("catalogue size (items)")
    axis.set_ylabel("p50 ms per query (batch 1, top-100)")
    axis.legend()
    written["index_latency"] = (PLOTS["index_latency"], _png(figure))

    steps = [row for row in _first_run_paths(result) if "sampler" in row["variant"]]
    figure, axis = plt.subplots(figsize=(6, 4))
    for sampler in sorted({row["variant"]["sampler"] for row in steps}):
        points = sorted((row["variant"]["steps"], row["HR@10"]) for row in steps if row["variant"]["sampler"] == sampler)
        axis.plot(*zip(*points), marker="o", label=sampler.upper())
    axis.set_xlabel("reverse steps")
    axis.set_ylabel("T2Diff HR@10")
    if axis.lines:
        axis.legend()
    written["t2diff_steps"] = (PLOTS["t2diff_steps"], _png(figure))

    cache = [row for row in _first_run_paths(result) if row["variant"].get("kind") == "sparse_code"]
    figure, axis = plt.subplots(figsize=(6, 4))
    points = sorted(((row["variant"].get("cache_fraction") or 1.0), row["Recall@50"]) for row in cache)
    if points:
        axis.plot(*zip(*points), marker="o")
    axis.set_xscale("log")
    axis.set_xlabel("cache budget (fraction of all code-item scores kept)")
    axis.set_ylabel("SparCode Recall@50")
    written["sparcode_cache"] = (PLOTS["sparcode_cache"], _png(figure))
    plt.close("all")
    return written


def _ratio(entry: dict, key: str) -> str:
    value = entry.get(f"{key}_vs_two_tower")
    return "-" if value is None else f"{value:.2f}"


def _settings(result: dict) -> list[str]:
    """The suite's training settings and every override (``bench.json`` has each resolved config)."""
    settings = result.get("settings")
    if not settings:  # written before bench.json recorded them
        return []
    lines = [f"- training: at most {settings['epochs']} epochs, early-stopping patience {settings['patience']}; "
             f"latency over {settings['latency_users']} users, one per call"]
    for name in result["datasets"]:
        if settings["datasets"][name].get("overrides"):
            lines.append(f"- {name} overrides (every model): `{' '.join(settings['datasets'][name]['overrides'])}`")
    for name, model in settings["models"].items():
        if model.get("overrides"):
            lines.append(f"- {name} overrides: `{' '.join(model['overrides'])}`")
    return lines


def _provenance(result: dict) -> list[str]:
    """Where the numbers come from: source revision, reused trainings, skipped datasets."""
    source = result.get("source") or {}
    lines = []
    if source.get("commit"):
        lines.append(f"- source: commit {source['commit'][:12]}"
                     + (" with uncommitted changes" if source.get("uncommitted_changes") else ""))
    trainings = {(row["dataset"], row["model"], row["seed"]): row for row in result["rows"]}
    reused = [row for row in trainings.values() if row.get("reused")]
    if reused:
        dates = sorted(row["trained_on"] for row in reused)
        lines.append(f"- **{len(reused)} of {len(trainings)} trainings were reused** from an earlier invocation "
                     f"(`--resume`; finished {dates[0]} to {dates[-1]}, {sum(row['train_seconds'] for row in reused) / 60:.1f} "
                     "min of training time); this invocation re-measured every number but its wall time does not "
                     "include that training. Reused rows are marked ↺.")
    if result.get("skipped_datasets"):
        lines.append(f"- not run (dataset files not found): {', '.join(result['skipped_datasets'])}")
    return lines


def markdown(result: dict, plots: dict[str, str]) -> str:
    """The report text: settings, quality per dataset, speed, index latency, sweeps, plots."""
    machine, versions = result["machine"], result["versions"]
    budgets = {name: minutes for name, minutes in result["budgets"].items() if name in result["datasets"]}
    lines = [
        "# tfx_xmatch benchmark report",
        "",
        f"Generated by `{result['command']}` on {result['date']} ({'quick' if result['quick'] else 'full'} mode), "
        f"suite `{result['suite']}`; wall time of this run **{result['wall_seconds'] / 60:.1f} min**.",
        "",
        f"- machine: {machine['cpu']} ({machine['cpu_count']} cores, {machine['memory_gib']} GiB, no GPU)",
        "- versions: " + ", ".join(f"{key} {value}" for key, value in versions.items()),
        *_provenance(result),
        f"- datasets: {', '.join(result['datasets'])}; seeds {result['seeds']} (± is the sample std over "
        f"seeds); training budget per model in minutes {budgets} (fit time; validation passes not counted)",
        *_settings(result),
        "- protocol: leave-one-out, full ranking over all items with the history removed, model selection on "
        "validation, test reported; every number goes through the model's serving path (what its export "
        "answers: top-100 from its index, the user's whole history excluded; items not returned rank last).",
        "- tuning: every model trains with its shipped config (`configs/ml1m_*.yaml`, tuned on ML-1M) plus the "
        "suite's dataset overrides, under the same training-time budget and epoch cap; there is no "
        "per-dataset hyperparameter search.",
        "",
    ]
    if result.get("failures"):
        lines += ["## Failed", ""] + [f"- {failure['dataset']} / {failure['model']} / seed {failure['seed']}: "
                                      f"`{failure['error']}`" for failure in result["failures"]] + [""]
    for dataset in result["datasets"]:
        entries = [entry for entry in result["summary"] if entry["dataset"] == dataset]
        lines += [f"## Quality: {dataset}", "",
                  "| model | path | " + " | ".join(QUALITY_KEYS) + " | train s | epochs |",
                  "|---|---|" + "---|" * (len(QUALITY_KEYS) + 2)]
        for entry in entries:
            mark = " ↺" if entry.get("reused") else ""
            lines.append(f"| {entry['model']}{mark} | {entry['path']} | "
                         + " | ".join(_with_std(entry, key) for key in QUALITY_KEYS)
                         + f" | {_number(entry.get('train_seconds'), 0)} | {_number(entry.get('epochs'), 0)} |")
        lines.append("")
    lines += ["## Speed", "",
              "Training speed: training sequences (one per user) per second over the steady-state epochs (the "
              "first, which traces the graphs, left out). Latency: one user per call (batch 1) through the "
              "serving path, encoder included, the user's history excluded; p99 is over "
              f"{result.get('latency_users', 'the timed')} calls. Columns marked × are ratios to the SASRec "
              "two-tower with brute force on the same dataset (training speed: higher is faster; the others: "
              "lower is better; '-' where the baseline's figure is about zero).", "",
              "| dataset | model | path | train seq/s | × | epoch s | p50 ms | × | p99 ms | × "
              "| index build s | × | index MB | × |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in result["summary"]:
        lines.append(
            f"| {entry['dataset']} | {entry['model']} | {entry['path']} | "
            f"{_number(entry.get('train_sequences_per_second'), 1)} | {_ratio(entry, 'train_sequences_per_second')} | "
            f"{_number(entry.get('epoch_seconds'), 2)} | "
            f"{_number(entry.get('p50_ms'), 2)} | {_ratio(entry, 'p50_ms')} | "
            f"{_number(entry.get('p99_ms'), 2)} | {_ratio(entry, 'p99_ms')} | "
            f"{_number(entry.get('index_build_seconds'), 2)} | {_ratio(entry, 'index_build_seconds')} | "
            f"{_number(entry.get('index_bytes', 0) / 2**20, 2)} | {_ratio(entry, 'index_bytes')} |")
    lines += ["", "## Index latency against catalogue size (synthetic, top-100, in-process)", "",
              "Dense kinds: N clustered 64-dimensional items, one query vector per call. `sparse_code`: a ReLU "
              "code-item score table [N, 512] (32-dimensional items and codes, about 5% positive), one bag of "
              "8 codes per call; its recall is against the exact top-100 positive-score items.", "",
              "| kind | items | p50 ms | p99 ms | recall@100 vs exact | build s | MB |", "|---|---|---|---|---|---|---|"]
    for row in result["index_latency"]:
        lines.append(f"| {row['kind']} | {row['n_items']} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
                     f"{row['recall_at_k']:.4f} | {row['build_seconds']:.2f} | {row['index_bytes'] / 2**20:.2f} |")
    lines += ["", f"## Sweeps ({result['datasets'][0]}, seed {result['seeds'][0]})", "",
              "| model | path | HR@10 | MRR@20 | Recall@50 | p50 ms |", "|---|---|---|---|---|---|"]
    for row in result["sweeps"]:
        lines.append(f"| {row['model']} | {row['path']} | {_number(row.get('HR@10'))} | {_number(row.get('MRR@20'))} | "
                     f"{_number(row.get('Recall@50'))} | {row['p50_ms']:.2f} |")
    lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()] + [""]
    return "\n".join(lines)


def write_report(result: dict, directory: str | pathlib.Path,
                 together_with: Optional[dict] = None) -> pathlib.Path:
    """Writes the plots and ``REPORT.md`` into ``directory``; returns the report's path.

    Args:
      result: The suite's result.
      directory: Where the report and its plots go.
      together_with: ``{path: text}`` replaced in the same step as ``REPORT.md`` (the result
        JSON), so that neither is ever left beside the other's previous version.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots = plot(result)
    path = directory / "REPORT.md"
    texts = {**(together_with or {}), path: markdown(result, {name: file for name, (file, _) in plots.items()})}
    # Plots, report and result replaced together: none is left beside another run's.
    with atomic_paths([*texts, *(directory / file for file, _ in plots.values())]) as temporaries:
        for temporary, text in zip(temporaries, texts.values()):
            temporary.write_text(text, encoding="utf-8")
        for temporary, (_, content) in zip(temporaries[len(texts):], plots.values()):
            temporary.write_bytes(content)
    return path
