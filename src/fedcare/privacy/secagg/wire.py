"""The masked input on the wire: one safetensors vector of uint32/uint64 and a typed header."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import save

from fedcare.ids import SHA256_HEX, SITE_NAME
from fedcare.models.wire import DEFAULT_MAX_BYTES, HEADER_KEY, PayloadError, open_payload
from fedcare.privacy.secagg.prg import dtype_for

MASKED = "masked"


class MaskedHeader(BaseModel):
    """Who sent a masked input, for which session; ``loss`` is the site's mean training loss
    (absent under differential privacy, where it would leave the site unprotected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=1)
    session: str = Field(pattern=SHA256_HEX)
    site: str = Field(pattern=SITE_NAME)
    bits: int
    loss: float | None = Field(default=None, allow_inf_nan=False)


def encode_masked(header: MaskedHeader, masked: NDArray[np.unsignedinteger]) -> bytes:
    dtype = np.dtype(dtype_for(header.bits)).newbyteorder("<")
    array = np.ascontiguousarray(masked, dtype=dtype).reshape(-1)
    return save({MASKED: array}, metadata={HEADER_KEY: header.model_dump_json()})


def decode_masked(
    data: bytes, length: int, bits: int, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[MaskedHeader, NDArray[np.unsignedinteger]]:
    """Parse and check a masked input: exactly one vector of ``length`` ``bits``-bit values."""
    header, arrays = open_payload(data, MaskedHeader, max_bytes)
    if set(arrays) != {MASKED}:
        raise PayloadError(f"payload holds tensors {sorted(arrays)}, expected ['{MASKED}']")
    array = arrays[MASKED]
    if header.bits != bits or array.dtype != dtype_for(bits) or array.shape != (length,):
        raise PayloadError(f"the masked input must be {length} values of {bits} bits")
    return header, array
