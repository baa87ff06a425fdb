"""The optimizer of a training run and one step of it: AdamW with its parameter groups, the
learning-rate schedule as a pure function of the step, and train_step (forward, backward, the
gradient norms, clip, update). train.py's loop calls these once per step; bench.py times the same
train_step, so what it measures is what train.py runs.

    optimizer = make_optimizer(model, lr=3e-3, weight_decay=0.1, device=device)
    for step in range(steps):
        lr = lr_at(step, 3e-3, 3e-4, warmup=5, steps=steps)
        loss, grad_norm, ttt_norm = train_step(model, optimizer, batches, lr, 1.0, device, world,
                                               ttt_params)

Why a file of its own and not train.py's: a script is imported by no other file (train.py stays
the top of the import graph, bench.py beside it rather than above it), and the step takes explicit
arguments, never train.py's flags. train.py keeps what a reader follows: the loop that calls the
step, logs, validates and saves (torchtitan keeps its step in the trainer; here the trainer is a
script, so the step moves one floor down, as nanochat's optimizer setup sits below its script).
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallel import shard_loss


# -----------------------------------------------------------------------------
# The optimizer and its schedule


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
# One step


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
        loss = shard_loss(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                          cp_group)
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
        loss_sum += shard_loss(model, x.to(device), y.to(device), cp_group)
    model.reshard()  # a no-grad forward leaves the root unsharded
    dist.all_reduce(loss_sum)
    return loss_sum.item() / (len(batches) * world)
