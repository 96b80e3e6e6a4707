"""The ``source:`` a site names in ``site.yaml`` or ``sites.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from fedcare.schema.features import Strict


def sqlite_beside(url: str, base: Path) -> str:
    """A SQLite URL's relative file resolved against ``base``; any other URL as it is."""
    if url.startswith("sqlite:///"):
        db_path = Path(url.removeprefix("sqlite:///"))
        if not db_path.is_absolute():
            return f"sqlite:///{base / db_path}"
    return url


class TableSource(Strict):
    """A CSV or Parquet file, or an image folder with its manifest."""

    kind: Literal["table"] = Field(default="table", description="A table file.")
    path: Path = Field(description="The data file or image folder.")

    @property
    def dataset_name(self) -> str:
        return self.path.stem

    def beside(self, base: Path) -> TableSource:
        """This source with a relative path resolved against ``base``."""
        return self.model_copy(update={"path": base / self.path})


class FhirSource(Strict):
    """A FHIR R4 Bulk Data ``$export`` output folder (a manifest and NDJSON files)."""

    kind: Literal["fhir"] = Field(description="A FHIR R4 bulk export.")
    path: Path = Field(description="The export's folder, holding manifest.json or *.ndjson.")

    @property
    def dataset_name(self) -> str:
        return self.path.name

    def beside(self, base: Path) -> FhirSource:
        """This source with a relative path resolved against ``base``."""
        return self.model_copy(update={"path": base / self.path})


class OmopSource(Strict):
    """An OMOP CDM 5.4 database, read through SQLAlchemy."""

    kind: Literal["omop"] = Field(description="An OMOP CDM 5.4 database.")
    url: str = Field(
        min_length=1,
        description="SQLAlchemy URL, e.g. sqlite:///cdm.sqlite or "
        "postgresql+psycopg://user@host/cdm (no password here: use ~/.pgpass).",
    )
    schema_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="The database schema holding the CDM tables (PostgreSQL), if not the default.",
    )

    @property
    def dataset_name(self) -> str:
        from sqlalchemy.engine import make_url  # here: reading a config needs no SQL library
        from sqlalchemy.exc import ArgumentError

        try:
            database = make_url(self.url).database or "omop"
        except ArgumentError:
            return "omop"
        return Path(database).stem

    def beside(self, base: Path) -> OmopSource:
        """This source with a relative SQLite file resolved against ``base``."""
        return self.model_copy(update={"url": sqlite_beside(self.url, base)})


Source = Annotated[TableSource | FhirSource | OmopSource, Field(discriminator="kind")]
"""Where a site's rows come from."""
