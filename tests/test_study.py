from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedcare.data import demo_study, demo_study_path
from fedcare.study import StudyError, load_study, parse_study

BASE = """
name: hash-test
schema:
  label: {name: y}
  features:
    - {name: age, unit: years, range: [18, 110]}
    - {name: temperature, unit: degC, range: [30, 44], missing: {rule: median}}
model: {kind: mlp, hidden: [8, 4]}
training: {epochs: 2, batch_size: 32, optimizer: sgd, learning_rate: 0.05}
aggregation: {strategy: fedavg, weighting: capped, cap: 0.5}
rounds: {count: 10, min_sites: 2}
seed: 3
"""


def test_demo_study_is_valid() -> None:
    study = demo_study()
    assert study.name == "early-warning-48h"
    assert study.feature_schema.n_inputs == 15
    assert len(study.content_hash) == 64


def test_hash_ignores_key_order_comments_whitespace_and_number_spelling() -> None:
    reordered = """
# a comment that must not matter
seed: 3
rounds: {min_sites: 2, count: 10}
aggregation:
    cap: 5.0e-1
    weighting:   capped
    strategy: fedavg
training: {learning_rate: 5e-2, optimizer: sgd, batch_size: 32, epochs: 2}
model: {hidden: [8, 4], kind: mlp}   # trailing comment
schema:
  features:
    - {unit: years, name: age, range: [18.0, 110]}
    - {name: temperature, missing: {rule: median}, range: [30, 44], unit: degC}
  label: {name: y}
name: hash-test
"""
    assert parse_study(BASE).content_hash == parse_study(reordered).content_hash


def test_hash_counts_defaults_explicitly_given() -> None:
    with_default = BASE.replace("seed: 3", "seed: 3\npreprocessing: {scaling: site}")
    assert parse_study(BASE).content_hash == parse_study(with_default).content_hash


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("seed: 3", "seed: 4"),
        ("count: 10", "count: 11"),
        ("learning_rate: 0.05", "learning_rate: 0.051"),
        ("hidden: [8, 4]", "hidden: [8, 5]"),
        ("cap: 0.5", "cap: 0.6"),
        ("range: [18, 110]", "range: [18, 111]"),
        ("unit: degC", "unit: degF"),
        ("rule: median", "rule: mean"),
        ("name: hash-test", "name: hash-test2"),
        ("batch_size: 32", "batch_size: 33"),
    ],
)
def test_hash_changes_with_any_setting(old: str, new: str) -> None:
    assert old in BASE
    assert parse_study(BASE).content_hash != parse_study(BASE.replace(old, new)).content_hash


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("seed: 3", "seed: 3\nsed: 4", r"sed: unknown key"),
        ("batch_size: 32", "batch_size: 32, batchsize: 8", r"training\.batchsize: unknown key"),
        ("batch_size: 32", "batch_size: lots", r"training\.batch_size: .*integer"),
        ("count: 10", "count: -1", r"rounds\.count: .*greater than or equal to 1"),
        ("kind: mlp", "kind: transformer", r"model\.kind: .*logistic_regression"),
        ("range: [18, 110]", "range: [110, 18]", r"schema\.features\.0: .*low < high"),
        ("hidden: [8, 4]", "hidden: []", r"model: .*mlp needs at least one hidden layer"),
        ("cap: 0.5", "cap: 1.5", r"aggregation\.cap: .*less than or equal to 1"),
        ("epochs: 2,", "epochs: 2, steps: 5,", r"training: .*either epochs or steps"),
        ("weighting: capped, cap: 0.5", "weighting: capped", r"needs a cap"),
        ("unit: years,", "unit: years, categories: [a, b],", r"categories are only allowed"),
    ],
)
def test_bad_study_is_refused_with_field_path(old: str, new: str, message: str) -> None:
    assert old in BASE
    with pytest.raises(StudyError, match=message):
        parse_study(BASE.replace(old, new), "study.yaml")


def test_not_yaml_and_not_a_mapping() -> None:
    with pytest.raises(StudyError, match="not valid YAML"):
        parse_study("name: [unclosed")
    with pytest.raises(StudyError, match="a study is a mapping"):
        parse_study("- just\n- a list\n")


def test_load_study_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="cannot read the study file"):
        load_study(tmp_path / "absent.yaml")


def test_steps_replace_epochs() -> None:
    study = parse_study(BASE.replace("epochs: 2", "steps: 7"))
    assert study.training.steps == 7
    assert study.training.epochs is None


def test_canonical_form_round_trips() -> None:
    study = load_study(demo_study_path())
    again = parse_study(yaml.safe_dump(study.canonical()))
    assert again == study
    assert again.content_hash == study.content_hash


def test_a_copy_with_changed_settings_never_carries_the_old_hash() -> None:
    from fedcare.data import demo_study

    study = demo_study()
    original = study.content_hash  # computed, and kept on the study
    changed = study.model_copy(update={"seed": study.seed + 1})
    assert changed.content_hash != original
    assert changed.content_hash == parse_study(yaml.safe_dump(changed.canonical())).content_hash
    assert study.model_copy().content_hash == original


def test_the_fast_yaml_loader_reads_what_pyyaml_reads_and_errors_keep_their_line() -> None:
    import yaml

    from fedcare.data import demo_study_path
    from fedcare.yamlfile import load_yaml

    # YAML 1.1's implicit types, which a different resolver would read differently.
    tricky = "a: yes\nb: no\nc: 1e3\nd: 1.0e+3\ne: 0o17\nf: 2026-12-06\ng: ~\nh: '007'\ni: .inf\n"
    for text in (demo_study_path().read_text(encoding="utf-8"), tricky):
        assert load_yaml(text) == yaml.safe_load(text)
    with pytest.raises(yaml.YAMLError, match="line 2"):
        load_yaml("a: 1\nb: [unclosed\n")
