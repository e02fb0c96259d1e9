#!/usr/bin/env python3
"""Compare a training step of mha's self-attention with PyTorch's CPU nn.MultiheadAttention, one thread.

An optional tool for a developer's machine, never run in CI; the training counterpart of
compare_pytorch.py, whose helpers it imports (BLAS detection, thread pinning, the timing loop, the
guard against sharing the CPU with a benchmark, the context lines). From the repository root:

    /usr/bin/python3 bench/compare_pytorch_training.py               # mha from bench/results/training.json
    /usr/bin/python3 bench/compare_pytorch_training.py --mha-json training.json
    /usr/bin/python3 bench/compare_pytorch_training.py --bench       # runs build/bench/bench_training
    /usr/bin/python3 bench/compare_pytorch_training.py --bench path/to/bench_training

Needs PyTorch (Debian: python3-torch, 1.13, for /usr/bin/python3). The shapes: self-attention of
x of shape (1, N, 512), f32: N = 1024 with h = 1 (full) and h = 8 (full, causal), N = 4096 with
h = 8 (full, causal) -- bench_training's grid.

mha: the medians (wall clock, real_time) of BM_ForwardTape/h/N/causal (forward(x, options, tape))
and BM_Backward/h/N/causal (backward(tape, d_output, gradients)) from Google Benchmark JSON: the
file given with --mha-json (default bench/results/training.json), or, with --bench, a run of the
binary with
    --benchmark_filter='^BM_(ForwardTape|Backward)/h:(1|8)/N:(1024|4096)/causal:(0|1)$'
    --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
(its console output goes to stderr). mha's step is the sum of the two medians.

PyTorch: torch.nn.MultiheadAttention(512, h, bias=False, batch_first=True) in train mode (dropout
0), torch.set_num_threads(1), x = randn(1, N, 512) with requires_grad=True; one step is
    y, _ = mha(x, x, x, need_weights=False[, attn_mask=mask])     # forward, autograd recording
    y.backward(dy)                                                # backward: ∂(y·dy)/∂x, ∂/∂weights
with dy a fixed randn(1, N, 512); causal is the boolean mask torch.triu(ones(N, N), 1) (1.13's
MultiheadAttention has no is_causal), made once outside the timing. Gradients accumulate into
.grad from step to step, as mha's backward adds into its gradients. Each step times its forward
and its backward separately; the table gives the median forward, the median backward and the
median step (forward + backward of the same step), over at least --runs steps and --min-time
seconds after a warm-up step (3 steps once --budget seconds have passed, for the slow shapes).
PyTorch is imported only after the binary has finished, and the script refuses to measure while
any of the benchmark binaries (bench_forward, bench_training, bench_features) runs.

Memory (unless --no-memory): one step at N = 4096, h = 8, causal in a fresh subprocess, which
reports its peak resident set (VmHWM) before and after the step, and the bytes of the tensors
autograd saved for the backward (torch.autograd.graph.saved_tensors_hooks; distinct storages,
the module's parameters apart) -- beside mha's tape (the tape_MiB counter of BM_ForwardTape).

Prints, in Markdown: the machine (/proc/cpuinfo), PyTorch's version, BLAS and threads, mha's run
context, the table N | h | causal | PyTorch fwd ms | PyTorch bwd ms | PyTorch step ms |
mha fwd(tape) ms | mha bwd ms | mha step ms | PyTorch ÷ mha (step), and the memory lines.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import (D_MODEL, add_timing_arguments, describe_torch, fmt_ms,  # noqa: E402
                             import_torch, run_mha, running_bench_forward, takes_native_path, time_calls)
from summarize import TO_MS, context_line  # noqa: E402

# (N, h, causal): bench_training's grid.
SHAPES = ((1024, 1, False), (1024, 8, False), (1024, 8, True), (4096, 8, False), (4096, 8, True))
MEMORY_SHAPE = (4096, 8, True)
FILTER = r"^BM_(ForwardTape|Backward)/h:(1|8)/N:(1024|4096)/causal:(0|1)$"
DEFAULT_BENCH = os.path.join("build", "bench", "bench_training")
DEFAULT_JSON = os.path.join("bench", "results", "training.json")
BENCHMARKS = ("bench_forward", "bench_training", "bench_features")
MIB = 1 << 20


def repository_path(path, default):
    """path as given, or, for the default, relative to the repository root if not found here."""
    if os.path.exists(path) or path != default:
        return path
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)


def load_training(path):
    """bench_training JSON -> ({(family, N, h, causal): {"ms", "tape_MiB"}}, context).

    Takes the median aggregate of each case (real_time), or the mean of the iteration runs when the
    run had no repetitions."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        sys.exit(f"{path}: cannot read Google Benchmark JSON: {error}")
    medians, iterations = {}, {}
    for run in data.get("benchmarks", []):
        if run.get("error_occurred"):
            continue
        family, *parts = (run.get("run_name") or run["name"]).split("/")
        args = dict(part.split(":", 1) for part in parts if ":" in part)
        if family not in ("BM_ForwardTape", "BM_Backward") or not all(k in args for k in ("h", "N", "causal")):
            continue
        key = (family, int(args["N"]), int(args["h"]), args["causal"] != "0")
        row = {"ms": run["real_time"] * TO_MS[run.get("time_unit", "ns")], "tape_MiB": run.get("tape_MiB")}
        if run.get("run_type") == "aggregate":
            if run.get("aggregate_name") == "median":
                medians[key] = row
        else:
            iterations.setdefault(key, []).append(row)
    results = dict(medians)
    for key, rows in iterations.items():
        if key not in results:
            results[key] = {"ms": statistics.mean(r["ms"] for r in rows), "tape_MiB": rows[0]["tape_MiB"]}
    return results, data.get("context", {})


def machine_line():
    """'Machine: <model name> (n logical CPUs).' from /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        return ""
    return f"Machine: {models[0]} ({len(models)} logical CPUs)." if models else ""


def setup(torch, n, h, causal):
    """The module (train mode, dropout 0), x (requires_grad), dy and the call of one forward."""
    module = torch.nn.MultiheadAttention(D_MODEL, h, bias=False, batch_first=True, dropout=0.0).train()
    x = torch.randn(1, n, D_MODEL, requires_grad=True)
    dy = torch.randn(1, n, D_MODEL)
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1) if causal else None

    def forward():
        y, _ = module(x, x, x, need_weights=False, attn_mask=mask)
        return y
    return module, x, dy, forward


def measure_torch(args, shapes):
    """{(N, h, causal): (fwd ms, bwd ms, step ms, steps)}, the PyTorch path, info lines, notes."""
    torch = import_torch()
    info, notes = describe_torch(torch, args)
    load_before = os.getloadavg()
    results, paths = {}, set()
    for n, h, causal in shapes:
        module, x, dy, forward = setup(torch, n, h, causal)
        forward_times, backward_times = [], []

        def step():
            t0 = time.perf_counter()
            y = forward()
            t1 = time.perf_counter()
            y.backward(dy)
            t2 = time.perf_counter()
            forward_times.append(t1 - t0)
            backward_times.append(t2 - t1)

        # The warm-up step, which also tells whether 1.13 took its fused kernel (it should not:
        # the fast path needs eval mode and no autograd).
        paths.add("native fast path" if takes_native_path(torch, step) else
                  "Python path (F.multi_head_attention_forward)")
        forward_times.clear()
        backward_times.clear()
        seconds, count = time_calls(step, args.runs, args.min_time, args.budget, warm_up=False)
        assert x.grad is not None and module.in_proj_weight.grad is not None
        results[(n, h, causal)] = (statistics.median(forward_times) * 1e3,
                                   statistics.median(backward_times) * 1e3, seconds * 1e3, count)
        print(f"PyTorch N = {n}, h = {h}, causal = {causal}: forward {results[(n, h, causal)][0]:.2f} ms, "
              f"backward {results[(n, h, causal)][1]:.2f} ms, step {seconds * 1e3:.2f} ms "
              f"(medians of {count} steps)", file=sys.stderr, flush=True)
        del module, x, dy, forward, step
    load_after = os.getloadavg()
    info.append("Load average (1, 5, 15 min) before / after PyTorch's timing: "
                + ", ".join(f"{v:.2f}" for v in load_before) + " / "
                + ", ".join(f"{v:.2f}" for v in load_after) + ".")
    return results, " and ".join(sorted(paths)), info, notes


def peak_rss():
    """Peak resident set of this process in bytes: VmHWM from /proc/self/status, else ru_maxrss.

    VmHWM belongs to the process's own address space; ru_maxrss survives fork and exec on Linux,
    so a subprocess started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def memory_probe(n, h, causal):
    """In this (fresh) process: one step; prints JSON with peak RSS before and after (bytes) and
    the bytes autograd saved for the backward (distinct storages; parameters apart)."""
    torch = import_torch()
    module, x, dy, forward = setup(torch, n, h, causal)
    parameters = {p.data_ptr() for p in module.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    before = peak_rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = forward()
    y.backward(dy)
    after = peak_rss()
    print(json.dumps({"before": before, "after": after,
                      "saved": sum(b for ptr, b in saved.items() if ptr not in parameters),
                      "saved_parameters": sum(b for ptr, b in saved.items() if ptr in parameters)}))


def measure_memory(n, h, causal):
    """Run memory_probe in a fresh interpreter; its JSON, or None (with a message) if it failed."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", str(n), str(h), str(int(causal))]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        print(f"memory probe failed (exit {done.returncode})", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mha-json", metavar="FILE", default=DEFAULT_JSON,
                        help=f"bench_training JSON to read mha's times from (default: {DEFAULT_JSON})")
    parser.add_argument("--bench", nargs="?", const=DEFAULT_BENCH, metavar="BINARY",
                        help=f"run this bench_training binary instead (default: {DEFAULT_BENCH})")
    add_timing_arguments(parser, "steps", (1024, 4096))
    parser.add_argument("--no-memory", action="store_true",
                        help=f"skip the peak-memory subprocess (N = {MEMORY_SHAPE[0]}, h = {MEMORY_SHAPE[1]}, causal)")
    parser.add_argument("--memory-probe", nargs=3, type=int, metavar=("N", "H", "CAUSAL"),
                        help=argparse.SUPPRESS)  # internal: the subprocess of the memory line
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe[0], args.memory_probe[1], bool(args.memory_probe[2]))
        return
    shapes = [shape for shape in SHAPES if shape[0] in args.lengths]

    # 1. mha, alone on the machine.
    with tempfile.TemporaryDirectory() as tmp:
        path = repository_path(args.mha_json, DEFAULT_JSON)
        if args.bench:
            path = os.path.join(tmp, "mha.json")
            run_mha(args.bench, path, FILTER, DEFAULT_BENCH)
        mha, mha_context = load_training(path)

    # 2. PyTorch, once no benchmark binary runs.
    busy = running_bench_forward(BENCHMARKS)
    if busy:
        sys.exit(f"a benchmark binary is running (pid {', '.join(map(str, busy))}): "
                 "wait for it to finish, PyTorch must not share the CPU with it")
    torch_results, path, info, notes = measure_torch(args, shapes)
    memory = measure_memory(*MEMORY_SHAPE) if not args.no_memory and MEMORY_SHAPE in shapes else None

    # 3. Report.
    machine = machine_line()
    if machine:
        print(machine + "\n")
    print("## mha vs PyTorch nn.MultiheadAttention: a self-attention training step (forward + "
          f"backward), f32, d_model = {D_MODEL}, 1 thread\n")
    print("  \n".join(info) + "  ")
    if mha_context:
        print("mha: " + context_line(mha_context) + "  ")
    print(f"PyTorch: train mode, dropout 0, x with requires_grad, y.backward(dy); {path}. Times: "
          "wall clock; PyTorch: medians of the timed steps after a warm-up step (forward, backward "
          "and their sum per step, each its own median); mha: medians of 3 Google Benchmark "
          "repetitions of BM_ForwardTape and BM_Backward, step = their sum. Causal: PyTorch with a "
          "boolean attn_mask triu(ones(N, N), 1), mha with AttentionOptions::causal.\n")
    print("| N | h | causal | PyTorch fwd ms | PyTorch bwd ms | PyTorch step ms | mha fwd(tape) ms "
          "| mha bwd ms | mha step ms | PyTorch ÷ mha (step) |")
    print("|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|")
    for n, h, causal in shapes:
        fwd, bwd, step, _ = torch_results[(n, h, causal)]
        ours_fwd = mha.get(("BM_ForwardTape", n, h, causal), {}).get("ms")
        ours_bwd = mha.get(("BM_Backward", n, h, causal), {}).get("ms")
        ours = ours_fwd + ours_bwd if ours_fwd and ours_bwd else None
        cells = [str(n), str(h), "yes" if causal else "no", fmt_ms(fwd), fmt_ms(bwd), fmt_ms(step)]
        cells += [fmt_ms(v) if v else "–" for v in (ours_fwd, ours_bwd, ours)]
        cells.append(f"{step / ours:.2f}" if ours else "–")
        print("| " + " | ".join(cells) + " |")

    if memory:
        n, h, causal = MEMORY_SHAPE
        tape = mha.get(("BM_ForwardTape", n, h, causal), {}).get("tape_MiB")
        print(f"\n### Memory, N = {n}, h = {h}, causal\n")
        print(f"PyTorch, one step in a fresh process: peak RSS {memory['after'] / MIB:.0f} MiB "
              f"({memory['before'] / MIB:.0f} MiB before the step: the interpreter, torch, the "
              f"module and inputs; +{(memory['after'] - memory['before']) / MIB:.0f} MiB by the "
              f"step). Tensors autograd saved for the backward: {memory['saved'] / MIB:.1f} MiB "
              f"(plus the parameters, {memory['saved_parameters'] / MIB:.1f} MiB).  ")
        print("mha: tape " + (f"{tape:.1f} MiB" if tape is not None else "–") + " (BM_ForwardTape's "
              "tape_MiB: x, the projections, the concatenated heads, one log-sum-exp per row and head; "
              "nothing N × N).")

    if notes:
        print("\n" + "  \n".join(notes))


if __name__ == "__main__":
    main()
