"""Parallelism, applied to the single-device model from outside: process groups, context
parallelism, FSDP2, activation checkpointing and compile. model.py and ttt.py never see a process
group; this file reaches into them through two extension points, as torchtitan's `parallelize`
and gpt-fast's `tp.py` do:

    Attention.gather_kv   (k, v) of this rank's shard -> the keys and values its queries reach
    MLP.incoming_state    this shard's h, s and TTT weights -> the state the earlier shards leave

    rank, world, device = setup_distributed("cpu")        # torchrun's group, or a world of one
    dp_rank, dp, group = context_parallel(2, 1024, cfg, device)
    model = parallelize(Transformer(cfg), device, cp_group=group)      # FSDP2 over every rank
    x, y = seq_shard((x, y), cp_shard(group))             # this rank's columns of each window
    loss = shard_loss(model, x, y, group)                 # its average over the group: one rank's

Context parallelism (Llama 3's scheme) splits every window into R contiguous shards, rank r
holding tokens [rT, (r+1)T). Attention gathers the K/V of every shard and keeps those rank r's
queries can reach (`shard_keys`); TTT starts rank r's scan from the sum of the earlier shards'
updates (`incoming_state`, derived in ttt.py's "The state across ranks"); RoPE places the shard at
position rT (Transformer.hidden's `start`); the loss is normalised by the whole windows' target
count. The group then computes the one-rank losses and gradients (tests/test_cp.py).

`model` below is model.py's Transformer and `cfg` its ModelConfig, reached through their
attributes only: this file imports ttt.py (the scan it splits) but not model.py, so the modules
that shard a model (train_model.py, watch.py) sit one floor lower.
"""

import os
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

import ttt
from cli import default_device


# -----------------------------------------------------------------------------
# Process groups: one code path for `python` (a world of one) and `torchrun`


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


def check_cp_shard(seq_len, cp, chunk):
    """Refuse a context-parallel split that the TTT scan cannot run exactly: seq_len tokens over cp
    ranks must give equal shards of whole TTT chunks (chunk None: no TTT layer, equal shards)."""
    if cp < 1:
        raise ValueError(f"--cp {cp}: the number of context-parallel ranks must be at least 1")
    if seq_len % cp:
        raise ValueError(f"--cp {cp}: a sequence of {seq_len} tokens does not split into {cp} "
                         "equal shards")
    if chunk and (seq_len // cp) % chunk:
        raise ValueError(f"--cp {cp}: a sequence of {seq_len} tokens splits into shards of "
                         f"{seq_len // cp}, not a whole number of TTT chunks of {chunk}: use a "
                         f"length that is a multiple of {cp} x {chunk} = {cp * chunk}")


# ttt.py "Stabilisers": a renormed state is no sum of the earlier shards' updates, so no rank can
# form its incoming state from the others' sums (an exact hand-off would run the ranks in turn).
NORM_PRESERVE_CP = ("ttt_norm_preserve=True cannot run under context parallelism (its fast "
                    "weight is not a sum of the shards' updates): use --cp 1 or "
                    "ttt_norm_preserve=False")


def context_parallel(cp, seq_len, cfg, device, ranks=True
                     ) -> tuple[int, int, dist.ProcessGroup | None]:
    """The world as dp x cp ranks: rank g holds shard g % cp of the windows its data-parallel rank
    g // cp reads (a group's ranks are consecutive: one node's GPUs carry its K/V gathers). Returns
    (data-parallel rank, dp, the context-parallel group or None for cp 1). Refused by name: shards
    that are not whole TTT chunks (check_cp_shard), a world that cp does not divide (unless
    `ranks` is False: --prepare-only, which may tokenise in one process for a job of many)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if cp > 1:  # one rank takes any length: only shards must be whole chunks
        ttt_layers = [i for i in cfg.ttt_layers if i < cfg.num_layers]  # as Transformer keeps
        try:
            check_cp_shard(seq_len, cp, cfg.ttt_chunk if ttt_layers else None)
            if cfg.ttt_norm_preserve and ttt_layers:
                raise ValueError(f"--cp {cp}: {NORM_PRESERVE_CP}")
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if not ranks:
        return rank, world, None
    if world % cp:
        raise SystemExit(f"error: --cp {cp}: {world} rank(s) do not form groups of {cp} (torchrun "
                         f"--nproc_per_node times the nodes must be a multiple of --cp)")
    if cp == 1:  # no group: the one-rank code path, unchanged
        return rank, world, None
    # FSDP still shards over all ranks (parallelize's 1-D mesh, torchtitan's dp_shard_cp): the
    # gradients average over dp x cp ranks, which shard_loss's x R / the group's count expects.
    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    return mesh.get_local_rank("dp"), world // cp, mesh["cp"].get_group()


def cp_shard(cp_group) -> tuple[int, int]:
    """(r, R): this rank holds part r of R of every window (seq_shard); (0, 1) without CP."""
    return (0, 1) if cp_group is None else (dist.get_rank(cp_group), dist.get_world_size(cp_group))


def seq_shard(batch, shard) -> tuple:
    """Rank r of R context-parallel ranks: columns [rT/R, (r+1)T/R) of the inputs and targets
    (B, T) of `batch`, a contiguous shard of every window (R = 1: the whole windows)."""
    (r, R), T = shard, batch[0].shape[1]
    return tuple(t[:, r * T // R:(r + 1) * T // R] for t in batch)


# -----------------------------------------------------------------------------
# Context parallelism, attention: every shard's keys, each rank keeping those its queries reach


class _GatherShards(torch.autograd.Function):
    """Every rank's x (equal shapes) to every rank; backward: each rank's gradient summed over the
    ranks that used it (a reduce-scatter). Returns a tuple, one tensor per rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.empty_like(grads[0])
        dist.reduce_scatter(g, [t.contiguous() for t in grads], group=ctx.group)
        return g, None


@torch.compiler.disable  # a collective: kept out of compiled graphs
def shard_keys(k, v, group, window=None):
    """Attention.gather_kv under context parallelism: k, v (B, KV, T, hd) of this rank's shard ->
    the keys and values (B, KV, S, hd) its queries can reach, gathered from every rank
    (`reachable`). With GQA they are small: KV heads, not H."""
    parts = _GatherShards.apply(torch.stack([k, v]), group)  # R x (2, B, KV, T, hd)
    k, v = reachable(parts, dist.get_rank(group), window).unbind(0)  # one gradient buffer, not two
    return k, v


def reachable(parts, r, window=None):
    """parts: R x (..., T, hd), shard j holding positions [jT, (j+1)T). -> (..., S, hd) positions
    [lo, (r+1)T): the keys shard r's queries reach, its own last, so attention masks causally with
    the diagonal at the bottom right, as in a prefill. lo = 0, or with a sliding window W the
    first key the shard's first query sees, rT − (W − 1): in the previous shard when W <= T,
    further back when W > T. Only these are copied (and kept for backward); parts[r] is always
    among them, so every rank uses the gather and runs its backward."""
    T = parts[0].shape[-2]
    lo = 0 if window is None else max(0, r * T - (window - 1))
    return torch.cat([p[..., max(0, lo - j * T):, :] for j, p in enumerate(parts[:r + 1])
                      if (j + 1) * T > lo], dim=-2)


# -----------------------------------------------------------------------------
# Context parallelism, TTT: the exclusive prefix over the ranks of each shard's ΣΔW


def _rank_scan(x, group, reverse=False):
    """Σ of x over the ranks of `group` before this one (after it, if reverse), exactly.

    A Hillis–Steele scan: in round d = 1, 2, 4, ... each rank sends its partial sum (its own x and
    the d − 1 ranks before it) d ranks on and adds the one it receives from d ranks back. After
    ⌈log2 R⌉ rounds `total` holds every earlier rank's x; three buffers of x's size, whatever R.
    """
    r, R = dist.get_rank(group), dist.get_world_size(group)
    step = -1 if reverse else 1
    x = x.contiguous()
    total, partial_sum, inbox = torch.zeros_like(x), x.clone(), torch.empty_like(x)
    d = 1
    while d < R:
        to, frm = r + step * d, r - step * d
        works = []  # post both before waiting: every rank sends and receives in the same round
        if 0 <= to < R:
            works.append(dist.isend(partial_sum, dist.get_global_rank(group, to), group=group))
        if 0 <= frm < R:
            works.append(dist.irecv(inbox, dist.get_global_rank(group, frm), group=group))
        for w in works:
            w.wait()  # partial_sum may change only once its send is done
        if 0 <= frm < R:
            total += inbox
            if 2 * d < R:  # the last round's partial sum goes nowhere
                partial_sum += inbox
        d *= 2
    return total


class _RankPrefix(torch.autograd.Function):
    """S0_r = Σ_{j<r} Σ_j over the ranks; backward ∂L/∂Σ_j = Σ_{r>j} ∂L/∂S0_r, the same scan
    towards rank 0. Every rank must use the output (even rank 0's zero), so that every rank runs
    the backward and its sends meet their receives."""

    @staticmethod
    def forward(ctx, sigma, group):
        ctx.group = group
        return _rank_scan(sigma, group)  # (B, D, F)

    @staticmethod
    def backward(ctx, g):
        return _rank_scan(g, ctx.group, reverse=True), None


@torch.compiler.disable  # point-to-point sends: kept out of compiled graphs
def incoming_state(group, h, s, w0, conv_w, proj_w, lr, chunk, fp32_state=True,
                   norm_preserve=False, **stabilisers):
    """MLP.incoming_state under context parallelism: the ttt.TTTState the earlier shards leave
    for this one, h (B, T, F) and s (B, T, D) being this rank's shard of whole chunks. The shard's
    own ΣΔW needs no state (ttt.updates), so the ranks exchange those sums (B, D, F) and each
    takes the ones before it; the state sits at position rT with no open chunk. stabilisers:
    clip_tau, key_norm, target_norm (each still a per-chunk ΔW, so still a sum)."""
    if norm_preserve:  # apply_context_parallel refuses it first; this keeps a direct call honest
        raise ValueError(NORM_PRESERVE_CP)
    r, R = dist.get_rank(group), dist.get_world_size(group)
    (B, T, F), D = h.shape, s.shape[-1]
    check_cp_shard(T * R, R, chunk)  # the shard is whole chunks: no chunk straddles two ranks
    sigma = ttt.updates(h, s, conv_w, proj_w, lr, chunk, fp32_state=fp32_state,
                        **stabilisers)  # (B, D, F) Σ_r
    prefix = _RankPrefix.apply(sigma, group)  # (B, D, F) S0_r, in the state dtype
    # pos on the host: chunked reads it to find the open chunk (none), without a device sync.
    pos = torch.full((B,), r * T, dtype=torch.long)
    return ttt.TTTState(prefix, s.new_zeros(B, chunk, D), h.new_zeros(B, chunk, F), pos)


def apply_context_parallel(model: nn.Module, group):
    """Make each block's attention and TTT MLP compute its part of the sequences split over
    `group` (shard_keys, incoming_state). Inputs then go in through shard_loss."""
    if model.config.ttt_norm_preserve and model.ttt_layers:
        raise ValueError(NORM_PRESERVE_CP)
    for block in model.model.layers:
        block.self_attn.gather_kv = partial(shard_keys, group=group,
                                            window=model.config.sliding_window)
        if block.mlp.use_ttt:
            block.mlp.incoming_state = partial(incoming_state, group)


def shard_loss(model: nn.Module, idx, targets, group=None, reduction="mean"):
    """model.loss of this rank's shard idx, targets (B, T) of sequences split over `group` (None:
    the whole sequences, model.loss itself). The mean is over the whole sequences: this rank's loss
    sum x R / the group's target count, a value whose average over the group's R ranks is the
    one-rank loss, and so is its gradient's. Averaging over ranks is what FSDP's gradient
    reduce-scatter and train.py's logged loss do, so with dp x cp ranks the step is the one-rank
    step. reduction="none" gives this shard's (B, T) losses."""
    if group is None:
        return model.loss(idx, targets, reduction=reduction)
    r, R = cp_shard(group)
    start = r * idx.shape[1]  # RoPE at the shard's own positions
    if reduction == "none":
        return model.loss(idx, targets, reduction="none", start=start)
    total = model.loss(idx, targets, reduction="none", start=start).sum()  # 0 where ignored
    count = (targets != -100).sum()
    dist.all_reduce(count, group=group)  # the whole sequences' targets (no gradient)
    return total * R / count.clamp(min=1)


# -----------------------------------------------------------------------------
# FSDP2, activation checkpointing, compile


def parallelize(model: nn.Module, device, *, cp_group=None, bf16=False,
                activation_checkpointing=False, compile=False) -> nn.Module:
    """torchtitan's apply_fsdp shape on a meta-device model: context parallelism (cp_group), then
    per block activation checkpointing and compile, then fully_shard each block and the root over
    every rank. The parameters stay on the meta device: the caller gives them memory (to_empty)
    and contents. compile: True (inductor) or a torch.compile backend name, e.g. "aot_eager"."""
    if cp_group is not None:  # before compile, so the graphs see the hooks
        apply_context_parallel(model, cp_group)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # one dimension: plain FSDP
    # bf16: FSDP2 casts the gathered weights to bf16 for compute and reduces the gradients in fp32
    # into fp32 master weights, which the optimizer updates. The TTT state stays fp32 regardless
    # (cfg.ttt_fp32_state): bf16 would round small per-chunk updates away.
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
    return model
