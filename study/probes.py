"""What the study measures in a trained (or starting) model, beyond train.py's own metrics: the loss
by position on held-out text, with the anomaly checks (an attention sink through model.py's
Attention.sink switch, attention limited to a window, windows shifted); each start's gradients and
update scale at step 0, from the run's own starting point (the flags and config its train.json
records, the data and first batch as train.py's setup_run reads them); and what the fast weight
learned (the conv's taps, and the fast weight answering a recall query before and after the
binding's chunk is folded in). Each probe takes a run directory, never train.py's flags: the study
imports no script.
"""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import load_hf
import train_model
import ttt
import watch
from checkpoint import checkpoints, read_train_meta
from model import ModelConfig
from data import (TokenStream, batch_layout, load_tokenizer, read_stream, split_data, step_batches,
                  window_batch)
from starts import update_scale
from study.task import RecallTask

PAPER_TAU = 1e-5  # the paper's per-chunk clip at evaluation (Appendix C)

# -----------------------------------------------------------------------------
# Held-out text: the loss by position, and the anomaly checks


def run_record(run_dir) -> tuple[SimpleNamespace, ModelConfig]:
    """(flags, config) of the finished train.py run in run_dir, from its newest checkpoint's
    train.json: every flag as train.py resolved it (defaults and derived values included) and the exact
    ModelConfig fields it trained. A probe measures a run that exists, so it asks the run what it
    was told rather than parsing train.py's flags again (and so imports no script)."""
    ckpt = checkpoints(Path(run_dir) / "ckpt")
    if not ckpt:
        raise FileNotFoundError(f"{run_dir}: no checkpoint of a finished train.py run to probe")
    meta = read_train_meta(ckpt[-1])
    return SimpleNamespace(**meta["args"]), ModelConfig(**load_hf.saved_config(meta, ckpt[-1]))


def held_out(run_dir) -> tuple[TokenStream, int]:
    """The --val-data of the run in run_dir as train.py reads it (its tokenizer, its token cache),
    and its --seq-len."""
    args, cfg = run_record(run_dir)  # the trained config: vocabulary and EOS, export or not
    tok_dir, sep, tok = load_tokenizer(args.tokenizer, args.init, cfg, args.preset, args.cache, 0)
    return read_stream(args.val_data, args.seq_len, tok_dir, sep, args.cache, 0, cfg.vocab_size,
                       tok), args.seq_len


def position_edges(seq_len) -> list[int]:
    """train.py's position buckets, each twice the last ([0, 64), [64, 128), [128, 256), ...) as
    a list of edges: finer than train.py's validation, so the inside and the outside of a
    128-token window fall in different buckets."""
    buckets = watch.position_buckets(seq_len, growth=2)
    return [buckets[0][0]] + [hi for _, hi in buckets]


@torch.no_grad()
def text_scores(hf_dir, val: TokenStream, L, variant="on", window=None, n=None,
                batch=4) -> dict:
    """Mean loss per window and position bucket (position_edges) of the HF export in hf_dir on the
    held-out stream `val`, in windows of L tokens laid back to back (all that fit, or the first n):
    the same windows for every arm. variant "on": as trained; "off": the fast-weight updates off
    (same weights); "sink": every query also sees the window's first token; "window": attention
    limited to the last `window` keys plus the first token; "shift": the windows start half a
    context later (the same text at other positions); "paper-tau": each chunk's ΔW clipped to
    Frobenius norm PAPER_TAU, as the paper evaluates Qwen3-4B."""
    model = load_hf.load_model(hf_dir).eval()
    model.ttt_enabled = variant != "off"
    if variant == "window":
        model.config.sliding_window = window
    if variant == "paper-tau":  # the paper's evaluation clip (Appendix C): each chunk's ΔW ≤ 1e-5
        model.config.ttt_clip_tau = PAPER_TAU
    for block in model.model.layers:  # this model's own switch: other threads score too
        block.self_attn.sink = variant in ("sink", "window")
    n = min(n or len(val), (len(val) - 1 - L // 2) // L)  # as many with the shift as without
    starts = np.arange(n) * L + (L // 2 if variant == "shift" else 0)
    edges, rows = position_edges(L), []
    for i in range(0, n, batch):
        loss = model.loss(*window_batch(val, starts[i:i + batch], L), reduction="none")
        rows += [[row[lo:hi].mean().item() for lo, hi in zip(edges, edges[1:])] for row in loss]
    return {"edges": edges, "windows": rows}


# -----------------------------------------------------------------------------
# Each start at step 0


def first_step(run_dir) -> tuple:
    """(starting model, first batch [(x, y)]) of the run in run_dir, in one process: the config it
    trained (its train.json), the tokenizer, data and step-0 windows as train.py's setup_run reads
    them, the weights as its build_model fills them (train_model.full_model), without a process
    group or --out."""
    args, cfg = run_record(run_dir)
    init = train_model.resolve_init(args.init)
    tok_dir, sep, tok = load_tokenizer(args.tokenizer, init, cfg, args.preset, args.cache, 0)
    data, _ = split_data(args.data, args.val_data, args.val_windows, args.seq_len, tok_dir, sep,
                         args.cache, 0, cfg.vocab_size, tok)
    layout = batch_layout(args.batch_tokens, args.seq_len, args.micro_batch, 1)
    batches = step_batches(data, args.seed, 0, args.seq_len, layout, 0)
    model = train_model.full_model(cfg, init, args.seed, args.ttt_init,
                                   torch.cat([x for x, _ in batches]))
    return model, batches


def start_rho(run_dir) -> float:
    """starts.update_scale on a run's first batch, mean over the TTT layers: ‖ΣΔW‖/‖W0‖ per unit
    of conv weight on the target's tap with P = I. A start's P multiplies it: the paper's ~0.016
    makes the update per unit conv weight 0.016 rho, whatever rho is in this model."""
    model, batches = first_step(run_dir)
    return float(np.mean(list(update_scale(model, torch.cat([x for x, _ in batches])
                                                    ).values())))


def start_gradients(run_dir) -> dict:
    """Gradient norms of the conv, P and W0 (the TTT layers' down_proj) at a run's first step
    (before clipping)."""
    model, batches = first_step(run_dir)
    for x, y in batches:
        (model.loss(x, y) / len(batches)).backward()
    names = {"conv": "mlp.ttt_conv.weight", "proj": "mlp.ttt_proj.weight",
             "down_proj": "mlp.down_proj.weight"}
    grads = {k: [p.grad for n, p in model.named_parameters() if n.endswith(suffix)
                 and int(n.split(".")[2]) in model.ttt_layers] for k, suffix in names.items()}
    return {k: math.sqrt(sum(g.double().pow(2).sum().item() for g in gs)) if gs else None
            for k, gs in grads.items()}


# -----------------------------------------------------------------------------
# What the fast weight learned


def conv_taps(hf_dir) -> dict:
    """Per tap t-2..t+2, averaged over the TTT layers of the export in hf_dir: the conv's mean |w|
    (as the model applies it: the centre tap alone without look-ahead), and each tap's share of the
    target's weight, ‖diag(w_k) P‖ / Σ_k ‖diag(w_k) P‖ (V_hat = Σ_k diag(w_k) s_{t+k} P, so this
    says which position V_hat reads, whatever the scales of conv and P)."""
    model = load_hf.load_model(hf_dir)
    mean_abs, share = [], []
    for i in model.ttt_layers:
        _, w, P, _ = model.model.layers[i].mlp._ttt_weights()  # the conv as applied
        w = w.detach()[:, 0]  # (D, 5)
        P = torch.eye(len(w)) if P is None else P.detach()
        norms = torch.stack([(w[:, k, None] * P).norm() for k in range(w.shape[1])])  # (5,)
        mean_abs.append(w.abs().mean(0))
        share.append(norms / norms.sum().clamp(min=1e-30))
    return {"mean_abs": torch.stack(mean_abs).mean(0).tolist(),
            "share": torch.stack(share).mean(0).tolist()}


@torch.no_grad()
def fast_weight_answers(hf_dir, data_path, task: RecallTask, index=0) -> list[dict]:
    """On recall sequence `index` of data_path, for each answer whose key lies d >= W back: the
    probability of the right value with the fast weight as it stood just before and just after the
    chunk holding the key's earlier occurrence was folded in, and as the forward used it (all else
    as in the forward). The TTT layer must be the last (the recall model's), so its output goes
    straight to the head."""
    model = load_hf.load_model(hf_dir).eval()
    cfg, layer = model.config, model.ttt_layers[-1]
    assert layer == cfg.num_layers - 1, "the TTT layer must be the last one"
    block, C = model.model.layers[layer], cfg.ttt_chunk
    with np.load(data_path) as f:
        lo = index * task.T
        tokens, mask, distance = (f[k][lo:lo + task.T + 1] for k in ("tokens", "loss_mask",
                                                                     "distance"))
    idx = torch.from_numpy(tokens[:-1].astype(np.int64))[None]  # (1, T)
    seen = {}  # the residual after attention and the MLP input of the TTT layer
    hook = block.post_attention_layernorm.register_forward_hook(
        lambda m, args, out: seen.update(r=args[0], x=out))
    model(idx)
    hook.remove()
    mlp, x = block.mlp, seen["x"]
    s = x if cfg.ttt_target == "hidden_states" else model.model.embed_tokens(idx)
    h = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # (1, T, F)
    w0, conv_w, P, lr = mlp._ttt_weights()
    S = [torch.zeros_like(w0)]  # S_i: the updates of chunks 0..i-1, (D, F)
    for c in range(task.T // C):
        S.append(S[-1] + ttt.chunk_update(s[:, c * C:(c + 1) * C], h[:, c * C:(c + 1) * C],
                                          conv_w, P, lr)[0])

    def p(t, S_i):  # the head's probability of the answer at t, fast weight W0 + S_i
        y = seen["r"][0, t] + h[0, t] @ (w0 + S_i).T  # (D,)
        return model.lm_head(model.model.norm(y)).softmax(-1)[int(tokens[t + 1])].item()

    rows = []
    for t in np.flatnonzero(mask[1:]):  # logits at t predict the answer at t + 1
        d = int(distance[t + 1])
        if d >= task.W:  # the key at t occurred before at t - d, in chunk (t - d) // C
            j = (t - d) // C
            rows.append({"t": int(t), "d": d, "before": p(t, S[j]), "after": p(t, S[j + 1]),
                         "used": p(t, S[t // C])})
    return rows
