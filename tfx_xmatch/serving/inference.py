"""The request path shared by the gRPC and REST front-ends.

A front-end resolves the model version (``ModelManager.acquire``) and the signature, decodes the
inputs against the signature (``serving.codec``), and calls :meth:`Inference.predict`, which
checks input names, batch size limits and the output filter, runs the signature directly or
through the :class:`~serving.batching.Batcher`, and turns every failure into a
:class:`~serving.errors.ServingError` (TF's ``InvalidArgumentError`` -> INVALID_ARGUMENT with
TF's message).
"""

from __future__ import annotations

import logging
import os

from tfx_xmatch.serving import codec, errors
from tfx_xmatch.serving.batching import Batcher
from tfx_xmatch.serving.model_manager import DEFAULT_SIGNATURE, Servable, Signature

log = logging.getLogger("tfx_xmatch.serving.inference")

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit


def _set_str(names) -> str:
    return "{" + ",".join(sorted(names)) + "}"


def check_input_names(signature: Signature, names) -> None:
    names = set(names)
    expected = set(signature.inputs)
    unexpected = sorted(names - expected)
    if unexpected:
        raise errors.invalid_argument(
            f"input tensor alias not found in signature: {', '.join(unexpected)}. Inputs "
            f"expected to be in the set {_set_str(expected)} (signature '{signature.name}')."
        )
    missing = sorted(expected - names)
    if missing:
        raise errors.invalid_argument(
            f"Missing input(s) {_set_str(missing)} for signature '{signature.name}'; it "
            f"expects {_set_str(expected)}."
        )


METHOD_NAMES = {"classify": "tensorflow/serving/classify", "regress": "tensorflow/serving/regress"}
_KIND = {"classify": "classification", "regress": "regression"}


def refuse_classify_or_regress(servable: Servable, signature_name: str, api: str) -> None:
    """Raises what ``api`` ("classify" or "regress") gets on ``servable``'s signature, in TF
    Serving's words (``classifier.cc``, ``regressor.cc``): INVALID_ARGUMENT for an unknown
    signature, or one whose method is not of that kind (every tfx_xmatch export's signatures are
    predict signatures), after the model lookup that gives an unknown model NOT_FOUND;
    UNIMPLEMENTED for a real classification or regression signature, which this server does
    not run."""
    key = signature_name or DEFAULT_SIGNATURE
    signature = servable.signatures.get(key)
    if signature is None:
        raise errors.invalid_argument(f"No signature was found with the name: {key}")
    expected = METHOD_NAMES[api]
    if signature.method_name != expected:
        raise errors.invalid_argument(
            f"Expected {_KIND[api]} signature method_name to be {expected}. Was: {signature.method_name} "
            f"(signature {key!r} of model {servable.model_name!r}: call it with Predict, :predict over REST)")
    raise errors.unimplemented(f"{_KIND[api]} signatures are not run by this server; use Predict (:predict)")


def check_output_filter(signature: Signature, output_filter) -> list[str]:
    result = []
    for alias in output_filter:
        if alias not in signature.outputs:
            raise errors.invalid_argument(
                f"output tensor alias not found in signature: {alias}. Outputs expected to be "
                f"in the set {_set_str(signature.outputs)}."
            )
        if alias in result:
            raise errors.invalid_argument(f"duplicate output tensor alias: {alias}")
        result.append(alias)
    return result


class Inference:
    def __init__(self, batcher: Batcher | None = None, max_request_batch_size: int = 0):
        self.batcher = batcher
        self.max_request_batch_size = max_request_batch_size

    def predict(
        self, servable: Servable, signature: Signature, arrays: dict, output_filter=()
    ) -> dict:
        """Runs ``signature`` on decoded inputs; returns the (filtered) outputs as NumPy."""
        check_input_names(signature, arrays)
        wanted = check_output_filter(signature, output_filter)
        rows = None
        for alias in signature.batched_inputs:
            array = arrays[alias]
            if array.ndim >= 1:
                rows = array.shape[0] if rows is None else max(rows, array.shape[0])
        if rows is not None and self.max_request_batch_size and rows > self.max_request_batch_size:
            raise errors.invalid_argument(
                f"batch size {rows} exceeds the server's limit of {self.max_request_batch_size} "
                "rows per request (--max_request_batch_size); split the request"
            )
        call = _guarded(signature)
        key = None
        if self.batcher is not None:
            key = Batcher.batch_key(servable, signature, arrays)
        if key is not None:
            group, key_rows = key
            limit = self.batcher.options.max_batch_size
            if key_rows > limit:
                if not self.batcher.options.enable_large_batch_splitting:
                    raise errors.invalid_argument(
                        f"Task size {key_rows} is larger than maximum batch size {limit} "
                        "(--max_batch_size); split the request"
                    )
                outputs = call(arrays)
            else:
                outputs = self.batcher.run(group, key_rows, arrays, call, signature)
        else:
            outputs = call(arrays)
        if wanted:
            outputs = {alias: outputs[alias] for alias in wanted}
        return outputs

    # -- warm-up ------------------------------------------------------------------------------

    def warmup(self, servable: Servable) -> None:
        """Replays ``assets.extra/tf_serving_warmup_requests`` (PredictionLog TFRecords), as TF
        Serving does before marking a version AVAILABLE. A failing record fails the load."""
        import tensorflow as tf

        path = os.path.join(servable.path, WARMUP_FILE)
        if not tf.io.gfile.exists(path):
            return
        from tensorflow_serving.apis import prediction_log_pb2

        count = 0
        try:
            records = list(tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS))
        except tf.errors.DataLossError as exc:  # TF names no file; a load status should
            raise tf.errors.DataLossError(
                None, None, f"warm-up file {path}: {errors.clean_tf_message(exc.message)}") from None
        for record in records:
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            kind = entry.WhichOneof("log_type")
            if kind != "predict_log":
                log.warning("warm-up record of type %s is not supported; skipped", kind)
                continue
            request = entry.predict_log.request
            signature = servable.signature(request.model_spec.signature_name)
            check_input_names(signature, request.inputs)
            arrays = {
                alias: codec.tensor_proto_to_ndarray(signature.inputs[alias], proto)
                for alias, proto in request.inputs.items()
            }
            try:
                _guarded(signature)(arrays)
            except errors.ServingError as exc:
                raise RuntimeError(f"warm-up request {count} failed: {exc.message}") from None
            count += 1
        log.info(
            "model %r version %d: ran %d warm-up requests",
            servable.model_name,
            servable.version,
            count,
        )


def _guarded(signature: Signature):
    def call(arrays: dict) -> dict:
        try:
            return signature(arrays)
        except errors.ServingError:
            raise
        except Exception as exc:  # noqa: BLE001 - every model failure goes back to the client
            error = errors.from_exception(exc)
            if error.code.name == "INTERNAL":
                log.exception("signature %s failed", signature.name)
            raise error from None

    return call
