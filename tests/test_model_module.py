"""A study's own PyTorch model (model: {kind: module}): the approval covers its source,
no code travels, buffers travel with the parameters, DP clips it per patient."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.config import SiteConfig, load_config
from fedcare.models.builders import ModelError, build_model, check_model, initial_parameters
from fedcare.models.module import ModelSourceError, source_digest
from fedcare.models.params import get_flat, parameter_count, set_flat, state_names
from fedcare.models.size import study_parameter_count
from fedcare.simulation.loopback import prepare_deployment
from fedcare.simulation.runner import SimulationOptions, run_simulation
from fedcare.site.dataset import SiteDataset
from fedcare.study import Study
from fedcare.training.dp_sgd import DpSgdSettings, UnsupportedModelError
from fedcare.training.grad_sample import GradSampleClipper
from fedcare.training.local import check_dp_model, train_local

from .test_network import SITES, cohorts, network_study

_names = itertools.count()

NET = """
from pathlib import Path
from torch import nn

Path({marker!r}).write_text("imported")


def build(input_shape):
    (n,) = input_shape
    return nn.Sequential(
        nn.Linear(n, 8), nn.{norm}, nn.ReLU(), nn.Linear(8, 1)
    )
"""


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, norm: str = "LayerNorm(8)") -> str:
    """A model module on sys.path under a fresh name (so no earlier import is reused);
    importing it leaves a marker file. Returns the entrypoint."""
    name = f"hospital_net_{next(_names)}"
    folder = tmp_path / "installed"
    folder.mkdir(exist_ok=True)
    marker = tmp_path / f"{name}.imported"
    (folder / f"{name}.py").write_text(NET.format(marker=str(marker), norm=norm))
    monkeypatch.syspath_prepend(str(folder))
    return f"{name}:build"


def module_study(base: Study, entrypoint: str, digest: str | None = None) -> Study:
    model = {
        "kind": "module",
        "entrypoint": entrypoint,
        "source_sha256": digest or source_digest(entrypoint),
    }
    return base.replace(model=model)


def test_the_source_digest_is_part_of_the_study_hash(
    toy_study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entrypoint = install(tmp_path, monkeypatch)
    study = module_study(toy_study, entrypoint)
    other = module_study(toy_study, entrypoint, "0" * 64)
    assert study.content_hash != other.content_hash
    assert study.canonical()["model"]["source_sha256"] == source_digest(entrypoint)


def test_an_installed_module_that_differs_is_refused_before_it_runs(
    toy_study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: the code installed at a site is not the code the site approved (edited,
    or a newer version). It is refused, and not one line of it is executed."""
    entrypoint = install(tmp_path, monkeypatch)
    name = entrypoint.partition(":")[0]
    approved = source_digest(entrypoint)
    source = tmp_path / "installed" / f"{name}.py"
    source.write_text(source.read_text() + "\n# a change after approval\n")
    study = module_study(toy_study, entrypoint, approved)
    with pytest.raises(ModelSourceError, match=f"the study approved {approved}") as caught:
        build_model(study.model, (5,))
    assert hashlib.sha256(source.read_bytes()).hexdigest() in str(caught.value)
    assert not (tmp_path / f"{name}.imported").exists()


def test_a_module_that_is_not_installed_is_named(toy_study: Study) -> None:
    study = module_study(toy_study, "no_such_hospital_net:build", "1" * 64)
    with pytest.raises(ModelSourceError, match="'no_such_hospital_net' is not installed here"):
        check_model(study)


def test_the_module_trains_in_a_simulation(
    toy_study: Study, toy_sites: list[SiteDataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entrypoint = install(tmp_path, monkeypatch)
    study = module_study(toy_study, entrypoint).replace(
        rounds={"count": 4, "min_sites": 2}, training={"epochs": 2, "learning_rate": 0.1}
    )
    # Linear(n, 8) + LayerNorm(8) + Linear(8, 1), parameters only (no buffers).
    n = study.feature_schema.n_inputs
    assert study_parameter_count(study) == n * 8 + 8 + 16 + 9
    result = run_simulation(study, toy_sites, SimulationOptions(baselines=False))
    assert all(row.federated > 0.6 for row in result.comparison)


def test_batch_norm_statistics_travel_with_the_parameters(
    toy_study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entrypoint = install(tmp_path, monkeypatch, norm="BatchNorm1d(8)")
    study = module_study(toy_study, entrypoint)
    model = build_model(study.model, (5,))
    names = state_names(model)
    assert names[-2:] == ["1.running_mean", "1.running_var"]  # the counter is an integer
    assert parameter_count(model) == 5 * 8 + 8 + 16 + 9 + 16
    x = np.random.default_rng(0).normal(3.0, 2.0, (64, 5)).astype(np.float32)
    y = (x[:, 0] > 3).astype(np.float32)
    start = initial_parameters(study.model, (5,), seed=0)
    trained = train_local(study.model, study.training, start, x, y, seed=1).params
    moved = trained[-16:] - start[-16:]
    assert np.abs(moved).max() > 0.05  # the running statistics moved, and were sent
    rebuilt = build_model(study.model, (5,))
    set_flat(rebuilt, trained)
    np.testing.assert_array_equal(get_flat(rebuilt), trained)
    assert float(rebuilt[1].running_mean.abs().max()) > 0.05


def test_batch_norm_under_dp_is_refused_with_the_reason(
    toy_study: Study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entrypoint = install(tmp_path, monkeypatch, norm="BatchNorm1d(8)")
    dp = {"dp": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    study = module_study(toy_study, entrypoint).replace(privacy=dp)
    with pytest.raises(ModelError, match=r"BatchNorm mixes the\s+patients of a batch"):
        check_model(study)
    with pytest.raises(UnsupportedModelError, match="through BatchNorm"):
        check_dp_model(study)
    settings = DpSgdSettings(0.5, 1.0, 1.0, 2, 7)
    n = study.feature_schema.n_inputs
    x = np.zeros((8, n), dtype=np.float32)
    start = initial_parameters(study.model, (n,), seed=0)
    with pytest.raises(UnsupportedModelError, match="through BatchNorm"):
        train_local(study.model, study.training, start, x, np.zeros(8, np.float32), 1, settings)


def test_opacus_clipping_matches_row_by_row_autograd() -> None:
    """The per-sample path for models ghost clipping does not cover (conv, norm layers):
    each row's gradient clipped, then summed, against a plain loop over the rows."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 1),
    )
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0.0, 1, 1, 0, 1, 0])
    clip = 0.05
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(6):
        model.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(x[i : i + 1]).reshape(-1), y[i : i + 1]
        )
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        assert norm > clip  # so clipping matters in this check
        for total, g in zip(expected, grads, strict=True):
            total += g * min(1.0, clip / (float(norm) + 1e-6))
    sums, _ = GradSampleClipper(model, clip)(x, y)
    for got, want in zip(sums, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.fixture
def module_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SiteConfig, Path]:
    entrypoint = install(tmp_path, monkeypatch)
    study = module_study(network_study(rounds=2, min_sites=2, deadline_s=60), entrypoint)
    deployment = prepare_deployment(tmp_path / "deploy", study, cohorts(), port=1)
    config_file = deployment.site_configs[SITES[0]]
    return load_config(config_file, SiteConfig), config_file


def test_site_run_refuses_a_changed_module_before_connecting(
    module_site: tuple[SiteConfig, Path], tmp_path: Path
) -> None:
    """The site approved the study (and so the module's digest); the module installed at
    the site is then changed. `fedcare site run` refuses in one line before it connects
    (the coordinator's port is 1: nothing listens)."""
    config, config_file = module_site
    assert config.study is not None
    name = yaml.safe_load(config.study.read_text())["model"]["entrypoint"].partition(":")[0]
    source = tmp_path / "installed" / f"{name}.py"
    source.write_text(source.read_text().replace("nn.Linear(8, 1)", "nn.Linear(8, 1, bias=False)"))
    result = CliRunner().invoke(app, ["site", "run", "--config", str(config_file)])
    assert result.exit_code == 2, result.output
    assert "installed here" in result.output
    assert "install the version the study names" in result.output
    assert "Traceback" not in result.output


def test_coordinator_serve_refuses_a_changed_module_in_one_line(
    module_site: tuple[SiteConfig, Path], tmp_path: Path
) -> None:
    """The coordinator builds the round-0 model from the study's module too: a changed
    file there is refused at start, before it serves anything."""
    config, _ = module_site
    assert config.study is not None
    name = yaml.safe_load(config.study.read_text())["model"]["entrypoint"].partition(":")[0]
    source = tmp_path / "installed" / f"{name}.py"
    source.write_text(source.read_text() + "\n# edited at the coordinator\n")
    coordinator = tmp_path / "deploy" / "coordinator.yaml"
    result = CliRunner().invoke(app, ["coordinator", "serve", "--config", str(coordinator)])
    assert result.exit_code == 2, result.output
    assert "install the version the study names" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_module_study_runs_over_the_network_with_each_party_s_own_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real coordinator and site processes over mutual TLS, each importing the module
    from its own installation (PYTHONPATH here); nothing but parameters travels. Every
    site ends with the in-process simulation's model, LayerNorm included."""
    from fedcare.federation.messages import decode_model
    from fedcare.simulation.runner import run_federation

    from .test_network import deploy, run_to_end

    entrypoint = install(tmp_path, monkeypatch)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "installed"))
    study = module_study(network_study(rounds=2, min_sites=3, deadline_s=120), entrypoint)
    deployment = deploy(tmp_path / "deploy", study)
    run_to_end(deployment)
    from fedcare.simulation.loopback import prepare_cohort

    from .test_network import cohorts

    reference = run_federation(study, [prepare_cohort(c, study) for c in cohorts()]).params
    n = study_parameter_count(study)
    for name in SITES:
        state = deployment.site_configs[name].parent / "state"
        (model_file,) = state.glob("model-*.safetensors")
        _, final, _ = decode_model(model_file.read_bytes(), n)
        np.testing.assert_allclose(final, reference, atol=1e-5)
