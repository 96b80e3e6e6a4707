"""What travels between coordinator and site in a round, and its wire encoding."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from fedcare.models.wire import DEFAULT_MAX_BYTES, decode, encode

SHA256_HEX = r"^[0-9a-f]{64}$"
SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class TaskHeader(BaseModel):
    """The coordinator's instruction for one round; the global model travels beside it.

    ``nonce`` is fresh each time the coordinator issues the round's task (and again
    after it restarts), so two issues of one round are two tasks: a site's privacy
    ledger charges each as its own release, with its own noise.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=1)
    seed: int = Field(ge=0)
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")


class UpdateHeader(BaseModel):
    """A site's reply for one round; the parameter delta travels beside it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=1)
    site: str = Field(pattern=SITE_NAME)
    n_samples: int = Field(ge=1)
    loss: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="Mean training loss; absent under differential privacy.",
    )


class TaskState(StrEnum):
    """What a site gets when it asks for work."""

    READY = "ready"
    WAIT = "wait"
    FINISHED = "finished"


@dataclass(frozen=True)
class TaskReply:
    """The answer to "is there work for me?": the encoded task when ``READY``."""

    state: TaskState
    payload: bytes = b""
    round: int = 0


@dataclass(frozen=True)
class Task:
    header: TaskHeader
    params: NDArray[np.float32]


@dataclass(frozen=True)
class SiteUpdate:
    header: UpdateHeader
    delta: NDArray[np.float32]


def encode_task(task: Task) -> bytes:
    return encode({"params": task.params}, task.header)


def decode_task(data: bytes, n_params: int, max_bytes: int = DEFAULT_MAX_BYTES) -> Task:
    header, vectors = decode(data, TaskHeader, {"params": n_params}, max_bytes)
    return Task(header=header, params=vectors["params"])


def encode_update(update: SiteUpdate) -> bytes:
    return encode({"delta": update.delta}, update.header)


def decode_update(data: bytes, n_params: int, max_bytes: int = DEFAULT_MAX_BYTES) -> SiteUpdate:
    header, vectors = decode(data, UpdateHeader, {"delta": n_params}, max_bytes)
    return SiteUpdate(header=header, delta=vectors["delta"])
