"""In-Place Test-Time Training: the MLP's down projection as a fast weight.

All of the method lives here: the state, the token loop (`naive`), the chunked scan for training
and prefill (`chunked`), and decoding (`decode_step`, `fold`). model.py only calls these, and
parallel.py, for a sequence split over ranks, only `updates` and `chunked`'s initial_state.

Notation (every shape comment in this file uses it)
    B batch, T tokens in this call, D hidden size, F intermediate size, C chunk size,
    N number of chunks in a call, η learning rate (`lr`).
    W0   = mlp.down_proj.weight, (D, F): the slow weight the fast weight starts from.
    H    = silu(x Wgᵀ) ⊙ (x Wuᵀ), (B, T, F): the SwiGLU activations that feed down_proj.
    s    = target source, (B, T, D): the MLP input x or the token embeddings.
    V̂    = Conv1D(s) P, (B, T, D): the target, aligned with the next tokens by the conv.
    ΔW_i = η V̂_iᵀ H_i, (D, F): chunk i's update, one gradient step on the loss −⟨H Wᵀ, V̂⟩_F.
    S_i  = Σ_{j<i} ΔW_j, (B, D, F): all updates folded in before chunk i (one per sequence).

The equations
    Tokens form chunks of C at absolute positions [0, C), [C, 2C), ... For chunk i:
        U_i     = depthwise conv of s_i, kernel 5, taps t−2..t+2, zero padded at the chunk's edges
        V̂_i     = U_i P                 P = ttt_proj.weight as stored (U P, not U Pᵀ); P = I if absent
        Y_i     = H_i (W0 + S_i)ᵀ       apply: the chunk reads the weights from before it,
        S_{i+1} = S_i + ΔW_i            update: then writes its own for the chunks after it.
    Chunk 0 sees W0 alone. The conv looks two tokens ahead, but only within the chunk, and the
    chunk's update is used by later chunks only, so no output depends on its own or future tokens.
    A chunk still open when a call ends is applied but not folded in: its tokens wait in TTTState
    until a later call completes it, so splitting a sequence into calls changes nothing.
    (`centre_tap` keeps only the conv's middle tap: V̂_t then depends on s_t alone, the classic
    "reconstruct the current token" objective the paper argues against; a study option.)

Why the chunked scan equals the token loop
    `naive` walks the tokens: token t uses W = W0 + S with the S current at t, and when t completes
    a chunk it folds in that chunk's ΔW. Between two folds W does not change, so every token of
    chunk i meets the same matrix W0 + S_i: y_t = h_t (W0 + S_i)ᵀ for each row t, i.e.
    Y_i = H_i (W0 + S_i)ᵀ, one matmul per chunk. ΔW_i depends on chunk i's own tokens only (the
    conv is zero padded at the chunk edges), so V̂ for all chunks comes from one batched conv;
    only the prefix sum S_i is sequential. `chunked` does the same arithmetic per token as the
    loop, grouped differently, and the tests check the two agree to fp64 rounding.

Decoding is naive's loop body
    The same steps for one token per row, each row at its own position, in the compute dtype
    where `naive` uses fp32. `decode_step` applies W = W0 + S, kept in the state in the compute
    dtype so the step costs a plain MLP's bmm, writes the token into slot pos mod C of fixed
    C-slot buffers (static shapes: the step compiles, and replays as a CUDA graph) and advances
    pos. When a row's token completes its chunk, `fold` adds that chunk's ΔW (`chunk_update`, as
    in `naive`) and refreshes the row's W. Which rows fold is data dependent, so the caller runs
    `fold` eagerly, after the compiled step. The tests check decode_step + fold against `naive`
    token for token, with rows at different positions folding at their own chunk boundaries.

Memory design
    The parallel form in the official code stacks S_1..S_N, (N, D, F): for Qwen3-8B (D=4096,
    F=12288) at T=128K and C=512 that is 256 × 50M fp32 numbers, 51 GB per layer. `_ChunkScan`
    keeps one running S, saves only its inputs and the final S, and in backward walks the chunks
    in reverse, recovering S_i = S_{i+1} − ΔW_i. With G_i = ∂L/∂Y_i and A_i = ∂L/∂S_i:
        ∂L/∂H_i  = G_i (W0 + S_i) + V̂_i A_{i+1}     (from Y_i, and from ΔW_i = V̂_iᵀ H_i)
        ∂L/∂V̂_i  = H_i A_{i+1}ᵀ
        A_i      = A_{i+1} + G_iᵀ H_i               (S_i feeds Y_i and, via S_{i+1}, all after)
        ∂L/∂W0   = Σ_i G_iᵀ H_i = A_0 − A_N (summed over the batch),   ∂L/∂S_0 = A_0.
    Extra memory is a few (B, D, F) tensors whatever T is; extra compute is one matmul per chunk
    in forward (ΔW_i) and three in backward, each the size of the down projection's.

The state across ranks (context parallelism)
    Split a sequence of R·T tokens into R contiguous shards, rank r holding tokens [rT, (r+1)T),
    with T a whole number of chunks so that no chunk straddles two ranks. ΔW_i depends on chunk
    i's own tokens only (the conv is zero padded at the chunk's edges), never on S. So rank r forms
    the sum of its own chunks' updates without knowing what came before (`updates`: one matmul
    V̂ᵀH over the shard, no scan),
        Σ_r = Σ_{i in shard r} ΔW_i,
    and the state its first chunk reads is the exclusive prefix over the ranks
        S0_r = Σ_{j<r} Σ_j.
    That is the whole state at position rT (no open chunk), so `chunked` with initial_state = S0_r
    runs the shard exactly as the one-rank scan runs it from that point: the same W0 + S_i, rounded
    once per chunk. parallel.py exchanges the Σ_j (one (B, D, F) per TTT layer, whatever T is, in
    ⌈log2 R⌉ rounds) and hands the state in through MLP.incoming_state.
    Backward: _ChunkScan already returns ∂L/∂S0_r (A_0). Σ_j reaches every later rank's S0, so
        ∂L/∂Σ_j = Σ_{r>j} ∂L/∂S0_r          (the same exchange, run towards rank 0),
    and Σ_j = V̂ᵀH carries it into V̂ and H of every chunk of shard j.
    Costs, in the TTT layers only: forward V̂ (the conv and P) twice and one matmul V̂ᵀH, backward
    two (H A, V̂ A), each the size of the down projection's; V̂ (B, T, D) is kept once more for the
    backward. In fp32 or fp64 the outputs equal the one-rank scan's to rounding (the same sums,
    grouped differently); in bf16 Σ_r is rounded once, as the one-rank scan rounds each chunk's ΔW
    (tests/test_cp.py bounds the error against the fp64 loop by the one-rank scan's).

Stabilisers (options, all off by default: off is the arithmetic above, bit for bit)
    Each changes one step of the equations; none makes a chunk's output depend on later tokens.
    target_norm  s_t / rms(s_t) before the conv (per token, no weight, eps 1e-6): ρ, ΔW's size per
                 unit of conv weight, no longer grows with the activations. [issue #24; the study]
    key_norm     ΔW_i = η V̂_iᵀ Ĥ_i with Ĥ's rows h_t / ‖h_t‖ (eps 1e-6 inside the sqrt, as fla's
                 l2norm); the apply keeps raw H. [DeltaNet; LaCT normalise keys]
    clip_tau     ΔW_i scaled to Frobenius norm ≤ τ. [the paper, Appendix C: τ = 1e-5 on Qwen3-4B]
    norm_preserve  W_{i+1} = ‖W0's rows‖ ⊙ rows of (W_i + ΔW_i) at unit norm. [LaCT]
    (η warm-up is no arithmetic here: model.py scales the η it passes, during training only.)
    The first three change ΔW_i only, and ΔW_i is still a function of chunk i's own tokens: the
    scan's S_{i+1} = S_i + ΔW_i, the loop's fold, the decode fold and the ranks' sums Σ_r all add
    the same ΔW_i, so everything above holds as derived. Only _ChunkScan's closed-form backward
    assumed ΔW_i = V̂_iᵀ H_i bilinear: with key_norm or clip_tau it takes A_{i+1} = ∂L/∂ΔW_i as
    before and pushes it through the chunk's function by autograd, recomputed per chunk.
    norm_preserve makes S_{i+1} a nonlinear function of S_i: the per-chunk loop still equals the
    token loop (W changes only at folds, and every path folds with the same `_renorm`), but
    S_i = S_{i+1} − ΔW_i no longer recovers S_i, so `chunked` runs it as an autograd loop
    (memory per chunk, see `_scan_renorm`), and a shard's state is no sum of the earlier shards'
    Σ_r, so context parallelism refuses it (parallel.py).

About precision
    S is a sum of up to T/C small updates on top of W0. In bf16 (8-bit mantissa) an update under
    2⁻⁹ of |S| is rounded away entirely and larger ones lose their low bits, so over hundreds of
    chunks the fast weight drifts. S therefore lives in fp32 (`fp32_state=True`, the default) and
    is rounded to the compute dtype once per chunk, in W = W0 + S_i, right before the matmul: in
    `chunked` per chunk, in decoding once per fold (the state's W), the same rounding both ways.
    The matmuls run in the input dtype (bf16 on GPU, fp32 accumulation inside the kernel). The
    backward's S_i = S_{i+1} − ΔW_i differs from the forward's by fp32 rounding (~1e-7 relative),
    far below the bf16 rounding of W. `naive` computes in fp32 (fp64 for fp64 inputs).
"""

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import conv1d, pad


# -----------------------------------------------------------------------------
# The state: one layout for training, prefill and decoding


@dataclass
class TTTState:
    """Where each row stands after some tokens: everything needed to continue it exactly.

    The open chunk lives in C fixed slots (slot = position mod C), so a decode step writes into
    the same tensors at every position. Slots at and past pos mod C are zero or stale: never read.
    """

    dW: Tensor  # (B, D, F) S after each row's last complete chunk, in the state dtype (fp32)
    s_buf: Tensor  # (B, C, D) target source of the open chunk, in slots 0 .. pos mod C − 1
    h_buf: Tensor  # (B, C, F) its activations, so its ΔW can be formed once it completes
    pos: Tensor  # (B,) int64 tokens each row has seen; the chunk grid is anchored at position 0
    W: Tensor | None = None  # (B, D, F) W0 + dW in the compute dtype, read by decode_step only

    def rows(self, b0, b1) -> "TTTState":
        """A view of rows [b0, b1): writes through (prefill a ragged batch one row at a time)."""
        W = None if self.W is None else self.W[b0:b1]
        return TTTState(self.dW[b0:b1], self.s_buf[b0:b1], self.h_buf[b0:b1], self.pos[b0:b1], W)

    def copy_(self, other: "TTTState") -> None:
        """Overwrite in place, so views from `rows` and compiled graphs see the new values."""
        for mine, theirs in zip(self._tensors(), other._tensors(), strict=True):
            mine.copy_(theirs)

    def detach(self) -> "TTTState":
        """The same values without autograd history (what MLP.keep_state keeps)."""
        W = None if self.W is None else self.W.detach()
        return TTTState(self.dW.detach(), self.s_buf.detach(), self.h_buf.detach(), self.pos, W)

    def _tensors(self):
        return [t for t in (self.dW, self.s_buf, self.h_buf, self.pos, self.W) if t is not None]


def _state_dtype(dtype, fp32_state):
    # fp32 (fp64 for fp64 inputs) unless the caller asks for the input dtype; see "About precision".
    return torch.promote_types(dtype, torch.float32) if fp32_state else dtype


def init_state(w0, batch, chunk, dtype=None, device=None, fp32_state=True,
               decode=False) -> TTTState:
    """The state at position 0 for `batch` rows: no updates yet, an empty open chunk.

    w0 (D, F). dtype: the compute dtype of the buffers and of W (default w0's); dW is kept in fp32
    unless fp32_state=False. decode=True adds W = W0, which decode_step reads.
    """
    (D, F), dtype, device = w0.shape, dtype or w0.dtype, device or w0.device
    zeros = lambda *shape, dt=dtype: torch.zeros(*shape, device=device, dtype=dt)
    W = w0.detach().to(device, dtype).expand(batch, D, F).clone() if decode else None
    return TTTState(zeros(batch, D, F, dt=_state_dtype(dtype, fp32_state)), zeros(batch, chunk, D),
                    zeros(batch, chunk, F), zeros(batch, dt=torch.long), W)


def _common_position(state, chunk, who):
    """The one position all rows share: naive and chunked step the whole batch on one grid."""
    if state.s_buf.shape[1] != chunk:
        raise ValueError(f"{who}: the state buffers chunks of {state.s_buf.shape[1]} tokens, "
                         f"but chunk={chunk}")
    lo, hi = torch.stack([state.pos.min(), state.pos.max()]).tolist()  # one host sync
    if lo != hi:
        raise ValueError(f"{who}: rows are at positions {lo}..{hi}; a multi-token call needs all "
                         "rows at one position (decode_step takes rows at different positions)")
    return lo


def _after(state, dW, s_open, h_open, pos, w0):
    """The state after a call: the open chunk's tokens zero padded into C slots, W refreshed
    if the state carries one (pad copies, so no slice keeps a call's (B, T, F) tensor alive)."""
    C, n = state.s_buf.shape[1], s_open.shape[1]
    W = None if state.W is None else (w0 + dW).to(state.W.dtype)
    return TTTState(dW, pad(s_open, (0, 0, 0, C - n)), pad(h_open, (0, 0, 0, C - n)), pos, W)


# -----------------------------------------------------------------------------
# Targets and updates of complete chunks, shared by every path


def centre_tap(conv_w):
    """conv_w (D, 1, K) with every tap but the centre one zeroed (ttt_lookahead=False).

    A product with a fixed mask, so the masked taps also get zero gradient and stay unused.
    """
    mask = torch.zeros(conv_w.shape[-1], device=conv_w.device, dtype=conv_w.dtype)
    mask[conv_w.shape[-1] // 2] = 1
    return conv_w * mask  # (D, 1, K)


# eps of the two normalisations ("Stabilisers"), added to a mean or sum of squares in fp32 (fla's
# l2norm uses 1e-6 so): it keeps an all-zero row (a padded token) at zero instead of 0/0 and is far
# below a real token's mean square of s (about 1 after the block's RMSNorm) or squared norm of H
# (a sum over F). A token whose H is near zero is not blown up to unit norm, only left small.
TARGET_NORM_EPS = 1e-6
KEY_NORM_EPS = 1e-6


def _rescaled(x, sq, eps):
    """x (..., K) times 1/sqrt(sq + eps), sq (..., 1) formed in fp32 (fp64 for fp64 x)."""
    return x * torch.rsqrt(sq + eps).to(x.dtype)


def _rms_rows(s):
    """Each token's s (..., D) at unit RMS, no weight (ttt_target_norm)."""
    f = s.to(torch.promote_types(s.dtype, torch.float32))
    return _rescaled(s, f.pow(2).mean(-1, keepdim=True), TARGET_NORM_EPS)


def _unit_rows(h):
    """Each token's H row (..., F) at unit L2 norm (ttt_key_norm)."""
    f = h.to(torch.promote_types(h.dtype, torch.float32))
    return _rescaled(h, f.pow(2).sum(-1, keepdim=True), KEY_NORM_EPS)


def _targets(s, conv_w, proj_w, lr, dtype, target_norm=False):
    """η V̂ of complete chunks: s (..., C, D) -> (..., C, D), computed in `dtype`."""
    shape, (C, D) = s.shape, s.shape[-2:]
    s = _rms_rows(s.to(dtype)) if target_norm else s  # per token: chunk edges play no part
    u = s.to(dtype).reshape(-1, C, D).transpose(1, 2)  # (B·N, D, C): conv1d wants channels first
    # Each chunk is its own conv input, so the zero padding falls at the chunk's edges.
    u = conv1d(u, conv_w.to(dtype), padding=conv_w.shape[-1] // 2, groups=D)  # (B·N, D, C)
    u = u.transpose(1, 2).reshape(shape)  # (..., C, D) U
    v = u if proj_w is None else u @ proj_w.to(dtype)  # (..., C, D) V̂ = U P
    return v * lr  # η is folded into the target once, so ΔW = vᵀ H everywhere below


def _clip(dW, tau):
    """Rescale each sequence's ΔW (..., D, F) to Frobenius norm tau when it is larger."""
    norm = torch.linalg.matrix_norm(dW.to(torch.promote_types(dW.dtype, torch.float32)))  # (...,)
    # tau / max(norm, tau): 1 exactly at or under tau, and a finite gradient at ΔW = 0 (where
    # tau / norm clamped to 1 gives 0 · inf = nan), so training can start from a zero conv.
    return dW * (tau / norm.clamp(min=tau)).to(dW.dtype)[..., None, None]


def _delta(v, h, clip_tau, key_norm=False):
    """ΔW = vᵀ H (vᵀ Ĥ with key_norm) for chunk(s): v (..., C, D), h (..., C, F) -> (..., D, F)."""
    dW = v.transpose(-1, -2) @ (_unit_rows(h) if key_norm else h)  # (..., D, F) over C tokens
    return dW if clip_tau is None else _clip(dW, clip_tau)


def _renorm(w0, S):
    """S after ttt_norm_preserve's step: W = W0 + S (B, D, F) with each row rescaled to the norm of
    W0's row, returned as W − W0 in S's dtype. r / ‖W0 + 0‖ is r / r = 1 exactly, so a zero update
    leaves S = 0 exactly (a converted model stays the base model)."""
    w0 = w0.to(S.dtype)
    W = w0 + S  # (B, D, F)
    r, n = torch.linalg.vector_norm(w0, dim=-1), torch.linalg.vector_norm(W, dim=-1)  # (D,), (B, D)
    # A zero row keeps norm 0 (r = 0) or stays 0 (n = 0): tiny only avoids 0/0.
    return W * (r / n.clamp(min=torch.finfo(S.dtype).tiny))[..., None] - w0


def chunk_update(s_c, h_c, conv_w, proj_w, lr, clip_tau=None, key_norm=False, target_norm=False):
    """ΔW of complete chunk(s): s_c (..., C, D), h_c (..., C, F) -> (..., D, F) in h_c's dtype."""
    v = _targets(s_c, conv_w, proj_w, lr, h_c.dtype, target_norm)  # (..., C, D)
    return _delta(v, h_c, clip_tau, key_norm)


def updates(h, s, conv_w, proj_w, lr, chunk, clip_tau=None, fp32_state=True, key_norm=False,
            target_norm=False):
    """Σ ΔW over whole chunks h (B, T, F), s (B, T, D), T a multiple of C -> (B, D, F) in the state
    dtype: what these tokens add to any state, computed without the scan (ΔW never depends on S).
    Without clipping the sum over chunks is one matmul over all T tokens."""
    (B, T, F), D = h.shape, s.shape[-1]
    v = _targets(s.reshape(B, T // chunk, chunk, D), conv_w, proj_w, lr, h.dtype,
                 target_norm)  # (B, N, C, D)
    if clip_tau is None:  # Ĥ's rows are per token, so key_norm keeps the single matmul
        dW = v.reshape(B, T, D).transpose(1, 2) @ (_unit_rows(h) if key_norm else h)  # (B, D, F)
    else:  # each chunk's ΔW clipped on its own
        dW = _delta(v, h.reshape(B, T // chunk, chunk, F), clip_tau, key_norm).sum(1)  # (B, D, F)
    return dW.to(_state_dtype(h.dtype, fp32_state))


# -----------------------------------------------------------------------------
# The naive path: a token loop that reads like the paper (the test oracle)


def naive(h, s, w0, conv_w, proj_w, lr, chunk, initial_state=None, clip_tau=None, fp32_state=True,
          key_norm=False, target_norm=False, norm_preserve=False):
    """Apply-then-update TTT, one token at a time, in fp32 (fp64 for fp64 inputs).

    h (B, T, F), s (B, T, D), w0 (D, F), conv_w (D, 1, 5), proj_w (D, D) or None.
    All rows start at one position. Returns out (B, T, D) in h's dtype and the state after.
    clip_tau, key_norm, target_norm, norm_preserve: the stabilisers (module docstring).
    """
    B, T, F = h.shape
    D = s.shape[-1]
    f = torch.promote_types(h.dtype, torch.float32)
    sdtype = _state_dtype(h.dtype, fp32_state)
    fresh = initial_state is None  # a sequence from position 0
    state = init_state(w0, B, chunk, h.dtype, h.device, fp32_state) if fresh else initial_state
    p = _common_position(state, chunk, "naive")
    S = state.dW.to(sdtype)  # (B, D, F) updates of the complete chunks so far
    s_buf, h_buf = state.s_buf[:, :p % chunk].to(f), state.h_buf[:, :p % chunk].to(f)  # open chunk
    W = w0.to(f) + S.to(f)  # (B, D, F) the fast weight every token reads
    ys = []
    for t in range(T):
        h_t = h[:, t].to(f)  # (B, F)
        ys.append(torch.einsum("bf,bdf->bd", h_t, W))  # (B, D) y_t = W h_t
        s_buf = torch.cat([s_buf, s[:, t, None].to(f)], dim=1)  # (B, n+1, D)
        h_buf = torch.cat([h_buf, h_t[:, None]], dim=1)  # (B, n+1, F)
        if (p + t + 1) % chunk == 0:  # token t completes a chunk: fold in its update
            dW = chunk_update(s_buf, h_buf, conv_w, proj_w, lr, clip_tau, key_norm, target_norm)
            S = (S + dW).to(sdtype)
            S = _renorm(w0, S) if norm_preserve else S
            W = w0.to(f) + S.to(f)
            s_buf, h_buf = s_buf[:, :0], h_buf[:, :0]
    out = torch.stack(ys, dim=1) if ys else h.new_zeros(B, 0, D, dtype=f)  # (B, T, D)
    return out.to(h.dtype), _after(state, S, s_buf.to(s.dtype), h_buf.to(h.dtype), state.pos + T, w0)


# -----------------------------------------------------------------------------
# The chunked path: one matmul per chunk and a memory-light backward (training, prefill)


class _ChunkScan(torch.autograd.Function):
    """Y_i = H_i (W0 + S_i)ᵀ, S_{i+1} = S_i + ΔW_i over chunks, saving no per-chunk weight.

    h (B, N, C, F), v = ηV̂ (B, N, C, D), w0 (D, F), S0 (B, D, F) in the state dtype.
    Only the first n_fold chunks are folded into S (the last one may be incomplete).
    Returns Y (B, N, C, D) in h's dtype and the final S (B, D, F).
    clip_tau, key_norm: ΔW_i = clip(V̂_iᵀ Ĥ_i), still additive into S ("Stabilisers").
    """

    @staticmethod
    def forward(ctx, h, v, w0, S0, n_fold, clip_tau, key_norm):
        B, N, C, F = h.shape
        y = h.new_empty(B, N, C, v.shape[-1])  # (B, N, C, D)
        S = S0.clone()  # (B, D, F) running S_i, updated in place
        for i in range(N):
            W = (w0 + S).to(h.dtype)  # (B, D, F) W0 + S_i, rounded to the compute dtype once
            y[:, i] = torch.bmm(h[:, i], W.transpose(1, 2))  # (B, C, D) Y_i = H_i Wᵀ
            if i < n_fold:
                S += _delta(v[:, i], h[:, i], clip_tau, key_norm)  # (B, D, F) S_{i+1}, in S's dtype
        ctx.save_for_backward(h, v, w0, S)
        ctx.n_fold, ctx.clip_tau, ctx.key_norm = n_fold, clip_tau, key_norm
        return y, S

    @staticmethod
    def backward(ctx, gy, gS):
        h, v, w0, S = ctx.saved_tensors
        B, N, C, F = h.shape
        S = S.clone()  # walks back from S_N to S_0
        A = gS.to(S.dtype, copy=True)  # (B, D, F) ∂L/∂S_{i+1}; the final state's own grad first
        dh, dv = torch.empty_like(h), torch.zeros_like(v)  # an unfolded chunk's v gets no grad
        for i in reversed(range(N)):
            h_i, v_i, g_i = h[:, i], v[:, i], gy[:, i]  # (B, C, F), (B, C, D), (B, C, D)
            through_update = 0
            if i < ctx.n_fold:
                S -= _delta(v_i, h_i, ctx.clip_tau, ctx.key_norm)  # (B, D, F) S_i = S_{i+1} − ΔW_i
                A_c = A.to(h.dtype)
                if ctx.clip_tau is None and not ctx.key_norm:  # bilinear ΔW: its grads by hand
                    dv[:, i] = torch.bmm(h_i, A_c.transpose(1, 2))  # (B, C, D) H_i A_{i+1}ᵀ
                    through_update = torch.bmm(v_i, A_c)  # (B, C, F) V̂_i A_{i+1}
                else:
                    dv[:, i], through_update = _delta_vjp(v_i, h_i, A_c, ctx.clip_tau,
                                                          ctx.key_norm)
            W = (w0 + S).to(h.dtype)  # (B, D, F) forward's W (up to fp32 rounding)
            dh[:, i] = torch.bmm(g_i, W) + through_update  # (B, C, F)
            A += torch.bmm(g_i.transpose(1, 2), h_i)  # (B, D, F) A_i = A_{i+1} + G_iᵀ H_i
        # W0 enters exactly where S_i does, in W0 + S_i, so its grad is the sum the loop added to A.
        dw0 = (A - gS).sum(0)  # (D, F) Σ_b Σ_i G_iᵀ H_i = Σ_b (A_0 − A_N)
        return dh, dv, dw0.to(w0.dtype), A, None, None, None


def _delta_vjp(v_i, h_i, A_c, clip_tau, key_norm):
    """(∂L/∂V̂_i, ∂L/∂H_i through ΔW_i) for a nonlinear ΔW_i: A_{i+1} = ∂L/∂ΔW_i (B, D, F) pushed
    back through the chunk's own function, recomputed here (one chunk: no per-chunk memory)."""
    with torch.enable_grad():
        v_, h_ = v_i.detach().requires_grad_(), h_i.detach().requires_grad_()
        dv, dh = torch.autograd.grad(_delta(v_, h_, clip_tau, key_norm), (v_, h_), A_c)
    return dv, dh  # (B, C, D), (B, C, F)


def _scan_renorm(h, v, w0, S0, n_fold, clip_tau, key_norm):
    """_ChunkScan's forward for ttt_norm_preserve, differentiated by autograd: S_{i+1} is not
    S_i + ΔW_i, so the backward cannot recover S_i by subtraction. Autograd keeps each chunk's
    W0 + S_i and the renorm's inputs: about 3 (B, D, F) tensors per chunk in the state dtype."""
    S, ys = S0, []
    for i in range(h.shape[1]):
        ys.append(torch.bmm(h[:, i], (w0 + S).to(h.dtype).transpose(1, 2)))  # (B, C, D)
        if i < n_fold:
            S = _renorm(w0, S + _delta(v[:, i], h[:, i], clip_tau, key_norm).to(S.dtype))
    return torch.stack(ys, dim=1), S  # (B, N, C, D), (B, D, F)


def chunked(h, s, w0, conv_w, proj_w, lr, chunk, initial_state=None, clip_tau=None,
            fp32_state=True, key_norm=False, target_norm=False, norm_preserve=False):
    """The same computation as `naive`, a chunk at a time: the path for training and prefill.

    h (B, T, F), s (B, T, D), w0 (D, F), conv_w (D, 1, 5), proj_w (D, D) or None.
    All rows start at one position. Returns out (B, T, D) in h's dtype and the state after.
    initial_state: where the rows stand (None: position 0); gradients flow into its dW, so it may
    be computed (a later shard of a split sequence: "The state across ranks").
    """
    B, T, F = h.shape
    D, C = s.shape[-1], chunk
    sdtype = _state_dtype(h.dtype, fp32_state)
    fresh = initial_state is None  # a sequence from position 0 (training): no host sync below
    state = init_state(w0, B, C, h.dtype, h.device, fp32_state) if fresh else initial_state
    # Re-run the open chunk's buffered tokens so the grid starts at a chunk boundary, then pad to
    # whole chunks.
    n = 0 if fresh else _common_position(state, C, "chunked") % C
    if n:
        s = torch.cat([state.s_buf[:, :n].to(s.dtype), s], dim=1)  # (B, n+T, D)
        h = torch.cat([state.h_buf[:, :n].to(h.dtype), h], dim=1)  # (B, n+T, F)
    L = n + T
    N, n_fold = -(-L // C), L // C  # chunks touched, chunks complete (folded into S)
    s_p, h_p = (pad(s, (0, 0, 0, N * C - L)), pad(h, (0, 0, 0, N * C - L))) if N * C > L else (s, h)
    v = _targets(s_p.reshape(B, N, C, D), conv_w, proj_w, lr, h.dtype,
                 target_norm)  # (B, N, C, D) ηV̂, at once
    h_c = h_p.reshape(B, N, C, F)  # (B, N, C, F) a view for whole chunks; padded rows add nothing
    if norm_preserve:
        y, S = _scan_renorm(h_c, v, w0, state.dW.to(sdtype), n_fold, clip_tau, key_norm)
    else:
        y, S = _ChunkScan.apply(h_c, v, w0, state.dW.to(sdtype), n_fold, clip_tau, key_norm)
    out = y.view(B, N * C, D)[:, n:L]  # (B, T, D) the buffered tokens' outputs were emitted before
    tail = slice(n_fold * C, L)  # the new open chunk, fewer than C tokens
    return out, _after(state, S, s[:, tail], h[:, tail], state.pos + T, w0)


# -----------------------------------------------------------------------------
# Decoding: naive's loop body for one token per row, rows at their own positions


def decode_step(h, s, state):
    """Apply the fast weight to one token per row and buffer the token, in place.

    h (B, 1, F), s (B, 1, D); state from init_state(..., decode=True), each row at its own pos.
    Returns out (B, 1, D) in W's dtype. Shapes never change, so the step compiles to one graph.
    Rows whose pos is now a multiple of C have completed a chunk: pass them to `fold` next.
    """
    out = torch.bmm(h, state.W.transpose(1, 2))  # (B, 1, F) @ (B, F, D) -> (B, 1, D): a plain MLP
    rows, slot = torch.arange(h.shape[0], device=h.device), state.pos % state.s_buf.shape[1]
    state.s_buf[rows, slot], state.h_buf[rows, slot] = s[:, 0], h[:, 0]  # (B, D), (B, F)
    state.pos.add_(1)
    return out


@torch.compiler.disable  # which rows fold is data dependent: never part of a compiled graph
@torch.no_grad()
def fold(w0, conv_w, proj_w, lr, state, rows, clip_tau=None, key_norm=False, target_norm=False,
         norm_preserve=False):
    """Fold the completed chunk of each row in `rows` (an index tensor) into dW and W, in place.

    Call it once, right after the decode step that completed the chunks (pos mod C == 0): a
    second call would add the same chunk again.
    """
    dW = state.dW[rows] + chunk_update(state.s_buf[rows], state.h_buf[rows], conv_w, proj_w, lr,
                                       clip_tau, key_norm, target_norm).to(state.dW.dtype)
    dW = _renorm(w0, dW) if norm_preserve else dW  # (R, D, F)
    state.dW[rows] = dW
    state.W[rows] = (w0 + dW).to(state.W.dtype)  # rounded once per fold, as chunked does per chunk
