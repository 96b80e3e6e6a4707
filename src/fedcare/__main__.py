"""``python -m fedcare``: the same as the ``fedcare`` command."""

from fedcare.cli import app

app()
