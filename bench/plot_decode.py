#!/usr/bin/env python3
"""Plot and summarise bench_decode's Google Benchmark JSON: decoding with a key/value cache.

    bench_decode --benchmark_out=decode.json --benchmark_out_format=json \\
                 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \\
                 --benchmark_enable_random_interleaving=true
    /usr/bin/python3 bench/plot_decode.py decode.json --out decode.png --summary decode_summary.md

Reads the families of bench/bench_decode.cpp: BM_GenerateCached/tokens:…,
BM_GenerateRecompute/tokens:…/iterations:1, BM_DecodeStep/h_kv:…/cache:… and
BM_DecodeStepThreads/h_kv:…/cache:…/threads:…/real_time, and by storage (K = 0 f32, 1 bf16,
2 half; 3, 4 bf16, half with the weights rounded too) BM_DecodeStepStorage/h_kv:…/cache:…/storage:K, BM_DecodeAttention/h_kv:…/cache:…/storage:K
and BM_StreamRead/bytes:B; families missing from the JSON leave their tables or cells out. For every case it takes the median
aggregate when the run had repetitions, else the mean of the iteration runs; CPU time, except for
names ending in /real_time (wall clock).

Writes (--summary, else to standard output) Markdown tables:
  generating T tokens with the cache and by recomputing the causal forward pass at every step,
  and the speed-up (target >= 50x);
  one decode step's latency against the cache length on 1 and 2 threads (h_kv = h, wall clock);
  multi-head (h_kv = h), grouped-query and multi-query attention: latency and cache memory;
  for the README, one decode step (a whole layer) and its attention alone against the cache length
  S for each h_kv and storage: µs and GB/s, GB/s counting the bytes a step must read (cached keys
  and values, 2·S·h_kv·d_k·width(K), plus for the whole layer the float projection weights, d·d
  each for W^Q and W^O and d·h_kv·d_k each for W^K and W^V), and the attention's GB/s ÷ the GB/s of
  BM_StreamRead over a buffer of the same bytes, measured in the same run.
And (--out) one PNG of about 1700 × 560 pixels, three panels against the cache length (log2):
  per-token latency on 1 and 2 threads; per-token latency for each h_kv; the cache's MiB for
  each h_kv. The title names the CPU (cpu_model in the JSON context) and the generation speed-up.
Needs matplotlib for the plot only (Debian: python3-matplotlib); Agg backend, no display needed.
"""

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import context_line, fmt_ms, markdown  # noqa: E402

CACHED = "BM_GenerateCached"
RECOMPUTE = "BM_GenerateRecompute"
STEP = "BM_DecodeStep"
STEP_THREADS = "BM_DecodeStepThreads"
STEP_STORAGE = "BM_DecodeStepStorage"
ATTENTION = "BM_DecodeAttention"
STREAM = "BM_StreamRead"
# storage argument: name, bytes per cached number, bytes per weight (3, 4: make_decode_weights too)
STORAGES = {0: ("f32", 4, 4), 1: ("bf16", 2, 4), 2: ("half", 2, 4), 3: ("bf16+W", 2, 2), 4: ("half+W", 2, 2)}
README_LENGTHS = (1024, 4096, 8192, 32768)
README_KV_HEADS = (8, 2, 1)
TO_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
COUNTERS = ("FLOPS", "bytes_per_second", "tokens_per_second", "cache_MiB")
SPEEDUP_TARGET = 50.0
KV_NAMES = {1: "MQA", 2: "GQA"}  # any other h_kv below h is GQA too; h_kv = h is MHA
KV_COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:purple", "tab:orange")


def parse_name(name):
    """'BM_X/h_kv:8/cache:512/threads:2/real_time' -> ('BM_X', {'h_kv': 8, ...}, real_time=True)."""
    family, *parts = name.split("/")
    args, real_time = {}, False
    for part in parts:
        key, sep, value = part.partition(":")
        if sep and key in ("tokens", "h_kv", "cache", "threads", "storage", "bytes") and value.isdigit():
            args[key] = int(value)
        elif part == "real_time":
            real_time = True
    return family, args, real_time


def load(path):
    """(results, context, statistic): results maps (family, tokens, h_kv, cache, threads, storage,
    bytes), absent arguments None, to {"us": time in microseconds, "real_time": bool, "cv": coefficient of
    variation or None, counter name: value}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        sys.exit(f"{path}: cannot read Google Benchmark JSON: {error}")
    medians, cvs, iterations = {}, {}, defaultdict(list)
    for run in data.get("benchmarks", []):
        if run.get("error_occurred"):
            continue
        family, args, real_time = parse_name(run.get("run_name") or run["name"])
        key = (family, args.get("tokens"), args.get("h_kv"), args.get("cache"), args.get("threads"),
               args.get("storage"), args.get("bytes"))
        unit = TO_US[run.get("time_unit", "ns")]
        row = {"us": run["real_time" if real_time else "cpu_time"] * unit, "real_time": real_time}
        row.update({c: run[c] for c in COUNTERS if c in run})
        if run.get("run_type") == "aggregate":
            if run.get("aggregate_name") == "median":
                medians[key] = row
            elif run.get("aggregate_name") == "cv":
                cvs[key] = run["real_time" if real_time else "cpu_time"]
        else:
            iterations[key].append(row)
    results = dict(medians)
    for key, rows in iterations.items():
        if key not in results:
            results[key] = {field: (statistics.mean(r[field] for r in rows) if field != "real_time" else rows[0][field])
                            for field in rows[0]}
    for key, row in results.items():
        row["cv"] = cvs.get(key)
    statistic = "median of repetitions" if medians else "mean of iteration runs"
    return results, data.get("context", {}), statistic


def fmt_us(us):
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def fmt_time(us):
    """A duration in the unit that reads best: µs, ms or s."""
    if us >= 1e6:
        return f"{us / 1e6:.2f} s" if us < 1e7 else f"{us / 1e6:.1f} s"
    if us >= 1e3:
        return fmt_ms(us / 1e3) + " ms"
    return fmt_us(us) + " µs"


class Decode:
    """The measurements of one run, by what they are."""

    def __init__(self, results, context):
        self.results, self.context = results, context
        self.heads = int(context.get("num_heads", 8))
        self.d = int(context.get("d_model", 512))
        self.tokens = sorted({k[1] for k in results if k[0] in (CACHED, RECOMPUTE)})
        self.lengths = sorted({k[3] for k in results if k[0] in (STEP, STEP_THREADS)})
        self.kv_heads = sorted({k[2] for k in results if k[0] == STEP}, reverse=True)
        self.threads = sorted({k[4] for k in results if k[0] == STEP_THREADS})
        self.d_k = int(context.get("d_k", self.d // self.heads))

    def generation(self, family, tokens):
        return self.results.get((family, tokens, None, None, None, None, None))

    def step(self, kv_heads, length, threads=None):
        return self.results.get((STEP_THREADS if threads else STEP, None, kv_heads, length, threads, None, None))

    def by_storage(self, family, kv_heads, length, storage):
        return self.results.get((family, None, kv_heads, length, None, storage, None))

    def stream(self, nbytes):
        return self.results.get((STREAM, None, None, None, None, None, nbytes))

    def has(self, family):
        return any(k[0] == family for k in self.results)

    def kv_bytes(self, kv_heads, length, storage):
        """The cached keys and values a step over `length` tokens reads: 2·S·h_kv·d_k numbers."""
        return 2 * length * kv_heads * self.d_k * STORAGES[storage][1]

    def weight_bytes(self, kv_heads, storage=0):
        """The projection weights of a decode step: W^Q, W^O (d × h·d_k), W^K, W^V (d × h_kv·d_k), of
        float, or of bfloat16 or half for the storages that round them too."""
        return STORAGES[storage][2] * (2 * self.d * self.heads * self.d_k + 2 * self.d * kv_heads * self.d_k)

    def kv_name(self, kv_heads):
        return "MHA" if kv_heads == self.heads else KV_NAMES.get(kv_heads, "GQA")

    def speedups(self):
        """[(tokens, cached, recompute, recompute ÷ cached)] for every T measured both ways."""
        out = []
        for t in self.tokens:
            cached, recompute = self.generation(CACHED, t), self.generation(RECOMPUTE, t)
            if cached and recompute:
                out.append((t, cached, recompute, recompute["us"] / cached["us"]))
        return out


def summary(m, statistic):
    scalar = m.context.get("scalar", "float")
    lines = [f"## Decoding with a key/value cache, {scalar}, d_model = {m.d}, h = {m.heads}, causal "
             "self-attention\n"]
    line = context_line(m.context)
    if line:
        lines.append(line + "  ")
    lines.append(f"Times: {statistic}; CPU time on one thread, wall clock where threads are compared. "
                 "Produced by `bench/bench_decode` and `bench/plot_decode.py`.\n")

    rows = []
    for t, cached, recompute, speedup in m.speedups():
        for name, run in ((f"with the cache: {t} decode steps of one token", cached),
                          (f"recomputing: the causal forward over tokens 0 … t, t = 0 … {t - 1}", recompute)):
            cv = f"{100 * run['cv']:.1f}%" if run.get("cv") is not None else "–"
            rows.append([name, fmt_time(run["us"]), cv, f"{run['tokens_per_second']:.0f}",
                         f"{run['FLOPS'] / 1e9:.1f}"])
        verdict = "pass" if speedup >= SPEEDUP_TARGET else "**miss**"
        rows.append([f"**speed-up, recompute ÷ cache** (target ≥ {SPEEDUP_TARGET:.0f}×: {verdict})",
                     f"**{speedup:.0f}×**", "", "", ""])
    if rows:
        lines.append(f"### Generating {', '.join(str(t) for t in m.tokens)} tokens, one thread\n")
        lines.append("The token fed at each step is a fixed random row (one attention layer, no model "
                     "around it). GFLOP/s: useful flops, the causal forward's 8·T·d² + 2·T·(T+1)·d for "
                     "the cache; for recomputing, the flops of all the forward passes it runs.\n")
        lines.append(markdown(["", "time", "cv", "tokens/s", "GFLOP/s"], rows, ["l", "r", "r", "r", "r"]) + "\n")

    if m.threads and m.lengths:
        header = ["cache length"] + [f"{n} thread{'s' if n > 1 else ''} µs" for n in m.threads]
        if len(m.threads) > 1:
            header.append(f"{m.threads[-1]} threads speed-up")
        header += [f"{n} thread{'s' if n > 1 else ''} GB/s" for n in m.threads] + ["cache MiB"]
        rows = []
        for length in m.lengths:
            runs = [m.step(m.heads, length, n) for n in m.threads]
            row = [str(length)] + [fmt_us(r["us"]) if r else "–" for r in runs]
            if len(m.threads) > 1:
                row.append(f"{runs[0]['us'] / runs[-1]['us']:.2f}×" if runs[0] and runs[-1] else "–")
            row += [f"{r['bytes_per_second'] / 1e9:.1f}" if r else "–" for r in runs]
            row.append(f"{runs[0]['cache_MiB']:.1f}" if runs[0] else "–")
            rows.append(row)
        lines.append(f"### One decode step against the cache length, h_kv = h = {m.heads}, wall clock\n")
        lines.append("Per-token latency: one new token projected, its key and value appended, its query "
                     "attending to every cached key (the cache truncated back after each step). GB/s: the "
                     "bytes a step must read (the projection matrices and the cached keys and values) "
                     "per second.\n")
        lines.append(markdown(header, rows, ["r"] * len(header)) + "\n")

    if m.kv_heads and m.lengths:
        base = m.heads if m.heads in m.kv_heads else m.kv_heads[0]
        names = [f"h_kv = {k} ({m.kv_name(k)})" for k in m.kv_heads]
        header = (["cache length"] + [f"{n} µs" for n in names] +
                  [f"{m.kv_name(base)} ÷ {m.kv_name(k)}" for k in m.kv_heads if k != base] +
                  [f"cache MiB, h_kv = {' / '.join(str(k) for k in m.kv_heads)}"])
        rows = []
        for length in m.lengths:
            runs = {k: m.step(k, length) for k in m.kv_heads}
            row = [str(length)] + [fmt_us(runs[k]["us"]) if runs[k] else "–" for k in m.kv_heads]
            row += [f"{runs[base]['us'] / runs[k]['us']:.2f}" if runs[base] and runs[k] else "–"
                    for k in m.kv_heads if k != base]
            row.append(" / ".join(f"{runs[k]['cache_MiB']:.2f}" if runs[k] else "–" for k in m.kv_heads))
            rows.append(row)
        lines.append(f"### Multi-head, grouped-query and multi-query attention: one decode step, one thread\n")
        lines.append(f"h = {m.heads} query heads share h_kv heads of keys and values; the cache holds "
                     "h_kv·(d_k + d_v) numbers per token. Ratios are time ÷ time (higher: faster than "
                     "MHA).\n")
        lines.append(markdown(header, rows, ["r"] * len(header)) + "\n")
    lines += storage_tables(m)
    return "\n".join(lines)


def gbps(nbytes, run):
    return nbytes / (run["us"] * 1e-6) / 1e9


def storage_tables(m):
    """The README's decoding tables: a whole layer's decode step and the attention alone, against the
    cache length, for each h_kv and storage, with GB/s beside the times (and the stream's, for the
    attention). Rows and columns that no run measured are left out; a missing cell is '–'."""
    lines = []
    names = [STORAGES[k][0] for k in sorted(STORAGES)]
    for family in (STEP_STORAGE, ATTENTION):
        if not m.has(family):
            continue
        lengths = [n for n in README_LENGTHS if any(k[0] == family and k[3] == n for k in m.results)]
        kv_heads = [h for h in README_KV_HEADS if any(k[0] == family and k[2] == h for k in m.results)]
        storages = [s for s in sorted(STORAGES) if any(k[0] == family and k[5] == s for k in m.results)]
        attention = family == ATTENTION
        header = ["S", "h_kv"]
        for s in storages:
            header += [f"{STORAGES[s][0]} µs", f"{STORAGES[s][0]} GB/s"]
            if attention:
                header.append(f"{STORAGES[s][0]} ÷ stream")
            elif s != 0 and 0 in storages:
                header.append(f"f32 ÷ {STORAGES[s][0]}")
        if attention:
            header.append("stream GB/s (f32 bytes)")
        rows = []
        for length in lengths:
            for h_kv in kv_heads:
                row, any_run = [str(length), str(h_kv)], False
                for s in storages:
                    run = m.by_storage(family, h_kv, length, s)
                    nbytes = m.kv_bytes(h_kv, length, s) + (0 if attention else m.weight_bytes(h_kv, s))
                    if run:
                        any_run = True
                        row += [fmt_us(run["us"]), f"{gbps(nbytes, run):.1f}"]
                    else:
                        row += ["–", "–"]
                    if attention:
                        stream = m.stream(nbytes)
                        row.append(f"{gbps(nbytes, run) / gbps(nbytes, stream):.2f}" if run and stream else "–")
                    elif s != 0 and 0 in storages:
                        exact = m.by_storage(family, h_kv, length, 0)
                        row.append(f"{exact['us'] / run['us']:.2f}×" if run and exact else "–")
                if attention:
                    stream_bytes = m.kv_bytes(h_kv, length, 0)
                    stream = m.stream(stream_bytes)
                    row.append(f"{gbps(stream_bytes, stream):.1f}" if stream else "–")
                if any_run:
                    rows.append(row)
        if not rows:
            continue
        if attention:
            lines.append(f"### The attention of one decode step by storage, h = {m.heads}, one thread\n")
            lines.append("One query per head over S cached tokens (no projections). GB/s: the cached keys "
                         f"and values read, 2·S·h_kv·{m.d_k} numbers of 4 (f32) or 2 (bf16, half) bytes, per "
                         "second; ÷ stream: that over the GB/s of a vectorised sum over a float buffer of the "
                         "same bytes (BM_StreamRead, same run; – where that size was not measured).\n")
        else:
            lines.append(f"### One decode step by storage, d_model = {m.d}, h = {m.heads}, one thread\n")
            lines.append("A whole layer: one new token projected, its key and value appended, its query "
                         "attending to S cached tokens, W^O. GB/s: the bytes a step must read, the cached keys "
                         f"and values (2·S·h_kv·{m.d_k} numbers of 4 or 2 bytes) and the weights "
                         f"(2·{m.d}·{m.heads * m.d_k} + 2·{m.d}·h_kv·{m.d_k} numbers of 4 bytes, or of 2 for "
                         "+W: make_decode_weights), per second; f32 ÷ x: the f32 step's time over this one's.\n")
        lines.append(markdown(header, rows, ["r"] * len(header)) + "\n")
    return lines


def plot(m, statistic, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    def cache_axis(ax):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(m.lengths))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(n) for n in m.lengths])
        ax.set_xlabel("cache length (tokens)")
        ax.grid(True, which="major", alpha=0.4)

    def plain_log_axis(ax, label):
        """y on a log scale labelled 1-2-5 in plain numbers (µs or MiB), not powers of ten."""
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylabel(label)

    def points(runs, field):
        pairs = [(n, r[field]) for n, r in runs if r]
        return [n for n, _ in pairs], [v for _, v in pairs]

    fig, (ax_threads, ax_kv, ax_mem) = plt.subplots(1, 3, figsize=(17, 5.6), dpi=100)

    for n, style in zip(m.threads, ("-o", "-s", "-^", "-D")):
        xs, ys = points([(length, m.step(m.heads, length, n)) for length in m.lengths], "us")
        ax_threads.plot(xs, ys, style, markersize=5, label=f"{n} thread{'s' if n > 1 else ''}")
    if len(m.threads) > 1:
        for length in m.lengths:
            one, many = m.step(m.heads, length, m.threads[0]), m.step(m.heads, length, m.threads[-1])
            if one and many:
                ax_threads.annotate(f"{one['us'] / many['us']:.2f}×", (length, many["us"]),
                                    textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    plain_log_axis(ax_threads, "µs per token (log scale)")
    ax_threads.set_title(f"One decode step, h_kv = h = {m.heads}, wall clock\n(under the 2-thread points: "
                         "speed-up over 1 thread)", fontsize=11)
    cache_axis(ax_threads)
    ax_threads.legend(loc="upper left")

    for k, colour in zip(m.kv_heads, KV_COLOURS):
        xs, ys = points([(length, m.step(k, length)) for length in m.lengths], "us")
        ax_kv.plot(xs, ys, "-o", color=colour, markersize=5, label=f"h_kv = {k} ({m.kv_name(k)})")
        xs, ys = points([(length, m.step(k, length)) for length in m.lengths], "cache_MiB")
        ax_mem.plot(xs, ys, "-o", color=colour, markersize=5, label=f"h_kv = {k} ({m.kv_name(k)})")
    plain_log_axis(ax_kv, "µs per token (log scale)")
    ax_kv.set_title(f"One decode step, h = {m.heads} query heads, 1 thread (CPU time)", fontsize=11)
    cache_axis(ax_kv)
    ax_kv.legend(loc="upper left")
    plain_log_axis(ax_mem, "cache.bytes() in MiB (log scale)")
    ax_mem.set_title("Key/value cache of one sequence", fontsize=11)
    cache_axis(ax_mem)
    ax_mem.legend(loc="upper left")

    cpu = m.context.get("cpu_model", "unknown CPU")
    scalar = {"float": "f32", "double": "f64"}.get(m.context.get("scalar", "float"), m.context.get("scalar"))
    title = f"mha decoding — {cpu}, {scalar}, d_model {m.d}, h = {m.heads}  ({statistic})"
    for t, cached, recompute, speedup in m.speedups():
        title += (f"\ngenerating {t} tokens on 1 thread: {fmt_time(cached['us'])} with the cache, "
                  f"{fmt_time(recompute['us'])} recomputing the causal forward at each step ({speedup:.0f}×)")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    out_dir = os.path.dirname(out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="bench_decode's output (--benchmark_out_format=json)")
    parser.add_argument("--out", help="PNG to write (no plot without it)")
    parser.add_argument("--summary", help="Markdown file to write (default: standard output)")
    args = parser.parse_args()
    results, context, statistic = load(args.json)
    m = Decode(results, context)
    if not m.tokens and not m.lengths and not any(m.has(f) for f in (STEP_STORAGE, ATTENTION, STREAM)):
        sys.exit(f"{args.json}: no bench_decode results")
    text = summary(m, statistic)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.summary}")
    else:
        print(text)
    if args.out:
        plot(m, statistic, args.out)


if __name__ == "__main__":
    main()
