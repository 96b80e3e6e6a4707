"""A synthetic imaging cohort: 64x64 single-channel scans with a lesion present or absent.

Each hospital's scanner shows the same anatomy differently. A scan is a bright oval
organ on a darker background, with smooth texture, and in positive cases one small
round lesion brighter than the organ. The hospitals differ in

* **contrast**: the scanner's offset and gain map tissue to grey levels (a scan from
  one hospital is dark and flat, from another bright and contrasty);
* **noise**: Gaussian noise of its own standard deviation;
* **resolution**: a detector of 64, 32 or 16 pixels across, shown at 64x64 (blocky);
* **prevalence** and size.

The task is the same everywhere (is there a lesion?); only the appearance shifts:
the setting FedBN (Li et al. 2021) addresses by keeping normalisation layers local.
Every image is deterministic for a seed. :func:`write_imaging_cohorts` stores each
hospital as an image folder: PNG files and a ``manifest.csv`` in the hospital's own
column names, read by the site's image-folder reader (:mod:`fedcare.schema.readers`).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedcare.schema.images import MANIFEST, save_image
from fedcare.schema.mapping import ColumnMapping, SiteMapping

SIZE = 64
"""Every stored scan is SIZE x SIZE pixels."""


@dataclass(frozen=True)
class ScannerProfile:
    """One hospital's scanner and case mix."""

    name: str
    description: str
    n: int
    prevalence: float
    offset: float
    """Grey level of background tissue, in [0, 1]."""
    gain: float
    """Grey levels per unit of tissue contrast."""
    noise: float
    detector: int
    """Pixels across the detector; scans are shown upsampled to SIZE."""
    columns: tuple[str, str, str]
    """The manifest's columns for the image, the finding and sex."""
    finding_codes: tuple[str, str]
    """How the hospital writes absent and present."""


PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        "northgate",
        "teaching hospital, new scanner",
        420,
        0.30,
        0.10,
        0.55,
        0.11,
        64,
        ("image", "lesion", "sex"),
        ("0", "1"),
    ),
    ScannerProfile(
        "riverside",
        "district general, mid-range scanner",
        360,
        0.25,
        0.40,
        0.40,
        0.08,
        32,
        ("file", "finding", "patient_sex"),
        ("absent", "present"),
    ),
    ScannerProfile(
        "ashby-general",
        "general hospital, high-contrast protocol",
        320,
        0.35,
        0.02,
        0.85,
        0.12,
        64,
        ("path", "lesion_present", "sex"),
        ("N", "Y"),
    ),
    ScannerProfile(
        "kestrel-renal",
        "renal unit, older scanner, faint contrast",
        240,
        0.45,
        0.55,
        0.30,
        0.05,
        32,
        ("image", "lesion", "sex"),
        ("0", "1"),
    ),
    ScannerProfile(
        "fellside-cottage",
        "community hospital, low-resolution detector",
        180,
        0.20,
        0.25,
        0.60,
        0.13,
        16,
        ("scan_file", "abnormal", "gender"),
        ("no", "yes"),
    ),
)


@dataclass(frozen=True)
class ImagingSite:
    """One hospital's image folder and the mapping from its manifest to the schema."""

    name: str
    description: str
    folder: Path
    mapping: SiteMapping


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth(rng: np.random.Generator, grid: NDArray[np.float64]) -> NDArray[np.float64]:
    """Low-frequency texture: a few broad random bumps."""
    field = np.zeros(grid.shape[1:])
    for _ in range(4):
        cy, cx = rng.uniform(0, SIZE, 2)
        width = rng.uniform(8, 20)
        field += rng.normal(0, 0.12) * np.exp(
            -((grid[0] - cy) ** 2 + (grid[1] - cx) ** 2) / (2 * width**2)
        )
    return field


def scan(rng: np.random.Generator, profile: ScannerProfile, lesion: bool) -> NDArray[np.uint8]:
    """One scan as the hospital's scanner would store it."""
    grid = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    cy, cx = SIZE / 2 + rng.normal(0, 3, 2)
    ry, rx = rng.uniform(18, 25), rng.uniform(15, 22)
    inside = ((grid[0] - cy) / ry) ** 2 + ((grid[1] - cx) / rx) ** 2
    tissue = 0.5 / (1.0 + np.exp((inside - 1.0) * 12.0)) + _smooth(rng, grid)
    if lesion:
        # Somewhere inside the organ, a small bright disc with soft edges.
        angle, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6)
        ly, lx = cy + reach * ry * np.sin(angle), cx + reach * rx * np.cos(angle)
        radius = rng.uniform(2.5, 4.0)
        distance = np.sqrt((grid[0] - ly) ** 2 + (grid[1] - lx) ** 2)
        tissue += rng.uniform(0.18, 0.36) / (1.0 + np.exp((distance - radius) * 2.0))
    step = SIZE // profile.detector
    if step > 1:
        # The detector's coarser pixels, shown at SIZE: each block is one reading.
        blocks = tissue.reshape(profile.detector, step, profile.detector, step).mean((1, 3))
        tissue = np.repeat(np.repeat(blocks, step, 0), step, 1)
    grey = profile.offset + profile.gain * tissue + rng.normal(0, profile.noise, tissue.shape)
    pixels: NDArray[np.uint8] = np.round(np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8)
    return pixels


def cohort_size(profile: ScannerProfile, scale: float) -> int:
    return max(40, round(profile.n * scale))


def write_imaging_cohorts(
    root: Path, seed: int = 2026, scale: float = 1.0, sites: tuple[str, ...] | None = None
) -> list[ImagingSite]:
    """Write every hospital's image folder under ``root`` (one sub-folder each)."""
    chosen = [p for p in PROFILES if sites is None or p.name in sites]
    out = []
    for profile in chosen:
        rng = _rng(seed, profile.name)
        folder = root / profile.name
        (folder / "scans").mkdir(parents=True, exist_ok=True)
        image_col, finding_col, sex_col = profile.columns
        rows = []
        for i in range(cohort_size(profile, scale)):
            lesion = bool(rng.random() < profile.prevalence)
            sex = "F" if rng.random() < 0.5 else "M"
            relative = f"scans/{profile.name}-{i:05d}.png"
            save_image(folder / relative, scan(rng, profile, lesion))
            rows.append(
                {image_col: relative, finding_col: profile.finding_codes[lesion], sex_col: sex}
            )
        with (folder / MANIFEST).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(profile.columns))
            writer.writeheader()
            writer.writerows(rows)
        absent, present = profile.finding_codes
        mapping = SiteMapping(
            site=profile.name,
            features={"scan": ColumnMapping(column=image_col)},
            attributes={"sex": ColumnMapping(column=sex_col)},
            label=ColumnMapping(column=finding_col, values={absent: 0, present: 1}),
        )
        out.append(ImagingSite(profile.name, profile.description, folder, mapping))
    return out
