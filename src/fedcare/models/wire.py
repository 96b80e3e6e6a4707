"""The wire format for model parameters and updates: safetensors, checked on the way in.

Nothing that crosses a trust boundary is unpickled. A payload is a safetensors
file holding named 1-D float32 vectors plus one JSON header (a pydantic model)
in the safetensors metadata. Decoding checks size, names, dtype, length and
finiteness before any number is used.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load, save

HEADER_KEY = "fedcare"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
"""A safetensors header lists one short entry per tensor: a megabyte is thousands."""
MAX_HEADER_DEPTH = 4
"""Our headers nest three deep (tensor, its fields, its shape); Python's JSON parser
recurses per level, so a deeper one is refused before it is parsed."""

H = TypeVar("H", bound=BaseModel)


class PayloadError(ValueError):
    """A payload that is malformed, oversized, or does not match what was expected."""


def encode(vectors: dict[str, NDArray[np.float32]], header: BaseModel) -> bytes:
    """Serialise named float32 vectors with a typed header."""
    arrays = {name: np.ascontiguousarray(v, dtype="<f4").reshape(-1) for name, v in vectors.items()}
    return save(arrays, metadata={HEADER_KEY: header.model_dump_json()})


def open_payload(
    data: bytes, header_type: type[H], max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[H, dict[str, NDArray[Any]]]:
    """Parse a payload's envelope: size, safetensors structure and the typed header.

    The arrays are returned as stored; callers check their names, dtypes and shapes.
    """
    if len(data) > max_bytes:
        raise PayloadError(f"payload is {len(data)} bytes, the limit is {max_bytes}")
    if len(data) < 8:
        raise PayloadError("payload is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise PayloadError("payload header length runs past the end of the payload")
    if header_len > MAX_HEADER_BYTES:
        raise PayloadError(f"payload header is {header_len} bytes, the limit is {MAX_HEADER_BYTES}")
    raw = data[8 : 8 + header_len]
    if (depth := json_depth(raw)) > MAX_HEADER_DEPTH:
        raise PayloadError(
            f"payload header nests {depth} levels deep, the limit is {MAX_HEADER_DEPTH}"
        )
    try:
        raw_header = json.loads(raw)
        arrays = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"payload is not a valid safetensors file: {exc}") from exc
    metadata = raw_header.get("__metadata__") if isinstance(raw_header, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get(HEADER_KEY), str):
        raise PayloadError(f"payload has no '{HEADER_KEY}' header")
    try:
        header = header_type.model_validate_json(metadata[HEADER_KEY])
    except ValidationError as exc:
        raise PayloadError(f"payload header is invalid: {exc}") from exc
    return header, arrays


def decode(
    data: bytes,
    header_type: type[H],
    expected: dict[str, int],
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[H, dict[str, NDArray[np.float32]]]:
    """Parse and check a payload: exactly the ``expected`` names and lengths, all finite."""
    header, arrays = open_payload(data, header_type, max_bytes)
    if set(arrays) != set(expected):
        raise PayloadError(
            f"payload holds tensors {sorted(arrays)}, expected exactly {sorted(expected)}"
        )
    out: dict[str, NDArray[np.float32]] = {}
    for name, length in expected.items():
        array = arrays[name]
        if array.dtype != np.float32:
            raise PayloadError(f"tensor '{name}' has dtype {array.dtype}, expected float32")
        if array.shape != (length,):
            raise PayloadError(f"tensor '{name}' has shape {array.shape}, expected ({length},)")
        if not np.all(np.isfinite(array)):
            raise PayloadError(f"tensor '{name}' contains NaN or infinite values")
        out[name] = array
    return header, out


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(text: bytes) -> int:
    """How deep JSON ``text`` nests (objects and arrays), counted without parsing it;
    brackets inside strings do not count, nor anything after a string left open.

    Strings are cut out by a regular expression and only the brackets left are walked:
    every payload's header is checked, and a byte-by-byte loop in Python cost more than
    the rest of decoding a small model's update."""
    structure = _JSON_STRING.sub(b"", text)
    unclosed = structure.find(b'"')
    if unclosed >= 0:
        structure = structure[:unclosed]
    depth = deepest = 0
    for bracket in _BRACKETS.findall(structure):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest
