"""Privacy of what leaves a site: differential privacy and its accounting (see docs/privacy.md)."""
