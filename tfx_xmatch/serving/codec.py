"""Tensor encodings: TensorProto (gRPC) and TF Serving's JSON (REST) <-> NumPy.

Every decoder checks the value against the signature's TensorSpec (dtype, rank, known
dimensions) and raises INVALID_ARGUMENT naming the input and the problem.
"""

from __future__ import annotations

import base64
import binascii
import math

import numpy as np

from tfx_xmatch.serving import errors
from tfx_xmatch.serving.model_manager import TensorSpecInfo

# Refuse to materialise absurdly large tensors from a small message (a TensorProto may declare a
# huge shape with one value, which TF expands): at most as many elements, or bytes, as the
# largest message the gRPC server accepts by default could carry.
MAX_TENSOR_ELEMENTS = 1 << 28
MAX_EXPANDED_BYTES = 64 << 20
MAX_JSON_RANK = 64


def shape_str(shape) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def check_shape(spec: TensorSpecInfo, shape: tuple) -> None:
    """Raises INVALID_ARGUMENT when ``shape`` is incompatible with the signature's spec."""
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise errors.invalid_argument(
            f"input '{spec.alias}' must have rank {len(spec.shape)} (signature shape "
            f"{spec.shape_str()}) but the request has rank {len(shape)} (shape {shape_str(shape)})"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, shape)):
        if want is not None and want != got:
            raise errors.invalid_argument(
                f"input '{spec.alias}' dimension {axis} must be {want} (signature shape "
                f"{spec.shape_str()}) but the request has shape {shape_str(shape)}"
            )


# --------------------------------------------------------------------------------------------
# TensorProto


def tensor_proto_to_ndarray(spec: TensorSpecInfo, proto) -> np.ndarray:
    """Decodes one request TensorProto, checking dtype and shape against ``spec`` first."""
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    alias = spec.alias
    if proto.dtype == types_pb2.DT_INVALID:
        raise errors.invalid_argument(f"tensor parsing error: input '{alias}' has no dtype")
    try:
        got = tf.dtypes.as_dtype(proto.dtype)
    except TypeError:
        raise errors.invalid_argument(
            f"tensor parsing error: input '{alias}' has an unknown dtype {proto.dtype}"
        ) from None
    if got != spec.dtype:
        raise errors.invalid_argument(
            f"input '{alias}' has dtype {got.name} but the signature expects "
            f"{spec.dtype.name}"
        )
    if proto.tensor_shape.unknown_rank:
        raise errors.invalid_argument(f"tensor parsing error: input '{alias}' has no shape")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise errors.invalid_argument(
            f"tensor parsing error: input '{alias}' has a negative dimension {shape_str(shape)}"
        )
    check_shape(spec, shape)
    num_elements = math.prod(shape)
    if num_elements > MAX_TENSOR_ELEMENTS:
        raise errors.invalid_argument(
            f"input '{alias}' has {num_elements} elements, more than the limit "
            f"{MAX_TENSOR_ELEMENTS}"
        )
    if got != tf.string and num_elements * got.size > max(MAX_EXPANDED_BYTES, proto.ByteSize()):
        raise errors.invalid_argument(
            f"input '{alias}' of shape {shape_str(shape)} would expand to {num_elements * got.size} bytes of "
            f"{got.name}, more than the limit {MAX_EXPANDED_BYTES}"
        )
    if proto.tensor_content and got != tf.string:
        expected = num_elements * got.size
        if len(proto.tensor_content) != expected:
            raise errors.invalid_argument(
                f"tensor parsing error: input '{alias}' of shape {shape_str(shape)} and dtype "
                f"{got.name} needs {expected} bytes of tensor_content, got "
                f"{len(proto.tensor_content)}"
            )
    field = "string_val" if got == tf.string else _VALUE_FIELDS.get(got.name)
    if field and not proto.tensor_content and len(getattr(proto, field)) > num_elements:
        # TF Serving keeps the first values and drops the rest; a client that sends more values
        # than its shape holds has a bug worth hearing about (serving/README's differences).
        raise errors.invalid_argument(
            f"tensor parsing error: input '{alias}' declares shape {shape_str(shape)} "
            f"({num_elements} values) but holds {len(getattr(proto, field))} values in {field}"
        )
    try:
        array = tf.make_ndarray(proto)
    except Exception as exc:
        raise errors.invalid_argument(f"tensor parsing error: input '{alias}': {exc}") from None
    if tuple(array.shape) != shape:
        raise errors.invalid_argument(
            f"tensor parsing error: input '{alias}' declares shape {shape_str(shape)} but "
            f"holds {array.size} values"
        )
    return array


# TensorProto's typed value field per dtype. TF Serving answers Predict with these fields
# (Tensor::AsProtoField), not tensor_content: clients read e.g. outputs["scores"].float_val.
_VALUE_FIELDS = {"float32": "float_val", "float64": "double_val", "int32": "int_val", "int16": "int_val",
                 "int8": "int_val", "uint8": "int_val", "uint16": "int_val", "int64": "int64_val",
                 "uint32": "uint32_val", "uint64": "uint64_val", "bool": "bool_val"}


def ndarray_to_tensor_proto(array: np.ndarray):
    """An output as TF Serving writes it: dtype, shape and the dtype's repeated value field."""
    import tensorflow as tf

    array = np.asarray(array)
    field = "string_val" if array.dtype.kind in "OSU" else _VALUE_FIELDS.get(array.dtype.name)
    if field is None:  # half, bfloat16, complex: tensor_content, which make_ndarray also reads
        return tf.make_tensor_proto(array)
    from tensorflow.core.framework import tensor_pb2

    dtype = tf.string if field == "string_val" else tf.as_dtype(array.dtype)
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum, tensor_shape=tf.TensorShape(array.shape).as_proto())
    if field == "string_val":
        values = [value if isinstance(value, bytes) else str(value).encode("utf-8") for value in array.ravel()]
    else:
        values = array.ravel().tolist()
    getattr(proto, field).extend(values)
    return proto


# --------------------------------------------------------------------------------------------
# JSON


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "booleans"
    if isinstance(value, int):
        return "integers"
    if isinstance(value, float):
        return "floating-point numbers"
    if isinstance(value, str):
        return "strings"
    if isinstance(value, dict):
        return "objects"
    return type(value).__name__


_ASCII_WHITESPACE = str.maketrans("", "", " \t\n\v\f\r")


def _b64decode(text: str) -> bytes:
    """Base64 as TF Serving decodes it (absl::Base64Unescape): ASCII whitespace is skipped, the
    padding ("=" or ".") may be left out, but other characters, padding where none belongs or
    the wrong amount of it are refused.

    Raises:
      ValueError: ``text`` is not such base64.
    """
    compact = text.translate(_ASCII_WHITESPACE)
    data = compact.rstrip("=.")
    padding = len(compact) - len(data)
    expected = -len(data) % 4
    if len(data) % 4 == 1 or (padding and padding != expected):
        raise ValueError(f"{padding} padding character(s) after {len(data)} base64 characters")
    return base64.b64decode(data + "=" * expected, validate=True)


def _string_tensor(alias: str, value) -> np.ndarray:
    """Nested JSON lists of strings / {"b64": ...} -> object array of bytes."""
    leaves: list = []

    def walk(node, depth):
        if isinstance(node, list):
            if depth >= MAX_JSON_RANK:
                # Far beyond any signature's rank; deeper would exhaust Python's recursion (an
                # INTERNAL error for what is a bad request).
                raise errors.invalid_argument(f"input '{alias}' nests lists deeper than {MAX_JSON_RANK} levels")
            sub_shapes = [walk(child, depth + 1) for child in node]
            if any(s != sub_shapes[0] for s in sub_shapes[1:]):
                raise errors.invalid_argument(
                    f"input '{alias}' is a ragged list (nested lists of different lengths); "
                    "tensors must be rectangular"
                )
            return (len(node),) + (sub_shapes[0] if sub_shapes else ())
        if isinstance(node, str):
            try:
                leaves.append(node.encode("utf-8"))
            except UnicodeEncodeError as error:  # "\udcff": an escape RapidJSON refuses too
                raise errors.invalid_argument(
                    f"input '{alias}' holds the escape \\u{ord(node[error.start]):04x}, half of a "
                    "surrogate pair, which is no character; send bytes as {\"b64\": ...}"
                ) from None
            return ()
        if isinstance(node, dict) and set(node) == {"b64"} and isinstance(node["b64"], str):
            try:
                leaves.append(_b64decode(node["b64"]))
            except (binascii.Error, ValueError):
                raise errors.invalid_argument(
                    f"input '{alias}' has a \"b64\" value that is not valid base64"
                ) from None
            return ()
        raise errors.invalid_argument(
            f"input '{alias}' expects string values (JSON strings or {{\"b64\": ...}}) but the "
            f"JSON holds {_json_kind(node)}"
        )

    shape = walk(value, 0)
    array = np.empty(len(leaves), dtype=object)
    array[:] = leaves
    return array.reshape(shape)


def json_to_ndarray(spec: TensorSpecInfo, value) -> np.ndarray:
    """Decodes one JSON tensor value with the signature's dtype and checks its shape."""
    import tensorflow as tf

    alias, dtype = spec.alias, spec.dtype
    if dtype == tf.string:
        array = _string_tensor(alias, value)
        check_shape(spec, array.shape)
        return array
    # One walk over the leaves answers every question about their JSON types (a few ms for 10^6).
    leaf_types = _leaf_types(value)
    for kind, name in ((str, "strings"), (dict, "objects")):
        if kind in leaf_types:
            raise errors.invalid_argument(
                f"input '{alias}' expects {dtype.name} values but the JSON holds {name}"
            )
    if type(None) in leaf_types:
        # NumPy reads [1.5, null] as [1.5, nan] for a float input; TF Serving's decoder refuses a
        # null as no number, as it is for every dtype.
        raise errors.invalid_argument(
            f"input '{alias}' expects {dtype.name} values but the JSON holds null among them"
        )
    try:
        raw = np.asarray(value)
    except (ValueError, OverflowError):
        raise errors.invalid_argument(
            f"input '{alias}' is not a rectangular tensor of {dtype.name} values (ragged nested "
            "lists or mixed value types)"
        ) from None
    if raw.dtype == object and dtype.is_floating:
        # Integers past 64 bits: RapidJSON reads them as doubles, which a float input takes.
        try:
            raw = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            pass
    if raw.dtype == object or raw.dtype.kind in "USV":
        raise errors.invalid_argument(
            f"input '{alias}' expects {dtype.name} values but the JSON holds values that are "
            "not all numbers (or integers too large for 64 bits)"
        )
    check_shape(spec, raw.shape)
    target = np.dtype(dtype.as_numpy_dtype)
    kind = raw.dtype.kind
    if not dtype.is_bool and kind != "b" and bool in leaf_types:
        # NumPy reads [1, true] as [1, 1]; TF Serving's decoder refuses a bool for a number.
        raise errors.invalid_argument(
            f"input '{alias}' expects {dtype.name} values but the JSON holds a boolean (true/false) "
            "among them"
        )
    if raw.size:
        if dtype.is_bool:
            if kind != "b":
                raise errors.invalid_argument(
                    f"input '{alias}' expects bool values (true/false) but the JSON holds "
                    f"{_json_kind(raw.flat[0].item())}"
                )
        elif dtype.is_integer:
            if kind not in "iu":
                raise errors.invalid_argument(
                    f"input '{alias}' expects {dtype.name} values but the JSON holds "
                    f"{_json_kind(raw.flat[0].item())}"
                )
            info = np.iinfo(target)
            if raw.min() < info.min or raw.max() > info.max:
                raise errors.invalid_argument(
                    f"input '{alias}' has values outside the range of {dtype.name}"
                )
        elif dtype.is_floating:
            if kind not in "iuf":
                raise errors.invalid_argument(
                    f"input '{alias}' expects {dtype.name} values but the JSON holds "
                    f"{_json_kind(raw.flat[0].item())}"
                )
            _check_lossless(alias, value, raw, target, leaf_types)
        else:
            raise errors.invalid_argument(
                f"input '{alias}' has dtype {dtype.name}, which the JSON API does not support"
            )
    return raw.astype(target)


def _leaf_types(value) -> set:
    """The Python types of the leaves of nested lists (by the type set of each innermost list: C
    loops; a list among scalars, a ragged row, shows as ``list``)."""
    if isinstance(value, list):
        if value and not isinstance(value[0], list):
            return set(map(type, value))
        types: set = set()
        for item in value:
            types |= _leaf_types(item)
        return types
    return {type(value)}


def _json_integers(value) -> list:
    """The JSON integers among the leaves of nested lists, in order (NumPy makes a list that mixes
    integers and floats all floats, so only the JSON tells which were integers)."""
    if isinstance(value, list):
        if value and not isinstance(value[0], list):
            return [item for item in value if type(item) is int]
        return [number for item in value for number in _json_integers(item)]
    return [value] if type(value) is int else []


def _check_lossless(alias: str, value, raw: np.ndarray, target: np.dtype, leaf_types: set) -> None:
    """Refuses values the float dtype cannot hold, as TF Serving's JSON decoder does
    (IsLosslessDecimal): integers past its exact range (2^24 - 1 for float32) and finite
    numbers past its largest; NaN and Infinity pass."""
    info = np.finfo(target)
    limit = (1 << (info.nmant + 1)) - 1
    if raw.dtype.kind in "iu":  # every leaf an integer of at most 64 bits
        # float64 holds every integer up to 2^53 exactly, so the comparison is exact at the limit.
        lossy = raw[np.abs(raw.astype(np.float64)) > limit].tolist()
    elif int in leaf_types:
        # Only integers RapidJSON holds as integers must be exact; past 64 bits it holds a double.
        lossy = [number for number in _json_integers(value) if limit < abs(number) and -(1 << 63) <= number < (1 << 64)]
    else:
        lossy = []
    if not lossy and raw.dtype.kind == "f":
        finite = raw[np.isfinite(raw)]
        lossy = finite[np.abs(finite) > info.max].tolist()
    if lossy:
        name = {"float32": "float", "float64": "double"}.get(target.name, target.name)
        raise errors.invalid_argument(
            f"Cannot convert JSON value: {lossy[0]} to {name} without loss of precision (input '{alias}')"
        )


def _bytes_to_json(value: bytes, force_b64: bool):
    if not force_b64:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(value).decode("ascii")}


def ndarray_to_json(alias: str, array: np.ndarray):
    """One output tensor -> JSON value (TF Serving's conventions: ``*_bytes`` outputs as b64)."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind == "S":
        force = alias.endswith("_bytes")
        flat = [_bytes_to_json(bytes(v), force) for v in array.reshape(-1)]
        if array.ndim == 0:
            return flat[0]
        nested = np.empty(len(flat), dtype=object)
        nested[:] = flat
        return nested.reshape(array.shape).tolist()
    if array.dtype.kind == "f" and array.dtype.itemsize < 8:
        # Shortest decimal form of each float32 (0.1, not 0.10000000149011612), like TF Serving.
        return array.astype(np.str_).astype(np.float64).tolist()
    if array.dtype.kind == "c":
        raise errors.invalid_argument(
            f"output '{alias}' has a complex dtype, which the JSON API does not support"
        )
    return array.tolist()
