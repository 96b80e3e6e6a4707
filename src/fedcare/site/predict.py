"""Score a site's patients with an exported release, at the site.

The rows go through the same path as training and validation: the site's
mapping (every schema rule, nothing changed silently), the study's transforms,
and the release's declared preprocessing or the site's own fitted one. A
table that breaks the schema is refused, and nothing is scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from fedcare.releases.bundle import BundleError, ReleaseBundle
from fedcare.schema.mapping import SiteMapping, Violation, apply_mapping
from fedcare.schema.preprocess import Preprocessor
from fedcare.training import predict_proba

SCORE = "score"
FLAGGED = "flagged"
ROW = "row"


def preprocessing_for(bundle: ReleaseBundle, fitted: Preprocessor | None) -> Preprocessor:
    """The release's declared preprocessing, or the site's fitted one when the study
    fits some of it at each site; refuses a fitted one the release does not need."""
    declared = bundle.manifest.reference_preprocessing
    if declared is not None:
        if fitted is not None and fitted != declared:
            raise BundleError(
                "the release declares all of its preprocessing; the site's fitted file "
                "differs from it and is not used: drop --preprocessing"
            )
        return declared
    if fitted is None:
        raise BundleError(
            "this study fits imputation or scaling at each site ("
            + ", ".join(bundle.manifest.site_fitted)
            + "): pass --preprocessing STATE_DIR/preprocessing/"
            f"{bundle.manifest.study_hash}.json, written by the site agent"
        )
    return fitted


def score_table(
    bundle: ReleaseBundle,
    frame: pd.DataFrame,
    mapping: SiteMapping,
    preprocessor: Preprocessor,
    keep: Sequence[str] = (),
) -> tuple[pd.DataFrame, tuple[Violation, ...]]:
    """One row per input row: ``row`` (its position in the file), any ``keep`` columns
    as they were, ``score`` and ``flagged`` (score at or above the release's threshold);
    and the mapping's notices (values set to missing, with counts)."""
    missing = [c for c in keep if c not in frame.columns]
    if missing:
        raise BundleError(f"--keep names column(s) not in the data: {', '.join(missing)}")
    schema = bundle.study.feature_schema
    table = apply_mapping(frame, mapping, schema, features_only=True)
    scores = predict_proba(
        bundle.study.model, bundle.params, preprocessor.transform(table.frame, schema)
    )
    out = pd.DataFrame({ROW: np.arange(len(frame))})
    for column in keep:
        out[column] = frame[column].to_numpy()
    out[SCORE] = scores
    out[FLAGGED] = (scores >= bundle.manifest.threshold).astype(np.int64)
    return out, table.notices
