"""File safety, once, for every script: files written whole or not at all, a full disk or a
file-size limit named instead of a traceback, the size and sha256 that identify a file, an
unpickler that admits only the globals it is given, the lock that keeps two runs out of one --out,
and the guards that keep a run or an export from replacing what it did not write.

    with written_aside(path) as tmp:     # write tmp (a file or a directory) by any means;
        tokenise(files, tmp)             # it becomes `path` only when the block ends cleanly
    atomic_write(path, text)             # the same, for bytes or text in hand

A leaf: it imports the standard library and torch.distributed (rank 0's verdict on the lock,
shared with every rank) and nothing of this codebase.
"""

import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

TRAIN_META = "train.json"  # written last into a train.py checkpoint: its presence marks a whole one
# What train.py writes into a checkpoint or a run directory: never replaced by an export.
RUN_FILES = (TRAIN_META, "ckpt", "metrics.jsonl")
# Written last into an HF export of ours: the files it wrote, so a later export may replace them.
EXPORT_MARK = ".inplace-ttt-export.json"


# -----------------------------------------------------------------------------
# Writing whole files: a temporary name beside the target, then a rename (atomic on one
# filesystem), and the removal of what killed writers left


def tmp_sibling(path) -> Path:
    """The name beside `path` under which it is written in full before a rename:
    .NAME.tmp-HOST-PID, unique to this process, so two runs never write one file and a leftover
    names its writer."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def written_aside(path, tmp=None, owner=True, keep_existing=False):
    """Yield the temporary name `path` is written under (tmp_sibling(path) unless `tmp` is given;
    the block makes it, a file or a directory); when the block ends cleanly it is renamed to
    `path`, else removed, so `path` is always the old whole or the new whole. An existing directory
    is swapped out and deleted only once the new one is in place; with keep_existing an existing
    `path` wins (another writer made the same thing first). A full disk or a file-size limit ends
    in NoSpace naming the directory. Ranks that share one write: only the `owner` clears and renames.
    """
    path, named = Path(path), tmp is not None
    tmp = Path(tmp) if named else tmp_sibling(path)
    raise_on_size_limit()
    if owner and named:  # a name shared across runs (a killed save's); a tmp_sibling is this
        _remove(tmp)  # process's own, and remove_orphans clears those of processes gone
    try:
        yield tmp
        if owner:
            _commit(tmp, path, keep_existing)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        full = no_space(e, tmp)
        if owner:
            _remove(tmp)  # what the failed write left, never what was there before
        if full is None:
            raise
        raise NoSpace(full, f"{path} was not written (its partial write is removed"
                            f"{'; the earlier one is kept' if path.exists() else ''})") from None


def _commit(tmp: Path, path: Path, keep_existing: bool):
    """Rename the finished `tmp` to `path`. A directory cannot be renamed over a non-empty one: the
    old moves aside first (a kill in between leaves it under a tmp_sibling name, which the next
    remove_orphans deletes) and goes once the new is in place."""
    if keep_existing:
        try:
            os.rename(tmp, path)  # fails when another writer's is in place: it stays
        except OSError:
            if not path.exists():
                raise
            _remove(tmp)
        return
    old = tmp_sibling(path.with_name(f"{path.name}.old"))
    swap = path.is_dir() and not path.is_symlink()
    if swap:
        os.replace(path, old)
    os.replace(tmp, path)
    if swap:
        shutil.rmtree(old)


def atomic_write(path, data: str | bytes) -> Path:
    """Write `data` to `path` whole or not at all: a kill leaves the earlier file (or none), never
    half of the new one."""
    with written_aside(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def append_line(path, line: str):
    """Append one line to `path` (metrics.jsonl): a kill loses at most this line, which a reader
    drops as torn. A full disk or a file-size limit ends the run with one line naming it."""
    raise_on_size_limit()
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        full = no_space(e, path)
        if full is None:
            raise
        raise NoSpace(full, f"a row of {path} was not written (the checkpoints are kept: "
                            f"--resume continues from the newest once there is room)") from None


def remove_orphans(directory) -> list[Path]:
    """Delete what tmp_sibling() named in `directory` for writers of this host that are gone (a
    run killed mid-write); return them. Another host's are left alone: its pids mean nothing
    here, and its next run there removes them."""
    gone = []
    for p in Path(directory).glob(".*.tmp-*") if Path(directory).is_dir() else []:
        host, _, pid = p.name.rpartition(".tmp-")[2].rpartition("-")
        if host != socket.gethostname() or not pid.isdigit() or _running(int(pid)):
            continue
        _remove(p)
        gone.append(p)
    return gone


def _running(pid: int) -> bool:
    if pid == os.getpid():  # our own pid on a leftover: a killed process that had it before us
        return False
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# -----------------------------------------------------------------------------
# A full disk, a quota, a file-size limit: named, whoever wrapped the error


class NoSpace(SystemExit):
    """A write ran out of room: one line naming the directory, no traceback (a SystemExit).
    `why` is no_space's phrase alone, for a caller that says more."""

    def __init__(self, why: str, what: str):
        super().__init__(f"{why}: {what}")
        self.why = why


def raise_on_size_limit():
    """Past a file-size limit (ulimit -f) the kernel sends SIGXFSZ, which kills the process without
    a word; ignored, the write fails with EFBIG instead, which is named. Only the main thread may
    set a handler; elsewhere the default stays."""
    try:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:
        pass


NO_ROOM = {errno.ENOSPC: "no space left on {}", errno.EDQUOT: "no space left on {} (disk quota)",
           errno.EFBIG: "file too large for {} (the file-size limit, ulimit -f, is {:,} bytes)"}


def no_space(e: BaseException, written=None) -> str | None:
    """'no space left on DIR' or 'file too large ...' when a disk, quota or file-size limit ran
    out anywhere in exception `e` (its causes, and the per-rank failures DCP gathers into a
    CheckpointException as (exception, traceback) pairs), by errno or by the OS's words; else
    None. DCP sometimes loses the OSError and says only 'unexpected pos': then `written` (the
    partial file or directory, still there) is looked at: a file at the size limit, or a disk
    with no block free."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        x = x[0] if isinstance(x, tuple) else x
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in NO_ROOM:
            return _room(x.errno, Path(x.filename).parent if x.filename else written)
        # Libraries in other languages pass the OS's words on in their own exception (safetensors:
        # "I/O error: File too large (os error 27)").
        said = [code for code in NO_ROOM if os.strerror(code) in str(x)]
        if said and written is not None:
            return _room(said[0], written)
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]
        todo += list(getattr(x, "failures", {}).values())
    # Our own stops and a Ctrl-C are never a disk's doing, whatever the disk holds now.
    if isinstance(e, (SystemExit, KeyboardInterrupt)) or written is None \
            or not Path(written).exists():
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    parts = [Path(written)] if Path(written).is_file() else Path(written).rglob("*")
    if limit != resource.RLIM_INFINITY and any(p.stat().st_size >= limit for p in parts):
        return _room(errno.EFBIG, written)
    if os.statvfs(Path(written).parent).f_bavail == 0:
        return _room(errno.ENOSPC, written)
    return None


def _room(code: int, where) -> str:
    """NO_ROOM's phrase for the directory a user knows: not the file, not our temporary names."""
    where = Path(where)
    while where.name.startswith(".") or not where.is_dir():
        where = where.parent
    return NO_ROOM[code].format(where, resource.getrlimit(resource.RLIMIT_FSIZE)[0])


# -----------------------------------------------------------------------------
# What a file is: its size and sha256, and a record of many


def file_identity(path) -> dict:
    """{"size", "sha256"} of a file, read once and streamed (never all in memory). It costs one
    read of every byte: sha256 runs at about 1-2 GB/s per core with the CPU's SHA instructions."""
    with open(path, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size,
                "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def file_record(directory, names) -> dict:
    """{name: file_identity} of the files `names` in `directory`: a checkpoint's integrity record."""
    return {name: file_identity(Path(directory) / name) for name in names}


def damaged_files(directory, record: dict) -> list[str]:
    """Why each file of `record` (file_record's form) in `directory` no longer matches it: empty
    when all do. Sizes first: a truncated file is named without reading it."""
    problems = []
    for name, want in record.items():
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, not the {want['size']} "
                            f"written (truncated?)")
        elif file_identity(path)["sha256"] != want["sha256"]:
            problems.append(f"{path} does not match the checksum written with it (corrupt)")
    return problems


# -----------------------------------------------------------------------------
# Unpickling what someone else may have written: only the globals named, exactly


class UnsafeFile(ValueError):
    """A file refers to code no file of ours holds: opening it could run that code."""


def unsafe(where, what) -> UnsafeFile:
    return UnsafeFile(f"{where} refers to {what}, which a train.py checkpoint never holds: "
                      f"refused to read it, since unpickling it could run code (a checkpoint "
                      f"from someone else?)")


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves a global only to the object `allowed` maps its exact
    (module, name) to: nothing is imported, no module is admitted whole, and a dotted name (pickle
    4 walks attributes: 'os.system' inside a module that imports os) never matches. Every opcode
    that reaches a global (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT1/2/4 through copyreg's registry)
    goes through find_class; persistent ids are refused outright."""

    def __init__(self, file, where, allowed: dict):
        super().__init__(file)
        self.where, self.allowed = where, allowed

    def find_class(self, module, name):
        found = self.allowed.get((module, name)) if "." not in str(name) else None
        if found is None:
            raise unsafe(self.where, f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        raise unsafe(self.where, f"a persistent id ({str(pid)[:40]!r})")


def restricted_load(path, allowed: dict):
    """The object pickled in file `path`, with only the globals in `allowed` (RestrictedUnpickler).
    UnsafeFile for any other global; ValueError naming the file for bytes that are no pickle,
    whatever the unpickler trips on (a truncated stream, a bad opcode, a class refusing its
    state). Read whole first: the file is small, and a length field inside cannot ask pickle to
    read past its end."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), path, allowed).load()
    except UnsafeFile:
        raise
    except (Exception, MemoryError) as e:  # noqa: BLE001 -- whatever a damaged stream raises
        why = f"{type(e).__name__}: {e}"[:200]
        raise ValueError(f"{path} is damaged (not the pickle a train.py checkpoint holds: "
                         f"{why})") from None


# -----------------------------------------------------------------------------
# One run per --out, and nothing written through a link out of it

LOCK = ".lock"  # <out>/.lock: held (flock) by the run writing into --out, naming it
LOCK_TEXT_MAX = 4096  # what the lock says of its holder is one short line: no more is read


class OutLock:
    """A run's hold on its --out for its whole life: an exclusive flock on <out>/.lock, whose text
    names the holder (host, pid, start). The kernel drops a flock when its process ends, however
    it ends, so the lock file a killed run leaves behind is simply taken over by the next run."""

    def __init__(self, out: Path):
        self.out, self.file, self.made = Path(out), None, False

    def acquire(self) -> str:
        """Hold the lock, or SystemExit naming the run that holds it. Returns the text of a lock
        left by a run that is gone ('' if none)."""
        self.made = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        f = open_lock(self.out / LOCK)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_text(f, self.out / LOCK) or "a run that has not yet written its name"
            f.close()
            raise SystemExit(f"{self.out} is in use by another run ({holder}): wait for it to "
                             f"end, or choose another --out") from None
        try:
            left = lock_text(f, self.out / LOCK)
        except SystemExit:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        f.flush()
        self.file = f
        return left

    def release(self):
        """Give the lock up (its file goes first, so no one waits on a name that is gone); an
        --out this run made and left empty is removed too."""
        if self.file is not None:
            (self.out / LOCK).unlink(missing_ok=True)
            self.file.close()
            self.file = None
        if self.made and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()  # a refused first run leaves no trace


def open_lock(path: Path):
    """The lock file, opened for reading and writing (created if absent, never truncated before it
    is ours: it names the holder). What is not a regular file is refused by its type before it is
    opened (reading a FIFO would wait forever; O_NONBLOCK and O_NOFOLLOW cover a swap in between)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
                else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device")
        raise SystemExit(f"{path} is {kind}, not the lock file train.py writes: remove it, or "
                         f"choose another --out")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise SystemExit(f"{path}: cannot open the lock file ({e.strerror}): remove it, or "
                         f"choose another --out") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SystemExit(f"{path} is not a regular file, not the lock file train.py writes: "
                         f"remove it, or choose another --out")
    return os.fdopen(fd, "r+b")


def lock_text(f, path: Path) -> str:
    """What lock file `f` says of its holder; SystemExit naming `path` when it is not the UTF-8 line
    train.py writes (someone else's file: it is never overwritten)."""
    f.seek(0)
    raw = f.read(LOCK_TEXT_MAX + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or len(raw) > LOCK_TEXT_MAX or "\x00" in text:
        raise SystemExit(f"{path} holds {len(raw):,}{'+' if len(raw) > LOCK_TEXT_MAX else ''} "
                         f"bytes that are not the UTF-8 line train.py writes there: not its lock "
                         f"file; remove it, or choose another --out")
    return " ".join(text.split())  # one line, whatever the holder wrote


@contextmanager
def hold_out(out: Path, rank: int, log):
    """Rank 0 holds --out's lock (OutLock) for the `with` block; if another run holds it, every
    rank stops, rank 0 naming the holder."""
    lock, refused = OutLock(out), None
    if rank == 0:
        try:
            left = lock.acquire()
        except SystemExit as e:
            refused = str(e.code)
        else:
            if left:  # the flock was free: its run ended without releasing it (killed)
                log(f"took over {out / LOCK} from a run that is gone ({left})")
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank learns rank 0's verdict
        verdict = [refused]
        dist.broadcast_object_list(verdict, src=0)
        refused = verdict[0]
    if refused is not None:
        raise SystemExit(refused if rank == 0 else 1)
    try:
        yield lock
    finally:
        lock.release()  # only rank 0 holds one: a no-op elsewhere


def refuse_links(out: Path):
    """SystemExit naming the first symbolic link where train.py writes, rotates or deletes inside
    --out (metrics.jsonl, the lock, ckpt/ and the entries in it): a write or rmtree there would
    reach outside --out, or crash every later --resume."""
    ckpt = out / "ckpt"
    inside = sorted(ckpt.iterdir()) if ckpt.is_dir() and not ckpt.is_symlink() else []
    for path in (out / "metrics.jsonl", out / LOCK, ckpt, *inside):
        if path.is_symlink():
            raise SystemExit(f"{path} is a symbolic link (to {os.readlink(path)}): train.py never "
                             f"writes or deletes through a link in --out; replace it with what it "
                             f"points to, or choose another --out")


# -----------------------------------------------------------------------------
# What a run or an export may replace


def check_out(out: Path, existing: list, export: Path | None, resume, overwrite):
    """Refuse a fresh start (no --resume, or nothing to resume) into an --out holding a previous
    run's checkpoints (`existing`, oldest first), metrics.jsonl or its export `export` (without
    --overwrite): rerunning never loses a run."""
    found = [f"checkpoints ({existing[-1].name})"] if existing else []
    found += ["metrics.jsonl"] if (out / "metrics.jsonl").exists() else []
    found += [f"an HF export ({export})"] if export is not None and export.exists() else []
    # --resume with no checkpoint at all: a run killed before its first save left metrics.jsonl
    # (and perhaps an export): there is nothing to continue, so it starts afresh (pick_resume says).
    if found and not overwrite and not resume:
        raise SystemExit(f"{out} already holds {', '.join(found)}: pass --resume to continue that "
                         f"run (from a checkpoint in {out / 'ckpt'}), or --overwrite to replace "
                         f"it")


def check_export_target(out, overwrite=False, protect=()):
    """Refuse an export target whose replacement would lose what is not an export: a file, a
    train.py checkpoint or run directory (or a directory holding one), anything in `protect` (the
    checkpoint being exported, a run's ckpt/ and metrics.jsonl) or around it, whatever
    `overwrite` says; and without `overwrite`, any non-empty directory but an earlier export whose
    files are all listed in its EXPORT_MARK (a file a user added there makes it theirs)."""
    out = Path(out)
    here = out.resolve()
    for p in (Path(q).resolve() for q in protect):
        if p == here or p in here.parents or here in p.parents:
            raise FileExistsError(f"{out} would replace or lie inside {p}, which an export never "
                                  f"touches: choose another directory")
    if out.is_symlink():  # replacing it would write through the link, then fail to delete it
        raise FileExistsError(f"{out} is a symbolic link (to {os.readlink(out)}): an export never "
                              f"writes through a link; choose another directory")
    if not out.exists():  # found now, not after a whole training run
        base = next(p for p in out.absolute().parents if p.exists())
        if not base.is_dir():
            raise NotADirectoryError(f"{out} cannot be made: {base} is a file")
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(f"{out} cannot be made: {base} is not writable")
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file; an export writes a directory: choose another path")
    entries = sorted(e.name for e in out.iterdir())
    runs = [str((d / name).relative_to(out)) for d in [out, *(out / e for e in entries)]
            for name in RUN_FILES if d.is_dir() and (d / name).exists()]
    if runs:
        raise FileExistsError(f"{out} holds train.py output ({', '.join(runs[:3])}), which an "
                              f"export never replaces: choose another directory")
    try:
        ours = set(json.loads((out / EXPORT_MARK).read_text())["files"]) | {EXPORT_MARK}
    except (OSError, ValueError, KeyError, TypeError):  # no mark, or not ours to read
        ours = set()
    if entries and not set(entries) <= ours and not overwrite:
        more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
        raise FileExistsError(f"{out} exists and is not an export of ours (it holds {entries[0]}"
                              f"{more}): choose another directory, or pass --overwrite to replace "
                              f"it")
