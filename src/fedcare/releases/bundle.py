"""An exported release: everything a hospital needs to score its own patients with it.

``fedcare release export`` writes a folder with the model, the study (schema,
transforms, missing-value rules, reference scaling), the operating threshold
and a manifest that binds them by hash. What a study fits at each site
(site scaling, a median fill) is not in it: that belongs to the site and is
kept in the site's state (:class:`SitePreprocessing`), never sent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedcare.ids import SHA256_HEX
from fedcare.models.size import study_parameter_count
from fedcare.models.wire import PayloadError, decode
from fedcare.schema.preprocess import Preprocessor, declared_preprocessor
from fedcare.study import Study, StudyError, parse_study

BUNDLE_VERSION = 1
MANIFEST = "release.json"
MODEL = "model.safetensors"
STUDY = "study.json"


class BundleError(ValueError):
    """A release folder that is incomplete, altered, or not for this use."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelHeader(_Frozen):
    """Header of a release's model file (the registry's own header)."""

    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=1)


class ReleaseManifest(_Frozen):
    """``release.json``: what the folder holds and the hashes that bind it."""

    bundle_version: int = BUNDLE_VERSION
    release: int
    study_name: str
    study_hash: str = Field(pattern=SHA256_HEX)
    round: int = Field(ge=1)
    model_sha256: str = Field(pattern=SHA256_HEX)
    threshold: float = Field(ge=0.0, le=1.0)
    inputs: list[str] = Field(description="Model input columns, in order.")
    reference_preprocessing: Preprocessor | None = Field(
        description="The study's declared imputation and scaling, the same at every site; "
        "None when the study fits some of it at each site (see site_fitted)."
    )
    site_fitted: list[str] = Field(
        description="Features whose fill or scaling each site fits on its own rows."
    )


class SitePreprocessing(_Frozen):
    """What one site fitted for one study, kept in the site's state for prediction."""

    site: str
    study_hash: str = Field(pattern=SHA256_HEX)
    preprocessor: Preprocessor


def manifest_for(
    study: Study, release: int, round_number: int, model_sha256: str
) -> ReleaseManifest:
    """The manifest of an exported release."""
    schema = study.feature_schema
    scaling = study.preprocessing.scaling
    return ReleaseManifest(
        release=release,
        study_name=study.name,
        study_hash=study.content_hash,
        round=round_number,
        model_sha256=model_sha256,
        threshold=study.validation.threshold,
        inputs=schema.input_names(),
        reference_preprocessing=declared_preprocessor(schema, scaling),
        site_fitted=_site_fitted(study),
    )


def _site_fitted(study: Study) -> list[str]:
    from fedcare.schema.features import SITE_FITTED, FeatureType
    from fedcare.study import Scaling

    site_scaled = study.preprocessing.scaling is Scaling.SITE
    return [
        f.name
        for f in study.feature_schema.features
        if f.missing.rule in SITE_FITTED or (site_scaled and f.type is FeatureType.CONTINUOUS)
    ]


@dataclass(frozen=True)
class ReleaseBundle:
    """A release folder, read and checked."""

    manifest: ReleaseManifest
    study: Study
    params: NDArray[np.float32]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; export the release again") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read: {exc.strerror}") from exc


def load_bundle(folder: Path) -> ReleaseBundle:
    """Read an exported release, refusing any file that does not match the manifest."""
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a release folder (fedcare release export --out ...)")
    try:
        manifest = ReleaseManifest.model_validate_json(_read(folder / MANIFEST))
    except ValidationError as exc:
        raise BundleError(f"{folder / MANIFEST}: not a valid release manifest:\n{exc}") from exc
    if manifest.bundle_version != BUNDLE_VERSION:
        raise BundleError(f"{folder}: release format {manifest.bundle_version} is not supported")
    try:
        study = parse_study(_read(folder / STUDY).decode("utf-8"), str(folder / STUDY))
    except (StudyError, UnicodeDecodeError) as exc:
        raise BundleError(f"{folder / STUDY}: {exc}") from exc
    if study.content_hash != manifest.study_hash:
        raise BundleError(f"{folder / STUDY}: the study's hash does not match the manifest")
    payload = _read(folder / MODEL)
    if hashlib.sha256(payload).hexdigest() != manifest.model_sha256:
        raise BundleError(f"{folder / MODEL}: the model's SHA-256 does not match the manifest")
    n_params = study_parameter_count(study)
    try:
        header, vectors = decode(payload, ModelHeader, {"params": n_params}, len(payload))
    except PayloadError as exc:
        raise BundleError(f"{folder / MODEL}: {exc}") from exc
    if header.study_hash != manifest.study_hash or header.round != manifest.round:
        raise BundleError(f"{folder / MODEL}: the model is from another release")
    # Everything else in the manifest follows from the study; an edited threshold or
    # preprocessing would score patients by rules no site approved.
    if manifest != manifest_for(study, manifest.release, manifest.round, manifest.model_sha256):
        raise BundleError(f"{folder / MANIFEST}: does not match the study it ships with")
    return ReleaseBundle(manifest, study, vectors["params"])


def site_preprocessing_path(state_dir: Path, study_hash: str) -> Path:
    """Where a site agent keeps what it fitted for a study."""
    return state_dir / "preprocessing" / f"{study_hash}.json"


def save_site_preprocessing(
    state_dir: Path, site: str, study_hash: str, preprocessor: Preprocessor
) -> Path:
    """Keep what a site fitted for a study in its state, for ``fedcare predict``."""
    path = site_preprocessing_path(state_dir, study_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = SitePreprocessing(site=site, study_hash=study_hash, preprocessor=preprocessor)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(record.model_dump_json(indent=2), encoding="utf-8")
    partial.replace(path)
    return path


def load_site_preprocessing(path: Path, manifest: ReleaseManifest) -> Preprocessor:
    """A site's fitted preprocessing for the release's study, or a clear error."""
    try:
        fitted = SitePreprocessing.model_validate_json(_read(path))
    except ValidationError as exc:
        raise BundleError(f"{path}: not a site's fitted preprocessing:\n{exc}") from exc
    if fitted.study_hash != manifest.study_hash:
        raise BundleError(
            f"{path}: fitted for study {fitted.study_hash[:12]}, the release is of "
            f"{manifest.study_hash[:12]}"
        )
    return fitted.preprocessor
