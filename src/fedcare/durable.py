"""Writes that survive a crash: checksums, atomic files, SQLite settings for durability.

Shared by every SQL store in fedcare (the coordinator's state, the release
registry); no fedcare imports, so any layer may use it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def sqlite_pragmas(engine: Engine) -> None:
    """WAL, synchronous=FULL and foreign keys on every new SQLite connection."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # WAL: readers never block the writer; synchronous=FULL: a committed
        # transaction survives power loss, not only a process kill.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
