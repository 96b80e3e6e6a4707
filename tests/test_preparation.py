"""A sites file's sites prepared over several processes: the same datasets as in one, the
same error as in one, and workers that never load PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from fedcare.schema.mapping import DataValidationError
from fedcare.simulation.preparation import SiteFiles, SitesFileError, prepare_all, prepare_files
from fedcare.sources.spec import TableSource
from fedcare.study import Study, parse_study

from .conftest import write_toy_sites

NAMES = tuple(f"h{i}" for i in range(6))


STUDY = """
name: prepared
schema:
  label: {name: y}
  features: [{name: a, reference: [0, 1]}, {name: b, reference: [0, 1]}]
preprocessing: {scaling: reference}
training: {epochs: 1, batch_size: 16, learning_rate: 0.1}
rounds: {count: 2, min_sites: 2}
"""


def _study() -> Study:
    return parse_study(STUDY)


# fedcare.simulation.sites is imported where used: it imports the runner, and with it
# PyTorch, which a worker importing this module for its task must not load.


def _files(sites: Path) -> list[SiteFiles]:
    from fedcare.simulation.sites import load_sites_file

    base = sites.parent
    return [
        SiteFiles(e.name, e.data_source(base), base / e.mapping)
        for e in load_sites_file(sites).sites
    ]


def test_sites_prepared_on_two_processes_are_those_prepared_here(tmp_path: Path) -> None:
    from fedcare.simulation.sites import sites_from_file

    sites = write_toy_sites(tmp_path, NAMES, 120)
    here, _ = sites_from_file(sites, _study(), processes=1)
    spread, _ = sites_from_file(sites, _study(), processes=2)
    assert [s.name for s in spread] == list(NAMES)
    assert [s.fingerprint for s in spread] == [s.fingerprint for s in here]
    for one, other in zip(here, spread, strict=True):
        pd.testing.assert_frame_equal(one.test_frame, other.test_frame)
        assert (one.x_test == other.x_test).all()


def _break(folder: Path, name: str, column: str, value: str) -> None:
    path = folder / f"{name}.csv"
    frame = pd.read_csv(path, dtype=str)
    frame.loc[3, column] = value
    frame.to_csv(path, index=False)


def test_a_failing_site_raises_the_error_it_raises_here_and_of_several_the_first(
    tmp_path: Path,
) -> None:
    sites = write_toy_sites(tmp_path, NAMES, 120)
    _break(tmp_path, "h2", "A", "not-a-number")
    _break(tmp_path, "h4", "Y", "7")
    errors = []
    for processes in (1, 2):
        with pytest.raises(DataValidationError) as raised:
            prepare_all(_study(), _files(sites), processes=processes)
        errors.append(raised.value)
    here, spread = errors
    assert spread.site == here.site == "h2"
    assert str(spread) == str(here)
    assert spread.violations == here.violations
    assert "not a number" in str(spread)


def test_a_mapping_for_another_site_is_refused_from_a_worker_too(tmp_path: Path) -> None:
    from fedcare.simulation.sites import sites_from_file

    sites = write_toy_sites(tmp_path, NAMES, 120)
    (tmp_path / "h3.mapping.yaml").write_text("site: h1\nfeatures: {a: A, b: B}\nlabel: Y\n")
    with pytest.raises(SitesFileError, match=r"sites.yaml: site 'h3' uses a mapping .* 'h1'"):
        sites_from_file(sites, _study(), processes=2)


def _prepared_without_torch(study: Study, site: SiteFiles) -> tuple[str, bool]:
    return prepare_files(study, site).fingerprint, "torch" in sys.modules


def test_a_preparing_worker_never_loads_pytorch(tmp_path: Path) -> None:
    """A worker that imported PyTorch would take a second longer to start than the
    preparation it was spawned for saves at a few hundred sites."""
    from fedcare.simulation.cells import run_cells

    write_toy_sites(tmp_path, NAMES[:2], 120)
    files = [
        SiteFiles(n, TableSource(path=tmp_path / f"{n}.csv"), tmp_path / f"{n}.mapping.yaml")
        for n in NAMES[:2]
    ]
    results = run_cells(_prepared_without_torch, _study(), files, processes=2)
    assert [loaded for _, loaded in results] == [False, False]
    assert [f for f, _ in results] == [prepare_files(_study(), s).fingerprint for s in files]


_PREPARE_ALONE = """
import sys
from pathlib import Path
from fedcare.simulation.preparation import SiteFiles, prepare_files
from fedcare.sources.spec import TableSource
from fedcare.study import parse_study
folder = Path(sys.argv[1])
study = parse_study(folder.joinpath("study.yaml").read_text())
site = SiteFiles("h0", TableSource(path=folder / "h0.csv"), folder / "h0.mapping.yaml")
print(prepare_files(study, site).n_train, sorted({"torch", "sqlalchemy"} & set(sys.modules)))
"""


def test_preparing_a_table_site_loads_neither_pytorch_nor_sqlalchemy(tmp_path: Path) -> None:
    """What a preparing worker imports, in a process of its own (this test package's
    fixtures import SQLAlchemy, so a worker running a function of it would too): OMOP
    sources alone need SQLAlchemy, a tenth of a second a worker would pay for nothing."""
    import subprocess

    write_toy_sites(tmp_path, NAMES[:1], 120)
    (tmp_path / "study.yaml").write_text(STUDY)
    done = subprocess.run(
        [sys.executable, "-c", _PREPARE_ALONE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    n_train, loaded = done.stdout.split(maxsplit=1)
    assert int(n_train) > 50
    assert loaded.strip() == "[]"
