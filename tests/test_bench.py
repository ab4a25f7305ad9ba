"""The benchmarks run (numbers are never asserted here: they live in bench/README.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, env_without_database

pytestmark = pytest.mark.slow


def test_the_latency_benchmark_runs_without_errors() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.latency", "--quick"],
        cwd=ROOT,
        env=env_without_database(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "errors: 0" in result.stdout
    assert "faster than a process spawned per execution" in result.stdout
