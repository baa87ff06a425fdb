import random

import pytest
import torch
import torch.nn.functional as nnf

import ttt
from ttt import TTTState, chunked, naive

D, F = 6, 10
LR = 0.1
F64 = dict(rtol=1e-10, atol=1e-10)
PATHS = {"naive": naive, "chunked": chunked}


def make_params(seed, D=D, F=F, proj=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(D, F, generator=g, dtype=dtype) / F**0.5
    conv_w = 0.3 * torch.randn(D, 1, 5, generator=g, dtype=dtype)
    proj_w = torch.randn(D, D, generator=g, dtype=dtype) / D**0.5 if proj else None
    return w0, conv_w, proj_w


def make_inputs(seed, B, T, D=D, F=F, target="independent", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 1000)
    if target == "independent":
        return torch.randn(B, T, F, generator=g, dtype=dtype), torch.randn(B, T, D, generator=g, dtype=dtype)
    x = torch.randn(B, T, D, generator=g, dtype=dtype)
    wg, wu = torch.randn(2, F, D, generator=g, dtype=dtype) / D**0.5
    return nnf.silu(x @ wg.T) * (x @ wu.T), x


def reference(h, s, w0, conv_w, proj_w, lr, C):
    """Straight from the equations: per chunk U = conv(s), V̂ = U P, Y = H (W0 + S)ᵀ, S += η V̂ᵀ H."""
    B, T, _ = h.shape
    S = torch.zeros(B, *w0.shape, dtype=h.dtype)
    outs = []
    for start in range(0, T, C):
        h_i, s_i = h[:, start : start + C], s[:, start : start + C]
        n = h_i.shape[1]
        s_pad = nnf.pad(s_i, (0, 0, 2, 2))
        u = sum(conv_w[:, 0, k] * s_pad[:, k : k + n] for k in range(5))
        v = u if proj_w is None else u @ proj_w
        outs.append(h_i @ (w0 + S).transpose(1, 2))
        if n == C:
            S = S + lr * v.transpose(1, 2) @ h_i
    return torch.cat(outs, dim=1), S


def shape_cases():
    cases = []
    for C in (1, 2, 3, 8, 16):
        lengths = {"T<C": C - 1, "T=C": C, "T=kC": 3 * C, "T=kC+r": 2 * C + (C + 1) // 2}
        for name, T in lengths.items():
            if 0 < T and (name != "T=kC+r" or C > 1):
                cases.append(pytest.param(C, T, id=f"C{C}-{name}"))
    return cases


def run(path, h, s, params, C, **kw):
    w0, conv_w, proj_w = params
    return PATHS[path](h, s, w0, conv_w, proj_w, LR, C, **kw)


def open_chunk(state):
    """The open chunk's buffered tokens (s, h), every row at one position."""
    n = int(state.pos[0]) % state.s_buf.shape[1]
    return state.s_buf[:, :n], state.h_buf[:, :n]


def assert_states_close(a, b, **tol):
    torch.testing.assert_close(a.dW, b.dW, **tol)
    torch.testing.assert_close(a.s_buf, b.s_buf, **tol)
    torch.testing.assert_close(a.h_buf, b.h_buf, **tol)
    assert torch.equal(a.pos, b.pos)


@pytest.mark.parametrize("proj", [True, False], ids=["proj", "noproj"])
@pytest.mark.parametrize("B", [1, 3], ids=["B1", "B3"])
@pytest.mark.parametrize("C,T", shape_cases())
def test_naive_matches_equations(C, T, B, proj):
    h, s = make_inputs(0, B, T)
    params = make_params(0, proj=proj)
    out, state = run("naive", h, s, params, C)
    ref_out, ref_S = reference(h, s, *params, LR, C)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(state.dW, ref_S, **F64)
    torch.testing.assert_close(open_chunk(state)[0], s[:, T // C * C :])
    torch.testing.assert_close(open_chunk(state)[1], h[:, T // C * C :])
    assert (state.pos == T).all()


@pytest.mark.parametrize("target", ["independent", "same_x"])
@pytest.mark.parametrize("proj", [True, False], ids=["proj", "noproj"])
@pytest.mark.parametrize("B", [1, 3], ids=["B1", "B3"])
@pytest.mark.parametrize("C,T", shape_cases())
def test_chunked_matches_naive(C, T, B, proj, target):
    results = {}
    for path in PATHS:
        if target == "independent":
            h, s = make_inputs(1, B, T)
            leaves = [h.requires_grad_(), s.requires_grad_()]
        else:
            g = torch.Generator().manual_seed(1)
            x = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
            wg, wu = (torch.randn(F, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
            h, s = nnf.silu(x @ wg.T) * (x @ wu.T), x
            leaves = [x, wg, wu]
        params = [p.requires_grad_() if p is not None else None for p in make_params(1, proj=proj)]
        out, state = run(path, h, s, params, C)
        g = torch.Generator().manual_seed(2)
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
        loss = loss + (state.dW * torch.randn(state.dW.shape, generator=g, dtype=out.dtype)).sum()
        inputs = [t for t in leaves + params if t is not None]
        grads = torch.autograd.grad(loss, inputs, materialize_grads=True)
        results[path] = out.detach(), state, grads
    (out_n, state_n, grads_n), (out_c, state_c, grads_c) = results["naive"], results["chunked"]
    torch.testing.assert_close(out_c, out_n, **F64)
    assert_states_close(state_c, state_n, **F64)
    for g_c, g_n in zip(grads_c, grads_n, strict=True):
        torch.testing.assert_close(g_c, g_n, **F64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("C", [1, 3, 8])
@pytest.mark.parametrize("path", ["naive", "chunked"])
def test_split_calls_equal_one_call(path, C, seed):
    B, T = 2, 37
    h, s = make_inputs(seed, B, T)
    params = [p.requires_grad_() for p in make_params(seed)]
    weights = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def outputs_and_grads(cuts):
        hh, ss = h.clone().requires_grad_(), s.clone().requires_grad_()
        state, outs = None, []
        for a, b in zip([0, *cuts], [*cuts, T]):
            out, state = run(path, hh[:, a:b], ss[:, a:b], params, C, initial_state=state)
            outs.append(out)
        out = torch.cat(outs, dim=1)
        grads = torch.autograd.grad((out * weights).sum() + state.dW.sum(), [hh, ss, *params])
        return out, state, grads

    cuts = sorted(random.Random(seed).sample(range(1, T), 4))
    out_1, state_1, grads_1 = outputs_and_grads([])
    out_k, state_k, grads_k = outputs_and_grads(cuts)
    torch.testing.assert_close(out_k, out_1, **F64)
    assert_states_close(state_k, state_1, **F64)
    for g_k, g_1 in zip(grads_k, grads_1, strict=True):
        torch.testing.assert_close(g_k, g_1, **F64)


def test_chunked_gradcheck_with_carried_state():
    B, T, D, F, C = 2, 5, 3, 4, 3
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    h, s, w0, conv_w, proj_w = rand(B, T, F), rand(B, T, D), rand(D, F), rand(D, 1, 5), rand(D, D)
    dW0, s_buf, h_buf = rand(B, D, F), rand(B, C, D), rand(B, C, F)

    def f(h, s, w0, conv_w, proj_w, dW0, s_buf, h_buf):
        state = TTTState(dW0, s_buf, h_buf, pos=torch.full((B,), C + 2))
        out, final = chunked(h, s, w0, conv_w, proj_w, 0.5, C, initial_state=state)
        return out, final.dW, final.h_buf

    assert torch.autograd.gradcheck(f, (h, s, w0, conv_w, proj_w, dW0, s_buf, h_buf))


@pytest.mark.parametrize("fp32_state", [True, False], ids=["fp32_state", "bf16_state"])
def test_bf16_chunked_close_to_fp32_naive(fp32_state):
    B, T, D, F, C = 2, 256, 32, 64, 16
    h, s = make_inputs(3, B, T, D, F, dtype=torch.float32)
    params = make_params(3, D, F, dtype=torch.float32)
    ref_out, ref_state = naive(h, s, *params, 0.01, C)
    bf = [p.bfloat16() for p in params]
    out, state = chunked(h.bfloat16(), s.bfloat16(), *bf, 0.01, C, fp32_state=fp32_state)
    assert out.dtype == torch.bfloat16
    assert state.dW.dtype == (torch.float32 if fp32_state else torch.bfloat16)
    rel_out = (out.float() - ref_out).norm() / ref_out.norm()
    rel_dW = (state.dW.float() - ref_state.dW).norm() / ref_state.dW.norm()
    assert rel_out < 1e-2, rel_out
    assert rel_dW < 2e-2, rel_dW


def test_fp32_state_keeps_small_updates_that_bf16_state_rounds_away():
    B, T, D, F, C = 1, 1024, 16, 32, 2
    h, s, *params = (t.bfloat16() for t in (*make_inputs(4, B, T, D, F), *make_params(4, D, F)))
    _, exact = naive(h.double(), s.double(), *(p.double() for p in params), 1e-3, C)
    errors = {}
    for fp32_state in (True, False):
        _, state = chunked(h, s, *params, 1e-3, C, fp32_state=fp32_state)
        errors[fp32_state] = ((state.dW.double() - exact.dW).norm() / exact.dW.norm()).item()
    assert errors[True] * 3 < errors[False], errors


def clip_reference(h, s, w0, conv_w, proj_w, lr, C, tau):
    B, T, _ = h.shape
    S, outs = torch.zeros(B, *w0.shape, dtype=h.dtype), []
    for start in range(0, T, C):
        h_i, s_i = h[:, start : start + C], s[:, start : start + C]
        outs.append(h_i @ (w0 + S).transpose(1, 2))
        if h_i.shape[1] == C:
            u = nnf.conv1d(s_i.transpose(1, 2), conv_w, padding=2, groups=w0.shape[0]).transpose(1, 2)
            dW = lr * (u @ proj_w).transpose(1, 2) @ h_i
            for b in range(B):
                norm = torch.linalg.norm(dW[b])
                if norm > tau:
                    dW[b] = dW[b] * tau / norm
            S = S + dW
    return torch.cat(outs, dim=1), S


def test_clip_tau_naive_matches_reference_and_chunked():
    B, T, C = 3, 29, 4
    h, s = make_inputs(5, B, T)
    params = make_params(5)
    whole = T // C * C
    deltas = ttt.chunk_update(s[:, :whole].unflatten(1, (-1, C)), h[:, :whole].unflatten(1, (-1, C)), *params[1:], LR)
    norms = torch.linalg.matrix_norm(deltas)
    tau = norms.median().item()
    assert (norms > tau).any() and (norms < tau).any()
    out, state = naive(h, s, *params, LR, C, clip_tau=tau)
    ref_out, ref_S = clip_reference(h, s, *params, LR, C, tau)
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(state.dW, ref_S, **F64)
    assert not torch.allclose(state.dW, reference(h, s, *params, LR, C)[1])
    with torch.no_grad():
        out_c, state_c = chunked(h, s, *params, LR, C, clip_tau=tau)
    torch.testing.assert_close(out_c, out, **F64)
    assert_states_close(state_c, state, **F64)


def saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_chunked_saves_nothing_per_chunk():
    B, T, D, F = 1, 64, 16, 32
    h, s = make_inputs(7, B, T, D, F, dtype=torch.float32)
    params = [p.requires_grad_() for p in make_params(7, D, F, dtype=torch.float32)]
    h.requires_grad_()
    by_chunk = {C: saved_bytes(lambda C=C: chunked(h, s, *params, LR, C)) for C in (64, 8, 1)}
    assert len(set(by_chunk.values())) == 1, by_chunk
    assert by_chunk[1] < (T // 1) * D * F * 4


@pytest.mark.parametrize("path", ["naive", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_zero_conv_is_plain_mlp(path, dtype):
    h, s = make_inputs(8, 2, 21, dtype=dtype)
    w0, conv_w, proj_w = make_params(8, dtype=dtype)
    out, state = PATHS[path](h, s, w0, torch.zeros_like(conv_w), proj_w, LR, 4)
    assert not state.dW.any()
    torch.testing.assert_close(out, h @ w0.T)


U_BF16 = 2**-9  # bf16 unit roundoff: one rounding moves a value by at most this fraction


def test_bf16_chunked_fp32_state_over_256_chunks_stays_at_the_rounding_floor():
    """Stands in for GPU training and prefill: bf16 inputs and matmuls, the fp32 state.

    The floor is the error of the exact fp32 loop run on the bf16-rounded inputs, which no bf16
    implementation can beat. On top of it, `chunked` rounds W = W0 + S once per chunk, each output
    once, and each chunk's V̂ and ΔW a few times; each rounding moves a value by at most
    U_BF16 = 2⁻⁹ relative, and with S in fp32 none of them compound across chunks, so 2·U_BF16
    above the floor is a bound with room. A bf16 state rounds S again at each of the 256 updates
    and drifts past that bound (about 10·U_BF16 on ΣΔW here), which the test checks as well, so the
    bound is tight enough to catch the failure it guards against.
    """
    B, T, D, F, C, lr = 2, 512, 16, 32, 2, 0.02
    h, s = make_inputs(3, B, T, D, F, dtype=torch.float32)
    params = make_params(3, D, F, dtype=torch.float32)
    bf = [p.bfloat16() for p in params]
    ref_out, ref_state = naive(h, s, *params, lr, C)
    floor_out, floor_state = naive(h.bfloat16().float(), s.bfloat16().float(),
                                   *(p.float() for p in bf), lr, C)

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    bound_out = rel(floor_out, ref_out) + 2 * U_BF16
    bound_dW = rel(floor_state.dW, ref_state.dW) + 2 * U_BF16
    errors = {}
    for fp32_state in (True, False):
        out, state = chunked(h.bfloat16(), s.bfloat16(), *bf, lr, C, fp32_state=fp32_state)
        errors[fp32_state] = rel(out, ref_out), rel(state.dW, ref_state.dW)
    assert errors[True][0] < bound_out and errors[True][1] < bound_dW, (errors, bound_out, bound_dW)
    assert errors[False][0] > bound_out and errors[False][1] > 2 * bound_dW, errors


def per_row_sequences(starts, steps, seed):
    """Row b: starts[b] prefix tokens and `steps` decode tokens, (1, T_b, F) and (1, T_b, D)."""
    return [make_inputs(seed + b, 1, p + steps) for b, p in enumerate(starts)]


def decode_rows(rows, starts, steps, params, C, clip_tau=None):
    """Prefill each row to its own start with naive, then decode all rows together with
    decode_step + fold; returns the decoded outputs (B, steps, D) and the final state."""
    w0 = params[0]
    state = ttt.init_state(w0, len(rows), C, torch.float64, decode=True)
    for b, ((h, s), p) in enumerate(zip(rows, starts, strict=True)):
        view = state.rows(b, b + 1)
        view.copy_(naive(h[:, :p], s[:, :p], *params, LR, C, view, clip_tau)[1])
    outs = []
    for t in range(steps):
        h_t = torch.cat([h[:, p + t : p + t + 1] for (h, _), p in zip(rows, starts)])  # (B, 1, F)
        s_t = torch.cat([s[:, p + t : p + t + 1] for (_, s), p in zip(rows, starts)])  # (B, 1, D)
        outs.append(ttt.decode_step(h_t, s_t, state))
        done = (state.pos % C == 0).nonzero()[:, 0]
        ttt.fold(*params, LR, state, done, clip_tau)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("C,starts", [(1, (0, 1, 2)), (4, (0, 5, 10)), (5, (3, 0, 12, 7))],
                         ids=["C1", "C4", "C5-B4"])
def test_decode_step_and_fold_match_naive_per_row(C, starts, clip):
    steps, params = 11, make_params(9)
    clip_tau = 0.05 if clip else None
    rows = per_row_sequences(starts, steps, seed=9)
    out, state = decode_rows(rows, starts, steps, params, C, clip_tau)
    for b, ((h, s), p) in enumerate(zip(rows, starts)):
        ref_out, ref_state = naive(h, s, *params, LR, C, clip_tau=clip_tau)
        torch.testing.assert_close(out[b], ref_out[0, p:], **F64)
        torch.testing.assert_close(state.dW[b], ref_state.dW[0], **F64)
        torch.testing.assert_close(state.W[b], params[0] + ref_state.dW[0], **F64)
        n = (p + steps) % C
        torch.testing.assert_close(state.s_buf[b, :n], ref_state.s_buf[0, :n], **F64)
        torch.testing.assert_close(state.h_buf[b, :n], ref_state.h_buf[0, :n], **F64)
        assert int(state.pos[b]) == p + steps


def test_decode_step_costs_one_bmm_and_never_folds_by_itself():
    C, params = 4, make_params(10)
    state = ttt.init_state(params[0], 2, C, torch.float64, decode=True)
    h, s = make_inputs(10, 2, C)
    for t in range(C):
        torch.testing.assert_close(ttt.decode_step(h[:, t : t + 1], s[:, t : t + 1], state),
                                   h[:, t : t + 1] @ params[0].T, **F64)
    assert not state.dW.any() and torch.equal(state.pos, torch.tensor([C, C]))
    torch.testing.assert_close(state.s_buf, s, **F64)


@pytest.mark.parametrize("path", ["naive", "chunked"])
def test_prefill_continues_a_decode_state_whose_stale_slots_are_never_read(path):
    B, C, params = 2, 4, make_params(11)
    h, s = make_inputs(11, B, 23)
    state = ttt.init_state(params[0], B, C, torch.float64, decode=True)
    state.copy_(run(path, h[:, :3], s[:, :3], params, C, initial_state=state)[1])
    outs = [run(path, h[:, :3], s[:, :3], params, C)[0]]
    for t in range(3, 10):  # decode past two folds: slots behind pos mod C now hold old tokens
        outs.append(ttt.decode_step(h[:, t : t + 1], s[:, t : t + 1], state))
        ttt.fold(*params, LR, state, (state.pos % C == 0).nonzero()[:, 0])
    out, final = run(path, h[:, 10:], s[:, 10:], params, C, initial_state=state)
    ref_out, ref_state = naive(h, s, *params, LR, C)
    torch.testing.assert_close(torch.cat([*outs, out], dim=1), ref_out, **F64)
    torch.testing.assert_close(final.dW, ref_state.dW, **F64)
    torch.testing.assert_close(final.W, params[0] + ref_state.dW, **F64)


@pytest.mark.parametrize("path", ["naive", "chunked"])
def test_multi_token_call_with_rows_at_different_positions_is_refused(path):
    params = make_params(12)
    state = ttt.init_state(params[0], 2, 4, torch.float64, decode=True)
    state.rows(1, 2).copy_(naive(*make_inputs(12, 1, 3), *params, LR, 4, state.rows(1, 2))[1])
    with pytest.raises(ValueError, match="positions 0..3"):
        run(path, *make_inputs(13, 2, 5), params, 4, initial_state=state)
    with pytest.raises(ValueError, match="chunk=8"):
        run(path, *make_inputs(13, 2, 5), params, 8, initial_state=state.rows(0, 1))


def test_centre_tap_makes_targets_blind_to_the_next_tokens_and_masks_their_grads():
    conv_w = make_params(14)[1].requires_grad_()
    s = make_inputs(14, 1, 4)[1]
    s2 = s.clone()
    s2[:, 2:] += 1.0  # the tokens after t = 1 change
    v = ttt._targets(s, ttt.centre_tap(conv_w), None, 1.0, s.dtype)  # (1, 4, D)
    v2 = ttt._targets(s2, ttt.centre_tap(conv_w), None, 1.0, s.dtype)
    torch.testing.assert_close(v[:, :2], v2[:, :2], **F64)
    assert not torch.allclose(ttt._targets(s, conv_w, None, 1.0, s.dtype)[:, :2],
                              ttt._targets(s2, conv_w, None, 1.0, s.dtype)[:, :2])
    v.sum().backward()
    assert conv_w.grad[:, :, 2].abs().sum() > 0
    assert not conv_w.grad[:, :, [0, 1, 3, 4]].any()
