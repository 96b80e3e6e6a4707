from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html import escape
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.data import demo_study_path

from .conftest import toy_frame, write_toy_sites

runner = CliRunner()


def test_demo_writes_results_and_report(tmp_path: Path) -> None:
    """The real console script, in its own process, on small built-in hospitals."""
    out = tmp_path / "demo"
    fedcare = Path(sys.executable).with_name("fedcare")
    done = subprocess.run(
        [str(fedcare), "demo", "--out", str(out), "--scale", "0.3", "--rounds", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "160"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 5
    assert len(results["sites"]) >= 5
    assert len(results["rounds"]) == 3
    # The last round always makes a candidate release, settled by every site.
    (release,) = results["releases"]
    assert release["round"] == 3
    assert release["state"] in {"promoted", "rejected"}
    assert set(release["verdicts"]) == {site["name"] for site in results["sites"]}
    assert (out / "registry" / "registry.db").exists()
    assert {"federated", "pooled"} <= set(results["matrix"])
    html = (out / "report.html").read_text()
    assert "<svg" in html
    # Real plots: per site ROC and calibration of each model, with labelled axes and a
    # legend naming every line in its own colour; a subgroup forest plot; rounds.
    for site in results["sites"]:
        name = site["name"]
        assert set(results["curves"][name]) == {"local", "federated", "pooled"}
        start = html.index(f'id="curves-{name}"')
        block = html[start : html.index("</svg>", start)]
        for text in (
            "False positive rate",
            "True positive rate",
            "Predicted risk",
            "Observed event rate",
            "local",
            "federated",
            "pooled",
            "chance",
        ):
            assert text in block, (name, text)
        strokes = set(re.findall(r"stroke: ?(#[0-9a-f]{6})", block))
        assert {"#1f77b4", "#d62728", "#2ca02c"} <= strokes, strokes
        forest = html[html.index(f'id="forest-{name}"') :]
        assert "AUROC (95 % bootstrap interval)" in forest[: forest.index("</svg>")]
        groups = [row["group"] for row in results["subgroups"][name]]
        shown = forest[: forest.index("</svg>")]
        assert all(escape(group, quote=False) in shown for group in groups), groups
    for site in results["sites"]:  # the demo is a DP study: epsilon by round, rising
        spent = site["epsilon_by_round"]
        assert len(spent) == 3
        assert spent == sorted(spent)
        assert spent[-1] <= site["epsilon_budget"]
    epsilon_plot = html[html.index('id="epsilon-plot"') :]
    assert "Epsilon spent" in epsilon_plot[: epsilon_plot.index("</svg>")]
    rounds_plot = html[html.index('id="rounds-plot"') :]
    assert "Federated AUROC by round" in rounds_plot[: rounds_plot.index("</svg>")]
    for site in results["sites"]:
        assert site["name"] in done.stdout
        assert site["name"] in html
    assert "Cross-site generalisation" in done.stdout
    assert "<h2>Releases</h2>" in html
    # Every per-site AUROC comes with its held-out size, positives and interval.
    for row in results["comparison"]:
        assert row["n"] > 0
        assert 0 < row["positives"] < row["n"]
        for model in ("local", "federated", "pooled"):
            if row[f"{model}_ci"] is not None:
                low, high = row[f"{model}_ci"]
                assert low <= row[model] <= high
        assert f"<td>{row['n']}</td><td>{row['positives']}</td>" in html
    assert any(row["federated_ci"] is not None for row in results["comparison"])
    for model, row in results["matrix"].items():  # every model on every site, with its CI
        for cell in row.values():
            if cell["auroc_ci"] is not None:
                low, high = cell["auroc_ci"]
                assert f"{cell['auroc']:.3f} [{low:.3f}, {high:.3f}]" in html, model
    small = [r["site"] for r in results["comparison"] if r["positives"] < 20]
    for site in small:
        assert any(w.startswith(f"{site}: ") for w in results["warnings"])
        assert f"warning {site}" in done.stdout
    # A DP run says so, with its settings, in every report.
    assert results["privacy"]["epsilon"] == 4.0
    assert results["privacy"]["delta"] == 1e-5
    assert 'id="dp-settings"' in html
    assert "DP-SGD: epsilon 4 per site" in done.stdout
    assert any("convergence is not checked" in w for w in results["warnings"])
    # DP-SGD at every hospital: each ledger charged the run against that hospital's budget,
    # within the study's epsilon 4, and no training loss left any site.
    for site in results["sites"]:
        assert 0 < site["epsilon_spent"] <= 4.0 <= site["epsilon_budget"]
    assert all(r["mean_train_loss"] is None for r in results["rounds"])
    assert "Privacy budget at each site" in done.stdout
    assert "<h2>Privacy budget at each site</h2>" in html
    assert "Releases" in done.stdout


def test_simulate_from_sites_file(tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: cli-toy\nschema:\n  label: {name: y}\n  features: [{name: a}, {name: b}]\n"
        "rounds: {count: 2, min_sites: 2}\n"
    )
    entries = []
    for i, name in enumerate(["one", "two"]):
        frame = toy_frame(i, 120)[["A", "B", "Y"]]
        data = tmp_path / f"{name}.parquet" if i else tmp_path / f"{name}.csv"
        if i:
            frame.to_parquet(data)
        else:
            frame.to_csv(data, index=False)
        (tmp_path / f"{name}.mapping.yaml").write_text(
            f"site: {name}\nfeatures: {{a: A, b: B}}\nlabel: Y\n"
        )
        entries.append(f"  - {{name: {name}, data: {data.name}, mapping: {name}.mapping.yaml}}")
    sites = tmp_path / "sites.yaml"
    sites.write_text("sites:\n" + "\n".join(entries) + "\n")
    result = runner.invoke(
        app,
        [
            "simulate",
            "--study",
            str(study),
            "--sites",
            str(sites),
            "--out",
            str(tmp_path / "o"),
            "--weighting",
            "equal",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["weighting"] == "equal"
    assert [s["name"] for s in saved["sites"]] == ["one", "two"]


def test_bad_study_exits_2_with_field_path(tmp_path: Path) -> None:
    bad = tmp_path / "study.yaml"
    bad.write_text(demo_study_path().read_text().replace("batch_size: 64", "batch_size: -1"))
    result = runner.invoke(app, ["study", "check", str(bad)])
    assert result.exit_code == 2
    assert "training.batch_size" in result.output


def test_study_check_prints_hash() -> None:
    from fedcare.data import demo_study

    result = runner.invoke(app, ["study", "check", str(demo_study_path())])
    assert result.exit_code == 0
    assert demo_study().content_hash in result.output
    assert "DP-SGD, epsilon 4 per site for the study" in result.output


def test_study_check_shows_the_privacy_section(tmp_path: Path) -> None:
    study = demo_study_path().read_text() + (
        "\nprivacy: {dp: true, epsilon: 2.5, delta: 1.0e-6, max_grad_norm: 0.8}\n"
    )
    (tmp_path / "dp.yaml").write_text(study)
    result = runner.invoke(app, ["study", "check", str(tmp_path / "dp.yaml")])
    assert result.exit_code == 0, result.output
    assert "DP-SGD, epsilon 2.5 per site for the study, delta 1e-06, clipping 0.8" in result.output


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_data_check_refuses_bad_rows_naming_column_rule_and_count(tmp_path: Path, fmt: str) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: t\nschema:\n  label: {name: y}\n"
        "  features: [{name: temperature, unit: degC, range: [30, 44]}]\n"
    )
    mapping = tmp_path / "m.yaml"
    mapping.write_text("site: s\nfeatures: {temperature: {column: temp_f, unit: degF}}\nlabel: Y\n")
    import pandas as pd

    frame = pd.DataFrame({"temp_f": [98.6, 101.2, 150.0, 151.0, 99.0], "Y": [0, 1, 0, 1, 0]})
    data = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        frame.to_csv(data, index=False)
    else:
        frame.to_parquet(data)
    args = ["data", "check", str(data), "--study", str(study), "--mapping", str(mapping)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "temp_f" in result.output
    assert "outside the valid range [30, 44] after conversion to degC" in result.output
    assert "(2 rows)" in result.output
    assert "nothing was trained or sent" in result.output

    frame.loc[frame.temp_f > 140, "temp_f"] = 100.0
    frame.to_csv(data, index=False) if fmt == "csv" else frame.to_parquet(data)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "5 rows fit" in result.output


def test_error_messages_quote_user_text_literally(tmp_path: Path) -> None:
    """A column name that looks like Rich markup is shown as written, not styled away."""
    study = tmp_path / "study.yaml"
    study.write_text("name: t\nschema:\n  label: {name: y}\n  features: [{name: a}]\n")
    mapping = tmp_path / "m.yaml"
    mapping.write_text("site: s\nfeatures: {a: '[bold]A'}\nlabel: Y\n")
    data = tmp_path / "d.csv"
    data.write_text("B,Y\n1,0\n2,1\n")
    args = ["data", "check", str(data), "--study", str(study), "--mapping", str(mapping)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "column '[bold]A': column not found in the data" in result.output


def test_missing_file_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", "verify", str(tmp_path / "absent.jsonl")])
    assert result.exit_code == 2
    assert "absent.jsonl" in result.output
    assert "Traceback" not in result.output


def test_a_reused_out_folder_starts_a_fresh_registry(tmp_path: Path) -> None:
    # Reported: reusing --out kept the old registry, so release ids continued at 29.
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: cli-toy\nschema:\n  label: {name: y}\n  features: [{name: a}, {name: b}]\n"
        "rounds: {count: 2, min_sites: 2}\n"
        "disclosure: {artefacts: [model_updates, metrics], min_cohort_size: 5}\n"
        "validation: {subgroups: []}\n"
    )
    sites = write_toy_sites(tmp_path, ("one", "two"), 150)
    args = ["simulate", "--study", str(study), "--sites", str(sites), "--out", str(tmp_path / "o")]
    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        saved = json.loads((tmp_path / "o" / "results.json").read_text())
        assert [r["id"] for r in saved["releases"]] == [1]
    assert "replacing the previous run's registry" in result.output


def test_a_repeated_column_is_refused_not_renamed(tmp_path: Path) -> None:
    """pandas would read the second 'A' as 'A.1'; the site's mapping then reads one of
    two columns nobody told apart."""
    study = tmp_path / "study.yaml"
    study.write_text("name: t\nschema:\n  label: {name: y}\n  features: [{name: a}]\n")
    mapping = tmp_path / "m.yaml"
    mapping.write_text("site: s\nfeatures: {a: A}\nlabel: Y\n")
    data = tmp_path / "d.csv"
    data.write_text("A,Y,A\n1,0,5\n2,1,6\n")
    args = ["data", "check", str(data), "--study", str(study), "--mapping", str(mapping)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "repeated column names: 'A' (2 times)" in result.output
    assert "Traceback" not in result.output
    data.write_text("A,Y,B\n1,0,5\n2,1,6\n")
    assert runner.invoke(app, args).exit_code == 0


def test_a_binary_study_file_is_one_line(tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_bytes(bytes(range(256)) * 4)
    result = runner.invoke(app, ["study", "check", str(study)])
    assert result.exit_code == 2
    assert "study.yaml: the study file is not UTF-8 text (byte 128 is 0x80)" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_missing_or_broken_certificate_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "consortium"
    assert (
        runner.invoke(
            app, ["provision", "--consortium", "c", "--sites", "a", "--out", str(out)]
        ).exit_code
        == 0
    )
    config = str(out / "coordinator.yaml")
    (out / "coordinator.key").rename(tmp_path / "key")
    result = runner.invoke(app, ["coordinator", "serve", "--config", config])
    assert result.exit_code == 2
    assert "tls.key: the private key file" in result.output
    assert "coordinator.key does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "key").rename(out / "coordinator.key")
    (out / "coordinator.crt").write_text("not a certificate\n")
    result = runner.invoke(app, ["coordinator", "serve", "--config", config])
    assert result.exit_code == 2
    assert "cannot load this party's certificate" in result.output
    assert "Traceback" not in result.output
    (out / "ca.crt").unlink()
    result = runner.invoke(app, ["coordinator", "serve", "--config", config])
    assert result.exit_code == 2
    assert "tls.ca: the CA certificate file" in result.output
    # The site's client checks its files the same way before it connects.
    from fedcare.config import ConfigError, TlsFiles
    from fedcare.site.client import tls_context

    site = out / "sites" / "a"
    (site / "a.key").unlink()
    with pytest.raises(ConfigError, match=r"tls\.key: the private key file .*a\.key does not"):
        tls_context(TlsFiles(cert=site / "a.crt", key=site / "a.key", ca=site / "ca.crt"))


HEAVY = ("numpy", "pandas", "torch", "sklearn", "scipy", "pint", "pyarrow")


def test_help_loads_no_numerical_library() -> None:
    """`fedcare --help` (and the study contract it imports for option types) stays free
    of numpy, pandas, torch, scikit-learn, scipy, pint and pyarrow: a help page or a
    typo should not cost a second. Timing is measured, not asserted; this guards the
    cause (benchmarks: `time fedcare --help`)."""
    script = (
        "import sys\n"
        "sys.argv = ['fedcare', '--help']\n"
        "from fedcare.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        f"print('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert "Usage" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "loaded:"


def test_the_report_draws_figures_for_the_largest_sites_only() -> None:
    from fedcare.report.html import MAX_SITE_FIGURES, render_html
    from fedcare.simulation.runner import SimulationOptions, run_simulation
    from fedcare.site.dataset import prepare_site_data
    from fedcare.study import parse_study

    from .conftest import TOY_STUDY, toy_frame, toy_mapping

    study = parse_study(TOY_STUDY.replace("count: 4", "count: 1"))
    sites = [
        prepare_site_data(toy_frame(i, 60 + 2 * i), toy_mapping(f"h{i:02d}"), study)
        for i in range(MAX_SITE_FIGURES + 6)
    ]
    result = run_simulation(study, sites, SimulationOptions(False, {}))
    html = render_html(result)
    drawn = [s.name for s in sites if f'id="curves-{s.name}"' in html]
    largest = sorted(sites, key=lambda s: (-s.n_test, s.name))[:MAX_SITE_FIGURES]
    assert sorted(drawn) == sorted(s.name for s in largest)
    assert "the other 6 sites' curves are in results.json" in " ".join(html.split())
    # The by-round figure has a line (and a legend entry) for the same sites only.
    rounds = html[
        html.index('id="rounds-plot"') : html.index("</svg>", html.index('id="rounds-plot"'))
    ]
    assert f"{MAX_SITE_FIGURES} largest of {len(sites)} sites" in rounds
    assert sorted(s.name for s in sites if f">{s.name}<" in rounds) == sorted(drawn)


def test_a_simulation_without_release_validation_loads_no_scikit_learn_scipy_or_matplotlib(
    tmp_path: Path,
) -> None:
    """They cost a simulation 1.3 s and about 70 MB to load: its metrics and curves are
    numpy, and the parts that use them (release validation, drift tests, a stratified
    split) import them when they run. Nor matplotlib, half a second to import and as
    much again to lay out the by-round figure: a report without subgroups draws only
    svg_chart's figures. Nor httpx: the simulation calls the study service directly.
    Timing and memory are measured in benchmarks/scale.py; this guards the cause."""
    from .conftest import write_toy_sites

    study = tmp_path / "study.yaml"
    study.write_text(
        "name: no-sklearn\nschema:\n  label: {name: y}\n"
        "  features: [{name: a, reference: [0, 1]}, {name: b, reference: [0, 1]}]\n"
        "preprocessing: {scaling: reference}\n"
        "training: {epochs: 1, batch_size: 16, learning_rate: 0.1}\n"
        "rounds: {count: 2, min_sites: 2}\naggregation: {weighting: equal}\n"
    )
    sites = write_toy_sites(tmp_path, ("north", "south"), 200)
    argv = ["fedcare", "simulate", "--study", str(study), "--sites", str(sites)]
    argv += ["--out", str(tmp_path / "out"), "--no-baselines"]
    script = (
        "import sys\n"
        f"sys.argv = {argv!r}\n"
        "from fedcare.cli import app\n"
        "try:\n    app()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "loaded = [m for m in ('sklearn', 'scipy', 'matplotlib', 'httpx') if m in sys.modules]\n"
        "print('loaded:' + ','.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert (tmp_path / "out" / "report.html").is_file()
    assert done.stdout.strip().splitlines()[-1] == "loaded:"


def _exit_in_subprocess(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = (
        "import atexit, sys, threading, time\n"
        "import torch\n"
        "from fedcare.cli.main import _exit\n"
        f"out = {str(tmp_path)!r}\n" + body
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )


def test_fast_exit_keeps_status_handlers_and_output(tmp_path: Path) -> None:
    """Skipping PyTorch's teardown still runs exit handlers and flushes the streams."""
    done = _exit_in_subprocess(
        tmp_path,
        "atexit.register(lambda: open(out + '/handler', 'w').write('ran'))\n"
        "sys.stdout.write('x' * 100000)\n"
        "_exit(3)\n",
    )
    assert done.returncode == 3
    assert (tmp_path / "handler").read_text() == "ran"
    assert done.stdout == "x" * 100000
    message = _exit_in_subprocess(tmp_path, "_exit('error: the reason')\n")
    assert (message.returncode, message.stderr) == (1, "error: the reason\n")


def test_fast_exit_waits_for_a_running_thread(tmp_path: Path) -> None:
    """A thread still writing when the command returns finishes before the process ends."""
    done = _exit_in_subprocess(
        tmp_path,
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    open(out + '/late', 'w').write('done')\n"
        "threading.Thread(target=late).start()\n"
        "_exit(0)\n",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "late").read_text() == "done"


def test_console_script_reports_a_failure_status(tmp_path: Path) -> None:
    """The executable's status and one-line error are the command's."""
    fedcare = Path(sys.executable).with_name("fedcare")
    sites = tmp_path / "sites.yaml"
    sites.write_text("sites:\n- name: a\n  data: missing.csv\n  mapping: missing.yaml\n")
    done = subprocess.run(
        [str(fedcare), "simulate", "--study", str(demo_study_path()), "--sites", str(sites)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {tmp_path / 'missing.csv'}: no such data file\n"


def test_exit_under_a_profiler_lets_it_write_its_results(tmp_path: Path) -> None:
    """``python -m cProfile`` writes its file after the program returns."""
    program = tmp_path / "program.py"
    program.write_text("import torch\nfrom fedcare.cli.main import _exit\n_exit(0)\n")
    profile = tmp_path / "out.prof"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), str(program)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert profile.stat().st_size > 0


def test_simulate_summarises_many_sites_and_keeps_every_row_in_the_results(
    tmp_path: Path,
) -> None:
    """Past FULL_TABLE_SITES sites the terminal gets a summary; results.json has them all."""
    from fedcare.cli.simulation import FULL_TABLE_SITES

    names = tuple(f"s{i:02d}" for i in range(FULL_TABLE_SITES + 2))
    sites = write_toy_sites(tmp_path, names, 60)
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: cli-many\nschema:\n  label: {name: y}\n  features: [{name: a}, {name: b}]\n"
        "rounds: {count: 2, min_sites: 2}\n"
    )
    out = tmp_path / "out"
    argv = ["simulate", "--study", str(study), "--sites", str(sites), "--out", str(out)]
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [row["site"] for row in results["comparison"]] == list(names)
    assert f"AUROC on the held-out data of {len(names)} sites" in result.output
    federated = sorted(
        (row["federated"], row["site"]) for row in results["comparison"] if row["federated"]
    )
    rows = [line.split("│") for line in result.output.splitlines()]
    (line,) = ["│".join(row) for row in rows if len(row) > 2 and row[1].strip() == "federated"]
    assert f"{federated[0][0]:.3f} {federated[0][1]}" in line
    assert f"{federated[-1][0]:.3f} {federated[-1][1]}" in line
    # No per-site rows: the site that is neither lowest nor highest is not in the tables.
    middle = federated[len(federated) // 2][1]
    assert middle not in result.output.split("warning ")[0]
    warnings = results["warnings"]
    printed = sum(line.startswith("warning ") for line in result.output.splitlines())
    assert printed == min(len(warnings), FULL_TABLE_SITES) + (len(warnings) > FULL_TABLE_SITES)
