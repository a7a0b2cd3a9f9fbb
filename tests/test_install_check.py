"""Another distribution that installs top-level ``pipeline`` or ``connectors`` is found at start
(issue 13 item 16): every command exits 2 with one line naming it, before doing anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_distribution(site: Path, name: str, top_level: str) -> None:
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "top_level.txt").write_text(f"{top_level}\n")
    (info / "RECORD").write_text("")


def _run(args, extra_path: Path | None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(extra_path or "")]))}
    return subprocess.run([sys.executable, "-m", "connectors.app.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("dist, package", [("django-pipeline", "pipeline"), ("elastic-connectors", "connectors")])
def test_a_conflicting_distribution_is_named_in_one_line_exit_2(tmp_path, dist, package):
    _fake_distribution(tmp_path, dist, package)
    proc = _run(["sinks"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and dist in lines[0] and repr(package) in lines[0] and "pipx" in lines[0], proc.stderr
    assert proc.stdout == ""  # nothing ran


def test_no_conflict_runs_the_command(tmp_path):
    proc = _run(["sinks"], None)
    assert proc.returncode == 0 and "opensearch" in proc.stdout, proc.stderr
