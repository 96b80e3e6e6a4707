"""Deployment configuration files for the coordinator and the site agents.

Relative paths in a config file are resolved against the file's own folder, so
a provisioned folder can be moved as a whole.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from fedcare.ids import SITE_NAME
from fedcare.sources.spec import OmopSource, Source, TableSource, sqlite_beside
from fedcare.yamlfile import read_yaml_model


class ConfigError(ValueError):
    """A configuration file that cannot be read or does not validate."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


C = TypeVar("C", bound=_Config)


class TlsFiles(_Config):
    """This party's certificate and key, and the consortium CA that vouches for its peers."""

    cert: Path = Field(description="This party's certificate (PEM).")
    key: Path = Field(description="Its private key (PEM), readable by this party's user only.")
    ca: Path = Field(description="The consortium CA's certificate, which vouches for every peer.")
    crl: Path | None = Field(
        default=None,
        description="The coordinator only: the CA-signed revocation list (crl.pem), checked "
        "at every TLS handshake and re-read when it changes.",
    )


def tls_files_error(tls: TlsFiles, exc: ssl.SSLError) -> ConfigError:
    """A one-line error for TLS files that exist but do not load (not PEM, or a key that
    does not match its certificate)."""
    return ConfigError(
        f"{tls.cert}, {tls.key}, {tls.ca}: cannot load this party's certificate, its key and "
        f"the CA certificate as PEM ({exc.reason or exc}); are these the files `fedcare "
        "provision` wrote?"
    )


def _audit_head() -> Path | None:
    return Field(
        default=None,
        description="The newest signed head of this party's audit trail, as kept elsewhere "
        "(`fedcare audit sign-head`, copied back). The writer then refuses to append to a "
        "trail that does not hold that entry unchanged; it is checked with tls.cert's key.",
    )


class StudyMembership(_Config):
    """A study the coordinator runs, and the sites that take part."""

    file: Path = Field(description="The study file, exactly as every site approved it.")
    sites: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _site_names(self) -> Self:
        bad = [s for s in self.sites if not re.fullmatch(SITE_NAME, s)]
        if bad:
            raise ValueError(f"invalid site name(s): {', '.join(bad)}")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError("site names must be unique")
        return self


class CoordinatorConfig(_Config):
    """``coordinator.yaml``."""

    consortium: str = Field(description="The consortium's name, as on its certificates.")
    host: str = Field(
        default="127.0.0.1", description="Address to listen on; 0.0.0.0 for every interface."
    )
    port: int = Field(default=8443, ge=0, le=65535)
    tls: TlsFiles
    database: str = Field(
        default="sqlite:///coordinator.db",
        description="SQLAlchemy URL; a relative SQLite path is relative to this file.",
    )
    storage: Path = Field(default=Path("models"), description="Folder for model files.")
    audit_log: Path = Field(
        default=Path("audit.jsonl"), description="The coordinator's hash-chained audit trail."
    )
    studies: list[StudyMembership] = Field(
        description="The studies this coordinator runs, each with its sites.", default_factory=list
    )
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    poll_wait_s: float = Field(default=20.0, gt=0, le=60, description="Longest long-poll.")
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="A request body must arrive within this many seconds plus one per 64 KiB; "
        "a slower sender gets 408 and the connection is closed.",
    )
    audit_head: Path | None = _audit_head()


class SiteConfig(_Config):
    """``site-NAME.yaml``: everything a site agent needs; kept at the site."""

    site: str = Field(pattern=SITE_NAME)
    coordinator: HttpUrl
    tls: TlsFiles
    study: Path | None = Field(default=None, description="The study file this site runs.")
    data: Path | None = Field(
        default=None,
        description="CSV or Parquet file of local data (short for source: {kind: table, path}).",
    )
    source: Source | None = Field(
        default=None,
        description="Where the site's rows come from: {kind: table, path}, {kind: fhir, path} "
        "(a bulk export folder) or {kind: omop, url} (a CDM database).",
    )
    mapping: Path | None = Field(
        default=None, description="The site's mapping (columns for a table, codes for FHIR/OMOP)."
    )
    policy: Path | None = Field(
        default=None,
        description="The site's policy.yaml; the agent runs only studies it approves.",
    )
    audit_head: Path | None = _audit_head()
    dataset: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="The data set's name in the policy's privacy_budget (default: the data "
        "file's name without its suffix).",
    )
    state_dir: Path = Field(
        default=Path("state"),
        description=(
            "Where the agent keeps its state: the privacy ledger, its secure-aggregation "
            "record and the preprocessing it fitted per study."
        ),
    )
    retry_max_s: float = Field(
        default=600.0, gt=0, description="Give up after the coordinator is unreachable this long."
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if self.data is not None and self.source is not None:
            raise ValueError("give data (a table file) or source, not both")
        return self

    @property
    def data_source(self) -> Source | None:
        """The site's source: ``source``, or the table ``data`` names."""
        if self.source is not None:
            return self.source
        return None if self.data is None else TableSource(path=self.data)

    @property
    def dataset_name(self) -> str:
        """The name the privacy ledger and the policy's budget use for this site's data
        (default: the data file's or export folder's name, or the OMOP database's)."""
        if self.dataset is not None:
            return self.dataset
        source = self.data_source
        if source is None:
            raise ConfigError(f"site '{self.site}' names no data source and no dataset")
        return source.dataset_name

    @property
    def ledger_path(self) -> Path:
        """The site's privacy ledger (SQLite), beside its other state."""
        return self.state_dir / "privacy-ledger.sqlite"


def _resolve(value: object, base: Path) -> object:
    if isinstance(value, Path) and not value.is_absolute():
        return base / value
    if isinstance(value, BaseModel):
        return type(value).model_validate(
            {k: _resolve(getattr(value, k), base) for k in type(value).model_fields}
        )
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    return value


def check_tls_files(tls: TlsFiles) -> None:
    """Refuse, by field, TLS files that are missing: deep in the TLS stack a missing
    file is a bare "[Errno 2]". Checked where TLS is used, not when a config is read
    (offline commands read site.yaml too)."""
    for field, what in (("cert", "certificate"), ("key", "private key"), ("ca", "CA certificate")):
        file: Path = getattr(tls, field)
        if not file.is_file():
            raise ConfigError(
                f"tls.{field}: the {what} file {file} does not exist; copy it from the "
                "folder `fedcare provision` wrote"
            )


def load_config(path: Path, kind: type[C]) -> C:
    """Read a YAML config and resolve its relative paths against its folder."""
    parsed = read_yaml_model(path, kind, "config", ConfigError)
    resolved = _resolve(parsed, path.resolve().parent)
    assert isinstance(resolved, kind)
    source = getattr(resolved, "source", None)
    if isinstance(source, OmopSource):
        resolved = resolved.model_copy(update={"source": source.beside(path.resolve().parent)})
    database = getattr(resolved, "database", None)
    if isinstance(database, str):
        return resolved.model_copy(
            update={"database": sqlite_beside(database, path.resolve().parent)}
        )
    return resolved


def write_config(config: _Config, path: Path) -> None:
    """Write a config as YAML (paths as given: keep them relative for portability)."""
    path.write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
