"""Drift detection: after release (a site's new patients against the reference profile
it froze when the release was promoted) and during training (a site's update against
the consortium's step). Pure statistics over arrays; the site runs them, and only a
summary that passes the study's disclosure rules leaves it (docs/drift.md)."""
