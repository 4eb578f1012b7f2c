"""gRPC front-end: ``tensorflow.serving.PredictionService`` and ``tensorflow.serving.ModelService``.

Implemented with the ``tensorflow-serving-api`` generated stubs, so the service names, methods
and messages are TF Serving's own: a client built for TF Serving talks to this server unchanged.
``Classify``, ``Regress`` and ``MultiInference`` answer as TF Serving does for a model whose
signatures are all predict signatures: NOT_FOUND for an unknown model, else INVALID_ARGUMENT
naming the signature's method.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfx_xmatch.serving import codec, errors
from tfx_xmatch.serving.inference import METHOD_NAMES, Inference, check_input_names, refuse_classify_or_regress
from tfx_xmatch.serving.model_manager import ModelManager, VersionStatus, model_configs_from_proto

log = logging.getLogger("tfx_xmatch.serving.grpc")

SIGNATURE_DEF_FIELD = "signature_def"


def model_spec_version(spec):
    """(version or None, label or None) of a ``ModelSpec``."""
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return spec.version.value, None
    if which == "version_label":  # set, even to "": TF Serving refuses an empty label
        return None, spec.version_label
    return None, None


def _abort(context, error: errors.ServingError):
    context.abort(error.code, error.message)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager, inference: Inference):
        self.manager = manager
        self.inference = inference

    def Predict(self, request, context):
        try:
            return self._predict(request)
        except errors.ServingError as error:
            _abort(context, error)
        except Exception as exc:  # noqa: BLE001 - never crash the server on a request
            log.exception("Predict failed")
            _abort(context, errors.from_exception(exc))

    def _predict(self, request):
        spec = request.model_spec
        version, label = model_spec_version(spec)
        with self.manager.acquire(spec.name, version, label) as servable:
            signature = servable.signature(spec.signature_name)
            check_input_names(signature, request.inputs)
            arrays = {
                alias: codec.tensor_proto_to_ndarray(signature.inputs[alias], proto)
                for alias, proto in request.inputs.items()
            }
            outputs = self.inference.predict(
                servable, signature, arrays, list(request.output_filter)
            )
            response = predict_pb2.PredictResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = signature.name
            for alias, value in outputs.items():
                response.outputs[alias].CopyFrom(codec.ndarray_to_tensor_proto(value))
            return response

    def GetModelMetadata(self, request, context):
        try:
            return metadata_response(self.manager, request)
        except errors.ServingError as error:
            _abort(context, error)
        except Exception as exc:  # noqa: BLE001
            log.exception("GetModelMetadata failed")
            _abort(context, errors.from_exception(exc))

    def Classify(self, request, context):
        self._refuse(request.model_spec, "classify", context)

    def Regress(self, request, context):
        self._refuse(request.model_spec, "regress", context)

    def MultiInference(self, request, context):
        if not request.tasks:
            _abort(context, errors.invalid_argument("Expected at least one task"))
        for task in request.tasks:
            if task.method_name not in METHOD_NAMES.values():
                _abort(context, errors.unimplemented(f"Unsupported signature method_name: {task.method_name}"))
        task = request.tasks[0]
        self._refuse(task.model_spec, next(api for api, name in METHOD_NAMES.items() if name == task.method_name),
                     context)

    def _refuse(self, spec, api: str, context) -> None:
        """Classify, Regress and MultiInference on a predict-only model, answered as TF Serving does."""
        try:
            version, label = model_spec_version(spec)
            with self.manager.acquire(spec.name, version, label) as servable:
                refuse_classify_or_regress(servable, spec.signature_name, api)
        except errors.ServingError as error:
            _abort(context, error)
        except Exception as exc:  # noqa: BLE001
            log.exception("%s failed", api)
            _abort(context, errors.from_exception(exc))


def metadata_response(manager: ModelManager, request):
    """``GetModelMetadataResponse`` with a ``SignatureDefMap``, as TF Serving answers it."""
    fields = list(request.metadata_field)
    if not fields:
        raise errors.invalid_argument(
            "GetModelMetadataRequest must specify at least one metadata_field"
        )
    for field in fields:
        if field != SIGNATURE_DEF_FIELD:
            raise errors.invalid_argument(f"Metadata field {field} is not supported")
    spec = request.model_spec
    version, label = model_spec_version(spec)
    with manager.acquire(spec.name, version, label) as servable:
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in servable.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = servable.version
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response


def status_response(statuses: list[VersionStatus]):
    response = get_model_status_pb2.GetModelStatusResponse()
    states = get_model_status_pb2.ModelVersionStatus.State
    for status in statuses:
        entry = response.model_version_status.add()
        entry.version = status.version
        entry.state = states.Value(status.state)
        entry.status.error_code = status.error_code.value[0]
        entry.status.error_message = status.error_message
    return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        try:
            if not request.HasField("model_spec"):
                raise errors.invalid_argument("Missing ModelSpec")
            version, _ = model_spec_version(request.model_spec)
            # TF Serving's GetModelStatus ignores version_label: every version (or the one asked).
            statuses = self.manager.status(request.model_spec.name, version)
            return status_response(statuses)
        except errors.ServingError as error:
            _abort(context, error)

    def HandleReloadConfigRequest(self, request, context):
        """Installs a new ``ModelServerConfig`` and loads it before answering (as TF Serving)."""
        response = model_management_pb2.ReloadConfigResponse()
        try:
            configs = model_configs_from_proto(request.config)
            self.manager.apply_configs(configs)
        except ValueError as exc:
            response.status.error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            response.status.error_message = str(exc)
        except errors.ServingError as error:  # a label naming a version not available
            response.status.error_code = error.code.value[0]
            response.status.error_message = error.message
        return response


def make_grpc_server(
    manager: ModelManager,
    inference: Inference,
    address: str,
    executor: futures.ThreadPoolExecutor,
    max_receive_message_length: int = 64 << 20,
    channel_arguments=(),
):
    """A started gRPC server and its bound port.

    The server's handlers run on ``executor``; the caller shuts it down after stopping the
    server (grpc.Server.stop leaves it running: a stopped server kept its idle threads).
    """
    options = [
        ("grpc.max_receive_message_length", int(max_receive_message_length)),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ]
    options += list(channel_arguments)
    server = grpc.server(executor, options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(manager, inference), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # recent grpcio raises instead of returning 0
        raise OSError(f"could not bind the gRPC port at {address}: {exc}") from None
    if not port:
        raise OSError(f"could not bind the gRPC port at {address}")
    server.start()
    return server, port
