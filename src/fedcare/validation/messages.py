"""What travels for validation: the candidate model to each site, its report and verdict back."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedcare.ids import SHA256_HEX, SITE_NAME
from fedcare.models.wire import PayloadError, decode, encode
from fedcare.validation.cells import ValidationReport
from fedcare.validation.gates import Verdict

MAX_REPLY_BYTES = 1024 * 1024
"""A report of a few dozen cells is a few tens of kB; anything far larger is refused."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ValidationTaskHeader(_Message):
    """Validate candidate ``release`` (the global model after ``round``) on held-out data.

    ``previous`` is this site's own report on the last promoted release, for
    ``no_drop`` gates; None when nothing has been promoted yet.
    """

    study_hash: str = Field(pattern=SHA256_HEX)
    release: int = Field(ge=1)
    round: int = Field(ge=1)
    previous: ValidationReport | None = None


class ValidationReply(_Message):
    """A site's report and verdict on one release."""

    study_hash: str = Field(pattern=SHA256_HEX)
    release: int = Field(ge=1)
    site: str = Field(pattern=SITE_NAME)
    report: ValidationReport
    verdict: Verdict


def encode_validation_task(header: ValidationTaskHeader, params: NDArray[np.float32]) -> bytes:
    return encode({"params": params}, header)


def decode_validation_task(
    data: bytes, n_params: int
) -> tuple[ValidationTaskHeader, NDArray[np.float32]]:
    header, vectors = decode(data, ValidationTaskHeader, {"params": n_params})
    return header, vectors["params"]


def encode_validation_reply(reply: ValidationReply) -> bytes:
    return reply.model_dump_json().encode("utf-8")


def decode_validation_reply(data: bytes) -> ValidationReply:
    """Parse a site's reply; refuses oversized, malformed or non-finite content."""
    if len(data) > MAX_REPLY_BYTES:
        raise PayloadError(f"validation reply is {len(data)} bytes, the limit is {MAX_REPLY_BYTES}")
    try:
        return ValidationReply.model_validate_json(data)
    except ValidationError as exc:
        raise PayloadError(f"validation reply is invalid: {exc}") from exc
