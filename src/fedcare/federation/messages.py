"""What travels between coordinator and site in a round, and its wire encoding."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from fedcare.ids import SHA256_HEX, SITE_NAME
from fedcare.models.wire import DEFAULT_MAX_BYTES, decode, encode


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


class WithdrawReason(StrEnum):
    """Why a site cannot take part any more: a category, never anything about its data."""

    BUDGET = "budget"
    """Its privacy budget for the data set is spent."""
    APPROVAL = "approval"
    """Its approval of the study was withdrawn."""
    DATA = "data"
    """Its data no longer fits the study's schema."""


class Withdrawal(BaseModel):
    """A site telling the coordinator it stops taking part in a study."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str = Field(pattern=SHA256_HEX)
    site: str = Field(pattern=SITE_NAME)
    reason: WithdrawReason


class Ready(BaseModel):
    """Asynchronous secure aggregation: a site holds an update trained for ``round`` and
    can join the next flush's secure session. The update itself stays at the site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str = Field(pattern=SHA256_HEX)
    site: str = Field(pattern=SITE_NAME)
    round: int = Field(ge=1)


class RoundAlignment(BaseModel):
    """Drift during training: how a site's update for ``round`` relates to the
    consortium's step from the model it trained on to the next one (docs/drift.md).
    The site computes it; under secure aggregation the update itself never leaves."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    study_hash: str = Field(pattern=SHA256_HEX)
    site: str = Field(pattern=SITE_NAME)
    round: int = Field(ge=1)
    cosine: float = Field(ge=-1.0, le=1.0)
    loss: float | None = Field(
        default=None,
        ge=0.0,
        description="The new global model's loss on the site's held-out rows; withheld "
        "under DP and below the minimum cohort.",
    )


class Flush(BaseModel):
    """Asynchronous secure aggregation: the secure session that makes model version
    ``round``, among exactly ``sites``. Its SHA-256 binds the session, so a coordinator that
    shows two sites different flushes gets two sessions that cannot complete."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=1)
    sites: tuple[str, ...] = Field(min_length=1)
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")


class ModelHeader(BaseModel):
    """Header of a stored or served global model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=0)


class TaskState(StrEnum):
    """What a site gets when it asks for work."""

    READY = "ready"
    WAIT = "wait"
    FINISHED = "finished"
    JOIN = "join"
    """Asynchronous secure aggregation: join the flush in the payload (a :class:`Flush`)."""


@dataclass(frozen=True)
class TaskReply:
    """The answer to "is there work for me?": the encoded task when ``READY``, the
    flush's JSON when ``JOIN``."""

    state: TaskState
    payload: bytes = b""
    round: int = 0
    sites: tuple[str, ...] = ()
    """With the task of a synchronous secure round: the sites of its session, which the
    site binds into the session it sets up (so a list that differs between sites makes
    sessions that differ, and the round fails instead of leaking)."""


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


_last_task: tuple[bytes, int, Task] | None = None
"""The last task decoded in this process, by the very bytes object it came from."""


def decode_task(data: bytes, n_params: int, max_bytes: int = DEFAULT_MAX_BYTES) -> Task:
    """The checked task, its parameters read-only. A simulation hands every site the one
    bytes object of a round's task; it is decoded and checked once, not once per site
    (bytes are immutable, and the last one is held, so its identity is not reused)."""
    global _last_task
    last = _last_task
    if last is not None and last[0] is data and last[1] == n_params and len(data) <= max_bytes:
        return last[2]
    header, vectors = decode(data, TaskHeader, {"params": n_params}, max_bytes)
    params = vectors["params"]
    params.flags.writeable = False
    task = Task(header=header, params=params)
    _last_task = (data, n_params, task)
    return task


def encode_update(update: SiteUpdate) -> bytes:
    return encode({"delta": update.delta}, update.header)


def decode_update(data: bytes, n_params: int, max_bytes: int = DEFAULT_MAX_BYTES) -> SiteUpdate:
    header, vectors = decode(data, UpdateHeader, {"delta": n_params}, max_bytes)
    return SiteUpdate(header=header, delta=vectors["delta"])


def encode_model(
    study_hash: str,
    number: int,
    params: NDArray[np.float32],
    state: dict[str, NDArray[np.float32]] | None = None,
) -> bytes:
    """A model payload: the parameters and, for the coordinator's own files, the server
    optimiser's state."""
    vectors = {"params": params, **{f"opt.{k}": v for k, v in (state or {}).items()}}
    return encode(vectors, ModelHeader(study_hash=study_hash, round=number))


def decode_model(
    data: bytes, n_params: int, state_names: tuple[str, ...] = ()
) -> tuple[ModelHeader, NDArray[np.float32], dict[str, NDArray[np.float32]]]:
    """Parse a model payload holding the parameters and exactly ``state_names`` of state.

    Stored model files carry the server optimiser's state (written after it has
    stepped at least once); models served to sites carry parameters only (``()``).
    """
    expected = {"params": n_params, **{f"opt.{k}": n_params for k in state_names}}
    header, vectors = decode(data, ModelHeader, expected, max_bytes=len(data))
    state = {k.removeprefix("opt."): v for k, v in vectors.items() if k.startswith("opt.")}
    return header, vectors["params"], state
