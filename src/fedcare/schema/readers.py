"""Readers for the table formats hospitals export: CSV, Parquet and image folders."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fedcare.schema.images import IMAGE_ROOT, MANIFEST


class DataFileError(ValueError):
    """A data file that cannot be read as a table."""


def _refuse_duplicates(path: Path, names: Sequence[object]) -> None:
    # pandas renames a repeated CSV column ("age", "age.1"): the mapping would then read
    # one of two columns the hospital never told apart. Refuse instead.
    repeated = {str(n): k for n, k in Counter(names).items() if k > 1}
    if repeated:
        listed = ", ".join(f"'{n}' ({k} times)" for n, k in sorted(repeated.items()))
        raise DataFileError(f"{path}: repeated column names: {listed}; give each its own name")


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return next(csv.reader(handle), [])


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file, or an image folder's manifest. CSV cells stay text so
    the mapping decides what is missing; a file whose columns repeat a name is refused.

    For a folder, the table is its ``manifest.csv``; the mapping reads the images its
    image column names, relative to the folder (kept in ``frame.attrs``).
    """
    if path.is_dir():
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise DataFileError(f"{path}: a data folder needs an image manifest, {MANIFEST}")
        frame = read_table(manifest)
        frame.attrs[IMAGE_ROOT] = str(path.resolve())
        return frame
    suffix = path.suffix.lower()
    try:
        if suffix in {".csv", ".txt"}:
            _refuse_duplicates(path, _csv_header(path))
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix in {".parquet", ".pq"}:
            frame = pd.read_parquet(path)
            _refuse_duplicates(path, list(frame.columns))
            return frame
    except DataFileError:
        raise
    except FileNotFoundError as exc:
        raise DataFileError(f"{path}: no such data file") from exc
    except (OSError, ValueError, csv.Error, pd.errors.ParserError) as exc:
        raise DataFileError(f"{path}: cannot read as {suffix.lstrip('.')}: {exc}") from exc
    raise DataFileError(f"{path}: unsupported data format '{suffix}' (use .csv or .parquet)")
