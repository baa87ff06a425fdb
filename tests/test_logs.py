"""--wandb (offline) and --tensorboard write files their readers open, holding metrics.jsonl's rows; a missing package
is one line naming the flag and the install command."""

import json
import sys

import pytest

import train
from conftest import metrics, small_args

LOG_BLOCK, LOG_HEADER = 32768, 7  # wandb's .wandb file: a LevelDB-style log of protobuf Records


def wandb_history(path) -> list[dict]:
    """The history rows of an offline wandb run file, read as `wandb sync` reads it (its record log)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, part, rows = LOG_HEADER, b"", []
    while pos + LOG_HEADER <= len(data):
        room = LOG_BLOCK - pos % LOG_BLOCK
        if room < LOG_HEADER:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zeros: the rest of the block is padding
            pos += room
            continue
        part += data[pos + LOG_HEADER:pos + LOG_HEADER + length]
        pos += LOG_HEADER + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.HasField("history"):
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def numbers(row):
    return {k: v for k, v in row.items() if k != "step"}


def test_wandb_offline_and_tensorboard_log_the_metrics_rows(tmp_path, byte_tokenizer, cache, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -r requirements-extras.txt)")
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -r requirements-extras.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(small_args(byte_tokenizer, cache, tmp_path, "--wandb", "ttt-test", "--tensorboard", steps=8))
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(9)) and "val_loss" in rows[0] and "loss" in rows[1]

    tb = EventAccumulator(str(tmp_path / "tb")).Reload()
    for tag in {k for r in rows for k in numbers(r)}:
        logged = [(e.step, e.value) for e in tb.Scalars(tag)]
        want = [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in rows if tag in r]  # TB stores float32
        assert logged == want, tag

    run, = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run)
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for h, r in zip(history, rows):
        assert {k: v for k, v in h.items() if not k.startswith("_")} == numbers(r)


def test_tensorboard_resume_keeps_one_trajectory(tmp_path, byte_tokenizer, cache):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -r requirements-extras.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.main(small_args(byte_tokenizer, cache, tmp_path, "--tensorboard", "--no-export", steps=4))
    train.main(small_args(byte_tokenizer, cache, tmp_path, "--tensorboard", "--no-export", "--resume", steps=8))
    rows = metrics(tmp_path)
    tb = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in tb.Scalars("loss")] == [r["step"] for r in rows if "loss" in r] == list(range(1, 9))


@pytest.mark.parametrize("flag, package", [(["--wandb", "proj"], "wandb"), (["--tensorboard"], "tensorboard")],
                         ids=["wandb", "tensorboard"])
def test_a_logger_without_its_package_is_one_line(flag, package, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--out", str(tmp_path), *flag])
    assert str(e.value) == f"error: --{flag[0][2:]} needs the {package} package: pip install {package}"
