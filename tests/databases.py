"""The coordinator's SQL store on SQLite and on PostgreSQL, for tests that run on both.

PostgreSQL is the server ``.ci/run`` starts on a loopback port (``FEDCARE_POSTGRES_URL``,
a maintenance URL); every test gets a database of its own, created for it and dropped
after. Without that variable the PostgreSQL cases skip, except in CI, where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

POSTGRES_ENV = "FEDCARE_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the PostgreSQL tests: {POSTGRES_ENV} is not set")
        pytest.skip(f"no PostgreSQL server ({POSTGRES_ENV} unset; .ci/run starts one)")
    name = f"fedcare_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def database(backend: str, folder: Path) -> Iterator[str]:
    """A fresh coordinator database on ``backend`` ("sqlite" or "postgresql")."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'coordinator.db'}"
    else:
        with fresh_postgres() as url:
            yield url
