"""A checkpoint from someone else, read by export and resume: its .metadata unpickled with exact globals and checked
by shape, its pickled entries by type, its train.json by one schema; the lock file of --out; a file-size limit or a
full disk during every write (a real RLIMIT_FSIZE in a subprocess)."""

import json
import os
import pickle
import resource
import subprocess
import sys
import threading
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import CORPUS, finished_run, small_args
from test_trust import reseal

import checkpoint
import files
import load_hf
import train
from files import TRAIN_META
from model import PRESETS, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, byte_tokenizer, cache):
    """A finished three-step run, a checkpoint after each step, no export."""
    return finished_run(tmp_path_factory, byte_tokenizer, cache, steps=3)


def resume(tok, cache, out, *extra, steps=4):
    return train.main(small_args(tok, cache, out, "--save-every", "1", "--no-export", "--resume", *extra,
                                 steps=steps))


def sh(text: str) -> bytes:
    return pickle.SHORT_BINUNICODE + bytes([len(text.encode())]) + text.encode()


def dotted_system(command: str, then: bytes = b"") -> bytes:
    """Protocol 4: STACK_GLOBAL('torch.distributed.checkpoint.metadata', 'os.system')(command), then `then` (the body
    of a genuine pickle: the payload runs and the real metadata is returned), else the call's result."""
    call = (sh("torch.distributed.checkpoint.metadata") + sh("os.system") + pickle.STACK_GLOBAL + sh(command)
            + pickle.TUPLE1 + pickle.REDUCE)
    return b"\x80\x04" + call + (pickle.POP + then if then else pickle.STOP)


# ---- .metadata: a dotted global never resolves, whatever comes after it


@pytest.mark.parametrize("genuine_after", [False, True], ids=["payload-only", "payload-then-genuine-metadata"])
def test_a_dotted_global_in_metadata_never_runs_on_export_or_resume(genuine_after, run_copy, tmp_path,
                                                                   byte_tokenizer, cache):
    ckpt, marker = run_copy / "ckpt" / "step_000003", tmp_path / "was-run"
    body = (ckpt / ".metadata").read_bytes()[2:] if genuine_after else b""  # past PROTO 4
    (ckpt / ".metadata").write_bytes(dotted_system(f"echo pwned > {marker}", body))
    reseal(ckpt)  # as whoever ships the checkpoint can
    refused = (r"step_000003/\.metadata refers to torch\.distributed\.checkpoint\.metadata\.os\.system, which a "
               r"train\.py checkpoint never holds")
    with pytest.raises(SystemExit, match=refused):
        load_hf.main(["export", str(ckpt), str(tmp_path / "hf")])
    with pytest.raises(SystemExit, match=refused):
        resume(byte_tokenizer, cache, run_copy)
    assert not marker.exists() and not (tmp_path / "hf").exists()


# ---- .metadata of other shapes: named, before DCP uses it


def reshape_metadata(ckpt, edit):
    with open(ckpt / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own file: safe to unpickle here
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(edit(metadata), f)
    reseal(ckpt)


def huge_size(m):
    m.state_dict_metadata["model.lm_head.weight"].size = torch.Size([2**45, 64])
    return m


def outside_path(m):
    for info in m.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    return m


def extra_field(m):
    m.state_dict_metadata["model.model.norm.weight"].properties.pin_memory = "yes"
    return m


HUGE = r"entry 'model\.lm_head\.weight' has size torch\.Size\(\[35184372088832, 64\]\), which no tensor of a"
SHAPES = {"a-dict-for-metadata": (lambda m: dict(m.state_dict_metadata), r"its top object is a dict"),
          "a-size-of-2**45": (huge_size, HUGE + r" checkpoint of [\d,]+ bytes has"),
          "storage-outside-the-checkpoint": (outside_path, r"the storage of '.*' is '\.\./\.\./elsewhere\.distcp' at .*"
                                                           r"not a range of a file beside it"),
          "a-string-for-a-flag": (extra_field, r"entry 'model\.model\.norm\.weight''s properties are not a dtype")}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_metadata_of_another_shape_is_refused_naming_the_file(shape, run_copy, tmp_path):
    edit, message = SHAPES[shape]
    ckpt = run_copy / "ckpt" / "step_000002"
    reshape_metadata(ckpt, edit)
    with pytest.raises(SystemExit, match=rf"error: {ckpt / '.metadata'}: {message}"):
        load_hf.main(["export", str(ckpt), str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_the_globals_admitted_are_exactly_those_real_checkpoints_hold(run_dir):
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    for ckpt in checkpoint.checkpoints(run_dir / "ckpt"):
        with open(ckpt / ".metadata", "rb") as f:
            Recorder(f).load()
    allowed = checkpoint.metadata_globals()
    classes = {k for k, v in allowed.items() if not isinstance(v, torch.dtype)}  # dtypes: all, each by exact name
    assert seen <= set(allowed) and classes <= seen
    assert not any("." in name for _, name in allowed)


# ---- pickled entries of the wrong type: named on resume


def rewrite_state(ckpt, tmp_path, edit):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(ckpt, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)  # our own file
    edit(state["optim"]["param_groups"][1])
    for name in os.listdir(ckpt):
        if name != TRAIN_META:
            os.unlink(ckpt / name)
    dcp.save(state, checkpoint_id=ckpt, no_dist=True)
    reseal(ckpt)


ENTRIES = {"betas-a-string": (lambda g: g.update(betas="0.8,0.99"),
                              r"optim\.param_groups\.1\.betas holds '0\.8,0\.99' \(str\) where a train\.py checkpoint "
                              r"holds a tuple"),
           "eps-a-list": (lambda g: g.update(eps=[1e-6]),
                          r"optim\.param_groups\.1\.eps holds '\[1e-06\]' \(list\) where a train\.py checkpoint holds "
                          r"a float"),
           "weight-decay-nan": (lambda g: g.update(weight_decay=float("nan")),
                                r"optim\.param_groups\.1\.weight_decay holds 'nan' \(float\)")}


@pytest.mark.parametrize("entry", list(ENTRIES), ids=list(ENTRIES))
def test_an_optimizer_entry_of_the_wrong_type_is_refused_naming_it(entry, run_copy, tmp_path, byte_tokenizer, cache):
    edit, message = ENTRIES[entry]
    rewrite_state(run_copy / "ckpt" / "step_000003", tmp_path, edit)
    with pytest.raises(SystemExit, match=rf"step_000003: its entry {message}"):
        resume(byte_tokenizer, cache, run_copy)


# ---- train.json: one schema check, before anything is allocated


def with_config(**fields):
    return lambda meta: {**meta, "config": {**meta["config"], **fields}}


TRAIN_JSON = {
    "hidden-size-a-string": (with_config(hidden_size="64"), r'config field hidden_size is "64", but a train\.json '
                                                            r"holds an integer 1 to 2\*\*20"),
    "vocab-of-2**36": (with_config(vocab_size=2**36), r"config field vocab_size is 68719476736"),
    "a-model-larger-than-its-files": (with_config(vocab_size=2**30), r"its config describes a model of "
                                      r"[\d,]+ weights, more than the [\d,]+ bytes of the checkpoint's files"),
    "step-a-float": (lambda m: {**m, "step": 3.5}, r"step is 3\.5, but a train\.json holds a step count"),
    "world-size-zero": (lambda m: {**m, "world_size": 0}, r"world_size is 0"),
    "a-record-outside": (lambda m: {**m, "files": {"../../../etc/hostname": {"size": 1, "sha256": "0" * 64}}},
                         r"files is .*etc/hostname"),
    "a-list-for-the-file": (lambda m: [m], r"the file is \[.*but a train\.json holds an object"),
    "an-unknown-field": (lambda m: {**m, "resume_hook": "x"}, r"field 'resume_hook' is \"x\""),
}


@pytest.mark.parametrize("case", list(TRAIN_JSON), ids=list(TRAIN_JSON))
def test_a_train_json_of_wrong_types_or_absurd_sizes_is_refused_naming_file_field_and_value(case, run_copy, tmp_path):
    edit, message = TRAIN_JSON[case]
    ckpt = run_copy / "ckpt" / "step_000003"
    meta = edit(checkpoint.read_train_meta(ckpt))
    if isinstance(meta, dict):
        meta["sha256"] = checkpoint.meta_digest(meta)
    (ckpt / TRAIN_META).write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=rf"error: {ckpt / TRAIN_META}: {message}"):
        load_hf.main(["export", str(ckpt), str(tmp_path / "hf")])


def test_every_train_json_this_project_wrote_is_admitted(run_dir):
    meta = checkpoint.read_train_meta(run_dir / "ckpt" / "step_000003")
    older = {k: v for k, v in meta.items() if k in ("config", "tokenizer", "world_size", "args", "step")}
    older["config"] = {**meta["config"], "ttt_mode": True}  # before ttt_mode was retired; no record, no data
    for m in (meta, older, {**meta, "loss": None, "data": None}):
        checkpoint.check_train_meta(json.loads(json.dumps(m)), Path("train.json"))


@pytest.mark.parametrize("on", [False, True], ids=["defaults", "every-option-on"])
def test_every_modelconfig_field_train_py_writes_is_admitted(on):
    cfg = PRESETS["tiny"]
    if on:  # every field at a non-default value its own check admits
        cfg = replace(cfg, ttt_key_norm=True, ttt_target_norm=True, ttt_norm_preserve=True,
                      ttt_lr_warmup=200, ttt_clip_tau=0.5, ttt_lookahead=False, sliding_window=64)
    checkpoint.check_config_fields(json.loads(json.dumps(asdict(cfg))), Path("train.json"))
    assert {f.name for f in fields(ModelConfig)} <= set(checkpoint.CONFIG_FIELDS)


# ---- the lock file of --out


def not_utf8(lock):
    lock.write_bytes(b"host \xff\xfe\x00, pid 1")


def a_directory(lock):
    lock.mkdir()
    (lock / "inside").write_text("x")


LOCKS = {"not-utf-8": (not_utf8, r"holds 15 bytes that are not the UTF-8 line train\.py writes there"),
         "a-directory": (a_directory, r"is a directory, not the lock file train\.py writes"),
         "a-fifo": (os.mkfifo, r"is a FIFO, not the lock file train\.py writes")}


@pytest.mark.parametrize("case", list(LOCKS), ids=list(LOCKS))
def test_a_lock_that_is_not_ours_is_named_and_never_hangs(case, run_copy, byte_tokenizer, cache):
    make, message = LOCKS[case]
    make(run_copy / ".lock")
    outcome = []

    def attempt():
        try:
            resume(byte_tokenizer, cache, run_copy)
        except SystemExit as e:
            outcome.append(str(e.code))

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "train.py hung on the lock file"
    assert len(outcome) == 1 and outcome[0].startswith(f"error: {run_copy / '.lock'} ")
    assert __import__("re").search(message, outcome[0])
    assert (run_copy / ".lock").exists() and [r for r in (run_copy / "metrics.jsonl").read_text().splitlines()]


# ---- a file-size limit during a write: named, the partial write removed, nothing older lost


def limited(code: str, limit: int, timeout=300) -> subprocess.CompletedProcess:
    """Run python `code` under RLIMIT_FSIZE `limit` (bytes), SIGXFSZ left at its default (which kills): the code
    under test must ignore it itself. No .pyc is written: it could cross the limit before the code starts."""
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, preexec_fn=cap, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def test_a_file_size_limit_while_checkpointing_keeps_every_older_checkpoint(run_copy, byte_tokenizer, cache):
    args = small_args(byte_tokenizer, cache, run_copy, "--save-every", "1", "--no-export", "--resume", steps=5)
    done = limited(f"import sys; sys.argv[1:] = {args!r}; import train; train.main()", 300_000)
    ckpt = run_copy / "ckpt"
    assert done.returncode == 1, done.stderr[-2000:]
    assert (f"file too large for {ckpt} (the file-size limit, ulimit -f, is 300,000 bytes): checkpoint "
            f"step_000004 was not saved (its partial files are removed; older checkpoints are kept: step_000001, "
            f"step_000002, step_000003)") in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000001", "step_000002", "step_000003"]
    for step in checkpoint.checkpoints(ckpt):
        checkpoint.verify_checkpoint(step)


def test_a_file_size_limit_while_exporting_names_the_target_and_keeps_the_earlier_export(run_dir, tmp_path):
    target = tmp_path / "hf"
    load_hf.main(["export", str(run_dir / "ckpt" / "step_000001"), str(target)])
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    done = limited(f"import load_hf; load_hf.main(['export', {str(run_dir / 'ckpt' / 'step_000003')!r}, "
                   f"{str(target)!r}])", 100_000)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert (f"file too large for {tmp_path} (the file-size limit, ulimit -f, is 100,000 bytes): {target} was not "
            f"written (its partial write is removed; the earlier one is kept)") in done.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_file_size_limit_while_tokenising_names_the_cache_and_leaves_nothing(tmp_path, byte_tokenizer):
    cache = tmp_path / "cache"
    code = (f"import data; from pathlib import Path; data.token_cache({CORPUS[:2]!r}, Path({byte_tokenizer!r}), 0, "
            f"Path({str(cache)!r}), rank=0)")
    done = limited(code, 20_000)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert (f"file too large for {cache} (the file-size limit, ulimit -f, is 20,000 bytes) while tokenising into "
            in done.stderr) and "(the partial cache is removed)" in done.stderr
    assert list(cache.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to fill a disk")
def test_a_full_disk_while_appending_a_metrics_row_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(SystemExit, match=rf"no space left on {tmp_path}: a row of {tmp_path / 'metrics.jsonl'} was "
                                         rf"not written \(the checkpoints are kept"):
        files.append_line(tmp_path / "metrics.jsonl", '{"step": 1}')
