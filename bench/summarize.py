#!/usr/bin/env python3
"""Summarise bench_forward's Google Benchmark JSON as Markdown tables.

    bench_forward --benchmark_out=bench.json --benchmark_out_format=json \\
                  --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \\
                  --benchmark_enable_random_interleaving=true
    python3 bench/summarize.py bench.json

For each benchmark and {h, N} it takes the median aggregate when the run had repetitions, else the
mean of the iteration runs. It prints, with rows N and columns h: the library's time in ms with the
ratio to h = 1, the reference's time, the reference's time divided by the library's, the library's
GFLOP/s (useful flops 8*N*d^2 + 4*N^2*d), and the causal variant's time divided by the full one's
next to the ratio of their useful flops. Standard library only.
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict

LIBRARY = "BM_MultiHeadAttention"
CAUSAL = "BM_MultiHeadAttentionCausal"
REFERENCE = "BM_Reference"
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_name(name):
    """'BM_X/h:4/N:512/iterations:1' or 'BM_X/4/512' -> ('BM_X', 4, 512); None if no h and N."""
    family, *parts = name.split("/")
    named, positional = {}, []
    for part in parts:
        key, sep, value = part.partition(":")
        if sep and key in ("h", "N"):
            named[key] = int(value)
        elif not sep and part.isdigit():
            positional.append(int(part))
        # Anything else (iterations:1, min_time:…, repeats:…, real_time, threads:…) is ignored.
    h = named.get("h", positional[0] if positional else None)
    n = named.get("N", positional[1] if len(positional) > 1 else None)
    return (family, h, n) if h is not None and n is not None else None


def load(path, time_field):
    """{(family, h, N): {"ms": time, "gflops": rate or None}} and the JSON context."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        sys.exit(f"{path}: cannot read Google Benchmark JSON: {error}")
    medians, iterations = {}, defaultdict(list)
    for run in data.get("benchmarks", []):
        if run.get("error_occurred"):
            continue
        key = parse_name(run.get("run_name") or run["name"])
        if key is None:
            continue
        row = {"ms": run[time_field] * TO_MS[run.get("time_unit", "ns")], "gflops": run["FLOPS"] / 1e9 if "FLOPS" in run else None}
        if run.get("run_type") == "aggregate":
            if run.get("aggregate_name") == "median":
                medians[key] = row
        else:
            iterations[key].append(row)
    results = dict(medians)
    for key, rows in iterations.items():
        if key not in results:
            rates = [r["gflops"] for r in rows if r["gflops"] is not None]
            results[key] = {"ms": statistics.mean(r["ms"] for r in rows),
                            "gflops": statistics.mean(rates) if rates else None}
    statistic = "median of repetitions" if medians else "mean of iteration runs"
    return results, data.get("context", {}), statistic


def fmt_ms(ms):
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def table(title, heads, lengths, cell, extra=None):
    """A Markdown table: one row per N, one column per h, plus optional (header, fn(N)) columns."""
    extra = extra or []
    lines = [f"### {title}", ""]
    header = ["N"] + [f"h = {h}" for h in heads] + [name for name, _ in extra]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" for _ in header) + "|")
    for n in lengths:
        cells = [str(n)] + [cell(h, n) for h in heads] + [fn(n) for _, fn in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="Google Benchmark output (--benchmark_out_format=json)")
    parser.add_argument("--time", choices=("cpu", "real"), default="cpu",
                        help="which time to report (default: cpu, as the GFLOP/s counter uses)")
    args = parser.parse_args()
    results, context, statistic = load(args.json, f"{args.time}_time")
    if not results:
        sys.exit(f"{args.json}: no benchmark results with {{h, N}} arguments")

    heads = sorted({h for (_, h, _) in results})
    lengths = sorted({n for (_, _, n) in results})
    base_h = 1 if 1 in heads else heads[0]
    d = int(context.get("d_model", 512))

    def get(family, h, n):
        return results.get((family, h, n))

    def time_with_ratio(family):
        def cell(h, n):
            run, base = get(family, h, n), get(family, base_h, n)
            if run is None:
                return "–"
            ratio = f" ({run['ms'] / base['ms']:.2f})" if base else ""
            return fmt_ms(run["ms"]) + ratio
        return cell

    def quotient(top, bottom, digits):
        def cell(h, n):
            a, b = get(top, h, n), get(bottom, h, n)
            return f"{a['ms'] / b['ms']:.{digits}f}" if a and b else "–"
        return cell

    def gflops(h, n):
        run = get(LIBRARY, h, n)
        return f"{run['gflops']:.1f}" if run and run["gflops"] is not None else "–"

    def ideal_causal(n):
        return f"{(8 * n * d * d + 2 * n * (n + 1) * d) / (8 * n * d * d + 4 * n * n * d):.2f}"

    cpu = context.get("cpu_model")
    print(f"## Self-attention forward, {context.get('scalar', 'float')}, d_model = {d}, "
          f"d_k = d_v = d_model / h\n")
    machine = []
    if cpu:
        machine.append(f"CPU: {cpu}")
    if "num_cpus" in context:
        machine.append(f"{context['num_cpus']} CPUs @ {context.get('mhz_per_cpu', '?')} MHz")
    if "eigen_version" in context:
        machine.append(f"Eigen {context['eigen_version']} ({context.get('eigen_simd', '?')}), single-threaded")
    if "load_avg" in context:
        machine.append("load avg " + ", ".join(f"{x:.2f}" for x in context["load_avg"]))
    if machine:
        print("; ".join(machine) + ".  ")
    print(f"Times: {args.time} time, {statistic}; ratios in parentheses are to h = {base_h}.\n")

    families = {family for (family, _, _) in results}
    if LIBRARY in families:
        print(table(f"Library `MultiHeadAttention::forward`: ms (ratio to h = {base_h})",
                    heads, lengths, time_with_ratio(LIBRARY)))
    if REFERENCE in families:
        print(table(f"Reference (literal lecture version): ms (ratio to h = {base_h})",
                    heads, lengths, time_with_ratio(REFERENCE)))
    if LIBRARY in families and REFERENCE in families:
        print(table("Reference ÷ library (time)", heads, lengths, quotient(REFERENCE, LIBRARY, 1)))
    if LIBRARY in families:
        print(table("Library GFLOP/s (useful flops 8·N·d² + 4·N²·d per forward)", heads, lengths, gflops))
    if LIBRARY in families and CAUSAL in families:
        print(table("Causal ÷ full (library time); ideal = ratio of useful flops",
                    heads, lengths, quotient(CAUSAL, LIBRARY, 2), [("ideal", ideal_causal)]))


if __name__ == "__main__":
    main()
