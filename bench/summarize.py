#!/usr/bin/env python3
"""Summarise bench_forward's Google Benchmark JSON as Markdown.

    bench_forward --benchmark_out=bench.json --benchmark_out_format=json \\
                  --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \\
                  --benchmark_enable_random_interleaving=true
    python3 bench/summarize.py bench.json

Reads the JSON written by bench/bench_forward.cpp: the families BM_GemmRoof/N:…,
BM_MultiHeadAttention/h:…/N:…, BM_MultiHeadAttentionCausal/h:…/N:…,
BM_MultiHeadAttentionThreads/h:…/N:…/threads:…/real_time and BM_Reference/h:…/N:…[/iterations:1].
Names without ArgNames (BM_X/8/512) are understood too. For every case it takes the median
aggregate when the run had repetitions, else the mean of the iteration runs; cases whose name ends
in /real_time always use wall-clock time, the others the time chosen with --time (default cpu).

Prints, after a line on the CPU and the run's context, with rows N and columns h:
  (a) the library's time in ms, with the ratio to h = 1 in parentheses;
  (b) the reference's time likewise, and the reference's time divided by the library's;
  (c) the library's useful GFLOP/s (8·N·d² + 4·N²·d per forward pass), the GEMM roof's GFLOP/s
      ((N × d)·(d × d) product, 2·N·d²) and library ÷ roof for h = 1 and h = 8;
  (d) causal ÷ full time, beside the ratio of their useful flops;
  the 1- vs 2-thread wall-clock times, and
  (e) the targets, each with the measured value and pass or miss: full attention at N = 1024,
      2048, 4096 (h = 8 and h = 1) reaches >= 0.85 of the same run's GEMM roof GFLOP/s at that N;
      time(h = 8) / time(h = 1) <= 1.10 at every N from 64 to 4096; time(causal) / time(full)
      <= 0.60 at N = 4096 (h = 8 and h = 1), and <= 1.05 × the ratio of their useful flops;
      2 threads >= 1.8 times faster than 1 at N = 1024, 2048, 4096; and, when the run has the FMA
      peak (BM_FmaPeak), useful GFLOP/s >= 0.70 of it at N >= 1024 (full and causal, h = 1 and 8)
      and the attention alone (BM_Attention, h = 8) >= 0.60 of it.
GFLOP/s are computed from the reported time and the flop formulas above (d from the context's
d_model), so they follow --time. Standard library only; plot.py and compare_pytorch.py reuse load().
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict

ROOF = "BM_GemmRoof"
LIBRARY = "BM_MultiHeadAttention"
CAUSAL = "BM_MultiHeadAttentionCausal"
THREADS = "BM_MultiHeadAttentionThreads"
REFERENCE = "BM_Reference"
ATTENTION = "BM_Attention"
ATTENTION_CAUSAL = "BM_AttentionCausal"
PEAK = "BM_FmaPeak"
TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
# Positional argument names per family, for names written without ArgNames.
POSITIONAL = {ROOF: ("N",), THREADS: ("h", "N", "threads")}
DEFAULT_POSITIONAL = ("h", "N")

# Targets (section (e)).
ROOF_FRACTION = 0.85      # full attention at N >= 1024 reaches this fraction of the GEMM roof
ROOF_LENGTHS = (1024, 2048, 4096)
HEADS_RATIO = 1.10        # time(h = 8) / time(h = 1) at every N of HEADS_LENGTHS
HEADS_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)
CAUSAL_RATIO = 0.60       # time(causal) / time(full) at N = 4096
CAUSAL_N = 4096
THREAD_SPEEDUP = 1.8      # time(1 thread) / time(2 threads) at each N of THREAD_LENGTHS, wall clock
THREAD_LENGTHS = (1024, 2048, 4096)
PEAK_FRACTION = 0.70      # useful GFLOP/s ÷ the run's FMA peak, full and causal, N >= 1024, h = 1 and 8
ATTENTION_PEAK_FRACTION = 0.60  # the attention alone (h = 8, d_k = 64) ÷ the FMA peak, N >= 1024
CAUSAL_FLOPS_SLACK = 1.05  # time(causal) / time(full) <= this × their ratio of useful flops, N = 4096


def parse_name(name):
    """'BM_X/h:4/N:512/iterations:1' -> ('BM_X', {'h': 4, 'N': 512}, real_time=False).

    Named arguments (h:, N:, threads:) and bare integers (by position, see POSITIONAL) are
    arguments; '/real_time' sets the flag; other suffixes (iterations:1, min_time:…,
    repeats:…) are ignored. Aggregate suffixes (_median …) must already be stripped.
    """
    family, *parts = name.split("/")
    args, positional, real_time = {}, [], False
    for part in parts:
        key, sep, value = part.partition(":")
        if sep and key in ("h", "N", "threads") and value.isdigit():
            args[key] = int(value)
        elif not sep and part.isdigit():
            positional.append(int(part))
        elif part == "real_time":
            real_time = True
    for key, value in zip(POSITIONAL.get(family, DEFAULT_POSITIONAL), positional):
        args.setdefault(key, value)
    return family, args, real_time


def useful_flops(family, n, d):
    """Useful flops of one run of `family` at N = n, d = d_model (see bench_forward.cpp)."""
    if family == ROOF:
        return 2.0 * n * d * d
    if family == CAUSAL:
        return 8.0 * n * d * d + 2.0 * n * (n + 1.0) * d
    if family == ATTENTION:
        return 4.0 * n * n * d
    if family == ATTENTION_CAUSAL:
        return 2.0 * n * (n + 1.0) * d
    return 8.0 * n * d * d + 4.0 * n * n * d


def load(path, time="cpu"):
    """Read a Google Benchmark JSON file.

    Returns (results, context, statistic): results maps (family, h, N, threads) -- h is None for
    the GEMM roof, threads None except for the threads family -- to {"ms", "gflops", "real_time"};
    the FMA peak, when the run has it, is (PEAK, None, None, None), its gflops its own counter;
    context is the JSON's context object; statistic says which statistic the times are.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        sys.exit(f"{path}: cannot read Google Benchmark JSON: {error}")
    context = data.get("context", {})
    d = int(context.get("d_model", 512))
    medians, iterations, peaks = {}, defaultdict(list), []
    for run in data.get("benchmarks", []):
        if run.get("error_occurred"):
            continue
        family, args, real_time = parse_name(run.get("run_name") or run["name"])
        if family == PEAK and "FLOPS" in run:
            if run.get("run_type") != "aggregate" or run.get("aggregate_name") == "median":
                peaks.append(run["FLOPS"] / 1e9)
            continue
        if "N" not in args:
            continue
        key = (family, args.get("h"), args["N"], args.get("threads"))
        field = "real_time" if real_time or time == "real" else "cpu_time"
        ms = run[field] * TO_MS[run.get("time_unit", "ns")]
        if run.get("run_type") == "aggregate":
            if run.get("aggregate_name") == "median":
                medians[key] = (ms, real_time)
        else:
            iterations[key].append((ms, real_time))
    times = dict(medians)
    for key, rows in iterations.items():
        if key not in times:
            times[key] = (statistics.mean(ms for ms, _ in rows), rows[0][1])
    results = {key: {"ms": ms, "real_time": real_time,
                     "gflops": useful_flops(key[0], key[2], d) / (ms * 1e-3) / 1e9}
               for key, (ms, real_time) in times.items()}
    if peaks:
        results[(PEAK, None, None, None)] = {"ms": None, "real_time": False, "gflops": max(peaks)}
    statistic = "median of repetitions" if medians else "mean of iteration runs"
    return results, context, statistic


def context_line(context):
    """One line on the machine and the build, from the JSON context ('' if nothing is known)."""
    machine = []
    if context.get("cpu_model"):
        machine.append(f"CPU: {context['cpu_model']}")
    if "num_cpus" in context:
        machine.append(f"{context['num_cpus']} CPUs @ {context.get('mhz_per_cpu', '?')} MHz")
    if "eigen_version" in context:
        widest = f"{context['instruction_set']}; " if "instruction_set" in context else ""
        machine.append(f"Eigen {context['eigen_version']} ({widest}{context.get('eigen_simd', '?')}), "
                       "single-threaded unless stated")
    if "products" in context:
        machine.append(f"products: {context['products']}")
    if "load_avg" in context:
        machine.append("load avg " + ", ".join(f"{x:.2f}" for x in context["load_avg"]))
    if "date" in context:
        machine.append(f"run {context['date']}")
    return "; ".join(machine) + "." if machine else ""


def fmt_ms(ms):
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def markdown(header, rows, align=None):
    """A Markdown table; align is one of 'l'/'r' per column (default: first left, rest right)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def grid_table(title, heads, lengths, cell, extra=None):
    """'### title' and a table with one row per N, one column per h, plus (header, fn(N)) columns."""
    extra = extra or []
    header = ["N"] + [f"h = {h}" for h in heads] + [name for name, _ in extra]
    rows = [[str(n)] + [cell(h, n) for h in heads] + [fn(n) for _, fn in extra] for n in lengths]
    if not any(c != "–" for row in rows for c in row[1:]):
        return ""
    rows = [row for row in rows if any(c != "–" for c in row[1:])]
    return f"### {title}\n\n" + markdown(header, rows, ["r"] * len(header)) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="Google Benchmark output (--benchmark_out_format=json)")
    parser.add_argument("--time", choices=("cpu", "real"), default="cpu",
                        help="time of the one-thread cases (default: cpu); "
                             "/real_time cases always use wall-clock time")
    args = parser.parse_args()
    results, context, statistic = load(args.json, args.time)
    if not results:
        sys.exit(f"{args.json}: no bench_forward results (no N argument in any name)")

    def get(family, h, n, threads=None):
        return results.get((family, h, n, threads))

    def ratio(top, bottom):
        return top["ms"] / bottom["ms"] if top and bottom else None

    families = {family for (family, _, _, _) in results}
    heads = sorted({h for (family, h, _, _) in results if h is not None and family != THREADS})
    lengths = sorted({n for (family, _, n, _) in results if family in (LIBRARY, CAUSAL, REFERENCE, ROOF)})
    peak = results.get((PEAK, None, None, None))
    base_h = 1 if 1 in heads else heads[0] if heads else 1
    d = int(context.get("d_model", 512))

    def time_with_ratio(family):
        def cell(h, n):
            run, base = get(family, h, n), get(family, base_h, n)
            if run is None:
                return "–"
            return fmt_ms(run["ms"]) + (f" ({ratio(run, base):.2f})" if base else "")
        return cell

    def quotient(top, bottom, digits):
        def cell(h, n):
            q = ratio(get(top, h, n), get(bottom, h, n))
            return f"{q:.{digits}f}" if q is not None else "–"
        return cell

    def library_gflops(h, n):
        run = get(LIBRARY, h, n)
        return f"{run['gflops']:.1f}" if run else "–"

    def roof_gflops(n):
        roof = get(ROOF, None, n)
        return f"{roof['gflops']:.1f}" if roof else "–"

    def of_roof(h):
        def cell(n):
            run, roof = get(LIBRARY, h, n), get(ROOF, None, n)
            return f"{run['gflops'] / roof['gflops']:.2f}" if run and roof else "–"
        return cell

    def of_peak(family, h):
        def cell(n):
            run = get(family, h, n)
            return f"{run['gflops'] / peak['gflops']:.2f}" if run and peak else "–"
        return cell

    def ideal_causal(n):
        return f"{useful_flops(CAUSAL, n, d) / useful_flops(LIBRARY, n, d):.2f}"

    print(f"## Self-attention forward, {context.get('scalar', 'float')}, d_model = {d}, "
          f"d_k = d_v = d_model / h\n")
    line = context_line(context)
    if line:
        print(line + "  ")
    print(f"Times: {args.time} time ({statistic}), wall-clock for the thread cases; ratios in "
          f"parentheses are to h = {base_h}. Useful flops: 8·N·d² + 4·N²·d per forward pass "
          f"(causal: 8·N·d² + 2·N·(N+1)·d); GEMM roof: (N × {d})·({d} × {d}), 2·N·d².\n")

    sections = []
    if LIBRARY in families:
        sections.append(grid_table(f"(a) Library `MultiHeadAttention::forward`: ms (ratio to h = {base_h})",
                                   heads, lengths, time_with_ratio(LIBRARY)))
    if REFERENCE in families:
        sections.append(grid_table(f"(b) Reference (literal lecture version): ms (ratio to h = {base_h})",
                                   heads, lengths, time_with_ratio(REFERENCE)))
    if LIBRARY in families and REFERENCE in families:
        sections.append(grid_table("(b) Reference ÷ library (time)", heads, lengths,
                                   quotient(REFERENCE, LIBRARY, 1)))
    if LIBRARY in families:
        extra = []
        if ROOF in families:
            extra = [("GEMM roof", roof_gflops)] + [(f"h = {h} ÷ roof", of_roof(h))
                                                    for h in (1, 8) if h in heads]
        if peak:
            extra += [(f"h = {h} ÷ FMA peak", of_peak(LIBRARY, h)) for h in (1, 8) if h in heads]
        sections.append(grid_table("(c) Library useful GFLOP/s, GEMM roof GFLOP/s, library ÷ roof" +
                                   (f", library ÷ FMA peak ({peak['gflops']:.1f} GFLOP/s)" if peak else ""),
                                   heads, lengths, library_gflops, extra))
    attention_runs = sorted(key for key in results if key[0] in (ATTENTION, ATTENTION_CAUSAL))
    if attention_runs:
        rows = [[("causal" if family == ATTENTION_CAUSAL else "full"), str(h), str(n), fmt_ms(results[key]["ms"]),
                 f"{results[key]['gflops']:.1f}",
                 f"{results[key]['gflops'] / peak['gflops']:.2f}" if peak else "–"]
                for key in attention_runs for family, h, n, _ in [key]]
        sections.append("### The attention alone (no projections), useful GFLOP/s\n\n" + markdown(
            ["", "h", "N", "ms", "GFLOP/s", "÷ FMA peak"], rows, ["l"] + ["r"] * 5) + "\n")
    if LIBRARY in families and CAUSAL in families:
        sections.append(grid_table("(d) Causal ÷ full (library time); ideal = ratio of useful flops",
                                   heads, lengths, quotient(CAUSAL, LIBRARY, 2),
                                   [("ideal", ideal_causal)]))
    thread_runs = sorted((key, run) for key, run in results.items() if key[0] == THREADS)
    if thread_runs:
        rows = []
        for (_, h, n, threads), run in thread_runs:
            one = get(THREADS, h, n, 1)
            speedup = f"{one['ms'] / run['ms']:.2f}" if one else "–"
            rows.append([str(h), str(n), str(threads), fmt_ms(run["ms"]),
                         f"{run['gflops']:.1f}", speedup])
        sections.append("### Threads (wall-clock)\n\n" + markdown(
            ["h", "N", "threads", "ms", "GFLOP/s", "speed-up vs 1 thread"], rows, ["r"] * 6) + "\n")

    # (e) Targets: (description, measured value or None, goal text, passed predicate).
    targets = []
    for h in (8, 1):
        for n in ROOF_LENGTHS:
            run, roof = get(LIBRARY, h, n), get(ROOF, None, n)
            value = run["gflops"] / roof["gflops"] if run and roof else None
            targets.append((f"Full, h = {h}, N = {n}: library ÷ GEMM roof (GFLOP/s)", value,
                            f"≥ {ROOF_FRACTION:.2f}", lambda v: v >= ROOF_FRACTION))
    for n in HEADS_LENGTHS:
        targets.append((f"Full, N = {n}: time h = 8 ÷ h = 1", ratio(get(LIBRARY, 8, n), get(LIBRARY, 1, n)),
                        f"≤ {HEADS_RATIO:.2f}", lambda v: v <= HEADS_RATIO))
    for h in (8, 1):
        targets.append((f"N = {CAUSAL_N}, h = {h}: time causal ÷ full",
                        ratio(get(CAUSAL, h, CAUSAL_N), get(LIBRARY, h, CAUSAL_N)),
                        f"≤ {CAUSAL_RATIO:.2f}", lambda v: v <= CAUSAL_RATIO))
    for n in THREAD_LENGTHS:
        targets.append((f"h = 8, N = {n}: wall time 1 thread ÷ 2 threads",
                        ratio(get(THREADS, 8, n, 1), get(THREADS, 8, n, 2)),
                        f"≥ {THREAD_SPEEDUP:.1f}", lambda v: v >= THREAD_SPEEDUP))
    if peak:
        for family in (LIBRARY, CAUSAL):
            for h in (8, 1):
                for n in ROOF_LENGTHS:
                    run = get(family, h, n)
                    targets.append((f"{'Causal' if family == CAUSAL else 'Full'}, h = {h}, N = {n}: "
                                    "useful GFLOP/s ÷ FMA peak", run["gflops"] / peak["gflops"] if run else None,
                                    f"≥ {PEAK_FRACTION:.2f}", lambda v: v >= PEAK_FRACTION))
        for n in ROOF_LENGTHS:
            run = get(ATTENTION, 8, n)
            targets.append((f"Attention alone, full, h = 8, N = {n}: GFLOP/s ÷ FMA peak",
                            run["gflops"] / peak["gflops"] if run else None,
                            f"≥ {ATTENTION_PEAK_FRACTION:.2f}", lambda v: v >= ATTENTION_PEAK_FRACTION))
    for h in (8, 1):
        slack_ratio = ratio(get(CAUSAL, h, CAUSAL_N), get(LIBRARY, h, CAUSAL_N))
        ideal = useful_flops(CAUSAL, CAUSAL_N, d) / useful_flops(LIBRARY, CAUSAL_N, d)
        targets.append((f"N = {CAUSAL_N}, h = {h}: (causal ÷ full time) ÷ (causal ÷ full useful flops)",
                        slack_ratio / ideal if slack_ratio is not None else None,
                        f"≤ {CAUSAL_FLOPS_SLACK:.2f}", lambda v: v <= CAUSAL_FLOPS_SLACK))
    rows = [[name, f"{value:.3f}" if value is not None else "–", goal,
             ("pass" if passed(value) else "**miss**") if value is not None else "not measured"]
            for name, value, goal, passed in targets]
    sections.append("### (e) Targets\n\n" + markdown(["Target", "Measured", "Goal", "Result"], rows,
                                                      ["l", "r", "l", "l"]) + "\n")
    print("\n".join(s for s in sections if s))


if __name__ == "__main__":
    main()
