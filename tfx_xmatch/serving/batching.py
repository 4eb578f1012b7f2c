"""Server-side request batching, like TF Serving's ``--enable_batching``.

Concurrent requests that can share one call are merged: same loaded version and signature, same
dtypes and non-batch dimensions of the batched inputs (those whose leading dimension is free in
the signature, and an input of unknown rank, such as ``top_k``'s ``k``, when a request gives it
one value per row), and equal values of the per-request constant inputs (a scalar ``k``,
fixed-shape tensors). Requests that differ in any of these are batched separately, so rows are
padded only up to ``allowed_batch_sizes`` when given. A batch runs when it holds ``max_batch_size`` rows or when
``batch_timeout_micros`` has passed since its first request arrived; the outputs are split
back along the first axis, each caller getting its own rows.

The thread of a batch's first request runs the merged call (no extra scheduler threads);
``num_batch_threads`` bounds how many merged calls run at once and ``max_enqueued_batches``
how many closed batches may wait for one (beyond that a request gets UNAVAILABLE, as with TF
Serving's full batch queue).

If a merged call fails, each request of the batch is re-run on its own, so that one bad request
(an id outside the vocabulary) cannot fail the others it happened to be batched with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading

import grpc
import numpy as np

from tfx_xmatch.serving import errors

log = logging.getLogger("tfx_xmatch.serving.batching")


@dataclasses.dataclass
class BatchingOptions:
    max_batch_size: int = 64
    batch_timeout_micros: int = 1000
    num_batch_threads: int = max(1, os.cpu_count() or 1)
    max_enqueued_batches: int = 100
    # TF Serving rejects a request with more rows than max_batch_size unless large batch
    # splitting is on; here "splitting" runs the oversized request on its own.
    enable_large_batch_splitting: bool = False
    # As TF Serving: a merged batch is padded up to the smallest allowed size that holds it (the
    # padding rows copy the first row and their answers are dropped), so a model compiled per
    # batch size (XLA) sees only these sizes. The last one must be max_batch_size.
    allowed_batch_sizes: tuple = ()

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.batch_timeout_micros < 0:
            raise ValueError("batch_timeout_micros must be >= 0")
        if self.num_batch_threads < 1:
            raise ValueError("num_batch_threads must be >= 1")
        if self.max_enqueued_batches < 1:
            raise ValueError("max_enqueued_batches must be >= 1")
        sizes = tuple(self.allowed_batch_sizes)
        if sizes and (min(sizes) < 1 or list(sizes) != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            raise ValueError(f"allowed_batch_sizes must increase and end at max_batch_size={self.max_batch_size}, "
                             f"got {list(sizes)}")

    def padded_rows(self, rows: int) -> int:
        """The smallest allowed batch size holding ``rows``; ``rows`` without allowed sizes, or above them."""
        return next((size for size in self.allowed_batch_sizes if size >= rows), rows)


_BATCHING_PARAMETERS_CLASS = None
# Declared (TF Serving's names) but not applied by this server's batcher.
_IGNORED_FIELDS = frozenset({"thread_pool_name", "max_execution_batch_size"})
# TF Serving's other BatchingParameters fields: accepted with a warning, not refused as a typo.
_UNSUPPORTED_TF_SERVING_FIELDS = frozenset({
    "low_priority_max_batch_size", "low_priority_batch_timeout_micros", "low_priority_max_enqueued_batches",
    "low_priority_allowed_batch_sizes", "mixed_priority_batching_policy", "enable_priority_queue",
    "batch_padding_policy"})


def _batching_parameters_message():
    """A dynamic proto class with the fields of ``tensorflow.serving.BatchingParameters``.

    tensorflow-serving-api does not ship ``session_bundle_config_pb2``; the text format of a
    ``--batching_parameters_file`` only needs field names and types, so we declare them here.
    """
    global _BATCHING_PARAMETERS_CLASS
    if _BATCHING_PARAMETERS_CLASS is not None:
        return _BATCHING_PARAMETERS_CLASS
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="xmatch_serving_batching.proto",
        package="tensorflow.serving",
        dependency=["google/protobuf/wrappers.proto"],
        syntax="proto3",
    )
    message = file_proto.message_type.add(name="BatchingParameters")
    field_type = descriptor_pb2.FieldDescriptorProto
    fields = [
        ("max_batch_size", ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", ".google.protobuf.Int64Value"),
        ("num_batch_threads", ".google.protobuf.Int64Value"),
        ("thread_pool_name", ".google.protobuf.StringValue"),
        ("enable_large_batch_splitting", ".google.protobuf.BoolValue"),
        ("max_execution_batch_size", ".google.protobuf.Int64Value"),
    ]
    number = 1
    for name, type_name in fields:
        message.field.add(
            name=name,
            number=number,
            type=field_type.TYPE_MESSAGE,
            type_name=type_name,
            label=field_type.LABEL_OPTIONAL,
        )
        number += 1
    message.field.add(
        name="allowed_batch_sizes",
        number=number,
        type=field_type.TYPE_INT64,
        label=field_type.LABEL_REPEATED,
    )
    message.field.add(
        name="pad_variable_length_inputs",
        number=number + 1,
        type=field_type.TYPE_BOOL,
        label=field_type.LABEL_OPTIONAL,
    )
    pool.Add(file_proto)
    descriptor = pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    _BATCHING_PARAMETERS_CLASS = message_factory.GetMessageClass(descriptor)
    return _BATCHING_PARAMETERS_CLASS


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|#[^\n]*|[A-Za-z_]\w*|[{}:<>]|\S')


def _top_level_fields(text: str) -> set[str]:
    """Names of the outermost fields of a text proto (comments and strings skipped)."""
    tokens = [token for token in _TOKENS.findall(text) if not token.startswith("#")]
    names, depth = set(), 0
    for token, following in zip(tokens, tokens[1:] + [""]):
        if token in ("{", "<"):
            depth += 1
        elif token in ("}", ">"):
            depth -= 1
        elif depth == 0 and following in (":", "{", "<") and (token[0].isalpha() or token[0] == "_"):
            names.add(token)
    return names


def parse_batching_parameters(text: str, base: BatchingOptions | None = None) -> BatchingOptions:
    """Parses TF Serving's ``--batching_parameters_file`` text proto, e.g.
    ``max_batch_size { value: 64 } batch_timeout_micros { value: 2000 }``."""
    from google.protobuf import text_format

    message = _batching_parameters_message()
    proto = message()
    try:
        text_format.Parse(text, proto, allow_unknown_field=True)
    except text_format.ParseError as error:
        raise ValueError(str(error)) from None
    given = _top_level_fields(text)
    typos = sorted(given - set(message.DESCRIPTOR.fields_by_name) - _UNSUPPORTED_TF_SERVING_FIELDS)
    if typos:
        # A misspelt field was dropped without a word; TF Serving refuses the file.
        raise ValueError(f"BatchingParameters has no field named {typos[0]!r}")
    for name in sorted(given & (_IGNORED_FIELDS | _UNSUPPORTED_TF_SERVING_FIELDS)):
        log.warning("batching parameter %s is not supported by this server and is ignored", name)
    options = dataclasses.replace(base) if base is not None else BatchingOptions()
    for name in (
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "enable_large_batch_splitting",
    ):
        if proto.HasField(name):
            setattr(options, name, getattr(proto, name).value)
    options.allowed_batch_sizes = tuple(proto.allowed_batch_sizes)
    options.validate()
    return options


# --------------------------------------------------------------------------------------------


class _Task:
    __slots__ = ("inputs", "rows", "done", "result", "error")

    def __init__(self, inputs: dict, rows: int):
        self.inputs = inputs
        self.rows = rows
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class _Batch:
    __slots__ = ("key", "tasks", "rows", "closed", "ready")

    def __init__(self, key):
        self.key = key
        self.tasks: list[_Task] = []
        self.rows = 0
        self.closed = False
        self.ready = threading.Event()  # set when full (or displaced): run without waiting


def _is_batched(signature, alias: str, array: np.ndarray, rows) -> bool:
    """Whether a request's input is split along the batch: an input whose leading dimension is
    free in the signature, or one of unknown rank (``top_k``'s ``k``) that this request gives
    with one value per row; anything else is a per-request constant."""
    if alias in signature.batched_inputs:
        return True
    spec = signature.inputs.get(alias)
    return spec is not None and spec.rank is None and array.ndim >= 1 and array.shape[0] == rows


@dataclasses.dataclass
class BatchingStats:
    requests: int = 0  # requests that went through the batcher
    batches: int = 0  # merged calls made
    rows: int = 0
    fallbacks: int = 0  # batches re-run request by request after an error


class Batcher:
    """Merges concurrent calls; see the module docstring."""

    def __init__(self, options: BatchingOptions):
        options.validate()
        self.options = options
        self._lock = threading.Lock()
        self._open: dict = {}
        self._slots = threading.Semaphore(options.num_batch_threads)
        self._waiting = 0  # closed batches waiting for an execution slot
        self._draining = False
        self.stats = BatchingStats()

    @staticmethod
    def batch_key(owner, signature, arrays: dict):
        """The grouping key, or None when the request cannot be merged with others."""
        if not signature.batchable:
            return None
        parts = [id(owner), signature.name]
        rows = None
        for alias in signature.batched_inputs:
            array = arrays.get(alias)
            if array is None or array.ndim == 0:
                return None
            if rows is None:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                return None  # inputs disagree on the batch size: run as is
        for alias in sorted(arrays):
            array = arrays[alias]
            if _is_batched(signature, alias, array, rows):
                parts.append((alias, "b", array.dtype.str, array.shape[1:]))
            else:
                if array.dtype == object:
                    value = tuple(array.reshape(-1).tolist())
                else:
                    value = array.tobytes()
                parts.append((alias, "c", array.dtype.str, array.shape, value))
        if not rows:
            return None
        return tuple(parts), rows

    def run(self, key, rows: int, arrays: dict, call, signature) -> dict:
        """Runs ``call(arrays)`` merged with concurrent requests of the same ``key``."""
        task = _Task(arrays, rows)
        leader = False
        with self._lock:
            self.stats.requests += 1
            batch = self._open.get(key)
            if batch is not None and batch.rows + rows > self.options.max_batch_size:
                self._close(batch)
                batch = None
            if batch is None:
                batch = _Batch(key)
                self._open[key] = batch
                leader = True
            batch.tasks.append(task)
            batch.rows += rows
            if batch.rows >= self.options.max_batch_size:
                self._close(batch)
        if leader:
            batch.ready.wait(0.0 if self._draining else self.options.batch_timeout_micros / 1e6)
            with self._lock:
                self._close(batch)
                if self._waiting >= self.options.max_enqueued_batches:
                    overloaded = True
                else:
                    overloaded = False
                    self._waiting += 1
            if overloaded:
                error = errors.ServingError(
                    grpc.StatusCode.UNAVAILABLE,
                    "The batch scheduling queue is full "
                    f"({self.options.max_enqueued_batches} batches waiting); retry later",
                )
                for t in batch.tasks:
                    t.error = error
                    t.done.set()
            else:
                try:
                    with self._slots:
                        with self._lock:
                            self._waiting -= 1
                        self._execute(batch, call, signature)
                finally:
                    for t in batch.tasks:
                        if not t.done.is_set():
                            t.error = t.error or errors.ServingError(
                                grpc.StatusCode.INTERNAL, "batch execution failed"
                            )
                            t.done.set()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def flush(self) -> None:
        """Closes every open batch so that it runs now, not at its timeout: on shutdown, as TF
        Serving's batch scheduler does when its queues are destroyed, the requests already taken
        are answered without waiting ``batch_timeout_micros``."""
        with self._lock:
            self._draining = True  # and a request still arriving does not wait either
            for batch in list(self._open.values()):
                self._close(batch)

    def _close(self, batch: _Batch) -> None:
        """Closes ``batch`` to new requests (caller holds the lock)."""
        if not batch.closed:
            batch.closed = True
            if self._open.get(batch.key) is batch:
                del self._open[batch.key]
            batch.ready.set()

    def _execute(self, batch: _Batch, call, signature) -> None:
        tasks = batch.tasks
        with self._lock:
            self.stats.batches += 1
            self.stats.rows += batch.rows
        padded = self.options.padded_rows(batch.rows)
        if len(tasks) == 1 and padded == batch.rows:
            self._run_single(tasks[0], call)
            return
        merged = {}
        batched = {part[0] for part in batch.key[2:] if part[1] == "b"}
        for alias, first in tasks[0].inputs.items():
            if alias in batched:
                parts = [t.inputs[alias] for t in tasks]
                if padded > batch.rows:
                    parts.append(np.repeat(parts[0][:1], padded - batch.rows, axis=0))
                merged[alias] = np.concatenate(parts, axis=0)
            else:
                merged[alias] = first
        try:
            outputs = call(merged)
            if any(np.ndim(v) == 0 or np.shape(v)[0] != padded for v in outputs.values()):
                raise _Unsplittable()
        except BaseException:  # noqa: BLE001 - re-run one by one to attribute the error
            with self._lock:
                self.stats.fallbacks += 1
            for task in tasks:
                self._run_single(task, call)
            return
        start = 0
        for task in tasks:
            end = start + task.rows
            task.result = {alias: value[start:end] for alias, value in outputs.items()}
            task.done.set()
            start = end

    @staticmethod
    def _run_single(task: _Task, call) -> None:
        try:
            task.result = call(task.inputs)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            task.error = exc
        task.done.set()


class _Unsplittable(Exception):
    pass
