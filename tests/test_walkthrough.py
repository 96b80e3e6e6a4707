"""docs/walkthrough.md is a claim: run it as written, command by command, and check that
each command prints what the page shows (times aside) and exits as the page implies."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _normal(text: str) -> str:
    return re.sub(r"\d+(\.\d+)? s\b", "N s", " ".join(text.split()))


def _run_console(block: str, folder: Path) -> None:
    fedcare = Path(sys.executable).with_name("fedcare")
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    for command, shown in steps:
        args = shlex.split(command)
        assert args[0] == "fedcare", command
        done = subprocess.run(
            [str(fedcare), *args[1:]],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COLUMNS": "200"},
            check=False,
        )
        output = _normal(done.stdout + done.stderr)
        expected_code = 2 if any(s.startswith("error:") for s in shown) else 0
        assert done.returncode == expected_code, f"{command}\n{done.stdout}{done.stderr}"
        for line in shown:
            assert _normal(line) in output, f"{command}: {line!r} not in\n{output}"
        assert "Traceback" not in output


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = FENCE.findall(PAGE.read_text(encoding="utf-8"))
    assert [kind for kind, _ in blocks].count("console") >= 4
    for kind, body in blocks:
        if kind == "python":
            script = tmp_path / "step.py"
            script.write_text(body)
            subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, timeout=120)
        elif kind == "yaml":
            first, _, rest = body.partition("\n")
            assert first.startswith("# file: "), first
            (tmp_path / first.removeprefix("# file: ").strip()).write_text(rest)
        elif kind == "console":
            _run_console(body, tmp_path)
        elif kind == "text":
            header, *rows = body.strip().splitlines()
            lines = (tmp_path / "scores.csv").read_text().splitlines()
            assert lines[0] == header
            assert len(lines) == 51
            for row in rows:
                assert row in lines
