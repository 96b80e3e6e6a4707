"""``python -m fedcare``: the same as the ``fedcare`` command."""

from fedcare.cli.main import run

run()
