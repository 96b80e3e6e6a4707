"""``fedcare coordinator status`` and ``fedcare coordinator site drop | admit`` against a
coordinator's real SQL state, while a study service over the same database runs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fedcare.audit import read_entries
from fedcare.cli import app
from fedcare.config import CoordinatorConfig, load_config
from fedcare.coordinator.server import build_coordinators
from fedcare.federation.state import SiteState
from fedcare.federation.state.sql import SqlState
from fedcare.provision import provision
from fedcare.site.dataset import SiteDataset
from fedcare.site.worker import SiteWorker
from fedcare.study import Study

NAMES = ["alpha", "beta", "gamma"]
runner = CliRunner()


def _coordinator(tmp_path: Path, study: Study) -> tuple[Path, CoordinatorConfig]:
    provision("cli-test", NAMES, tmp_path, port=18443)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study.canonical(), sort_keys=False))
    config_path = tmp_path / "coordinator.yaml"
    raw = yaml.safe_load(config_path.read_text())
    raw["studies"] = [{"file": "study.yaml", "sites": NAMES}]
    config_path.write_text(yaml.safe_dump(raw))
    return config_path, load_config(config_path, CoordinatorConfig)


def test_status_shows_the_open_round_and_each_site_and_drop_admit_reach_a_running_study(
    tmp_path: Path, toy_study: Study, toy_sites: list[SiteDataset]
) -> None:
    study = toy_study.replace(rounds={"count": 3, "min_sites": 2, "deadline_s": 600})
    config_path, config = _coordinator(tmp_path, study)
    state = SqlState(config.database, config.storage)
    service = build_coordinators(config, state)[study.content_hash]
    workers = {s.name: SiteWorker(study, s, service.n_params) for s in toy_sites}
    for name in NAMES:
        service.task_for(name)
    for name in ("alpha", "beta"):
        reply = service.task_for(name)
        service.submit(name, reply.round, workers[name].handle(reply.payload))

    shown = runner.invoke(app, ["coordinator", "status", "--config", str(config_path)])
    assert shown.exit_code == 0, shown.output
    assert "open round 1" in shown.output
    assert "waiting for gamma" in shown.output
    as_json = runner.invoke(
        app,
        ["coordinator", "status", "--config", str(config_path), "--study", "toy", "--json"],
    )
    assert as_json.exit_code == 0, as_json.output
    [view] = json.loads(as_json.output)
    assert view["open_round"]["reported"] == ["alpha", "beta"]
    assert [s["state"] for s in view["sites"]] == ["active"] * 3

    dropped = runner.invoke(
        app,
        [
            "coordinator", "site", "drop", study.content_hash[:10], "gamma",
            "--reason", "site offline for maintenance", "--config", str(config_path),
        ],
    )  # fmt: skip
    assert dropped.exit_code == 0, dropped.output
    service.tick()  # the running service picks the drop up and stops waiting
    assert service.federation.round_number == 1
    assert service.round is not None
    assert service.round.selected == ("alpha", "beta")
    assert service.hash == study.content_hash
    after = json.loads(
        runner.invoke(app, ["coordinator", "status", "--config", str(config_path), "--json"]).output
    )[0]
    gamma = next(s for s in after["sites"] if s["site"] == "gamma")
    assert (gamma["state"], gamma["reason"]) == ("dropped", "site offline for maintenance")
    assert after["last_round"] == 1

    admitted = runner.invoke(
        app,
        [
            "coordinator", "site", "admit", "toy", "gamma", "--reason", "back",
            "--config", str(config_path),
        ],
    )  # fmt: skip
    assert admitted.exit_code == 0, admitted.output
    service.tick()
    assert service.standing("gamma").state is SiteState.ACTIVE
    events = [e.event for e in read_entries(config.audit_log)]
    assert "site.dropped" in events
    assert "site.admitted" in events
    state.close()


def test_bad_study_and_site_names_get_one_line(tmp_path: Path, toy_study: Study) -> None:
    config_path, config = _coordinator(tmp_path, toy_study)
    state = SqlState(config.database, config.storage)
    build_coordinators(config, state)
    state.close()
    for args, message in [
        (["drop", "nope", "gamma"], "no study 'nope'"),
        (["drop", "toy", "mallory"], "not a member"),
    ]:
        result = runner.invoke(
            app,
            ["coordinator", "site", *args, "--reason", "x", "--config", str(config_path)],
        )
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output
    missing = runner.invoke(
        app, ["coordinator", "status", "--study", "nope", "--config", str(config_path)]
    )
    assert missing.exit_code == 2
    assert "no study 'nope'" in missing.output
