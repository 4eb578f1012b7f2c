"""The TF-Serving-protocol model server (``serving/``): gRPC and REST, versions, batching.

Every server here listens on 127.0.0.1 on ports the OS picks, serves tiny SavedModels written
into temporary directories, and every load test is bounded in requests and time.
"""

import base64
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.data.experimental.ops import testing as tf_data_testing
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tfx_xmatch.serving import client as serving_client
from tfx_xmatch.serving.batching import BatchingOptions, parse_batching_parameters
from tfx_xmatch.serving.model_manager import parse_model_config_text
from tfx_xmatch.serving.server import ModelServer, ServerOptions, build_parser, options_from_args

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, K_MAX, HIST, DIM = 50, 5, 5, 4


# --------------------------------------------------------------------------------------------
# A tiny retrieval-shaped SavedModel


class TinyRetrieval(tf.Module):
    def __init__(self, version: int):
        super().__init__()
        rng = np.random.default_rng(version)
        self.version = tf.constant(version, tf.float32)
        self.item_embeddings = tf.Variable(rng.normal(size=(VOCAB, DIM)).astype("float32"))
        self.calls = tf.Variable(0, dtype=tf.int64)

    def _user(self, history):
        mask = tf.cast(history > 0, tf.float32)[:, :, None]
        embedded = tf.gather(self.item_embeddings, history) * mask
        return tf.reduce_sum(embedded, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    @tf.function(input_signature=[
        tf.TensorSpec([None, HIST], tf.int64, name="history"),
        tf.TensorSpec([], tf.int32, name="k"),
    ])
    def serve(self, history, k):
        checks = [
            tf.debugging.assert_non_negative(history, message="item ids must be >= 0"),
            tf.debugging.assert_less(
                history, tf.constant(VOCAB, tf.int64), message="item ids outside the vocabulary"
            ),
            tf.debugging.assert_positive(
                tf.reduce_sum(tf.cast(history > 0, tf.int32), axis=1), message="empty history"
            ),
            tf.debugging.assert_positive(k, message="k must be > 0"),
            tf.debugging.assert_less_equal(k, K_MAX, message="k must be <= k_max"),
        ]
        with tf.control_dependencies(checks):
            scores = tf.matmul(self._user(history), self.item_embeddings, transpose_b=True)
            top = tf.math.top_k(scores + 100.0 * self.version, k)
            counted = self.calls.assign_add(1)
        with tf.control_dependencies([counted]):
            return {"item_ids": tf.cast(top.indices, tf.int64), "scores": tf.identity(top.values)}

    @tf.function(input_signature=[tf.TensorSpec([None, HIST], tf.int64, name="history")])
    def user_embedding(self, history):
        return {"embedding": self._user(history)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="names")])
    def echo(self, names):
        return {
            "upper": tf.strings.upper(names),
            "length": tf.strings.length(names),
            "raw_bytes": tf.identity(names),
        }

    @tf.function(input_signature=[
        tf.TensorSpec([], tf.int64, name="micros"),
        tf.TensorSpec([None], tf.float32, name="x"),
    ])
    def slow(self, micros, x):
        # Sleeps ``micros`` twice (before the element and before end-of-sequence); concurrent
        # calls of this one function run one after the other (tf.data), other signatures do not
        # wait for it.
        waited = tf.data.Dataset.range(1).apply(tf_data_testing.sleep(micros)).reduce(
            tf.constant(0, tf.int64), lambda acc, _: acc + 1
        )
        with tf.control_dependencies([waited]):
            return {"y": 2.0 * x}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def stats(self, x):
        # Outputs whose first dimension is not the number of instances.
        return {"stats": tf.stack([tf.reduce_min(x), tf.reduce_max(x), tf.reduce_sum(x)]),
                "size": tf.fill([3], tf.size(x))}

    @tf.function(input_signature=[])
    def call_count(self):
        return {"calls": tf.identity(self.calls)}


def _save(path: str, version: int) -> None:
    module = TinyRetrieval(version)
    tf.saved_model.save(module, path, signatures={
        "serving_default": module.serve,
        "user_embedding": module.user_embedding,
        "echo": module.echo,
        "slow": module.slow,
        "call_count": module.call_count,
        "stats": module.stats,
    })


@pytest.fixture(scope="session")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_templates")
    paths = {}
    for version in (1, 2, 3):
        paths[version] = str(root / f"v{version}")
        _save(paths[version], version)
    return paths


@pytest.fixture(scope="session")
def reference(templates):
    """The SavedModels loaded in-process: the oracle for server answers."""
    return {v: tf.saved_model.load(p) for v, p in templates.items()}


def expected(reference, version, history, k):
    out = reference[version].signatures["serving_default"](
        history=tf.constant(history, tf.int64), k=tf.constant(k, tf.int32)
    )
    return {key: value.numpy() for key, value in out.items()}


def install_version(templates, base, version, source_version=None):
    """Copies a template into ``base/<version>`` through a hidden temp dir and a rename."""
    os.makedirs(base, exist_ok=True)
    tmp = os.path.join(base, f".tmp-{version}")
    shutil.copytree(templates[source_version or version], tmp)
    os.rename(tmp, os.path.join(base, str(version)))


def wait_for_states(server, want, name="tiny", timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {s.version: s.state for s in server.manager.status(name)}
        if states == want:
            return True
        time.sleep(0.05)
    raise AssertionError(f"states {states}, wanted {want}")


def wait_for_requests_in(server, version, count, name="tiny", timeout=20.0):
    """Waits until ``count`` requests hold ``version``: they are inside the model, not queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        servable = server.manager.get_model(name).serving.get(version)
        if servable is not None and servable.refs >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"{count} requests never reached version {version} of {name!r}")


def start_server(configs_or_base, **overrides) -> ModelServer:
    if isinstance(configs_or_base, str):
        configs = parse_model_config_text(
            f'model_config_list {{ config {{ name: "tiny" base_path: "{configs_or_base}" '
            'model_platform: "tensorflow" } }'
        )
    else:
        configs = configs_or_base
    options = ServerOptions(
        model_configs=configs, grpc_port=0, rest_port=0, file_system_poll_wait_seconds=0.1
    )
    for key, value in overrides.items():
        setattr(options, key, value)
    return ModelServer(options).start()


# --------------------------------------------------------------------------------------------
# Client helpers (stock TF Serving stubs and plain HTTP)


def predict_request(model="tiny", inputs=None, signature="", version=None, label=None,
                    output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if signature:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for alias, value in (inputs or {}).items():
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def good_inputs(rows=1):
    history = np.array([[1, 2, 3, 0, 0]] * rows, dtype=np.int64)
    return {"history": history, "k": np.int32(3)}


def rest(port, method, path, body=None, timeout=30):
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Clients:
    def __init__(self, server: ModelServer):
        self.server = server
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{server.grpc_port}",
            options=[("grpc.max_send_message_length", 8 << 20)],
        )
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def rest(self, method, path, body=None, timeout=30):
        return rest(self.server.rest_port, method, path, body, timeout)

    def close(self):
        self.channel.close()


# --------------------------------------------------------------------------------------------
# The shared server: two models from a models.config, versions 1 and 2 both served, labels,
# batching on, small limits so that the limit checks are cheap to trigger.

MODELS_CONFIG = """
model_config_list {{
  config {{
    name: "tiny"
    base_path: "{base}"
    model_platform: "tensorflow"
    model_version_policy {{ all {{}} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
  config {{
    name: "other"
    base_path: "{base}"
    model_platform: "tensorflow"
  }}
}}
"""
GRPC_LIMIT = 256 << 10
REST_LIMIT = 256 << 10


@pytest.fixture(scope="module")
def shared(templates, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("shared") / "tiny")
    install_version(templates, base, 1)
    install_version(templates, base, 2)
    server = start_server(
        parse_model_config_text(MODELS_CONFIG.format(base=base)),
        enable_batching=True,
        batching=BatchingOptions(max_batch_size=8, batch_timeout_micros=2000,
                                 enable_large_batch_splitting=True),
        max_request_batch_size=16,
        grpc_max_receive_message_length=GRPC_LIMIT,
        rest_max_body_bytes=REST_LIMIT,
    )
    clients = Clients(server)
    yield clients
    clients.close()
    server.stop(grace=5)


# --------------------------------------------------------------------------------------------
# Happy paths


def test_stock_stub_predict_matches_the_model(shared, reference):
    history = np.array([[1, 2, 3, 0, 0], [7, 8, 0, 0, 0]], dtype=np.int64)
    request = predict_request(inputs={"history": history, "k": np.int32(3)})
    response = shared.predict.Predict(request, timeout=10)
    assert response.model_spec.name == "tiny"
    assert response.model_spec.version.value == 2  # newest by default
    assert response.model_spec.signature_name == "serving_default"
    want = expected(reference, 2, history, 3)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["item_ids"]), want["item_ids"])
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]), want["scores"])
    # As TF Serving writes them (Tensor::AsProtoField): in the typed value fields that clients
    # read directly, not packed into tensor_content.
    assert not response.outputs["scores"].tensor_content
    np.testing.assert_allclose(np.reshape(response.outputs["scores"].float_val, (2, 3)), want["scores"])
    np.testing.assert_array_equal(np.reshape(response.outputs["item_ids"].int64_val, (2, 3)), want["item_ids"])

    for spec in ({"version": 1}, {"label": "stable"}):
        response = shared.predict.Predict(
            predict_request(inputs={"history": history, "k": np.int32(2)}, **spec), timeout=10
        )
        assert response.model_spec.version.value == 1
        np.testing.assert_allclose(
            tf.make_ndarray(response.outputs["scores"]), expected(reference, 1, history, 2)["scores"]
        )
    response = shared.predict.Predict(
        predict_request(inputs=good_inputs(), output_filter=["scores"]), timeout=10
    )
    assert list(response.outputs) == ["scores"]
    # A request larger than max_batch_size (8) runs on its own (large batch splitting on).
    response = shared.predict.Predict(predict_request(inputs=good_inputs(12)), timeout=10)
    assert tf.make_ndarray(response.outputs["item_ids"]).shape == (12, 3)


def test_grpc_metadata_and_status(shared):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "tiny"
    request.metadata_field.append("signature_def")
    response = shared.predict.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == 2
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    serving_default = signature_map.signature_def["serving_default"]
    assert set(serving_default.inputs) == {"history", "k"}
    assert set(serving_default.outputs) == {"item_ids", "scores"}
    assert serving_default.inputs["history"].dtype == tf.int64.as_datatype_enum
    assert [d.size for d in serving_default.inputs["history"].tensor_shape.dim] == [-1, HIST]
    assert {"user_embedding", "echo", "slow"} <= set(signature_map.signature_def)

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "tiny"
    status = shared.models.GetModelStatus(status_request, timeout=10)
    states = {s.version: s.state for s in status.model_version_status}
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert states == {1: available, 2: available}
    status_request.model_spec.version.value = 1
    status = shared.models.GetModelStatus(status_request, timeout=10)
    assert [s.version for s in status.model_version_status] == [1]
    # The second model has the default policy: only the newest version.
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "other"
    status = shared.models.GetModelStatus(status_request, timeout=10)
    assert [(s.version, s.state) for s in status.model_version_status] == [(2, available)]


def test_rest_predict_row_and_columnar_formats(shared, reference):
    history = [[1, 2, 3, 0, 0], [7, 8, 0, 0, 0]]
    want = expected(reference, 2, np.array(history), 3)
    status, body = shared.rest("POST", "/v1/models/tiny:predict", {
        "instances": [{"history": h, "k": 3} for h in history]
    })
    assert status == 200, body
    assert [p["item_ids"] for p in body["predictions"]] == want["item_ids"].tolist()
    np.testing.assert_allclose([p["scores"] for p in body["predictions"]], want["scores"],
                               rtol=1e-6)

    status, body = shared.rest("POST", "/v1/models/tiny/versions/1:predict", {
        "signature_name": "serving_default", "inputs": {"history": history, "k": 3}
    })
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"]["scores"],
                               expected(reference, 1, np.array(history), 3)["scores"], rtol=1e-6)
    status, body = shared.rest("POST", "/v1/models/tiny/labels/stable:predict", {
        "inputs": {"history": history, "k": 1}
    })
    assert status == 200 and len(body["outputs"]["item_ids"][0]) == 1

    # A single input and a single output: unnamed on both sides, as TF Serving does.
    status, body = shared.rest("POST", "/v1/models/tiny:predict", {
        "signature_name": "user_embedding", "instances": history
    })
    assert status == 200, body
    assert np.asarray(body["predictions"]).shape == (2, DIM)
    status, columnar = shared.rest("POST", "/v1/models/tiny:predict", {
        "signature_name": "user_embedding", "inputs": history
    })
    assert status == 200 and columnar["outputs"] == body["predictions"]

    # Strings: JSON strings and {"b64": ...} in; text out, *_bytes outputs always base64.
    status, body = shared.rest("POST", "/v1/models/tiny:predict", {
        "signature_name": "echo",
        "instances": ["abc", {"b64": base64.b64encode(b"xy\xff").decode()}],
    })
    assert status == 200, body
    first, second = body["predictions"]
    assert first == {"upper": "ABC", "length": 3, "raw_bytes": {"b64": "YWJj"}}
    assert second["length"] == 3
    assert base64.b64decode(second["raw_bytes"]["b64"]) == b"xy\xff"
    assert second["upper"] == {"b64": base64.b64encode(b"XY\xff").decode()}  # not UTF-8

    # A signature without inputs is refused over REST, in TF Serving's words (json_tensor.cc);
    # gRPC calls it.
    status, body = shared.rest("POST", "/v1/models/tiny:predict", {
        "signature_name": "call_count", "inputs": {}
    })
    assert (status, body) == (400, {"error": "Failed to get input map for signature: call_count"})

    # The row format answers one prediction per entry of the outputs' first dimension, whatever
    # the number of instances (json_tensor.cc's MakeRowFormatJsonFromTensors).
    status, body = shared.rest("POST", "/v1/models/tiny:predict", {"signature_name": "stats", "instances": [1.5, 4]})
    assert (status, body) == (200, {"predictions": [{"stats": 1.5, "size": 2}, {"stats": 4.0, "size": 2},
                                                    {"stats": 5.5, "size": 2}]})

    # JSON numbers and base64 as TF Serving reads them (RapidJSON, absl::Base64Unescape).
    status, body = shared.rest("POST", "/v1/models/tiny:predict", {"signature_name": "echo",
                                                                   "inputs": [{"b64": "YWI"}, {"b64": " YW\nJj "}]})
    assert status == 200 and body["outputs"]["raw_bytes"] == [{"b64": "YWI="}, {"b64": "YWJj"}], body
    status, body = shared.rest("POST", "/v1/models/tiny:predict",
                               b'{"signature_name": "stats", "inputs": [100000000000000000000, 1]}')
    assert status == 200 and np.allclose(body["outputs"]["stats"], [1.0, 1e20, 1e20], rtol=1e-6), body
    status, body = shared.rest("POST", "/v1/models/tiny:predict", b'{"signature_name": "stats", "inputs": [1e400]}')
    assert status == 400 and "Number too big to be stored in double: 1e400" in body["error"], body


def test_rest_status_and_metadata(shared):
    status, body = shared.rest("GET", "/v1/models/tiny")
    assert status == 200
    # Newest first, as TF Serving lists them (a client reading [0] as the latest gets it).
    assert body["model_version_status"] == [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
    ]
    status, body = shared.rest("GET", "/v1/models/tiny/versions/1")
    assert status == 200 and [s["version"] for s in body["model_version_status"]] == ["1"]
    # TF Serving's GetModelStatus ignores a label: every version, even for a label it lacks.
    for label in ("canary", "no-such-label"):
        status, body = shared.rest("GET", f"/v1/models/tiny/labels/{label}")
        assert status == 200 and [s["version"] for s in body["model_version_status"]] == ["2", "1"]

    status, body = shared.rest("GET", "/v1/models/tiny/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["history"]["dtype"] == "DT_INT64"
    assert [d["size"] for d in signature["inputs"]["history"]["tensor_shape"]["dim"]] == ["-1", "5"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    # Fields at their default values are printed too, as TF Serving does: a scalar's shape.
    assert signature["inputs"]["k"]["tensor_shape"] == {"dim": [], "unknown_rank": False}
    status, body = shared.rest("GET", "/v1/models/tiny/metadata")
    assert status == 200 and body["model_spec"]["version"] == "2"


def test_client_module(shared, reference, capsys):
    target = f"127.0.0.1:{shared.server.grpc_port}"
    history = [[4, 5, 6, 0, 0]]
    with serving_client.ServingClient(target) as client:
        outputs, spec = client.predict(
            "tiny", {"history": history, "k": 2}, coerce=True, return_model_spec=True
        )
        assert spec.version.value == 2
        np.testing.assert_array_equal(
            outputs["item_ids"], expected(reference, 2, np.array(history), 2)["item_ids"]
        )
        metadata = client.metadata("tiny", version=1)
        assert metadata["model_spec"]["version"] == 1
        assert metadata["signatures"]["serving_default"]["inputs"]["history"] == {
            "dtype": "int64", "shape": [-1, HIST], "name": "serving_default_history:0"
        }
        assert [s["state"] for s in client.status("tiny")] == ["AVAILABLE", "AVAILABLE"]
        with pytest.raises(grpc.RpcError) as info:
            client.predict("tiny", {"history": history, "k": 9}, coerce=True)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert serving_client.main([
        "--server", target, "--model_name", "tiny", "--version_label", "stable",
        "--input", "history=[[4, 5, 6, 0, 0]]", "--input", "k=2",
    ]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["model_spec"]["version"] == 1
    assert answer["outputs"]["item_ids"] == expected(
        reference, 1, np.array(history), 2)["item_ids"].tolist()
    assert serving_client.main(["--server", target, "--model_name", "tiny", "--status"]) == 0
    assert "AVAILABLE" in capsys.readouterr().out
    assert serving_client.main(["--server", target, "--model_name", "nope", "--status"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad input: every case against both protocols; the server keeps serving afterwards.

H_OK = [[1, 2, 3, 0, 0]]
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

# (case id, gRPC request kwargs, REST path, REST body, gRPC code, HTTP status, message part)
BAD_REQUESTS = [
    ("unknown model", dict(model="nope", inputs=good_inputs()), "/v1/models/nope:predict",
     {"inputs": {"history": H_OK, "k": 3}}, NOT_FOUND, 404, "Servable not found"),
    ("unknown version", dict(version=7, inputs=good_inputs()), "/v1/models/tiny/versions/7:predict",
     {"inputs": {"history": H_OK, "k": 3}}, NOT_FOUND, 404, "Specific(tiny, 7)"),
    ("unknown label", dict(label="beta", inputs=good_inputs()), "/v1/models/tiny/labels/beta:predict",
     {"inputs": {"history": H_OK, "k": 3}}, INVALID, 400, "Unrecognized servable version label"),
    ("unknown model with a label", dict(model="nope", label="beta", inputs=good_inputs()),
     "/v1/models/nope/labels/beta:predict", {"inputs": {"history": H_OK, "k": 3}}, INVALID, 400,
     "Unrecognized servable version label: beta"),
    ("unknown signature", dict(signature="nope", inputs=good_inputs()), "/v1/models/tiny:predict",
     {"signature_name": "nope", "inputs": {"history": H_OK, "k": 3}}, grpc.StatusCode.FAILED_PRECONDITION, 400,
     'signature key "nope" not found'),
    ("missing input", dict(inputs={"history": good_inputs()["history"]}),
     "/v1/models/tiny:predict", {"inputs": {"history": H_OK}}, INVALID, 400, "Missing input(s) {k}"),
    ("unexpected input", dict(inputs={**good_inputs(), "extra": np.int32(1)}),
     "/v1/models/tiny:predict", {"inputs": {"history": H_OK, "k": 3, "extra": 1}}, INVALID, 400,
     "input tensor alias not found in signature: extra"),
    ("wrong dtype", dict(inputs={"history": np.ones((1, 5), np.float32), "k": np.int32(3)}),
     "/v1/models/tiny:predict", {"inputs": {"history": [[1.5, 2, 3, 0, 0]], "k": 3}}, INVALID, 400,
     "int64"),
    ("wrong dtype scalar", dict(inputs={"history": good_inputs()["history"], "k": np.int64(3)}),
     "/v1/models/tiny:predict", {"inputs": {"history": H_OK, "k": "three"}}, INVALID, 400, "'k'"),
    ("wrong rank", dict(inputs={"history": np.array([1, 2, 3, 0, 0]), "k": np.int32(3)}),
     "/v1/models/tiny:predict", {"inputs": {"history": [1, 2, 3, 0, 0], "k": 3}}, INVALID, 400,
     "must have rank 2"),
    ("wrong shape", dict(inputs={"history": np.array([[1, 2, 3, 0]]), "k": np.int32(3)}),
     "/v1/models/tiny:predict", {"inputs": {"history": [[1, 2, 3, 0]], "k": 3}}, INVALID, 400,
     "dimension 1 must be 5"),
    ("scalar given as vector", dict(inputs={"history": good_inputs()["history"],
                                            "k": np.array([3], np.int32)}),
     "/v1/models/tiny:predict", {"inputs": {"history": H_OK, "k": [3]}}, INVALID, 400,
     "input 'k' must have rank 0"),
    ("batch over limit", dict(inputs=good_inputs(17)), "/v1/models/tiny:predict",
     {"inputs": {"history": H_OK * 17, "k": 3}}, INVALID, 400, "exceeds the server's limit of 16"),
    ("empty history", dict(inputs={"history": np.zeros((1, 5), np.int64), "k": np.int32(3)}),
     "/v1/models/tiny:predict", {"inputs": {"history": [[0] * 5], "k": 3}}, INVALID, 400,
     "empty history"),
    ("id outside vocabulary", dict(inputs={"history": np.array([[1, 2, 999, 0, 0]]),
                                           "k": np.int32(3)}),
     "/v1/models/tiny:predict", {"inputs": {"history": [[1, 2, 999, 0, 0]], "k": 3}}, INVALID, 400,
     "outside the vocabulary"),
    ("negative id", dict(inputs={"history": np.array([[1, -2, 0, 0, 0]]), "k": np.int32(3)}),
     "/v1/models/tiny:predict", {"inputs": {"history": [[1, -2, 0, 0, 0]], "k": 3}}, INVALID, 400,
     "item ids must be >= 0"),
    ("k zero", dict(inputs={**good_inputs(), "k": np.int32(0)}), "/v1/models/tiny:predict",
     {"inputs": {"history": H_OK, "k": 0}}, INVALID, 400, "k must be > 0"),
    ("k over k_max", dict(inputs={**good_inputs(), "k": np.int32(K_MAX + 1)}),
     "/v1/models/tiny:predict", {"inputs": {"history": H_OK, "k": K_MAX + 1}}, INVALID, 400,
     "k must be <= k_max"),
    ("empty request", dict(model=""), "/v1/models/tiny:predict", b"", INVALID, 400, ""),
    ("no inputs", dict(), "/v1/models/tiny:predict", {}, INVALID, 400, ""),
]


@pytest.mark.parametrize(
    "case", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_requests_on_both_protocols(shared, case):
    _, grpc_kwargs, path, body, code, http_status, message = case
    with pytest.raises(grpc.RpcError) as info:
        shared.predict.Predict(predict_request(**grpc_kwargs), timeout=10)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()

    status, answer = shared.rest("POST", path, body)
    assert status == http_status, answer
    assert set(answer) == {"error"} and message in answer["error"], answer

    # ... and the server keeps serving.
    response = shared.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
    assert tf.make_ndarray(response.outputs["item_ids"]).shape == (1, 3)


def test_bad_requests_protocol_specific(shared):
    def grpc_code(call, request):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        return info.value.code(), info.value.details()

    # Oversized messages: gRPC's own limit answers RESOURCE_EXHAUSTED; REST answers 413.
    big = {"history": np.ones((GRPC_LIMIT // 40 + 10, 5), np.int64), "k": np.int32(3)}
    code, details = grpc_code(shared.predict.Predict, predict_request(inputs=big))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    status, answer = shared.rest("POST", "/v1/models/tiny:predict",
                                 b'{"inputs": {"history": [' + b"[1,2,3,4,5]," * 30000 + b"]}}")
    assert status == 413 and "exceeds the limit" in answer["error"]

    # Malformed payloads.
    request = predict_request(inputs=good_inputs())
    request.inputs["history"].tensor_content = b"\x00" * 7
    code, details = grpc_code(shared.predict.Predict, request)
    assert code == INVALID and "tensor parsing error" in details
    for body, message in [
        (b'{"instances": [', "Malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"instances": [], "inputs": {}}', "both"),
        (b'{"instances": []}', "empty"),
        (b'{"signature_name": 3, "instances": [1]}', "'signature_name' key must be a string"),
        (json.dumps({"instances": [{"history": H_OK[0], "k": 2},
                                   {"history": H_OK[0], "k": 3}]}).encode(), "same value"),
        (json.dumps({"inputs": {"history": [[1, 2, 3, 0, 0], [1, 2]], "k": 3}}).encode(),
         "rectangular"),
        (json.dumps({"signature_name": "echo", "inputs": [{"b64": "!!"}]}).encode(),
         "not valid base64"),
        (json.dumps({"signature_name": "echo", "inputs": [1, 2]}).encode(),
         "expects string values"),
        (json.dumps({"inputs": {"history": [[1, 2, 3, 0, 2 ** 40]], "k": 2 ** 40}}).encode(),
         "outside the range of int32"),
    ]:
        status, answer = shared.rest("POST", "/v1/models/tiny:predict", body)
        assert status == 400 and message in answer["error"], (body, answer)

    code, details = grpc_code(shared.predict.Predict,
                              predict_request(inputs=good_inputs(), output_filter=["nope"]))
    assert code == INVALID and "output tensor alias not found" in details

    metadata_request = get_model_metadata_pb2.GetModelMetadataRequest()
    metadata_request.model_spec.name = "tiny"
    code, details = grpc_code(shared.predict.GetModelMetadata, metadata_request)
    assert code == INVALID and "metadata_field" in details
    metadata_request.metadata_field.append("nope")
    code, details = grpc_code(shared.predict.GetModelMetadata, metadata_request)
    assert code == INVALID and "Metadata field nope is not supported" in details

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "nope"
    code, _ = grpc_code(shared.models.GetModelStatus, status_request)
    assert code == NOT_FOUND
    status_request.model_spec.name = "tiny"
    status_request.model_spec.version.value = 9
    code, details = grpc_code(shared.models.GetModelStatus, status_request)
    assert code == NOT_FOUND and "Could not find version 9" in details

    # Classify, Regress and MultiInference as TF Serving answers them for a predict-only model:
    # they once answered UNIMPLEMENTED (a 5xx class that proxies retry) whatever the model.
    empty = classification_pb2.ClassificationRequest()
    assert grpc_code(shared.predict.Classify, empty) == grpc_code(shared.predict.Predict, predict_pb2.PredictRequest())
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "nope"
    assert grpc_code(shared.predict.Classify, classify)[0] == NOT_FOUND
    classify.model_spec.name = "tiny"
    code, details = grpc_code(shared.predict.Classify, classify)
    # TF Serving's words (classifier.cc, regressor.cc, multi_inference.cc).
    assert code == INVALID and details.startswith("Expected classification signature method_name to be "
                                                  "tensorflow/serving/classify. Was: tensorflow/serving/predict")
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "tiny"
    regress.model_spec.signature_name = "serving_default"
    code, details = grpc_code(shared.predict.Regress, regress)
    assert code == INVALID and "Expected regression signature method_name" in details and "'serving_default'" in details
    regress.model_spec.signature_name = "nope"
    assert grpc_code(shared.predict.Regress, regress) == (INVALID, "No signature was found with the name: nope")
    multi = inference_pb2.MultiInferenceRequest()
    assert grpc_code(shared.predict.MultiInference, multi) == (INVALID, "Expected at least one task")
    task = multi.tasks.add()
    task.model_spec.name, task.method_name = "tiny", "tensorflow/serving/classify"
    code, details = grpc_code(shared.predict.MultiInference, multi)
    assert code == INVALID and "Expected classification signature method_name" in details
    task.method_name = "tensorflow/serving/predict"
    assert grpc_code(shared.predict.MultiInference, multi) == (
        grpc.StatusCode.UNIMPLEMENTED, "Unsupported signature method_name: tensorflow/serving/predict")

    assert shared.rest("GET", "/v1/models/nope")[0] == 404
    assert shared.rest("GET", "/v1/models/tiny/versions/9/metadata")[0] == 404
    # An unknown model or version is a 404 whatever the body holds: TF Serving looks the model
    # up before it reads the body's tensors.
    for path, body in [("/v1/models/nope:predict", {}), ("/v1/models/nope:predict", {"instances": [1], "inputs": [1]}),
                       ("/v1/models/tiny/versions/9:predict", {})]:
        assert shared.rest("POST", path, body)[0] == 404, (path, body)
    # TF Serving's HTTP server dispatches only /v1/ paths: any other is a 404 (http_server.cc).
    for path in ["/v2/whatever", "/", "/v1", "/models/tiny"]:
        assert shared.rest("GET", path)[0] == 404, path
    # Under /v1/ (http_rest_api_handler.cc), any other path or method is a 400 "Malformed
    # request", which a client cannot mistake for "this model is not loaded".
    for method, path in [("GET", "/v1/whatever"), ("GET", "/v1/models/tiny:predict"),
                         ("POST", "/v1/models/tiny/metadata"), ("DELETE", "/v1/models/tiny"),
                         ("GET", "/v1/models/tiny/"), ("GET", f"/v1/models/tiny/versions/{1 << 64}")]:
        status, answer = shared.rest(method, path, {} if method == "POST" else None)
        assert status == 400 and answer["error"].startswith("Malformed request"), (method, path, answer)
    assert shared.rest("GET", "/v1/models") == (400, {"error": "Missing model name in request."})
    assert shared.rest("GET", "/V1/Models/tiny/Metadata")[0] == 200  # paths match case-insensitively
    status, answer = shared.rest("POST", "/v1/models/tiny:classify", {"examples": []})
    assert status == 400 and "Expected classification signature method_name" in answer["error"]
    assert shared.rest("POST", "/v1/models/tiny:regress", {"examples": []})[0] == 400
    assert shared.rest("POST", "/v1/models/nope:classify", {"examples": []})[0] == 404
    status, answer = shared.rest("POST", "/v1/models/tiny:classify", {"instances": []})
    assert status == 400 and "Missing 'examples' key" in answer["error"]

    response = shared.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
    assert response.model_spec.version.value == 2


# --------------------------------------------------------------------------------------------
# Batching


def test_batching_merges_concurrent_requests_and_splits_answers(templates, reference, tmp_path):
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    # A long timeout so that concurrent requests are certain to meet in one batch.
    server = start_server(
        base, rest_port=None, enable_batching=True,
        batching=BatchingOptions(max_batch_size=16, batch_timeout_micros=300_000),
    )
    clients = Clients(server)
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(12):
        rows = 1 + i % 3
        history = rng.integers(1, VOCAB, size=(rows, HIST)).astype(np.int64)
        k = 2 if i % 2 else 3
        jobs.append((history, k))
    jobs.append((np.array([[1, 2, 999, 0, 0]]), 3))  # fails alone, not its batch
    barrier = threading.Barrier(len(jobs))

    def call(job):
        history, k = job
        barrier.wait(timeout=10)
        request = predict_request(inputs={"history": history, "k": np.int32(k)})
        try:
            return clients.predict.Predict(request, timeout=20)
        except grpc.RpcError as error:
            return error

    try:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(call, jobs))
        for (history, k), result in zip(jobs[:-1], results[:-1]):
            assert not isinstance(result, grpc.RpcError), result.details()
            want = expected(reference, 1, history, k)
            np.testing.assert_array_equal(tf.make_ndarray(result.outputs["item_ids"]),
                                          want["item_ids"])
            np.testing.assert_allclose(tf.make_ndarray(result.outputs["scores"]), want["scores"])
        assert isinstance(results[-1], grpc.RpcError)
        assert results[-1].code() == INVALID and "outside the vocabulary" in results[-1].details()

        stats = server.batcher.stats
        assert stats.requests == len(jobs)
        assert stats.batches < len(jobs)  # merged
        assert stats.batches >= 2  # k=2 and k=3 never share a batch
        calls = clients.predict.Predict(predict_request(signature="call_count"), timeout=10)
        # The model itself ran fewer times than it got requests (re-runs after the bad request's
        # batch failed included).
        assert int(tf.make_ndarray(calls.outputs["calls"])) < len(jobs)
    finally:
        clients.close()
        server.stop(grace=5)


def test_batching_disabled_calls_once_per_request(templates, tmp_path):
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    server = start_server(base, rest_port=None, enable_batching=False)
    clients = Clients(server)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: clients.predict.Predict(
                predict_request(inputs=good_inputs()), timeout=10), range(8)))
        calls = clients.predict.Predict(predict_request(signature="call_count"), timeout=10)
        assert int(tf.make_ndarray(calls.outputs["calls"])) == 8
        assert server.batcher is None
    finally:
        clients.close()
        server.stop(grace=5)


# --------------------------------------------------------------------------------------------
# Versions: hot swap under load, corrupt versions, graceful shutdown


def test_hot_swap_under_load_drops_nothing(templates, tmp_path):
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    server = start_server(
        base, enable_batching=True,
        batching=BatchingOptions(max_batch_size=8, batch_timeout_micros=1000),
    )
    clients = Clients(server)
    seen, failures, counts = set(), [], [0]
    lock = threading.Lock()
    swapped = threading.Event()
    deadline = time.monotonic() + 40

    def worker(index):
        done_after_swap = 0
        made = 0
        while made < 2000 and time.monotonic() < deadline:
            made += 1
            time.sleep(0.01)  # a steady, light load: this machine is shared
            try:
                if index % 2:
                    response = clients.predict.Predict(
                        predict_request(inputs=good_inputs(1 + index)), timeout=10)
                    version = response.model_spec.version.value
                else:
                    status, body = clients.rest("POST", "/v1/models/tiny:predict", {
                        "inputs": {"history": H_OK * (1 + index), "k": 2}})
                    if status != 200:
                        raise RuntimeError(body)
                    version = 2 if body["outputs"]["scores"][0][0] > 150 else 1
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                with lock:
                    failures.append(repr(exc))
                continue
            with lock:
                seen.add(version)
                counts[0] += 1
            if swapped.is_set() and version == 2:
                done_after_swap += 1
                if done_after_swap >= 10:
                    return

    # A slow request on version 1 is in flight across the swap, and must still succeed.
    slow_result = {}

    def slow_call():
        request = predict_request(
            signature="slow", version=1,
            inputs={"micros": np.int64(1_000_000), "x": np.ones(3, np.float32)})
        slow_result["response"] = clients.predict.Predict(request, timeout=30)

    try:
        slow = threading.Thread(target=slow_call)
        slow.start()
        wait_for_requests_in(server, 1, 1)  # before the load, so the one holder is the slow call
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        first_answers_by = time.monotonic() + 20  # not `deadline`, the workers' own
        while counts[0] < 8:  # some answers from version 1 before version 2 arrives
            assert time.monotonic() < first_answers_by and not failures, failures[:3]
            time.sleep(0.01)
        install_version(templates, base, 2)
        assert server.manager.wait_until_available("tiny", 2, timeout=20)
        swapped.set()
        for t in threads:
            t.join(timeout=60)
        slow.join(timeout=30)
        assert not failures, failures[:3]
        assert seen == {1, 2}
        assert counts[0] >= 20
        assert slow_result["response"].model_spec.version.value == 1
        np.testing.assert_array_equal(tf.make_ndarray(slow_result["response"].outputs["y"]), 2.0)
        # Version 1 is unloaded once nothing uses it (latest-only policy).
        assert wait_for_states(server, {1: "END", 2: "AVAILABLE"})
    finally:
        clients.close()
        server.stop(grace=5)


def test_latest_two_versions_kept(templates, tmp_path):
    from tfx_xmatch.serving.model_manager import ModelConfig, VersionPolicy

    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    install_version(templates, base, 2)
    server = start_server([ModelConfig("tiny", base, VersionPolicy("latest", num_versions=2))],
                          rest_port=None)
    clients = Clients(server)
    try:
        for version in (1, 2):
            response = clients.predict.Predict(
                predict_request(inputs=good_inputs(), version=version), timeout=10)
            assert response.model_spec.version.value == version
        install_version(templates, base, 3)
        assert wait_for_states(server, {1: "END", 2: "AVAILABLE", 3: "AVAILABLE"})
        response = clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
        assert response.model_spec.version.value == 3
        with pytest.raises(grpc.RpcError) as info:
            clients.predict.Predict(predict_request(inputs=good_inputs(), version=1), timeout=10)
        assert info.value.code() == NOT_FOUND
    finally:
        clients.close()
        server.stop(grace=5)


def test_a_base_path_gone_for_a_moment_keeps_its_versions_serving(templates, tmp_path):
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    server = start_server(base, rest_port=None)
    clients = Clients(server)
    try:
        os.rename(base, base + ".away")  # a remount or a swapped symlink, as TF Serving tolerates
        server.manager.poll_once()
        assert {s.version: s.state for s in server.manager.status("tiny")} == {1: "AVAILABLE"}
        assert server.manager.get_model("tiny").last_scan_error == f"model base path {base} does not exist"
        response = clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
        assert response.model_spec.version.value == 1
        os.rename(base + ".away", base)
        shutil.rmtree(os.path.join(base, "1"))  # a version removed from a listable path does retire
        assert wait_for_states(server, {1: "END"})
    finally:
        clients.close()
        server.stop(grace=5)


def _copy_to_url(source: str, target: str) -> None:
    """Copies a local directory tree to a TensorFlow file system URL."""
    for root, _, files in os.walk(source):
        relative = os.path.relpath(root, source)
        directory = target if relative == "." else f"{target}/{relative}"
        tf.io.gfile.makedirs(directory)
        for name in files:
            tf.io.gfile.copy(os.path.join(root, name), f"{directory}/{name}", overwrite=True)


def test_a_base_path_and_a_config_file_on_a_tensorflow_file_system_are_served_and_polled(templates, reference,
                                                                                          tmp_path):
    """ram:// stands in for gs:// and s3://, which TF Serving serves from. Both paths were made
    local ("gs://b/m" became "<cwd>/gs:/b/m", which never appeared): nothing was served, though
    `xmatch pipeline run` tells the user to serve its gs:// export with `xmatch serve`."""
    root = f"ram://serving-{tmp_path.name}"
    base = f"{root}/tiny"
    args = build_parser().parse_args(["--model_name=tiny", f"--model_base_path={base}"])
    assert [config.base_path for config in options_from_args(args).model_configs] == [base]
    with tf.io.gfile.GFile(f"{root}/models.config", "w") as handle:
        handle.write(f'model_config_list {{ config {{ name: "tiny" base_path: "{base}" }} }}')
    args = build_parser().parse_args([f"--model_config_file={root}/models.config"])
    configs = options_from_args(args).model_configs
    assert [config.base_path for config in configs] == [base]

    server = start_server(configs, rest_port=None)  # no version yet: the base path does not exist
    clients = Clients(server)
    try:
        assert server.manager.get_model("tiny").last_scan_error == f"model base path {base} does not exist"
        _copy_to_url(templates[1], f"{base}/1")
        server.manager.poll_once()
        assert wait_for_states(server, {1: "AVAILABLE"})
        response = clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
        assert response.model_spec.version.value == 1
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs["item_ids"]),
                                      expected(reference, 1, good_inputs()["history"], 3)["item_ids"])
        _copy_to_url(templates[2], f"{base}/2")  # a new version is picked up, the old one retired
        assert wait_for_states(server, {1: "END", 2: "AVAILABLE"})
        assert clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=10).model_spec.version.value == 2
    finally:
        clients.close()
        server.stop(grace=5)
        tf.io.gfile.rmtree(root)


def test_corrupt_new_version_keeps_the_old_one_serving(templates, tmp_path):
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    server = start_server(base)
    clients = Clients(server)
    try:
        os.makedirs(os.path.join(base, ".tmp-2"))
        with open(os.path.join(base, ".tmp-2", "saved_model.pb"), "wb") as f:
            f.write(b"this is not a SavedModel")
        os.rename(os.path.join(base, ".tmp-2"), os.path.join(base, "2"))
        os.makedirs(os.path.join(base, "not-a-version"))

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "tiny"
        for _ in range(200):
            status = clients.models.GetModelStatus(request, timeout=10)
            by_version = {s.version: s for s in status.model_version_status}
            if 2 in by_version and by_version[2].state == by_version[2].END:
                break
            time.sleep(0.05)
        failed = by_version[2]
        assert failed.state == get_model_status_pb2.ModelVersionStatus.END
        assert failed.status.error_code == grpc.StatusCode.DATA_LOSS.value[0]
        assert "saved_model.pb" in failed.status.error_message
        assert by_version[1].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert set(by_version) == {1, 2}

        response = clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
        assert response.model_spec.version.value == 1
        status_code, body = clients.rest("GET", "/v1/models/tiny/versions/2")
        assert status_code == 200
        assert body["model_version_status"][0]["state"] == "END"
        assert body["model_version_status"][0]["status"]["error_code"] == "DATA_LOSS"
        assert "not a valid SavedModel" in body["model_version_status"][0]["status"]["error_message"]

        # Repairing the directory makes the server retry it.
        shutil.rmtree(os.path.join(base, "2"))
        install_version(templates, base, 2)
        assert server.manager.wait_until_available("tiny", 2, timeout=20)
        response = clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
        assert response.model_spec.version.value == 2
    finally:
        clients.close()
        server.stop(grace=5)


def test_graceful_shutdown_finishes_in_flight_requests(templates, tmp_path):
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    server = start_server(base)
    clients = Clients(server)
    results = {}

    def grpc_slow():
        request = predict_request(signature="slow", inputs={
            "micros": np.int64(500_000), "x": np.array([1.0, 2.0], np.float32)})
        results["grpc"] = clients.predict.Predict(request, timeout=30)

    def rest_slow():
        results["rest"] = clients.rest("POST", "/v1/models/tiny:predict", {
            "signature_name": "slow", "inputs": {"micros": 500_000, "x": [3.0]}})

    threads = [threading.Thread(target=grpc_slow), threading.Thread(target=rest_slow)]
    for t in threads:
        t.start()
    wait_for_requests_in(server, 1, 2)
    started = time.monotonic()
    server.stop(grace=10)
    assert time.monotonic() - started >= 0.3  # it waited for them (each sleeps 2 x 0.5 s)
    for t in threads:
        t.join(timeout=30)
    assert tf.make_ndarray(results["grpc"].outputs["y"]).tolist() == [2.0, 4.0]
    assert results["rest"] == (200, {"outputs": [6.0]})
    with pytest.raises(grpc.RpcError) as info:
        clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}/v1/models/tiny", timeout=2)
    clients.close()


def test_a_server_starts_once_and_a_stopped_one_keeps_no_grpc_threads(templates, tmp_path):
    """start() after stop() listened on new ports and served nothing (the stop had ended its model
    manager), and a stopped server still referenced kept its gRPC worker threads."""
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    before = set(threading.enumerate())
    server = start_server(base, rest_port=None)
    clients = Clients(server)
    try:
        clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
        with pytest.raises(RuntimeError, match="already started and is running"):
            server.start()
    finally:
        clients.close()
        server.stop(grace=1)
    with pytest.raises(RuntimeError, match="already started and is stopped; .* create a new ModelServer"):
        server.start()

    def grpc_threads_of_this_server():
        return [t for t in threading.enumerate() if t.name.startswith("serving-grpc") and t not in before]

    deadline = time.monotonic() + 5
    while grpc_threads_of_this_server() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert grpc_threads_of_this_server() == []


def _write_warmup(path, k):
    from tensorflow_serving.apis import prediction_log_pb2

    os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.CopyFrom(
        predict_request(inputs={"history": np.array([[1, 2, 0, 0, 0]]), "k": np.int32(k)}))
    with tf.io.TFRecordWriter(os.path.join(path, "assets.extra",
                                           "tf_serving_warmup_requests")) as writer:
        for _ in range(2):
            writer.write(log.SerializeToString())


def test_rest_connections_past_the_queue_get_503_at_once(templates, tmp_path):
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    server = start_server(base, grpc_port=None, rest_num_threads=1, rest_max_queued_connections=0)
    try:
        slow = {"signature_name": "slow", "inputs": {"micros": 1_500_000, "x": [3.0]}}
        busy = threading.Thread(target=rest, args=(server.rest_port, "POST", "/v1/models/tiny:predict", slow))
        busy.start()
        deadline = time.monotonic() + 10
        while server.rest_server.in_flight < 1:  # until the one thread is busy with it
            assert time.monotonic() < deadline, "the slow request never started"
            time.sleep(0.02)
        started = time.monotonic()
        status, body = rest(server.rest_port, "GET", "/v1/models/tiny")
        assert status == 503 and "overloaded" in body["error"]
        assert time.monotonic() - started < 1.0  # answered at once, not after the slow request
        # A client that had sent nothing yet got a bare end of stream: the server's wait for its
        # request timed out, and that skipped the answer.
        import socket

        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=5) as quiet:
            assert quiet.recv(1 << 16).startswith(b"HTTP/1.1 503 Service Unavailable")
        busy.join(timeout=10)
        # The slot frees when the server's worker finishes, a moment after the client has its answer.
        deadline = time.monotonic() + 10
        while rest(server.rest_port, "GET", "/v1/models/tiny")[0] != 200:
            assert time.monotonic() < deadline, "the server still refuses once the slow request is done"
            time.sleep(0.05)
    finally:
        server.stop(grace=5)


def test_idle_and_slow_rest_connections_hold_no_worker_and_are_cut_off_at_the_deadline(templates, tmp_path):
    """Sixteen connections that sent nothing (or a byte now and then) held all sixteen REST
    threads: other clients waited out the 30 s timeout, and a client sending a byte within
    each timeout held its thread without limit."""
    import socket

    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    server = start_server(base, grpc_port=None, rest_num_threads=1, rest_timeout_seconds=2.0)
    idle = [socket.create_connection(("127.0.0.1", server.rest_port)) for _ in range(4)]
    dripping = socket.create_connection(("127.0.0.1", server.rest_port))
    try:
        dripping.sendall(b"GET /v1/models/tiny HTTP/1.1\r\n")
        started = time.monotonic()
        assert rest(server.rest_port, "GET", "/v1/models/tiny", timeout=10)[0] == 200
        assert time.monotonic() - started < 1.9  # served before any deadline ran out, not after
        for _ in range(30):  # a header byte every 0.2 s: each read is quick, the request never ends
            try:
                dripping.sendall(b"X")
            except OSError:
                break
            time.sleep(0.2)
        dripping.settimeout(5)
        assert dripping.recv(1024) == b""  # cut off at its 2 s deadline
        assert time.monotonic() - started < 5.5
        for connection in idle:
            connection.settimeout(5)
            assert connection.recv(1024) == b""  # so were the idle ones
        # Limits of the request line and headers answer in JSON, as every other error.
        with socket.create_connection(("127.0.0.1", server.rest_port)) as long_header:
            long_header.sendall(b"GET /v1/models/tiny HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n")
            long_header.settimeout(5)
            answer = b""
            while chunk := long_header.recv(65536):
                answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.0 431") and b"application/json" in head
        assert json.loads(body) == {"error": "Line too long"}
        # A stop does not wait its grace for a connection that sent no request.
        late = socket.create_connection(("127.0.0.1", server.rest_port))
        time.sleep(0.2)
        started = time.monotonic()
        server.stop(grace=20)
        assert time.monotonic() - started < 10
        late.close()
    finally:
        for connection in (*idle, dripping):
            connection.close()
        server.stop(grace=1)


def test_warmup_requests_run_before_a_version_serves(templates, tmp_path):
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    _write_warmup(os.path.join(base, "1"), k=2)
    server = start_server(base, rest_port=None)
    clients = Clients(server)
    try:
        calls = clients.predict.Predict(predict_request(signature="call_count"), timeout=10)
        assert int(tf.make_ndarray(calls.outputs["calls"])) == 2  # the two warm-up records
        # A version whose warm-up fails is not served; the old one stays.
        tmp = os.path.join(base, ".tmp-2")
        shutil.copytree(templates[2], tmp)
        _write_warmup(tmp, k=0)
        os.rename(tmp, os.path.join(base, "2"))
        for _ in range(200):
            statuses = {s.version: s for s in server.manager.status("tiny")}
            if 2 in statuses and statuses[2].state == "END":
                break
            time.sleep(0.05)
        assert statuses[2].state == "END" and "warm-up request 0 failed" in statuses[2].error_message
        assert "k must be > 0" in statuses[2].error_message
        response = clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
        assert response.model_spec.version.value == 1
        # A damaged warm-up file fails the load as DATA_LOSS, naming the file (TF named none).
        tmp = os.path.join(base, ".tmp-3")
        shutil.copytree(templates[2], tmp)
        _write_warmup(tmp, k=2)
        warmup_file = os.path.join(tmp, "assets.extra", "tf_serving_warmup_requests")
        with open(warmup_file, "r+b") as f:
            f.truncate(os.path.getsize(warmup_file) - 3)
        os.rename(tmp, os.path.join(base, "3"))
        wait_for_states(server, {1: "AVAILABLE", 2: "END", 3: "END"})
        failed = {s.version: s for s in server.manager.status("tiny")}[3]
        assert failed.error_code == grpc.StatusCode.DATA_LOSS
        named = os.path.join(base, "3", "assets.extra", "tf_serving_warmup_requests")
        assert f"warm-up file {named}: truncated record at" in failed.error_message
        assert "function_node" not in failed.error_message and "[Op:" not in failed.error_message
    finally:
        clients.close()
        server.stop(grace=5)


def test_model_config_reload(templates, tmp_path):
    from tensorflow_serving.apis import model_management_pb2
    from tensorflow_serving.config import model_server_config_pb2

    base_a, base_b = str(tmp_path / "a"), str(tmp_path / "b")
    install_version(templates, base_a, 1)
    install_version(templates, base_b, 2)
    config_file = tmp_path / "models.config"
    one = f'model_config_list {{ config {{ name: "a" base_path: "{base_a}" }} }}'
    config_file.write_text(one)
    server = start_server(
        parse_model_config_text(one), rest_port=None,
        model_config_file=str(config_file), model_config_file_poll_wait_seconds=0.1,
    )
    clients = Clients(server)
    try:
        # The config file is polled: adding model "b" to it serves "b".
        config_file.write_text(
            one[:-2] + f' config {{ name: "b" base_path: "{base_b}" }} }}')
        assert server.manager.wait_until_available("b", 2, timeout=20)
        response = clients.predict.Predict(predict_request("b", inputs=good_inputs()), timeout=10)
        assert response.model_spec.version.value == 2

        # HandleReloadConfigRequest installs a config and loads it before answering.
        request = model_management_pb2.ReloadConfigRequest()
        config = request.config.model_config_list.config.add()
        config.name, config.base_path = "c", base_b
        answer = clients.models.HandleReloadConfigRequest(request, timeout=30)
        assert answer.status.error_code == 0
        response = clients.predict.Predict(predict_request("c", inputs=good_inputs()), timeout=10)
        assert response.model_spec.version.value == 2
        with pytest.raises(grpc.RpcError) as info:  # "a" is no longer configured
            clients.predict.Predict(predict_request("a", inputs=good_inputs()), timeout=10)
        assert info.value.code() == NOT_FOUND
        request = model_management_pb2.ReloadConfigRequest()
        request.config.CopyFrom(model_server_config_pb2.ModelServerConfig())
        bad = request.config.model_config_list.config.add()
        bad.name, bad.base_path, bad.model_platform = "d", base_b, "pytorch"
        answer = clients.models.HandleReloadConfigRequest(request, timeout=30)
        assert answer.status.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "model_platform" in answer.status.error_message
    finally:
        clients.close()
        server.stop(grace=5)


# --------------------------------------------------------------------------------------------
# Configuration and the command line


def test_config_parsing(tmp_path):
    configs = parse_model_config_text("""
        model_config_list {
          config { name: "a" base_path: "/models/a" model_platform: "tensorflow"
                   model_version_policy { specific { versions: 3 versions: 5 } }
                   version_labels { key: "stable" value: 3 } }
          config { name: "b" base_path: "/models/b"
                   model_version_policy { latest { num_versions: 2 } } }
        }""")
    a, b = configs
    assert a.version_policy.select({1, 3, 4, 5}) == {3, 5} and a.labels == {"stable": 3}
    assert b.version_policy.select({1, 2, 3}) == {2, 3}
    with pytest.raises(ValueError, match="model_platform"):
        parse_model_config_text(
            'model_config_list { config { name: "a" base_path: "/a" model_platform: "onnx" } }')
    with pytest.raises(ValueError, match="twice"):
        parse_model_config_text('model_config_list { config { name: "a" base_path: "/a" } '
                                'config { name: "a" base_path: "/b" } }')

    options = parse_batching_parameters(
        "max_batch_size { value: 32 } batch_timeout_micros { value: 500 } "
        "num_batch_threads { value: 3 } max_enqueued_batches { value: 7 } "
        "allowed_batch_sizes: 8 allowed_batch_sizes: 32 pad_variable_length_inputs: true")
    assert (options.max_batch_size, options.batch_timeout_micros, options.num_batch_threads,
            options.max_enqueued_batches, options.allowed_batch_sizes) == (32, 500, 3, 7, (8, 32))

    args = build_parser().parse_args([
        "--model_name", "m", "--model_base_path", str(tmp_path), "--port", "8500",
        "--rest_api_port", "8501", "--file_system_poll_wait_seconds", "2", "--enable_batching",
        "--max_batch_size", "64", "--batch_timeout_micros", "2000",
    ])
    options = options_from_args(args)
    assert options.enable_batching and options.batching.max_batch_size == 64
    assert options.batching.batch_timeout_micros == 2000
    assert (options.grpc_port, options.rest_port) == (8500, 8501)
    assert options.model_configs[0].base_path == str(tmp_path)
    with pytest.raises(ValueError):
        options_from_args(build_parser().parse_args(["--port", "1"]))
    # As TF Serving: a base path alone serves the model "default".
    alone = options_from_args(build_parser().parse_args(["--model_base_path", str(tmp_path)]))
    assert alone.model_configs[0].name == "default"
    assert (options.tensorflow_intra_op_parallelism, options.tensorflow_inter_op_parallelism) == (0, 0)
    threads = options_from_args(build_parser().parse_args([
        "--model_name", "m", "--model_base_path", str(tmp_path),
        "--tensorflow_intra_op_parallelism", "1", "--tensorflow_inter_op_parallelism", "2"]))
    assert (threads.tensorflow_intra_op_parallelism, threads.tensorflow_inter_op_parallelism) == (1, 2)
    with pytest.raises(ValueError, match="--tensorflow_intra_op_parallelism must be >= 0.*-1"):
        options_from_args(build_parser().parse_args([
            "--model_name", "m", "--model_base_path", str(tmp_path), "--tensorflow_intra_op_parallelism", "-1"]))


def test_thread_pools_are_sized_before_tensorflow_starts():
    # A fresh process, as `xmatch serve` is: the pools do not exist yet, so the flags take effect.
    code = ("from tfx_xmatch.serving.server import set_tensorflow_threads; import tensorflow as tf; "
            "set_tensorflow_threads(1, 2); tf.constant(1.0) + 1.0; "
            "print(tf.config.threading.get_intra_op_parallelism_threads(), "
            "tf.config.threading.get_inter_op_parallelism_threads())")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["1", "2"]


def test_thread_pools_that_already_exist_are_not_resized_silently():
    import tensorflow as tf
    from tfx_xmatch.serving.server import set_tensorflow_threads

    tf.constant(1.0) + 1.0  # the pools of this test process now exist
    set_tensorflow_threads(0, 0)  # the defaults: nothing to change
    current = tf.config.threading.get_intra_op_parallelism_threads()
    with pytest.raises(ValueError, match=f"--tensorflow_intra_op_parallelism={current + 7}: .*already exist"):
        set_tensorflow_threads(current + 7, 0)
    assert tf.config.threading.get_intra_op_parallelism_threads() == current
    with pytest.raises(ValueError, match="--tensorflow_inter_op_parallelism must be >= 0"):
        set_tensorflow_threads(0, -3)


def test_cli_serves_until_sigterm(templates, tmp_path, reference):
    base = str(tmp_path / "tiny")
    install_version(templates, base, 3)
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "tiny" base_path: "{base}" '
                      'model_platform: "tensorflow" } }')
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 } batch_timeout_micros { value: 1000 }")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT)
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys, tfx_xmatch.serving.server as s; sys.exit(s.main(sys.argv[1:]))",
         "--model_config_file", str(config), "--port", "0", "--enable_batching",
         "--batching_parameters_file", str(batching), "--file_system_poll_wait_seconds", "1",
         "--tensorflow_intra_op_parallelism", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT, env=env,
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            if line.startswith("serving gRPC on "):
                port = int(line.rsplit(":", 1)[1])
                break
        assert port, "the server did not start"
        with serving_client.ServingClient(f"127.0.0.1:{port}") as client:
            outputs, spec = client.predict("tiny", good_inputs(2), return_model_spec=True)
        assert spec.version.value == 3
        np.testing.assert_allclose(
            outputs["scores"], expected(reference, 3, good_inputs(2)["history"], 3)["scores"])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "server stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_tiny_tensor_proto_cannot_expand_past_the_byte_limit():
    from tfx_xmatch.serving import codec
    from tfx_xmatch.serving.errors import ServingError
    from tfx_xmatch.serving.model_manager import TensorSpecInfo

    spec = TensorSpecInfo("x", tf.int64, (None, None))
    # One int64 value declared as [4096, 4096]: 17 bytes that TF would expand to 128 MiB.
    proto = tf.make_tensor_proto([7], dtype=tf.int64)
    proto.tensor_shape.Clear()
    for size in (4096, 4096):
        proto.tensor_shape.dim.add(size=size)
    with pytest.raises(ServingError, match=r"input 'x' of shape \[4096,4096\] would expand to 134217728 bytes"):
        codec.tensor_proto_to_ndarray(spec, proto)
    proto.tensor_shape.dim[0].size = 2  # a small broadcast is still accepted, as by TF Serving
    assert codec.tensor_proto_to_ndarray(spec, proto).shape == (2, 4096)


def test_merged_batches_are_padded_to_the_allowed_sizes():
    import types

    from tfx_xmatch.serving.batching import Batcher

    with pytest.raises(ValueError, match=r"must increase and end at max_batch_size=8, got \[4, 2, 8\]"):
        Batcher(BatchingOptions(max_batch_size=8, allowed_batch_sizes=(4, 2, 8)))
    batcher = Batcher(BatchingOptions(max_batch_size=8, batch_timeout_micros=1_000_000, allowed_batch_sizes=(4, 8)))
    signature = types.SimpleNamespace(batchable=True, batched_inputs={"x"}, name="s")
    seen = []

    def call(arrays):
        seen.append(arrays["x"].shape[0])
        return {"y": arrays["x"] * 10}

    requests = [np.array([[1.0], [2.0]]), np.array([[3.0]])]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(batcher.run, *Batcher.batch_key("m", signature, {"x": x}), {"x": x}, call, signature)
                   for x in requests]
        answers = [future.result(timeout=30)["y"] for future in futures]
    assert [answer.tolist() for answer in answers] == [[[10.0], [20.0]], [[30.0]]]
    assert seen == [4]  # 3 rows merged, padded to 4; a lone row too:
    assert batcher.run(*Batcher.batch_key("m", signature, {"x": requests[1]}), {"x": requests[1]}, call,
                       signature)["y"].tolist() == [[30.0]]
    assert seen == [4, 4]


def test_a_flush_runs_open_batches_now_and_later_requests_do_not_wait():
    """On shutdown the server waited out batch_timeout_micros for a batch it had open (120 s
    here), past its shutdown grace, before it could exit."""
    import types

    from tfx_xmatch.serving.batching import Batcher

    batcher = Batcher(BatchingOptions(max_batch_size=8, batch_timeout_micros=120_000_000))
    signature = types.SimpleNamespace(batchable=True, batched_inputs={"x"}, name="s")
    called = threading.Event()

    def call(arrays):
        called.set()
        return {"y": arrays["x"] * 10}

    x = np.array([[1.0]])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(batcher.run, *Batcher.batch_key("m", signature, {"x": x}), {"x": x}, call, signature)
        while not batcher._open:  # the request has opened its batch and waits for company
            time.sleep(0.01)
        assert not called.is_set()
        batcher.flush()
        assert future.result(timeout=100)["y"].tolist() == [[10.0]]
        assert batcher.run(*Batcher.batch_key("m", signature, {"x": x}), {"x": x}, call, signature)["y"].tolist() \
            == [[10.0]]


def test_a_second_signal_exits_at_once_with_its_exit_code(monkeypatch):
    import types

    from tfx_xmatch.serving import server as server_module

    exits = []
    monkeypatch.setattr(server_module.os, "_exit", exits.append)
    stopping = types.SimpleNamespace(stop_requested=False)
    stopping.request_stop = lambda: setattr(stopping, "stop_requested", True)
    server_module._drain_then_exit_at_a_second_signal(stopping, signal.SIGTERM, None)
    assert stopping.stop_requested and exits == []  # the first one drains
    server_module._drain_then_exit_at_a_second_signal(stopping, signal.SIGINT, None)
    assert exits == [130]


def test_an_input_of_unknown_rank_is_batched_when_a_request_gives_one_value_per_row():
    """top_k's k: one value per row is split with the rows (TF Serving's batching and row format
    send it so); a scalar k stays a per-request constant, batched only with equal scalars."""
    import types

    from tfx_xmatch.serving.batching import Batcher
    from tfx_xmatch.serving.model_manager import TensorSpecInfo

    batcher = Batcher(BatchingOptions(max_batch_size=8, batch_timeout_micros=1_000_000))
    signature = types.SimpleNamespace(
        batchable=True, batched_inputs=("history",), name="top_k",
        inputs={"history": TensorSpecInfo("history", tf.int64, (None, None)), "k": TensorSpecInfo("k", tf.int32, None)})
    seen = []

    def call(arrays):
        seen.append((arrays["history"].shape[0], np.shape(arrays["k"])))
        return {"y": arrays["history"][:, :1] * np.reshape(arrays["k"], (-1, 1))}

    requests = [{"history": np.array([[1, 2], [3, 4]]), "k": np.array([5, 6], np.int32)},
                {"history": np.array([[7, 8]]), "k": np.array([9], np.int32)}]
    keys = [Batcher.batch_key("m", signature, request) for request in requests]
    assert keys[0][0] == keys[1][0]  # the per-row k does not split the batch
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(batcher.run, *key, request, call, signature) for key, request in zip(keys, requests)]
        answers = [future.result(timeout=30)["y"].tolist() for future in futures]
    assert answers == [[[5], [18]], [[63]]] and seen == [(3, (3,))]
    scalar = {"history": np.array([[1, 2]]), "k": np.array(9, np.int32)}
    one_for_all = {"history": np.array([[1, 2], [3, 4]]), "k": np.array([9], np.int32)}
    for constant in (scalar, one_for_all):  # one k for the request: a constant of the batch key
        assert Batcher.batch_key("m", signature, constant)[0] != keys[0][0]
        assert ("k", "c") == Batcher.batch_key("m", signature, constant)[0][-1][:2]


def test_deeply_nested_json_strings_are_a_bad_request():
    from tfx_xmatch.serving import codec
    from tfx_xmatch.serving.errors import ServingError
    from tfx_xmatch.serving.model_manager import TensorSpecInfo

    value = "id"
    for _ in range(950):  # once a RecursionError, answered as INTERNAL (HTTP 500)
        value = [value]
    with pytest.raises(ServingError, match="input 'history' nests lists deeper than 64 levels") as info:
        codec.json_to_ndarray(TensorSpecInfo("history", tf.string, (None, None)), value)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64, tf.int32, tf.int64, tf.bool, tf.string])
@pytest.mark.parametrize("value", [[None], [[0, None], [1, 1]], None])
def test_a_json_null_is_a_bad_request_for_every_dtype(dtype, value):
    """TF Serving's JSON decoder takes no null for any dtype; a float input once read it as NaN
    and answered with NaN scores."""
    from tfx_xmatch.serving import codec
    from tfx_xmatch.serving.errors import ServingError
    from tfx_xmatch.serving.model_manager import TensorSpecInfo

    if dtype == tf.string and isinstance(value, list) and isinstance(value[0], list):
        value = [["a", None], ["b", "c"]]
    shape = (None, None) if isinstance(value, list) and isinstance(value[0], list) else (None,)
    with pytest.raises(ServingError, match=f"input 'x' expects .*{dtype.name}.* but the JSON holds null") as info:
        codec.json_to_ndarray(TensorSpecInfo("x", dtype, None if value is None else shape), value)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("value, named", [
    ([[1, 2], [3, "4"]], "strings"), ([[1.5, 2.5], [3.5, {"b64": "AA=="}]], "objects"),
    ([[2 ** 70, 1.0], [2.0, True]], "a boolean"),
])
def test_a_json_value_of_the_wrong_type_is_named_wherever_it_stands(value, named):
    """Only the first leaf's type was looked at: a string in a later row was answered as values
    "not all numbers", a boolean beside a 70-bit integer likewise."""
    from tfx_xmatch.serving import codec
    from tfx_xmatch.serving.errors import ServingError
    from tfx_xmatch.serving.model_manager import TensorSpecInfo

    with pytest.raises(ServingError, match=f"input 'x' expects float32 values but the JSON holds {named}"):
        codec.json_to_ndarray(TensorSpecInfo("x", tf.float32, (None, 2)), value)


def test_the_client_refuses_numbers_it_would_have_to_truncate():
    from tfx_xmatch.serving.client import _coerce
    from tfx_xmatch.serving.model_manager import TensorSpecInfo

    history = TensorSpecInfo("history", tf.int64, (None, None))
    k = TensorSpecInfo("k", tf.int32, ())
    assert _coerce([[3, 17]], history).tolist() == [[3, 17]]
    assert _coerce(np.array([[3, 17]], np.int32), history).dtype == np.int64
    # np.asarray(3.9, int32) once sent 3: another question than the one asked.
    with pytest.raises(ValueError, match=r"input 'history' expects int64 values but the JSON holds floating-point"):
        _coerce([[3.9, 17.5]], history)
    with pytest.raises(ValueError, match="input 'k' has values outside the range of int32"):
        _coerce(2 ** 40, k)
    with pytest.raises(ValueError, match=r"value array\(\[\[3.9\]\]\) is not all integers, but the input's dtype is int64"):
        _coerce(np.array([[3.9]]), history)


def test_the_client_decodes_json_values_as_the_rest_api_does():
    """NumPy made "003" item 3, and the row [1.0, 2**53 + 1] float64, so the client sent item
    2**53 where REST refused both; an int for a string input ended in a Python traceback."""
    from tfx_xmatch.serving.client import _coerce
    from tfx_xmatch.serving.model_manager import TensorSpecInfo

    ints = TensorSpecInfo("history", tf.int64, (None, None))
    strings = TensorSpecInfo("history", tf.string, (None, None))
    with pytest.raises(ValueError, match="input 'history' expects int64 values but the JSON holds strings"):
        _coerce([["003"]], ints)
    with pytest.raises(ValueError, match="input 'history' expects int64 values but the JSON holds floating-point"):
        _coerce([[1.0, 2 ** 53 + 1]], ints)
    with pytest.raises(ValueError, match="input 'history' expects int64 values, got an array of <U3"):
        _coerce(np.array([["003"]]), ints)
    with pytest.raises(ValueError, match=r"input 'history' expects string values .* but the JSON holds integers"):
        _coerce([[7]], strings)
    with pytest.raises(ValueError, match="input 'history' expects strings, got values of type int"):
        _coerce(np.array([[7]]), strings)
    assert _coerce([["café"]], strings).tolist() == [["café".encode()]]
    # What is not JSON is taken as TF Serving's own client takes it: bytes, tuples, arrays, tensors.
    for value in ([[b"a", b"b"]], (("a", "b"),), [np.array(["a", "b"])], tf.constant([["a", "b"]])):
        assert _coerce(value, strings).tolist() == [[b"a", b"b"]], value


def _save_identity(path: str, dtype) -> None:
    """A SavedModel whose serving_default returns its input ``x`` (a vector of ``dtype``)."""
    module = tf.Module()
    module.serve = tf.function(lambda x: {"y": tf.identity(x)},
                               input_signature=[tf.TensorSpec([None], dtype, name="x")])
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def test_a_long_lived_client_coerces_inputs_to_the_version_serving_now(tmp_path):
    """ServingClient(coerce=True) kept the input specs of the version that served its first
    request: after a hot swap to a version taking another dtype, it refused (int -> string) or
    sent what the server refuses (int32 -> int64) what a fresh client sent and got answered."""
    identities = {}
    for version, dtype in ((1, tf.int32), (2, tf.int64), (3, tf.string)):
        identities[version] = str(tmp_path / f"identity_{dtype.name}")
        _save_identity(identities[version], dtype)
    base = str(tmp_path / "tiny")
    install_version(identities, base, 1)
    server = start_server(base, rest_port=None, file_system_poll_wait_seconds=0)
    try:
        with serving_client.ServingClient(f"127.0.0.1:{server.grpc_port}") as client:
            def ask(values):
                outputs, spec = client.predict("tiny", {"x": values}, coerce=True, return_model_spec=True)
                return spec.version.value, outputs["y"].tolist()

            assert ask([1, 2]) == (1, [1, 2])
            install_version(identities, base, 2)
            server.manager.poll_once()  # int32 -> int64: the cached specs coerce, the server refuses
            assert ask([3, 4]) == (2, [3, 4])
            install_version(identities, base, 3)
            server.manager.poll_once()  # int64 -> string: the cached specs refuse
            assert ask(["a", "b"]) == (3, [b"a", b"b"])
            with pytest.raises(ValueError, match="expects"):  # what the version serving refuses still is
                ask([5])
    finally:
        server.stop(grace=1)


def test_the_client_says_when_an_input_is_broken_json(tmp_path):
    from tfx_xmatch.serving.client import _parse_inputs

    assert _parse_inputs(["history=[[1, 2]]", "label=movies"], None) == {"history": [[1, 2]], "label": "movies"}
    # An unclosed bracket used to be sent as the string "[[1" and fail as a dtype error.
    with pytest.raises(ValueError, match=r"--input history: '\[\[1' is not valid JSON"):
        _parse_inputs(["history=[[1"], None)
    broken = tmp_path / "in.json"
    broken.write_text('{"history": [[1]')
    with pytest.raises(ValueError, match=f"--inputs_json file '{broken}' is not valid JSON"):
        _parse_inputs([], str(broken))


def test_tensorflow_internals_are_dropped_from_error_messages():
    from tfx_xmatch.serving.errors import clean_tf_message

    raw = ("Graph execution error:\n\nDetected at node Assert/AssertGuard/Assert defined at (most recent call last):\n"
           "  File \"x.py\", line 1\n\nassertion failed: [history has a row without any item (empty history)]"
           " [0]\n\t [[{{node Assert/AssertGuard/Assert}}]] [Op:__inference_signature_wrapper__serve_default_3819]")
    assert clean_tf_message(raw) == "assertion failed: [history has a row without any item (empty history)] [0]"
    assert clean_tf_message("k must be in [1, 10], got 11") == "k must be in [1, 10], got 11"


@pytest.mark.parametrize("array", [
    np.array([[0.5, -1.0]], np.float32), np.array([[3, 4]], np.int64), np.array([[b"a", b"bc"]], object),
    np.array([1.5, 2.5]), np.array([True, False]), np.array([[1, 2]], np.int32), np.array(3.0, np.float32),
    np.zeros((0, 3), np.float32), np.array([1.0, 2.0], np.float16),
])
def test_outputs_encode_as_tf_serving_writes_them_and_decode_exactly(array):
    from tfx_xmatch.serving.codec import ndarray_to_tensor_proto

    proto = ndarray_to_tensor_proto(array)
    decoded = tf.make_ndarray(proto)
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)
    if array.dtype != np.float16:
        assert not proto.tensor_content


def test_rest_takes_chunked_and_gzip_bodies_as_tf_serving_does(shared):
    import gzip
    import http.client

    body = json.dumps({"inputs": {"history": [[1, 2, 3, 0, 0]], "k": 3}}).encode()
    expected_status, expected = shared.rest("POST", "/v1/models/tiny:predict", body)
    assert expected_status == 200

    def post(payload, headers, chunked=False):
        connection = http.client.HTTPConnection("127.0.0.1", shared.server.rest_port, timeout=30)
        try:
            connection.request("POST", "/v1/models/tiny:predict", body=payload, headers=headers,
                               encode_chunked=chunked)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    pieces = iter([body[:10], body[10:]])  # a streamed upload: no Content-Length, chunked
    assert post(pieces, {"Transfer-Encoding": "chunked"}, chunked=True) == (200, expected)
    assert post(gzip.compress(body), {"Content-Encoding": "gzip"}) == (200, expected)
    status, answer = post(b"not gzip at all", {"Content-Encoding": "gzip"})
    assert status == 400 and "does not decompress" in answer["error"]
    # A small upload that inflates past the body limit is refused, not decompressed in full.
    bomb = gzip.compress(b" " * (REST_LIMIT + 10))
    assert len(bomb) < REST_LIMIT and post(bomb, {"Content-Encoding": "gzip"})[0] == 413


def test_json_floats_that_would_lose_precision_are_refused_as_tf_serving_does():
    from tfx_xmatch.serving import codec
    from tfx_xmatch.serving.errors import ServingError
    from tfx_xmatch.serving.model_manager import TensorSpecInfo

    float_spec = TensorSpecInfo("x", tf.float32, (None, 2))
    np.testing.assert_array_equal(codec.json_to_ndarray(float_spec, [[0.1, 16777215]]),
                                  np.array([[0.1, 16777215]], np.float32))
    assert np.isinf(codec.json_to_ndarray(float_spec, [[float("inf"), 1.0]])[0, 0])
    # Both were accepted and changed: 16777217 read as 16777216.0, 1e40 as Infinity.
    for value, shown in ((16777217, "16777217"), (1e40, "1e+40")):
        with pytest.raises(ServingError, match=re.escape(f"Cannot convert JSON value: {shown} to float without "
                                                         "loss of precision")) as info:
            codec.json_to_ndarray(float_spec, [[value, 1.0]])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # All integers (NumPy's int64 or uint64) are checked as the array; a mix, leaf by leaf.
    for value, shown in (([[1, 2], [-16777217, 3]], "-16777217"), ([[0.5, 1.0], [2.0, 16777218]], "16777218")):
        with pytest.raises(ServingError, match=f"Cannot convert JSON value: {shown} to float without"):
            codec.json_to_ndarray(float_spec, value)
    np.testing.assert_array_equal(codec.json_to_ndarray(float_spec, [[-16777215, 16777215]]),
                                  np.array([[-16777215, 16777215]], np.float32))
    double_spec = TensorSpecInfo("x", tf.float64, (None,))
    assert codec.json_to_ndarray(double_spec, [16777217]).tolist() == [16777217.0]
    with pytest.raises(ServingError, match=f"Cannot convert JSON value: {2 ** 64 - 1} to double"):
        codec.json_to_ndarray(double_spec, [2 ** 64 - 1])
    # Past 64 bits RapidJSON holds a double, which the input takes.
    assert codec.json_to_ndarray(double_spec, [2 ** 70, -1]).tolist() == [float(2 ** 70), -1.0]
    with pytest.raises(ServingError, match="to double without loss of precision"):
        codec.json_to_ndarray(double_spec, [2 ** 53 + 1])


def _raw_http(port: int, head: bytes, body: bytes = b"", wait_for_continue: bool = False) -> bytes:
    """Sends ``head`` (and ``body``) on a plain socket; returns everything the server answers."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head)
        if wait_for_continue:
            interim = connection.recv(100)
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        connection.sendall(body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def test_rest_reads_bodies_as_tf_serving_does_and_refuses_what_it_refuses(shared):
    """Found by fuzzing the REST front end against tensorflow_model_server's decoding."""
    port = shared.server.rest_port
    # A JSON true among integers: NumPy read [1, true] as [1, 1] and answered 200.
    for body in ({"inputs": {"history": [[1, True, 3, 0, 0]], "k": 3}},
                 {"instances": [{"history": [1, 2, 3, 0, 0], "k": 3}, {"history": [1, 2, True, 0, 0], "k": 3}]}):
        status, answer = shared.rest("POST", "/v1/models/tiny:predict", body)
        assert status == 400 and "a boolean (true/false)" in answer["error"], answer
    # A duplicate key: Python's json took the last, RapidJSON the first; refused, naming it.
    status, answer = shared.rest("POST", "/v1/models/tiny:predict",
                                 b'{"inputs": {"history": [[1, 2, 3, 0, 0]], "k": 3, "k": 2}}')
    assert status == 400 and "the key 'k' appears twice" in answer["error"], answer
    # Half a surrogate pair is no character: refused by name (was "UnicodeEncodeError: ...").
    status, answer = shared.rest("POST", "/v1/models/tiny:predict",
                                 b'{"signature_name": "echo", "inputs": ["movie-\\udcff"]}')
    assert status == 400 and "holds the escape \\udcff, half of a surrogate pair" in answer["error"], answer
    # A chunk size that is not hex digits: "-1" read to the end of the stream (a thread held
    # for the 30 s timeout), "-5" dropped the connection without an answer.
    for size in (b"-1", b"-5", b"0x17", b"+17"):
        started = time.monotonic()
        answer = _raw_http(port, b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n",
                           b'{"inputs": {}}\r\n0\r\n\r\n')
        assert answer.startswith(b"HTTP/1.0 400") and b"malformed chunk size" in answer, (size, answer)
        assert time.monotonic() - started < 5
    # Expect: 100-continue is answered before the body (curl waited a second for it).
    body = json.dumps({"inputs": {"history": [[1, 2, 3, 0, 0]], "k": 3}}).encode()
    answer = _raw_http(port, b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n", body, wait_for_continue=True)
    assert b" 200 OK" in answer and b'"item_ids"' in answer
    # ... and not for a body over the limit: 413 at once, nothing asked for, nothing awaited.
    answer = _raw_http(port, b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                             b"Content-Length: " + str(REST_LIMIT + 1).encode() + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 413"), answer


def test_grpc_requests_tf_serving_refuses_are_refused(shared):
    def grpc_error(call, request):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        return info.value.code(), info.value.details()

    # A label set to "" is a label (TF Serving: unrecognized); it was dropped, serving the latest.
    request = predict_request(inputs=good_inputs())
    request.model_spec.version_label = ""
    assert request.model_spec.WhichOneof("version_choice") == "version_label"
    assert grpc_error(shared.predict.Predict, request) == (INVALID, "Unrecognized servable version label: ")
    # GetModelStatus without a model_spec was NOT_FOUND for the model "".
    assert grpc_error(shared.models.GetModelStatus, get_model_status_pb2.GetModelStatusRequest()) == (
        INVALID, "Missing ModelSpec")
    # More values than the shape holds: refused naming both (was np.pad's "index can't contain
    # negative values"; TF Serving keeps the first values, serving/README lists the difference).
    request = predict_request(inputs=good_inputs())
    request.inputs["history"].ClearField("tensor_content")
    request.inputs["history"].int64_val.extend([1, 2, 3, 0, 0] * 2)
    code, details = grpc_error(shared.predict.Predict, request)
    assert code == INVALID and "declares shape [1,5] (5 values) but holds 10 values in int64_val" in details, details


def test_a_tensorflow_error_quoting_bytes_that_are_not_utf8_keeps_its_message():
    """TF's binding could not decode such a message: the client got "UnicodeDecodeError: 'utf-8'
    codec can't decode byte 0xff ..." instead of the model's out-of-vocabulary assertion."""
    from tfx_xmatch.serving.errors import from_exception

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def lookup(ids):
        known = tf.reduce_all(tf.equal(ids, b"ok"))
        with tf.control_dependencies([tf.debugging.Assert(known, ["ids outside the vocabulary, e.g.", ids])]):
            return tf.identity(ids)

    with pytest.raises(Exception) as info:
        lookup(tf.constant([b"\xff\xfe", b"ok"]))
    error = from_exception(info.value)
    assert error.code == INVALID
    assert error.message == r"assertion failed: [ids outside the vocabulary, e.g.] [\xff\xfe ok]"


def test_an_operators_mistakes_are_named_at_start_up(templates, tmp_path, caplog):
    """From a lifecycle probe against tensorflow_model_server (each reproduced)."""
    import socket

    from tfx_xmatch.serving.model_manager import list_versions, parse_model_config_file

    # Version names TF Serving's safe_strto64 refuses are ignored: "²" passed isdigit() and
    # failed every poll; a number past int64 loaded and failed every answer.
    base = tmp_path / "versions"
    for name in ("1", "007", "²", "99999999999999999999", "-1", "1.5"):
        (base / name).mkdir(parents=True)
    assert sorted(list_versions(str(base))) == [1, 7]
    # A misspelt batching field was dropped without a word; TF Serving's other fields are not typos.
    for text in ("max_batch_sise { value: 8 }", "low_priority_max_batch_size { value: 4 } max_batch_sise { value: 8 }"):
        with pytest.raises(ValueError, match="has no field named 'max_batch_sise'"):
            parse_batching_parameters(text)
    with caplog.at_level("WARNING"):
        options = parse_batching_parameters("max_batch_size { value: 8 } max_execution_batch_size { value: 4 } "
                                            "low_priority_max_batch_size { value: 2 }")
    assert options.max_batch_size == 8
    assert "max_execution_batch_size is not supported by this server and is ignored" in caplog.text
    assert "low_priority_max_batch_size is not supported" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a field named in a comment is no field
        parse_batching_parameters("# max_execution_batch_size { value: 4 }\nmax_batch_size { value: 8 }")
    assert "not supported" not in caplog.text
    # A cut-off file is named (protobuf's ParseError printed a traceback).
    broken = tmp_path / "models.config"
    broken.write_text('model_config_list { config { name: "m" base_path: ')
    with pytest.raises(ValueError, match=f"invalid model config file {broken}: "):
        parse_model_config_file(str(broken))
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8")
    with pytest.raises(ValueError, match=f"invalid batching parameters file {batching}: "):
        options_from_args(build_parser().parse_args(["--model_base_path", str(base), "--enable_batching",
                                                     "--batching_parameters_file", str(batching)]))
    # A model whose every version failed to load stops start-up, as in TF Serving (the process
    # looked healthy while serving nothing).
    broken_base = tmp_path / "broken"
    (broken_base / "1").mkdir(parents=True)
    (broken_base / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    with pytest.raises(ValueError, match=r"1 model\(s\) did not become available: model 'tiny' \(version 1: "):
        start_server(str(broken_base), rest_port=None)
    # A REST port in use names itself (was "[Errno 98] Address already in use").
    good = str(tmp_path / "good")
    install_version(templates, good, 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve REST on 127.0.0.1:{port} \\(--rest_api_port\\): "):
            start_server(good, rest_port=port)


def test_a_new_base_path_keeps_serving_and_labels_must_name_available_versions(templates, tmp_path):
    """A new base_path retired every version before the new one loaded (NOT_FOUND for seconds);
    a label naming a version that is not loaded was accepted in silence (TF Serving refuses it)."""
    from tensorflow_serving.apis import model_management_pb2

    from tfx_xmatch.serving.model_manager import ModelConfig

    base_a, base_b = str(tmp_path / "a"), str(tmp_path / "b")
    install_version(templates, base_a, 1)
    install_version(templates, base_b, 2)
    server = start_server(base_a, rest_port=None, file_system_poll_wait_seconds=0)
    clients = Clients(server)
    try:
        server.manager.set_configs([ModelConfig("tiny", base_b)])
        response = clients.predict.Predict(predict_request(inputs=good_inputs()), timeout=10)
        assert response.model_spec.version.value == 1  # still served until version 2 is loaded
        server.manager.poll_once()
        assert wait_for_states(server, {1: "END", 2: "AVAILABLE"})

        request = model_management_pb2.ReloadConfigRequest()
        config = request.config.model_config_list.config.add()
        config.name, config.base_path = "tiny", base_b
        config.version_labels["canary"] = 5
        answer = clients.models.HandleReloadConfigRequest(request, timeout=30)
        assert answer.status.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert answer.status.error_message == ("Request to assign label to version 5 of model tiny, which is not "
                                               "currently available for inference")
        assert server.manager.get_model("tiny").config.labels == {}  # the labels stay as they were
        config.version_labels["canary"] = 2
        assert clients.models.HandleReloadConfigRequest(request, timeout=30).status.error_code == 0
        response = clients.predict.Predict(predict_request(inputs=good_inputs(), label="canary"), timeout=10)
        assert response.model_spec.version.value == 2
    finally:
        clients.close()
        server.stop(grace=5)
    labelled = [ModelConfig("tiny", base_b, version_labels=(("stable", 7),))]
    with pytest.raises(ValueError, match="label to version 7 of model tiny, which is not currently available"):
        start_server(labelled, rest_port=None)
    allowed = start_server(labelled, rest_port=None, allow_version_labels_for_unavailable_models=True)
    allowed.stop(grace=1)


def test_a_config_file_whose_label_waits_for_its_version_is_applied_once_it_loads(templates, tmp_path):
    """A deploy that adds a version and its label in one edit: the label was refused while the
    version loaded, and the unchanged file was never read again."""
    base = str(tmp_path / "tiny")
    install_version(templates, base, 1)
    config_file = tmp_path / "models.config"
    config_file.write_text(f'model_config_list {{ config {{ name: "tiny" base_path: "{base}" }} }}')
    server = start_server(str(base), rest_port=None, model_config_file=str(config_file),
                          model_config_file_poll_wait_seconds=0.1, file_system_poll_wait_seconds=0.1)
    try:
        config_file.write_text(f'model_config_list {{ config {{ name: "tiny" base_path: "{base}" '
                               'version_labels { key: "canary" value: 2 } } }')
        time.sleep(0.5)  # polled and refused a few times: version 2 is not there
        assert server.manager.get_model("tiny").config.labels == {}
        install_version(templates, base, 2)
        deadline = time.monotonic() + 20
        while server.manager.get_model("tiny").config.labels != {"canary": 2}:
            assert time.monotonic() < deadline, "the label never took effect"
            time.sleep(0.05)
    finally:
        server.stop(grace=5)


def test_row_format_outputs_split_as_tf_serving_splits_them():
    """Predictions follow the outputs' first dimension, which once had to equal the number of
    instances (a 400 where TF Serving answers); a scalar output, or outputs whose first
    dimensions differ, do not split and are refused, as there."""
    from tfx_xmatch.serving.errors import ServingError
    from tfx_xmatch.serving.rest_service import encode_predictions

    assert encode_predictions({"a": np.arange(3), "b": np.ones((3, 2))}) == [
        {"a": 0, "b": [1.0, 1.0]}, {"a": 1, "b": [1.0, 1.0]}, {"a": 2, "b": [1.0, 1.0]}]
    for outputs, message in [({}, "Cannot convert empty tensor map to JSON"),
                             ({"a": np.int64(1)}, "output 'a' is a scalar"),
                             ({"a": np.zeros((0, 2))}, "no prediction"),
                             ({"a": np.arange(3), "b": np.arange(2)}, "first dimensions differ")]:
        with pytest.raises(ServingError, match=message) as info:
            encode_predictions(outputs)
        assert info.value.http == 400


def test_base64_is_read_as_absl_base64_unescape_reads_it():
    """TF Serving decodes {"b64": ...} with absl::Base64Unescape: ASCII whitespace skipped,
    padding ("=" or ".") optional but never where none belongs, nothing else."""
    from tfx_xmatch.serving.codec import _b64decode

    for text, decoded in [("YWI", b"ab"), ("YWI=", b"ab"), ("YW I=", b"ab"), (" YW\nJj ", b"abc"), ("YQ", b"a"),
                          ("YQ==", b"a"), ("YQ..", b"a"), ("", b"")]:
        assert _b64decode(text) == decoded, text
    for text in ["YQ=", "Y", "YWJj=", "!!", "YW\x1cJj", "YW\xa0Jj", "Y=Jj"]:
        with pytest.raises(ValueError):
            _b64decode(text)
