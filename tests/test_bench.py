"""bench.py runs end to end at toy sizes on a CPU and appends its tables (timings themselves are never checked)."""

import bench


def test_every_subcommand_runs_and_appends_a_table(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    bench.main(["ttt", "--device", "cpu", "--dtype", "fp32", "--dims", "32x64", "--seqs", "64", "--chunks", "16,64",
                "--repeats", "1", "--threads", "1", "--append", str(out)])
    bench.main(["sample", "--small", "--device", "cpu", "--dtype", "fp32", "--contexts", "64", "--prefills", "64",
                "--new-tokens", "4", "--no-compile", "--threads", "1", "--append", str(out)])
    bench.main(["train", "--small", "--device", "cpu", "--seqs", "64", "--repeats", "1", "--threads", "1",
                "--append", str(out)])
    text = out.read_text()
    assert "| 32×64 | 64 | 16 |" in text and "| 32×64 | 64 | 64 |" in text
    assert text.count("## ") == 3 and "`python bench.py train" in text
    assert "transformers" in text
