"""``fedcare init``: start a file from a commented template that validates as written."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fedcare.cli.common import fail, say


class Kind(StrEnum):
    STUDY = "study"
    MAPPING = "mapping"
    SOURCE_MAPPING = "source-mapping"
    SITE = "site"
    POLICY = "policy"
    SITES = "sites"
    COORDINATOR = "coordinator"


def init(
    kind: Annotated[Kind, typer.Argument(help="Which file to start.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write it (default: KIND.yaml).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write a commented template for study.yaml, mapping.yaml (a table's),
    source-mapping.yaml (a FHIR export's or OMOP database's), site.yaml, policy.yaml,
    sites.yaml or coordinator.yaml; docs/reference/ explains every field."""
    from fedcare.data import template_text

    target = out or Path(f"{kind.value}.yaml")
    if target.exists() and not force:
        fail(f"{target} exists; pass --force to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(template_text(kind.value), encoding="utf-8")
    except OSError as exc:
        fail(f"{target}: cannot write: {exc.strerror}")
    say(f"wrote {target}; every field: docs/reference/{kind.value}.md")
