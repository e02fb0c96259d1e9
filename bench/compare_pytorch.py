#!/usr/bin/env python3
"""Compare mha's self-attention forward with PyTorch's CPU nn.MultiheadAttention, one thread.

An optional tool for a developer's machine, never run in CI. From the repository root, after
building bench/bench_forward:

    /usr/bin/python3 bench/compare_pytorch.py                     # runs build/bench/bench_forward
    /usr/bin/python3 bench/compare_pytorch.py --bench path/to/bench_forward
    /usr/bin/python3 bench/compare_pytorch.py --mha-json bench.json   # reuse an earlier run
    /usr/bin/python3 bench/compare_pytorch.py --skip-mha              # PyTorch only

Needs PyTorch (Debian: python3-torch, 1.13, for /usr/bin/python3). The shapes: self-attention
of x of shape (1, N, 512), N in {16, 256, 1024, 4096}, h in {1, 8}, full and causal, f32.

mha: runs the benchmark binary with
    --benchmark_filter='^BM_MultiHeadAttention(Workspace)?(Causal)?/h:(1|8)/N:(16|256|1024|4096)$'
    --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
and a temporary --benchmark_out JSON (its console output goes to stderr), or reads the JSON given
with --mha-json. Its time is the median of the repetitions, wall clock (real_time).

Rounds (--rounds R, default 3): the binary and PyTorch take turns, R times each, one repetition of
the binary a round, and each library's time of a shape is the median over the rounds, so that a
slow minute of a shared machine falls on both instead of on whichever ran in it (the same binary
moved by ±20% between runs minutes apart on the machines of this project). --rounds 1 is one run
of each; with --mha-json or --skip-mha there is one round.

PyTorch: torch.nn.MultiheadAttention(512, h, bias=False, batch_first=True) in eval mode,
torch.set_num_threads(1), inside torch.inference_mode(), called as mha(x, x, x,
need_weights=False[, attn_mask=mask]); causal is the boolean mask torch.triu(ones(N, N), 1)
(1.13's MultiheadAttention has no is_causal). For an even h without a mask 1.13 takes its fused
kernel, which rejects bias=False (qkv_bias must be a Tensor); those shapes are timed on the same
module with zero biases instead, and the table says so. Its time is the median wall-clock time of
at least --runs calls and --min-time seconds after a warm-up call (3 calls once --budget seconds
have passed, for the slow shapes), in each round. PyTorch is imported only after the binary's first
run has finished and is idle while the binary runs, and the script refuses to measure while any
other bench_forward process runs, so the two never share the CPU.

Prints, in Markdown: the PyTorch version, the BLAS library it has loaded and its thread counts, a
GEMM rate of PyTorch for scale, the rounds, a table N | h | causal | PyTorch ms | mha ms | speed-up (PyTorch
÷ mha) | workspace ms | speed-up | PyTorch path, where mha is forward(x, options) returning a new
matrix and workspace is forward(x, out, workspace, options) into memory kept from call to call
(BM_MultiHeadAttentionWorkspace(Causal)), the geometric mean of each form's speed-ups and how many
are below 1, and the targets (for forward(x, options)): speed-up >= 2 at N = 1024 (full, h = 8;
h = 1 reported too) and >= 4 at N = 4096 (causal, h = 8).
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import CAUSAL, LIBRARY, context_line, load  # noqa: E402

D_MODEL = 512
LENGTHS = (16, 256, 1024, 4096)
HEADS = (1, 8)
FILTER = r"^BM_MultiHeadAttention(Workspace)?(Causal)?/h:(1|8)/N:(16|256|1024|4096)$"
WORKSPACE = "BM_MultiHeadAttentionWorkspace"
WORKSPACE_CAUSAL = "BM_MultiHeadAttentionWorkspaceCausal"
DEFAULT_BENCH = os.path.join("build", "bench", "bench_forward")
# (N, h, causal, minimum speed-up of mha over PyTorch)
TARGETS = ((1024, 8, False, 2.0), (1024, 1, False, 2.0), (4096, 8, True, 4.0))


def running_bench_forward(names=("bench_forward", "bench_forward_b")):
    """Process ids of running processes called one of `names` (default: bench_forward and
    bench_forward_blas, whose /proc name is cut to 15 characters) (from /proc;
    [] where there is no /proc). compare_pytorch_training.py passes every benchmark binary."""
    pids = []
    entries = os.listdir("/proc") if os.path.isdir("/proc") else []
    for pid in (entry for entry in entries if entry.isdigit()):
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                if f.read().strip() in names:
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def run_mha(bench, out_json, benchmark_filter=FILTER, default_bench=DEFAULT_BENCH, repetitions=3):
    """Run the benchmark binary on the compared shapes (benchmark_filter), `repetitions` times each,
    writing Google Benchmark JSON to out_json; default_bench is also looked for from the repository
    root."""
    if not os.path.isfile(bench):
        script_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        candidate = os.path.join(script_root, bench)
        if bench == default_bench and os.path.isfile(candidate):
            bench = candidate
        else:
            sys.exit(f"{bench}: no such benchmark binary (build it, or pass --bench / --mha-json)")
    command = [bench, f"--benchmark_filter={benchmark_filter}", f"--benchmark_repetitions={repetitions}",
               "--benchmark_report_aggregates_only=true", f"--benchmark_out={out_json}",
               "--benchmark_out_format=json"]
    print("running " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=sys.stderr)


def loaded_blas():
    """Resolved paths of the BLAS/LAPACK-like shared libraries mapped into this process."""
    names = ("blas", "lapack", "mkl", "blis", "flame")
    found = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if path.startswith("/") and any(n in os.path.basename(path).lower() for n in names):
                    if path not in found:
                        found.append(path)
    except OSError:
        pass
    return found


def describe_blas(path):
    lower = path.lower()
    if "openblas" in lower:
        return "OpenBLAS"
    if "mkl" in lower:
        return "Intel MKL"
    if "blis" in lower:
        return "BLIS"
    if "atlas" in lower:
        return "ATLAS"
    if os.path.basename(lower).startswith("libblas.so") and os.sep + "blas" + os.sep in lower:
        return "netlib reference BLAS (Debian libblas3): unoptimised Fortran loops"
    if os.path.basename(lower).startswith("liblapack.so") and os.sep + "lapack" + os.sep in lower:
        return "netlib reference LAPACK"
    return "?"


def time_calls(call, runs, min_time, budget, warm_up=True):
    """Median seconds of call() (after one warm-up call unless warm_up is False): at least `runs`
    calls and `min_time` seconds, but stop after 3 calls once `budget` seconds have passed."""
    if warm_up:
        call()
    times, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(times) >= runs and elapsed >= min_time) or (len(times) >= 3 and elapsed >= budget) \
                or len(times) >= 1000:
            return statistics.median(times), len(times)


def import_torch():
    """Import PyTorch, on one thread, seeded with 0."""
    # One thread means one thread: torch.set_num_threads does not reach the BLAS library's own
    # thread pool (OpenBLAS's pthreads build starts one thread per core), so pin it before import.
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    import torch  # Imported only now: after the benchmark binary has finished.

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return torch


def describe_torch(torch, args):
    """Markdown lines about PyTorch (version, threads, build, a GEMM rate of the projections'
    shape, the BLAS it has loaded) and notes (a warning on the reference BLAS)."""
    info = [f"PyTorch {torch.__version__}; threads: intra-op {torch.get_num_threads()}, "
            f"inter-op {torch.get_num_interop_threads()}."]
    config = torch.__config__.show().strip().splitlines()
    build = [line.strip().lstrip("- ") for line in config[1:]
             if line.strip() and "Build settings" not in line]
    settings = next((line for line in config if "Build settings" in line), "")
    blas_info = [s.strip() for s in settings.split(",") if s.strip().startswith(("BLAS_INFO", "LAPACK_INFO"))]
    info.append("PyTorch built with: " + "; ".join(build[:5] + blas_info) + ".")

    notes = []
    with torch.inference_mode():
        # A GEMM of the projections' shape, for scale; it also loads the BLAS library.
        n = 1024
        a, b = torch.randn(n, D_MODEL), torch.randn(D_MODEL, D_MODEL)
        seconds, _ = time_calls(lambda: torch.matmul(a, b), args.runs, args.min_time, args.budget)
        info.append(f"PyTorch GEMM ({n} × {D_MODEL})·({D_MODEL} × {D_MODEL}): "
                    f"{2 * n * D_MODEL * D_MODEL / seconds / 1e9:.1f} GFLOP/s.")
        blas = loaded_blas()
        kinds = [describe_blas(os.path.realpath(p)) for p in blas]
        info.append("BLAS loaded by PyTorch: " + ("; ".join(
            f"{os.path.basename(p)} ({kind})" for p, kind in zip(blas, kinds))
            if blas else "none found in /proc/self/maps") + ".")
        if any(kind.startswith("netlib") for kind in kinds):
            notes.append("PyTorch's matrix products run on the unoptimised reference BLAS here, so "
                         "the speed-ups compare mha with that build, not with PyTorch on an "
                         "optimised BLAS (OpenBLAS, MKL); mind this before quoting them.")
    return info, notes


def takes_native_path(torch, call):
    """Call once; True if 1.13 took the fused native kernel (torch._native_multi_head_attention)."""
    native = torch._native_multi_head_attention
    native_calls = []

    def counting_native(*a, **k):
        native_calls.append(1)
        return native(*a, **k)

    torch._native_multi_head_attention = counting_native
    try:
        call()
    finally:
        torch._native_multi_head_attention = native
    return bool(native_calls)


def measure_torch(args):
    """{(N, h, causal): (median ms, calls, path)}, Markdown lines about PyTorch, and notes."""
    torch = import_torch()
    info, notes = describe_torch(torch, args)
    results = {}

    def zero_bias_twin(module):
        """The same module with biases, all zero: the same function, accepted by the fast path."""
        twin = torch.nn.MultiheadAttention(D_MODEL, module.num_heads, bias=True, batch_first=True).eval()
        twin.in_proj_weight.copy_(module.in_proj_weight)
        twin.out_proj.weight.copy_(module.out_proj.weight)
        twin.in_proj_bias.zero_()
        twin.out_proj.bias.zero_()
        return twin

    with torch.inference_mode():
        for n in args.lengths:
            x = torch.randn(1, n, D_MODEL)
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
            for h in HEADS:
                module = torch.nn.MultiheadAttention(D_MODEL, h, bias=False, batch_first=True).eval()
                for causal in (False, True):
                    kwargs = {"need_weights": False, "attn_mask": mask if causal else None}
                    call = lambda m=module: m(x, x, x, **kwargs)  # noqa: E731
                    # 1.13 takes its fused kernel (torch._native_multi_head_attention) for an even
                    # h without a mask, but that kernel rejects bias=False (qkv_bias must be a
                    # Tensor): there, time the same module with zero biases instead.
                    try:
                        path = "native fast path" if takes_native_path(torch, call) else "Python path"
                    except TypeError as error:
                        if "bias" not in str(error):
                            raise
                        call = lambda m=zero_bias_twin(module): m(x, x, x, **kwargs)  # noqa: E731
                        fast = takes_native_path(torch, call)
                        path = ("native fast path" if fast else "Python path") + ", zero biases*"
                        note = ("\\* PyTorch 1.13's fused kernel rejects bias=False (qkv_bias must be "
                                "a Tensor): these rows time the same module with zero biases.")
                        if note not in notes:
                            notes.append(note)
                    seconds, count = time_calls(call, args.runs, args.min_time, args.budget,
                                                warm_up=False)
                    results[(n, h, causal)] = (seconds * 1e3, count, path)
                    print(f"PyTorch N = {n}, h = {h}, causal = {causal}: {seconds * 1e3:.2f} ms "
                          f"(median of {count}, {path})", file=sys.stderr, flush=True)
    return results, info, notes


def fmt_ms(ms):
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def add_timing_arguments(parser, what, lengths):
    """The options of PyTorch's timing loop, shared with compare_pytorch_training.py."""
    parser.add_argument("--runs", type=int, default=7,
                        help=f"PyTorch: at least this many timed {what} per shape (default: 7) ...")
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="... and at least this many seconds (default: 0.5) ...")
    parser.add_argument("--budget", type=float, default=20.0,
                        help=f"... but stop after 3 {what} once this many seconds passed (default: 20)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(lengths),
                        help=f"PyTorch: N to measure (default: {' '.join(map(str, lengths))})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", default=DEFAULT_BENCH,
                        help=f"benchmark binary to run (default: {DEFAULT_BENCH})")
    parser.add_argument("--mha-json", metavar="FILE",
                        help="reuse this bench_forward JSON instead of running the binary")
    parser.add_argument("--skip-mha", action="store_true",
                        help="do not run the binary (mha columns come from --mha-json, or stay empty)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns of the binary (one repetition each) and PyTorch; each time is the "
                             "median over the rounds (default: 3)")
    add_timing_arguments(parser, "calls", LENGTHS)
    args = parser.parse_args()
    run_binary = not args.mha_json and not args.skip_mha
    rounds = max(1, args.rounds) if run_binary else 1

    mha_rounds, kept_rounds, torch_rounds, mha_context = defaultdict(list), defaultdict(list), defaultdict(list), {}
    for turn in range(rounds):
        if rounds > 1:
            print(f"round {turn + 1} of {rounds}", file=sys.stderr, flush=True)
        # 1. mha, alone on the machine (PyTorch, once imported, idle).
        if args.mha_json or run_binary:
            with tempfile.TemporaryDirectory() as tmp:
                path = args.mha_json
                if not path:
                    path = os.path.join(tmp, "mha.json")
                    run_mha(args.bench, path, repetitions=3 if rounds == 1 else 1)
                results, mha_context, statistic = load(path, "real")
            for (family, h, n, threads), run in results.items():
                if family in (LIBRARY, CAUSAL) and threads is None:
                    mha_rounds[(n, h, family == CAUSAL)].append(run["ms"])
                if family in (WORKSPACE, WORKSPACE_CAUSAL) and threads is None:
                    kept_rounds[(n, h, family == WORKSPACE_CAUSAL)].append(run["ms"])

        # 2. PyTorch, once no benchmark binary runs.
        busy = running_bench_forward()
        if busy:
            sys.exit(f"bench_forward is running (pid {', '.join(map(str, busy))}): "
                     "wait for it to finish, PyTorch must not share the CPU with it")
        results, info, notes = measure_torch(args)
        for key, (ms, count, path) in results.items():
            torch_rounds[key].append((ms, count, path))
    mha = {key: statistics.median(times) for key, times in mha_rounds.items()}
    kept = {key: statistics.median(times) for key, times in kept_rounds.items()}
    torch_results = {key: (statistics.median(ms for ms, _, _ in runs), sum(count for _, count, _ in runs), runs[0][2])
                     for key, runs in torch_rounds.items()}

    # 3. Report.
    print("## mha vs PyTorch nn.MultiheadAttention: self-attention forward, f32, d_model = 512, "
          "1 thread\n")
    print("  \n".join(info) + "  ")
    if mha_context:
        print("mha: " + context_line(mha_context) + "  ")
    if rounds > 1:
        print(f"Times: wall clock, the median over {rounds} rounds in which the two took turns; PyTorch's "
              "time of a round is the median of its timed calls after a warm-up, mha's one Google "
              "Benchmark repetition. Causal: PyTorch with a boolean attn_mask triu(ones(N, N), 1), mha "
              "with AttentionOptions::causal.\n")
    else:
        print("Times: wall clock. PyTorch: median of the timed calls after a warm-up. mha: median of "
              "3 Google Benchmark repetitions. Causal: PyTorch with a boolean attn_mask "
              "triu(ones(N, N), 1), mha with AttentionOptions::causal.\n")
    print("mha ms: `forward(x, options)`, a new output matrix at every call; workspace ms: "
          "`forward(x, out, workspace, options)` into one output and one mha::ForwardWorkspace kept "
          "from call to call, allocating nothing (BM_MultiHeadAttentionWorkspace).\n")
    print("| N | h | causal | PyTorch ms | mha ms | speed-up (PyTorch ÷ mha) | workspace ms | "
          "speed-up (PyTorch ÷ workspace) | PyTorch path |")
    print("|---:|---:|:---|---:|---:|---:|---:|---:|:---|")
    for n in args.lengths:
        for h in HEADS:
            for causal in (False, True):
                torch_ms, _, path = torch_results[(n, h, causal)]
                cells = []
                for times in (mha, kept):
                    ours = times.get((n, h, causal))
                    cells += [fmt_ms(ours) if ours else "–", f"{torch_ms / ours:.2f}" if ours else "–"]
                print(f"| {n} | {h} | {'yes' if causal else 'no'} | {fmt_ms(torch_ms)} | {' | '.join(cells)} | "
                      f"{path} |")

    if notes:
        print("\n" + "  \n".join(notes))

    for what, times in (("mha", mha), ("mha into a workspace", kept)):
        speedups = [torch_results[(n, h, c)][0] / times[(n, h, c)] for n in args.lengths for h in HEADS
                    for c in (False, True) if times.get((n, h, c))]
        if speedups:
            geomean = math.exp(sum(math.log(x) for x in speedups) / len(speedups))
            slower = sum(1 for x in speedups if x < 1)
            print(f"\n{what}: geometric mean of the {len(speedups)} speed-ups {geomean:.2f} "
                  f"(goal ≥ 1.5); slower than PyTorch in {slower} of them (goal: none).")

    print("\n### Targets\n")
    print("| Target | Measured | Goal | Result |")
    print("|:---|---:|:---|:---|")
    for n, h, causal, goal in TARGETS:
        name = f"N = {n}, h = {h}, {'causal' if causal else 'full'}: PyTorch ÷ mha"
        theirs, ours = torch_results.get((n, h, causal)), mha.get((n, h, causal))
        if theirs and ours:
            value = theirs[0] / ours
            result = "pass" if value >= goal else "**miss**"
            print(f"| {name} | {value:.2f} | ≥ {goal:.0f} | {result} |")
        else:
            print(f"| {name} | – | ≥ {goal:.0f} | not measured |")


if __name__ == "__main__":
    main()
