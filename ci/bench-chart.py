#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Draws the chart of docs/benchmarks.md from the timing table vgpu-gpu-check prints.

Usage: bench-chart.py GPU_CHECK_LOG OUT.png [--title TEXT]

Reads the table that starts with the line "metric ... runs ... mediator ... native" (the
last such table in the log) and draws two panels: latencies (mediator beside native,
log scale) and copy bandwidth (mediator beside native pageable and native pinned).
Needs matplotlib (pip install matplotlib).
"""

import argparse
import re
import sys


def parse(path):
    rows = []
    table = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if re.match(r"^metric\s+runs\s+mediator\s+native", line):
                table = []
                continue
            if table is None:
                continue
            if not line.strip():
                if table:
                    rows = table
                table = None
                continue
            m = re.match(r"^(.*?\))\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", line)
            if not m:
                if table:
                    rows = table
                table = None
                continue
            num = lambda s: None if s == "-" else float(s)
            table.append((m.group(1), int(m.group(2)), num(m.group(3)), num(m.group(4)), num(m.group(5))))
    if table:
        rows = table
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("png")
    ap.add_argument("--title", default="vGPU mediator against native CUDA")
    args = ap.parse_args()
    rows = parse(args.log)
    if not rows:
        sys.exit(f"bench-chart.py: error: no timing table in {args.log}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("bench-chart.py: error: matplotlib is missing (pip install matplotlib)")

    latency = [r for r in rows if r[0].endswith("(us)") and r[2] is not None and r[3] is not None]
    bandwidth = [r for r in rows if r[0].endswith("(GB/s)") and r[2] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))

    ax = axes[0]
    names = [r[0].replace(" (us)", "") for r in latency]
    xs = range(len(latency))
    ax.bar([x - 0.2 for x in xs], [r[2] for r in latency], 0.4, label="mediated")
    ax.bar([x + 0.2 for x in xs], [r[3] for r in latency], 0.4, label="native")
    ax.set_yscale("log")
    ax.set_ylabel("microseconds (log scale, lower is better)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    for x, r in zip(xs, latency):
        ax.annotate(f"{r[2] / r[3]:.1f}x", (x - 0.2, r[2]), ha="center", va="bottom", fontsize=8)
    ax.legend()
    ax.set_title("latency")

    ax = axes[1]
    names = [r[0].replace(" (GB/s)", "") for r in bandwidth]
    xs = range(len(bandwidth))
    ax.bar([x - 0.27 for x in xs], [r[2] for r in bandwidth], 0.27, label="mediated")
    ax.bar([x for x in xs], [r[3] or 0 for r in bandwidth], 0.27, label="native pageable")
    ax.bar([x + 0.27 for x in xs], [r[4] or 0 for r in bandwidth], 0.27, label="native pinned")
    ax.set_ylabel("GB/s (higher is better)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.legend()
    ax.set_title("copy bandwidth")

    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}: {len(latency)} latency and {len(bandwidth)} bandwidth metrics")


if __name__ == "__main__":
    main()
