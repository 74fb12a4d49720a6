"""The pages' results as JSON, exactly: dataclasses by name (only the ones listed in `TYPES`), NumPy arrays as
base64 of their bytes with dtype and shape. No pickle: decoding builds only the listed classes and numeric
arrays, so a server or a stored file cannot make the reader run anything.

    text = json.dumps(encode(result))          # the model server's side
    result = decode(json.loads(text))          # the app's side: an equal AnalysisResult / ComparisonResult
"""

from __future__ import annotations

import base64
import dataclasses

import numpy as np

from ..errors import UserError
from ..evaluation.compare import Comparison, MethodResult
from ..pipeline.capture import PromptAnalysis
from ..presentation.views import AnalysisResult, ComparisonResult, DeviceInfo

TYPES = {cls.__name__: cls for cls in (AnalysisResult, ComparisonResult, Comparison, MethodResult, PromptAnalysis,
                                       DeviceInfo)}
DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"})
TYPE_KEY, ARRAY_KEY = "__type__", "__array__"


class WireError(UserError):
    """A message that is not a result this version can read."""


def encode(value):
    """`value` as plain JSON values: listed dataclasses, arrays, lists, tuples, dicts with text keys, numbers,
    text, None."""
    if dataclasses.is_dataclass(value) and type(value).__name__ in TYPES:
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {TYPE_KEY: type(value).__name__, **fields}
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        if array.dtype.name not in DTYPES:
            raise TypeError(f"cannot send an array of {array.dtype}")
        return {ARRAY_KEY: array.dtype.name, "shape": list(array.shape),
                "data": base64.b64encode(array.tobytes()).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): encode(item) for key, item in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot send a {type(value).__name__}")


def decode(value):
    """The value `encode` made; WireError for an unknown type, a bad array or missing fields."""
    if isinstance(value, list):
        return [decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    if ARRAY_KEY in value:
        return _array(value)
    if TYPE_KEY in value:
        name = value[TYPE_KEY]
        cls = TYPES.get(name) if isinstance(name, str) else None
        if cls is None:
            raise WireError(f"unknown result type {name!r:.40} in the backend's answer")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{key: decode(item) for key, item in value.items() if key in names})
        except TypeError as exc:
            raise WireError(f"a {name} in the backend's answer is incomplete ({exc})") from None
    return {key: decode(item) for key, item in value.items()}


def _array(value: dict) -> np.ndarray:
    dtype, shape, data = value.get(ARRAY_KEY), value.get("shape"), value.get("data")
    if dtype not in DTYPES or not isinstance(shape, list) or not isinstance(data, str):
        raise WireError("an array in the backend's answer has no readable dtype, shape or data")
    try:
        raw = base64.b64decode(data, validate=True)
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape([int(s) for s in shape]).copy()
    except (ValueError, TypeError) as exc:
        raise WireError(f"an array in the backend's answer is damaged ({exc})") from None
