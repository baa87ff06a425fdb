"""Issue 10, train.py and load_hf.py: never lose a user's data, never resume from garbage, name
every bad input."""

import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import CORPUS, finished_run, make_hf, metrics, rewrite_weights, small_args, without_timing

import checkpoint
import load_hf
import train
from data import token_cache
from model import ModelConfig


def listing(root):
    """Every path under root with its size: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(Path(root).rglob("*"))}


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def exit_message(capsys, fn, *args):
    """The message of a command that must fail: SystemExit's text, or what argparse printed."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code not in (0, None)
    return e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, byte_tokenizer, cache):
    """A finished two-step run, a checkpoint after each step (step_000001, step_000002), no
    export."""
    return finished_run(tmp_path_factory, byte_tokenizer, cache, steps=2)


def resume(tok, cache, out, *extra, steps=2):
    args = small_args(tok, cache, out, "--save-every", "1", "--no-export", "--resume", *extra,
                      steps=steps)
    return train.main(args)


# ---- 1. an export never deletes what it did not write


def test_export_into_a_directory_holding_two_runs_is_refused_and_deletes_nothing(run_dir,
                                                                                  tmp_path):
    out2 = tmp_path / "out2"
    shutil.copytree(run_dir, out2 / "ref")
    shutil.copytree(run_dir, out2 / "other")
    before = listing(out2)
    inside = (r"out2 would replace or lie inside .*out2/ref/ckpt/step_000002, which an export "
              r"never touches")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match=inside):
            load_hf.main(["export", str(out2 / "ref/ckpt/step_000002"), str(out2), *extra])
        with pytest.raises(SystemExit, match=r"out2 holds train.py output \(other/ckpt, other/met"):
            load_hf.main(["export", str(run_dir / "ckpt/step_000002"), str(out2), *extra])
    assert listing(out2) == before


def test_export_onto_a_file_or_a_foreign_directory_is_refused_without_overwrite(run_dir,
                                                                                 tmp_path):
    ckpt = str(run_dir / "ckpt/step_000002")
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match="notes.txt is a file; an export writes a directory"):
            load_hf.main(["export", ckpt, str(tmp_path / "notes.txt"), *extra])
    assert listing(tmp_path) == {"notes.txt": 4}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.bin").write_bytes(b"1234")
    with pytest.raises(SystemExit, match=r"mine exists and is not an export of ours .*--overwrite"):
        load_hf.main(["export", ckpt, str(mine)])
    assert listing(mine) == {"data.bin": 4}
    load_hf.main(["export", ckpt, str(mine), "--overwrite"])
    assert (mine / "model.safetensors").is_file() and not (mine / "data.bin").exists()
    load_hf.main(["export", ckpt, str(mine)])  # an earlier export of ours: replaced, no flag needed
    (mine / "eval.json").write_text("{}")  # a file the user added makes it theirs again
    with pytest.raises(SystemExit, match="not an export of ours"):
        load_hf.main(["export", ckpt, str(mine)])


def test_export_hf_onto_the_run_itself_is_refused_before_training(run_copy, byte_tokenizer,
                                                                   cache):
    before = listing(run_copy)
    for target in (run_copy, run_copy / "ckpt" / "hf"):
        args = small_args(byte_tokenizer, cache, run_copy, "--resume", "--overwrite",
                          "--export-hf", str(target))
        with pytest.raises(SystemExit, match=r"--export-hf .* would replace or lie inside .*ckpt"):
            train.main(args)
    assert listing(run_copy) == before


# ---- 2. the rerun guard covers everything a run writes; rotation deletes only its own names


def test_fresh_run_into_metrics_and_export_without_ckpt_is_refused(run_copy, byte_tokenizer,
                                                                   cache):
    load_hf.main(["export", str(run_copy / "ckpt/step_000002"), str(run_copy / "hf")])
    shutil.rmtree(run_copy / "ckpt")
    before = listing(run_copy)
    held = r"already holds metrics.jsonl, an HF export \(.*hf\): pass --resume.*--overwrite"
    with pytest.raises(SystemExit, match=held):
        train.main(small_args(byte_tokenizer, cache, run_copy, steps=2))
    assert listing(run_copy) == before


def test_rotation_keeps_a_users_step_best_checkpoint(run_copy, byte_tokenizer, cache):
    shutil.copytree(run_copy / "ckpt/step_000001", run_copy / "ckpt/step_000001_best")
    resume(byte_tokenizer, cache, run_copy, "--keep", "1", steps=4)
    assert sorted(p.name for p in (run_copy / "ckpt").iterdir()) == ["step_000001_best",
                                                                     "step_000004"]


def test_resume_of_a_finished_run_says_so_and_exports_only_a_missing_or_older_export(
        run_dir, run_copy, byte_tokenizer, cache, capsys):
    args = small_args(byte_tokenizer, cache, run_copy, "--save-every", "1", "--resume", steps=2)
    mark, meta = run_copy / "hf" / load_hf.EXPORT_MARK, run_copy / "ckpt/step_000002/train.json"
    train.main(args)  # finished, never exported
    log = capsys.readouterr().out
    assert "step 2 and --steps is 2: this run is finished" in log and "exported" in log
    written = mark.stat().st_mtime_ns
    train.main(args)
    log = capsys.readouterr().out
    assert "this run is finished" in log and "exported" not in log and "kept as it is" in log
    assert mark.stat().st_mtime_ns == written
    os.utime(meta, ns=(written + 10**9, written + 10**9))  # the checkpoint is newer than the export
    train.main(args)
    assert "exported" in capsys.readouterr().out and mark.stat().st_mtime_ns > written
    assert without_timing(metrics(run_copy)) == without_timing(metrics(run_dir))  # nothing trained


# ---- 3. a damaged checkpoint is named, and resume falls back to the newest intact one


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-shard": ("__0_0.distcp", truncate,
                        r"__0_0.distcp has \d+ bytes, not the \d+ written \(truncated\?\)"),
    "bit-flipped-shard": ("__0_0.distcp", flip,
                          r"__0_0.distcp does not match the checksum written with it"),
    "no-train-json": ("train.json", Path.unlink,
                      r"step_000002 is not a complete checkpoint of train.py"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_checkpoint_is_named_and_resume_falls_back(damage, run_dir, run_copy, tmp_path,
                                                           byte_tokenizer, cache, capsys):
    name, hurt, message = DAMAGE[damage]
    newest = run_copy / "ckpt" / "step_000002"
    hurt(newest / name)
    with pytest.raises(SystemExit, match=message):  # export verifies too, before writing
        load_hf.main(["export", str(newest), str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()
    resume(byte_tokenizer, cache, run_copy)
    log = capsys.readouterr().out
    assert f"falling back to {run_copy / 'ckpt/step_000001'}" in log
    assert len([line for line in log.splitlines() if "is damaged" in line and name in line]) == 1
    assert without_timing(metrics(run_copy)) == without_timing(metrics(run_dir))  # step 2 redone
    aside = [p.name.split(".")[1] for p in (run_copy / "ckpt").glob("step_000002.*")]
    assert len(aside) == 1 and aside[0].startswith("damaged-")  # kept, under a name no run reads
    checkpoint.verify_checkpoint(newest)  # written again, intact


def test_resume_with_every_checkpoint_damaged_is_an_error(run_copy, byte_tokenizer, cache):
    for ckpt in checkpoint.checkpoints(run_copy / "ckpt"):
        flip(ckpt / "__0_0.distcp")
    before = listing(run_copy)
    with pytest.raises(SystemExit, match=r"--resume: no checkpoint in .*ckpt is intact.*--overwr"):
        resume(byte_tokenizer, cache, run_copy)
    assert listing(run_copy) == before


# ---- 4. after a non-finite loss, only a checkpoint whose weights gave a finite loss is named


def test_non_finite_loss_names_the_last_good_checkpoint_and_resume_is_clean(run_copy,
                                                                            byte_tokenizer, cache):
    good = run_copy / "ckpt" / "step_000002"
    named = f"not finite.*The newest checkpoint whose weights gave a finite loss is {good}"
    with pytest.raises(SystemExit, match=named):
        resume(byte_tokenizer, cache, run_copy, "--lr", "1e30", "--grad-clip", "0", steps=4)
    ckpts = [p.name for p in checkpoint.checkpoints(run_copy / "ckpt")]
    assert ckpts == ["step_000001", "step_000002"]  # step 3's weights gave NaN: never saved
    resume(byte_tokenizer, cache, run_copy, steps=4)  # the first run's lr again
    rows = metrics(run_copy)
    assert [r["step"] for r in rows] == list(range(5))
    assert all(math.isfinite(r["loss"]) for r in rows[1:])
    recorded = checkpoint.read_train_meta(good)["loss"]  # what these weights gave on step 3's batch
    assert recorded == pytest.approx(rows[3]["loss"], rel=1e-5)


def test_resumed_weights_that_give_a_non_finite_loss_are_set_aside(run_copy, byte_tokenizer,
                                                                    cache):
    ckpt = run_copy / "ckpt"
    meta = checkpoint.read_train_meta(ckpt / "step_000002")
    meta = {k: meta[k] for k in ("config", "tokenizer", "world_size", "args")}
    try:  # NaN weights saved without a loss, as an older train.py saved them after step N
        _, _, device = train.setup_distributed("cpu")
        model = train.build_model(ModelConfig(**meta["config"]), device)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        optimizer = train.make_optimizer(model, 1e-3, 0.1, device)
        checkpoint.save_checkpoint(ckpt, 3, model, optimizer, meta, keep=10, rank=0, loss=None)
    finally:
        dist.destroy_process_group()
    named = f"step 4: loss nan.*finite loss is {ckpt / 'step_000002'}: --resume continues from it"
    with pytest.raises(SystemExit, match=named):
        resume(byte_tokenizer, cache, run_copy, steps=4)
    assert [p.name.split("-")[0] for p in ckpt.glob("step_000003*")] == ["step_000003.nonfinite"]
    resume(byte_tokenizer, cache, run_copy, steps=4)
    assert [r["step"] for r in metrics(run_copy)] == list(range(5))


# ---- 6. every bad value is named where it enters, before anything is written


FLAGS = {
    "ttt-chunk-0": (["--ttt-chunk", "0"], "--ttt-chunk 0: must be >= 1"),
    "ttt-chunk-negative": (["--ttt-chunk", "-4"], "--ttt-chunk -4: must be >= 1"),
    "override-not-an-int": (["--override", "hidden_size=abc"],
                            "hidden_size='abc' is not allowed: expected a positive integer"),
    "override-a-float": (["--override", "hidden_size=64.5"],
                         "hidden_size=64.5 is not allowed: expected a positive integer"),
    "override-without-equals": (["--override", "hidden_size"], "'hidden_size': expected KEY=VALUE"),
    "override-eos-string": (["--override", "eos_token_id=x"],
                            "eos_token_id='x' is not allowed: expected a token id"),
    "ttt-layers-not-ints": (["--ttt-layers", "1,x"],
                            "'1,x': expected comma-separated layer indices"),
    "ttt-layers-past-the-end": (["--ttt-layers", "9"],
                                "--ttt-layers 9: the model has 2 layers, so indices must be 0..1"),
    "lr-nan": (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    "ttt-lr-inf": (["--ttt-lr", "inf"], "--ttt-lr inf: must be a finite number >= 0"),
    "micro-batch-0": (["--micro-batch", "0"], "--micro-batch 0: must be >= 1"),
}


@pytest.mark.parametrize("flags", list(FLAGS), ids=list(FLAGS))
def test_bad_flag_values_are_named_before_anything_is_written(flags, tmp_path, byte_tokenizer,
                                                              capsys):
    extra, message = FLAGS[flags]
    args = small_args(byte_tokenizer, str(tmp_path / "cache"), tmp_path / "run", *extra)
    assert message in exit_message(capsys, train.main, args)
    assert list(tmp_path.iterdir()) == []


CONFIGS = {  # an edit of config.json, and what the message must say
    "missing-hidden-size": (lambda c: c.pop("hidden_size"), "hidden_size missing"),
    "string-size": (lambda c: c.update(hidden_size="64"),
                    "hidden_size='64' is not allowed: expected a positive integer"),
    "float-size": (lambda c: c.update(num_hidden_layers=3.0),
                   "num_hidden_layers=3.0 is not allowed"),
    "ttt-chunk-0": (lambda c: c.update(ttt_layers=[1], ttt_chunk=0), "ttt_chunk=0 is not allowed"),
    "eos-string": (lambda c: c.update(eos_token_id="2"),
                   "eos_token_id='2' is not allowed: expected a token id"),
    "heads-not-a-multiple": (lambda c: c.update(num_key_value_heads=3),
                             "num_heads=4 is not a multiple of num_kv_heads=3"),
}


@pytest.mark.parametrize("edit", list(CONFIGS), ids=list(CONFIGS))
def test_bad_config_json_values_are_named_with_the_file(edit, tmp_path, byte_tokenizer, capsys):
    path, _ = make_hf(tmp_path / "base", "qwen3")
    fn, message = CONFIGS[edit]
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    got = exit_message(capsys, load_hf.main, ["info", str(path)])
    assert f"{path / 'config.json'}: " in got and message in got
    args = ["--init", str(path), "--tokenizer", byte_tokenizer, "--out", str(tmp_path / "run"),
            "--cache", str(tmp_path / "cache")]
    got = exit_message(capsys, train.main, args)
    assert f"--init {path}: {path / 'config.json'}: " in got and message in got
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool], ids=["int32", "bool"])
def test_non_float_weights_are_refused_not_cast(dtype, saved, tmp_path, byte_tokenizer, capsys):
    key = "model.layers.0.mlp.up_proj.weight"
    rewrite_weights(saved, lambda s: {**s, key: s[key].to(dtype)})
    stored = f"{key} in .*model.safetensors is stored as {dtype}; only floating-point"
    with pytest.raises(ValueError, match=stored):
        load_hf.load_model(saved)
    args = ["--init", str(saved), "--tokenizer", byte_tokenizer, "--out", str(tmp_path / "run"),
            "--cache", str(tmp_path / "cache"), "--steps", "1", "--seq-len", "64",
            "--batch-tokens", "64"]
    assert f"--init {saved}: {key} in" in exit_message(capsys, train.main, args)


# ---- 7. what a killed run left is removed by the next run in that directory


def test_leftovers_of_killed_runs_are_removed_and_live_ones_kept(run_dir, tmp_path,
                                                                 byte_tokenizer):
    host = socket.gethostname()
    dead, live = f"{host}-{dead_pid()}", f"{host}-{os.getppid()}"
    elsewhere = f"otherhost-{dead_pid()}"  # another host's pid means nothing here: kept
    out = tmp_path / "out"
    for name in (f".hf.tmp-{dead}", f".hf.old.tmp-{dead}", f".hf.tmp-{live}",
                 f".hf.tmp-{elsewhere}"):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_bytes(b"x" * 1000)  # as a killed export leaves it
    load_hf.main(["export", str(run_dir / "ckpt/step_000002"), str(out / "hf")])
    assert sorted(p.name for p in out.iterdir()) == sorted(["hf", f".hf.tmp-{live}",
                                                            f".hf.tmp-{elsewhere}"])
    cache = tmp_path / "cache"
    cache.mkdir()
    orphan = cache / f".0123456789abcdef.bin.tmp-{dead}"  # a tokenisation killed half way
    orphan.write_bytes(b"\0" * 4096)
    token_cache(CORPUS[:1], Path(byte_tokenizer), 0, cache, rank=0)
    assert not orphan.exists() and len(list(cache.glob("*.bin"))) == 1
