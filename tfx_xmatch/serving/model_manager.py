"""Model versions: discovery under ``MODEL_BASE_PATH/<version>/``, loading, hot swap, unloading.

The life of a version mirrors TF Serving's (``ModelVersionStatus.State``)::

    START -> LOADING -> AVAILABLE -> UNLOADING -> END        (normal life)
    START -> LOADING -> END with an error status             (failed load)

A background thread polls every model's base path. Versions are the sub-directories whose name
is an integer; anything else (``.tmp-3``, ``3.partial``, files) is ignored, so an exporter that
writes into a temporary directory and renames it is never seen half-written. A base path may
be a URL of one of TensorFlow's file systems (gs://...), read through tf.io.gfile. Versions the
model's version policy wants (``latest {num_versions: N}`` by default N = 1, ``all``,
``specific {versions: ...}``) are loaded in the poll thread while the current ones keep
serving; a loaded version is published by replacing the model's serving map under a lock (an
atomic swap), and versions no longer wanted are retired: they stop receiving new requests at
once and are unloaded when the last request holding them finishes (reference counting), so no
in-flight request is dropped.

A version that fails to load (corrupt SavedModel, failed warm-up) is reported in
``GetModelStatus`` (state END, error status with the message) and logged; it is excluded from
the policy, so the previous version keeps serving. It is retried only when its directory's
contents change (file sizes or modification times).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import logging
import os
import threading
from typing import Callable, Iterator

import grpc

from tfx_xmatch.io_utils import absolute_unless_url, is_url, version_number
from tfx_xmatch.serving import errors
from tfx_xmatch.user_errors import clean_tf_message

log = logging.getLogger("tfx_xmatch.serving.model_manager")

DEFAULT_SIGNATURE = "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"
SERVE_TAG = "serve"

# ModelVersionStatus.State values (tensorflow_serving/apis/get_model_status.proto).
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk to serve: TF Serving's ``ServableVersionPolicy``."""

    kind: str = "latest"  # "latest" | "all" | "specific"
    num_versions: int = 1
    versions: frozenset = frozenset()

    def select(self, candidates: set[int]) -> set[int]:
        if self.kind == "all":
            return set(candidates)
        if self.kind == "specific":
            return set(candidates) & set(self.versions)
        return set(sorted(candidates)[-max(1, self.num_versions):])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    base_path: str
    version_policy: VersionPolicy = VersionPolicy()
    version_labels: tuple = ()  # ((label, version), ...)

    @property
    def labels(self) -> dict[str, int]:
        return dict(self.version_labels)


def model_configs_from_proto(config) -> list[ModelConfig]:
    """``tensorflow.serving.ModelServerConfig`` -> list of :class:`ModelConfig`."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ValueError("custom_model_config is not supported; use model_config_list")
    result, seen = [], set()
    for cfg in config.model_config_list.config:
        if not cfg.name:
            raise ValueError("every model config needs a name")
        if cfg.name in seen:
            raise ValueError(f"model {cfg.name!r} is configured twice")
        seen.add(cfg.name)
        if not cfg.base_path:
            raise ValueError(f"model {cfg.name!r} has no base_path")
        if cfg.model_platform not in ("", "tensorflow"):
            raise ValueError(
                f"model {cfg.name!r}: model_platform {cfg.model_platform!r} is not supported "
                "(only \"tensorflow\")"
            )
        policy_proto = cfg.model_version_policy
        which = policy_proto.WhichOneof("policy_choice")
        if which == "all":
            policy = VersionPolicy("all")
        elif which == "specific":
            if not policy_proto.specific.versions:
                raise ValueError(f"model {cfg.name!r}: specific version policy lists no versions")
            policy = VersionPolicy("specific", versions=frozenset(policy_proto.specific.versions))
        elif which == "latest":
            policy = VersionPolicy("latest", num_versions=max(1, policy_proto.latest.num_versions))
        else:
            policy = VersionPolicy()
        labels = tuple(sorted((str(k), int(v)) for k, v in cfg.version_labels.items()))
        result.append(
            ModelConfig(cfg.name, absolute_unless_url(cfg.base_path), policy, labels)
        )
    return result


def parse_model_config_text(text: str) -> list[ModelConfig]:
    """Parses TF Serving's models.config text proto (``model_config_list { config { ... } }``)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    proto = model_server_config_pb2.ModelServerConfig()
    text_format.Parse(text, proto)
    return model_configs_from_proto(proto)


def read_text(path: str) -> str:
    """A local file's or a URL's text (a model config file may be on gs:// too)."""
    if not is_url(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read().decode("utf-8")
    except tf.errors.NotFoundError:
        raise FileNotFoundError(f"{path} not found") from None


def parse_model_config_file(path: str) -> list[ModelConfig]:
    """:func:`parse_model_config_text` of a file.

    Raises:
      ValueError: The file is not a ModelServerConfig text proto (naming the file; protobuf's
        ParseError is no ValueError, and a server start printed its traceback).
    """
    from google.protobuf import text_format

    try:
        return parse_model_config_text(read_text(path))
    except text_format.ParseError as error:
        raise ValueError(f"invalid model config file {path}: {error}") from None


# --------------------------------------------------------------------------------------------
# Signatures and loaded versions


@dataclasses.dataclass(frozen=True)
class TensorSpecInfo:
    """One signature input or output: alias, dtype and shape (None dims unknown; None rank)."""

    alias: str
    dtype: object  # tf.DType
    shape: tuple | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def has_batch_dim(self) -> bool:
        return self.shape is not None and len(self.shape) >= 1 and self.shape[0] is None

    def shape_str(self) -> str:
        if self.shape is None:
            return "<unknown rank>"
        return "[" + ",".join("-1" if d is None else str(d) for d in self.shape) + "]"

    @classmethod
    def from_tensor_info(cls, alias, info) -> "TensorSpecInfo":
        import tensorflow as tf

        dtype = tf.dtypes.as_dtype(info.dtype)
        if info.tensor_shape.unknown_rank:
            shape = None
        else:
            shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
        return cls(alias, dtype, shape)


class Signature:
    """A callable signature of a loaded version, with its input/output specs."""

    def __init__(self, name: str, signature_def, function):
        self.name = name
        self.signature_def = signature_def
        self.function = function
        self.method_name = signature_def.method_name
        self.inputs = {
            alias: TensorSpecInfo.from_tensor_info(alias, info)
            for alias, info in sorted(signature_def.inputs.items())
        }
        self.outputs = {
            alias: TensorSpecInfo.from_tensor_info(alias, info)
            for alias, info in sorted(signature_def.outputs.items())
        }
        # Inputs whose leading dimension is free are the batch dimension; other inputs (scalars
        # such as ``k``, fixed-size tensors) are per-request constants.
        self.batched_inputs = tuple(a for a, s in self.inputs.items() if s.has_batch_dim)
        self.batchable = bool(self.batched_inputs) and bool(self.outputs) and all(
            s.has_batch_dim for s in self.outputs.values()
        )

    def __call__(self, arrays: dict) -> dict:
        """Runs the signature on NumPy inputs; returns NumPy outputs (all of them)."""
        import tensorflow as tf

        tensors = {
            alias: tf.convert_to_tensor(arrays[alias], dtype=spec.dtype)
            for alias, spec in self.inputs.items()
        }
        result = self.function(**tensors)
        return {alias: value.numpy() for alias, value in result.items()}


class Servable:
    """One loaded version of one model."""

    def __init__(self, model_name: str, version: int, path: str, meta_graph, loaded, signatures):
        self.model_name = model_name
        self.version = version
        self.path = path
        self.signature_defs = dict(meta_graph.signature_def)  # name -> SignatureDef, as on disk
        self.signatures: dict[str, Signature] = signatures
        self._loaded = loaded  # keeps the restored objects (variables, tables) alive
        self.refs = 0
        self.retired = False
        self.collection: threading.Thread | None = None  # the garbage collection unload() starts

    def signature(self, name: str) -> Signature:
        key = name or DEFAULT_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            available = ", ".join(sorted(self.signatures)) or "none"
            # FAILED_PRECONDITION, as TF Serving's predict_util (REST shows it as 400 as well).
            raise errors.ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{key}" not found. Signatures available in model '
                f"{self.model_name!r} version {self.version}: {available}.",
            )
        return sig

    def unload(self) -> None:
        self.signatures = {}
        self._loaded = None
        # A restored SavedModel is held in reference cycles (its traced functions): its memory
        # waited for the cyclic collector's next run, and a server rolling a large model through
        # versions grew to several times one version. Collected on a thread of its own: the last
        # request to release a retired version unloads it, before its answer is sent.
        self.collection = threading.Thread(target=gc.collect, name=f"collect-{self.model_name}-{self.version}",
                                           daemon=True)
        self.collection.start()


class CorruptModelError(ValueError):
    """The SavedModel's files cannot be parsed (reported as DATA_LOSS, as TF Serving does)."""


def load_error_code(exc: BaseException) -> grpc.StatusCode:
    """The status code a failed load is reported with in GetModelStatus."""
    if isinstance(exc, CorruptModelError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, errors.ServingError):
        return exc.code
    code = getattr(exc, "error_code", None)  # tf.errors.OpError
    if isinstance(code, int):
        return errors.status_code_from_int(code)
    return grpc.StatusCode.UNKNOWN


def read_meta_graph(path: str):
    """The ``serve`` MetaGraphDef of the SavedModel in ``path`` (raises with a clear message)."""
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    pb = os.path.join(path, "saved_model.pb")
    pbtxt = os.path.join(path, "saved_model.pbtxt")
    saved_model = saved_model_pb2.SavedModel()
    if tf.io.gfile.exists(pb):
        with tf.io.gfile.GFile(pb, "rb") as f:
            data = f.read()
        try:
            saved_model.ParseFromString(data)
        except Exception as exc:  # google.protobuf.message.DecodeError
            raise CorruptModelError(
                f"{pb} is not a valid SavedModel protocol buffer: {exc}"
            ) from exc
    elif tf.io.gfile.exists(pbtxt):
        text_format.Parse(read_text(pbtxt), saved_model)
    else:
        raise FileNotFoundError(f"no saved_model.pb or saved_model.pbtxt in {path}")
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ValueError(f"the SavedModel in {path} has no MetaGraph tagged {SERVE_TAG!r}")


def load_servable(model_name: str, version: int, path: str) -> Servable:
    """Loads one version. Raises on any problem (the caller reports it)."""
    import tensorflow as tf

    meta_graph = read_meta_graph(path)
    try:
        loaded = tf.saved_model.load(path, tags=[SERVE_TAG])
    except (tf.errors.NotFoundError, KeyError, ValueError) as exc:
        # A SavedModel using the ScaNN ops needs them registered first (TF Serving has them
        # compiled in; here they come with the scann package).
        if "Scann" not in str(exc) or "scann" in _imported_modules:
            raise
        log.info("loading %s needs the ScaNN ops; importing scann and retrying", path)
        import_modules(["scann"])
        loaded = tf.saved_model.load(path, tags=[SERVE_TAG])
    signatures = {}
    for name, function in loaded.signatures.items():
        signature_def = meta_graph.signature_def.get(name)
        if signature_def is None:  # pragma: no cover - TF always writes both
            continue
        signatures[name] = Signature(name, signature_def, function)
    if not signatures:
        raise ValueError(f"the SavedModel in {path} has no callable signatures")
    return Servable(model_name, version, path, meta_graph, loaded, signatures)


_imported_modules: set[str] = set()


def import_modules(names) -> None:
    """Imports modules that register custom ops (e.g. ``scann``) before loading models."""
    for name in names:
        if name and name not in _imported_modules:
            importlib.import_module(name)
            _imported_modules.add(name)


def list_versions(base_path: str) -> dict[int, str]:
    """Integer-named sub-directories of ``base_path``: version -> path.

    Raises:
      OSError: ``base_path`` exists but cannot be listed.
    """
    if is_url(base_path):
        return _list_url_versions(base_path)
    found = {}
    try:
        entries = list(os.scandir(base_path))
    except FileNotFoundError:
        return found
    for entry in entries:
        version = version_number(entry.name)
        if version is None or not entry.is_dir():
            continue
        found[version] = entry.path
    return found


def _list_url_versions(base_path: str) -> dict[int, str]:
    import tensorflow as tf

    try:
        names = tf.io.gfile.listdir(base_path)
    except tf.errors.NotFoundError:
        return {}
    except tf.errors.OpError as error:  # denied, unreachable: as an OSError of a local path
        raise OSError(clean_tf_message(error.message)) from None
    found = {}
    for name in names:
        version = version_number(name.rstrip("/"))  # GCS lists a directory as "1/"
        path = f"{base_path.rstrip('/')}/{name.rstrip('/')}"
        if version is not None and tf.io.gfile.isdir(path):
            found[version] = path
    return found


def base_path_exists(base_path: str) -> bool:
    if not is_url(base_path):
        return os.path.isdir(base_path)
    import tensorflow as tf

    return tf.io.gfile.isdir(base_path)


def directory_fingerprint(path: str) -> tuple:
    """Sizes and modification times of every file under ``path`` (to notice a rewritten dir)."""
    if is_url(path):
        return _url_fingerprint(path)
    items = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            items.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    try:
        items.append((".", 0, os.stat(path).st_mtime_ns))
    except OSError:
        pass
    return tuple(items)


def _url_fingerprint(path: str) -> tuple:
    import tensorflow as tf

    items = []
    try:
        for root, dirs, files in tf.io.gfile.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = f"{root.rstrip('/')}/{name}"
                try:
                    stat = tf.io.gfile.stat(full)
                except tf.errors.OpError:  # removed while walking
                    continue
                items.append((full[len(path):].lstrip("/"), stat.length, stat.mtime_nsec))
    except tf.errors.OpError:
        pass
    return tuple(items)


# --------------------------------------------------------------------------------------------
# Models and the manager


@dataclasses.dataclass
class VersionStatus:
    version: int
    state: str
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""
    fingerprint: tuple | None = None  # for failed loads: retry only when this changes


class Model:
    def __init__(self, config: ModelConfig):
        self.config = config
        self.lock = threading.Lock()
        self.serving: dict[int, Servable] = {}  # replaced, never mutated in place
        self.statuses: dict[int, VersionStatus] = {}
        self.last_scan_error: str | None = None
        self.removed = False  # set under ``lock`` when a new config drops it: publish nothing more

    @property
    def name(self) -> str:
        return self.config.name


class ModelManager:
    """Keeps the configured models' versions loaded according to their version policies.

    ``warmup`` is called with each freshly loaded :class:`Servable` before it is published; if
    it raises, the load fails. ``load_modules`` are imported before the first load (modules that
    register custom ops).
    """

    def __init__(
        self,
        configs: list[ModelConfig],
        poll_wait_seconds: float = 1.0,
        warmup: Callable[[Servable], None] | None = None,
        load_modules=(),
        loader: Callable[[str, int, str], Servable] = load_servable,
        allow_unavailable_labels: bool = False,
    ):
        self.poll_wait_seconds = poll_wait_seconds
        self.allow_unavailable_labels = allow_unavailable_labels
        self.warmup = warmup
        self.load_modules = tuple(load_modules)
        self._loader = loader
        self._models: dict[str, Model] = {}
        self._models_lock = threading.Lock()
        self._poll_lock = threading.Lock()  # one poll at a time
        # One config change at a time, as TF Serving's ReloadConfig: two reloads at once each
        # checked, and rolled back, labels against the other's config. Reentrant, since
        # apply_configs calls set_configs under it.
        self._config_lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.set_configs(configs)

    # -- configuration ------------------------------------------------------------------------

    def set_configs(self, configs: list[ModelConfig]) -> None:
        """Installs a new model list: new models are loaded on the next poll, removed ones are
        retired (in-flight requests finish first), changed ones take the new policy, labels or
        base path; as in TF Serving, a model moved to another base path keeps serving its
        versions until the new path's are loaded (a version number found in both is kept)."""
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names in {names}")
        with self._config_lock:
            with self._models_lock:
                new_models = {}
                for config in configs:
                    model = self._models.get(config.name)
                    if model is not None:
                        # A new base path too: retiring every version first left the model with
                        # none until the new path's had loaded (NOT_FOUND for seconds).
                        model.config = config
                    else:
                        model = Model(config)
                    new_models[config.name] = model
                removed = [m for name, m in self._models.items() if name not in new_models]
                self._models = new_models
            for model in removed:
                with model.lock:
                    # A version loading now sees the flag when it publishes; one published before
                    # is in model.serving below.
                    model.removed = True
                self._retire_versions(model, set(model.serving))

    def apply_configs(self, configs: list[ModelConfig]) -> None:
        """:meth:`set_configs`, one poll, then TF Serving's label check.

        Calls run one after the other (the config file watcher and HandleReloadConfigRequest
        share this path), so each checks its own labels and restores the ones in force before it.

        Raises:
          ServingError: FAILED_PRECONDITION when a label names a version that is not available
            now; as in TF Serving, the models are updated but every label stays as it was.
        """
        with self._config_lock:
            with self._models_lock:
                previous = {name: model.config.version_labels for name, model in self._models.items()}
            self.set_configs(configs)
            self.poll_once()
            problems = self.unavailable_labels()
            if problems:
                with self._models_lock:
                    for name, model in self._models.items():
                        model.config = dataclasses.replace(model.config, version_labels=previous.get(name, ()))
                raise errors.ServingError(grpc.StatusCode.FAILED_PRECONDITION, problems[0])

    def unavailable_labels(self) -> list[str]:
        """TF Serving's refusals of version labels that name a version not loaded now (none
        with ``allow_unavailable_labels``, its --allow_version_labels_for_unavailable_models)."""
        if self.allow_unavailable_labels:
            return []
        with self._models_lock:
            models = list(self._models.values())
        return [f"Request to assign label to version {version} of model {model.name}, which is not currently "
                "available for inference" for model in models for _, version in model.config.version_labels
                if version not in model.serving]

    def model_names(self) -> list[str]:
        with self._models_lock:
            return sorted(self._models)

    def get_model(self, name: str) -> Model | None:
        with self._models_lock:
            return self._models.get(name)

    # -- polling ------------------------------------------------------------------------------

    def start(self) -> None:
        """Loads what is on disk now (blocking), then keeps polling in a background thread."""
        import_modules(self.load_modules)
        self.poll_once()
        if self.poll_wait_seconds > 0 and self._thread is None:
            self._thread = threading.Thread(
                target=self._poll_loop, name="serving-model-poller", daemon=True
            )
            self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll_once()
            except Exception:  # never let the poller die
                log.exception("polling the model base paths failed")

    def stop(self) -> None:
        """Stops polling and unloads every version (after its in-flight requests)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._models_lock:
            models = list(self._models.values())
        for model in models:
            self._retire_versions(model, set(model.serving))

    def poll_once(self) -> None:
        with self._poll_lock:
            with self._models_lock:
                models = list(self._models.values())
            for model in models:
                if self._stop.is_set():
                    return
                self._poll_model(model)

    def _poll_model(self, model: Model) -> None:
        base = model.config.base_path
        try:
            on_disk = list_versions(base)
        except OSError as error:
            on_disk = error
        if isinstance(on_disk, OSError) or not base_path_exists(base):
            message = (f"model base path {base} does not exist" if not isinstance(on_disk, OSError)
                       else f"cannot list model base path {base}: {on_disk}")
            if model.last_scan_error != message:
                log.warning("model %r: %s; keeping the versions it serves", model.name, message)
            model.last_scan_error = message
            # As TF Serving: a base path that is gone for a moment (a remount, a swapped
            # symlink) changes nothing; only a version removed from a listable path retires.
            return
        model.last_scan_error = None

        def candidates() -> set[int]:
            result = set()
            for version, path in on_disk.items():
                status = model.statuses.get(version)
                if status is not None and status.fingerprint is not None:
                    if directory_fingerprint(path) == status.fingerprint:
                        continue  # failed before and unchanged since: do not retry
                result.add(version)
            return result

        attempted: set[int] = set()
        while not self._stop.is_set():
            wanted = model.config.version_policy.select(candidates())
            to_load = wanted - set(model.serving) - attempted
            if not to_load:
                break
            version = max(to_load)
            attempted.add(version)
            self._load_version(model, version, on_disk[version])

        # Availability-preserving: choose among versions actually loaded (and still on disk), so a
        # loaded version is never retired in favour of one that failed or is not loaded yet.
        loaded = set(model.serving) & set(on_disk)
        keep = model.config.version_policy.select(loaded)
        self._retire_versions(model, set(model.serving) - keep)
        with model.lock:  # forget versions that vanished from disk and are not loaded
            for version in list(model.statuses):
                status = model.statuses[version]
                if (
                    version not in on_disk
                    and version not in model.serving
                    and status.state in (END, START)
                    and status.fingerprint is not None
                ):
                    del model.statuses[version]

    def _load_version(self, model: Model, version: int, path: str) -> None:
        with model.lock:
            model.statuses[version] = VersionStatus(version, LOADING)
        fingerprint = directory_fingerprint(path)
        log.info("model %r: loading version %d from %s", model.name, version, path)
        try:
            servable = self._loader(model.name, version, path)
            if self.warmup is not None:
                self.warmup(servable)
        except Exception as exc:
            message = f"Failed to load version {version} of model {model.name!r} from {path}: "
            message += f"{type(exc).__name__}: {exc}"
            if "Op type not registered" in str(exc) and "Scann" in str(exc):
                message += " (a ScaNN export: start the server with --load_modules=scann)"
            log.error("%s", message)
            with model.lock:
                model.statuses[version] = VersionStatus(
                    version, END, load_error_code(exc), message, fingerprint
                )
            return
        with model.lock:
            # Decided under the lock: a removal after this publish retires the version through
            # the reference count (set_configs sees it in model.serving); reading model.removed
            # again after the lock unloaded it under requests that already held it.
            published = not model.removed
            if published:
                serving = dict(model.serving)
                serving[version] = servable
                model.serving = serving  # atomic publish
                model.statuses[version] = VersionStatus(version, AVAILABLE)
        if not published:  # the model was removed while loading: nobody can hold this version
            servable.unload()
            return
        log.info("model %r: version %d is AVAILABLE", model.name, version)

    def _retire_versions(self, model: Model, versions: set[int]) -> None:
        if not versions:
            return
        finished = []
        with model.lock:
            serving = dict(model.serving)
            for version in versions:
                servable = serving.pop(version, None)
                if servable is None:
                    continue
                servable.retired = True
                model.statuses[version] = VersionStatus(version, UNLOADING)
                if servable.refs == 0:
                    finished.append(servable)
            model.serving = serving
        for servable in finished:
            self._finish_unload(model, servable)

    def _finish_unload(self, model: Model, servable: Servable) -> None:
        servable.unload()
        with model.lock:
            status = model.statuses.get(servable.version)
            if status is not None and status.state == UNLOADING:
                model.statuses[servable.version] = VersionStatus(servable.version, END)
        log.info("model %r: version %d unloaded", model.name, servable.version)

    # -- requests -----------------------------------------------------------------------------

    def resolve_version(self, model: Model, version: int | None, label: str | None):
        if label is not None:
            labels = model.config.labels
            if label not in labels:
                raise errors.invalid_argument(f"Unrecognized servable version label: {label}")
            return labels[label]
        return version

    @contextlib.contextmanager
    def acquire(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> Iterator[Servable]:
        """Holds one version for the duration of a request (it will not be unloaded under it)."""
        if not name:
            raise errors.invalid_argument("Missing ModelSpec: the request names no model")
        model = self.get_model(name)
        if model is None:
            if label is not None:
                # TF Serving resolves a label before it looks for the servable, so an unknown
                # model named with a label is an unrecognized label (400), not a 404.
                raise errors.invalid_argument(f"Unrecognized servable version label: {label}")
            what = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise errors.not_found(f"Servable not found for request: {what}")
        version = self.resolve_version(model, version, label)
        with model.lock:
            serving = model.serving
            if version is None:
                if not serving:
                    raise errors.not_found(f"Servable not found for request: Latest({name})")
                servable = serving[max(serving)]
            else:
                servable = serving.get(version)
                if servable is None:
                    raise errors.not_found(
                        f"Servable not found for request: Specific({name}, {version})"
                    )
            servable.refs += 1
        try:
            yield servable
        finally:
            with model.lock:
                servable.refs -= 1
                done = servable.retired and servable.refs == 0
            if done:
                self._finish_unload(model, servable)

    def status(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """Statuses of a model's versions (all, or one), newest first as TF Serving lists them.
        Like TF Serving's GetModelStatus, it takes no version label."""
        model = self.get_model(name)
        if model is None:
            raise errors.not_found(f"Could not find any versions of model {name}")
        with model.lock:
            statuses = dict(model.statuses)
        if version is not None:
            if version not in statuses:
                raise errors.not_found(f"Could not find version {version} of model {name}")
            return [statuses[version]]
        if not statuses:
            detail = f" ({model.last_scan_error})" if model.last_scan_error else ""
            raise errors.not_found(f"Could not find any versions of model {name}{detail}")
        return [statuses[v] for v in sorted(statuses, reverse=True)]

    def wait_until_available(
        self, name: str, version: int | None = None, timeout: float = 10.0
    ) -> bool:
        """Test helper: waits until ``version`` (or any version) of ``name`` is serving."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.get_model(name)
            if model is not None:
                serving = model.serving
                if (version is None and serving) or (version is not None and version in serving):
                    return True
            time.sleep(0.02)
        return False
