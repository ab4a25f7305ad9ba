"""`make bench`: every benchmark in one run on one server, with ratios to the floor of that run.

    make bench                      # the full run (about 4 minutes): the figures in bench/README.md
    make bench BENCH_ARGS=--quick   # seconds: checks that everything runs and counts no errors
    make bench BENCH_ARGS=--layers  # only the fairness layers' cost, on against off

Writes bench/results/report.json and, on a full run, the chart bench/chart.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import latency, layers, scale, throughput
from bench.server import RESULTS, ROOT, running_server

CHART = ROOT / "bench" / "chart.png"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds: checks that it all runs")
    parser.add_argument("--layers", action="store_true", help="only the fairness layers' A/B")
    args = parser.parse_args()
    if not Path(throughput.H2LOAD).exists():
        raise SystemExit("bench: h2load is missing (`make bench` installs Debian's nghttp2-client)")
    quick = args.quick
    if args.layers:
        layers_report = layers.run(quick)
        layers.print_report(layers_report)
        print(f"errors: {layers_report['errors']}")
        sys.exit(1 if layers_report["errors"] else 0)
    # a second server with no pre-started processes: every new script starts one, sandboxed
    with running_server() as server, running_server(PREWARM_ENVIRONMENTS="0") as unpooled:
        report: dict[str, Any] = {
            "latency": latency.run(server, quick, unpooled),
            "throughput": throughput.run(server, quick),
            "in_flight": scale.in_flight(server, *((200, 50) if quick else (2000, 500))),
            "memory": scale.memory(server, 5_000 if quick else 100_000),
            "large_table": scale.large_table(server, *((10_000, 1) if quick else (1_000_000, 8))),
        }
    report["layers"] = layers.run(quick)
    latency.print_report(report["latency"])
    print()
    throughput.print_report(report["throughput"])
    print()
    print_scale(report)
    print()
    layers.print_report(report["layers"])
    errors = (
        report["latency"]["errors"]
        + sum(row["errors"] for row in report["throughput"]["rows"])
        + report["in_flight"]["errors"]
        + report["memory"]["errors"]
        + report["large_table"]["errors"]
        + report["layers"]["errors"]
    )
    print(f"errors: {errors}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report.json").write_text(json.dumps(report, indent=2))
    if not quick:
        chart(report, CHART)
        print(f"chart: {CHART.relative_to(ROOT)}")
    if errors:
        sys.exit(1)


def print_scale(report: dict[str, Any]) -> None:
    flight, memory, table = report["in_flight"], report["memory"], report["large_table"]
    print(
        f"{flight['calls']} Executes in flight over {flight['sessions']} sessions: "
        f"{flight['seconds']:.1f} s, {flight['errors']} errors {flight['first_error']}"
    )
    print(
        f"server RSS {memory['rss_before_mib']:.0f} MiB after a warm-up, {memory['rss_after_mib']:.0f} MiB "
        f"after {memory['executions']:,} more Executes"
    )
    print(
        f"warm Execute {table['rps_before']:.0f} req/s, {table['rps_after']:.0f} req/s "
        f"with {table['rows']:,} more sessions ({table['ratio']:.2f}x; "
        f"filled in {table['fill_seconds']:.0f} s)"
    )


def chart(report: dict[str, Any], path: Path) -> None:
    """Throughput per scenario (and its ratio to the floor) beside latency per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["throughput"]["rows"]
    latency_rows = report["latency"]["rows"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 7.5))
    names = [f"{row['name']} ({row['in_flight']} in flight)" for row in rows]
    colors = ["#4C72B0" if row["in_flight"] <= 16 else "#DD8452" for row in rows]
    left.barh(range(len(rows)), [row["rps"] for row in rows], color=colors)
    left.set_yticks(range(len(rows)), names, fontsize=8)
    for y, row in enumerate(rows):
        left.text(row["rps"], y, f" {row['rps']:.0f} ({row['ratio']:.2f}x)", va="center", fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("requests/s (saturating)")
    left.set_title("Throughput, and its ratio to the floor at the same concurrency")
    names = list(latency_rows)
    y = range(len(names))
    right.barh([i - 0.2 for i in y], [latency_rows[n]["p50_ms"] for n in names], height=0.4, label="p50")
    right.barh([i + 0.2 for i in y], [latency_rows[n]["p99_ms"] for n in names], height=0.4, label="p99")
    right.set_yticks(list(y), names)
    right.invert_yaxis()
    right.set_xscale("log")
    right.set_xlabel("ms (concurrency 1, log scale)")
    right.set_title("Latency")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
