"""Shared fixtures: small studies and site data sets built in memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedcare.schema.mapping import SiteMapping
from fedcare.site.dataset import SiteDataset, prepare_site_data
from fedcare.study import Study, parse_study

from .databases import BACKENDS, database

TOY_STUDY = """
name: toy
schema:
  label: {name: y}
  features:
    - {name: a, reference: [0, 1]}
    - {name: b, reference: [0, 1]}
    - {name: c, reference: [0, 1], missing: {rule: value, fill: 0, indicator: true}}
training: {epochs: 1, batch_size: 16, learning_rate: 0.1}
preprocessing: {scaling: reference}
rounds: {count: 4, min_sites: 2}
seed: 11
"""


def toy_frame(seed: int, n: int, shift: float = 0.0) -> pd.DataFrame:
    """A linearly separable-ish table with the site's own column names."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) + shift
    logit = 1.5 * x[:, 0] - 1.0 * x[:, 1] + 0.5 * x[:, 2] - shift
    y = (logit + rng.logistic(size=n) > 0).astype(int)
    c = x[:, 2].copy()
    c[rng.random(n) < 0.2] = np.nan
    return pd.DataFrame({"A": x[:, 0], "B": x[:, 1], "C": c, "Y": y})


def write_toy_sites(folder: Path, names: tuple[str, ...], rows: int) -> Path:
    """CSV files of toy data (columns A, B, Y) with their mappings, and a sites.yaml."""
    entries = []
    for i, name in enumerate(names):
        toy_frame(i, rows)[["A", "B", "Y"]].to_csv(folder / f"{name}.csv", index=False)
        (folder / f"{name}.mapping.yaml").write_text(
            f"site: {name}\nfeatures: {{a: A, b: B}}\nlabel: Y\n"
        )
        entries.append(f"  - {{name: {name}, data: {name}.csv, mapping: {name}.mapping.yaml}}")
    sites = folder / "sites.yaml"
    sites.write_text("sites:\n" + "\n".join(entries) + "\n")
    return sites


def toy_mapping(site: str) -> SiteMapping:
    return SiteMapping(site=site, features={"a": "A", "b": "B", "c": "C"}, label="Y")


@pytest.fixture
def toy_study() -> Study:
    return parse_study(TOY_STUDY)


@pytest.fixture
def toy_sites(toy_study: Study) -> list[SiteDataset]:
    sizes = {"alpha": 400, "beta": 200, "gamma": 80}
    return [
        prepare_site_data(toy_frame(i, n, shift=0.3 * i), toy_mapping(name), toy_study)
        for i, (name, n) in enumerate(sizes.items())
    ]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """As the CLI does: small models train faster on one thread."""
    import torch

    torch.set_num_threads(1)


class LinkWrapper:
    """A site's link around another: what a subclass does not define goes to ``inner``
    (a coordinator that misbehaves in one call, a site that fails on cue)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class DropBefore(LinkWrapper):
    """A site's link that goes away for good when the site would post ``stage`` of a
    secure round (a site that loses power mid-session)."""

    def __init__(self, inner: Any, stage: str, from_round: int = 1) -> None:
        super().__init__(inner)
        self.stage = stage
        self.from_round = from_round

    def secure_post(
        self, study_hash: str, round_number: int, stage: str, body: bytes, content_type: str
    ) -> bytes | None:
        from fedcare.simulation.inprocess import SiteGoneError

        if stage == self.stage and round_number >= self.from_round:
            raise SiteGoneError
        reply: bytes | None = self.inner.secure_post(
            study_hash, round_number, stage, body, content_type
        )
        return reply


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh coordinator database, once on SQLite and once on PostgreSQL."""
    with database(request.param, tmp_path) as url:
        yield url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the schema fuzzer's counts (kept as a test property, so they reach this
    summary from an xdist worker too)."""
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get(
        "failed", []
    ):
        for name, value in getattr(report, "user_properties", []):
            if name == "fuzz" and report.when == "call":
                terminalreporter.write_line(f"schema fuzz: {value}")
