"""Per-rank activation memory of context-parallel training, on paper: the README's table.

    python bench/cp_memory.py        # CPU, 73 s on 2 busy cores

Activation memory is what one rank holds at the peak of a step with activation checkpointing:
the checkpointed block inputs, one block recomputed with its backward, the TTT state, the keys
and values gathered from earlier shards, the TTT exchange, and one slice of logits. Each term's
coefficient is counted here, on the CPU, as the bytes of live tensors (a dispatch mode sees every
tensor an op creates and when it is freed) at real widths and small T; the table multiplies them
out. Weights, gradients and optimizer state (sharded by FSDP) and allocator slack are not in it.
"""

import os
import sys
import tempfile
import warnings
import weakref
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402  (the project's files, after the path insert)
import parallel  # noqa: E402

GiB = 2**30


class Live(TorchDispatchMode):
    """Counts the bytes of tensors created inside the mode while they live; `top` is the peak.
    A view or an in-place result shares an input's storage: not an allocation."""

    def __init__(self):
        super().__init__()
        self.now = self.top = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n and key not in self.seen and key not in inputs:
                self.seen.add(key)
                self.now += n
                self.top = max(self.top, self.now)
                weakref.finalize(storage, self._free, key, n)  # when the memory is released
        return out

    def _free(self, key, n):
        self.seen.discard(key)
        self.now -= n


# -----------------------------------------------------------------------------
# One process: a block recomputed with its backward, and the logits


def block_peak(cfg, use_ttt, T):
    """Peak bytes of one bf16 block's forward + backward to its input over T tokens (what
    checkpointing recomputes; the weight gradients are FSDP's, left out)."""
    torch.manual_seed(0)
    block = model.Block(cfg, use_ttt).to(torch.bfloat16)
    x = torch.randn(1, T, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = model.rope_cos_sin(cfg, torch.arange(T)[None], torch.bfloat16)
    grad = torch.randn_like(x)
    with Live() as live:
        y = block(x, x, cos, sin)
        torch.autograd.grad(y, [x], grad)
        del y
    return live.top


def block_coefficients(cfg):
    """(bytes per token of a block, extra constant bytes of a TTT block) from T = 128 and 256."""
    cfg = replace(cfg, ttt_chunk=128)
    plain = [block_peak(cfg, False, T) for T in (128, 256)]
    fast = [block_peak(cfg, True, T) for T in (128, 256)]
    per_token = max(plain[1] - plain[0], fast[1] - fast[0]) / 128
    return per_token, max(0.0, fast[0] - 128 * per_token)


def logits_per_entry():
    """Peak bytes per token and vocabulary entry of a slice of the loss (Transformer._ce), from
    512 and 1024 tokens at a small width, where the logits dominate."""
    cfg = replace(model.PRESETS["tiny"], num_layers=1, vocab_size=16384, hidden_size=64)
    net = model.Transformer(cfg).to(torch.bfloat16)
    tops = []
    for n in (512, 1024):
        h = torch.randn(n, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, cfg.vocab_size, (n,))
        with Live() as live:
            net._ce(h, t, -100, "sum").backward()
        tops.append(live.top)
    return (tops[1] - tops[0]) / 512 / cfg.vocab_size


# -----------------------------------------------------------------------------
# R gloo ranks: the gathered keys and values, and the TTT exchange


def _attention_peak(q, k, v, group, r):
    """Peak bytes of attention forward + backward over the keys shard r reaches (group None:
    its own shard only, what a one-rank block holds for these queries)."""
    T = q.shape[2]
    bias = causal_lower_right(T, (r + 1) * T) if group and r else None  # a subclass: made outside
    grad = torch.ones_like(q)  # made outside: the gradient arrives from the layer above
    with Live() as live:
        k2, v2 = parallel.shard_keys(k, v, group) if group else (k, v)
        y = scaled_dot_product_attention(q, k2, v2, attn_mask=bias, is_causal=bias is None,
                                         enable_gqa=True)
        torch.autograd.backward(y, grad)
        del y, k2, v2
    return live.top


def _rank(r, R, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=r, world_size=R)
    B, H, KV, T, hd, D, F = 1, 8, 2, 256, 64, 256, 768
    g = torch.Generator().manual_seed(r)
    q, k, v = (torch.randn(B, n, T, hd, generator=g).bfloat16().requires_grad_()
               for n in (H, KV, KV))
    across = _attention_peak(q, k, v, dist.group.WORLD, r)
    sigma, grad = torch.randn(B, D, F, generator=g, requires_grad=True), torch.ones(B, D, F)
    with Live() as scan:  # the result, the scan's buffers and the gradient it returns
        parallel._RankPrefix.apply(sigma, dist.group.WORLD).backward(grad)
    if r == R - 1:  # the last rank gathers the most keys
        extra = across - _attention_peak(q, k, v, None, r)
        torch.save((extra / (2 * B * KV * T * hd * 2), scan.top / (B * D * F * 4)), out)
    dist.destroy_process_group()


def rank_units(R):
    """On the last of R ranks: what attention across shards holds beyond attention over its own
    shard, in units of one shard's K and V (bf16), and the peak of the TTT exchange in units of
    one (B, D, F) fp32 state."""
    with tempfile.TemporaryDirectory() as tmp:
        method = "fork" if sys.platform == "linux" else "spawn"  # fork: no imports per rank
        mp.start_processes(_rank, args=(R, f"{tmp}/init", f"{tmp}/out.pt"), nprocs=R,
                           start_method=method)
        return torch.load(f"{tmp}/out.pt")


# -----------------------------------------------------------------------------
# The table


def per_rank_bytes(cfg, T, R, c):
    """Peak activation bytes of one rank: T tokens over R ranks, coefficients c, B = 1."""
    Tr, D, F = T // R, cfg.hidden_size, cfg.intermediate_size
    # block inputs (L; the first is the embeddings), the last block's output, the final norm's
    # fp32 copy and output, and the gradient flowing into the recomputed block: all (Tr, D) bf16
    kept = (cfg.num_layers + 5) * Tr * D * 2
    block = c["block"] * Tr + c["ttt"]  # one TTT block recomputed, with its backward
    logits = c["logits"] * cfg.vocab_size * 1024  # Transformer.loss's tokens_per_slice
    if R == 1:
        return kept + block + logits
    kv_shard = Tr * 2 * cfg.num_kv_heads * cfg.head_dim * 2  # one shard's K and V, bf16
    extra_kv, scan = c["ranks"][R]
    return kept + block + logits + extra_kv * kv_shard + scan * D * F * 4


def main():
    warnings.simplefilter("ignore")  # deprecation notices of torch.distributed
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ranks = {R: rank_units(R) for R in (2, 4, 8)}
    print("| R | last rank's attention beyond its own shard (shard K+V) | TTT exchange ((B, D, F) fp32) |")
    print("| ---: | ---: | ---: |")
    for R, (kv, scan) in ranks.items():
        print(f"| {R} | {kv:.1f} | {scan:.1f} |")
    ce = logits_per_entry()
    print(f"\nloss slice: {ce:.1f} bytes per token and vocabulary entry")
    rows = []
    for name in ("qwen3-4b", "qwen3-8b"):
        cfg = model.PRESETS[name]
        per_token, ttt_const = block_coefficients(cfg)
        print(f"{name}: a block {per_token / 1024:.0f} KiB per token, a TTT block "
              f"{ttt_const / GiB:.2f} GiB more")
        c = dict(block=per_token, ttt=ttt_const, logits=ce, ranks=ranks)
        for T in (131072, 262144):
            cells = [f"{per_rank_bytes(cfg, T, R, c) / GiB:.1f}" for R in (1, 2, 4, 8)]
            rows.append(f"| {name} | {T // 1024}K | " + " | ".join(cells) + " |")
    print("\n| model | tokens | R = 1 | R = 2 | R = 4 | R = 8 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
