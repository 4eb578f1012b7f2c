"""A small client over the ``tensorflow-serving-api`` gRPC stubs (works with TF Serving too).

    with ServingClient("localhost:8500") as client:
        outputs = client.predict("xmatch", {"history": histories, "k": np.int32(10)})
        outputs["item_ids"], outputs["scores"]            # NumPy arrays
        client.metadata("xmatch")                          # signatures, inputs/outputs specs
        client.status("xmatch")                            # versions and their states

``main(argv)`` is the ``xmatch query`` command::

    xmatch query --server localhost:8500 --model_name xmatch \\
        --input 'history=[[3, 17, 42, 0, 0]]' --input k=10
    xmatch query --server localhost:8500 --model_name xmatch --status
    xmatch query --server localhost:8500 --model_name xmatch --metadata

Input values given as JSON are cast to the dtypes of the signature (read from the server's
metadata), so ``[[3, 17]]`` becomes int64 when the signature says int64.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfx_xmatch.serving.codec import json_to_ndarray
from tfx_xmatch.serving.errors import ServingError
from tfx_xmatch.serving.model_manager import TensorSpecInfo


def _dtype_name(enum_value) -> str:
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    try:
        return tf.dtypes.as_dtype(enum_value).name
    except TypeError:  # DT_INVALID, e.g. the outputs of __saved_model_init_op
        return types_pb2.DataType.Name(enum_value)


def _tensor_info_dict(info) -> dict:
    shape = None if info.tensor_shape.unknown_rank else [int(d.size) for d in info.tensor_shape.dim]
    return {"dtype": _dtype_name(info.dtype), "shape": shape, "name": info.name}


class ServingClient:
    """Predict / metadata / status against a TF Serving protocol server."""

    def __init__(
        self,
        target: str = "localhost:8500",
        timeout: float = 10.0,
        max_message_length: int = 64 << 20,
        channel: grpc.Channel | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self._owns_channel = channel is None
        self.channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_length),
                ("grpc.max_send_message_length", max_message_length),
            ],
        )
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._spec_cache: dict = {}

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _spec(spec, model_name, version=None, version_label=None, signature_name=None):
        spec.name = model_name
        if version is not None and version_label:
            raise ValueError("give version or version_label, not both")
        if version is not None:
            spec.version.value = int(version)
        elif version_label:
            spec.version_label = version_label
        if signature_name:
            spec.signature_name = signature_name

    def predict_request(
        self,
        model_name: str,
        inputs: dict,
        signature_name: str = "",
        version: int | None = None,
        version_label: str | None = None,
        output_filter=(),
        coerce: bool = False,
    ):
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, model_name, version, version_label, signature_name)
        key = _spec_key(model_name, signature_name, version, version_label)
        if coerce:
            try:
                arrays = _coerce_inputs(inputs, self._input_specs(key))
            except ValueError:
                # The cached specs may be an older version's: a hot swap can change an input's
                # dtype (int item ids re-keyed to strings). Refuse only what the current ones do.
                if not self._refresh_input_specs(key):
                    raise
                arrays = _coerce_inputs(inputs, self._input_specs(key))
        else:
            arrays = {alias: np.asarray(value) for alias, value in inputs.items()}
        import tensorflow as tf

        for alias, array in arrays.items():
            request.inputs[alias].CopyFrom(tf.make_tensor_proto(array))
        request.output_filter.extend(output_filter)
        return request

    def predict(
        self,
        model_name: str,
        inputs: dict,
        signature_name: str = "",
        version: int | None = None,
        version_label: str | None = None,
        output_filter=(),
        timeout: float | None = None,
        coerce: bool = False,
        return_model_spec: bool = False,
    ):
        """Runs a signature on NumPy (or list) inputs; returns ``{output: np.ndarray}`` (and the
        ``ModelSpec`` of the version that answered if ``return_model_spec``). With ``coerce``,
        values are made the signature's dtypes first (one metadata call per signature, and one
        more after a refused value, since a hot swap may have changed them): JSON values (str,
        numbers, bools and lists of them) by the REST API's rules; bytes, tuples, arrays and
        tensors by a cast that must change no value.

        Raises:
          ValueError: With ``coerce``, a value the signature's input cannot take as it is.
          grpc.RpcError: The server refused or failed the call.
        """
        import tensorflow as tf

        request = self.predict_request(
            model_name, inputs, signature_name, version, version_label, output_filter, coerce
        )
        try:
            response = self.prediction.Predict(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            # Values coerced to a swapped-out version's dtypes (int32 where int64 is now taken)
            # are refused; when the server's specs did change, send them as those take them.
            key = _spec_key(model_name, signature_name, version, version_label)
            if not (coerce and error.code() == grpc.StatusCode.INVALID_ARGUMENT and self._refresh_input_specs(key)):
                raise
            request = self.predict_request(
                model_name, inputs, signature_name, version, version_label, output_filter, coerce
            )
            response = self.prediction.Predict(request, timeout=timeout or self.timeout)
        outputs = {alias: tf.make_ndarray(proto) for alias, proto in response.outputs.items()}
        if return_model_spec:
            return outputs, response.model_spec
        return outputs

    def signature_def_map(self, model_name: str, version=None, version_label=None, timeout=None):
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec, model_name, version, version_label)
        request.metadata_field.append("signature_def")
        response = self.prediction.GetModelMetadata(request, timeout=timeout or self.timeout)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return signature_map, response.model_spec

    def metadata(self, model_name: str, version=None, version_label=None, timeout=None) -> dict:
        """``{"model_spec": {...}, "signatures": {name: {"inputs": {alias: {dtype, shape}},
        "outputs": {...}, "method_name": ...}}}``."""
        signature_map, spec = self.signature_def_map(model_name, version, version_label, timeout)
        signatures = {}
        for name, sig in signature_map.signature_def.items():
            signatures[name] = {
                "method_name": sig.method_name,
                "inputs": {a: _tensor_info_dict(i) for a, i in sorted(sig.inputs.items())},
                "outputs": {a: _tensor_info_dict(i) for a, i in sorted(sig.outputs.items())},
            }
        return {
            "model_spec": {"name": spec.name, "version": spec.version.value},
            "signatures": signatures,
        }

    def status(self, model_name: str, version=None, version_label=None, timeout=None) -> list:
        """``[{"version", "state", "error_code", "error_message"}, ...]``."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model_name, version, version_label)
        response = self.models.GetModelStatus(request, timeout=timeout or self.timeout)
        states = get_model_status_pb2.ModelVersionStatus.State
        codes = {c.value[0]: c.name for c in grpc.StatusCode}
        return [
            {
                "version": s.version,
                "state": states.Name(s.state),
                "error_code": codes.get(s.status.error_code, str(s.status.error_code)),
                "error_message": s.status.error_message,
            }
            for s in response.model_version_status
        ]

    def _input_specs(self, key: tuple) -> dict:
        """{alias: TensorSpecInfo} of the signature's inputs (cached per :func:`_spec_key`); {}
        for a signature it lacks (the server then names the problem)."""
        if key not in self._spec_cache:
            model_name, signature_name, version, version_label = key
            signature_map, _ = self.signature_def_map(model_name, version, version_label)
            sig = signature_map.signature_def.get(signature_name)
            self._spec_cache[key] = {} if sig is None else {
                alias: TensorSpecInfo.from_tensor_info(alias, info) for alias, info in sig.inputs.items()
            }
        return self._spec_cache[key]

    def _refresh_input_specs(self, key: tuple) -> bool:
        """Fetches the input specs again; whether they differ from the cached ones (a request
        refused with the old ones may then pass). False when the server cannot say."""
        cached = self._spec_cache.pop(key, None)
        try:
            return self._input_specs(key) != cached
        except grpc.RpcError:
            return False  # the caller's own error says more than this one


def _spec_key(model_name: str, signature_name: str, version, version_label) -> tuple:
    """The input-spec cache key of a request. With no version (or a label) it names whichever
    version serves now, so a hot swap can make its entry stale: see ``_refresh_input_specs``."""
    return (model_name, signature_name or "serving_default", version, version_label)


def _coerce_inputs(inputs: dict, specs: dict) -> dict:
    """{alias: np.ndarray}: the values of inputs the signature has coerced to its specs, others
    as NumPy makes them (the server names an unknown input)."""
    return {alias: _coerce(value, specs[alias]) if alias in specs else np.asarray(value)
            for alias, value in inputs.items()}


def _is_json(value) -> bool:
    """Whether ``value`` is what JSON parses to: a str, number or bool, or lists of them."""
    if isinstance(value, list):
        return all(_is_json(child) for child in value)
    return isinstance(value, (str, int, float))  # bool is an int


def _coerce(value, spec: TensorSpecInfo) -> np.ndarray:
    """``value`` as the signature input ``spec`` takes it.

    A JSON value (what ``xmatch query`` parses: nested lists of str, int, float, bool) is
    decoded as the REST API decodes it: NumPy had made "003" item 3, and a row
    [1.0, 9007199254740993] float64, so item 2**53 + 1 was sent as 2**53. Other values (bytes,
    tuples, arrays, tensors) are cast, as TF Serving's own client takes them, if no value changes.
    """
    if _is_json(value):
        try:
            return json_to_ndarray(spec, value)
        except ServingError as error:
            raise ValueError(error.message) from None
    dtype = spec.dtype
    if dtype.name == "string":
        array = np.asarray(value, dtype=object)
        flat = [v.encode("utf-8") if isinstance(v, str) else v for v in array.reshape(-1)]
        if not all(isinstance(v, bytes) for v in flat):
            kind = sorted({type(v).__name__ for v in flat if not isinstance(v, bytes)})
            raise ValueError(f"input '{spec.alias}' expects strings, got values of type {', '.join(kind)}")
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(array.shape)
    target = np.dtype(dtype.as_numpy_dtype)
    given = np.asarray(value)
    if given.dtype.kind not in "biuf":
        # astype would parse "003" as 3.
        raise ValueError(f"input '{spec.alias}' expects {dtype.name} values, got an array of {given.dtype}")
    try:
        array = given.astype(target)
    except (OverflowError, TypeError, ValueError) as error:
        raise ValueError(f"value {value!r} does not fit the input's dtype {dtype.name}: {error}") from None
    # np.asarray(3.9, int32) would quietly send 3; a server that got 3 answers another question.
    if given.dtype.kind == "f" and target.kind in "iu" and not np.array_equal(array, given):
        raise ValueError(f"value {value!r} is not all integers, but the input's dtype is {dtype.name}")
    if given.dtype.kind in "iu" and target.kind in "iu" and not np.array_equal(array.astype(given.dtype), given):
        raise ValueError(f"value {value!r} does not fit the input's dtype {dtype.name}")
    return array


# --------------------------------------------------------------------------------------------


def _parse_inputs(items, inputs_json) -> dict:
    inputs = {}
    if inputs_json:
        text = inputs_json
        source = "the --inputs_json text"
        if not text.lstrip().startswith("{"):
            source = f"--inputs_json file {text!r}"
            with open(text, encoding="utf-8") as f:
                text = f.read()
        try:
            inputs.update(json.loads(text))
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from None
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--input {item!r} is not NAME=JSON")
        try:
            inputs[name] = json.loads(value)
        except json.JSONDecodeError as error:
            if value.lstrip()[:1] in ("[", "{", '"'):
                # Meant as JSON: sending it on as a string would fail later as a dtype error.
                raise ValueError(f"--input {name}: {value!r} is not valid JSON: {error}") from None
            inputs[name] = value  # a bare string
    return inputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xmatch query", description="Query a TF Serving protocol server over gRPC."
    )
    p.add_argument("--server", default="localhost:8500", help="host:port of the gRPC API")
    p.add_argument("--model_name", required=True)
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--version_label", default=None)
    p.add_argument("--signature_name", default="")
    p.add_argument("--input", action="append", metavar="NAME=JSON",
                   help="an input tensor as JSON, e.g. history=[[1,2,3,0,0]] (repeatable)")
    p.add_argument("--inputs_json", default=None,
                   help="all inputs as a JSON object, or a file holding one")
    p.add_argument("--output_filter", default="", help="comma-separated outputs to return")
    p.add_argument("--status", action="store_true", help="print the model's version status")
    p.add_argument("--metadata", action="store_true", help="print the model's signatures")
    p.add_argument("--timeout", type=_positive_seconds, default=10.0, help="seconds per call (default 10)")
    return p


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"the timeout must be a positive number of seconds, got {value}")
    return seconds


def main(argv=None) -> int:
    """``xmatch query``: prints the answer as JSON; returns 1 on an RPC error."""
    from tfx_xmatch.serving.codec import ndarray_to_json

    args = build_parser().parse_args(argv)
    try:
        with ServingClient(args.server, timeout=args.timeout) as client:
            if args.status:
                result = client.status(args.model_name, args.version, args.version_label)
                print(json.dumps({"model_version_status": result}, indent=1))
                return 0
            if args.metadata:
                result = client.metadata(args.model_name, args.version, args.version_label)
                print(json.dumps(result, indent=1))
                return 0
            inputs = _parse_inputs(args.input, args.inputs_json)
            if not inputs:
                print("error: give --input NAME=JSON, --inputs_json, --status or --metadata",
                      file=sys.stderr)
                return 2
            outputs, spec = client.predict(
                args.model_name,
                inputs,
                signature_name=args.signature_name,
                version=args.version,
                version_label=args.version_label,
                output_filter=[o for o in args.output_filter.split(",") if o],
                coerce=True,
                return_model_spec=True,
            )
            print(json.dumps({
                "model_spec": {
                    "name": spec.name,
                    "version": spec.version.value,
                    "signature_name": spec.signature_name,
                },
                "outputs": {a: ndarray_to_json(a, v) for a, v in sorted(outputs.items())},
            }, indent=1))
            return 0
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ValueError, OverflowError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
