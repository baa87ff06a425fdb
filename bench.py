"""Benchmarks, one subcommand each. Results print as a markdown table; --append adds it to a file.

    # TTT MLP (gate/up + chunked TTT down) vs a plain SwiGLU MLP, Qwen3-4B/8B shapes, on a GPU
    python bench.py ttt --device cuda --append bench/RESULTS.md
    # the same at small sizes on a CPU (about two minutes)
    python bench.py ttt --small --device cpu --dtype fp32 --threads 1 --append bench/RESULTS.md
"""

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as nnf

import ttt

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# -----------------------------------------------------------------------------
# Timing and reporting helpers, shared by the subcommands


def median_times(fns, device, repeats, warmup=2):
    """Median seconds of each fn() over `repeats` runs after `warmup` untimed ones.

    The functions take turns, so a busy machine (other jobs on a shared CPU) slows all alike.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ts.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def peak_memory(fn, device):
    """Peak CUDA bytes allocated by fn() above what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The load average tells a reader whether other jobs were competing for the cores.
    return f"cpu (threads: {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f})"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def append_results(path, title, device, table):
    """Append a dated section (device, exact command, table) to a markdown results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    head = "" if path.exists() else "# Benchmark results\n\nEach section: date, device, the command, its table.\n"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with path.open("a") as f:
        f.write(f"{head}\n## {title}, {stamp}, {device_name(device)}\n\n`{command}`\n\n{table}\n")


def parse_list(text, item=int):
    return [item(x) for x in text.split(",")]


def parse_dims(text):
    return [tuple(int(n) for n in pair.split("x")) for pair in text.split(",")]


# -----------------------------------------------------------------------------
# ttt: one TTT MLP against a plain SwiGLU MLP of the same shape, batch 1

# Default sizes: Qwen3-4B (2560x9728) and Qwen3-8B (4096x12288) MLPs; --small for a CPU.
TTT_SIZES = {"dims": "2560x9728,4096x12288", "seqs": "8192,32768,131072", "chunks": "512,1024,4096"}
TTT_SMALL = {"dims": "256x768", "seqs": "1024,4096", "chunks": "64,256,1024"}


def make_mlp(D, F, device, dtype, generator):
    def param(*shape, scale):
        return (scale * torch.randn(*shape, generator=generator)).to(device, dtype).requires_grad_()

    return {
        "gate": param(F, D, scale=D**-0.5),
        "up": param(F, D, scale=D**-0.5),
        "down": param(D, F, scale=F**-0.5),
        "conv": param(D, 1, 5, scale=0.1),
        "proj": param(D, D, scale=D**-0.5),
    }


def swiglu_mlp(x, p):
    return nnf.linear(nnf.silu(nnf.linear(x, p["gate"])) * nnf.linear(x, p["up"]), p["down"])


def ttt_mlp(x, p, chunk, lr=1e-3):
    h = nnf.silu(nnf.linear(x, p["gate"])) * nnf.linear(x, p["up"])  # (B, T, F)
    return ttt.chunked(h, x, p["down"], p["conv"], p["proj"], lr, chunk)[0]


def measure(mlps, x, grad, params, device, repeats):
    """Per mlp: (forward s, forward+backward s, forward+backward peak bytes or None), None if out of memory."""

    def forward(mlp):
        with torch.no_grad():
            mlp(x)

    def forward_backward(mlp):
        mlp(x).backward(grad)

    peaks = []
    for mlp in mlps:  # one trial run each: finds what fits, and records peak memory
        for p in [x, *params.values()]:
            p.grad = None  # so each peak includes allocating its own grads
        try:
            peaks.append(peak_memory(lambda: forward_backward(mlp), device))
        except torch.OutOfMemoryError:
            peaks.append(False)
    fit = [mlp for mlp, peak in zip(mlps, peaks) if peak is not False]
    fwd = iter(median_times([lambda m=m: forward(m) for m in fit], device, repeats))
    fwd_bwd = iter(median_times([lambda m=m: forward_backward(m) for m in fit], device, repeats))
    return [None if peak is False else (next(fwd), next(fwd_bwd), peak) for peak in peaks]


TTT_HEADER = ["D×F", "T", "C", "fwd ms MLP", "fwd ms TTT", "fwd ×", "fwd+bwd ms MLP", "fwd+bwd ms TTT",
              "fwd+bwd ×", "peak MB MLP", "peak MB TTT", "peak ×"]


def ttt_row(D, F, T, C, base, got):
    """One table row from two `measure` results; None means it ran out of memory."""

    def show(result, value, scale, spec):
        return "OOM" if result is None else "-" if value is None else format(value * scale, spec)

    cells = [f"{D}×{F}", T, C]
    for i, scale, spec in ((0, 1e3, ".2f"), (1, 1e3, ".2f"), (2, 2**-20, ".0f")):  # seconds -> ms, bytes -> MB
        b, g = (None if m is None else m[i] for m in (base, got))
        cells += [show(base, b, scale, spec), show(got, g, scale, spec), f"{g / b:.2f}" if b and g else "-"]
    return cells


def bench_ttt(args):
    sizes = TTT_SMALL if args.small else TTT_SIZES
    dims, seqs, chunks = (parse_dims(args.dims or sizes["dims"]), parse_list(args.seqs or sizes["seqs"]),
                          parse_list(args.chunks or sizes["chunks"]))
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    plain, fast = (torch.compile(swiglu_mlp), torch.compile(ttt_mlp)) if args.compile else (swiglu_mlp, ttt_mlp)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for D, F in dims:
        params = make_mlp(D, F, device, dtype, generator)
        for T in seqs:
            x = torch.randn(1, T, D, generator=generator).to(device, dtype).requires_grad_()  # as in a model
            grad = torch.randn(1, T, D, generator=generator).to(device, dtype)
            for C in chunks:  # the plain MLP is timed again next to each TTT run, taking turns
                mlps = [lambda x: plain(x, params), lambda x, C=C: fast(x, params, C)]
                base, got = measure(mlps, x, grad, params, device, args.repeats)
                rows.append(ttt_row(D, F, T, C, base, got))
                print(markdown_table(TTT_HEADER, rows[-1:]).splitlines()[-1], flush=True)
            del x, grad
    table = markdown_table(TTT_HEADER, rows)
    print(f"\n{device_name(device)}, {args.dtype}, B=1, median of {args.repeats}\n\n{table}")
    if args.append:
        append_results(args.append, f"ttt ({args.dtype}, B=1, median of {args.repeats})", device, table)


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("ttt", help="TTT MLP vs plain SwiGLU MLP: time and peak memory")
    # sizes (None: the GPU sizes in TTT_SIZES, or TTT_SMALL with --small)
    p.add_argument("--dims", help="DxF pairs, comma separated (default: Qwen3-4B and -8B MLP shapes)")
    p.add_argument("--seqs", help="sequence lengths T, comma separated")
    p.add_argument("--chunks", help="TTT chunk sizes C, comma separated")
    p.add_argument("--small", action="store_true", help="CPU-sized defaults: D×F 256×768, T up to 4096")
    # run
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after 2 warm-up runs)")
    p.add_argument("--compile", action="store_true", help="torch.compile both MLPs")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default; 1 is steadier on a busy CPU)")
    # output
    p.add_argument("--append", help="markdown file to append the table to, e.g. bench/RESULTS.md")
    p.set_defaults(func=bench_ttt)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
