"""The model server: :class:`ModelServer` and the ``serve`` command line (``main(argv)``).

Flags follow ``tensorflow_model_server``'s names where it has one::

    python -m tfx_xmatch.serving.server --model_name=xmatch --model_base_path=/models/xmatch \\
        --port=8500 --rest_api_port=8501 --file_system_poll_wait_seconds=2 \\
        --enable_batching --max_batch_size=64 --batch_timeout_micros=2000

or ``--model_config_file=models.config`` (TF Serving's ``ModelServerConfig`` text proto) for
several models, and ``--batching_parameters_file`` (TF Serving's ``BatchingParameters`` text
proto). ``--tensorflow_intra_op_parallelism`` / ``--tensorflow_inter_op_parallelism`` size
TensorFlow's thread pools as in TF Serving. As with TF Serving, ``--rest_api_port=0`` (the
default) disables REST. Unlike TF
Serving, the server binds ``--bind_address`` (default 127.0.0.1; pass 0.0.0.0 to listen on all
interfaces). SIGTERM / SIGINT stop it gracefully: no new requests are accepted, in-flight ones
finish (up to ``--shutdown_grace_seconds``), then the models are unloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

from tfx_xmatch.io_utils import absolute_unless_url
from tfx_xmatch.serving.batching import Batcher, BatchingOptions, parse_batching_parameters
from tfx_xmatch.serving.inference import Inference
from tfx_xmatch.serving.model_manager import (
    ModelConfig,
    ModelManager,
    VersionPolicy,
    import_modules,
    parse_model_config_file,
    read_text,
)

log = logging.getLogger("tfx_xmatch.serving.server")


@dataclasses.dataclass
class ServerOptions:
    model_configs: list
    bind_address: str = "127.0.0.1"
    grpc_port: int | None = 8500  # None: no gRPC; 0: any free port
    rest_port: int | None = None  # None: no REST; 0: any free port
    file_system_poll_wait_seconds: float = 1.0  # <= 0: look once, at start
    enable_batching: bool = False
    batching: BatchingOptions = dataclasses.field(default_factory=BatchingOptions)
    max_request_batch_size: int = 0  # 0: no limit
    grpc_max_threads: int = 16
    grpc_max_receive_message_length: int = 64 << 20
    grpc_channel_arguments: tuple = ()
    rest_num_threads: int = 16
    rest_max_body_bytes: int = 64 << 20
    rest_timeout_seconds: float = 30.0
    rest_max_queued_connections: int = 256  # beyond the busy threads; more get a 503
    enable_model_warmup: bool = True
    allow_version_labels_for_unavailable_models: bool = False
    load_modules: tuple = ()
    model_config_file: str | None = None
    model_config_file_poll_wait_seconds: float = 0.0
    shutdown_grace_seconds: float = 10.0
    tensorflow_intra_op_parallelism: int = 0  # 0: TensorFlow's default (all cores)
    tensorflow_inter_op_parallelism: int = 0


def set_tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """Sizes TensorFlow's thread pools, as TF Serving's flags of the same names do.

    TensorFlow creates its pools once per process, when the first op runs, so this must come
    before that; asking again for the sizes already in force is allowed.

    Args:
      intra_op: Threads one op may use (``--tensorflow_intra_op_parallelism``); 0 keeps
        TensorFlow's default. One thread often lowers single-query latency, since a small
        lookup then runs without handing work between threads.
      inter_op: Ops run at once (``--tensorflow_inter_op_parallelism``); 0 keeps the default.

    Raises:
      ValueError: If a value is negative, or differs from the pools already created in this
        process (the message names the flag and both values).
    """
    import tensorflow as tf

    settings = (
        ("--tensorflow_intra_op_parallelism", intra_op, tf.config.threading.get_intra_op_parallelism_threads,
         tf.config.threading.set_intra_op_parallelism_threads),
        ("--tensorflow_inter_op_parallelism", inter_op, tf.config.threading.get_inter_op_parallelism_threads,
         tf.config.threading.set_inter_op_parallelism_threads),
    )
    for flag, value, get, set_ in settings:
        if value < 0:
            raise ValueError(f"{flag} must be >= 0 (0: TensorFlow's default), got {value}")
        if value == 0 or get() == value:
            continue
        try:
            set_(value)
        except RuntimeError:
            raise ValueError(
                f"{flag}={value}: TensorFlow's thread pools already exist in this process with "
                f"{get() or 'the default number of'} threads; they can only be sized before the first "
                "TensorFlow op runs (start the server in a process of its own)"
            ) from None


class ModelServer:
    """Model manager + gRPC + REST. ``start()``, then ``stop()`` (or use it as a context)."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.batcher = Batcher(options.batching) if options.enable_batching else None
        self.inference = Inference(self.batcher, options.max_request_batch_size)
        self.manager = ModelManager(
            options.model_configs,
            poll_wait_seconds=options.file_system_poll_wait_seconds,
            warmup=self.inference.warmup if options.enable_model_warmup else None,
            load_modules=options.load_modules,
            allow_unavailable_labels=options.allow_version_labels_for_unavailable_models,
        )
        self.grpc_server = None
        self.grpc_port: int | None = None
        self._grpc_executor: futures.ThreadPoolExecutor | None = None
        self.rest_server = None
        self.rest_port: int | None = None
        self._stop_requested = threading.Event()
        self._started = False
        self._stopped = False
        self._config_error: str | None = None
        self._config_thread: threading.Thread | None = None
        self._config_text: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "ModelServer":
        """Loads the models, then listens; a start that fails stops what it started.

        A server object starts once, as a TF Serving process does: its stop unloads the models
        and ends the model manager for good (a second start listened and served nothing).

        Raises:
          RuntimeError: This server was started before.
          ValueError: A model's every version failed to load.
          OSError: A port cannot be listened on.
        """
        if self._started:
            state = "stopped" if self._stopped else "running"
            raise RuntimeError(f"this ModelServer was already started and is {state}; a ModelServer starts "
                               "once: create a new ModelServer(options) to serve again")
        self._started = True
        try:
            return self._start()
        except BaseException:
            self.stop(0)
            raise

    def _start(self) -> "ModelServer":
        from tfx_xmatch.serving.grpc_service import make_grpc_server
        from tfx_xmatch.serving.rest_service import RestApp, RestServer

        opts = self.options
        set_tensorflow_threads(opts.tensorflow_intra_op_parallelism, opts.tensorflow_inter_op_parallelism)
        self.manager.start()
        self._refuse_models_that_failed_to_load()
        if opts.grpc_port is not None:
            self._grpc_executor = futures.ThreadPoolExecutor(
                max_workers=opts.grpc_max_threads, thread_name_prefix="serving-grpc"
            )
            self.grpc_server, self.grpc_port = make_grpc_server(
                self.manager,
                self.inference,
                _join_host_port(opts.bind_address, opts.grpc_port),
                self._grpc_executor,
                max_receive_message_length=opts.grpc_max_receive_message_length,
                channel_arguments=opts.grpc_channel_arguments,
            )
            log.info("gRPC API at %s:%d", opts.bind_address, self.grpc_port)
        if opts.rest_port is not None:
            try:
                self.rest_server = RestServer(
                    RestApp(self.manager, self.inference),
                    opts.bind_address,
                    opts.rest_port,
                    num_threads=opts.rest_num_threads,
                    max_body_bytes=opts.rest_max_body_bytes,
                    request_timeout=opts.rest_timeout_seconds,
                    max_queued_connections=opts.rest_max_queued_connections,
                )
            except OSError as error:  # "[Errno 98] Address already in use" named no port
                raise OSError(f"cannot serve REST on {_join_host_port(opts.bind_address, opts.rest_port)} "
                              f"(--rest_api_port): {error.strerror or error}") from None
            self.rest_port = self.rest_server.port
            self.rest_server.start()
            log.info("REST API at http://%s:%d", opts.bind_address, self.rest_port)
        if opts.model_config_file and opts.model_config_file_poll_wait_seconds > 0:
            self._config_text = read_text(opts.model_config_file)
            self._config_thread = threading.Thread(
                target=self._watch_config, name="serving-config-poller", daemon=True
            )
            self._config_thread.start()
        return self

    def _refuse_models_that_failed_to_load(self) -> None:
        """Fails start-up, as tensorflow_model_server does, when every version of a model on
        disk failed to load: a broken deploy must not look like a healthy process.

        A model with no version on disk yet is not an error here (TF Serving would wait for
        one; this server serves the others and loads it when it appears).
        """
        import grpc

        failed = []
        for name in self.manager.model_names():
            model = self.manager.get_model(name)
            with model.lock:
                statuses = sorted(model.statuses.values(), key=lambda status: status.version)
            if statuses and all(status.state == "END" and status.error_code != grpc.StatusCode.OK
                                for status in statuses):
                reasons = "; ".join(f"version {status.version}: {status.error_message}" for status in statuses)
                failed.append(f"model {name!r} ({reasons})")
        if failed:
            raise ValueError(f"{len(failed)} model(s) did not become available: {', '.join(failed)}")
        labels = self.manager.unavailable_labels()
        if labels:  # TF Serving refuses them at start-up too
            raise ValueError("; ".join(labels))

    def _watch_config(self) -> None:
        path = self.options.model_config_file
        while not self._stop_requested.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                text = read_text(path)
                if text == self._config_text:
                    continue
                from tfx_xmatch.serving.model_manager import parse_model_config_text

                configs = parse_model_config_text(text)
                if self._config_error is None:
                    log.info("model config file %s changed; applying it", path)
                self.manager.apply_configs(configs)
                self._config_text = text  # only once applied: a refused label is tried again
                self._config_error = None
            except Exception as error:  # noqa: BLE001 - keep serving the old config
                if str(error) != self._config_error:  # once per problem, not every poll
                    self._config_error = str(error)
                    log.exception("could not apply the model config file %s", path)

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` or :meth:`stop` was called."""
        return self._stop_requested.is_set()

    def request_stop(self) -> None:
        """Asks :meth:`serve_forever` to return (safe from signal handlers and other threads)."""
        self._stop_requested.set()

    def serve_forever(self) -> None:
        """Blocks until :meth:`request_stop`, then stops gracefully."""
        while not self._stop_requested.wait(0.5):
            pass
        self.stop()

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting requests, lets in-flight ones finish (up to ``grace`` seconds),
        then unloads the models."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()
        grace = self.options.shutdown_grace_seconds if grace is None else grace
        grpc_done = self.grpc_server.stop(grace) if self.grpc_server is not None else None
        if self.batcher is not None:
            self.batcher.flush()
        if self.rest_server is not None:
            self.rest_server.stop(grace)
        if grpc_done is not None:
            grpc_done.wait(grace + 1.0)
        if self._grpc_executor is not None:
            # Idle workers exit now; one still in a handler past the grace exits when it returns
            # (waiting for it would let a hung request block the stop).
            self._grpc_executor.shutdown(wait=False, cancel_futures=True)
        self.manager.stop()
        log.info("server stopped")

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------------------------
# Command line


def _bool(value) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _port(value: str) -> int:
    """A TCP port number; the socket layer took -1 as 65535 and 70000 as 4464."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port number is in 0..65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xmatch serve",
        description="Serve SavedModels over TensorFlow Serving's gRPC and REST protocol.",
    )
    flag = p.add_argument
    flag("--port", type=_port, default=8500, help="gRPC port (0: any free port)")
    flag("--rest_api_port", type=_port, default=0, help="REST port; 0 disables REST (as TF Serving)")
    flag("--bind_address", default="127.0.0.1",
         help="address to listen on (0.0.0.0 for every interface)")
    flag("--model_name", default="default", help="name of the model (with --model_base_path; default "
         "'default', as TF Serving's)")
    flag("--model_base_path", default=None, help="directory holding <version>/ SavedModels")
    flag("--num_versions_to_keep", type=int, default=1,
         help="with --model_base_path: serve the N newest versions (latest policy)")
    flag("--model_config_file", default=None,
         help="TF Serving models.config (ModelServerConfig text proto) for several models")
    flag("--model_config_file_poll_wait_seconds", type=float, default=0.0,
         help="re-read --model_config_file this often (0: never)")
    flag("--file_system_poll_wait_seconds", type=float, default=1.0,
         help="poll the base paths for new versions this often (<= 0: only at start)")
    flag("--enable_batching", type=_bool, nargs="?", const=True, default=False,
         help="merge concurrent requests into batches")
    flag("--batching_parameters_file", default=None,
         help="TF Serving BatchingParameters text proto (overrides the batching flags)")
    flag("--max_batch_size", type=int, default=64, help="rows per merged batch")
    flag("--batch_timeout_micros", type=int, default=1000,
         help="longest wait for a batch to fill, in microseconds")
    flag("--num_batch_threads", type=int, default=max(1, os.cpu_count() or 1),
         help="merged calls running at once")
    flag("--max_enqueued_batches", type=int, default=100,
         help="batches waiting to run before requests get UNAVAILABLE")
    flag("--enable_large_batch_splitting", type=_bool, nargs="?", const=True, default=False,
         help="run requests larger than --max_batch_size on their own instead of rejecting them")
    flag("--max_request_batch_size", type=int, default=0,
         help="reject requests with more rows than this (0: no limit)")
    flag("--grpc_max_threads", type=int, default=16, help="gRPC worker threads")
    flag("--grpc_max_receive_message_length", type=int, default=64 << 20,
         help="largest gRPC request in bytes; larger ones get RESOURCE_EXHAUSTED")
    flag("--grpc_channel_arguments", default="",
         help="extra gRPC server arguments, comma-separated key=value")
    flag("--rest_api_num_threads", type=int, default=16, help="REST requests run at once")
    flag("--rest_api_timeout_in_ms", type=int, default=30000,
         help="time to read a REST request, and again to write its answer")
    flag("--rest_api_max_body_bytes", type=int, default=64 << 20,
         help="largest REST request body; larger ones get 413")
    flag("--enable_model_warmup", type=_bool, nargs="?", const=True, default=True,
         help="replay assets.extra/tf_serving_warmup_requests before serving a version")
    flag("--allow_version_labels_for_unavailable_models", type=_bool, nargs="?", const=True, default=False,
         help="accept version labels that name a version not loaded (yet)")
    flag("--load_modules", default="",
         help="comma-separated Python modules to import first (custom ops, e.g. scann)")
    flag("--shutdown_grace_seconds", type=float, default=10.0,
         help="how long in-flight requests may take to finish at shutdown")
    flag("--tensorflow_intra_op_parallelism", type=int, default=0,
         help="threads one TensorFlow op may use (0: all cores); 1 often lowers single-query latency")
    flag("--tensorflow_inter_op_parallelism", type=int, default=0,
         help="TensorFlow ops run at once (0: TensorFlow's default)")
    flag("--log_level", default="INFO", help="Python logging level")
    return p


def _channel_arguments(text: str) -> tuple:
    result = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--grpc_channel_arguments entry {item!r} is not key=value")
        try:
            result.append((key.strip(), int(value)))
        except ValueError:
            result.append((key.strip(), value.strip()))
    return tuple(result)


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    for name in ("tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0 (0: TensorFlow's default), got {getattr(args, name)}")
    if bool(args.model_config_file) == bool(args.model_base_path):
        raise ValueError(
            "give either --model_config_file, or --model_name with --model_base_path"
        )
    if args.model_config_file:
        configs = parse_model_config_file(args.model_config_file)
    else:
        if not args.model_name:
            raise ValueError("--model_name is empty; name the model (TF Serving's default is 'default')")
        configs = [
            ModelConfig(
                args.model_name,
                absolute_unless_url(args.model_base_path),
                VersionPolicy("latest", num_versions=max(1, args.num_versions_to_keep)),
            )
        ]
    batching = BatchingOptions(
        max_batch_size=args.max_batch_size,
        batch_timeout_micros=args.batch_timeout_micros,
        num_batch_threads=args.num_batch_threads,
        max_enqueued_batches=args.max_enqueued_batches,
        enable_large_batch_splitting=args.enable_large_batch_splitting,
    )
    if args.batching_parameters_file:
        with open(args.batching_parameters_file, encoding="utf-8") as f:
            text = f.read()
        try:
            batching = parse_batching_parameters(text, batching)
        except ValueError as error:
            raise ValueError(f"invalid batching parameters file {args.batching_parameters_file}: {error}") from None
    batching.validate()
    return ServerOptions(
        model_configs=configs,
        bind_address=args.bind_address,
        grpc_port=args.port,
        rest_port=args.rest_api_port if args.rest_api_port > 0 else None,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        enable_batching=args.enable_batching,
        batching=batching,
        max_request_batch_size=args.max_request_batch_size,
        grpc_max_threads=args.grpc_max_threads,
        grpc_max_receive_message_length=args.grpc_max_receive_message_length,
        grpc_channel_arguments=_channel_arguments(args.grpc_channel_arguments),
        rest_num_threads=args.rest_api_num_threads,
        rest_max_body_bytes=args.rest_api_max_body_bytes,
        rest_timeout_seconds=args.rest_api_timeout_in_ms / 1000.0,
        enable_model_warmup=args.enable_model_warmup,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        load_modules=tuple(filter(None, (m.strip() for m in args.load_modules.split(",")))),
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        tensorflow_intra_op_parallelism=args.tensorflow_intra_op_parallelism,
        tensorflow_inter_op_parallelism=args.tensorflow_inter_op_parallelism,
    )


def main(argv=None) -> int:
    """``xmatch serve``: runs until SIGTERM/SIGINT, then shuts down gracefully: new requests
    are refused, open batches run at once, requests in flight get ``--shutdown_grace_seconds``.
    A second signal exits at once (128 + its number); so does the process, with 0, when a
    request thread still runs 5 s after the stop."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        options = options_from_args(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    import_modules(options.load_modules)
    server = ModelServer(options)
    try:
        server.start()
    except (OSError, ValueError) as exc:
        server.stop(0)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, functools.partial(_drain_then_exit_at_a_second_signal, server))
    if server.grpc_port is not None:
        print(f"serving gRPC on {options.bind_address}:{server.grpc_port}", flush=True)
    if server.rest_port is not None:
        print(f"serving REST on http://{options.bind_address}:{server.rest_port}", flush=True)
    server.serve_forever()
    print("server stopped", flush=True)
    _exit_even_if_a_request_hangs()
    return 0


def _drain_then_exit_at_a_second_signal(server: ModelServer, signum, frame) -> None:
    """The first SIGTERM/SIGINT stops gracefully (``--shutdown_grace_seconds``); a second one
    means the operator will not wait for that: exit now, 128 + the signal's number."""
    if server.stop_requested:
        print(f"{signal.Signals(signum).name} again: exiting without waiting for requests in flight",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)
    server.request_stop()


def _exit_even_if_a_request_hangs(wait_seconds: float = 5.0) -> None:
    """Ends the process ``wait_seconds`` from now if it has not ended by then: the interpreter
    waits at exit for every request thread, and one stuck in a model call past the shutdown
    grace would keep the process alive without limit (until a scheduler's SIGKILL). A daemon
    thread, so a normal exit does not wait for it; only the command's ``main`` arms it."""
    def watchdog():
        time.sleep(wait_seconds)
        log.warning("a request thread still runs %.0f s after the shutdown; exiting without it", wait_seconds)
        logging.shutdown()
        os._exit(0)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
