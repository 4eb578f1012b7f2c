"""The benchmark suite: every model on every available dataset under one protocol, quality and
speed side by side, from one configuration file (``benchmarks/suite.yaml``).

Protocol, the same for every model: the dataset's split from the suite, full ranking over all
items with the history removed, model selection on validation (``train.monitor``), test
reported, the same training-time budget and epoch cap per model on a dataset, fixed seeds.
Every number goes through the model's serving path (``serving_paths``): what an export of it
answers. Training runs live in ``runs_dir`` and are reused when finished, so an interrupted
suite continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Optional

import numpy as np
import yaml

from tfx_xmatch import training
from tfx_xmatch.bench.index_latency import measure as measure_index_latency
from tfx_xmatch.bench.serving_paths import evaluate_path, index_bytes, per_user_latency, serving_path
from tfx_xmatch.config import ConfigError, load_config

QUALITY_KEYS = ("HR@10", "NDCG@10", "MRR@20", "Recall@50", "NDCG@50", "TailRecall@50", "Coverage@50")
FILE_DATASETS = {"ml-1m": "ml-1m/ml-1m.txt", "ml-100k": "ml-100k/u.data", "beauty": "beauty/Beauty.txt",
                 "lastfm": "lastfm/LastFM.txt"}
BASELINE = ("two_tower_sasrec", "brute force")


@dataclasses.dataclass
class Suite:
    """A parsed suite file (see ``benchmarks/suite.yaml`` for every key)."""

    datasets: dict
    models: dict
    seeds: list
    epochs: int
    patience: int
    latency_users: int
    index_latency: dict
    sweeps: dict
    source: str = ""


def load_suite(path: str | pathlib.Path, quick: bool = False, overrides: Optional[dict] = None) -> Suite:
    """Reads a suite file; ``quick`` applies its ``quick:`` section over the rest.

    Raises:
      ConfigError: On a missing or unknown key (the message names it and the file).
    """
    path = pathlib.Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read the suite file {str(path)!r}: {error}") from error
    quick_spec = spec.pop("quick", {}) or {}
    if quick:
        spec = {**spec, **quick_spec}
    spec.update(overrides or {})
    fields = {field.name for field in dataclasses.fields(Suite)} - {"source"}
    unknown = sorted(set(spec) - fields)
    missing = sorted(fields - set(spec))
    if unknown or missing:
        raise ConfigError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}; expected {sorted(fields)}")
    base = path.resolve().parent
    for name, model in spec["models"].items():
        if "config" not in model or "paths" not in model:
            raise ConfigError(f"{path}: model {name!r} needs 'config' and 'paths', got {sorted(model)}")
        config_path = pathlib.Path(model["config"])
        model["config"] = str(config_path if config_path.is_absolute() else (base / config_path).resolve())
    return Suite(**spec, source=str(path))


def available_datasets(suite: Suite, data_dir: pathlib.Path) -> list[str]:
    """The suite's datasets whose files exist (``synthetic`` always does)."""
    return [name for name in suite.datasets
            if name == "synthetic" or (data_dir / FILE_DATASETS.get(name, name)).is_file()]


def _config(suite: Suite, dataset: str, model: dict, seed: int, data_dir: pathlib.Path):
    settings = suite.datasets[dataset] or {}
    overrides = [f"data.dataset={dataset}", f"data.data_dir={data_dir}", "data.split=leave_one_out",
                 f"train.epochs={suite.epochs}", f"train.early_stopping_patience={suite.patience}",
                 f"train.max_train_seconds={float(settings.get('budget_minutes', 10)) * 60}",
                 f"train.seed={seed}", "train.verbose=2",
                 *settings.get("overrides", []), *model.get("overrides", [])]
    return load_config(model["config"], overrides)


def _quality(metrics: dict) -> dict:
    return {key: round(float(metrics[key]), 4) for key in QUALITY_KEYS if key in metrics}


def _path_row(base: dict, path, model, split, config, users: int) -> dict:
    metrics = evaluate_path(path, model, split, config)
    p50, p99 = per_user_latency(path, model, split, config, users)
    return {**base, "path": path.label, **_quality(metrics), "latency_ms_p50": p50, "latency_ms_p99": p99,
            "index_build_seconds": round(path.build_seconds, 3), "index_bytes": index_bytes(path.index)}


def run_suite(suite: Suite, data_dir: str | pathlib.Path, runs_dir: str | pathlib.Path, log=print) -> dict:
    """Trains (or reuses) every model on every available dataset and measures every path.

    Returns:
      ``{"rows": per (dataset, model, seed, path), "sweeps": [...], "index_latency": [...],
      "datasets": [...], "wall_seconds": ...}``.
    """
    started = time.perf_counter()
    data_dir, runs_dir = pathlib.Path(data_dir), pathlib.Path(runs_dir)
    datasets = available_datasets(suite, data_dir)
    if not datasets:
        raise ConfigError(f"none of the suite's datasets {list(suite.datasets)} is under {str(data_dir)!r}")
    rows, sweeps = [], []
    for dataset in datasets:
        for seed in suite.seeds:
            splits: dict[str, Any] = {}  # one split per distinct data section
            for name, model_spec in suite.models.items():
                config = _config(suite, dataset, model_spec, seed, data_dir)
                data_key = repr(config.to_dict()["data"])
                split = splits[data_key] = splits.get(data_key) or training.prepare_split(config)
                # The budget is part of the name: a finished run is only reused under its own budget.
                budget = float((suite.datasets[dataset] or {}).get("budget_minutes", 10))
                run_dir = runs_dir / f"{dataset}-{name}-seed{seed}-{budget:g}min"
                log(f"[bench] {dataset} / {name} / seed {seed}: training (budget "
                    f"{config.train.max_train_seconds / 60:g} min) -> {run_dir}")
                metrics = training.train(config, run_dir, split=split)
                model = training.load_model(run_dir / "model")
                examples_per_second = (len(split.train_sequences) * metrics["epochs"]
                                       / max(metrics["train_seconds"], 1e-9))
                base = {"dataset": dataset, "model": name, "seed": seed, "epochs": metrics["epochs"],
                        "best_epoch": metrics["best_epoch"], "train_seconds": metrics["train_seconds"],
                        "train_examples_per_second": round(examples_per_second, 1)}
                for variant in model_spec["paths"]:
                    path = serving_path(model, split.num_items, variant, seed)
                    rows.append(_path_row(base, path, model, split, config, suite.latency_users))
                    log(f"[bench]   {path.label}: " + ", ".join(f"{k} {rows[-1][k]}" for k in ("HR@10", "Recall@50",
                                                                                               "latency_ms_p50")))
                if seed == suite.seeds[0] and dataset == datasets[0]:
                    for variant in suite.sweeps.get(name, []):
                        path = serving_path(model, split.num_items, variant, seed)
                        sweeps.append({**_path_row(base, path, model, split, config, suite.latency_users),
                                       "variant": variant})
    log(f"[bench] index latency on synthetic catalogues {suite.index_latency.get('sizes')}")
    latency_rows = measure_index_latency(**suite.index_latency)
    return {"datasets": datasets, "seeds": list(suite.seeds), "rows": rows, "sweeps": sweeps,
            "index_latency": latency_rows, "summary": summarize(rows),
            "wall_seconds": round(time.perf_counter() - started, 1)}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (dataset, model, path), with ratios to the two-tower baseline."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], row["path"]), []).append(row)
    numeric = (*QUALITY_KEYS, "train_seconds", "epochs", "train_examples_per_second", "latency_ms_p50",
               "latency_ms_p99", "index_build_seconds", "index_bytes")
    summary = []
    for (dataset, model, path), members in groups.items():
        entry: dict[str, Any] = {"dataset": dataset, "model": model, "path": path, "seeds": len(members)}
        for key in numeric:
            values = [member[key] for member in members if member.get(key) is not None]
            if values:
                entry[key] = float(np.mean(values))
                entry[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None  # sample std
        summary.append(entry)
    for entry in summary:
        baseline = next((other for other in summary if other["dataset"] == entry["dataset"]
                         and (other["model"], other["path"]) == BASELINE), None)
        if baseline:
            for key in ("latency_ms_p50", "train_examples_per_second"):
                if entry.get(key) and baseline.get(key):
                    entry[f"{key}_vs_two_tower"] = entry[key] / baseline[key]
    return summary
