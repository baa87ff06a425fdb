"""Context parallelism: one sequence split over R gloo ranks gives the one-rank outputs, losses and
gradients, at the level of ttt.py (the state across ranks, against `naive`) and of the model
(attention across shards, positions, TTT, the loss over the whole sequence, against one rank).

One start of four ranks runs every case (starting ranks costs seconds on 2 cores, a case a
fraction of one): R = 4 cases on all four, R = 2 cases on the pairs {0, 1} and {2, 3}, half each. The ranks save
what they computed; each test computes its oracle here, in one process, and compares."""

import ast
import datetime
import gc
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ttt import make_inputs, make_params
from torch.distributed._composable import checkpoint

import model
import parallel
import ttt
from model import ModelConfig, Transformer, is_ttt_param

WORLD = 4
F64 = dict(rtol=1e-10, atol=1e-10)

# ttt.py level: (R, B, T, C, proj, target, dtype)
TTT_CASES = {
    "R2-proj-mlp-target": (2, 2, 32, 4, True, "mlp", torch.float64),
    "R2-one-chunk-per-shard": (2, 1, 10, 5, True, "independent", torch.float64),
    "R4-no-proj": (4, 2, 24, 3, False, "independent", torch.float64),
    "R4-proj-mlp-target": (4, 1, 32, 4, True, "mlp", torch.float64),
    "R4-bf16": (4, 2, 64, 8, True, "mlp", torch.bfloat16),
}
TTT_LR = 0.3

# model level: R, what differs from BASE (T = 32, C = 4, TTT in layers 0 and 2), and whether the
# blocks are activation-checkpointed (train.py's --activation-checkpointing: the forward, its
# collectives included, runs again in backward)
MODEL_CASES = {
    "R2-hidden-states-gqa": (2, dict(ttt_target="hidden_states"), False),
    "R2-input-embed-mha": (2, dict(ttt_target="input_embed", num_kv_heads=4), False),
    "R2-window-longer-than-shard": (2, dict(sliding_window=21), False),
    "R2-activation-checkpointing": (2, dict(ttt_layers=(0, 1, 2), sliding_window=21), True),
    "R4-hidden-states-gqa": (4, dict(ttt_target="hidden_states"), False),
    "R4-input-embed-ttt-everywhere": (4, dict(ttt_target="input_embed", ttt_layers=(0, 1, 2)), False),
    "R4-window-shorter-than-shard": (4, dict(sliding_window=5), False),
    "R4-window-one-shard-back": (4, dict(sliding_window=9), False),
    "R4-window-into-three-shards-back": (4, dict(sliding_window=19, ttt_target="input_embed"), False),
    "R4-activation-checkpointing": (4, dict(ttt_target="input_embed"), True),
}
BASE = ModelConfig(arch="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4, max_position_embeddings=64,
                   tie_word_embeddings=False, ttt_layers=(0, 2), ttt_chunk=4, ttt_lr=0.5)
B, T = 2, 32


# ---- what both sides build: inputs from seeds, so a rank and the oracle see the same numbers


def ttt_problem(case):
    R, b, t, C, proj, target, dtype = case
    w0, conv_w, proj_w = make_params(0, proj=proj)
    h, s = make_inputs(0, b, t, target=target)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(b, t, w0.shape[0], generator=g, dtype=torch.float64)  # ∂L/∂out
    gS = torch.randn(R, b, *w0.shape, generator=g, dtype=torch.float64)  # ∂L/∂(state after shard r)
    leaves = [x.to(dtype) if x is not None else None for x in (h, s, w0, conv_w, proj_w)]
    return leaves, gy, gS


def build(overrides):
    net = Transformer(replace(BASE, **overrides)).double()
    g = torch.Generator().manual_seed(0)
    net.init_weights(std=0.2, generator=g)
    with torch.no_grad():  # TTT that changes the outputs: a zero conv would make every test pass
        for name, p in net.named_parameters():
            if is_ttt_param(name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net


def batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, BASE.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, BASE.vocab_size, (B, T), generator=g)
    targets[0, :11] = -100  # the shards hold different numbers of targets
    targets[1, 20:23] = -100
    return idx, targets


# ---- the ranks


def _ttt_rank(case, group):
    r, R = dist.get_rank(group), dist.get_world_size(group)
    (h, s, *weights), gy, gS = ttt_problem(case)
    n = h.shape[1] // R
    shard = slice(r * n, (r + 1) * n)
    leaves = [x.detach().clone().requires_grad_() if x is not None else None
              for x in (h[:, shard], s[:, shard], *weights)]
    h_r, s_r, *weights = leaves
    start = parallel.incoming_state(group, h_r, s_r, *weights, TTT_LR, case[3])
    out, state = ttt.chunked(*leaves, TTT_LR, case[3], initial_state=start)
    loss = (out.double() * gy[:, shard]).sum() + (state.dW.double() * gS[r]).sum()
    loss.backward()
    return dict(out=out.detach(), dW=state.dW.detach(), pos=state.pos,
                grads=[x.grad if x is not None else None for x in leaves])


def _model_rank(case, group):
    R, overrides, checkpointed = case
    r = dist.get_rank(group)
    net = build(overrides)
    parallel.apply_context_parallel(net, group)
    if checkpointed:
        for block in net.model.layers:  # as train.py --activation-checkpointing
            checkpoint(block)
    idx, targets = batch()
    n = T // R
    shard = slice(r * n, (r + 1) * n)
    loss = parallel.shard_loss(net, idx[:, shard], targets[:, shard], group)
    loss.backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    for g in grads.values():  # the convention: the average over the group is the one-rank gradient
        dist.all_reduce(g, group=group)
        g /= R
    dist.all_reduce(mean := loss.detach().clone(), group=group)
    with torch.no_grad():
        tokens = parallel.shard_loss(net, idx[:, shard], targets[:, shard], group, reduction="none")
    parts = [torch.empty_like(tokens) for _ in range(R)]
    dist.all_gather(parts, tokens, group=group)
    return dict(loss=mean / R, grads=grads, tokens=torch.cat(parts, dim=1))


def _worker(rank, out_dir, init_file):
    torch.set_num_threads(1)  # four ranks on two cores; forked, before any op (see `ranks`)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # a hang fails, in minutes
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cases = [(f"ttt-{k}", _ttt_rank, c) for k, c in TTT_CASES.items()]
    cases += [(f"model-{k}", _model_rank, c) for k, c in MODEL_CASES.items()]
    turn = 0
    for name, run, case in cases:
        group = dist.group.WORLD
        if case[0] == 2:  # the two pairs take turns
            group, turn = pairs[turn % 2], turn + 1
            if rank not in dist.get_process_group_ranks(group):
                continue
        torch.save(run(case, group), f"{out_dir}/{name}.{dist.get_rank(group)}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs every case on four gloo ranks; returns load(name, rank)."""
    out = tmp_path_factory.mktemp("cp")
    t0 = time.perf_counter()
    # Forked ranks inherit the imports (5.5 s of CPU each when spawned, against about 1.5 s of
    # cases); they run one thread from the start, as DataLoader workers do, so the parent's
    # OpenMP pool is never touched. Elsewhere than Linux, or beside a live process group, spawn.
    # Dead process groups of earlier tests are collected first, here, where their threads live.
    gc.collect()
    method = "fork" if sys.platform == "linux" and not dist.is_initialized() else "spawn"
    mp.start_processes(_worker, args=(str(out), str(out / "init")), nprocs=WORLD, start_method=method)
    print(f"four gloo ranks ran {len(TTT_CASES) + len(MODEL_CASES)} cases in {time.perf_counter() - t0:.1f} s")
    return lambda name, r: torch.load(out / f"{name}.{r}.pt", weights_only=False)


# ---- ttt.py: the cross-rank prefix of ΣΔW equals the token loop over the whole sequence


def naive_oracle(case):
    """naive over the whole sequence: outputs, the state after each shard, and the gradients of
    Σ out·gy + Σ_r state_r·gS_r."""
    R, _, t, C, *_ = case
    (h, s, *weights), gy, gS = ttt_problem(case)
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (h, s, *weights)]
    out, _ = ttt.naive(*leaves, TTT_LR, C)
    states = [ttt.naive(leaves[0][:, :(r + 1) * t // R], leaves[1][:, :(r + 1) * t // R], *leaves[2:],
                        TTT_LR, C)[1].dW for r in range(R)]
    loss = (out * gy).sum() + sum((S * gS[r]).sum() for r, S in enumerate(states))
    loss.backward()
    return out.detach(), [S.detach() for S in states], [x.grad if x is not None else None for x in leaves]


@pytest.mark.parametrize("name", [k for k, c in TTT_CASES.items() if c[-1] == torch.float64])
def test_state_across_ranks_equals_naive_with_grads(ranks, name):
    case = TTT_CASES[name]
    R, t = case[0], case[2]
    got = [ranks(f"ttt-{name}", r) for r in range(R)]
    out, states, grads = naive_oracle(case)
    torch.testing.assert_close(torch.cat([g["out"] for g in got], dim=1), out, **F64)
    for r, g in enumerate(got):  # each rank ends with the sequence's state after its shard
        torch.testing.assert_close(g["dW"], states[r], **F64)
        assert g["pos"].tolist() == [(r + 1) * t // R] * g["pos"].numel()
    for i, what in enumerate(["h", "s"]):
        torch.testing.assert_close(torch.cat([g["grads"][i] for g in got], dim=1), grads[i], **F64,
                                   msg=lambda m: f"∂L/∂{what}: {m}")
    for i, what in [(2, "w0"), (3, "conv"), (4, "proj")]:
        if grads[i] is not None:  # a weight's gradient is the sum of the ranks' parts
            torch.testing.assert_close(sum(g["grads"][i] for g in got), grads[i], **F64,
                                       msg=lambda m: f"∂L/∂{what}: {m}")


def test_bf16_state_across_ranks_is_as_close_to_fp32_as_one_rank(ranks):
    """In bf16 the shard's fast weight is rounded in two parts: the outputs stay as close to the
    fp64 loop as the one-rank bf16 scan's are."""
    case = TTT_CASES["R4-bf16"]
    R, _, _, C, *_ = case
    got = torch.cat([ranks("ttt-R4-bf16", r)["out"] for r in range(R)], dim=1).double()
    out, _, _ = naive_oracle(case)
    (h, s, *weights), _, _ = ttt_problem(case)
    one_rank = ttt.chunked(h, s, *weights, TTT_LR, C)[0].double()
    err = lambda a: ((a - out).norm() / out.norm()).item()
    assert err(one_rank) < 1e-2
    assert err(got) < 1.5 * err(one_rank)


# ---- the model: loss and every gradient under R ranks equal one rank's


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_loss_and_every_gradient_equal_one_rank(ranks, name):
    got = ranks(f"model-{name}", 0)
    net = build(MODEL_CASES[name][1])
    idx, targets = batch()
    loss = net.loss(idx, targets)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), **F64)
    for p_name, p in net.named_parameters():
        torch.testing.assert_close(got["grads"][p_name], p.grad, **F64, msg=lambda m: f"{p_name}: {m}")
    with torch.no_grad():  # validation's loss by position
        torch.testing.assert_close(got["tokens"], net.loss(idx, targets, reduction="none"), **F64)


def test_the_cases_exercise_ttt_and_windows():
    """Guards the oracle: the fast weight and each window change these models' hidden states far
    beyond the tolerance, so equal results under CP mean something."""
    idx, _ = batch()
    with torch.no_grad():
        full = build({}).hidden(idx)
        for overrides in [dict(ttt_layers=()), *(dict(sliding_window=w) for w in (5, 9, 19, 21))]:
            assert (build(overrides).hidden(idx) - full).abs().max() > 1e-4, overrides


# ---- a split the scan cannot run exactly is refused, by name


@pytest.mark.parametrize("seq_len, cp, chunk", [(1024, 4, 64), (32768, 8, 4096), (131072, 8, 4096),
                                                (1000, 4, None), (64, 1, 16)],
                         ids=["whole-chunks", "recipe-32k-cp8", "recipe-128k-cp8", "no-ttt", "cp1"])
def test_shards_of_whole_chunks_are_accepted(seq_len, cp, chunk):
    parallel.check_cp_shard(seq_len, cp, chunk)


@pytest.mark.parametrize("seq_len, cp, chunk, message", [
    (1000, 3, 64, "--cp 3: a sequence of 1000 tokens does not split into 3 equal shards"),
    (1000, 4, 64, "--cp 4: a sequence of 1000 tokens splits into shards of 250, not a whole number "
                  "of TTT chunks of 64: use a length that is a multiple of 4 x 64 = 256"),
    (32768, 16, 4096, "--cp 16: a sequence of 32768 tokens splits into shards of 2048, not a whole "
                      "number of TTT chunks of 4096"),
    (64, 0, 16, "--cp 0: the number of context-parallel ranks must be at least 1"),
], ids=["unequal-shards", "part-chunks", "shard-below-chunk", "zero"])
def test_shards_that_are_not_whole_chunks_are_refused_by_name(seq_len, cp, chunk, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parallel.check_cp_shard(seq_len, cp, chunk)


# ---- a shard's queries at the end of the keys they reach: SDPA on the CPU, flash-attn on CUDA


ON = [pytest.param("cpu", torch.float64, id="cpu-sdpa-fp64"),
      pytest.param("cuda", torch.bfloat16, id="cuda-flash-bf16", marks=pytest.mark.skipif(
          not torch.cuda.is_available() or model.flash_attn_func is None,
          reason="needs a CUDA GPU with flash-attn (bash bench/gpu.sh)"))]


@pytest.mark.parametrize("device, dtype", ON)
@pytest.mark.parametrize("window", [None, 1, 5, 16, 17, 40, 300],
                         ids=["causal", "W1", "W-in-shard", "W-shard", "W-shard+1", "W-3-shards", "W-all"])
def test_a_shard_attends_to_what_the_whole_sequence_does(device, dtype, window):
    """Every rank's attention over parallel.reachable's keys equals the one-rank attention's rows."""
    cfg = replace(BASE, sliding_window=window, num_heads=8, num_kv_heads=2, head_dim=64)
    attn = model.Attention(cfg).to(device, dtype)
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(2, heads, 256, 64, device=device, dtype=dtype, generator=g) for heads in (8, 2, 2))
    n, tol = 16, dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else F64
    parts = torch.stack([k, v]).split(n, dim=-2)  # what shard_keys gathers: 16 shards of 16
    with torch.no_grad():
        full = attn._attend(q, k, v, None, None)
        for r in range(len(parts)):
            kv = parallel.reachable(parts, r, window)
            part = attn._attend(q[:, :, r * n:(r + 1) * n], kv[0], kv[1], None, None)
            torch.testing.assert_close(part, full[:, :, r * n:(r + 1) * n], **tol)


# ---- what a shard adds to the state, without the scan: the token loop's state after it


@pytest.mark.parametrize("proj, clip_tau", [(True, None), (False, None), (True, 0.5)],
                         ids=["proj", "no-proj", "clipped"])
def test_a_shards_updates_are_the_loops_state_after_it(proj, clip_tau):
    w0, conv_w, proj_w = make_params(0, proj=proj)
    h, s = make_inputs(0, 2, 24, target="mlp")
    want = ttt.naive(h, s, w0, conv_w, proj_w, TTT_LR, 4, clip_tau=clip_tau)[1].dW
    torch.testing.assert_close(ttt.updates(h, s, conv_w, proj_w, TTT_LR, 4, clip_tau), want, **F64)


# ---- parallelism lives in parallel.py: the model and ttt.py read as single-device code


@pytest.mark.parametrize("name", ["model.py", "ttt.py"])
def test_the_model_and_ttt_import_no_torch_distributed_and_take_no_group(name):
    tree = ast.parse((Path(__file__).resolve().parents[1] / name).read_text())
    imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imports += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert [m for m in imports if m.startswith("torch.distributed")] == []
    args = [a.arg for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
            for a in n.args.args + n.args.kwonlyargs]
    assert [a for a in args if "group" in a] == []
