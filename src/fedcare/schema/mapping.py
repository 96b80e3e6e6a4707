"""Site mappings: from a hospital's own columns and units to the shared schema.

A mapping is applied at the site, before anything else touches the data. Every
rule is checked over the whole table and every breach is reported together, so
a data scientist fixes an extract once rather than once per error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import Field, ValidationError

from fedcare.schema.features import (
    Feature,
    FeatureSchema,
    FeatureType,
    MissingRule,
    OutOfRange,
    Strict,
)
from fedcare.schema.units import UnitError, canonical_unit, convert

DEFAULT_MISSING_TOKENS: tuple[str, ...] = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "?")


class ColumnMapping(Strict):
    """Where one schema field lives in the site's table, and how to read it."""

    column: str = Field(min_length=1)
    unit: str | None = None
    values: dict[str, str | float] | None = Field(
        default=None, description="Recode local values, e.g. {M: 0, F: 1}."
    )


class SiteMapping(Strict):
    """A site's mapping for one study schema. Kept at the site; never sent."""

    site: str = Field(min_length=1)
    features: dict[str, ColumnMapping | str]
    label: ColumnMapping | str
    attributes: dict[str, ColumnMapping | str] = Field(default_factory=dict)
    missing_tokens: tuple[str, ...] = DEFAULT_MISSING_TOKENS

    def column(self, name: str) -> ColumnMapping:
        """The mapping for a schema feature, attribute or label name."""
        if name in self.features:
            entry = self.features[name]
        elif name in self.attributes:
            entry = self.attributes[name]
        else:
            raise KeyError(name)
        return ColumnMapping(column=entry) if isinstance(entry, str) else entry

    def label_column(self) -> ColumnMapping:
        return ColumnMapping(column=self.label) if isinstance(self.label, str) else self.label


@dataclass(frozen=True)
class Violation:
    """One broken rule: which column, which rule, how many rows."""

    column: str
    rule: str
    rows: int

    def __str__(self) -> str:
        noun = "row" if self.rows == 1 else "rows"
        return f"column '{self.column}': {self.rule} ({self.rows} {noun})"


class DataValidationError(ValueError):
    """Site data that does not fit the schema. Nothing is trained or sent."""

    def __init__(self, site: str, violations: list[Violation]) -> None:
        self.site = site
        self.violations = violations
        details = "\n".join(f"  - {v}" for v in violations)
        super().__init__(
            f"site '{site}': data refused, {len(violations)} rule(s) broken; "
            f"nothing was trained or sent:\n{details}"
        )


class MappingError(ValueError):
    """A mapping file that is incomplete or inconsistent with the schema."""


def load_mapping(path: Path) -> SiteMapping:
    """Read a site mapping from YAML."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return SiteMapping.model_validate(data)
    except OSError as exc:
        raise MappingError(f"{path}: cannot read the mapping: {exc.strerror}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise MappingError(f"{path}: not a valid site mapping:\n{exc}") from exc


def check_mapping(mapping: SiteMapping, schema: FeatureSchema) -> None:
    """Refuse a mapping that misses a schema field, names unknown ones, or has bad units."""
    problems: list[str] = []
    wanted = {f.name for f in schema.features}
    missing = sorted(wanted - set(mapping.features))
    if missing:
        problems.append(f"no mapping for feature(s): {', '.join(missing)}")
    unknown = sorted(set(mapping.features) - wanted)
    if unknown:
        problems.append(f"mapping names feature(s) not in the schema: {', '.join(unknown)}")
    unknown_attrs = sorted(set(mapping.attributes) - {a.name for a in schema.attributes})
    if unknown_attrs:
        problems.append(f"mapping names attribute(s) not in the schema: {', '.join(unknown_attrs)}")
    for feature in schema.features:
        if feature.name not in mapping.features:
            continue
        entry = mapping.column(feature.name)
        if entry.unit is not None and feature.unit is None:
            problems.append(f"feature '{feature.name}' has no unit in the schema; drop the unit")
        elif entry.unit is not None and feature.unit is not None:
            try:
                convert(np.zeros(1), entry.unit, feature.unit, feature.analyte)
            except UnitError as exc:
                problems.append(f"feature '{feature.name}': {exc}")
    if problems:
        raise MappingError(f"mapping for site '{mapping.site}': " + "; ".join(problems))


def _as_missing(series: pd.Series, tokens: tuple[str, ...]) -> pd.Series:
    """Local missing-value tokens (as text) become NaN; everything else is kept."""
    as_text = series.astype("string").str.strip()
    return series.where(~as_text.isin(tokens) & series.notna(), other=np.nan)


def _recode(series: pd.Series, values: Mapping[str, str | float] | None) -> pd.Series:
    if not values:
        return series
    as_text = series.astype("string").str.strip()
    recoded = as_text.map(lambda v: values.get(v, v) if isinstance(v, str) else v)
    return recoded.where(series.notna(), other=np.nan)


def _numeric(name: str, series: pd.Series, violations: list[Violation]) -> pd.Series:
    numbers = pd.to_numeric(series, errors="coerce")
    bad = int((numbers.isna() & series.notna()).sum())
    if bad:
        violations.append(Violation(name, "value is not a number", bad))
    return numbers.astype("float64")


def _map_feature(
    feature: Feature,
    entry: ColumnMapping,
    raw: pd.Series,
    violations: list[Violation],
) -> pd.Series:
    column = entry.column
    out: pd.Series
    series = _recode(raw, entry.values)
    if feature.type is FeatureType.CATEGORICAL:
        assert feature.categories is not None
        text = series.astype("string").str.strip()
        unknown = text.notna() & ~text.isin(feature.categories)
        if unknown.any():
            seen = ", ".join(sorted(text[unknown].unique())[:5])
            violations.append(
                Violation(
                    column,
                    f"value not among the categories {list(feature.categories)} (saw {seen})",
                    int(unknown.sum()),
                )
            )
        out = text.where(~unknown, other=None)
    else:
        out = _numeric(column, series, violations)
        if feature.type is FeatureType.BINARY:
            bad = out.notna() & ~out.isin([0.0, 1.0])
            if bad.any():
                violations.append(Violation(column, "binary value must be 0 or 1", int(bad.sum())))
                out = out.where(~bad)
        elif feature.unit is not None and entry.unit is not None:
            out = pd.Series(
                convert(out.to_numpy(), entry.unit, feature.unit, feature.analyte), index=out.index
            )
        if feature.range is not None:
            low, high = feature.range
            outside = out.notna() & ((out < low) | (out > high))
            if outside.any():
                if feature.out_of_range is OutOfRange.REFUSE:
                    unit = f" {canonical_unit(feature.unit)}" if feature.unit else ""
                    violations.append(
                        Violation(
                            column,
                            f"outside the valid range [{low:g}, {high:g}]{unit} "
                            f"for '{feature.name}'",
                            int(outside.sum()),
                        )
                    )
                else:
                    out = out.where(~outside)
    if feature.missing.rule is MissingRule.REFUSE:
        # Count cells that were empty in the extract, not values refused above.
        empty = int(raw.isna().sum())
        if empty:
            violations.append(
                Violation(column, f"missing value, and '{feature.name}' may not be missing", empty)
            )
    return out


def apply_mapping(frame: pd.DataFrame, mapping: SiteMapping, schema: FeatureSchema) -> pd.DataFrame:
    """Turn a site's table into the schema's columns and units, or refuse it.

    Returns a frame with one column per feature (float, or text for categorical),
    per attribute (text) and the label (0/1 integers). Raises
    :class:`DataValidationError` listing every broken rule.
    """
    check_mapping(mapping, schema)
    if frame.empty:
        raise DataValidationError(mapping.site, [Violation("(table)", "the table has no rows", 0)])
    violations: list[Violation] = []
    out: dict[str, pd.Series] = {}

    def source(entry: ColumnMapping) -> pd.Series | None:
        if entry.column not in frame.columns:
            violations.append(Violation(entry.column, "column not found in the data", len(frame)))
            return None
        return _as_missing(frame[entry.column], mapping.missing_tokens)

    for feature in schema.features:
        entry = mapping.column(feature.name)
        raw = source(entry)
        if raw is not None:
            out[feature.name] = _map_feature(feature, entry, raw, violations)

    for attribute in schema.attributes:
        if attribute.name not in mapping.attributes:
            continue
        entry = mapping.column(attribute.name)
        raw = source(entry)
        if raw is not None:
            text = _recode(raw, entry.values).astype("string").str.strip()
            if attribute.categories is not None:
                unknown = text.notna() & ~text.isin(attribute.categories)
                if unknown.any():
                    violations.append(
                        Violation(
                            entry.column,
                            f"value not among the categories {list(attribute.categories)}",
                            int(unknown.sum()),
                        )
                    )
            out[attribute.name] = text

    label_entry = mapping.label_column()
    raw_label = source(label_entry)
    if raw_label is not None:
        label = _numeric(label_entry.column, _recode(raw_label, label_entry.values), violations)
        if raw_label.isna().any():
            violations.append(
                Violation(label_entry.column, "label is missing", int(raw_label.isna().sum()))
            )
        bad = label.notna() & ~label.isin([0.0, 1.0])
        if bad.any():
            violations.append(Violation(label_entry.column, "label must be 0 or 1", int(bad.sum())))
        out[schema.label.name] = label.fillna(0).clip(0, 1).astype("int64")

    if violations:
        raise DataValidationError(mapping.site, violations)
    return pd.DataFrame(out, index=frame.index).reset_index(drop=True)
