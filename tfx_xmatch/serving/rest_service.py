"""REST front-end: TF Serving's ``/v1/models`` API over the standard library's HTTP server.

Routes (``[...]`` optional)::

    GET  /v1/models/NAME[/versions/N|/labels/L]            model status (GetModelStatus JSON)
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata   signature defs (GetModelMetadata JSON)
    POST /v1/models/NAME[/versions/N|/labels/L]:predict    {"instances": ...} or {"inputs": ...}
    POST ...:classify, ...:regress                         400 (a predict-only model), as TF Serving

Predict follows TF Serving's JSON conventions: the row format (``instances``, answered with
``predictions``) and the columnar format (``inputs``, answered with ``outputs``); a single
output is unnamed; strings are JSON strings and binary values ``{"b64": ...}`` (outputs whose
name ends in ``_bytes`` are always base64); NaN/Infinity tokens are accepted and produced.
Errors are ``{"error": "..."}`` with 400 (bad request, and as in TF Serving any path or method
under ``/v1/`` outside these routes: "Malformed request"), 404 (unknown model or version, or a
path outside ``/v1/``), 413 (body over the limit), 501, 503 or 500. Paths match case-insensitively; bodies may be chunked or gzip-encoded.

One extension to the row format: a signature input of rank 0 (a scalar) may be given in every
instance, provided all instances give the same value; TF Serving would reject it (it stacks
instances), and the columnar format remains the portable way. Our exports' ``top_k`` takes
``k`` of any rank, so its instances stack into one k per row, as in TF Serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import socket
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer

from google.protobuf import json_format

from tfx_xmatch.serving import codec, errors
from tfx_xmatch.serving.grpc_service import SIGNATURE_DEF_FIELD, status_response
from tfx_xmatch.serving.inference import Inference, check_input_names, refuse_classify_or_regress
from tfx_xmatch.serving.model_manager import ModelManager, Signature

log = logging.getLogger("tfx_xmatch.serving.rest")

# TF Serving's HTTP server dispatches only paths under /v1/ (http_server.cc's kPathRegex) and
# answers any other with 404. Under /v1/ its routes are case-insensitive, with no trailing slash;
# anything else there is a 400 "Malformed request" (http_rest_api_handler.cc), not a 404 a
# client would read as "no model".
_API_PREFIX = re.compile(r"^/v1/", re.IGNORECASE)
_ROUTE = re.compile(
    r"^/v1/models(?:/(?P<name>[^/:]+))?"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:predict|:classify|:regress)?$",
    re.IGNORECASE,
)
_MAX_VERSION = (1 << 63) - 1


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _bad(message: str) -> errors.ServingError:
    return errors.invalid_argument(message)


class RestApp:
    """Turns (method, path, body) into (HTTP status, JSON-able body)."""

    def __init__(self, manager: ModelManager, inference: Inference):
        self.manager = manager
        self.inference = inference

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        try:
            return 200, self._dispatch(method, path, body)
        except errors.ServingError as error:
            return error.http, {"error": error.message}
        except Exception as exc:  # noqa: BLE001 - never crash on a request
            log.exception("REST %s %s failed", method, path)
            error = errors.from_exception(exc)
            return error.http, {"error": error.message}

    def _dispatch(self, method: str, path: str, body: bytes):
        path = urllib.parse.urlsplit(path).path
        if not _API_PREFIX.match(path):
            raise errors.not_found(f"Not Found: {method} {path}")
        match = _ROUTE.match(path)
        suffix = match["suffix"].lower() if match and match["suffix"] else None
        wanted = "GET" if suffix in (None, "/metadata") else "POST"
        if match is None or method != wanted or (match["name"] is None and suffix is not None):
            raise _bad(f"Malformed request: {method} {path}")
        if match["name"] is None:
            raise _bad("Missing model name in request.")
        name = urllib.parse.unquote(match["name"])
        version = int(match["version"]) if match["version"] is not None else None
        if version is not None and version > _MAX_VERSION:
            raise _bad(f"Malformed request: {method} {path}")
        label = urllib.parse.unquote(match["label"]) if match["label"] is not None else None
        if suffix in (None, "/metadata"):
            if suffix is None:
                # TF Serving's GetModelStatus reports every version whatever the label.
                statuses = self.manager.status(name, version)
                return json_format.MessageToDict(
                    status_response(statuses),
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                )
            return self._metadata(name, version, label)
        if suffix in (":classify", ":regress"):
            return self._classify_or_regress(suffix[1:], name, version, label, body)
        return self._predict(name, version, label, body)

    def _classify_or_regress(self, api: str, name, version, label, body: bytes):
        """As TF Serving: the body is parsed first (400), then the model is looked up (404),
        then its signature's method is checked (400: every export's signatures are predict
        signatures)."""
        doc = _json_object(body, "a JSON object with \"examples\"")
        if "examples" not in doc:
            raise _bad("Missing 'examples' key in the request body")
        signature_name = doc.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise _bad("'signature_name' key must be a string value.")
        with self.manager.acquire(name, version, label) as servable:
            refuse_classify_or_regress(servable, signature_name, api)

    def _metadata(self, name, version, label):
        from tensorflow_serving.apis import get_model_metadata_pb2

        with self.manager.acquire(name, version, label) as servable:
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for key, signature_def in servable.signature_defs.items():
                signature_map.signature_def[key].CopyFrom(signature_def)
            return {
                "model_spec": {
                    "name": name,
                    "signature_name": "",
                    "version": str(servable.version),
                },
                "metadata": {
                    # Every field, defaults included, as TF Serving prints it: a scalar's
                    # tensor_shape carries "dim": [] and "unknown_rank": false.
                    SIGNATURE_DEF_FIELD: json_format.MessageToDict(
                        signature_map, preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True,
                    )
                },
            }

    # -- predict ------------------------------------------------------------------------------

    def _predict(self, name, version, label, body: bytes):
        doc = _json_object(body, "a JSON object with \"instances\" (row format) or \"inputs\" (columnar format)")
        signature_name = doc.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise _bad("'signature_name' key must be a string value.")
        # TF Serving's order (json_tensor.cc's FillPredictRequestFromJson): the model and its
        # signature are looked up before the body's tensors are, so an unknown model is a 404
        # whatever the body holds.
        with self.manager.acquire(name, version, label) as servable:
            signature = servable.signature(signature_name)
            if not signature.inputs:
                raise _bad(f"Failed to get input map for signature: {signature_name or 'DEFAULT'}")
            has_instances, has_inputs = "instances" in doc, "inputs" in doc
            if has_instances and has_inputs:
                raise _bad("the request has both 'instances' and 'inputs'; use one of them")
            if not has_instances and not has_inputs:
                raise _bad("Missing 'instances' or 'inputs' key in the request body (empty request)")
            if has_instances:
                arrays = decode_instances(signature, doc["instances"])
            else:
                arrays = decode_inputs(signature, doc["inputs"])
            outputs = self.inference.predict(servable, signature, arrays)
        if has_instances:
            return {"predictions": encode_predictions(outputs)}
        if len(outputs) == 1:
            (alias, value), = outputs.items()
            return {"outputs": codec.ndarray_to_json(alias, value)}
        return {"outputs": {a: codec.ndarray_to_json(a, v) for a, v in outputs.items()}}


def _json_object(body: bytes, wanted: str) -> dict:
    """The request body as a JSON object; 400 naming what is wrong otherwise."""
    if not body or not body.strip():
        raise _bad(f"the request body is empty; send {wanted}")
    try:
        # A duplicate key is refused where RapidJSON would take the first and Python's json
        # the last.
        # No parse_int hook: Python's scanner reads integers at C speed without one (a hook made
        # a body of ids three times slower to parse); the codec reads those past 64 bits.
        doc = json.loads(body, object_pairs_hook=_unique_keys, parse_float=_json_double)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"Malformed JSON in the request body: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad("the request body must be a JSON object")
    return doc


def decode_instances(signature: Signature, instances) -> dict:
    if not isinstance(instances, list):
        raise _bad("'instances' must be a JSON list (one entry per row)")
    if not instances:
        raise _bad("'instances' is empty (empty request): send at least one instance")
    named = [isinstance(x, dict) and not _is_b64(x) for x in instances]
    if any(named) and not all(named):
        raise _bad("either every instance is a JSON object of named inputs or none is")
    if not named[0]:
        if len(signature.inputs) != 1:
            raise _bad(
                f"signature '{signature.name}' has {len(signature.inputs)} inputs "
                f"{sorted(signature.inputs)}: each instance must be a JSON object naming them"
            )
        (alias, spec), = signature.inputs.items()
        return {alias: codec.json_to_ndarray(spec, instances)}
    keys = set(instances[0])
    for index, instance in enumerate(instances[1:], start=1):
        if set(instance) != keys:
            raise _bad(
                f"instance {index} has inputs {sorted(instance)} but instance 0 has "
                f"{sorted(keys)}; every instance must give the same inputs"
            )
    check_input_names(signature, keys)
    arrays = {}
    for alias in sorted(keys):
        spec = signature.inputs[alias]
        values = [instance[alias] for instance in instances]
        if spec.rank == 0:
            first = values[0]
            if any(v != first for v in values[1:]):
                raise _bad(
                    f"input '{alias}' is a scalar in signature '{signature.name}', so every "
                    "instance must give it the same value (or use the columnar 'inputs' format)"
                )
            arrays[alias] = codec.json_to_ndarray(spec, first)
        else:
            arrays[alias] = codec.json_to_ndarray(spec, values)
    return arrays


def decode_inputs(signature: Signature, inputs) -> dict:
    if isinstance(inputs, dict) and not _is_b64(inputs):
        check_input_names(signature, inputs)
        return {
            alias: codec.json_to_ndarray(signature.inputs[alias], value)
            for alias, value in inputs.items()
        }
    if len(signature.inputs) != 1:
        raise _bad(
            f"signature '{signature.name}' has {len(signature.inputs)} inputs "
            f"{sorted(signature.inputs)}: 'inputs' must be a JSON object naming them"
        )
    (alias, spec), = signature.inputs.items()
    return {alias: codec.json_to_ndarray(spec, inputs)}


def encode_predictions(outputs: dict):
    """Outputs in the row format, as TF Serving makes it (json_tensor.cc's
    MakeRowFormatJsonFromTensors): one prediction per entry of the outputs' first dimension,
    which must be the same for all of them (not necessarily the number of instances)."""
    if not outputs:
        raise _bad("Cannot convert empty tensor map to JSON")  # TF Serving's words
    rows = None
    for alias, value in outputs.items():
        if value.ndim == 0:
            raise _bad(f"output '{alias}' is a scalar, with no first dimension to split into predictions; "
                       "use the columnar 'inputs' format for this signature")
        if value.shape[0] < 1:
            raise _bad(f"output '{alias}' has shape {codec.shape_str(value.shape)}: no prediction to answer with")
        if rows is not None and value.shape[0] != rows:
            raise _bad(f"the outputs' first dimensions differ ({codec.shape_str(value.shape)} for '{alias}', "
                       f"{rows} before it), so they do not split into predictions; use the columnar 'inputs' "
                       "format for this signature")
        rows = value.shape[0]
    if len(outputs) == 1:
        (alias, value), = outputs.items()
        return codec.ndarray_to_json(alias, value)
    columns = {alias: codec.ndarray_to_json(alias, value) for alias, value in outputs.items()}
    return [{alias: column[i] for alias, column in columns.items()} for i in range(rows)]


def _json_double(text: str) -> float:
    """A JSON number with a fraction or exponent, as RapidJSON reads it: one past the largest
    double is an error ("1e400"), where Python's json would make it Infinity."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"Number too big to be stored in double: {text[:40]}")
    return value


def _unique_keys(pairs: list) -> dict:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {duplicate!r} appears twice in one JSON object")
    return document


# --------------------------------------------------------------------------------------------
# HTTP plumbing

_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _Handler(BaseHTTPRequestHandler):
    server_version = "xmatch-serving"
    protocol_version = "HTTP/1.0"  # one request per connection: nothing idles in the pool

    def setup(self):
        self.timeout = self.server.request_timeout
        super().setup()

    def parse_request(self) -> bool:
        self.server.started(self.request)  # its request line came: a stop lets it finish
        return super().parse_request()

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (a request line, header or URL over its limits, a malformed
        request line) as every other answer here: ``{"error": "..."}``, not an HTML page."""
        self.close_connection = True
        self._send(code, {"error": message or explain or self.responses.get(code, ("error",))[0]})

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, payload) -> None:
        body = json.dumps(payload, allow_nan=True).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes | None:
        """The request body, de-chunked and gunzipped as TF Serving's HTTP server does; None
        when an error answer was sent instead."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self._read_sized()
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if body is None or encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "x-gzip"):
            self._send(400, {"error": f"unsupported Content-Encoding {encoding!r}; send gzip or none"})
            return None
        limit = self.server.max_body_bytes or None
        try:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
            plain = inflater.decompress(body, limit + 1 if limit else 0)
            if limit and len(plain) > limit:  # a small upload may inflate to anything
                self._send(413, {"error": f"the request body inflates past the limit of {limit} bytes"})
                return None
            if not inflater.eof:
                raise zlib.error("truncated gzip stream")
        except zlib.error as error:
            self._send(400, {"error": f"the gzip-encoded request body does not decompress: {error}"})
            return None
        return plain

    def _expects_continue(self) -> bool:
        return self.headers.get("Expect", "").strip().lower() == "100-continue" and self.request_version == "HTTP/1.1"

    def _continue(self) -> None:
        """Asks for a body the client holds back until told (curl does for large ones, then
        waits a second): as libevent does for TF Serving, once the size is known to be fine."""
        if self._expects_continue():
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()

    def _read_chunked(self) -> bytes | None:
        limit = self.server.max_body_bytes
        parts, total = [], 0
        self._continue()
        while True:
            line = self.rfile.readline(1024)
            digits = line.split(b";", 1)[0].strip()
            # Hex digits only: int() would also take "-1" (then read to the end of the stream,
            # holding a thread until the timeout), "+17", "0x17" and "1_7".
            if not _HEX_DIGITS.fullmatch(digits):
                self.close_connection = True
                self._send(400, {"error": f"malformed chunk size line {line[:40]!r}"})
                return None
            size = int(digits, 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            total += size
            if limit and total > limit:
                self.close_connection = True
                self._send(413, {"error": f"request body exceeds the limit of {limit} bytes"})
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF after the chunk

    def _read_sized(self) -> bytes | None:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self._send(400, {"error": f"invalid Content-Length: {length_header!r}"})
            return None
        limit = self.server.max_body_bytes
        if limit and length > limit:
            self.close_connection = True
            # Drain a moderately oversized body so the client can read the answer instead of
            # seeing its upload reset; a huge one is cut off, and one held back for a 100
            # Continue never comes.
            if length <= 16 * limit and not self._expects_continue():
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            self._send(
                413,
                {"error": f"request body of {length} bytes exceeds the limit of {limit} bytes"},
            )
            return None
        self._continue()
        return self.rfile.read(length)

    def _handle(self, method: str) -> None:
        body = b""
        if method == "POST":
            body = self._read_body()
            if body is None:
                return
        with self.server.computing(self.request):
            status, payload = self.server.app.handle(method, self.path, body)
        self._send(status, payload)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_OPTIONS(self):
        self._handle("OPTIONS")


class RestServer(HTTPServer):
    """HTTP server whose slow or idle connections hold no worker, with a graceful stop.

    As in TF Serving, where libevent reads a request before a worker runs it: each connection
    has a thread of its own for its socket I/O (reading the request, writing the answer), and
    only running a request takes one of the ``num_threads`` slots. Reading a request and writing
    its answer each have ``request_timeout`` seconds in all (a client sending a byte now and
    then, or never reading, is cut off then, not only when a single read stalls that long);
    running it has no limit here. Past ``num_threads + max_queued_connections`` connections a
    new one gets a 503 at once.
    """

    daemon_threads = True
    # The listen backlog (socketserver's default, 5, drops connections under a burst).
    request_queue_size = 1024

    def __init__(
        self,
        app: RestApp,
        host: str,
        port: int,
        num_threads: int = 16,
        max_body_bytes: int = 64 << 20,
        request_timeout: float = 30.0,
        max_queued_connections: int = 256,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.max_pending = num_threads + max_queued_connections
        self._slots = threading.BoundedSemaphore(num_threads)
        # Open connection -> deadline of its socket I/O (None while its request runs).
        self._deadlines: dict = {}
        self._started: set = set()  # connections whose request line has come
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def in_flight(self) -> int:
        """Requests running now (holding a slot or waiting for one)."""
        return self._in_flight

    def started(self, connection) -> None:
        with self._lock:
            self._started.add(connection)

    @contextlib.contextmanager
    def computing(self, connection):
        """Runs a request that was read whole: in one of the slots, its socket deadline paused,
        and a new one for writing the answer after it."""
        with self._lock:
            self._deadlines[connection] = None
            self._in_flight += 1
        try:
            with self._slots:
                yield
        finally:
            with self._lock:
                self._in_flight -= 1
                if connection in self._deadlines:
                    self._deadlines[connection] = time.monotonic() + self.request_timeout

    def process_request(self, request, client_address):
        with self._lock:
            overloaded = len(self._deadlines) >= self.max_pending
            if not overloaded:
                self._deadlines[request] = time.monotonic() + self.request_timeout
        # Neither the refusal nor the connection runs on the accept thread: one slow client
        # there would hold up every other.
        target = self._refuse if overloaded else self._process
        threading.Thread(target=target, args=(request, client_address), name="serving-rest-connection",
                         daemon=True).start()

    def service_actions(self) -> None:
        """Called by ``serve_forever`` every poll: cuts off connections past their deadline
        (their blocked read or write then fails, and their thread ends)."""
        now = time.monotonic()
        with self._lock:
            expired = [connection for connection, deadline in self._deadlines.items()
                       if deadline is not None and deadline < now]
            for connection in expired:
                self._deadlines[connection] = None  # once
        for connection in expired:
            log.debug("REST connection cut off after %.0f s without a whole request or answer",
                      self.request_timeout)
            _cut_off(connection)

    def _refuse(self, request, client_address) -> None:
        body = json.dumps({"error": f"the server is overloaded ({self.max_pending} connections in progress or "
                                    "queued); retry later"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            # Read what the client has sent so far: closing on unread bytes would reset the
            # connection before it reads the answer.
            request.settimeout(0.2)
            try:
                request.recv(1 << 16)
            except TimeoutError:
                pass  # it has sent nothing yet: it still gets the answer, not a bare close
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            log.debug("could not send the overload answer", exc_info=True)
        finally:
            self.shutdown_request(request)

    def _process(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001
            self.handle_error(request, client_address)
        finally:
            with self._lock:
                self._deadlines.pop(request, None)
                self._started.discard(request)
                self._idle.notify_all()
            self.shutdown_request(request)

    def handle_error(self, request, client_address):
        log.debug("REST connection from %s failed", client_address, exc_info=True)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="serving-rest-accept",
            daemon=True,
        )
        self._thread.start()

    def stop(self, grace: float = 10.0) -> None:
        """Stops accepting connections, closes those that sent no request yet, lets the others
        finish (up to ``grace`` s), then cuts them off."""
        if self._thread is not None:
            self.shutdown()  # ends serve_forever: no new connections are accepted
        self.server_close()
        deadline = time.monotonic() + grace
        with self._lock:
            waiting = [connection for connection in self._deadlines if connection not in self._started]
        for connection in waiting:  # no request yet: nothing to finish
            _cut_off(connection)
        with self._lock:
            while self._deadlines and time.monotonic() < deadline:
                self._idle.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            left = list(self._deadlines)
        for connection in left:
            _cut_off(connection)
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def _cut_off(connection) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed meanwhile
