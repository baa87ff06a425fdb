"""Watching a training run (train.py): the validation loss, also by position, the size of each
TTT layer's fast-weight update, and MFU. What a row of metrics.jsonl holds besides the step's loss.

    row = validate(model, val, seq_len=1024, val_windows=16, micro_batch=None, rank=0, world=1,
                   device=torch.device("cpu"))   # {"val_loss": ..., "val_loss_pos.0-64": ...}

Loss by position says whether a model uses distant context (attention far back, or a fast
weight): such a model has lower loss in later buckets. ‖ΣΔW‖/‖W0‖ is the first sign of an
unstable TTT run.
"""

import numpy as np
import torch
import torch.distributed as dist

from data import TokenStream, validation_starts, window_batch
from parallel import cp_shard, seq_shard, shard_loss

# Dense bf16 peak FLOP/s per GPU for MFU. First match wins, so "H100 PCIe" precedes "H100".
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12)]


# -----------------------------------------------------------------------------
# Validation: loss by position, ‖ΣΔW‖/‖W0‖ per TTT layer



def position_buckets(seq_len, growth=4) -> list[tuple[int, int]]:
    """Log-spaced position ranges [0, 64), [64, 256), [256, 1024), ... cut at seq_len. A model that
    uses distant context (attention far back, or a fast weight) has lower loss in later buckets.
    growth 2 (the study's probes): [64, 128), [128, 256), ..., so the inside and the outside of a
    128-token window fall in different buckets."""
    edges = [0, 64]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * growth)
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
        losses = shard_loss(model, x, y, cp_group, reduction="none")  # (b, T/R), 0 if ignored
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


def mfu(model, seq_len, tokens_per_s, device, world) -> float | None:
    """Model FLOPs utilisation over all ranks against the dense bf16 peak; None off a known GPU."""
    peak = peak_flops(device)
    return None if not peak else round(model.flops_per_token(seq_len) * tokens_per_s
                                       / (peak * world), 4)
