"""Documents in the formats corpora ship in, tokenised by several processes into one token cache.

    python train.py --data corpus/ --text-key content_split --tokenise-workers 16

Formats, each streamed (never whole in memory; a .txt file is one document and is read whole):
.txt, .jsonl, .jsonl.gz, .jsonl.zst (one JSON object per line, the text under --text-key) and
.parquet (the --text-key column, read batch by batch with pyarrow). pyarrow and zstandard are
optional: only those formats need them.

The cache is the same, byte for byte, whatever the number of workers: the reader cuts the files
into batches of records in order, each worker tokenises whole batches, and the writer appends the
results in submission order. At most 2 x workers batches are in flight, so memory stays bounded
however fast the files are read. Each file's size and sha256 are those of its bytes as read (the
compressed bytes for .gz and .zst), as data.py records a .txt or .jsonl today.
"""

import io
import multiprocessing
import os
from collections import deque
from datetime import timedelta
from hashlib import sha256
from pathlib import Path

import numpy as np
from tqdm import tqdm

from files import file_identity
from tokenizer import Tokenizer, TokenizerError

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
PACKAGES = {".jsonl.zst": "zstandard", ".parquet": "pyarrow"}  # optional: only these formats
BATCH_BYTES = 1 << 20  # raw bytes per worker job: large enough that IPC is a small overhead
PARQUET_ROWS = 1024  # rows per pyarrow record batch


def data_format(path: Path) -> str | None:
    """The format of a data file by its name (one of FORMATS), or None."""
    return next((f for f in FORMATS if path.name.endswith(f)), None)


def default_workers() -> int:
    """The CPUs this process may use (a job's share, not the whole machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class CorpusError(ValueError):
    """A data file this module refuses: the message names the file (and record) and the key."""


# -----------------------------------------------------------------------------
# Reading: (where, kind, first record number, records) batches, file by file


class Hashed(io.RawIOBase):
    """A binary file read through: the sha256 and size of every byte read."""

    def __init__(self, f):
        self.f, self.digest, self.size = f, sha256(), 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        self.digest.update(memoryview(b)[:n])
        self.size += n
        return n


def _lines(fmt: str, raw: Hashed):
    """The lines of a JSON-lines stream, decompressed as it is read."""
    if fmt == ".jsonl.gz":
        import gzip
        return gzip.GzipFile(fileobj=raw)
    if fmt == ".jsonl.zst":
        return _split_lines(_zst_chunks(raw))
    return io.BufferedReader(raw)


def _zst_chunks(raw: Hashed):
    """The decompressed bytes of a zstd stream of one or more frames. zstandard's stream_reader
    ends quietly where a truncated file ends; a frame left open here is refused."""
    import zstandard
    d = zstandard.ZstdDecompressor()
    frame, open_frame = d.decompressobj(), False
    while chunk := raw.read(BATCH_BYTES):
        while chunk:
            yield frame.decompress(chunk)
            open_frame, chunk = not frame.eof, frame.unused_data if frame.eof else b""
            if frame.eof:  # the next frame, if any, needs a decompressor of its own
                frame = d.decompressobj()
    if open_frame:
        raise ValueError("the file ends inside a zstd frame: truncated?")


def _split_lines(chunks):
    rest = b""
    for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        yield from (line + b"\n" for line in lines)
    if rest:
        yield rest


def _line_batches(path: Path, fmt: str, raw: Hashed):
    batch, size, first = [], 0, 1
    for n, line in enumerate(_lines(fmt, raw), 1):
        batch.append(line)
        size += len(line)
        if size >= BATCH_BYTES:
            yield str(path), "jsonl", first, batch
            batch, size, first = [], 0, n + 1
    if batch:
        yield str(path), "jsonl", first, batch


def _parquet_batches(path: Path, text_key: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    if text_key not in names:
        raise CorpusError(f"{path}: no column '{text_key}' (columns: {', '.join(names)}): pass "
                          f"--text-key with the column that holds the text")
    kind = f.schema_arrow.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: column '{text_key}' holds {kind}, not text (--text-key)")
    rows, size, first = [], 0, 1
    for batch in f.iter_batches(batch_size=PARQUET_ROWS, columns=[text_key]):
        for text in batch.column(0).to_pylist():  # jobs of BATCH_BYTES, whatever the row sizes
            rows.append(text)
            size += len(text or "")
            if size >= BATCH_BYTES:
                yield str(path), "rows", first, rows
                rows, size, first = [], 0, first + len(rows)
    if rows:
        yield str(path), "rows", first, rows


def batches(path: Path, text_key: str, identity: dict):
    """The record batches of one file, in order; identity[str(path.resolve())] is set to the
    {"size", "sha256"} of its bytes once it has been read to the end."""
    fmt = data_format(path)
    try:
        if fmt == ".parquet":  # pyarrow seeks (the footer first): the file is hashed apart
            identity[str(path.resolve())] = file_identity(path)
            yield from _parquet_batches(path, text_key)
            return
        with path.open("rb", buffering=0) as f:
            raw = Hashed(f)
            if fmt == ".txt":
                yield str(path), "txt", 1, [io.BufferedReader(raw).read()]
            else:
                yield from _line_batches(path, fmt, raw)
            identity[str(path.resolve())] = {"size": raw.size, "sha256": raw.digest.hexdigest()}
    except CorpusError:
        raise
    except Exception as e:  # gzip, zlib, zstandard, pyarrow errors: a corrupt or truncated file
        if isinstance(e, OSError) and e.errno is not None or type(e).__name__ == "ImportError":
            raise  # a real I/O error (no space, permission), not a corrupt stream
        raise CorpusError(f"{path}: not a readable {fmt} file ({type(e).__name__}: {e})") from None


# -----------------------------------------------------------------------------
# Tokenising: one batch at a time, in this process or in a worker


def _document(kind: str, where: str, n: int, record, text_key: str):
    """(text, None), or (None, why the record is skipped). A file whose first record is a JSON
    object without text_key is refused (CorpusError): the key is wrong for the whole file, and
    every record would be skipped. A later record without it is skipped and counted."""
    if kind == "rows":
        return (record, None) if record and record.strip() else (None, "empty or null")
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid UTF-8"
    if kind == "jsonl" and text.strip():  # a blank line is an empty document, not a JSON error
        obj = _json(text)
        if n == 1 and isinstance(obj, dict) and text_key not in obj:
            raise CorpusError(f"{where}:1: no '{text_key}' field (fields: "
                              f"{', '.join(list(obj)[:10])}): pass --text-key with the field "
                              f"that holds the text")
        if not isinstance(obj, dict) or text_key not in obj:
            return None, f"not a JSON object with a '{text_key}' field"
        text = obj[text_key]
        if not isinstance(text, str):
            return None, f"'{text_key}' is not a string"
    return (text, None) if text.strip() else (None, "empty")


def _json(text: str):
    import json
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def encode_batch(tok: Tokenizer, job, text_key: str, sep: int):
    """(uint32 ids as bytes, documents, {reason: [count, first record]}) of one batch: each usable
    document's ids, then `sep`."""
    where, kind, first, records = job
    ids, n_docs, skipped = [], 0, {}
    for n, record in enumerate(records, first):
        text, reason = _document(kind, where, n, record, text_key)
        if text is not None:
            try:
                ids += tok.encode(text)
            except TokenizerError as e:  # its regex's backtracking limit: name the document
                raise CorpusError(f"cannot tokenise {where if kind == 'txt' else f'{where}:{n}'}: "
                                  f"{e}") from None
            ids.append(sep)
            n_docs += 1
        else:  # counted by reason, never silently dropped
            skipped.setdefault(reason, [0, where if kind == "txt" else f"{where}:{n}"])[0] += 1
    return np.asarray(ids, np.uint32).tobytes(), n_docs, skipped  # uint32: 4G ids, half of int64


_worker = {}  # a worker process's tokenizer and settings, loaded once by _start_worker


def _start_worker(tok, text_key, sep):
    _worker.update(tok=tok, text_key=text_key, sep=sep)


def _encode_in_worker(job):
    try:
        return encode_batch(_worker["tok"], job, _worker["text_key"], _worker["sep"])
    except CorpusError as e:  # pickled back as a plain message: no traceback of the worker's
        return e


def tokenise(files, tok: Tokenizer, sep: int, out_path: Path, text_key="text", workers=1
             ) -> tuple[int, dict, dict]:
    """Write the ids of every usable document of `files`, `sep` after each, to out_path as uint32,
    with `workers` processes (1: this one). Returns (documents written, {file: {"size", "sha256"}}
    of the bytes read, {"size", "sha256"} of out_path). Refused inputs raise SystemExit with one
    line naming the file and --text-key (or the document the tokenizer cannot split)."""
    skipped, n_docs, identity, written = {}, 0, {}, sha256()
    sizes = [Path(f).stat().st_size for f in files]
    workers = max(1, min(workers, sum(sizes) // BATCH_BYTES))  # no process without a batch to do
    jobs = (job for f in map(Path, files) for job in batches(f, text_key, identity))
    # fork, as torch's DataLoader workers: each starts at once with the loaded tokenizer (spawn
    # re-imports train.py and torch and reloads the tokenizer: 8 s on a busy 2-core machine). The
    # workers run the tokenizer only, never torch, so no lock of the parent's threads is reached.
    pool = (multiprocessing.get_context("fork").Pool(workers, _start_worker, (tok, text_key, sep))
            if workers > 1 else None)
    pending = deque()
    plain = all(data_format(Path(f)) in (".txt", ".jsonl") for f in files)
    try:  # progress in bytes of text: of the files' sizes, unless compressed
        with out_path.open("wb") as out, tqdm(total=sum(sizes) if plain else None, unit="B",
                                              unit_scale=True,
                                              desc=f"tokenising {len(files)} files") as bar:
            def drain(keep):  # write finished batches, oldest first, until `keep` remain
                nonlocal n_docs
                while len(pending) > keep:
                    done = pending.popleft()
                    result = done.get() if pool else done
                    if isinstance(result, CorpusError):
                        raise result
                    data, docs, why = result
                    out.write(data)
                    written.update(data)  # the cache's digest, as it is written
                    n_docs += docs
                    for reason, (count, first) in why.items():
                        skipped.setdefault(reason, [0, first])[0] += count
            for job in jobs:
                pending.append(pool.apply_async(_encode_in_worker, (job,)) if pool
                               else encode_batch(tok, job, text_key, sep))
                bar.update(sum(len(r) for r in job[3] if r))
                drain(2 * workers)
            drain(0)
    except CorpusError as e:
        raise SystemExit(str(e)) from None
    finally:
        if pool is not None:
            pool.terminate()
    for reason, (count, first) in skipped.items():
        print(f"skipped {count} documents: {reason} (first: {first})")
    return n_docs, identity, {"size": out_path.stat().st_size, "sha256": written.hexdigest()}


# -----------------------------------------------------------------------------
# The other ranks wait for rank 0's cache


def wait_for_rank0():
    """A barrier with no timeout worth the name: rank 0 may tokenise for hours (20B tokens), and
    the default group's barrier would time out (10 or 30 min) and kill the waiting ranks. A gloo
    group made for the wait, with a timeout of a year; if rank 0 fails instead, torchrun ends the
    whole job, so nobody waits for ever."""
    import torch.distributed as dist  # here: the tokenising workers never need torch
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    group = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    try:
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
