"""CPU stand-ins for train.py's GPU-only paths: bf16 mixed precision under FSDP2 (one rank and two
gloo ranks), compiled training blocks and activation checkpointing with TTT. The GPU runs of the
same paths are in tests/test_gpu.py and bench/gpu.sh."""

import pytest
import torch
import torch.distributed as dist
from conftest import SMALL, metrics, small_args, without_timing
from test_train import finish, torchrun
from torch._dynamo.utils import counters
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import checkpoint
import train
import train_model
from model import Transformer

STEPS = 8  # the loss falls by > 1 nat in 8 steps at these settings; 24 would take a minute
BF16 = ["--precision", "bf16", "--micro-batch", "4", "--no-export"]  # 4: half the forwards


class Stop(Exception):
    """Raised where a user would press Ctrl-C."""


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, byte_tokenizer, cache):
    out = tmp_path_factory.mktemp("bf16")
    train.main(small_args(byte_tokenizer, cache, out, *BF16, steps=STEPS))
    return out


def small_config():
    a = train.parse_args(SMALL)
    return train_model.model_config(a.preset, override=dict(a.override), ttt_layers=a.ttt_layers,
                                ttt_chunk=a.ttt_chunk)


def full_state(cfg):
    """A full state dict with every TTT weight nonzero: at init ttt_conv is zero and ttt_proj gets
    no gradient, which would leave _ChunkScan's backward almost untested."""
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.ttt_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.state_dict()


def loss_and_grads(cfg, state, idx, **build) -> tuple[float, dict]:
    """One train.py forward + backward (build_model(**build), loaded with `state`) on idx (B, T+1):
    the loss and every parameter's full gradient."""
    _, _, device = train.setup_distributed("cpu")
    try:
        model = train.build_model(cfg, device, fill=False, **build)
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.item(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# bf16 mixed precision (the default on CUDA)


def test_precision_defaults_to_bf16_on_cuda_and_fp32_on_cpu():
    assert train.parse_args(["--device", "cuda"]).precision == "bf16"
    assert train.parse_args(["--device", "cpu"]).precision == "fp32"
    assert train.parse_args(["--device", "cuda", "--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        train.parse_args(["--precision", "fp16"])


@pytest.mark.parametrize("precision, compute", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_flag_sets_the_compute_dtype_and_the_ttt_state_stays_fp32(tmp_path, byte_tokenizer,
                                                                  cache, precision, compute):
    """What a GPU bf16 run computes in: bf16 weights inside each block's forward (FSDP2's cast of
    the fp32 master weights, which stay fp32), while the fast-weight state ΣΔW is summed in fp32
    (ttt_fp32_state)."""
    args = train.parse_args(small_args(byte_tokenizer, cache, tmp_path, "--precision", precision))
    try:
        run = train.setup_run(args)
        set_model_state_dict(run.model, full_state(run.cfg),  # nonzero TTT weights: ΔW != 0
                             options=StateDictOptions(full_state_dict=True))
        mlp = run.model.model.layers[0].mlp
        seen = []
        mlp.register_forward_hook(lambda m, a, out: seen.append(
            (m.down_proj.weight.dtype, out.dtype, m.last_state.dW)))
        mlp.keep_state = True  # the forward's final state, fast-weight sum dW included
        with torch.no_grad():
            run.model(torch.randint(0, 256, (2, 48)))
        run.model.reshard()  # a no-grad forward leaves the root's bf16 copies gathered
    finally:
        dist.destroy_process_group()
    [(weight, out, dW)] = seen
    assert (weight, out) == (compute, compute)
    assert dW.dtype == torch.float32 and dW.abs().sum() > 0
    assert not torch.equal(dW, dW.bfloat16().float())  # summed in fp32, not cast at the end
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}  # the master weights


def test_bf16_run_learns_and_resumes_exactly(tmp_path, bf16_run, byte_tokenizer, cache,
                                              monkeypatch):
    """A GPU bf16 run and its resume, on the CPU: the loss falls, and a run stopped after its step-4
    checkpoint and continued with --resume writes exactly the uninterrupted run's metrics (bf16
    matmuls on the CPU are deterministic, so anything less than equality is a resume bug)."""
    rows = metrics(bf16_run)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert rows[-1]["loss"] < rows[1]["loss"] - 1.0
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0
    assert all(r["ttt_grad_norm"] > 0 for r in rows[1:])
    ckpt = checkpoint.checkpoints(bf16_run / "ckpt")[-1]
    assert checkpoint.read_train_meta(ckpt)["args"]["precision"] == "bf16"  # recorded with the run
    saved = checkpoint.save_checkpoint

    def save_then_stop(*a, **k):
        path = saved(*a, **k)
        raise Stop(path)

    args = small_args(byte_tokenizer, cache, tmp_path, *BF16, steps=STEPS)
    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        train.main(args)
    monkeypatch.undo()
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "ckpt")] == ["step_000004"]
    train.main(args + ["--resume"])
    assert without_timing(metrics(tmp_path)) == without_timing(rows)


def test_bf16_run_starts_at_the_fp32_loss_up_to_rounding(tmp_path, bf16_run, byte_tokenizer,
                                                         cache):
    """The flag reaches the training loop: before any update, the bf16 run's validation and
    training losses are the fp32 run's up to bf16 rounding (2^-8 per weight, averaged over many
    products: 1e-3 relative allowed, 1.6e-5 measured), and not equal to them."""
    train.main(small_args(byte_tokenizer, cache, tmp_path, "--precision", "fp32", "--no-export",
                          steps=1))
    bf16, fp32 = metrics(bf16_run)[:2], metrics(tmp_path)[:2]
    pairs = [(bf16[0]["val_loss"], fp32[0]["val_loss"]), (bf16[1]["loss"], fp32[1]["loss"])]
    assert all(b == pytest.approx(f, rel=1e-3) and b != f for b, f in pairs)


def test_two_gloo_ranks_in_bf16_learn_and_match_one_rank(tmp_path, bf16_run, byte_tokenizer, cache):
    """Two-rank bf16 FSDP2 (NCCL on a GPU) with gloo: bf16 all-gathers of the weights, fp32
    reduce-scatter of the gradients. It sums gradients in another order than one rank, and a
    master weight that differs in its last fp32 bits can round to another bf16 value, so the
    losses agree to 2e-4 relative (measured: <= 1.5e-5 over 8 steps), not exactly."""
    finish(torchrun(2, small_args(byte_tokenizer, cache, tmp_path, *BF16, steps=STEPS)))
    two, one = metrics(tmp_path), metrics(bf16_run)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert two[-1]["loss"] < two[1]["loss"] - 1.0
    for got, want in zip(two, one):
        for key in ("loss", "val_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=2e-4), (got["step"], key)
    assert any(got["loss"] != want["loss"] for got, want in zip(two[1:], one[1:]))  # two real runs


# -----------------------------------------------------------------------------
# Compiled blocks and activation checkpointing with TTT (fp32: differences are the code's)


@pytest.fixture(scope="module")
def eager():
    cfg = small_config().with_ttt(lr=3.0)  # the official eta: TTT gradients well above rounding
    state = full_state(cfg)
    idx = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(0))
    return cfg, state, idx, loss_and_grads(cfg, state, idx)


@pytest.mark.parametrize("build", [dict(compile="aot_eager"), dict(activation_checkpointing=True),
                                   dict(compile="aot_eager", activation_checkpointing=True)],
                         ids=["compile", "activation-checkpointing", "both"])
def test_compiled_and_checkpointed_blocks_give_the_eager_gradients(eager, build):
    """--compile and --activation-checkpointing (on a GPU: inductor, bf16) against eager, through
    the custom _ChunkScan backward, one loss.backward() in fp32. backend="aot_eager" runs what
    dynamo traced (the whole block, _ChunkScan's forward and backward included: no graph break) and
    what AOTAutograd derived from it with eager kernels; inductor's generated code, whose first C++
    build takes over a minute here, is exercised on the GPU only. Same kernels on the same inputs,
    so equal up to fp32 rounding: rtol 1e-5 and atol 1e-6 of each parameter's largest gradient
    (measured: bit-identical; inductor on the CPU, warm cache: 9e-7 of the largest)."""
    cfg, state, idx, (want_loss, want) = eager
    torch._dynamo.reset()  # compile afresh: a graph cached by another case would count nothing
    counters.clear()
    loss, grads = loss_and_grads(cfg, state, idx, **build)
    if "compile" in build:
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert grads.keys() == want.keys()
    for name, g in grads.items():
        scale = want[name].abs().max().item()  # per parameter: TTT gradients are ~20x smaller
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
    ttt = [name for name in want if ".mlp.ttt_" in name]
    assert len(ttt) == 4 and all(want[name].abs().max() > 1e-4 for name in ttt)
