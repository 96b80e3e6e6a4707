"""The site portal's data, read from a site's own files: empty, and with a trail someone
edited (the portal says so rather than showing its rows)."""

from __future__ import annotations

from pathlib import Path

import yaml

from fedcare.audit import AuditLog
from fedcare.config import SiteConfig, load_config
from fedcare.data import template_text
from fedcare.site.portal import portal_data


def _config(folder: Path) -> SiteConfig:
    (folder / "policy.yaml").write_text(template_text("policy"))
    path = folder / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "site": "alpha",
                "coordinator": "https://127.0.0.1:9/",
                "tls": {"cert": "a.crt", "key": "a.key", "ca": "ca.crt"},
                "policy": "policy.yaml",
                "state_dir": "state",
            }
        )
    )
    return load_config(path, SiteConfig)


def test_a_new_site_shows_nothing_sent_and_its_budget(tmp_path: Path) -> None:
    data = portal_data(_config(tmp_path))
    assert data.audit_ok
    assert data.outflows == []
    assert data.validations == []
    assert data.monitors == []
    assert data.budgets  # the template policy sets a budget, nothing spent
    assert all(b.spent in (0.0, None) for b in data.budgets)


def test_outflows_come_from_the_trail_and_an_edited_trail_is_flagged(tmp_path: Path) -> None:
    config = _config(tmp_path)
    trail = tmp_path / "audit.jsonl"
    log = AuditLog(trail, "alpha")
    log.append("update.sent", study="a" * 64, round=1, to="https://c/", bytes=99, sha256="b" * 64)
    log.append("model.received", study="a" * 64, round=1, sha256="c" * 64)
    data = portal_data(config)
    assert [(o.event, o.about, o.bytes) for o in data.outflows] == [("update.sent", "round 1", 99)]
    trail.write_text(trail.read_text().replace('"bytes":99', '"bytes":1'))
    edited = portal_data(config)
    assert not edited.audit_ok
    assert edited.outflows == []
