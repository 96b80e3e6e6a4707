"""Readers for the table formats hospitals export: CSV and Parquet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


class DataFileError(ValueError):
    """A data file that cannot be read as a table."""


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file. CSV cells stay text so the mapping decides what is missing."""
    suffix = path.suffix.lower()
    try:
        if suffix in {".csv", ".txt"}:
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
    except FileNotFoundError as exc:
        raise DataFileError(f"{path}: no such data file") from exc
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataFileError(f"{path}: cannot read as {suffix.lstrip('.')}: {exc}") from exc
    raise DataFileError(f"{path}: unsupported data format '{suffix}' (use .csv or .parquet)")
