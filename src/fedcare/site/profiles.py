"""A site's reference profiles: one per candidate it validated, frozen when the
candidate is promoted, dropped when it is rejected. Kept in the site's state folder
(``profiles/<study hash>/``), beside the ledger; nothing here leaves the site."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from fedcare.drift.profile import ReferenceProfile, build_profile
from fedcare.durable import write_file_atomically
from fedcare.training import predict_proba

if TYPE_CHECKING:
    from fedcare.site.worker import CandidateValidation, SiteWorker

PARAMS = "params"
_FROZEN = re.compile(r"^release-(\d+)\.json$")
_PENDING = re.compile(r"^pending-(\d+)\.json$")


class ProfileError(ValueError):
    """No usable reference profile (none frozen yet, or a damaged file)."""


def candidate_profile(worker: SiteWorker, candidate: CandidateValidation) -> ReferenceProfile:
    """The profile of a candidate on this site's held-out rows, as it validated it."""
    data = worker.data
    study = worker.study
    # The inputs' distributions do not depend on the model, so every row describes them;
    # under DP only the held-out rows, since DP-SGD's epsilon covers the training rows and
    # a drift summary computed from them would leave uncounted.
    inputs = None
    if not study.privacy.dp and data.train_frame is not None:
        inputs = pd.concat([data.train_frame, data.test_frame], ignore_index=True)
    scores = predict_proba(study.model, candidate.params, data.x_test).astype(np.float64)
    return build_profile(
        study_hash=study.content_hash,
        site=data.name,
        release=candidate.header.release,
        round_number=candidate.header.round,
        frozen_at=datetime.now(UTC),
        frame=data.test_frame,
        schema=study.feature_schema,
        labels=data.y_test.astype(np.int64),
        scores=scores,
        threshold=study.validation.threshold,
        preprocessor=data.preprocessor,
        report=candidate.reply.report,
        inputs=inputs,
    )


class ProfileStore:
    """The profiles of one study at one site."""

    def __init__(self, state_dir: Path, study_hash: str) -> None:
        self.folder = state_dir / "profiles" / study_hash

    def _ids(self, pattern: re.Pattern[str]) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = (pattern.match(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def pending(self) -> list[int]:
        """Candidates validated here whose fate this site has not learnt yet."""
        return self._ids(_PENDING)

    def frozen(self) -> list[int]:
        """Promoted releases with a frozen profile."""
        return self._ids(_FROZEN)

    def keep_candidate(self, profile: ReferenceProfile, params: NDArray[np.float32]) -> None:
        """Keep a candidate's profile and parameters until it is settled."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"pending-{profile.release}"
        write_file_atomically(
            self.folder / f"{stem}.params", save_tensors({PARAMS: np.ascontiguousarray(params)})
        )
        write_file_atomically(
            self.folder / f"{stem}.json", profile.model_dump_json().encode("utf-8")
        )

    def settle(self, release: int, state: str) -> bool:
        """Freeze a promoted candidate's profile, drop a rejected one's; True if frozen."""
        stem = self.folder / f"pending-{release}"
        if state == "promoted":
            (stem.with_suffix(".params")).replace(self.folder / f"release-{release}.params")
            (stem.with_suffix(".json")).replace(self.folder / f"release-{release}.json")
            return True
        if state == "rejected":
            stem.with_suffix(".json").unlink(missing_ok=True)
            stem.with_suffix(".params").unlink(missing_ok=True)
        return False

    def load(self, release: int | None = None) -> tuple[ReferenceProfile, NDArray[np.float32]]:
        """A frozen profile and its release's parameters: ``release``, or the latest."""
        frozen = self.frozen()
        if not frozen:
            raise ProfileError(
                f"no release of study {self.folder.name[:12]} has a frozen profile in "
                f"{self.folder}: profiles are frozen when a release this site validated is "
                "promoted"
            )
        chosen = frozen[-1] if release is None else release
        if chosen not in frozen:
            listed = ", ".join(str(r) for r in frozen)
            raise ProfileError(f"release {chosen} has no frozen profile here (frozen: {listed})")
        stem = self.folder / f"release-{chosen}"
        try:
            profile = ReferenceProfile.model_validate_json(stem.with_suffix(".json").read_bytes())
            params = load_tensors(stem.with_suffix(".params").read_bytes())[PARAMS]
        except (OSError, ValidationError, SafetensorError, KeyError) as exc:
            raise ProfileError(f"{stem}: the profile cannot be read: {exc}") from exc
        return profile, params.astype(np.float32)
