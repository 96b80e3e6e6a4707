"""One entry point from a site's ``source:`` and mapping file to a table the schema checks read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedcare.schema.features import FeatureSchema
from fedcare.schema.mapping import SiteMapping, Violation, load_mapping
from fedcare.schema.readers import read_table
from fedcare.sources.fhir import MANIFEST, read_fhir
from fedcare.sources.mapping import load_extract_mapping
from fedcare.sources.spec import FhirSource, OmopSource, Source, TableSource


@dataclass(frozen=True)
class SourceTable:
    """A site's rows as read from its source, the mapping that reads them into the schema,
    and what reading the source left out (unmapped codes, values outside their windows)."""

    frame: pd.DataFrame
    mapping: SiteMapping
    notices: tuple[Violation, ...] = ()


def read_source(source: Source, mapping_path: Path, schema: FeatureSchema) -> SourceTable:
    """Read a site's source through its mapping file (a table mapping for a table, a FHIR or
    OMOP mapping for an export or database).

    Raises :class:`fedcare.schema.mapping.DataValidationError` when the export itself
    breaks a rule (an invalid resource, a unit the mapping does not list), listed with
    every breach the schema checks find; a table's breaches are found when it is mapped.
    """
    if isinstance(source, TableSource):
        return SourceTable(read_table(source.path), load_mapping(mapping_path))
    mapping = load_extract_mapping(mapping_path)
    if isinstance(source, FhirSource):
        extract = read_fhir(source.path, mapping, schema)
    else:
        # Imported here: SQLAlchemy is a tenth of a second that each process preparing
        # table sites (a thousand of them over the cores) would otherwise pay for nothing.
        from fedcare.sources.omop import read_omop

        extract = read_omop(source.url, source.schema_name, mapping, schema)
    checked = extract.checked(schema)
    return SourceTable(checked.frame, checked.mapping, checked.notices)


def source_from_argument(text: str) -> Source:
    """A source named on the command line: a database URL (OMOP), a folder with a FHIR
    manifest or NDJSON files (FHIR), or else a table file or image folder."""
    if "://" in text:
        return OmopSource(kind="omop", url=text)
    path = Path(text)
    if path.is_dir() and ((path / MANIFEST).is_file() or any(path.glob("*.ndjson"))):
        return FhirSource(kind="fhir", path=path)
    return TableSource(path=path)
