"""From a mapped table to the model's input matrix.

Imputation values and scaling statistics are either the study's own (declared
fill values, reference scaling: the same at every site, fitted on no one's data)
or fitted on the site's own training split only, so nothing about the held-out
data or about other sites leaks in. Under differential privacy only the study's
own are allowed (docs/privacy.md): a statistic fitted on the rows would depend
on every patient, outside what the accountant counts.
The fitted state is a small pydantic model the site keeps beside its model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fedcare.schema.features import (
    SITE_FITTED,
    Feature,
    FeatureSchema,
    FeatureType,
    MissingRule,
    Strict,
    Transform,
)
from fedcare.study import Scaling

if TYPE_CHECKING:
    import pandas as pd


class FeatureState(Strict):
    fill: float | str | None = None
    center: float = 0.0
    spread: float = 1.0


class Preprocessor(Strict):
    """Fitted imputation and scaling for one site."""

    scaling: Scaling
    states: dict[str, FeatureState]

    def transform(self, frame: pd.DataFrame, schema: FeatureSchema) -> NDArray[np.float32]:
        """The float32 model input: a matrix, columns in ``schema.input_names()`` order,
        or for an image schema (rows, 1, height, width) with pixels scaled to [0, 1]."""
        image = schema.image
        if image is not None:
            return _pixels(frame[image.name], schema.input_shape)
        columns: list[NDArray[np.float64]] = []
        for feature in schema.features:
            columns.extend(_encode(feature, frame[feature.name], self.states[feature.name]))
        return np.column_stack(columns).astype(np.float32)


def _declared_fill(feature: Feature) -> float | str | None:
    """The fill a study declares (none where missing values are refused)."""
    if feature.missing.rule is MissingRule.REFUSE:
        return None
    fill = feature.missing.fill
    return str(fill) if feature.type is FeatureType.CATEGORICAL else fill


def _declared_scale(feature: Feature, scaling: Scaling) -> tuple[float, float]:
    """(center, spread) unless the site fits them: the reference's, or none."""
    if feature.type is FeatureType.CONTINUOUS and scaling is Scaling.REFERENCE:
        assert feature.reference is not None
        return feature.reference
    return 0.0, 1.0


def _fill_value(feature: Feature, values: pd.Series) -> float | str | None:
    rule = feature.missing.rule
    if rule in (MissingRule.REFUSE, MissingRule.VALUE):
        return _declared_fill(feature)
    present = values.dropna()
    if present.empty:
        # A site that never measures a feature imputes a neutral value; the
        # missing-indicator (when configured) carries the information instead.
        return feature.categories[0] if feature.categories else 0.0
    if rule is MissingRule.MEDIAN:
        return float(present.median())
    if rule is MissingRule.MEAN:
        return float(present.mean())
    mode = present.mode().iloc[0]
    return mode if isinstance(mode, str) else float(mode)


def fit_preprocessor(frame: pd.DataFrame, schema: FeatureSchema, scaling: Scaling) -> Preprocessor:
    """Fit imputation and scaling on a mapped training frame."""
    import pandas as pd  # here: a process that only reads declared preprocessing needs none

    states: dict[str, FeatureState] = {}
    for feature in schema.features:
        values = frame[feature.name]
        fill = _fill_value(feature, values)
        center, spread = _declared_scale(feature, scaling)
        if feature.type is FeatureType.CONTINUOUS and scaling is Scaling.SITE:
            filled = values.fillna(fill) if fill is not None else values
            shaped = pd.Series(shape(feature, filled.to_numpy(dtype=np.float64)))
            center = float(shaped.mean()) if shaped.notna().any() else 0.0
            std = float(shaped.std(ddof=0)) if shaped.notna().sum() > 1 else 0.0
            # A constant column carries no information; leave it centred, unscaled.
            spread = std if std > 1e-12 else 1.0
        states[feature.name] = FeatureState(fill=fill, center=center, spread=spread)
    return Preprocessor(scaling=scaling, states=states)


def shape(feature: Feature, values: NDArray[np.float64]) -> NDArray[np.float64]:
    """The study's fixed clip and transform of a continuous feature, before scaling.

    The schema guarantees the values the transform meets are above its floor
    (range or clip low bound), so the result is finite.
    """
    out = values
    if feature.clip is not None:
        out = np.clip(out, *feature.clip)
    if feature.transform is Transform.LOG:
        out = np.log(out)
    elif feature.transform is Transform.LOG1P:
        out = np.log1p(out)
    return out


def declared_preprocessor(schema: FeatureSchema, scaling: Scaling) -> Preprocessor | None:
    """The preprocessing when the study declares all of it (fills by value, reference
    or no scaling): the same at every site and at prediction time. None when some of
    it is fitted on a site's own rows."""
    if scaling is Scaling.SITE or any(f.missing.rule in SITE_FITTED for f in schema.features):
        return None
    states = {}
    for feature in schema.features:
        center, spread = _declared_scale(feature, scaling)
        states[feature.name] = FeatureState(
            fill=_declared_fill(feature), center=center, spread=spread
        )
    return Preprocessor(scaling=scaling, states=states)


def _pixels(images: pd.Series, shape: tuple[int, ...]) -> NDArray[np.float32]:
    """The mapping's uint8 images stacked as (rows, *shape) float32 in [0, 1]."""
    if images.empty:
        return np.zeros((0, *shape), dtype=np.float32)
    stacked = np.stack(images.to_list()).astype(np.float32)
    return (stacked / np.float32(255.0)).reshape(len(images), *shape)


def _encode(feature: Feature, values: pd.Series, state: FeatureState) -> list[NDArray[np.float64]]:
    if feature.type is FeatureType.CATEGORICAL:
        assert feature.categories is not None
        missing = values.isna().to_numpy()
        filled = values.fillna(state.fill) if state.fill is not None else values
        levels = feature.categories[1:] if feature.drop_first else feature.categories
        text = filled.astype("string").to_numpy()
        out = [(text == level).astype(np.float64) for level in levels]
    else:
        # In numpy: pandas' isna and fillna cost more than the arithmetic on a site's rows.
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(numbers)
        if state.fill is not None and missing.any():
            numbers = np.where(missing, float(state.fill), numbers)
        out = [(shape(feature, numbers) - state.center) / state.spread]
    if feature.missing.indicator:
        out.append(missing.astype(np.float64))
    return out
