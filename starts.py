"""Where In-Place TTT's new parameters start: the paper's start and this codebase's others.

An extension of the method, not part of it. The paper's start (the official release's: conv 0, P
diagonal N(0, 0.02^2)) lives where the model initialises TTT, model.init_ttt_params; the starts
here came out of study/ (README, "Does In-Place TTT help, and how should it start?") and are picked
with train.py --ttt-init. Reading order: the table of starts, the measurement the calibrated start
needs (update_scale), then start_ttt_params, which sets a start.

Why other starts at all: the target is a product, V_hat = conv(s) P, so each factor's gradient is
scaled by the other. With both at or near zero (the paper's start) the target sits at a saddle and
grows like the product of two small numbers. The other exact starts put one factor at exactly zero,
so V_hat = 0 and the model is still exactly the base model, and the other at full scale, so the
zero factor gets its full gradient at once (as LoRA starts B = 0 beside a full-scale A).

    from starts import start_ttt_params
    start_ttt_params(model, mode="calibrated", batch=idx)   # idx (B, T): token ids to measure on
"""

import math

import torch
import torch.nn.functional as F

import ttt
from model import ModelConfig, Transformer, init_ttt_params, is_ttt_param

# -----------------------------------------------------------------------------
# The starts

# (conv, P) per start. The conv's 5 taps read positions t-2..t+2 (tap 3 reads s_{t+1}, tap 2 reads
# s_t); "target" is the tap the target reads (target_tap).
TTT_INITS = {
    "paper": ("zero", "diag-0.02"),  # the official release's: conv 0, P diagonal N(0, 0.02^2)
    "next-token": ("t+1", "identity"),  # not exact: V_hat_t = s_{t+1} from the first step
    "centre": ("t", "identity"),  # not exact: V_hat_t = s_t, the reconstruction target's start
    "zero-conv": ("zero", "identity"),  # exact; the conv's gradient is the target's, unscaled
    "zero-proj": ("target", "zero"),  # exact; the conv reads the target's own tap (t+1, or t
    # with ttt_lookahead=False), so P's gradient is the target's, unscaled
    "calibrated": ("zero", "calibrated"),  # exact; conv 0, P = I * CALIBRATED_UPDATE / rho
    # (update_scale): a conv weight w on the target's tap makes ‖ΣΔW‖/‖W0‖ about 100 w
}
# The calibrated start's ‖ΣΔW‖/‖W0‖ per unit of conv weight on the target's tap. Adam moves the
# conv by about lr per step, so the fast weight grows by at most ~100 lr of W0 per step, whatever
# the scale of the model's activations. Chosen by probes before the study (README, "Does In-Place
# TTT help?"): from scratch on the recall task 10 and 40 recalled 0.11-0.78 beyond the window, 100
# every binding in 3 of 3 seeds; continuing the quick start's model, 1 to 2000 tried, 100 best
# (zero-conv's P = I is ~2000 there, and spikes).
CALIBRATED_UPDATE = 100.0
# The start model.py itself gives new TTT parameters (init_ttt_params: init_weights, load_model's
# missing ones); every other start is set here, by start_ttt_params.
MODEL_TTT_INIT = "paper"
# The starts whose converted model computes exactly the base model (logits bit for bit).
EXACT_TTT_INITS = tuple(k for k, (conv, P) in TTT_INITS.items() if "zero" in (conv, P))


def ttt_init_problem(cfg: ModelConfig, mode: str) -> str | None:
    """Why `mode` cannot start cfg's TTT layers (a phrase after the mode's name), or None."""
    conv, P = TTT_INITS[mode]
    if conv == "t+1" and not cfg.ttt_lookahead:
        return ("sets the conv's t+1 tap, which ttt_lookahead=False masks to zero: use centre, or "
                "zero-proj (which puts the conv on tap t there)")
    if P == "calibrated" and not (cfg.ttt_lr > 0):  # it divides by the update, zero here
        return (f"scales P by the size of the update, which ttt_lr={cfg.ttt_lr} makes zero: it "
                f"needs a ttt_lr > 0")
    if P in ("zero", "calibrated") and not cfg.ttt_proj:  # V_hat = conv(s): one factor only
        return (f"{'starts P at zero' if P == 'zero' else 'scales P'}, but ttt_proj=False has no "
                f"P (V_hat = conv(s)): there the paper's zero conv is already the exact start "
                f"with a full-scale gradient")
    return None


def target_tap(cfg: ModelConfig) -> int:
    """The conv tap the target reads: t+1 (tap 3) with look-ahead, t (tap 2) without."""
    return 3 if cfg.ttt_lookahead else 2


# -----------------------------------------------------------------------------
# The measurement the calibrated start needs


@torch.no_grad()
def update_scale(model: Transformer, idx) -> dict[int, float]:
    """rho per TTT layer: ‖ΣΔW‖/‖W0‖ over the windows idx (B, T), mean over the windows, for the
    target V_hat_t = s at the target's tap (conv 1 there, P = I), from the activations of the base
    model (W0 alone, as every exact start computes). It spans orders of magnitude: ~0.2 for a
    fresh 2-layer model with embedding targets, ~2000 for a trained one with MLP-input targets."""
    seen = {}
    hooks = [model.model.layers[i].mlp.register_forward_hook(
        lambda mlp, args, out, i=i: seen.update({i: args[0]})) for i in model.ttt_layers]
    enabled, model.ttt_enabled = model.ttt_enabled, False
    try:
        model.hidden(idx)
    finally:
        model.ttt_enabled = enabled
        for hook in hooks:
            hook.remove()
    cfg, T = model.config, idx.shape[1]
    C, n = cfg.ttt_chunk, T // cfg.ttt_chunk
    if n == 0:
        raise ValueError(f"update_scale: windows of {T} tokens hold no chunk of {C}")
    embeds = model.model.embed_tokens(idx)
    scale = {}
    for i, x in seen.items():  # x: the MLP input (B, T, D)
        mlp = model.model.layers[i].mlp
        s = (x if cfg.ttt_target == "hidden_states" else embeds)[:, :n * C]  # (B, nC, D)
        h = (F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))[:, :n * C]  # (B, nC, F)
        conv = torch.zeros_like(mlp.ttt_conv.weight)
        conv[:, :, target_tap(cfg)] = 1.0
        # with the model's key and target norms, so `calibrated` scales the update it will make
        dW = ttt.chunk_update(s.unflatten(1, (n, C)), h.unflatten(1, (n, C)), conv, None,
                              cfg.ttt_lr, key_norm=cfg.ttt_key_norm,
                              target_norm=cfg.ttt_target_norm).sum(1)  # (B, D, F) each window's ΣΔW
        w0 = mlp.down_proj.weight
        scale[i] = (torch.linalg.matrix_norm(dW.float()) / torch.linalg.matrix_norm(w0.float())
                    ).mean().item()
    return scale


# -----------------------------------------------------------------------------
# Setting a start


@torch.no_grad()
def start_ttt_params(model: Transformer, generator=None, mode=MODEL_TTT_INIT, batch=None):
    """TTT parameters as TTT_INITS[mode] says, selected by name, never by shape (o_proj is square
    too). "paper" is model.init_ttt_params (generator: its random diagonal of P); the others draw
    nothing. batch: token ids (B, T) the "calibrated" start measures update_scale on (train.py:
    the run's first batch). Raises ValueError for an unknown mode, one ttt_init_problem refuses,
    or "calibrated" without a batch."""
    if mode not in TTT_INITS:
        raise ValueError(f"TTT init {mode!r}: expected one of {', '.join(TTT_INITS)}")
    if why := ttt_init_problem(model.config, mode):
        raise ValueError(f"TTT init {mode!r} {why}")
    conv, P = TTT_INITS[mode]
    if P == "calibrated" and batch is None:
        raise ValueError("TTT init 'calibrated' measures the update's scale on a batch of token "
                         "ids: pass batch")
    if mode == MODEL_TTT_INIT:  # the paper's start has one home, where the model initialises TTT
        return init_ttt_params(model, generator)
    scale = update_scale(model, batch) if P == "calibrated" else {}
    if not all(math.isfinite(v) and v > 0 for v in scale.values()):  # e.g. activations all zero
        raise ValueError(f"TTT init 'calibrated': the update's size measured on the batch is "
                         f"{scale} per layer; it needs a finite size > 0 to scale P by")
    tap = {"zero": None, "t": 2, "t+1": 3, "target": target_tap(model.config)}[conv]
    for name, p in model.named_parameters():
        if not is_ttt_param(name):
            continue
        p.zero_()
        if name.endswith("ttt_conv.weight") and tap is not None:
            p[:, :, tap] = 1.0  # (D, 1, 5): every channel reads the same position
        elif name.endswith("ttt_proj.weight") and P in ("identity", "calibrated"):
            layer = int(name.split(".")[-4])  # model.layers.{i}.mlp.ttt_proj.weight
            p.diagonal().fill_(CALIBRATED_UPDATE / scale[layer] if scale else 1.0)
