"""Privacy of what leaves a site: differential privacy and its accounting
(docs/privacy.md), and secure aggregation (docs/secure_aggregation.md)."""
