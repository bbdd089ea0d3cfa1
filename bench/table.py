"""Markdown table of e2e.py result files side by side: CPU ms/msg per process, rates, latencies, checks.

    python bench/table.py bench/results/baseline-*.json [--net]

``--net`` shows the CPU net of each process's idle rate (see bench/README.md) instead of the raw one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROCESSES = ("api", "sender", "reporter", "metrics", "inbound", "broker")


def fmt(v: object, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--net", action="store_true")
    args = ap.parse_args()
    runs = [(f.stem, json.loads(f.read_text())) for f in args.files]
    key = "net_of_idle_ms_per_msg" if args.net else "ms_per_msg"
    head = "| | " + " | ".join(name for name, _ in runs) + " |"
    print(head)
    print("|---" * (len(runs) + 1) + "|")

    def line(label: str, values: list[object], spec: str = ".3f") -> None:
        print(f"| {label} | " + " | ".join(fmt(v, spec) for v in values) + " |")

    line("mode / sink", [f"{r['mode']} / {r['sink']}" for _, r in runs])
    line("messages", [r["messages"] for _, r in runs], "d")
    for p in PROCESSES:
        line(f"{p} CPU ms/msg", [r["cpu"]["per_process"].get(p, {}).get(key) for _, r in runs])
    line("**system total ms/msg**", [r["cpu"]["system_total"].get(key) for _, r in runs])
    for name in ("sink", "harness"):
        line(f"({name}, not counted)", [next((v.get(key) for k, v in r["cpu"]["not_counted"].items()
                                             if k.startswith(name)), None) for _, r in runs])
    line("rest of machine, cores", [r["cpu"]["rest_of_machine_cpu_s"] / r["interval_s"] for _, r in runs], ".2f")
    for rate in ("accepted", "delivered_at_sink", "reported_at_client"):
        line(f"{rate} msg/s", [r["rates_msg_per_s"][rate] for _, r in runs], ".0f")
    for p in ("p50", "p99"):
        line(f"accept→sink {p} s", [r["latency_accept_to_sink_s"][p] for _, r in runs], ".2f")
    line("missing / dup at sink", [f"{r['checks']['missing_at_sink']} / {r['checks']['duplicates_at_sink']}"
                                    for _, r in runs])
    line("missing / dup reports", [f"{r['checks']['missing_reports']} / {r['checks']['duplicate_reports']}"
                                    for _, r in runs])
    line("load avg start → end", [f"{r['load']['loadavg_start'][0]:.1f} → {r['load']['loadavg_end'][0]:.1f}"
                                   for _, r in runs])


if __name__ == "__main__":
    main()
