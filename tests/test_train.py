import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import CORPUS, RUN, SPEECHES, load_hf_reference, make_hf, metrics, small_args, without_timing
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import checkpoint
import load_hf
import train
import train_model
from data import TokenStream, split_data, token_cache, window_batch
from model import TTT_RECIPE
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


def torchrun(nproc, args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def process_tree(pid):
    children = [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [pid] + [p for c in children for p in process_tree(int(c))]


def finish(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, byte_tokenizer, cache):
    out = tmp_path_factory.mktemp("two_ranks")
    finish(torchrun(2, small_args(byte_tokenizer, cache, out)))
    return out


# -----------------------------------------------------------------------------


def test_two_ranks_learn_with_sharded_params_and_ttt_grads(two_ranks):
    rows = metrics(two_ranks)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert rows[-1]["loss"] < rows[1]["loss"] - 1.0
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0
    assert all(r["ttt_grad_norm"] > 0 for r in rows[1:])
    assert rows[-1]["ttt_dw_rel.0"] > 0 and rows[-1]["ttt_dw_rel.1"] > 0
    meta = dcp.FileSystemReader(str(two_ranks / "ckpt" / f"step_{STEPS:06d}")).read_metadata()
    down = meta.state_dict_metadata["model.model.layers.0.mlp.down_proj.weight"]
    assert [tuple(c.sizes) for c in down.chunks] == [(32, 128), (32, 128)]  # one half per rank
    weights = load_file(two_ranks / "hf" / "model.safetensors")
    assert weights["model.layers.1.mlp.ttt_conv.weight"].abs().sum() > 0  # starts at zero: it learned


def test_two_rank_checkpoint_records_every_file_of_both_ranks(two_ranks):
    ckpt = two_ranks / "ckpt" / f"step_{STEPS:06d}"
    record = checkpoint.read_train_meta(ckpt)["files"]
    assert set(record) == {p.name for p in ckpt.iterdir()} - {"train.json"} >= {"__0_0.distcp", "__1_0.distcp"}
    assert checkpoint.verify_checkpoint(ckpt)["step"] == STEPS


def test_no_ttt_is_a_plain_model_transformers_loads(tmp_path, byte_tokenizer, cache):
    train.main(small_args(byte_tokenizer, cache, tmp_path, "--no-ttt", "--val-data", str(SPEECHES / "1800-Adams-1.txt"),
                          steps=2))
    rows = metrics(tmp_path)
    assert not any(k.startswith("ttt_") for r in rows for k in r)
    hf_dir = tmp_path / "hf"
    assert "ttt_layers" not in json.loads((hf_dir / "config.json").read_text())
    assert not any("ttt_" in k for k in load_file(hf_dir / "model.safetensors"))
    idx = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(load_hf_reference(hf_dir)(idx).logits, load_hf.load_model(hf_dir)(idx),
                                   rtol=1e-5, atol=1e-5)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, two_ranks, byte_tokenizer, cache):
    args = small_args(byte_tokenizer, cache, tmp_path)
    proc = torchrun(2, args)
    while not (tmp_path / "ckpt" / "step_000004").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    for pid in process_tree(proc.pid):  # torchrun starts each rank in a session of its own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ckpt" / f"step_{STEPS:06d}").exists(), "the run finished before it was killed"
    (tmp_path / "ckpt" / ".tmp_step_000099").mkdir()  # as a save killed half way leaves it
    out = finish(torchrun(2, args + ["--resume"]))
    assert "resumed" in out and not (tmp_path / "ckpt" / ".tmp_step_000099").exists()
    assert without_timing(metrics(tmp_path)) == without_timing(metrics(two_ranks))


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path, two_ranks, byte_tokenizer, cache):
    (tmp_path / "ckpt").mkdir()
    shutil.copytree(two_ranks / "ckpt" / "step_000008", tmp_path / "ckpt" / "step_000008")
    reference = metrics(two_ranks)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference[:9]))
    train.main(small_args(byte_tokenizer, cache, tmp_path, "--resume"))
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for got, want in zip(rows[9:], reference[9:]):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4), (got["step"], key)


def test_resume_with_a_different_model_config_is_an_error(tmp_path, two_ranks, byte_tokenizer, cache):
    shutil.copytree(two_ranks / "ckpt", tmp_path / "ckpt")
    args = small_args(byte_tokenizer, cache, tmp_path, "--resume", "--ttt-chunk", "32")
    with pytest.raises(SystemExit, match="ttt_chunk: checkpoint 16, now 32"):
        train.main(args)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, byte_tokenizer, cache):
    # Two sane steps first: a checkpoint whose weights gave a finite loss (lr 1e30 from step 1 leaves none).
    train.main(small_args(byte_tokenizer, cache, tmp_path, "--save-every", "1", "--no-export", steps=2))
    args = small_args(byte_tokenizer, cache, tmp_path, "--lr", "1e30", "--warmup", "1", "--save-every", "1",
                      "--grad-clip", "0", "--resume", steps=8)
    with pytest.raises(SystemExit, match="not finite"):
        train.main(args)
    ckpts = checkpoint.checkpoints(tmp_path / "ckpt")
    assert ckpts and not list((tmp_path / "ckpt").glob(".tmp*"))
    assert (ckpts[-1] / "train.json").is_file() and len(metrics(tmp_path)) < 9


def test_continual_pretraining_starts_at_the_base_model_and_exports_it(tmp_path, byte_tokenizer, cache):
    base, hf = make_hf(tmp_path / "base", "qwen3")
    args = ["--init", str(base), "--tokenizer", byte_tokenizer, "--data", *CORPUS, "--cache", cache,
            "--out", str(tmp_path / "run"), "--ttt-layers", "1", "--ttt-chunk", "16", "--steps", "3", "--lr", "1e-3",
            *RUN]
    idx = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    try:
        _, _, device = train.setup_distributed("cpu")
        cfg = train_model.model_config(init=str(base), ttt_layers=(1,), ttt_chunk=16)
        start = train.build_model(cfg, device, init=str(base))
        assert all(isinstance(p, DTensor) for p in start.parameters())
        with torch.no_grad():
            torch.testing.assert_close(start(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)
        model = train.train(train.parse_args(args))
        with torch.no_grad():
            trained = model(idx)
    finally:
        dist.destroy_process_group()
    exported = load_hf.load_model(tmp_path / "run" / "hf")
    with torch.no_grad():
        torch.testing.assert_close(exported(idx), trained, rtol=0, atol=0)
        assert not torch.allclose(trained, hf(idx).logits, atol=1e-3)  # it did train
    load_hf.main(["export", str(tmp_path / "run" / "ckpt" / "step_000003"), str(tmp_path / "again")])
    a, b = load_file(tmp_path / "run" / "hf" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_continual_pretraining_defaults_to_the_official_recipe(tmp_path):
    base, _ = make_hf(tmp_path / "base", "qwen3", num_hidden_layers=13)
    args = train.parse_args(["--init", str(base), "--steps", "1000"])
    assert (args.lr, args.warmup, args.weight_decay, args.grad_clip) == (5e-6, 20, 0.1, 1.0)
    assert args.min_lr == pytest.approx(5e-7)
    cfg = train_model.model_config(init=str(base))
    assert cfg == load_hf.load_config(base).with_ttt(**TTT_RECIPE) and cfg.ttt_layers
    assert (cfg.ttt_chunk, cfg.ttt_lr, cfg.ttt_proj, cfg.ttt_target) == (4096, 3.0, True, "hidden_states")
    scratch = train.parse_args(["--preset", "qwen3-0.6b"])
    assert (scratch.lr, scratch.warmup) == (3e-3, 5)
    assert train_model.model_config("qwen3-0.6b").ttt_target == "input_embed"


def test_train_only_ttt_leaves_the_base_weights_untouched(tmp_path, byte_tokenizer, cache):
    base, _ = make_hf(tmp_path / "base", "qwen3")
    train.main(["--init", str(base), "--tokenizer", byte_tokenizer, "--data", *CORPUS, "--cache", cache,
                "--out", str(tmp_path / "run"), "--ttt-layers", "1", "--ttt-chunk", "16", "--steps", "2",
                "--lr", "1e-3", "--train-only", "ttt", *RUN])
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "run" / "hf" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after["model.layers.1.mlp.ttt_conv.weight"].abs().sum() > 0


def test_activation_checkpointing_recomputes_blocks_and_changes_nothing_else(tmp_path, byte_tokenizer, cache):
    for name, extra in (("plain", []), ("ac", ["--activation-checkpointing"])):
        train.main(small_args(byte_tokenizer, cache, tmp_path / name, "--no-export", *extra, steps=3))
    assert without_timing(metrics(tmp_path / "plain")) == without_timing(metrics(tmp_path / "ac"))
    a = train.parse_args(small_args(byte_tokenizer, cache, tmp_path))
    cfg = train_model.model_config(a.preset, override=dict(a.override), ttt_layers=a.ttt_layers, ttt_chunk=a.ttt_chunk)
    try:
        _, _, device = train.setup_distributed("cpu")
        model = train.build_model(cfg, device, activation_checkpointing=True)
        calls = []
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        x = torch.randint(0, 256, (2, 33))
        model.loss(x[:, :-1], x[:, 1:]).backward()
    finally:
        dist.destroy_process_group()
    assert len(calls) == 2  # forward, then again in backward


# -----------------------------------------------------------------------------
# Data preparation


def test_token_cache_separates_documents_and_counts_skips(tmp_path, byte_tokenizer, capsys):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    (d / "b.txt").write_text("")
    (d / "c.txt").write_bytes(b"caf\xe9")
    (d / "d.jsonl").write_text('{"text": "xy"}\n{"text": ""}\n{"content": "z"}\nnot json\n')
    tokens = token_cache([str(d)], Path(byte_tokenizer), 0, tmp_path / "cache", rank=0)
    tok = Tokenizer.from_dir(byte_tokenizer)
    assert tokens.tolist() == tok.encode("hello") + [0] + tok.encode("xy") + [0]
    log = capsys.readouterr().out
    assert "skipped 2 documents: empty" in log and "skipped 1 documents: invalid UTF-8" in log
    assert "skipped 2 documents: not a JSON object with a 'text' field" in log
    again = token_cache([str(d)], Path(byte_tokenizer), 0, tmp_path / "cache", rank=0)
    assert capsys.readouterr().out == "" and again.tolist() == tokens.tolist()


@pytest.mark.parametrize("content, message", [("", "no usable documents"), ("short", "fewer than one window")],
                         ids=["empty", "smaller-than-a-window"])
def test_unusable_data_is_a_clear_error(tmp_path, byte_tokenizer, content, message):
    (tmp_path / "a.txt").write_text(content)
    with pytest.raises(SystemExit, match=message):
        split_data([str(tmp_path / "a.txt")], None, 0, 64, Path(byte_tokenizer), 0, tmp_path / "cache",
                         rank=0)


def test_rerun_into_a_run_directory_with_checkpoints_is_refused(tmp_path, byte_tokenizer, cache):
    train.main(small_args(byte_tokenizer, cache, tmp_path, "--no-export", steps=2))
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    with pytest.raises(SystemExit, match="already holds checkpoints.*--resume.*--overwrite"):
        train.main(small_args(byte_tokenizer, cache, tmp_path, "--no-export", steps=2))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == saved
    train.main(small_args(byte_tokenizer, cache, tmp_path, "--no-export", "--overwrite", steps=2))


# -----------------------------------------------------------------------------
# The ‖ΣΔW‖ / ‖W0‖ probe


@pytest.mark.parametrize("target", ["input_embed", "hidden_states"])
def test_update_probe_reads_the_forward_state_and_matches_the_naive_loop(target, monkeypatch):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    import ttt
    from model import PRESETS, Transformer

    cfg = replace(PRESETS["tiny"], vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=32).with_ttt(layers=(0, 1), chunk=16, target=target)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    plain.init_weights(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if ".mlp.ttt_" in name:
                p.normal_(0.0, 0.3)
    seq_len, windows = 40, 3
    val = TokenStream(np.random.default_rng(0).integers(0, 256, windows * seq_len + 1).astype(np.uint32))
    try:
        rank, world, device = train.setup_distributed("cpu")
        model = train.build_model(cfg, device, fill=False)
        set_model_state_dict(model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
        calls, chunked = [], ttt.chunked
        monkeypatch.setattr(ttt, "chunked", lambda *a, **k: calls.append(1) or chunked(*a, **k))
        got = train.validate(model, val, seq_len, windows, 2, rank, world, device)
        monkeypatch.undo()
    finally:
        dist.destroy_process_group()
    assert len(calls) == 2 * 2  # two micro-batches through two TTT layers: no second TTT pass per layer
    inputs = {}
    for i in cfg.ttt_layers:
        plain.model.layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, a[:2]))
    x, _ = window_batch(val, np.arange(windows) * seq_len, seq_len)
    with torch.no_grad():
        plain(x)
    for i in cfg.ttt_layers:
        mlp, (xin, embeds) = plain.model.layers[i].mlp, inputs[i]
        h = torch.nn.functional.silu(mlp.gate_proj(xin)) * mlp.up_proj(xin)
        s = xin if target == "hidden_states" else embeds
        w0 = mlp.down_proj.weight.detach()
        _, state = ttt.naive(h.detach(), s.detach(), w0, mlp.ttt_conv.weight.detach(),
                             mlp.ttt_proj.weight.detach(), cfg.ttt_lr, cfg.ttt_chunk)
        want = (torch.linalg.matrix_norm(state.dW) / torch.linalg.matrix_norm(w0)).mean().item()
        assert want > 1e-3 and got[f"ttt_dw_rel.{i}"] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("flag, default", [("--steps", "400"), ("--seq-len", "1024"), ("--batch-tokens", "4096"),
                                           ("--val-every", "25"), ("--save-every", "50"), ("--keep", "2"),
                                           ("--ttt-init", "paper"),
                                           ("--lr", "5e-06 with --init")])
def test_help_shows_each_flags_default(flag, default, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a flag's help
    with pytest.raises(SystemExit):
        train.main(["--help"])
    flags = capsys.readouterr().out.split("\n  -")  # one entry per flag: its name, then its help
    [entry] = [f for f in flags if f.startswith(flag[1:] + " ")]
    assert f"(default: {default}" in entry


def test_a_run_that_cannot_be_exported_is_refused_before_training(tmp_path):
    with pytest.raises(SystemExit, match="sliding_window=8 cannot be exported for arch='llama'.*--no-export"):
        train.main(["--override", "arch=llama", "sliding_window=8", "--out", str(tmp_path / "run"),
                    "--cache", str(tmp_path / "cache")])
    assert list(tmp_path.iterdir()) == []
