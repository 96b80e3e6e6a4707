"""The held-out split, decided record by record.

Each row goes to held-out data when a keyed hash of its own values falls below
the holdout fraction, so where a patient lands depends on that patient's record
alone: adding, removing or correcting one record never moves another between
training and held-out data (which a shuffled split would, and which differential
privacy's accounting, per record, does not allow for).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from numpy.typing import NDArray


def keyed_holdout(frame: pd.DataFrame, fraction: float, key: int) -> NDArray[np.bool_]:
    """True for the rows held out: BLAKE2b of the row's values under ``key``, as a number in
    [0, 1), below ``fraction``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the holdout fraction must lie in (0, 1), not {fraction}")
    secret = key.to_bytes(8, "little")
    columns = sorted(frame.columns)
    texts = [[f"{c}={t}" for t in _column_text(frame[c])] for c in columns]
    out = np.empty(len(frame), dtype=bool)
    for i, parts in enumerate(zip(*texts, strict=True)):
        digest = hashlib.blake2b("\x1f".join(parts).encode(), key=secret, digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2**64 < fraction
    return out


def _column_text(column: pd.Series) -> list[str]:
    """:func:`_canonical` of every cell; numeric columns without per-cell type checks (a
    site of 200,000 rows would otherwise spend seconds here)."""
    kind = column.dtype.kind
    if kind == "f":
        return [
            "" if v != v else repr(int(v)) if v.is_integer() else repr(v)
            for v in column.to_numpy(dtype=np.float64).tolist()
        ]
    if kind in "iu":
        return [repr(int(float(v))) for v in column.to_numpy().tolist()]
    return [_canonical(v) for v in column.tolist()]


def _canonical(value: object) -> str:
    """One spelling per value: 1, 1.0 and numpy's 1.0 hash alike; missing is empty."""
    if isinstance(value, np.ndarray):
        # An image: its pixels decide, wherever the file was stored.
        return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
        return repr(int(number)) if number.is_integer() else repr(number)
    return str(value)
