"""Reading and preparing a sites file's sites: in this process, or over the cores when
there are many.

A site's preparation (read the table, map it, split it, fit its preprocessing) takes a
dozen milliseconds, most of it pandas' per-call overhead on small tables; a simulation
of a thousand sites spent half its time here on one core. Each site is prepared alone
from its own files, so the sites are independent cells (:mod:`fedcare.simulation.cells`).
This module imports no PyTorch, so a worker that prepares sites starts in a fraction of
a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcare.simulation.cells import run_cells
from fedcare.site.dataset import SiteDataset, prepare_site_data
from fedcare.sources.load import read_source
from fedcare.sources.spec import Source
from fedcare.study import Study

WORTH_SPREADING_S = 2.0
"""Sites are prepared over the cores when, at the first site's pace, the rest would take
longer than this in one process: a preparing worker starts in about half a second."""


class SitesFileError(ValueError):
    """A sites file that cannot be read or does not validate."""


@dataclass(frozen=True)
class SiteFiles:
    """Where one site of a sites file reads its rows and its mapping."""

    name: str
    source: Source
    mapping: Path


def prepare_files(study: Study, site: SiteFiles) -> SiteDataset:
    """Read ``site``'s source through its mapping and prepare it for ``study``."""
    table = read_source(site.source, site.mapping, study.feature_schema)
    if table.mapping.site != site.name:
        raise SitesFileError(
            f"site '{site.name}' uses a mapping written for site '{table.mapping.site}'"
        )
    return prepare_site_data(table.frame, table.mapping, study, table.notices)


def prepare_all(
    study: Study, sites: Sequence[SiteFiles], processes: int | None = None
) -> list[SiteDataset]:
    """Every site prepared, in order; on ``processes`` local processes (1: here), or by
    default over the cores when there are enough sites to be worth it. A site that
    fails raises as it would here: of several, the first in order."""
    # The first site pays for the readers' lazy imports: the pace is read from the second.
    return run_cells(
        prepare_files,
        study,
        sites,
        processes=processes,
        worth_spreading_s=WORTH_SPREADING_S,
        warm_up=1,
        here_too=True,
    )
