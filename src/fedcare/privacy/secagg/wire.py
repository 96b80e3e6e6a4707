"""The masked input on the wire: one safetensors vector of uint32/uint64 and a typed header."""

from __future__ import annotations

import json
import struct

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedcare.federation.messages import SHA256_HEX, SITE_NAME
from fedcare.models.wire import DEFAULT_MAX_BYTES, HEADER_KEY, PayloadError
from fedcare.privacy.secagg.prg import dtype_for

MASKED = "masked"


class MaskedHeader(BaseModel):
    """Who sent a masked input, for which round; ``loss`` is the site's mean training loss."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=1)
    site: str = Field(pattern=SITE_NAME)
    bits: int
    loss: float = Field(allow_inf_nan=False)


def encode_masked(header: MaskedHeader, masked: NDArray[np.unsignedinteger]) -> bytes:
    dtype = np.dtype(dtype_for(header.bits)).newbyteorder("<")
    array = np.ascontiguousarray(masked, dtype=dtype).reshape(-1)
    return save({MASKED: array}, metadata={HEADER_KEY: header.model_dump_json()})


def decode_masked(
    data: bytes, length: int, bits: int, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[MaskedHeader, NDArray[np.unsignedinteger]]:
    """Parse and check a masked input: exactly one vector of ``length`` ``bits``-bit values."""
    if len(data) > max_bytes:
        raise PayloadError(f"payload is {len(data)} bytes, the limit is {max_bytes}")
    if len(data) < 8:
        raise PayloadError("payload is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise PayloadError("payload header length runs past the end of the payload")
    try:
        raw_header = json.loads(data[8 : 8 + header_len])
        arrays = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"payload is not a valid safetensors file: {exc}") from exc
    metadata = raw_header.get("__metadata__") or {}
    try:
        header = MaskedHeader.model_validate_json(metadata.get(HEADER_KEY, ""))
    except ValidationError as exc:
        raise PayloadError(f"masked input header is invalid: {exc}") from exc
    if set(arrays) != {MASKED}:
        raise PayloadError(f"payload holds tensors {sorted(arrays)}, expected ['{MASKED}']")
    array = arrays[MASKED]
    if header.bits != bits or array.dtype != dtype_for(bits) or array.shape != (length,):
        raise PayloadError(f"the masked input must be {length} values of {bits} bits")
    return header, array
