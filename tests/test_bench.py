"""The benchmarks run (numbers are never asserted here: they live in bench/README.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, env_without_database

pytestmark = pytest.mark.slow


def test_the_benchmark_runs_without_errors() -> None:
    """`make bench BENCH_ARGS=--quick`: every scenario, h2load's included, counted against the server."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT,
        env=env_without_database(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "errors: 0" in result.stdout
    assert "faster than a process spawned per execution" in result.stdout
    assert "x floor" in result.stdout  # the throughput table
    assert "Executes in flight over 50 sessions" in result.stdout
