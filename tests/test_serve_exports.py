"""An `xmatch export` served by our TF-Serving-protocol server and queried with the stock
tensorflow-serving-api stubs: the answers equal the in-process serving module's, and the
model's own input checks come back as INVALID_ARGUMENT."""

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

from tests.test_export import HISTORIES, K_MAX, model, right_padded, string_vocab  # noqa: F401 (fixture)
from tests.test_serving import rest
from tfx_xmatch.export import build_serving_module, export_retrieval_model
from tfx_xmatch.serving.model_manager import ModelConfig, VersionPolicy
from tfx_xmatch.serving.server import ModelServer, ServerOptions


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("served") / "xmatch"
    export_retrieval_model(model, string_vocab(), base, index_kind="partitioned", k_max=K_MAX, default_k=5,
                           index_options={"num_partitions": 4, "num_probes": 4}, model_name="xmatch")
    options = ServerOptions(model_configs=[ModelConfig("xmatch", str(base), VersionPolicy("latest", num_versions=1))],
                            grpc_port=0, rest_port=0, file_system_poll_wait_seconds=0.2, enable_batching=True)
    server = ModelServer(options).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    stub.rest_port = server.rest_port
    yield stub
    channel.close()
    server.stop()


def _request(signature, history, k=None):
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="xmatch", signature_name=signature))
    request.inputs["history"].CopyFrom(tf.make_tensor_proto(np.asarray(history)))
    if k is not None:
        request.inputs["k"].CopyFrom(tf.make_tensor_proto(np.asarray(k, np.int32)))
    return request


def test_stock_stub_gets_the_in_process_answer(model, served):  # noqa: F811
    module = build_serving_module(model, string_vocab(), index_kind="brute_force", k_max=K_MAX, default_k=5)
    history = right_padded(string_vocab(), HISTORIES, 16, "")
    expected = module.top_k(tf.constant(history), tf.constant(3))
    response = served.Predict(_request("top_k", history, k=3), timeout=30)
    assert response.model_spec.version.value == 1
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["item_ids"]), expected["item_ids"].numpy())
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]), expected["scores"].numpy(), rtol=1e-5)
    default = served.Predict(_request("serving_default", history), timeout=30)
    assert tf.make_ndarray(default.outputs["item_ids"]).shape == (3, 5)


def test_one_k_per_row_over_grpc_and_in_the_rest_row_format(model, served):  # noqa: F811
    module = build_serving_module(model, string_vocab(), index_kind="brute_force", k_max=K_MAX, default_k=5)
    history = right_padded(string_vocab(), HISTORIES, 16, "")
    row_k = [3, K_MAX, 1]
    expected = module.top_k(tf.constant(history), tf.constant(row_k, tf.int32))
    response = served.Predict(_request("top_k", history, k=row_k), timeout=30)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["item_ids"]), expected["item_ids"].numpy())
    # TF Serving's row format stacks each instance's k: the request TF Serving users write.
    instances = [{"history": list(row), "k": k} for row, k in zip(history.tolist(), row_k)]
    status, answer = rest(served.rest_port, "POST", "/v1/models/xmatch/versions/1:predict",
                          {"signature_name": "top_k", "instances": instances})
    assert status == 200, answer
    for row, (prediction, k) in enumerate(zip(answer["predictions"], row_k)):
        assert prediction["item_ids"][:k] == [item.decode() for item in expected["item_ids"][row, :k].numpy()]
        assert prediction["item_ids"][k:] == [""] * (K_MAX - k)


@pytest.mark.parametrize(
    "history, k, message",
    [
        ([["movie-1", "no-such-movie"]], 3, "outside the vocabulary"),
        ([["", ""]], 3, "empty history"),
        ([["movie-1"]], K_MAX + 1, "k must be in"),
    ],
)
def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(served, history, k, message):
    with pytest.raises(grpc.RpcError) as error:
        served.Predict(_request("top_k", history, k=k), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert served.Predict(_request("top_k", [["movie-2"]], k=2), timeout=30).outputs["scores"]
