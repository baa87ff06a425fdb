"""cli.py: where a checkpoint named on the command line lives (a local directory or a hub id), and
sample.py's message for a local path that is not there."""

import re

import huggingface_hub
import pytest

import cli
import sample

LOCAL = ["./run", "/nonexistent-root-dir/run", "~/nonexistent-run-dir", "out/run/hf", "out/run"]


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: pytest.fail("a local-looking path went to the hub"))


@pytest.mark.parametrize("src", LOCAL, ids=["dot", "absolute", "home", "three-parts", "first-part-exists"])
def test_a_missing_path_that_looks_local_fails_at_once_without_the_hub(src, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # `out/run` has one "/", but out/ is here: a local path
    with pytest.raises(FileNotFoundError, match=f"^no checkpoint directory at {re.escape(src)} "):
        cli.resolve(src)


def test_a_hub_id_is_fetched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns: asked.append(repo) or str(tmp_path))
    assert cli.resolve("Qwen/Qwen3-0.6B-Base") == tmp_path
    assert asked == ["Qwen/Qwen3-0.6B-Base"]


def test_a_local_directory_is_itself(tmp_path, no_hub):
    assert cli.resolve(tmp_path) == tmp_path


def test_sample_names_the_flag_of_a_missing_local_model(tmp_path, monkeypatch, capsys, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        sample.main(["--model", "out/nonexistent", "--prompt", "hi"])
    assert capsys.readouterr().err == ("error: --model out/nonexistent: no checkpoint directory at "
                                       "out/nonexistent (and it is not a hub id like Qwen/Qwen3-0.6B)\n")
