#!/usr/bin/env python3
"""Plot bench_forward's Google Benchmark JSON: time and useful GFLOP/s against N.

    bench_forward --benchmark_out=bench.json --benchmark_out_format=json \\
                  --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
    /usr/bin/python3 bench/plot.py bench.json [--out bench/forward_time.png]

Reads the JSON with summarize.load() (median aggregates, else the mean of the iteration runs;
CPU time of the one-thread cases) and writes one PNG of about 1400 × 600 pixels:
  left   time per forward pass in ms (log scale) against N (log2 scale): the library at
         h = 1, 2, 4, 8, 16 (solid), the literal reference at the same h where measured (dashed,
         same colours) and the causal library at h = 8 (dotted);
  right  useful GFLOP/s against N for the library at h = 1 and h = 8 and the GEMM roof, the
         (N × d)·(d × d) product.
The title names the CPU from the JSON context (cpu_model). Needs matplotlib (Debian:
python3-matplotlib); draws with the Agg backend, no display needed. Prints the path it wrote.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import CAUSAL, LIBRARY, REFERENCE, ROOF, load  # noqa: E402

HEADS = (1, 2, 4, 8, 16)
COLOURS = {1: "tab:blue", 2: "tab:orange", 4: "tab:green", 8: "tab:red", 16: "tab:purple"}


def series(results, family, h, field):
    """([N …], [value …]) of one family and h, sorted by N (h None for the roof)."""
    points = sorted((n, run[field]) for (fam, hh, n, threads), run in results.items()
                    if fam == family and hh == h and threads is None)
    return [n for n, _ in points], [v for _, v in points]


def log2_axis(ax, lengths):
    """x on a log2 scale with a tick labelled with each measured N."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(lengths))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(n) for n in lengths])
    ax.set_xlabel("N (tokens)")
    ax.grid(True, which="major", alpha=0.4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="Google Benchmark output (--benchmark_out_format=json)")
    parser.add_argument("--out", default=os.path.join("bench", "forward_time.png"),
                        help="PNG to write (default: bench/forward_time.png)")
    args = parser.parse_args()
    results, context, statistic = load(args.json)
    lengths = sorted({n for (fam, _, n, threads) in results if threads is None and n is not None})
    if not lengths:
        sys.exit(f"{args.json}: no bench_forward results")
    d = context.get("d_model", "512")
    scalar = {"float": "f32", "double": "f64"}.get(context.get("scalar", "float"), context.get("scalar"))

    fig, (ax_time, ax_rate) = plt.subplots(1, 2, figsize=(14, 6), dpi=100,
                                           gridspec_kw={"width_ratios": [1.15, 1]})

    # Left: time against N (the library and its causal variant first: the legend's first column).
    for h in HEADS:
        xs, ys = series(results, LIBRARY, h, "ms")
        if xs:
            ax_time.plot(xs, ys, "-o", color=COLOURS[h], markersize=4, label=f"library, h = {h}")
    xs, ys = series(results, CAUSAL, 8, "ms")
    if xs:
        ax_time.plot(xs, ys, ":^", color=COLOURS[8], markersize=5, linewidth=2,
                     label="library causal, h = 8")
    for h in HEADS:
        xs, ys = series(results, REFERENCE, h, "ms")
        if xs:
            ax_time.plot(xs, ys, "--s", color=COLOURS[h], markersize=4, alpha=0.8,
                         label=f"reference, h = {h}")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("time per forward pass (ms, log scale)")
    ax_time.set_title("Time")
    log2_axis(ax_time, lengths)
    ax_time.grid(True, which="minor", axis="y", alpha=0.15)
    ax_time.legend(fontsize=8, ncol=2, loc="upper left")

    # Right: useful GFLOP/s against N.
    xs, ys = series(results, ROOF, None, "gflops")
    if xs:
        ax_rate.plot(xs, ys, "-", color="black", linewidth=2.5, alpha=0.7,
                     label=f"GEMM roof: (N × {d})·({d} × {d})")
    for h in (1, 8):
        xs, ys = series(results, LIBRARY, h, "gflops")
        if xs:
            ax_rate.plot(xs, ys, "-o", color=COLOURS[h], markersize=4, label=f"library, h = {h}")
    ax_rate.set_ylim(bottom=0)
    ax_rate.set_ylabel("useful GFLOP/s  (8·N·d² + 4·N²·d per pass)")
    ax_rate.set_title("Throughput")
    log2_axis(ax_rate, lengths)
    ax_rate.legend(fontsize=9, loc="lower right")

    cpu = context.get("cpu_model", "unknown CPU")
    fig.suptitle(f"mha self-attention forward — {cpu}, {scalar}, d_model {d}, 1 thread  "
                 f"(CPU time, {statistic})", fontsize=12)
    fig.tight_layout()
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
