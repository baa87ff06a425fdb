"""Trust nothing you did not write: a checkpoint from someone else cannot run code, a resume continues the same
run or refuses, and every bad input is named."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import CORPUS, finished_run, metrics, small_args, without_timing

import checkpoint
import data
import load_hf
import train
import files
from checkpoint import meta_digest, read_train_meta
from files import TRAIN_META, file_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, byte_tokenizer, cache):
    """A finished three-step run, a checkpoint after each step, no export."""
    return finished_run(tmp_path_factory, byte_tokenizer, cache, steps=3)


def resume(tok, cache, out, *extra, steps=3):
    return train.main(small_args(tok, cache, out, "--save-every", "1", "--no-export", "--resume", *extra,
                                 steps=steps))


def reseal(ckpt, **changes):
    """Rewrite ckpt's train.json as whoever ships a checkpoint can: its integrity record matching the files as they
    are now, its own checksum updated, `changes` applied."""
    meta = read_train_meta(ckpt)
    meta.update(changes)
    meta["files"] = file_record(ckpt, [n for n in sorted(os.listdir(ckpt)) if n != TRAIN_META])
    meta["sha256"] = meta_digest(meta)
    (ckpt / TRAIN_META).write_text(json.dumps(meta, indent=2))


class Payload:
    """Unpickled, it runs a command: it touches `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---- 2. opening someone else's checkpoint never runs its code


def test_a_hostile_metadata_file_is_refused_by_export_and_resume_and_never_runs(run_copy, tmp_path, byte_tokenizer,
                                                                                cache, capsys):
    import pickle
    ckpt, marker = run_copy / "ckpt" / "step_000003", tmp_path / "ran"
    with open(ckpt / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file: safe to unpickle here
    metadata.storage_meta = Payload(marker)
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    reseal(ckpt)
    refused = r"step_000003/\.metadata refers to posix\.system, which a train\.py checkpoint never holds"
    with pytest.raises(SystemExit, match=refused):
        load_hf.main(["export", str(ckpt), str(tmp_path / "hf")])
    with pytest.raises(SystemExit, match=refused):
        resume(byte_tokenizer, cache, run_copy, steps=4)
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_a_hostile_pickled_entry_is_refused_by_resume_and_never_runs(run_copy, tmp_path, byte_tokenizer, cache):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    ckpt, marker = run_copy / "ckpt" / "step_000003", tmp_path / "ran"
    dcp_to_torch_save(ckpt, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)  # our own file
    state["optim"]["param_groups"][0]["lr"] = Payload(marker)
    for name in os.listdir(ckpt):
        if name != TRAIN_META:
            os.unlink(ckpt / name)
    dcp.save(state, checkpoint_id=ckpt, no_dist=True)  # pickled, not run
    reseal(ckpt)
    load_hf.main(["export", str(ckpt), str(tmp_path / "hf")])  # reads the weights only
    assert not marker.exists()
    with pytest.raises(SystemExit, match=r"its entry optim\.param_groups\.0\.lr refers to posix\.system"):
        resume(byte_tokenizer, cache, run_copy, steps=4)
    assert not marker.exists()


# ---- 3. a resume continues the same run, or refuses


@pytest.fixture
def own_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in CORPUS[:3]:
        shutil.copy(f, corpus)
    return corpus


def test_resume_on_changed_text_data_is_refused_naming_the_file_unless_allowed(own_corpus, tmp_path,
                                                                               byte_tokenizer, capsys):
    out, cache = tmp_path / "run", str(tmp_path / "cache")
    args = lambda *extra, steps=2: [*small_args(byte_tokenizer, cache, out, "--save-every", "1", "--no-export",
                                                *extra, steps=steps), "--data", str(own_corpus)]
    train.main(args())
    changed = own_corpus / Path(CORPUS[1]).name
    changed.write_text(changed.read_text() + "\nA sentence added after the kill.\n")
    with pytest.raises(SystemExit, match=rf"its run trained on other data \({changed.resolve()} changed since"
                                         rf".*--allow-data-change"):
        train.main(args("--resume", steps=3))
    assert [r["step"] for r in metrics(out)][-1] == 2  # nothing written
    train.main(args("--resume", "--allow-data-change", steps=3))
    assert f"warning: continuing {out / 'ckpt' / 'step_000002'} on other data" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)][-1] == 3


def test_resume_on_a_rewritten_npz_is_refused_naming_it(tmp_path, byte_tokenizer):
    rng = np.random.default_rng(0)
    npz, out = tmp_path / "tokens.npz", tmp_path / "run"
    np.savez(npz, tokens=rng.integers(0, 256, 4000).astype(np.uint32))
    args = lambda *extra, steps=2: [*small_args(byte_tokenizer, str(tmp_path / "cache"), out, "--save-every", "1",
                                                "--no-export", *extra, steps=steps), "--data", str(npz)]
    train.main(args())
    np.savez(npz, tokens=rng.integers(0, 256, 4000).astype(np.uint32))  # same size, other ids
    with pytest.raises(SystemExit, match=rf"{npz.resolve()} changed since"):
        train.main(args("--resume", steps=3))


def test_a_rewrite_with_the_same_size_and_mtime_is_tokenised_again(tmp_path, byte_tokenizer):
    doc, cache = tmp_path / "doc.txt", tmp_path / "cache"
    doc.write_text("the first text, of some length")
    first = data.token_cache([str(doc)], Path(byte_tokenizer), 0, cache, rank=0).tolist()
    st = doc.stat()
    doc.write_text("a second text, of same length!")  # as many bytes
    os.utime(doc, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert doc.stat().st_size == st.st_size and doc.stat().st_mtime_ns == st.st_mtime_ns
    again = data.token_cache([str(doc)], Path(byte_tokenizer), 0, cache, rank=0).tolist()
    fresh = data.token_cache([str(doc)], Path(byte_tokenizer), 0, tmp_path / "fresh", rank=0).tolist()
    assert again == fresh != first


def rename_step_2_to_30(ckpt):
    shutil.rmtree(ckpt / "step_000003")
    os.replace(ckpt / "step_000002", ckpt / "step_000030")


def edit_step_3_to_5(ckpt):
    meta = read_train_meta(ckpt / "step_000003")
    (ckpt / "step_000003" / TRAIN_META).write_text(json.dumps({**meta, "step": 5}))


TAMPER = {"edited-step": (edit_step_3_to_5, "step_000003", r"train.json was changed after it was written",
                          "step_000002"),
          "renamed-directory": (rename_step_2_to_30, "step_000030", r"step_000030 holds step 2 by its train.json",
                                "step_000001")}


@pytest.mark.parametrize("tamper", list(TAMPER), ids=list(TAMPER))
def test_a_checkpoint_whose_name_step_and_record_disagree_is_damaged(tamper, run_dir, run_copy, byte_tokenizer,
                                                                     cache, capsys):
    hurt, name, message, fallback = TAMPER[tamper]
    hurt(run_copy / "ckpt")
    with pytest.raises(ValueError, match=message):
        load_hf.verify_checkpoint(run_copy / "ckpt" / name)
    resume(byte_tokenizer, cache, run_copy)
    log = capsys.readouterr().out
    assert re_search(rf"checkpoint .*{name} is damaged: .*{message}", log)
    assert f"falling back to {run_copy / 'ckpt' / fallback}" in log
    assert without_timing(metrics(run_copy)) == without_timing(metrics(run_dir))  # the same run, redone


def re_search(pattern, text):
    import re
    return re.search(pattern, text) is not None


def test_a_second_run_on_one_out_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(
        tmp_path, byte_tokenizer, capsys):
    out, cache = tmp_path / "run", str(tmp_path / "cache")
    first = small_args(byte_tokenizer, cache, out, "--no-export", "--save-every", "1000", steps=100000)
    holder = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *first], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        held = rf"{out} is in use by another run \(host .*, pid {holder.pid}, since .*\): wait for it"
        for extra in (["--resume"], ["--overwrite"]):
            with pytest.raises(SystemExit, match=held):
                train.main(small_args(byte_tokenizer, cache, out, "--no-export", *extra, steps=2))
    finally:
        holder.kill()
        holder.wait()
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(len(rows)))  # only the holder wrote them
    train.main(small_args(byte_tokenizer, cache, out, "--no-export", "--overwrite", steps=2))
    assert f"took over {out / '.lock'} from a run that is gone (host" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == [0, 1, 2] and not (out / ".lock").exists()


def test_metrics_are_rewritten_whole_or_not_at_all(run_copy, byte_tokenizer, cache, monkeypatch):
    before = (run_copy / "metrics.jsonl").read_text()

    def torn(self, data):  # a kill half way through the write
        with open(self, "wb") as f:
            f.write((data.encode() if isinstance(data, str) else data)[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", torn)
    monkeypatch.setattr(Path, "write_bytes", torn)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prepare_out(run_copy, 2)
    assert (run_copy / "metrics.jsonl").read_text() == before


def test_resume_after_a_kill_before_the_first_checkpoint_starts_afresh(tmp_path, byte_tokenizer, cache, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "val_loss": 5.5}\n')  # all a run killed at step 1 leaves
    resume(byte_tokenizer, cache, out, steps=2)
    assert f"--resume: no checkpoint in {out / 'ckpt'} to continue" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == [0, 1, 2] and metrics(out)[0]["val_loss"] != 5.5


def link_in_ckpt(run, elsewhere):
    shutil.copytree(run / "ckpt" / "step_000003", elsewhere)
    shutil.rmtree(run / "ckpt" / "step_000003")
    (run / "ckpt" / "step_000003").symlink_to(elsewhere)
    return run / "ckpt" / "step_000003"


def linked_metrics(run, elsewhere):
    elsewhere.write_text((run / "metrics.jsonl").read_text())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(elsewhere)
    return run / "metrics.jsonl"


@pytest.mark.parametrize("make_link", [link_in_ckpt, linked_metrics], ids=["checkpoint", "metrics"])
def test_a_link_out_of_the_run_directory_is_refused_and_its_target_untouched(make_link, run_copy, tmp_path,
                                                                            byte_tokenizer, cache):
    link = make_link(run_copy, tmp_path / "elsewhere")
    target = sorted(p.stat().st_size for p in [tmp_path / "elsewhere", *(tmp_path / "elsewhere").rglob("*")])
    for extra in (["--keep", "1"], ["--overwrite"]):
        with pytest.raises(SystemExit, match=rf"{link} is a symbolic link \(to .*elsewhere\): train.py never"):
            resume(byte_tokenizer, cache, run_copy, *extra, steps=5)
    assert sorted(p.stat().st_size for p in [tmp_path / "elsewhere", *(tmp_path / "elsewhere").rglob("*")]) == target


def test_an_export_onto_a_link_is_refused_even_with_overwrite(run_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "hf").symlink_to(tmp_path / "mine")
    with pytest.raises(SystemExit, match=r"hf is a symbolic link \(to .*mine\): an export never writes through"):
        load_hf.main(["export", str(run_dir / "ckpt" / "step_000003"), str(tmp_path / "hf"), "--overwrite"])
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# ---- 4. bad input, named


def test_metrics_lines_that_are_no_rows_are_named_and_dropped_on_resume(run_dir, run_copy, byte_tokenizer, cache,
                                                                       capsys):
    path = run_copy / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + [b'{"loss": 1.0}\n', b"\xff\xfe not utf-8\n"] + lines[2:]))
    shutil.rmtree(run_copy / "ckpt" / "step_000003")
    resume(byte_tokenizer, cache, run_copy)
    log = capsys.readouterr().out
    assert f"warning: {path}:3 is not a metrics row; dropped" in log and f"{path}:4 is not" in log
    assert without_timing(metrics(run_copy)) == without_timing(metrics(run_dir))


def test_a_train_json_that_does_not_fit_the_shards_is_named(run_copy, tmp_path):
    ckpt = run_copy / "ckpt" / "step_000003"
    meta = read_train_meta(ckpt)
    reseal(ckpt, config={**meta["config"], "intermediate_size": 96})
    with pytest.raises(SystemExit, match=r"step_000003: its shards do not fit the model its train.json describes"):
        load_hf.main(["export", str(ckpt), str(tmp_path / "hf")])


def test_export_after_the_runs_tokenizer_is_gone_says_to_pass_tokenizer(tmp_path, byte_tokenizer, cache):
    tok = tmp_path / "tok"
    shutil.copytree(byte_tokenizer, tok)
    out = tmp_path / "run"
    train.main(small_args(str(tok), cache, out, "--no-export", steps=1))
    shutil.rmtree(tok)
    gone = rf"the run's tokenizer {tok} \(named in .*train.json\) is gone.*pass --tokenizer DIR"
    with pytest.raises(SystemExit, match=gone):
        load_hf.main(["export", str(out / "ckpt" / "step_000001"), str(tmp_path / "hf")])
    load_hf.main(["export", str(out / "ckpt" / "step_000001"), str(tmp_path / "hf"), "--tokenizer", byte_tokenizer])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_an_export_hf_that_cannot_be_made_is_refused_before_training(tmp_path, byte_tokenizer, cache):
    (tmp_path / "afile").write_text("not a directory")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--export-hf .*afile/hf: .*afile/hf cannot be made: .*afile is a file"):
        train.main(small_args(byte_tokenizer, cache, out, "--export-hf", str(tmp_path / "afile" / "hf"), steps=2))
    assert not out.exists()


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to fill a disk")


@needs_dev_full
def test_a_full_disk_while_checkpointing_keeps_the_older_checkpoints(run_copy, byte_tokenizer, cache, monkeypatch):
    real_save = dcp.save

    def onto_a_full_disk(state, checkpoint_id):  # the shard file is /dev/full: every write fails with ENOSPC
        Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_id) / "__0_0.distcp").symlink_to("/dev/full")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", onto_a_full_disk)
    ckpt = run_copy / "ckpt"
    with pytest.raises(SystemExit, match=rf"no space left on {ckpt}: checkpoint step_000004 was not saved .*older "
                                         rf"checkpoints are kept: step_000001, step_000002, step_000003\)"):
        resume(byte_tokenizer, cache, run_copy, steps=4)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000001", "step_000002", "step_000003"]
    load_hf.verify_checkpoint(ckpt / "step_000003")


@needs_dev_full
def test_a_full_disk_while_tokenising_is_named_and_leaves_no_partial_cache(tmp_path, byte_tokenizer, monkeypatch):
    full = tmp_path / "cache" / ".partial"
    full.parent.mkdir()
    full.symlink_to("/dev/full")
    monkeypatch.setattr(files, "tmp_sibling", lambda path: full)  # the partial cache's writes fail with ENOSPC
    with pytest.raises(SystemExit, match=r"no space left on .*cache while tokenising into .*\.bin \(the partial"):
        data.token_cache(CORPUS[:1], Path(byte_tokenizer), 0, tmp_path / "cache", rank=0)
    assert list((tmp_path / "cache").iterdir()) == []
