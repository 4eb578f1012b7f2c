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
import datetime
import hashlib
import inspect
import json
import pathlib
import time
import traceback
from typing import Any, Callable, Optional

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
DATASET_KEYS = {"budget_minutes", "overrides"}
MODEL_KEYS = {"config", "paths", "overrides"}
PROTOCOL_KEYS = {"data.dataset", "data.data_dir", "data.split", "train.epochs", "train.early_stopping_patience",
                 "train.max_train_seconds", "train.seed", "train.monitor"}
# Settings the suite leaves to the configs but that every model must share, or the models would
# be ranked on different data, selected differently or scored with the history in one and not
# the other: every ``data`` key the suite does not set, plus these.
SHARED_CONFIG_KEYS = (("eval", "mask_history"), ("train", "monitor"), ("train", "validation_every"))
# Ratios to the baseline shown beside the absolute figures (a baseline under ``floor`` makes a
# ratio meaningless: a brute-force index "builds" in about a millisecond).
RATIO_KEYS = {"train_sequences_per_second": 0.0, "p50_ms": 0.0, "p99_ms": 0.0,
              "index_build_seconds": 0.01, "index_bytes": 0.0}


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
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
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
    for name, settings in spec["datasets"].items():
        settings = spec["datasets"][name] = settings or {}
        unknown = sorted(set(settings) - DATASET_KEYS)
        if unknown:
            raise ConfigError(f"{path}: dataset {name!r} has unknown key(s) {unknown}; expected {sorted(DATASET_KEYS)}")
        if "budget_minutes" not in settings:
            raise ConfigError(f"{path}: dataset {name!r} needs 'budget_minutes' (the training budget per model)")
        _check_overrides(path, f"dataset {name!r}", settings.get("overrides", []))
    for name, model in spec["models"].items():
        unknown = sorted(set(model) - MODEL_KEYS)
        if unknown or "config" not in model or "paths" not in model:
            raise ConfigError(f"{path}: model {name!r} needs 'config' and 'paths' (optional 'overrides'), "
                              f"got {sorted(model)}")
        _check_overrides(path, f"model {name!r}", model.get("overrides", []))
        config_path = pathlib.Path(model["config"])
        model["config"] = str(config_path if config_path.is_absolute() else (base / config_path).resolve())
    # Everything below is otherwise read only after the trainings: a typo would cost the run.
    accepted = set(inspect.signature(measure_index_latency).parameters)
    unknown = sorted(set(spec["index_latency"] or {}) - accepted)
    if unknown:
        raise ConfigError(f"{path}: index_latency has unknown key(s) {unknown}; accepted: {sorted(accepted)}")
    unknown = sorted(set(spec["sweeps"] or {}) - set(spec["models"]))
    if unknown:
        raise ConfigError(f"{path}: sweeps name model(s) {unknown} that the suite does not run; "
                          f"models: {sorted(spec['models'])}")
    for name, model in spec["models"].items():
        for variant in [*model["paths"], *(spec["sweeps"] or {}).get(name, [])]:
            _check_path(path, name, variant)
    _check_shared_settings(path, spec["models"])
    return Suite(**spec, source=str(path))


def _shared_settings(config) -> dict:
    settings = config.to_dict()
    shared = {f"data.{key}": value for key, value in settings["data"].items()
              if f"data.{key}" not in PROTOCOL_KEYS}
    shared.update({f"{section}.{key}": settings[section][key] for section, key in SHARED_CONFIG_KEYS})
    return shared


def _check_shared_settings(path: pathlib.Path, models: dict) -> None:
    """Every model's config (with its overrides) must agree on the protocol the suite leaves to them."""
    settings = {}
    for name, model in models.items():
        try:
            settings[name] = _shared_settings(load_config(model["config"], model.get("overrides", [])))
        except (ConfigError, OSError) as error:
            raise ConfigError(f"{path}: model {name!r}: {error}") from error
    for key in next(iter(settings.values()), {}):
        values = {name: shared[key] for name, shared in settings.items()}
        if len({repr(value) for value in values.values()}) > 1:
            given = ", ".join(f"{name} {value!r}" for name, value in values.items())
            raise ConfigError(f"{path}: every model of a suite must share {key}, but the configs (with their "
                              f"overrides) give {given}; set it per dataset instead")


def _check_path(path: pathlib.Path, model: str, variant: dict) -> None:
    kind = variant.get("kind") if isinstance(variant, dict) else None
    if kind not in PATH_KEYS:
        raise ConfigError(f"{path}: model {model!r} has a path {variant!r} whose kind is not one of {sorted(PATH_KEYS)}")
    unknown = sorted(set(variant) - PATH_KEYS[kind] - {"kind", "label", "jit_compile"})
    if unknown:
        raise ConfigError(f"{path}: model {model!r} path {variant!r} has unknown key(s) {unknown}; "
                          f"a {kind} path takes {sorted(PATH_KEYS[kind])}")


# The settings each serving-path kind reads (see ``serving_paths.serving_path``).
PATH_KEYS = {
    "brute_force": {"sampler", "steps", "backbone_only"},
    "sparse_code": {"cache_fraction"},
    "soft_search": {"interests"},
}


def _check_overrides(path: pathlib.Path, owner: str, overrides: list) -> None:
    # The protocol (split, data source, seed, budget, epoch cap) is the suite's, the same for
    # every model; an override may change a model's or a dataset's settings, not that.
    for override in overrides:
        key = str(override).partition("=")[0].strip()
        if key in PROTOCOL_KEYS:
            raise ConfigError(f"{path}: {owner} overrides {key!r}, which the suite sets for every model "
                              f"(protocol keys: {sorted(PROTOCOL_KEYS)})")


def available_datasets(suite: Suite, data_dir: pathlib.Path) -> list[str]:
    """The suite's datasets whose files exist (``synthetic`` always does)."""
    return [name for name in suite.datasets
            if name == "synthetic" or (data_dir / FILE_DATASETS.get(name, name)).is_file()]


def _config(suite: Suite, dataset: str, model: dict, seed: int, data_dir: pathlib.Path):
    settings = suite.datasets[dataset]
    overrides = [f"data.dataset={dataset}", f"data.data_dir={data_dir}", "data.split=leave_one_out",
                 f"train.epochs={suite.epochs}", f"train.early_stopping_patience={suite.patience}",
                 f"train.max_train_seconds={float(settings['budget_minutes']) * 60}",
                 f"train.seed={seed}", "train.verbose=2",
                 *settings.get("overrides", []), *model.get("overrides", [])]
    return load_config(model["config"], overrides)


def suite_settings(suite: Suite) -> dict:
    """The suite as run: epoch cap, patience, budgets and overrides per dataset, each model's
    config file and overrides, serving paths, sweeps and index-latency settings."""
    settings = dataclasses.asdict(suite)
    settings.pop("source")
    return settings


def _quality(metrics: dict) -> dict:
    return {key: round(float(metrics[key]), 4) for key in QUALITY_KEYS if key in metrics}


def _path_row(base: dict, path, model, split, config, users: int) -> dict:
    metrics = evaluate_path(path, model, split, config)
    p50, p99 = per_user_latency(path, model, split, config, users)
    return {**base, "path": path.label, **_quality(metrics), "p50_ms": p50, "p99_ms": p99,
            "index_build_seconds": round(path.build_seconds, 3), "index_bytes": index_bytes(path.index)}


def _run_name(dataset: str, model: str, seed: int, budget_minutes: float, config) -> str:
    # The budget and a digest of the whole config are part of the name: a finished run is only
    # reused for exactly the training it did (settings that only change logging excluded).
    settings = config.to_dict()
    settings["train"] = {k: v for k, v in settings["train"].items() if k != "verbose"}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{dataset}-{model}-seed{seed}-{budget_minutes:g}min-{digest}"


def _training_speed(run_dir: pathlib.Path, split) -> dict:
    """Training sequences per second over the steady-state epochs (the first epoch, which
    traces the graphs, is left out when there are others) and the median epoch time."""
    history = json.loads((run_dir / "history.json").read_text(encoding="utf-8"))
    cumulative = [0.0] + [float(row["train_seconds"]) for row in history["epochs"]]
    durations = np.diff(cumulative)
    steady = durations[1:] if len(durations) > 1 else durations
    epoch_seconds = float(np.median(steady)) if len(steady) else None
    # A sequence of one item has no target: training skips it.
    sequences = sum(1 for sequence in split.train_sequences if len(sequence) >= 2)
    return {"epoch_seconds": None if not epoch_seconds else round(epoch_seconds, 3),
            "train_sequences": sequences,
            "train_sequences_per_second": round(sequences / epoch_seconds, 1) if epoch_seconds else None}


def run_suite(suite: Suite, data_dir: str | pathlib.Path, runs_dir: str | pathlib.Path, log=print,
              on_progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Trains (or reuses) every model on every available dataset and measures every path.

    A model that fails is recorded in ``failures`` (with the error) and the suite goes on; the
    caller decides what a failure means. A run found finished in ``runs_dir`` is reused and its
    rows say so (``reused``, ``trained_on``).

    Args:
      suite: The parsed suite.
      data_dir: Where the datasets are.
      runs_dir: Training runs, one directory per (dataset, model, seed, budget, config).
      log: Progress lines go here.
      on_progress: Called with the partial result after every model, e.g. to save it.

    Returns:
      ``{"rows": per (dataset, model, seed, path), "sweeps": [...], "index_latency": [...],
      "datasets": [...], "skipped_datasets": [...], "failures": [...], "summary": [...],
      "wall_seconds": ...}``.
    """
    started = time.perf_counter()
    data_dir, runs_dir = pathlib.Path(data_dir).resolve(), pathlib.Path(runs_dir)
    datasets = available_datasets(suite, data_dir)
    if not datasets:
        raise ConfigError(f"none of the suite's datasets {list(suite.datasets)} is under {str(data_dir)!r}")
    result = {"datasets": datasets, "skipped_datasets": [name for name in suite.datasets if name not in datasets],
              "seeds": list(suite.seeds), "latency_users": suite.latency_users, "rows": [], "sweeps": [],
              "failures": [], "index_latency": [], "settings": suite_settings(suite), "configs": {}}

    def progress():
        result["summary"] = summarize(result["rows"])
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        if on_progress is not None:
            on_progress(result)

    for dataset in datasets:
        budget = float(suite.datasets[dataset]["budget_minutes"])
        for seed in suite.seeds:
            splits: dict[str, Any] = {}  # one split per distinct data section
            for name, model_spec in suite.models.items():
                try:
                    _measure_model(suite, result, dataset, name, model_spec, seed, budget, data_dir, runs_dir,
                                   splits, first=(seed == suite.seeds[0] and dataset == datasets[0]), log=log)
                except Exception as error:  # noqa: BLE001 - recorded, reported, and the exit code says so
                    log(f"[bench] FAILED {dataset} / {name} / seed {seed}: {type(error).__name__}: {error}\n"
                        + traceback.format_exc())
                    result["failures"].append({"dataset": dataset, "model": name, "seed": seed,
                                               "error": f"{type(error).__name__}: {error}"})
                progress()
    log(f"[bench] index latency on synthetic catalogues {suite.index_latency.get('sizes')}")
    result["index_latency"] = measure_index_latency(**suite.index_latency)
    progress()
    return result


def _measure_model(suite: Suite, result: dict, dataset: str, name: str, model_spec: dict, seed: int,
                   budget: float, data_dir: pathlib.Path, runs_dir: pathlib.Path, splits: dict, first: bool,
                   log) -> None:
    config = _config(suite, dataset, model_spec, seed, data_dir)
    result["configs"][f"{dataset}/{name}/seed{seed}"] = config.to_dict()  # what was trained, resolved
    data_key = repr(config.to_dict()["data"])
    split = splits[data_key] = splits.get(data_key) or training.prepare_split(config)
    run_dir = runs_dir / _run_name(dataset, name, seed, budget, config)
    metrics_path = run_dir / "metrics.json"
    reused = metrics_path.is_file()
    log(f"[bench] {dataset} / {name} / seed {seed}: {'reusing the finished run' if reused else 'training'} "
        f"(budget {budget:g} min) -> {run_dir}")
    metrics = training.train(config, run_dir, split=split)
    model = training.load_model(run_dir / "model")
    trained_on = datetime.datetime.fromtimestamp(metrics_path.stat().st_mtime, datetime.timezone.utc)
    base = {"dataset": dataset, "split": config.data.split, "model": name, "seed": seed, "run": run_dir.name,
            "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"], "train_seconds": metrics["train_seconds"],
            **_training_speed(run_dir, split), "reused": reused,
            "trained_on": trained_on.strftime("%Y-%m-%dT%H:%M:%SZ")}
    for variant in model_spec["paths"]:
        path = serving_path(model, split.num_items, variant, seed)
        result["rows"].append({**_path_row(base, path, model, split, config, suite.latency_users),
                               "variant": variant})
        log(f"[bench]   {path.label}: " + ", ".join(f"{k} {result['rows'][-1].get(k)}"
                                                   for k in ("HR@10", "Recall@50", "p50_ms")))
    if first:
        for variant in suite.sweeps.get(name, []):
            path = serving_path(model, split.num_items, variant, seed)
            result["sweeps"].append({**_path_row(base, path, model, split, config, suite.latency_users),
                                     "variant": variant})


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (dataset, model, path), with ratios to the two-tower baseline."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], row["path"]), []).append(row)
    numeric = (*QUALITY_KEYS, "train_seconds", "epochs", "epoch_seconds", "train_sequences_per_second",
               "p50_ms", "p99_ms", "index_build_seconds", "index_bytes")
    summary = []
    for (dataset, model, path), members in groups.items():
        entry: dict[str, Any] = {"dataset": dataset, "model": model, "path": path, "seeds": len(members),
                                 "reused": any(member.get("reused") for member in members)}
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
            for key, floor in RATIO_KEYS.items():
                if entry.get(key) is not None and (baseline.get(key) or 0.0) > floor:
                    entry[f"{key}_vs_two_tower"] = entry[key] / baseline[key]
    return summary
