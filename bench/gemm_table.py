#!/usr/bin/env python3
"""Turns bench_gemm's Google Benchmark JSON output into the Markdown table of bench/RESULTS.md.

usage: gemm_table.py RESULT.json [RESULT2.json ...]

Benchmarks are named gemm/<NN|NT>/M<m>xK<k>xN<n>/<moa|openblas|eigen>. Run with repetitions
(several files are pooled, run by run). The GFLOP/s columns are the best run of each library
(on a shared, noisy machine, other processes only ever slow a run down); the last column is the
ratio of the medians, for comparison.
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
    impls = ("moa", "openblas", "eigen")
    n_runs = max((len(v) for v in runs.values()), default=0)
    print(f"| op | M | K | N | moa GFLOP/s | OpenBLAS GFLOP/s | Eigen GFLOP/s | moa / OpenBLAS (best) "
          f"| moa / OpenBLAS (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    worst = None
    fmt = lambda v: f"{v:.1f}" if v is not None else "-"
    ratio_of = lambda a, b: a / b if a and b else None
    for s in shapes:
        got = {impl: runs.get(s + (impl,), []) for impl in impls}
        best = {impl: max(v) if v else None for impl, v in got.items()}
        med = {impl: statistics.median(v) if v else None for impl, v in got.items()}
        ratio = ratio_of(best["moa"], best["openblas"])
        ratio_med = ratio_of(med["moa"], med["openblas"])
        if ratio is not None and (worst is None or ratio < worst[0]):
            worst = (ratio, s)
        flag = "" if ratio is None or ratio >= 0.9 else " **below 0.9**"
        rfmt = lambda r: "-" if r is None else f"{r:.2f}"
        print(f"| {s[0]} | {s[1]} | {s[2]} | {s[3]} | {fmt(best['moa'])} | {fmt(best['openblas'])} | "
              f"{fmt(best['eigen'])} | {rfmt(ratio)}{flag} | {rfmt(ratio_med)} |")
    print(f"\nBest of up to {n_runs} runs per library and shape.")
    if worst:
        print(f"Lowest moa / OpenBLAS ratio (best runs): {worst[0]:.2f} "
              f"({worst[1][0]} M={worst[1][1]} K={worst[1][2]} N={worst[1][3]}).")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
