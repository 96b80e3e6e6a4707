"""fedcare: federated learning between hospitals."""

__version__ = "0.1.0"
