"""In-Place Test-Time Training: the MLP's down projection as a fast weight.

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
        V̂_i     = U_i P                         P = ttt_proj.weight as stored (U P, not U Pᵀ); P = I if absent
        Y_i     = H_i (W0 + S_i)ᵀ               apply: the chunk reads the weights from before it,
        S_{i+1} = S_i + ΔW_i                    update: then writes its own for the chunks after it.
    Chunk 0 sees W0 alone. The conv looks two tokens ahead, but only within the chunk, and the
    chunk's update is used by later chunks only, so no output depends on its own or future tokens.
    A chunk still incomplete when a call ends is applied but not folded in: its tokens wait in
    TTTState until a later call completes it, so splitting a sequence into calls changes nothing.

Why the chunked scan equals the token loop
    `naive` walks the tokens: token t uses W = W0 + S with the S current at t, and when t completes
    a chunk it folds in that chunk's ΔW. Between two folds W does not change, so every token of
    chunk i meets the same matrix W0 + S_i: y_t = h_t (W0 + S_i)ᵀ for each row t, i.e.
    Y_i = H_i (W0 + S_i)ᵀ, one matmul per chunk. ΔW_i depends on chunk i's own tokens only (the
    conv is zero padded at the chunk edges), so V̂ for all chunks comes from one batched conv;
    only the prefix sum S_i is sequential. `chunked` does the same arithmetic per token as the
    loop, grouped differently, and the tests check the two agree to fp64 rounding.

Memory design
    The parallel form in the official code stacks S_1..S_N, (N, D, F): for Qwen3-8B (D=4096,
    F=12288) at T=128K and C=512 that is 256 × 50M fp32 numbers, 51 GB per layer. `_ChunkScan`
    keeps one running S, saves only its inputs and the final S, and in backward walks the chunks
    in reverse, recovering S_i = S_{i+1} − ΔW_i. With G_i = ∂L/∂Y_i and A_i = ∂L/∂S_i:
        ∂L/∂H_i  = G_i (W0 + S_i) + V̂_i A_{i+1}     (from Y_i, and from ΔW_i = V̂_iᵀ H_i)
        ∂L/∂V̂_i  = H_i A_{i+1}ᵀ
        A_i      = A_{i+1} + G_iᵀ H_i               (S_i feeds Y_i and, through S_{i+1}, everything after)
        ∂L/∂W0   = Σ_i G_iᵀ H_i = A_0 − A_N (summed over the batch),   ∂L/∂S_0 = A_0.
    Extra memory is a few (B, D, F) tensors whatever T is; extra compute is one matmul per chunk
    in forward (ΔW_i) and three in backward, each the size of the down projection's.

About precision
    S is a sum of up to T/C small updates on top of W0. In bf16 (8-bit mantissa) an update under
    2⁻⁹ of |S| is rounded away entirely and larger ones lose their low bits, so over hundreds of
    chunks the fast weight drifts. S therefore lives in fp32 (`fp32_state=True`, the default) and
    is rounded to the compute dtype once per chunk, in W_eff = W0 + S_i, right before the matmul.
    The matmuls run in the input dtype (bf16 on GPU, fp32 accumulation inside the kernel). The
    backward's S_i = S_{i+1} − ΔW_i differs from the forward's by fp32 rounding (~1e-7 relative),
    far below the bf16 rounding of W_eff. `naive` computes in fp32 (fp64 for fp64 inputs).
"""

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import conv1d, pad


@dataclass
class TTTState:
    """Where a sequence stands after some tokens: everything needed to continue it exactly."""

    dW: Tensor  # (B, D, F) S after the last complete chunk: the fast weight is W0 + dW
    s_buf: Tensor  # (B, n, D) target source of the incomplete chunk, n = pos mod C (may be 0)
    h_buf: Tensor  # (B, n, F) its activations, so its ΔW can be formed once it completes
    pos: int  # tokens seen so far; the chunk grid is anchored at position 0

    @classmethod
    def zeros(cls, B, D, F, device=None, dtype=torch.float32):
        """The state at position 0: no updates, nothing buffered. `dtype` is dW's dtype."""
        return cls(
            dW=torch.zeros(B, D, F, device=device, dtype=dtype),
            s_buf=torch.zeros(B, 0, D, device=device, dtype=dtype),
            h_buf=torch.zeros(B, 0, F, device=device, dtype=dtype),
            pos=0,
        )


def _state_dtype(dtype, fp32_state):
    # fp32 (or fp64 for fp64 inputs) unless the caller asks for the input dtype; see "About precision".
    return torch.promote_types(dtype, torch.float32) if fp32_state else dtype


# -----------------------------------------------------------------------------
# Targets and updates of complete chunks, shared by both paths and by decoding


def _targets(s, conv_w, proj_w, lr, dtype):
    """η V̂ of complete chunks: s (..., C, D) -> (..., C, D), computed in `dtype`."""
    shape, (C, D) = s.shape, s.shape[-2:]
    u = s.to(dtype).reshape(-1, C, D).transpose(1, 2)  # (B·N, D, C): conv1d wants channels first
    # Each chunk is its own conv input, so the zero padding falls at the chunk's edges.
    u = conv1d(u, conv_w.to(dtype), padding=conv_w.shape[-1] // 2, groups=D)  # (B·N, D, C)
    u = u.transpose(1, 2).reshape(shape)  # (..., C, D) U
    v = u if proj_w is None else u @ proj_w.to(dtype)  # (..., C, D) V̂ = U P
    return v * lr  # η is folded into the target once, so ΔW = vᵀ H everywhere below


def _clip(dW, tau):
    """Rescale each sequence's ΔW (..., D, F) to Frobenius norm tau when it is larger."""
    norm = torch.linalg.matrix_norm(dW.to(torch.promote_types(dW.dtype, torch.float32)))  # (...,)
    return dW * (tau / norm).clamp(max=1.0).to(dW.dtype)[..., None, None]  # a zero ΔW gives inf -> 1


def _delta(v, h, clip_tau):
    """ΔW = vᵀ H for chunk(s): v (..., C, D), h (..., C, F) -> (..., D, F)."""
    dW = v.transpose(-1, -2) @ h  # (..., D, F) summed over the chunk's C tokens
    return dW if clip_tau is None else _clip(dW, clip_tau)


def chunk_update(s_c, h_c, conv_w, proj_w, lr, clip_tau=None):
    """ΔW of complete chunk(s): s_c (..., C, D), h_c (..., C, F) -> (..., D, F) in h_c's dtype.

    The decode step buffers a chunk's tokens and calls this once the chunk completes at its
    absolute position; `naive` does the same.
    """
    return _delta(_targets(s_c, conv_w, proj_w, lr, h_c.dtype), h_c, clip_tau)


# -----------------------------------------------------------------------------
# The naive path: a token loop that reads like the paper (test oracle, decode rule)


def naive(h, s, w0, conv_w, proj_w, lr, chunk, initial_state=None, clip_tau=None, fp32_state=True):
    """Apply-then-update TTT, one token at a time, in fp32 (fp64 for fp64 inputs).

    h (B, T, F), s (B, T, D), w0 (D, F), conv_w (D, 1, 5), proj_w (D, D) or None.
    Returns out (B, T, D) in h's dtype and the TTTState after these T tokens.
    """
    B, T, F = h.shape
    D = s.shape[-1]
    f = torch.promote_types(h.dtype, torch.float32)
    sdtype = _state_dtype(h.dtype, fp32_state)
    state = initial_state if initial_state is not None else TTTState.zeros(B, D, F, h.device, sdtype)
    S = state.dW.to(sdtype)  # (B, D, F) updates of the complete chunks so far
    s_buf, h_buf = state.s_buf.to(f), state.h_buf.to(f)  # (B, n, D), (B, n, F) the chunk in progress
    W = w0.to(f) + S.to(f)  # (B, D, F) the fast weight every token reads
    ys = []
    for t in range(T):
        h_t = h[:, t].to(f)  # (B, F)
        ys.append(torch.einsum("bf,bdf->bd", h_t, W))  # (B, D) y_t = W h_t
        s_buf = torch.cat([s_buf, s[:, t, None].to(f)], dim=1)  # (B, n+1, D)
        h_buf = torch.cat([h_buf, h_t[:, None]], dim=1)  # (B, n+1, F)
        if (state.pos + t + 1) % chunk == 0:  # token t completes a chunk: fold in its update
            S = (S + chunk_update(s_buf, h_buf, conv_w, proj_w, lr, clip_tau)).to(sdtype)
            W = w0.to(f) + S.to(f)
            s_buf, h_buf = s_buf[:, :0], h_buf[:, :0]
    out = torch.stack(ys, dim=1) if ys else h.new_zeros(B, 0, D, dtype=f)  # (B, T, D)
    return out.to(h.dtype), TTTState(S, s_buf.to(s.dtype), h_buf.to(h.dtype), state.pos + T)


# -----------------------------------------------------------------------------
# The chunked path: one matmul per chunk and a memory-light backward (training, prefill)


class _ChunkScan(torch.autograd.Function):
    """Y_i = H_i (W0 + S_i)ᵀ, S_{i+1} = S_i + ΔW_i over chunks, saving no per-chunk weight.

    h (B, N, C, F), v = ηV̂ (B, N, C, D), w0 (D, F), S0 (B, D, F) in the state dtype.
    Only the first n_fold chunks are folded into S (the last one may be incomplete).
    Returns Y (B, N, C, D) in h's dtype and the final S (B, D, F).
    """

    @staticmethod
    def forward(ctx, h, v, w0, S0, n_fold, clip_tau):
        B, N, C, F = h.shape
        y = h.new_empty(B, N, C, v.shape[-1])  # (B, N, C, D)
        S = S0.clone()  # (B, D, F) running S_i, updated in place
        for i in range(N):
            W = (w0 + S).to(h.dtype)  # (B, D, F) W0 + S_i, rounded to the compute dtype once
            y[:, i] = torch.bmm(h[:, i], W.transpose(1, 2))  # (B, C, D) Y_i = H_i W_effᵀ
            if i < n_fold:
                S += _delta(v[:, i], h[:, i], clip_tau)  # (B, D, F) S_{i+1}, accumulated in S's dtype
        ctx.save_for_backward(h, v, w0, S)
        ctx.n_fold = n_fold
        return y, S

    @staticmethod
    def backward(ctx, gy, gS):
        h, v, w0, S = ctx.saved_tensors
        B, N, C, F = h.shape
        S = S.clone()  # walks back from S_N to S_0
        A = gS.to(S.dtype, copy=True)  # (B, D, F) ∂L/∂S_{i+1}; the final state's own grad to start
        dh, dv = torch.empty_like(h), torch.zeros_like(v)  # v of a chunk not folded in gets no grad
        for i in reversed(range(N)):
            h_i, v_i, g_i = h[:, i], v[:, i], gy[:, i]  # (B, C, F), (B, C, D), (B, C, D)
            through_update = 0
            if i < ctx.n_fold:
                S -= _delta(v_i, h_i, None)  # (B, D, F) S_i = S_{i+1} − ΔW_i
                A_c = A.to(h.dtype)
                dv[:, i] = torch.bmm(h_i, A_c.transpose(1, 2))  # (B, C, D) H_i A_{i+1}ᵀ
                through_update = torch.bmm(v_i, A_c)  # (B, C, F) V̂_i A_{i+1}
            W = (w0 + S).to(h.dtype)  # (B, D, F) the same W_eff as forward (up to fp32 rounding)
            dh[:, i] = torch.bmm(g_i, W) + through_update  # (B, C, F)
            A += torch.bmm(g_i.transpose(1, 2), h_i)  # (B, D, F) A_i = A_{i+1} + G_iᵀ H_i
        # W0 enters exactly where S_i does, in W0 + S_i, so its grad is the sum the loop added to A.
        dw0 = (A - gS).sum(0)  # (D, F) Σ_b Σ_i G_iᵀ H_i = Σ_b (A_0 − A_N)
        return dh, dv, dw0.to(w0.dtype), A, None, None


def chunked(h, s, w0, conv_w, proj_w, lr, chunk, initial_state=None, clip_tau=None, fp32_state=True):
    """The same computation as `naive`, a chunk at a time: the path for training and prefill.

    h (B, T, F), s (B, T, D), w0 (D, F), conv_w (D, 1, 5), proj_w (D, D) or None.
    Returns out (B, T, D) in h's dtype and the TTTState after these T tokens.
    """
    B, T, F = h.shape
    D, C = s.shape[-1], chunk
    sdtype = _state_dtype(h.dtype, fp32_state)
    state = initial_state if initial_state is not None else TTTState.zeros(B, D, F, h.device, sdtype)
    if clip_tau is not None and torch.is_grad_enabled():
        leaves = (h, s, w0, conv_w, proj_w, state.dW, state.s_buf, state.h_buf)
        if any(t is not None and t.requires_grad for t in leaves):
            raise NotImplementedError("chunked: clip_tau is inference-only; call it under torch.no_grad()")
    n = state.s_buf.shape[1]  # tokens of the incomplete chunk, emitted by an earlier call
    assert n == state.pos % C, f"state buffers {n} tokens, but pos {state.pos} is {state.pos % C} into a chunk"
    # Re-run the buffered tokens so the grid starts at a chunk boundary, then pad to whole chunks.
    if n:
        s = torch.cat([state.s_buf.to(s.dtype), s], dim=1)  # (B, n+T, D)
        h = torch.cat([state.h_buf.to(h.dtype), h], dim=1)  # (B, n+T, F)
    L = n + T
    N, n_fold = -(-L // C), L // C  # chunks touched, chunks complete (folded into S)
    s_p, h_p = (pad(s, (0, 0, 0, N * C - L)), pad(h, (0, 0, 0, N * C - L))) if N * C > L else (s, h)
    v = _targets(s_p.reshape(B, N, C, D), conv_w, proj_w, lr, h.dtype)  # (B, N, C, D) ηV̂, all chunks at once
    h_c = h_p.reshape(B, N, C, F)  # (B, N, C, F) a view when T is whole chunks; padded H rows add nothing
    y, S = _ChunkScan.apply(h_c, v, w0, state.dW.to(sdtype), n_fold, clip_tau)
    out = y.view(B, N * C, D)[:, n:L]  # (B, T, D) outputs of the buffered tokens were emitted before
    # Copies, so the state does not keep the whole (B, L, F) activation tensor alive.
    tail = slice(n_fold * C, L)
    return out, TTTState(S, s[:, tail].clone(), h[:, tail].clone(), state.pos + T)
