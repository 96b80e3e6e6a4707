"""Feature schema, site mappings, unit conversion and data readers."""

from fedcare.schema.features import Feature, FeatureSchema, FeatureType
from fedcare.schema.mapping import (
    DataValidationError,
    MappingError,
    SiteMapping,
    Violation,
    apply_mapping,
    load_mapping,
)
from fedcare.schema.readers import DataFileError, read_table

__all__ = [
    "DataFileError",
    "DataValidationError",
    "Feature",
    "FeatureSchema",
    "FeatureType",
    "MappingError",
    "SiteMapping",
    "Violation",
    "apply_mapping",
    "load_mapping",
    "read_table",
]
