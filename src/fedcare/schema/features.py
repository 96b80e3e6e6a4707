"""The shared feature schema: what every site's data must look like after mapping."""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedcare.schema.units import canonical_unit


class Strict(BaseModel):
    """Base for every configuration model: unknown keys are an error, not a silent typo."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureType(StrEnum):
    CONTINUOUS = "continuous"
    BINARY = "binary"
    CATEGORICAL = "categorical"
    IMAGE = "image"
    """A single-channel image file per row (an image folder's manifest names it)."""


class MissingRule(StrEnum):
    """What a site does with an empty cell for a feature."""

    REFUSE = "refuse"
    MEDIAN = "median"
    MEAN = "mean"
    MODE = "mode"
    VALUE = "value"
    """The study's declared ``fill``: the same at every site, fitted on no one's data."""


SITE_FITTED = (MissingRule.MEDIAN, MissingRule.MEAN, MissingRule.MODE)
"""Imputation rules whose value is computed from a site's own rows."""


class OnInvalid(StrEnum):
    """What a site does with a value that breaks the feature's rules: not a number,
    not listed in the mapping's ``values``, not a category, or outside the range.
    Either way the count is reported; a value is never changed silently."""

    REFUSE = "refuse"
    MISSING = "missing"
    """Treat it as missing, so the feature's missing rule applies to it."""


class Transform(StrEnum):
    """A fixed transform of a continuous feature, applied after imputation and before
    scaling, identically at every site and at prediction time."""

    NONE = "none"
    LOG = "log"
    LOG1P = "log1p"


def text_categories(value: object) -> object:
    """Integer category codes (``[0, 1, 2]`` in YAML) read as their text; other input
    is left for pydantic to check, so a float or a boolean is still an error."""
    if isinstance(value, list | tuple):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


class MissingPolicy(Strict):
    """Missing-value handling: refuse, a value fitted on the site's own training split
    (median, mean, mode), or the study's declared ``fill`` (value)."""

    rule: MissingRule = MissingRule.REFUSE
    fill: float | str | None = Field(
        default=None, description="rule 'value' only: the value every site fills in."
    )
    indicator: bool = Field(
        default=False,
        description="Add a 0/1 input column that is 1 where the value was missing.",
    )

    @model_validator(mode="after")
    def _indicator_needs_imputation(self) -> Self:
        if self.indicator and self.rule is MissingRule.REFUSE:
            raise ValueError("a missing-indicator needs an imputation rule, not 'refuse'")
        if (self.rule is MissingRule.VALUE) != (self.fill is not None):
            raise ValueError("rule 'value' needs fill: <value>, and fill is only used with it")
        return self


class Feature(Strict):
    """One model input, in the consortium's agreed unit."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    type: FeatureType = Field(
        default=FeatureType.CONTINUOUS,
        description="continuous, binary (0/1), categorical (one-hot encoded) or image.",
    )
    shape: tuple[int, int] | None = Field(
        default=None,
        description="image only: [height, width] in pixels; an image of another size is "
        "refused, never resized.",
    )
    unit: str | None = Field(
        default=None,
        description=(
            "The consortium's unit (pint spelling, e.g. mg/dL, mmol/L, kg); each site's "
            "mapping converts to it."
        ),
    )
    range: tuple[float, float] | None = None
    categories: tuple[str, ...] | None = Field(
        default=None,
        description="categorical only: the allowed values (integers are read as text).",
    )
    drop_first: bool = Field(
        default=False, description="One-hot encode without the first category (reference level)."
    )
    missing: MissingPolicy = MissingPolicy()
    on_invalid: OnInvalid = Field(
        default=OnInvalid.REFUSE,
        description="refuse the file, or treat an invalid value as missing (counted either way).",
    )
    transform: Transform = Field(
        default=Transform.NONE,
        description="log or log1p of a skewed continuous feature, after clip and imputation.",
    )
    clip: tuple[float, float] | None = Field(
        default=None,
        description="Winsorise a continuous feature to [low, high] before the transform.",
    )
    reference: tuple[float, float] | None = Field(
        default=None,
        description=(
            "Consortium-agreed (mean, std) used when the study scales by reference; "
            "after the transform, in its units."
        ),
    )
    analyte: str | None = Field(
        default=None,
        description="The substance measured, for mass/molar unit conversion (e.g. 'creatinine').",
    )

    _categories_as_text = field_validator("categories", mode="before")(text_categories)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self._check_image():
            return self
        if self.unit is not None:
            canonical_unit(self.unit)
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(self.range)}")
        if self.type is FeatureType.CATEGORICAL:
            if not self.categories or len(self.categories) < 2:
                raise ValueError("a categorical feature needs at least two categories")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError("categories must be distinct")
        elif self.categories is not None:
            raise ValueError(
                f"categories are only allowed on categorical features, not {self.type}"
            )
        if self.type is not FeatureType.CONTINUOUS and self.range is not None:
            raise ValueError("a range applies only to continuous features")
        if self.on_invalid is OnInvalid.MISSING and self.missing.rule is MissingRule.REFUSE:
            raise ValueError("on_invalid 'missing' needs a missing rule that imputes")
        self._check_transform()
        if self.reference is not None and self.reference[1] <= 0:
            raise ValueError("reference std must be positive")
        if self.type is FeatureType.CATEGORICAL and self.missing.rule in (
            MissingRule.MEAN,
            MissingRule.MEDIAN,
        ):
            raise ValueError("categorical features can only impute with 'mode' or 'value'")
        self._check_fill()
        return self

    def _check_image(self) -> bool:
        """Whether this is an image feature (then nothing else applies to it)."""
        if self.type is not FeatureType.IMAGE:
            if self.shape is not None:
                raise ValueError("shape applies to image features only")
            return False
        if self.shape is None or min(self.shape) < 1:
            raise ValueError("an image feature needs shape: [height, width] in pixels")
        tabular = {
            "unit": self.unit,
            "range": self.range,
            "categories": self.categories,
            "clip": self.clip,
            "reference": self.reference,
            "analyte": self.analyte,
        }
        extra = [name for name, value in tabular.items() if value is not None]
        if self.transform is not Transform.NONE:
            extra.append("transform")
        if extra:
            raise ValueError(f"an image feature takes no {', '.join(extra)}")
        if self.missing.rule is not MissingRule.REFUSE or self.on_invalid is not OnInvalid.REFUSE:
            raise ValueError("an image may not be missing or invalid: leave missing and on_invalid")
        return True

    def _check_transform(self) -> None:
        if self.type is not FeatureType.CONTINUOUS and (
            self.clip is not None or self.transform is not Transform.NONE
        ):
            raise ValueError("clip and transform apply only to continuous features")
        if self.clip is not None and not self.clip[0] < self.clip[1]:
            raise ValueError(f"clip must be [low, high] with low < high, got {list(self.clip)}")
        if self.transform is Transform.NONE:
            return
        # The lowest value the transform can meet: values are range-checked and
        # then clipped, so the tighter of the two lower bounds holds.
        lows = [b[0] for b in (self.range, self.clip) if b is not None]
        floor = 0.0 if self.transform is Transform.LOG else -1.0
        if not lows or max(lows) <= floor:
            raise ValueError(
                f"transform '{self.transform}' needs a range or clip whose low bound is "
                f"above {floor:g}, so that every value has a finite {self.transform}"
            )

    def _check_fill(self) -> None:
        fill = self.missing.fill
        if fill is None:
            return
        if self.type is FeatureType.CATEGORICAL:
            assert self.categories is not None
            if str(fill) not in self.categories:
                raise ValueError(f"missing.fill {fill!r} is not one of the categories")
            return
        if isinstance(fill, str):
            raise ValueError(f"missing.fill of a {self.type} feature must be a number")
        if self.type is FeatureType.BINARY and fill not in (0, 1):
            raise ValueError("missing.fill of a binary feature must be 0 or 1")
        if self.range is not None and not self.range[0] <= fill <= self.range[1]:
            raise ValueError(f"missing.fill {fill:g} is outside the range {list(self.range)}")

    def input_names(self) -> list[str]:
        """Names of the model input columns this feature expands to, in order."""
        if self.type is FeatureType.CATEGORICAL:
            assert self.categories is not None
            levels = self.categories[1:] if self.drop_first else self.categories
            names = [f"{self.name}={level}" for level in levels]
        elif self.shape is not None:
            return [
                f"{self.name}[{row},{col}]"
                for row in range(self.shape[0])
                for col in range(self.shape[1])
            ]
        else:
            names = [self.name]
        if self.missing.indicator:
            names.append(f"{self.name}_missing")
        return names


class Attribute(Strict):
    """A column carried for subgroup analysis only; never a model input."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    categories: tuple[str, ...] | None = Field(
        default=None, description="The allowed levels; any other value is refused."
    )

    _categories_as_text = field_validator("categories", mode="before")(text_categories)


class Censored(StrEnum):
    """What a time-to-event label does with a patient censored before the horizon:
    alive and event-free at their last follow-up, but followed for less than it."""

    EXCLUDE = "exclude"
    """Leave the patient out (counted in the site's notices): their outcome at the
    horizon is unknown, and calling it 'no event' would bias the risk down."""
    REFUSE = "refuse"
    """Refuse the file: the study expects complete follow-up."""


class Label(Strict):
    """The binary outcome. With ``horizon`` it is derived from a time-to-event pair:
    1 if the event happened at or before ``horizon`` days, 0 if the patient was
    followed event-free for at least ``horizon`` days; see ``censored``."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = Field(default="", description="What the outcome means, in words.")
    horizon: float | None = Field(
        default=None, gt=0, description="Days: the label is 'event within horizon'."
    )
    censored: Censored = Field(
        default=Censored.EXCLUDE,
        description="time-to-event only: patients censored before the horizon.",
    )


class FeatureSchema(Strict):
    """Features (model inputs), attributes (for subgroups) and the binary label."""

    features: tuple[Feature, ...] = Field(min_length=1)
    label: Label
    attributes: tuple[Attribute, ...] = Field(
        default=(), description="Columns carried for subgroup analysis only; never model inputs."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [f.name for f in self.features] + [a.name for a in self.attributes]
        names.append(self.label.name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"names used more than once: {', '.join(duplicates)}")
        if self.image is not None and len(self.features) > 1:
            raise ValueError(
                f"an image feature ('{self.image.name}') is the schema's only feature; "
                "carry other columns as attributes"
            )
        return self

    @property
    def image(self) -> Feature | None:
        """The schema's image feature, if it has one."""
        return next((f for f in self.features if f.type is FeatureType.IMAGE), None)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one row's model input: (channels, height, width) for an image,
        else (inputs,)."""
        image = self.image
        if image is not None and image.shape is not None:
            return (1, *image.shape)
        return (self.n_inputs,)

    def input_names(self) -> list[str]:
        """Model input columns, in the order the model sees them."""
        return [name for feature in self.features for name in feature.input_names()]

    @property
    def n_inputs(self) -> int:
        return len(self.input_names())

    def feature(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(name)
