"""The readers of what someone else may have written, fed random and mutated input (hypothesis): the .metadata
unpickler, train.json, the --out lock file. Each returns what ours wrote or raises our error naming the file: never
another exception, never a hang, never a side effect (a payload's marker file)."""

import copyreg
import inspect
import json
import os
import pickle
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoint
import files

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no reader's `except Exception` can swallow it."""


@contextmanager
def no_hang(seconds=10):
    def ring(*_):
        raise Hang(f"still reading after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A DCP checkpoint of tensors and pickled entries, as train.py's holds them (written in one process)."""
    path = tmp_path_factory.mktemp("dcp") / "step_000001"
    model = torch.nn.Linear(4, 3)
    dcp.save({"model": model.state_dict(), "optim": {"param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]}},
             checkpoint_id=path, no_dist=True)
    return path


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    return tmp_path_factory.mktemp("marker") / "payload-ran"


def ran(marker) -> bool:
    """Whether a payload touched `marker`; cleared, so the next example (and hypothesis's shrinking) starts clean."""
    was = marker.exists()
    marker.unlink(missing_ok=True)
    return was


def read(ckpt, data: bytes):
    """checkpoint.read_metadata of `data` as ckpt's .metadata: the metadata, or the error, which must be ours."""
    (ckpt / ".metadata").write_bytes(data)
    try:
        with no_hang():
            return checkpoint.read_metadata(ckpt)
    except ValueError as e:  # UnsafeFile, DamagedMetadata, "is damaged": each names the file
        assert str(ckpt / ".metadata") in str(e)
        return e


@pytest.fixture(scope="module")
def genuine(ckpt):
    return (ckpt / ".metadata").read_bytes()


def test_the_genuine_metadata_is_read_as_written(ckpt, genuine):
    with open(ckpt / ".metadata", "rb") as f:
        assert read(ckpt, genuine) == pickle.load(f)  # our own file: the oracle is plain pickle


@FUZZ
@given(data=st.binary(max_size=400), proto=st.sampled_from([b"", *(b"\x80" + bytes([p]) for p in range(6))]))
def test_random_bytes_are_refused_as_damaged(ckpt, marker, data, proto):
    assert isinstance(read(ckpt, proto + data), ValueError)
    assert not ran(marker)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "delete", "insert", "cut"]), st.integers(0, 2**20),
                                st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
def test_mutated_metadata_is_read_as_written_or_refused(ckpt, genuine, marker, edits):
    data = bytearray(genuine)
    for kind, at, junk in edits:
        at %= len(data) + 1
        if kind == "flip" and at < len(data):
            data[at] ^= junk[0] or 1
        elif kind == "delete":
            del data[at:at + len(junk)]
        elif kind == "insert":
            data[at:at] = junk
        elif kind == "cut":
            del data[at:]
    got = read(ckpt, bytes(data))
    assert isinstance(got, (ValueError, dcp_metadata.Metadata))
    assert not ran(marker)


# ---- every opcode that reaches a global, with every name a payload would try

def candidate_names():
    """(module, name) pairs a payload would try: every module DCP's metadata module imports and their attributes,
    dotted names through them, the names we admit, and the usual suspects."""
    mods = [v for v in vars(dcp_metadata).values() if inspect.ismodule(v)]
    pairs = [(m.__name__, n) for m in mods for n in sorted(vars(m))[:400:7]]
    pairs += [(dcp_metadata.__name__, f"{m.__name__.split('.')[-1]}.{n}") for m in mods for n in ("system", "load",
                                                                                                   "remove", "popen")]
    pairs += [(dcp_metadata.__name__, "os.system"), ("os", "system"), ("posix", "system"), ("builtins", "eval"),
              ("builtins", "exec"), ("subprocess", "call"), ("torch", "load"), ("torch.serialization", "load"),
              ("pathlib", "Path.unlink"), ("torch", "Size.__class__"), ("collections", "OrderedDict")]
    pairs += list(checkpoint.metadata_globals())[:40]
    return pairs


def text_global(module, name) -> bytes:
    return f"{module}\n{name}\n".encode()


def stack_global(module, name) -> bytes:
    return files_bytes(module) + files_bytes(name) + pickle.STACK_GLOBAL


def files_bytes(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + len(b).to_bytes(4, "little") + b


def command(marker) -> bytes:
    return files_bytes(f"touch {marker}")


OPCODES = {
    "GLOBAL+REDUCE": lambda m, n, c: pickle.GLOBAL + text_global(m, n) + c + pickle.TUPLE1 + pickle.REDUCE,
    "STACK_GLOBAL+REDUCE": lambda m, n, c: stack_global(m, n) + c + pickle.TUPLE1 + pickle.REDUCE,
    "INST": lambda m, n, c: pickle.MARK + c + pickle.INST + text_global(m, n),
    "OBJ": lambda m, n, c: pickle.MARK + stack_global(m, n) + c + pickle.OBJ,
    "NEWOBJ": lambda m, n, c: stack_global(m, n) + c + pickle.TUPLE1 + pickle.NEWOBJ,
    "NEWOBJ_EX": lambda m, n, c: stack_global(m, n) + c + pickle.TUPLE1 + pickle.EMPTY_DICT + pickle.NEWOBJ_EX,
    "BUILD": lambda m, n, c: stack_global(m, n) + pickle.EMPTY_DICT + c + c + pickle.SETITEM + pickle.BUILD,
    "PERSID": lambda m, n, c: pickle.PERSID + f"{m} {n}\n".encode(),
    "BINPERSID": lambda m, n, c: c + pickle.BINPERSID,
}


DOTTED = [(dcp_metadata.__name__, "os.system"), (dcp_metadata.__name__, "os.popen"), ("torch", "os.system"),
          ("pathlib", "os.system"), ("torch.distributed.checkpoint.filesystem", "os.system")]


@pytest.mark.parametrize("opcode", list(OPCODES), ids=list(OPCODES))
def test_dotted_names_are_refused_by_every_opcode_and_protocol(ckpt, marker, opcode):
    for pair in DOTTED:
        for proto in range(6):
            head = b"\x80" + bytes([proto]) if proto >= 2 else b""
            got = read(ckpt, head + OPCODES[opcode](*pair, command(marker)) + pickle.STOP)
            assert isinstance(got, files.UnsafeFile if "PERSID" not in opcode else ValueError), (pair, proto)
            assert not ran(marker), (pair, proto)


@FUZZ
@given(pair=st.sampled_from(candidate_names()), opcode=st.sampled_from(list(OPCODES)), proto=st.integers(0, 5))
def test_every_opcode_that_reaches_a_global_is_refused_and_runs_nothing(ckpt, marker, pair, opcode, proto):
    body = OPCODES[opcode](*pair, command(marker)) + pickle.STOP
    head = b"\x80" + bytes([proto]) if proto >= 2 else b""
    got = read(ckpt, head + body)
    assert isinstance(got, ValueError) and not ran(marker)


@FUZZ
@given(pair=st.sampled_from(candidate_names()), ext=st.sampled_from([pickle.EXT1, pickle.EXT2, pickle.EXT4]),
       proto=st.integers(2, 5))
def test_a_global_through_copyregs_extension_registry_is_refused(ckpt, marker, pair, ext, proto):
    code = 0xF1
    copyreg.add_extension(*pair, code)  # as a process that registered one would resolve it
    try:
        size = {pickle.EXT1: 1, pickle.EXT2: 2, pickle.EXT4: 4}[ext]
        data = b"\x80" + bytes([proto]) + ext + code.to_bytes(size, "little") + command(marker) + pickle.TUPLE1
        got = read(ckpt, data + pickle.REDUCE + pickle.STOP)
    finally:
        copyreg.remove_extension(*pair, code)
    assert isinstance(got, ValueError) and not ran(marker)


# ---- train.json

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=20)


@pytest.fixture(scope="module")
def real_meta():
    """A train.json as train.py writes it (its fields; the values of a tiny run)."""
    config = {"arch": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
              "num_heads": 2, "num_kv_heads": 1, "head_dim": 32, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
              "rope_scaling": None, "max_position_embeddings": 1024, "tie_word_embeddings": True, "qk_norm": True,
              "sliding_window": None, "bos_token_id": 256, "eos_token_id": 0, "ttt_layers": [0, 1], "ttt_chunk": 16,
              "ttt_lr": 1.0, "ttt_proj": True, "ttt_target": "input_embed", "ttt_lookahead": True,
              "ttt_fp32_state": True, "ttt_clip_tau": None, "extra": {}}
    record = {"__0_0.distcp": {"size": 1234, "sha256": "ab" * 32}}
    meta = {"config": config, "tokenizer": "/tmp/tok", "world_size": 1, "args": {"lr": 0.002, "data": ["a.txt"]},
            "data": {"data": {"/tmp/a.txt": {"size": 10, "sha256": "cd" * 32}}, "val_data": None}, "step": 3,
            "loss": 5.2, "files": record}
    return {**meta, "sha256": checkpoint.meta_digest(meta)}


def check(meta):
    try:
        with no_hang():
            checkpoint.check_train_meta(meta, Path("/run/ckpt/step_000003/train.json"))
    except ValueError as e:
        assert str(e).startswith("/run/ckpt/step_000003/train.json: ")
        return e


def test_the_real_train_json_passes(real_meta):
    assert check(real_meta) is None


@FUZZ
@given(meta=JSON)
def test_random_json_is_refused_or_admitted_never_crashes(meta):
    check(meta)


@FUZZ
@given(where=st.sampled_from(["top", "config"]), key=st.text(max_size=20), value=JSON, pick=st.integers(0, 100))
def test_a_real_train_json_with_one_field_replaced_is_refused_or_admitted(real_meta, where, key, value, pick):
    meta = json.loads(json.dumps(real_meta))
    target = meta if where == "top" else meta["config"]
    names = sorted(target)
    target[names[pick % len(names)] if pick < 80 else key] = value
    got = check(meta)
    if got is None:  # admitted: then the rest of the code can use it as it is
        assert type(meta["step"]) is int and type(meta["config"]) is dict


@FUZZ
@given(data=st.binary(max_size=300))
def test_a_train_json_of_random_bytes_is_named(tmp_path_factory, data):
    ckpt = tmp_path_factory.mktemp("tj")
    (ckpt / "train.json").write_bytes(data)
    try:
        with no_hang():
            checkpoint.read_train_meta(ckpt)
    except ValueError as e:
        assert str(e).startswith(str(ckpt / "train.json"))


# ---- the lock file

@FUZZ
@given(data=st.binary(max_size=5000))
def test_a_lock_file_of_random_bytes_is_taken_over_or_named(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("out")
    (out / ".lock").write_bytes(data)
    lock = files.OutLock(out)
    try:
        with no_hang():
            left = lock.acquire()
        assert isinstance(left, str) and "\n" not in left
    except SystemExit as e:
        assert str(e.code).startswith(f"{out / '.lock'} holds ")
    finally:
        lock.release()
    assert os.path.isdir(out)
