"""The site agent refuses, before any connection, a study its policy does not approve."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.config import SiteConfig, load_config
from fedcare.policy import PolicyError, StudyRefusedError, load_policy, save_policy
from fedcare.schema.mapping import load_mapping
from fedcare.schema.readers import read_table
from fedcare.simulation.loopback import prepare_deployment
from fedcare.site.dataset import prepare_site_data
from fedcare.site.gate import admit_study
from fedcare.study import Study, load_study

from .test_network import SITES, cohorts, network_study


@pytest.fixture
def site_config(tmp_path: Path) -> SiteConfig:
    study = network_study(rounds=2, min_sites=2, deadline_s=60)
    deployment = prepare_deployment(tmp_path, study, cohorts(), port=1)
    return load_config(deployment.site_configs[SITES[0]], SiteConfig)


def _admit(config: SiteConfig, study: Study) -> None:
    assert config.data is not None
    assert config.mapping is not None
    data = prepare_site_data(read_table(config.data), load_mapping(config.mapping), study)
    admit_study(config, study, data)


def test_the_approved_study_is_admitted(site_config: SiteConfig) -> None:
    assert site_config.study is not None
    _admit(site_config, load_study(site_config.study))


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 6},
        {"training": {"epochs": 1, "batch_size": 16, "learning_rate": 0.11}},
        {"rounds": {"count": 3, "min_sites": 2, "deadline_s": 60}},
    ],
)
def test_a_study_changed_by_one_setting_is_refused(site_config: SiteConfig, change) -> None:
    assert site_config.study is not None
    changed = load_study(site_config.study).replace(**change)
    with pytest.raises(PolicyError, match="is not approved"):
        _admit(site_config, changed)


def test_a_policy_that_tightens_after_approval_refuses(site_config: SiteConfig) -> None:
    assert site_config.policy is not None
    assert site_config.study is not None
    policy = load_policy(site_config.policy)
    save_policy(policy.model_copy(update={"min_cohort_size": 50}), site_config.policy)
    with pytest.raises(StudyRefusedError):
        _admit(site_config, load_study(site_config.study))


def test_a_site_without_a_policy_runs_nothing(site_config: SiteConfig) -> None:
    assert site_config.study is not None
    with pytest.raises(PolicyError, match="no policy file"):
        _admit(site_config.model_copy(update={"policy": None}), load_study(site_config.study))


def test_site_run_refuses_a_changed_study_before_connecting(site_config: SiteConfig) -> None:
    """The coordinator address is unreachable (port 1): the refusal must come first."""
    assert site_config.study is not None
    text = yaml.safe_load(site_config.study.read_text())
    text["training"]["learning_rate"] = 0.2
    site_config.study.write_text(yaml.safe_dump(text))
    config_file = site_config.study.parent / "site.yaml"
    result = CliRunner().invoke(app, ["site", "run", "--config", str(config_file)])
    assert result.exit_code == 2
    assert "is not approved by this site's policy" in result.output
