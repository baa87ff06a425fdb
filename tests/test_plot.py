import importlib.util
import sys

import pytest
from conftest import metrics, small_args

import plot
import train

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, byte_tokenizer, cache):
    """A real train.py run of 8 steps, validated at steps 0, 4 and 8 in two position buckets, TTT in layers 0 and 1."""
    out = tmp_path_factory.mktemp("plot") / "run"
    train.main(small_args(byte_tokenizer, cache, out, "--no-export", "--seq-len", "128", steps=8))
    return out


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is optional and not installed here")
def test_curves_of_a_real_run_hold_its_metrics(tiny_run, tmp_path):
    rows = metrics(tiny_run)
    fig = plot.main([str(tiny_run), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss, pos, dw = fig.axes
    lines = {ax: {line.get_label().split(": ")[1]: (list(line.get_xdata()), list(line.get_ydata()))
                  for line in ax.lines} for ax in fig.axes}
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4, 8]
    assert lines[loss]["train"] == ([r["step"] for r in rows if "loss" in r],
                                    [r["loss"] for r in rows if "loss" in r])
    assert lines[loss]["validation"] == ([0, 4, 8], [r["val_loss"] for r in val])
    buckets = [k.split(".", 1)[1] for k in val[0] if k.startswith("val_loss_pos.")]
    assert list(lines[pos]) == buckets and len(buckets) > 1
    assert lines[pos][buckets[-1]][1] == [r[f"val_loss_pos.{buckets[-1]}"] for r in val]
    assert list(lines[dw]) == ["layer 0", "layer 1"]
    assert lines[dw]["layer 1"] == ([0, 4, 8], [r["ttt_dw_rel.1"] for r in val])


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is optional and not installed here")
def test_runs_overlay_and_the_default_png_sits_in_the_first_run(tiny_run, tmp_path):
    torn = tmp_path / "torn"
    torn.mkdir()
    text = (tiny_run / "metrics.jsonl").read_text()
    (torn / "metrics.jsonl").write_text("not json\n" + text[:len(text) // 2])  # killed mid-line
    fig = plot.main([str(tiny_run), str(torn / "metrics.jsonl")])
    assert (tiny_run / "curves.png").is_file()
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == [f"{tiny_run}: train", f"{tiny_run}: validation", f"{torn}: train",
                      f"{torn}: validation"]


def test_torn_and_foreign_lines_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0, "val_loss": 5.5}\n[1, 2]\n{"loss": 3.0}\n\xff\xfe garbage\n'
                     b'{"step": 1, "loss": 4.25}\n{"step": 2, "loss": 4.')
    assert plot.read_metrics(str(tmp_path)) == (path, [{"step": 0, "val_loss": 5.5},
                                                       {"step": 1, "loss": 4.25}])


@pytest.mark.parametrize("content", [None, b"", b'{"step": 3, "lo'], ids=["missing", "empty", "torn"])
def test_a_file_without_usable_rows_is_named(tmp_path, content):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        plot.read_metrics(str(path))
    assert str(path) in str(e.value.code) and str(e.value.code).startswith("error: ")


def test_without_matplotlib_it_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path)])
    assert "pip install matplotlib" in str(e.value.code)
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is optional and not installed here")
def test_an_unwritable_png_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path), "--out", str(tmp_path / "no-such-dir" / "c.png")])
    assert str(e.value.code).startswith(f"error: cannot write {tmp_path / 'no-such-dir' / 'c.png'}")
