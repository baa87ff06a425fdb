"""bench.py runs end to end at toy sizes on a CPU and appends its tables (timings themselves are
never checked)."""

import torch

import bench
from model import MLP


def test_every_subcommand_runs_and_appends_a_table(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    bench.main(["ttt", "--device", "cpu", "--dtype", "fp32", "--dims", "32x64", "--seqs", "64",
                "--chunks", "16,64", "--repeats", "1", "--threads", "1", "--append", str(out)])
    bench.main(["sample", "--small", "--device", "cpu", "--dtype", "fp32", "--contexts", "64",
                "--prefills", "64", "--new-tokens", "4", "--no-compile", "--threads", "1",
                "--append", str(out)])
    bench.main(["train", "--small", "--device", "cpu", "--seqs", "64", "--repeats", "1",
                "--threads", "1", "--append", str(out)])
    text = out.read_text()
    assert "| 32×64 | 64 | 16 |" in text and "| 32×64 | 64 | 64 |" in text
    assert text.count("## ") == 3 and "`python bench.py train" in text
    assert "transformers" in text and "attention: PyTorch SDPA" in text


def test_ttt_bench_times_model_mlp_with_shared_weights():
    plain, fast = bench.mlp_pair(16, 32, 8, torch.device("cpu"), torch.float64)
    assert isinstance(plain, MLP) and isinstance(fast, MLP) and fast.use_ttt and not plain.use_ttt
    x = torch.randn(1, 24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(x, x), fast(x, x)
    torch.testing.assert_close(b[:, :8], a[:, :8])  # chunk 0 reads W0 alone
    assert (b[:, 8:] - a[:, 8:]).abs().max() > 1e-6  # later chunks read W0 + the updates


def test_tokenise_bench_checks_every_worker_count_writes_the_same_cache(tmp_path):
    out = tmp_path / "RESULTS.md"
    bench.main(["tokenise", "--workers", "1,2", "--copies", "1", "--repeats", "1", "--append", str(out)])
    text = out.read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert "## corpus.py tokenising (Qwen3 tokenizer)" in text and [r[0] for r in rows] == ["| 1", "| 2"]
    assert all(r[6] == "yes" for r in rows) and rows[0][2] == rows[1][2]  # same cache, same token count
