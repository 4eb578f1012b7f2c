"""Run configuration: typed sections loaded from YAML/JSON, overridden by ``section.key=value``."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
import re
import sysconfig
import typing
from typing import Any, Optional, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration file or override names an unknown key or holds a wrongly typed value."""


@dataclasses.dataclass
class DataConfig:
    """Which data, how it is split and how histories are windowed.

    Attributes:
      dataset: A name known to ``tfx_xmatch.data.load_dataset`` ("synthetic", "ml-1m",
        "ml-100k", "beauty", "lastfm") or a file path.
      data_dir: Directory holding the named datasets (e.g. ``../shared/data``).
      format: For a file path: "pairs", "sequences" or "ratings".
      split: "leave_one_out", "user_level" or "time".
      split_options: Keyword arguments of that split, e.g. ``{min_length: 3}`` (leave-one-out),
        ``{fractions: [0.8, 0.1, 0.1], seed: 0}`` (user-level), ``{quantiles: [0.8, 0.9]}`` (time).
      side_info: Load item/user features where the dataset has them, and feed them to the model.
      skip_bad_lines: Skip (and count) malformed lines instead of failing on the first one.
      synthetic: Arguments of ``make_synthetic`` when dataset is "synthetic".
    """

    dataset: str = "synthetic"
    data_dir: Optional[str] = None
    format: Optional[str] = None
    split: str = "leave_one_out"
    split_options: dict = dataclasses.field(default_factory=dict)
    side_info: bool = False
    skip_bad_lines: bool = False
    synthetic: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModelConfig:
    """Model name and its hyperparameters (see ``tfx_xmatch.models``).

    ``name`` is a built-in model ("two_tower", "sparcode", "sparc", "t2diff") or the import path
    of a registered subclass of one ("my_package.models.MyTwoTower"; ``training.configured_model_class``).

    The fields are the ones every model shares; ``options`` holds the model's own keyword
    arguments (e.g. ``num_codewords`` of SparCode), set from YAML as a mapping or on the command
    line as ``model.options.num_codewords=512``.
    """

    name: str = "two_tower"
    embedding_dim: int = 64
    user_tower: str = "sasrec"
    max_length: int = 200
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    loss: str = "full_softmax"
    temperature: float = 1.0
    num_sampled_negatives: int = 0
    max_loss_positions: int = 4096
    item_hidden_units: list = dataclasses.field(default_factory=list)
    l2: float = 0.0
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainConfig:
    """Optimisation, model selection and stopping.

    Attributes:
      epochs: Maximum number of epochs.
      batch_size: Sequences per training batch.
      learning_rate: Adam learning rate.
      monitor: Validation metric used for model selection and early stopping.
      early_stopping_patience: Epochs without a better ``monitor`` before stopping (0: never).
      validation_every: Evaluate on validation every this many epochs.
      max_train_seconds: Stop after the epoch that passes this wall time (None: no limit).
      seed: Seed for weights, shuffling and dropout.
      verbose: Keras progress display: 0 silent, 1 progress bar, 2 one line per epoch.
      strategy: tf.distribute strategy: "default" (one device), "mirrored" (every local
        device) or "multi_worker" (MultiWorkerMirroredStrategy over the cluster in TF_CONFIG).
      warm_start: A finished run's directory, a saved model directory (``config.json`` +
        ``weights``) or a serving SavedModel exported by tfx_xmatch (a version directory; TFX's
        ``base_model``), whose weights start this run instead of a random initialisation. A
        checkpoint's Adam state comes along when it holds one, so a run stopped by its time
        budget continues where it was; ``train.learning_rate`` still applies. The model kind
        and every layer's shape must match; the item catalogue may differ, as item rows are
        carried over by item id (then Adam starts fresh), when the source keeps its item ids
        (runs and exports do; a model saved without them must have this run's items). None:
        train from scratch.
    """

    epochs: int = 200
    batch_size: int = 128
    learning_rate: float = 1e-3
    monitor: str = "NDCG@10"
    early_stopping_patience: int = 10
    validation_every: int = 1
    max_train_seconds: Optional[float] = None
    seed: int = 0
    verbose: int = 1
    strategy: str = "default"
    warm_start: Optional[str] = None


@dataclasses.dataclass
class EvalConfig:
    """Full-ranking evaluation settings."""

    ks: list = dataclasses.field(default_factory=lambda: [1, 10, 20, 50])
    mask_history: bool = True
    batch_size: int = 512


@dataclasses.dataclass
class RunConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What the full-ranking evaluation reports at every cutoff K: the names train.monitor may use.
METRIC_NAMES = ("HR", "Recall", "NDCG", "MRR", "P", "TailRecall", "Coverage")


def check_values(config: RunConfig) -> RunConfig:
    """Checks the ranges the field types cannot express, naming the key and quoting the value.

    Run before anything is trained or written: a negative epoch count used to fail inside Keras
    (without naming ``train.epochs``) after ``config.json`` had claimed the run directory, and a
    ``train.monitor`` that no validation pass reports failed after a whole epoch of training.

    Raises:
      ConfigError: The first value out of range.
    """
    train, evaluation = config.train, config.eval

    def need(ok: bool, key: str, value: Any, what: str) -> None:
        if not ok:
            raise ConfigError(f"{key} must be {what}, got {value!r}")

    for key, value in (("train.epochs", train.epochs), ("train.batch_size", train.batch_size),
                       ("train.validation_every", train.validation_every), ("eval.batch_size", evaluation.batch_size)):
        need(value >= 1, key, value, "at least 1")
    need(math.isfinite(train.learning_rate) and train.learning_rate >= 0, "train.learning_rate", train.learning_rate,
         "a finite number >= 0")
    need(train.early_stopping_patience >= 0, "train.early_stopping_patience", train.early_stopping_patience,
         ">= 0 (0: never stop early)")
    need(train.max_train_seconds is None or (math.isfinite(train.max_train_seconds) and train.max_train_seconds > 0),
         "train.max_train_seconds", train.max_train_seconds, "a positive number of seconds or null (no limit)")
    need(train.warm_start is None or (isinstance(train.warm_start, str) and train.warm_start.strip() != ""),
         "train.warm_start", train.warm_start, "a run, saved model or serving SavedModel directory, or null (train from scratch)")
    need(train.verbose in (0, 1, 2), "train.verbose", train.verbose, "0, 1 or 2")
    need(bool(evaluation.ks) and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in evaluation.ks),
         "eval.ks", evaluation.ks, "a non-empty list of integers >= 1")
    metric = re.fullmatch(r"(?P<name>[A-Za-z]+)@(?P<k>[0-9]+)", train.monitor)
    need(metric is not None and metric["name"] in METRIC_NAMES and int(metric["k"]) in evaluation.ks,
         "train.monitor", train.monitor, f"METRIC@K with METRIC one of {list(METRIC_NAMES)} and K one of "
         f"eval.ks={list(evaluation.ks)}")
    return config


def _coerce(value: Any, field_type: Any, where: str) -> Any:
    """Checks ``value`` against a dataclass field type, converting int -> float where natural."""
    origin = typing.get_origin(field_type)
    if origin is typing.Union:
        options = [t for t in typing.get_args(field_type) if t is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], where)
    expected = origin or field_type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list and isinstance(value, tuple):
        return list(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{where} must be of type {expected.__name__}, got {value!r}")
    return value


def _section_fields(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _set(config: RunConfig, dotted_key: str, value: Any) -> None:
    section_name, _, key = dotted_key.partition(".")
    sections = {f.name for f in dataclasses.fields(config)}
    if section_name not in sections or not key:
        raise ConfigError(f"unknown config key {dotted_key!r}: keys look like 'section.key' with "
                          f"section one of {sorted(sections)}")
    section = getattr(config, section_name)
    fields = _section_fields(section)
    option_field, _, option_key = key.partition(".")
    if option_key and fields.get(option_field) is dict:
        # "model.options.num_codewords=512": one entry of a free-form mapping; the model that
        # receives it validates the name and the value.
        getattr(section, option_field)[option_key] = value
        return
    if key not in fields:
        raise ConfigError(f"unknown config key {dotted_key!r}; {section_name} has {sorted(fields)}")
    setattr(section, key, _coerce(value, fields[key], dotted_key))


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads 1e-3 as a float (YAML 1.1 wants 1.0e-3 and gives the string)
    and refuses a key given twice in one mapping (PyYAML keeps the last without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise DuplicateKeyError(f"key {key!r} is given twice in one mapping (line "
                                            f"{key_node.start_mark.line + 1}); only the last would count")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def config_from_dict(raw: dict, source: str = "config") -> RunConfig:
    """Builds a RunConfig from nested ``{section: {key: value}}``, rejecting unknown keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)  # the config must not share lists or dicts with the caller's data
    config = RunConfig()
    for section_name, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            try:
                _set(config, f"{section_name}.{key}", value)
            except ConfigError as error:
                raise ConfigError(f"{source}: {error}") from None
    return config


# Where setup.py's data_files land: the environment's prefix, or the user's for `pip install --user`.
SHIPPED_CONFIGS = tuple(pathlib.Path(sysconfig.get_path("data", scheme)) / "share" / "tfx_xmatch" / "configs"
                        for scheme in dict.fromkeys([sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")]))


def _shipped_config_hint(path: str) -> str:
    """Where an installed package keeps the config ``path`` names, when a user copied a README
    command (``--config configs/ml1m_sasrec.yaml``) outside the source checkout."""
    for directory in SHIPPED_CONFIGS:
        shipped = directory / pathlib.Path(path).name
        if shipped.is_file():
            return f"; the shipped {shipped.name} is installed at {shipped}"
    return ""


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """PyYAML's 4-8 line report, which places it in "<unicode string>", as one line with the
    file's line and column."""
    def where(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem = f"{error.problem} at {where(error.problem_mark)}" if error.problem_mark else str(error.problem)
    if error.context:
        problem += f" ({error.context}" + (f" at {where(error.context_mark)})" if error.context_mark else ")")
    return problem


def _utf8_text(path: str, data: bytes) -> str:
    """A config file's text; one that is not UTF-8 is refused naming the file and line (it was
    "'utf-8' codec can't decode byte 0xff in position 36", naming neither)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at column {column}); "
                          "save the config file as UTF-8") from None


def load_config(path: Optional[str | pathlib.Path] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Reads a YAML or JSON config file (optional) and applies ``section.key=value`` overrides.

    Args:
      path: A .yaml/.yml/.json file; None starts from the defaults.
      overrides: Strings like ``"train.epochs=5"``; values are parsed as YAML scalars/lists.

    Returns:
      The resolved RunConfig.

    Raises:
      ConfigError: Unknown key, wrong type, unparsable file or override.
      FileNotFoundError: ``path`` does not exist.
    """
    raw: dict = {}
    if path is not None:
        path = str(path)
        if "://" in path:  # gs://... (e.g. a TFX custom_config): pathlib would make it "gs:/..."
            import tensorflow as tf

            if not tf.io.gfile.exists(path):
                raise FileNotFoundError(f"config file {path!r} does not exist")
            with tf.io.gfile.GFile(path, "rb") as handle:
                text = _utf8_text(path, handle.read())
        else:
            if pathlib.Path(path).is_dir():
                raise ConfigError(f"config file {path!r} is a directory; give a .yaml or .json file")
            if not pathlib.Path(path).exists():
                raise FileNotFoundError(f"config file {path!r} does not exist{_shipped_config_hint(path)}")
            text = _utf8_text(path, pathlib.Path(path).read_bytes())
        text = text.removeprefix("\ufeff")  # a byte-order mark, as some editors write
        is_json = path.endswith(".json")
        if not text.strip():
            # Read as "no settings", it trained the synthetic defaults for 200 epochs.
            raise ConfigError(f"{path}: the config file is empty")
        try:
            raw = json.loads(text, object_pairs_hook=_unique_keys) if is_json else yaml.load(text, Loader=_Loader)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno}: not valid JSON: {error.msg} (column {error.colno})") from None
        except yaml.MarkedYAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        except DuplicateKeyError as error:
            raise ConfigError(f"{path}: {error}") from None
    config = config_from_dict(raw, source=str(path) if path else "config")
    apply_overrides(config, overrides)
    return check_values(config)


class DuplicateKeyError(ValueError):
    """A mapping in a config file names the same key twice (only the last would count)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise DuplicateKeyError(f"key {repeated[0]!r} is given twice in one mapping; only the last would count")
    return dict(pairs)


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """Applies ``section.key=value`` strings (values parsed as YAML) to ``config`` in place.

    Raises:
      ConfigError: An override is not ``key=value``, names an unknown key or has a wrong type.
    """
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: cannot parse value: {error}") from None
        if " #" in text and isinstance(value, str) and text.strip()[:1] not in ("'", '"'):
            value = text.strip()  # a path like "/data/run #2" is not a YAML comment here (a quoted one parsed right)
        _set(config, key.strip(), value)
    return config
