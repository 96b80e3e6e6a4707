"""The ``fedcare`` command line: one module per command group."""

from fedcare.cli.main import app

__all__ = ["app"]
