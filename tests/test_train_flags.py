"""What a newcomer sees from train.py's flags: the defaults in --help, and one line naming the flag for a value that
cannot run (before --out, the data or the model are touched)."""

import re

import pytest

import train
from data import batch_layout
from model import PRESETS, TTT_RECIPE


def test_help_shows_where_the_ttt_defaults_come_from():
    text = " ".join(train.make_parser().format_help().split())
    own = PRESETS["bytes"]
    assert f"(default: the preset's or checkpoint's own, bytes {','.join(map(str, own.ttt_layers))}; " \
           f"else every {TTT_RECIPE['every']}th from 0)" in text
    assert f"tokens per update (default: bytes {own.ttt_chunk}; else {TTT_RECIPE['chunk']})" in text
    assert f"fast-weight step size (default: bytes {own.ttt_lr:g}; else {TTT_RECIPE['lr']:g})" in text


def test_a_value_out_of_range_is_one_line_without_usage(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--steps", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.endswith("error: --steps 0: must be >= 1\n") and err.count("\n") == 1 and "usage" not in err


@pytest.mark.parametrize("out", ["default", "fresh"])
def test_missing_data_is_named_before_the_out_guard(out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "bytes").mkdir(parents=True)
    (tmp_path / "out" / "bytes" / "metrics.jsonl").write_text("{}\n")  # a previous run in the default --out
    argv = ["--data", "missing.txt"] + ([] if out == "default" else ["--out", "fresh"])
    with pytest.raises(SystemExit, match=r"^error: --data missing.txt: no such file or directory$"):
        train.main(argv)
    assert not (tmp_path / "fresh").exists()


def test_a_batch_that_is_not_whole_windows_names_the_flags_and_a_value_that_fits(tmp_path):
    argv = ["--batch-tokens", "4096", "--seq-len", "1000", "--out", str(tmp_path / "run")]
    message = ("error: --batch-tokens 4096 is not a whole number of windows of --seq-len 1000: a step is whole "
               "windows, e.g. --batch-tokens 4000")
    with pytest.raises(SystemExit, match=f"^{re.escape(message)}$"):
        train.main(argv)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    ((512, 1024, None, 1), "--batch-tokens 512 is not a whole number of windows of --seq-len 1024: a step is whole "
                           "windows, e.g. --batch-tokens 1024"),
    ((4096, 1024, None, 3), "--batch-tokens 4096 is 4 windows of --seq-len 1024, which 3 data-parallel ranks cannot "
                            "share equally: use a multiple of 3 x 1024 = 3072"),
    ((4096, 1024, 3, 1), "--micro-batch 3 does not divide the 4 windows each data-parallel rank takes per step "
                         "(--batch-tokens 4096 / --seq-len 1024 / 1 rank(s))"),
], ids=["below-one-window", "ranks", "micro-batch"])
def test_a_batch_layout_that_cannot_run_is_named(args, message):
    with pytest.raises(SystemExit, match=f"^{re.escape(message)}$"):
        batch_layout(*args)


@pytest.mark.parametrize("args, layout", [((4096, 1024, None, 1), (4, 4, 4)), ((524288, 8192, 1, 8), (64, 8, 1)),
                                          ((524288, 131072, 1, 2), (4, 2, 1))],
                         ids=["cpu-demo", "readme-8-ranks", "readme-cp4-on-8"])
def test_the_readme_batch_layouts_run(args, layout):
    assert batch_layout(*args) == layout


def test_train_errors_carry_the_prefix_the_other_scripts_use(tmp_path):
    with pytest.raises(SystemExit, match=rf"^error: --init {re.escape(str(tmp_path / 'nope'))}: no checkpoint"):
        train.main(["--init", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
