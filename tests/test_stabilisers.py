"""The stabilisers (ttt.py "Stabilisers"): off is the options-absent arithmetic bit for bit; on,
the token loop follows each one's equations, and chunked, decode and context-parallel ranks equal
the loop in fp64, gradients included; export keeps each key and says which the official code
ignores; a converted model is still exactly its base model at step 0."""

import datetime
import gc
import json
import re
import sys
import warnings
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as nnf
from conftest import small_args
from test_cp import BASE, batch, build
from test_ttt import make_inputs, make_params, per_row_sequences

import parallel
import train
import ttt
from load_hf import NOT_OFFICIAL, STABILISERS, config_from_hf, config_to_hf, load_model, save_model
from model import Transformer, ttt_lr_warmup_scale
from starts import start_ttt_params

LR = 0.4
F64 = dict(rtol=1e-10, atol=1e-10)
OFF = dict(clip_tau=None, key_norm=False, target_norm=False, norm_preserve=False)
STABS = {
    "key-norm": dict(key_norm=True),
    "target-norm": dict(target_norm=True),
    "clip": dict(clip_tau=3.0),  # τ: some chunks of these inputs clipped, others not
    "norm-preserve": dict(norm_preserve=True),
    "all": dict(key_norm=True, target_norm=True, clip_tau=0.9, norm_preserve=True),
}
ADDITIVE = [k for k, v in STABS.items() if not v.get("norm_preserve")]


def reference(h, s, w0, conv_w, proj_w, lr, C, key_norm=False, target_norm=False, clip_tau=None,
              norm_preserve=False):
    """Straight from the equations, per chunk: the weight W each chunk reads, then its update."""
    B, T, _ = h.shape
    W = w0.expand(B, *w0.shape).clone()
    outs = []
    for start in range(0, T, C):
        h_i, s_i = h[:, start:start + C], s[:, start:start + C]
        outs.append(h_i @ W.transpose(1, 2))
        if h_i.shape[1] < C:
            break
        if target_norm:
            s_i = s_i / (s_i.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        s_pad = nnf.pad(s_i, (0, 0, 2, 2))
        u = sum(conv_w[:, 0, k] * s_pad[:, k:k + C] for k in range(5))
        v = u if proj_w is None else u @ proj_w
        k = h_i / (h_i.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() if key_norm else h_i
        dW = lr * v.transpose(1, 2) @ k
        if clip_tau is not None:
            norm = torch.linalg.matrix_norm(dW)[:, None, None]
            dW = torch.where(norm > clip_tau, dW * clip_tau / norm, dW)
        W = W + dW
        if norm_preserve:
            W = W / W.norm(dim=-1, keepdim=True) * w0.norm(dim=-1, keepdim=True)
    return torch.cat(outs, dim=1), W - w0


def leaves(seed, B, T):
    h, s = make_inputs(seed, B, T)
    return [x.clone().requires_grad_() for x in (h, s, *make_params(seed))]


def grads_of(fn, xs, seed=3):
    """(out, final S, ∂/∂xs) of Σ out·gy + Σ S·gS for random gy, gS."""
    out, S = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gS = torch.randn(S.shape, generator=g, dtype=S.dtype)
    grads = torch.autograd.grad((out * gy).sum() + (S * gS).sum(), xs, materialize_grads=True)
    return out.detach(), S.detach(), grads


# ---- the token loop follows each stabiliser's equations


@pytest.mark.parametrize("seed,lr,opts", [(1, LR, STABS["clip"]), (1, LR, STABS["all"]),
                                          (2, LR, STABS["clip"]), (2, LR, STABS["all"]),
                                          (5, LR * 0.3, dict(clip_tau=0.75))],
                         ids=["naive-clip", "naive-all", "chunked-clip", "chunked-all", "cp-clip"])
def test_the_cases_clip_some_chunks_and_not_others(seed, lr, opts):
    T = 24 if seed == 5 else 27  # as the test that uses them
    h, s = (x[:, :24] for x in make_inputs(seed, 2, T))
    w0, conv_w, proj_w = make_params(seed)
    tau, opts = opts["clip_tau"], {k: v for k, v in opts.items() if k in ("key_norm", "target_norm")}
    dW = ttt.chunk_update(s.unflatten(1, (6, 4)), h.unflatten(1, (6, 4)), conv_w, proj_w, lr,
                          **opts)
    norms = torch.linalg.matrix_norm(dW)
    assert (norms > tau).any() and (norms < tau).any(), norms


@pytest.mark.parametrize("stab", list(STABS))
def test_naive_follows_the_equations(stab):
    h, s = make_inputs(1, 2, 27)
    params = make_params(1)
    out, state = ttt.naive(h, s, *params, LR, 4, **STABS[stab])
    ref_out, ref_S = reference(h, s, *params, LR, 4, **STABS[stab])
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(state.dW, ref_S, **F64)
    assert (ref_S - reference(h, s, *params, LR, 4)[1]).abs().max() > 1e-3  # it does something


# ---- chunked = naive: forward and gradients, across chunk boundaries and calls


def chunked_in_two_calls(split, C, opts):
    def run(h, s, *weights):
        out1, mid = ttt.chunked(h[:, :split], s[:, :split], *weights, LR, C, **opts)
        out2, end = ttt.chunked(h[:, split:], s[:, split:], *weights, LR, C, initial_state=mid,
                                **opts)
        return torch.cat([out1, out2], dim=1), end.dW
    return run


@pytest.mark.parametrize("T,C,split", [(27, 4, 10), (9, 4, 3), (3, 4, 1), (12, 3, 6)],
                         ids=["T=kC+r", "T=2C+1", "T<C", "T=kC"])
@pytest.mark.parametrize("stab", list(STABS))
def test_chunked_equals_naive_with_grads(stab, T, C, split):
    opts = STABS[stab]
    xs = leaves(2, 2, T)
    out, S, grads = grads_of(lambda *a: (lambda o, st: (o, st.dW))(*ttt.naive(*a, LR, C, **opts)),
                             xs)
    one = grads_of(lambda *a: (lambda o, st: (o, st.dW))(*ttt.chunked(*a, LR, C, **opts)), xs)
    two = grads_of(chunked_in_two_calls(split, C, opts), xs)
    for got in (one, two):
        torch.testing.assert_close(got[0], out, **F64)
        torch.testing.assert_close(got[1], S, **F64)
        for name, a, b in zip(["h", "s", "w0", "conv", "P"], got[2], grads, strict=True):
            torch.testing.assert_close(a, b, **F64, msg=lambda m, name=name: f"∂/∂{name}: {m}")


# ---- decoding: ragged rows folding at their own chunk boundaries


def decode_rows(rows, starts, steps, params, C, opts):
    state = ttt.init_state(params[0], len(rows), C, torch.float64, decode=True)
    for b, ((h, s), p) in enumerate(zip(rows, starts, strict=True)):
        view = state.rows(b, b + 1)
        view.copy_(ttt.naive(h[:, :p], s[:, :p], *params, LR, C, view, **opts)[1])
    outs = []
    for t in range(steps):
        h_t = torch.cat([h[:, p + t:p + t + 1] for (h, _), p in zip(rows, starts)])  # (B, 1, F)
        s_t = torch.cat([s[:, p + t:p + t + 1] for (_, s), p in zip(rows, starts)])  # (B, 1, D)
        outs.append(ttt.decode_step(h_t, s_t, state))
        ttt.fold(*params, LR, state, (state.pos % C == 0).nonzero()[:, 0], **opts)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("stab", list(STABS))
def test_decode_equals_naive_per_row(stab):
    C, starts, steps, params = 5, (3, 0, 12, 7), 11, make_params(9)
    rows = per_row_sequences(starts, steps, seed=9)
    out, state = decode_rows(rows, starts, steps, params, C, STABS[stab])
    for b, ((h, s), p) in enumerate(zip(rows, starts)):
        ref_out, ref_state = ttt.naive(h, s, *params, LR, C, **STABS[stab])
        torch.testing.assert_close(out[b], ref_out[0, p:], **F64)
        torch.testing.assert_close(state.dW[b], ref_state.dW[0], **F64)
        torch.testing.assert_close(state.W[b], params[0] + ref_state.dW[0], **F64)


# ---- off: the options-absent path, bit for bit


def test_off_is_the_options_absent_path_bit_for_bit():
    xs = leaves(4, 2, 27)
    absent = grads_of(lambda *a: (lambda o, st: (o, st.dW))(*ttt.chunked(*a, LR, 4)), xs)
    off = grads_of(lambda *a: (lambda o, st: (o, st.dW))(*ttt.chunked(*a, LR, 4, **OFF)), xs)
    for a, b in zip([absent[0], absent[1], *absent[2]], [off[0], off[1], *off[2]], strict=True):
        assert torch.equal(a, b)


def model_grads(net, idx, targets):
    loss = net.loss(idx, targets)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return loss.detach(), grads


def test_off_keys_and_a_finished_warmup_change_no_bit_of_the_model():
    idx, targets = batch()
    plain = build({})
    off = build(dict(ttt_key_norm=False, ttt_target_norm=False, ttt_clip_tau=None,
                     ttt_norm_preserve=False, ttt_lr_warmup=5))
    off.ttt_lr_scale = ttt_lr_warmup_scale(4, 5)  # the warm-up's last step: the full η
    (l1, g1), (l2, g2) = model_grads(plain, idx, targets), model_grads(off, idx, targets)
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


# ---- η warm-up: a scale the training step sets, the full η otherwise


def test_warmup_scale_ramps_to_one():
    assert [ttt_lr_warmup_scale(t, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ttt_lr_warmup_scale(0, 0) == 1.0
    assert build({}).ttt_lr_scale == 1.0


def test_a_scaled_eta_is_the_model_with_that_eta():
    idx, targets = batch()
    warm = build({})
    warm.ttt_lr_scale = 0.25
    same = build(dict(ttt_lr=BASE.ttt_lr * 0.25))
    (l1, g1), (l2, g2) = model_grads(warm, idx, targets), model_grads(same, idx, targets)
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert (l1 - model_grads(build({}), idx, targets)[0]).abs() > 1e-6


# ---- a converted model is its base model at step 0, every stabiliser on


ALL_ON = dict(ttt_key_norm=True, ttt_target_norm=True, ttt_clip_tau=1e-5, ttt_norm_preserve=True)


@pytest.mark.parametrize("init", ["paper", "zero-proj"])
def test_a_converted_model_is_exactly_its_base_model_at_step_0(init):
    idx, targets = batch()
    nets = {}
    for name, keys in [("on", ALL_ON), ("off", {})]:
        net = Transformer(replace(BASE, **keys)).double()
        net.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
        start_ttt_params(net, torch.Generator().manual_seed(1), mode=init)
        nets[name] = net
    for i in BASE.ttt_layers:
        nets["on"].model.layers[i].mlp.keep_state = True
    with torch.no_grad():
        on, off = nets["on"](idx), nets["off"](idx)
    assert torch.equal(on, off)  # W0 + S_i with S_i = 0 exactly, norm-preserve's r / r = 1
    for i in BASE.ttt_layers:
        assert not nets["on"].model.layers[i].mlp.last_state.dW.any()
    nets["on"].ttt_enabled = False
    with torch.no_grad():
        torch.testing.assert_close(on, nets["on"](idx), **F64)  # the base model's own matmul
    nets["on"].ttt_enabled = True
    _, grads = model_grads(nets["on"], idx, targets)
    assert all(g.isfinite().all() for g in grads)  # the clip's kink at ΔW = 0 gives no nan
    conv = [g for (n, _), g in zip(nets["on"].named_parameters(), grads) if "ttt_conv" in n]
    proj = [g for (n, _), g in zip(nets["on"].named_parameters(), grads) if "ttt_proj" in n]
    assert any(g.abs().max() > 0 for g in conv + proj)  # and training can leave the start


# ---- context parallelism: 2 gloo ranks equal one rank (norm-preserve refused)


R = 2
CP_TTT = {**{k: STABS[k] for k in ADDITIVE}, "clip": dict(clip_tau=0.75)}
CP_MODEL = dict(ttt_key_norm=True, ttt_target_norm=True, ttt_clip_tau=0.2)
CP_SCALE = 0.3  # η warm-up's scale, mid-ramp (test_the_cases_clip_some_chunks_and_not_others)


def _ttt_rank(opts, group):
    r = dist.get_rank(group)
    xs = leaves(5, 2, 24)
    n = 24 // R
    shard = [x[:, r * n:(r + 1) * n].detach().requires_grad_() for x in xs[:2]]
    weights = [x.detach().requires_grad_() for x in xs[2:]]
    start = parallel.incoming_state(group, *shard, *weights, LR * CP_SCALE, 4, **opts)
    out, state = ttt.chunked(*shard, *weights, LR * CP_SCALE, 4, initial_state=start, **opts)
    gy = torch.randn(2, 24, out.shape[-1], generator=torch.Generator().manual_seed(7),
                     dtype=out.dtype)
    (out * gy[:, r * n:(r + 1) * n]).sum().backward()
    return dict(out=out.detach(), dW=state.dW.detach(), grads=[x.grad for x in shard + weights])


def _model_rank(group):
    r, net = dist.get_rank(group), build(CP_MODEL)
    net.ttt_lr_scale = CP_SCALE
    parallel.apply_context_parallel(net, group)
    idx, targets = batch()
    n = idx.shape[1] // R
    loss = parallel.shard_loss(net, idx[:, r * n:(r + 1) * n], targets[:, r * n:(r + 1) * n],
                               group)
    loss.backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    for g in grads.values():  # the convention: the average over the group is the one-rank grad
        dist.all_reduce(g, group=group)
        g /= R
    dist.all_reduce(mean := loss.detach().clone(), group=group)
    return dict(loss=mean / R, grads=grads)


def _worker(rank, out_dir, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=R,
                            timeout=datetime.timedelta(seconds=120))
    for name, opts in CP_TTT.items():
        torch.save(_ttt_rank(opts, dist.group.WORLD), f"{out_dir}/ttt-{name}.{rank}.pt")
    torch.save(_model_rank(dist.group.WORLD), f"{out_dir}/model.{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp-stab")
    gc.collect()
    method = "fork" if sys.platform == "linux" and not dist.is_initialized() else "spawn"
    mp.start_processes(_worker, args=(str(out), str(out / "init")), nprocs=R, start_method=method)
    return lambda name, r: torch.load(out / f"{name}.{r}.pt", weights_only=False)


@pytest.mark.parametrize("stab", list(CP_TTT))
def test_cp_ranks_equal_naive_with_grads(ranks, stab):
    got = [ranks(f"ttt-{stab}", r) for r in range(R)]
    xs = leaves(5, 2, 24)
    out, _ = ttt.naive(*xs, LR * CP_SCALE, 4, **CP_TTT[stab])
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad((out * gy).sum(), xs)
    torch.testing.assert_close(torch.cat([g["out"] for g in got], dim=1), out, **F64)
    torch.testing.assert_close(got[-1]["dW"], ttt.naive(*xs, LR * CP_SCALE, 4,
                                                        **CP_TTT[stab])[1].dW, **F64)
    for i in range(2):  # h, s: each rank holds its shard's
        torch.testing.assert_close(torch.cat([g["grads"][i] for g in got], dim=1), grads[i],
                                   **F64)
    for i in range(2, 5):  # w0, conv, P: the ranks' parts sum to the whole
        torch.testing.assert_close(sum(g["grads"][i] for g in got), grads[i], **F64)


def test_cp_model_with_additive_stabilisers_and_warmup_equals_one_rank(ranks):
    got = ranks("model", 0)
    net = build(CP_MODEL)
    net.ttt_lr_scale = CP_SCALE
    loss, grads = model_grads(net, *batch())
    torch.testing.assert_close(got["loss"], loss, **F64)
    for (name, _), g in zip(net.named_parameters(), grads, strict=True):
        torch.testing.assert_close(got["grads"][name], g, **F64, msg=lambda m, n=name: f"{n}: {m}")


def test_norm_preserve_is_refused_under_cp_by_name():
    with pytest.raises(ValueError, match=re.escape(parallel.NORM_PRESERVE_CP)):
        parallel.apply_context_parallel(build(dict(ttt_norm_preserve=True)), group=None)
    h, s = make_inputs(0, 1, 8)
    with pytest.raises(ValueError, match="ttt_norm_preserve=True cannot run under context"):
        parallel.incoming_state(None, h, s, *make_params(0), LR, 4, norm_preserve=True)


def test_train_with_norm_preserve_and_cp_stops_with_one_named_line(tmp_path, byte_tokenizer,
                                                                    cache):
    args = small_args(byte_tokenizer, cache, tmp_path / "run", "--cp", "2")
    args.insert(args.index("--override") + 1, "ttt_norm_preserve=true")
    with pytest.raises(SystemExit, match=re.escape(f"error: --cp 2: {parallel.NORM_PRESERVE_CP}")):
        train.main(args)
    assert not (tmp_path / "run").exists()


# ---- export: each key round-trips; those the official code ignores warn


@pytest.mark.parametrize("key,value", [("ttt_key_norm", True), ("ttt_target_norm", True),
                                       ("ttt_clip_tau", 1e-5), ("ttt_norm_preserve", True),
                                       ("ttt_lr_warmup", 200)])
def test_export_round_trip_keeps_each_stabiliser(tmp_path, key, value):
    net = build({key: value}).float()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        save_model(net, tmp_path / "out")
    ignored = [str(w.message) for w in seen if "official In-Place TTT classes ignore" in
               str(w.message)]
    if key in NOT_OFFICIAL:
        assert len(ignored) == 1 and f"config.json sets {key}={value!r}" in ignored[0]
    else:  # a training schedule: the official code's inference computes this model
        assert ignored == []
    assert json.loads((tmp_path / "out" / "config.json").read_text())[key] == value
    back = load_model(tmp_path / "out")
    assert getattr(back.config, key) == value
    for other in set(STABILISERS) - {key}:
        assert getattr(back.config, other) == STABILISERS[other]
    idx, _ = batch()
    with torch.no_grad():
        assert torch.equal(back(idx), net(idx))


def test_an_export_with_every_stabiliser_off_has_none_of_their_keys():
    hf = config_to_hf(BASE, torch.float32)
    assert set(STABILISERS).isdisjoint(hf)


@pytest.mark.parametrize("key,value,allowed", [
    ("ttt_key_norm", "yes", "true or false"),
    ("ttt_clip_tau", 0, "a positive number or null"),
    ("ttt_lr_warmup", -1, "an integer >= 0"),
    ("ttt_lr_warmup", 2.5, "an integer >= 0"),
])
def test_a_bad_stabiliser_value_is_named(key, value, allowed):
    hf = {**config_to_hf(BASE, torch.float32), key: value}
    with pytest.raises(ValueError, match=re.escape(f"config.json: {key}={value!r} is not allowed: "
                                                   f"expected") + ".*" + re.escape(allowed)):
        config_from_hf(hf)


# ---- train.py: η warmed up per step, validation with the full η


def test_train_warms_eta_up_per_step_and_validates_with_the_full_eta(tmp_path, byte_tokenizer,
                                                                     cache, monkeypatch):
    seen = []
    for name in ("train_step", "validate"):
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda model, *a, real=real, name=name, **k: (
            seen.append((name, model.ttt_lr_scale)), real(model, *a, **k))[1])
    args = small_args(byte_tokenizer, cache, tmp_path, "--no-export", steps=4)
    args.insert(args.index("--override") + 1, "ttt_lr_warmup=3")
    train.main(args)
    assert seen == [("validate", 1.0), ("train_step", 1 / 3), ("train_step", 2 / 3),
                    ("train_step", 1.0), ("train_step", 1.0), ("validate", 1.0)]
