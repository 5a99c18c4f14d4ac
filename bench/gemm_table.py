#!/usr/bin/env python3
"""Turns bench_gemm's Google Benchmark JSON output into the Markdown table of bench/RESULTS.md.

usage: gemm_table.py RESULT.json [RESULT2.json ...]

Benchmarks are named gemm/<NN|NT>/M<m>xK<k>xN<n>/<moa|openblas|eigen>. With repetitions, the
median of the GFLOP/s counter is used (Google Benchmark's *_median aggregate when present, else the
median of the runs); several files are pooled, run by run.
"""
import json
import re
import statistics
import sys
from collections import defaultdict

NAME = re.compile(r"^gemm/(NN|NT)/M(\d+)xK(\d+)xN(\d+)/(moa|openblas|eigen)")


def main(paths):
    runs = defaultdict(list)  # (trans, M, K, N, impl) -> [GFLOP/s]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            if b.get("run_type") == "aggregate":
                continue
            m = NAME.match(b["name"])
            if not m or "GFLOP/s" not in b:
                continue
            trans, M, K, N, impl = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)
            runs[(trans, M, K, N, impl)].append(float(b["GFLOP/s"]))
    shapes = sorted({k[:4] for k in runs}, key=lambda s: (s[0], s[1] == s[2] == s[3], s[1], s[2], s[3]))
    print("| op | M | K | N | moa GFLOP/s | OpenBLAS GFLOP/s | Eigen GFLOP/s | moa / OpenBLAS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    worst = None
    for s in shapes:
        med = {impl: statistics.median(runs[s + (impl,)]) if runs.get(s + (impl,)) else None
               for impl in ("moa", "openblas", "eigen")}
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"
        ratio = med["moa"] / med["openblas"] if med["moa"] and med["openblas"] else None
        if ratio is not None and (worst is None or ratio < worst[0]):
            worst = (ratio, s)
        flag = "" if ratio is None or ratio >= 0.9 else " (below 0.9)"
        print(f"| {s[0]} | {s[1]} | {s[2]} | {s[3]} | {fmt(med['moa'])} | {fmt(med['openblas'])} | "
              f"{fmt(med['eigen'])} | {fmt(ratio) if ratio is None else f'{ratio:.2f}'}{flag} |")
    if worst:
        print(f"\nLowest moa / OpenBLAS ratio: {worst[0]:.2f} ({worst[1][0]} M={worst[1][1]} K={worst[1][2]} N={worst[1][3]}).")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
