"""train.py's checkpoints: every rank's DCP shards plus train.json, written whole or not at all,
checked byte by byte before they are trusted, rotated, resumed; the guard that keeps a run from
replacing what it did not write; and the helpers every script writes files with.

    out/bytes/metrics.jsonl                     one row per step (train.py)
    out/bytes/ckpt/step_000400/__0_0.distcp     one file per rank (torch.distributed.checkpoint)
    out/bytes/ckpt/step_000400/train.json       config, tokenizer, flags, step, loss, and the size
                                                and sha256 of every file of the checkpoint
    python load_hf.py export out/bytes/ckpt/step_000400 out/bytes-400   # one -> Hugging Face

A checkpoint is written into .tmp_step_N and renamed step_N once complete, so a directory named
step_N is always whole; rotation deletes only names of that form. load_train_checkpoint reads one
into a model in a single process whatever world size wrote it; load_hf.export_checkpoint turns
that into an HF checkpoint. This module imports only model.py of this codebase.
"""

import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from model import ModelConfig, Transformer

# torch.distributed.checkpoint (DCP) is imported inside the functions that use it: load_hf.py, and
# so sample.py and ruler.py, import this module for its names, and DCP takes seconds to import.

TRAIN_META = "train.json"  # written last into a train.py checkpoint: its presence marks a whole one
# What train.py writes into a checkpoint or a run directory: never replaced by an export.
RUN_FILES = (TRAIN_META, "ckpt", "metrics.jsonl")
# The names save_checkpoint writes, and only those: a user's step_000004_best is never taken for
# a checkpoint, resumed from or rotated away.
CKPT_NAME = re.compile(r"step_(\d{6,})")


# -----------------------------------------------------------------------------
# Writing whole files: a temporary name beside the target, then a rename (atomic on one
# filesystem), and the removal of what killed writers left


def tmp_sibling(path) -> Path:
    """The name beside `path` under which it is written in full before a rename:
    .NAME.tmp-HOST-PID, unique to this process, so two runs never write one file and a leftover
    names its writer."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def atomic_write(path, data: str | bytes) -> Path:
    """Write `data` to `path` whole or not at all: a kill leaves the earlier file (or none), never
    half of the new one."""
    path, tmp = Path(path), tmp_sibling(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
    return path


def remove_orphans(directory) -> list[Path]:
    """Delete what tmp_sibling() named in `directory` for writers of this host that are gone (a
    run killed mid-write); return them. Another host's are left alone: its pids mean nothing
    here, and its next run there removes them."""
    gone = []
    for p in Path(directory).glob(".*.tmp-*") if Path(directory).is_dir() else []:
        host, _, pid = p.name.rpartition(".tmp-")[2].rpartition("-")
        if host != socket.gethostname() or not pid.isdigit() or _running(int(pid)):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
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
# What a checkpoint is: its name, its train.json and the integrity record in it


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is still a .tmp directory)."""
    found = [p for p in ckpt_dir.iterdir() if CKPT_NAME.fullmatch(p.name)] if ckpt_dir.is_dir() \
        else []
    return sorted(found, key=lambda p: int(p.name[5:]))  # by number: step_1000000 is 7 digits


def run_files(out: Path) -> tuple[Path, Path]:
    """The checkpoints and metrics of the run in `out`: what no export may replace or lie in."""
    return out / "ckpt", out / "metrics.jsonl"


def read_train_meta(ckpt_dir) -> dict:
    """train.json of a train.py checkpoint: the ModelConfig as a dict, the tokenizer, the run's
    flags, its step, the loss its weights gave and the integrity record of its files."""
    path = Path(ckpt_dir) / TRAIN_META
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint of train.py (no "
                                f"{TRAIN_META})")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged (not JSON: {e})") from None


def file_record(directory, names) -> dict:
    """{name: {"size", "sha256"}} of the files `names` in `directory`: a checkpoint's integrity
    record. It costs one read of every byte (sha256 runs at about 1-2 GB/s per core with the CPU's
    SHA instructions: a minute for an 8B model's 96 GB of weights and AdamW moments on one core),
    so train.py shares the files out among its ranks (over_ranks)."""
    record = {}
    for name in names:
        with open(Path(directory) / name, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()  # streamed, never all in memory
            record[name] = {"size": os.fstat(f.fileno()).st_size, "sha256": digest}
    return record


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
        elif file_record(directory, [name])[name]["sha256"] != want["sha256"]:
            problems.append(f"{path} does not match the checksum written with it (corrupt)")
    return problems


def meta_digest(meta: dict) -> str:
    """The sha256 train.json carries of itself (every field but this one, in a fixed order): a
    hand edit of its step, config or record is seen as damage."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def meta_problems(ckpt_dir, meta: dict) -> list[str]:
    """Why checkpoint ckpt_dir's train.json cannot be trusted: empty when it matches its own
    checksum and the step in the directory's name. (Older train.py versions wrote no checksum.)"""
    path, problems = Path(ckpt_dir), []
    if "sha256" in meta and meta_digest(meta) != meta["sha256"]:
        problems.append(f"{path / TRAIN_META} was changed after it was written (it no longer "
                        f"matches the checksum written into it)")
    named = CKPT_NAME.fullmatch(path.name)
    if named and meta.get("step") != int(named[1]):
        problems.append(f"{path.name} holds step {meta.get('step')} by its {TRAIN_META} (renamed, "
                        f"or the step edited?)")
    return problems


def verify_checkpoint(ckpt_dir) -> dict:
    """train.json of a checkpoint whose files all match its integrity record, else ValueError
    naming the damaged files. A checkpoint of an older train.py has no record: read as it is."""
    meta = read_train_meta(ckpt_dir)
    problems = meta_problems(ckpt_dir, meta) + damaged_files(ckpt_dir, meta.get("files", {}))
    if problems:
        raise ValueError(f"checkpoint {ckpt_dir} is damaged: {'; '.join(problems)}")
    return meta


# -----------------------------------------------------------------------------
# Reading a checkpoint without running its code. DCP pickles its .metadata and the non-tensor
# entries of a state dict (the optimizer's lr, betas, ...), and reads them back with pickle.load
# and torch.load(weights_only=False): a checkpoint someone else made could run any command when
# opened. Here .metadata admits only the classes DCP writes into it, and every pickled entry must
# pass torch's weights-only unpickler first.

# What a .metadata file pickles: DCP's metadata classes and file layout record, torch.Size,
# dtypes (checked by type below) and layouts, and the path DCP records.
METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                    ("collections", "OrderedDict"),
                    ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
DCP_METADATA = "torch.distributed.checkpoint.metadata"  # its classes and enums, all admitted


class UnsafeCheckpoint(ValueError):
    """A checkpoint file refers to code no checkpoint holds: opening it could run that code."""


def _unsafe(where, what) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{where} refers to {what}, which a train.py checkpoint never holds: "
                            f"refused to read it, since unpickling it could run code (a "
                            f"checkpoint from someone else?)")


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module == DCP_METADATA or (module, name) in METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise _unsafe(self.path, f"{module}.{name}")


def read_metadata(ckpt_dir):
    """DCP's metadata of a checkpoint, unpickled with only the classes DCP writes admitted."""
    path = Path(ckpt_dir) / ".metadata"
    with open(path, "rb") as f:
        try:
            return _MetadataUnpickler(f, path).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise ValueError(f"{path} is damaged (not DCP metadata: {e})") from None


def dcp_load(state: dict, ckpt_dir, no_dist=False):
    """dcp.load(state, ckpt_dir) with the .metadata and every pickled entry checked first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # DCP's own reader would pickle.load it
            metadata = read_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:  # as DCP's reader fills it in
                metadata.storage_meta = dcp.metadata.StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # DCP's would torch.load(weights_only=False)
            data = value.read()
            try:  # plain containers, numbers, strings and tensors pass; any other global fails
                torch.load(io.BytesIO(data), weights_only=True)
            except pickle.UnpicklingError as e:  # torch names it as "GLOBAL module.name"
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                raise _unsafe(f"{ckpt_dir}: its entry {read_item.dest_index.fqn}",
                              found[1] if found else "a global") from None
            super().load_bytes(read_item, io.BytesIO(data))

    read_metadata(ckpt_dir)  # refused here, before DCP wraps every error in its own exception
    try:
        dcp.load(state, storage_reader=SafeReader(Path(ckpt_dir)), planner=SafePlanner(),
                 no_dist=no_dist)
    except dcp.api.CheckpointException as e:  # each rank's failure, as (exception, traceback)
        errors = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        raise next((f for f in errors if isinstance(f, UnsafeCheckpoint)), e) from None


# -----------------------------------------------------------------------------
# Saving (every rank), rotation, setting aside


def over_ranks(fn, names) -> list:
    """fn(this rank's share of the checkpoint files `names`) on every rank, gathered in rank
    order. A rank takes the files its rank number wrote (DCP's __RANK_i.distcp, still in that
    node's page cache), rank 0 the rest: hashing a checkpoint takes 1/world of the time."""
    rank, world = dist.get_rank(), dist.get_world_size()
    owner = lambda n: int(m[1]) % world if (m := re.fullmatch(r"__(\d+)_\d+\.distcp", n)) else 0
    parts = [None] * world
    dist.all_gather_object(parts, fn([n for n in names if owner(n) == rank]))
    return parts


def train_state(model, optimizer) -> dict:
    """What a checkpoint holds: model and optimizer shards, and the RNG state. Training itself draws
    no random numbers (windows come from (seed, step)); the RNG is saved for anything that might."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # querying would initialise CUDA
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer), "rng": rng}


def save_checkpoint(ckpt_dir: Path, step, model, optimizer, meta, keep, rank, loss):
    """Every rank writes its shards into .tmp_step_N and hashes its own; then rank 0 adds
    train.json (the run's meta, the step, `loss` -- what these weights gave on the next step's
    batch -- and the integrity record: size and sha256 of every file) and renames it step_N, so a
    directory named step_N is always complete. Keeps the newest `keep`."""
    import torch.distributed.checkpoint as dcp

    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp_step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    dist.barrier()  # no rank writes into tmp before rank 0 has cleared it
    try:
        dcp.save(train_state(model, optimizer), checkpoint_id=tmp)
        dist.barrier()  # every rank's shards are on disk
        parts = over_ranks(partial(file_record, tmp), sorted(os.listdir(tmp)))
        if rank == 0:
            files = {name: r for part in parts for name, r in part.items()}
            record = {**meta, "step": step, "loss": loss, "files": files}
            record["sha256"] = meta_digest(record)  # train.json covered by a record of its own
            (tmp / TRAIN_META).write_text(json.dumps(record, indent=2))
    # DCP's CheckpointException is a BaseException; it gathers every rank's failure, so all ranks
    # end up here together.
    except BaseException as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # what the failed write left, never older ones
        if not no_space(e):
            raise
        kept = ", ".join(p.name for p in checkpoints(ckpt_dir)) or "none yet"
        raise SystemExit(f"no space left on {ckpt_dir}: checkpoint step_{step:06d} was not saved "
                         f"(its partial files are removed; older checkpoints are kept: {kept}). "
                         f"Free space, then --resume" if rank == 0 else 1) from None
    if rank == 0:
        os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
        rotate(ckpt_dir, keep)
    dist.barrier()  # no rank runs ahead and saves again before the rename
    return final


def no_space(e: BaseException) -> bool:
    """Whether a disk (or quota) ran full anywhere in exception `e`: its causes, and the per-rank
    failures DCP gathers into a CheckpointException, as (exception, traceback) pairs."""
    todo = [e]
    while todo:
        x = todo.pop()
        x = x[0] if isinstance(x, tuple) else x
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]
        todo += list(getattr(x, "failures", {}).values())
    return False


def rotate(ckpt_dir: Path, keep: int):
    """Delete all but the newest `keep` checkpoints (step_N names only)."""
    for old in checkpoints(ckpt_dir)[:-keep]:
        gone = ckpt_dir / f".tmp_{old.name}"  # renamed first: a kill mid-delete leaves no half
        os.replace(old, gone)
        shutil.rmtree(gone)


def set_aside(path: Path, why: str) -> Path:
    """Rename checkpoint step_N to step_N.WHY-TIME: kept for a look, under a name no run reads,
    resumes or rotates away."""
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


def stop_nonfinite(what: str, good: Path | None, rank: int, resumed_from: Path | None = None):
    """End a run after a non-finite loss (`what` says where), naming `good`, the newest checkpoint
    whose weights gave a finite loss. The loss is the same on every rank, so all stop; rank 0 says
    why. resumed_from (a ckpt/ directory): the first step of a resume was not finite, so the
    resumed weights `good` did it (a checkpoint of an older train.py, or other data): that
    checkpoint is set aside, and the one before it is named."""
    if resumed_from is not None and good is not None and rank == 0:
        set_aside(good, "nonfinite")
        good = (checkpoints(resumed_from) or [None])[-1]
    tail = (f"The newest checkpoint whose weights gave a finite loss is {good}: --resume "
            f"continues from it" if good else "No checkpoint holds weights that gave a finite loss")
    raise SystemExit(f"{what} {tail} (try a lower --lr or --ttt-lr)" if rank == 0 else 1)


# -----------------------------------------------------------------------------
# One run per --out, and nothing written through a link out of it

LOCK = ".lock"  # <out>/.lock: held (flock) by the run writing into --out, naming it


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
        f = open(self.out / LOCK, "a+")  # never truncated before it is ours: it names the holder
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a run that has not yet written its name"
            f.close()
            raise SystemExit(f"{self.out} is in use by another run ({holder}): wait for it to "
                             f"end, or choose another --out") from None
        f.seek(0)
        left = f.read().strip()
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
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
# Resuming: what --out holds, the checkpoint to continue, loading it, tidying the run directory


def check_out(out: Path, export: Path | None, resume, overwrite) -> list[Path]:
    """Refuse a fresh start (no --resume, or nothing to resume) into an --out holding a previous
    run's checkpoints, metrics.jsonl or its export `export` (without --overwrite): rerunning never
    loses a run. Returns the checkpoints found."""
    existing = checkpoints(out / "ckpt")
    found = [f"checkpoints ({existing[-1].name})"] if existing else []
    found += ["metrics.jsonl"] if (out / "metrics.jsonl").exists() else []
    found += [f"an HF export ({export})"] if export is not None and export.exists() else []
    # --resume with no checkpoint at all: a run killed before its first save left metrics.jsonl
    # (and perhaps an export): there is nothing to continue, so it starts afresh (pick_resume says).
    if found and not overwrite and not resume:
        raise SystemExit(f"{out} already holds {', '.join(found)}: pass --resume to continue that "
                         f"run (from a checkpoint in {out / 'ckpt'}), or --overwrite to replace "
                         f"it")
    return existing


def newest_intact(ckpt_dir: Path, log) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint whose files match their integrity record (all ranks check, each its
    share), and the newer ones that do not, each logged with what is wrong."""
    damaged = []
    for path in reversed(checkpoints(ckpt_dir)):
        try:  # a checkpoint of an older train.py has no record: taken as it is
            meta = read_train_meta(path)
        except (OSError, ValueError) as e:  # train.json missing or torn: the same on every rank
            problems = [str(e)]
        else:
            record = meta.get("files", {})
            check = lambda names: damaged_files(path, {n: record[n] for n in names})
            problems = meta_problems(path, meta)
            problems += [p for part in over_ranks(check, list(record)) for p in part]
        if not problems:
            return path, damaged
        log(f"warning: checkpoint {path} is damaged: {'; '.join(problems)}")
        damaged.append(path)
    return None, damaged


def pick_resume(ckpt_dir: Path, existing, overwrite, log) -> tuple[Path | None, list[Path]]:
    """--resume: the checkpoint to continue (None: start at step 0) and the damaged ones newer than
    it. With checkpoints `existing` but none intact, an error unless `overwrite`."""
    resume_from, damaged = newest_intact(ckpt_dir, log)
    if existing and resume_from is None and not overwrite:
        raise SystemExit(f"--resume: no checkpoint in {ckpt_dir} is intact (see above); pass "
                         f"--overwrite to start again at step 0")
    if resume_from is None:
        log(f"--resume: no checkpoint in {ckpt_dir} to continue (a run killed before its first "
            f"save?): starting afresh at step 0")
        return None, []
    if damaged:
        log(f"falling back to {resume_from}, the newest checkpoint that is intact")
    return resume_from, damaged


def load_checkpoint(path: Path, model, optimizer, meta) -> dict:
    """Load model and optimizer shards (DCP reshards across world sizes); returns the checkpoint's
    train.json. A different model config is refused, field by field."""
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)

    saved = read_train_meta(path)
    config = saved_config(saved, path)
    if config != meta["config"]:
        diff = {k: (config.get(k), v) for k, v in meta["config"].items() if config.get(k) != v}
        what = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(f"cannot resume {path}: the model config differs from the checkpoint's "
                         f"{what}")
    state = train_state(model, optimizer)  # the shapes DCP loads into, in place
    dcp_load(state, path)
    # The state dicts hold name-keyed views or copies (the optimizer's always): put them back.
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return saved


def resume(path: Path, model, optimizer, meta, log, allow_data_change=False) -> int:
    """Continue checkpoint `path`: its weights, optimizer moments and RNG into `model` and
    `optimizer` (load_checkpoint), after checking its data are this run's (meta["data"]; other
    data only with allow_data_change), with a warning for each flag in meta["args"] that changes
    the trajectory but not the model. Returns the step it was saved at."""
    changes = data_changes(read_train_meta(path).get("data"), meta["data"])
    if changes and not allow_data_change:
        raise SystemExit(f"cannot resume {path}: its run trained on other data ({'; '.join(changes)})"
                         f": pass --allow-data-change to continue it on these data anyway")
    if changes:
        log(f"warning: continuing {path} on other data than its run's: {'; '.join(changes)}")
    try:
        saved = load_checkpoint(path, model, optimizer, meta)
    except UnsafeCheckpoint as e:  # a ValueError: no traceback, the file and the global named
        raise SystemExit(str(e)) from None
    log(f"resumed {path} at step {saved['step']} (saved by {saved['world_size']} rank(s))")
    keys = ("data", "val_data", "seq_len", "batch_tokens", "seed", "steps", "lr", "min_lr",
            "warmup", "precision")
    changed = [k.replace("_", "-") for k in keys if saved["args"].get(k) != meta["args"][k]]
    if changed:  # allowed, but the user should know
        log(f"warning: --{', --'.join(changed)} differ from the checkpoint's run, so this run "
            f"will not retrace the one it continues")
    return saved["step"]


def data_changes(saved: dict | None, now: dict) -> list[str]:
    """How the data a checkpoint's run trained on (its train.json's "data": per stream, the size
    and sha256 of each file read) differ from this run's: one phrase per file. A checkpoint of an
    older train.py records none: nothing to compare."""
    if saved is None:
        return []
    changes = []
    # "data", "val_data", "tokenizer"; a stream an older train.py did not record is not compared
    for stream in sorted(saved):
        was, files = (saved.get(stream) or {}), (now.get(stream) or {})
        for name in sorted(set(was) | set(files)):
            if name not in files:
                changes.append(f"{name} is no longer read")
            elif name not in was:
                changes.append(f"{name} is new")
            elif files[name] != was[name]:
                changes.append(f"{name} changed since ({files[name]['size']:,} bytes, were "
                               f"{was[name]['size']:,}; the sha256 differs)")
    return changes


def prepare_out(out: Path, start: int, damaged=()):
    """Rank 0: metrics.jsonl keeps one trajectory (rows up to the resumed step), half-written
    checkpoints and temporary files of killed runs go, damaged checkpoints newer than the resumed
    one move aside (kept for a look, under a name no run reads), and a fresh run (start 0, only with
    --overwrite when there were any) replaces the previous run's checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)  # e.g. the hf/ export of a run killed while writing it
    metrics = out / "metrics.jsonl"  # a fresh start keeps no rows
    kept = metric_rows(metrics, start) if start and metrics.exists() else []
    atomic_write(metrics, "".join(kept))  # a kill now leaves the old rows or the new, never none
    for path in damaged:  # step N is written again: its name must be free
        print(f"moved the damaged {path} aside to {set_aside(path, 'damaged').name}")
    stale = checkpoints(out / "ckpt") if start == 0 else []
    half = [p for p in (out / "ckpt").glob(".tmp_step_*") if CKPT_NAME.fullmatch(p.name[5:])]
    for old in half + stale:
        shutil.rmtree(old)


def metric_rows(metrics: Path, start: int) -> list[str]:
    """The lines of metrics.jsonl up to step `start` (rows past the checkpoint are written again).
    A line that is no row (torn by a kill, not UTF-8, no "step") is dropped, and named."""
    kept = []
    for n, raw in enumerate(metrics.read_bytes().splitlines(), 1):
        try:
            step = json.loads(raw.decode("utf-8"))["step"]
            if step <= start:
                kept.append(raw.decode() + "\n")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            if raw.strip():
                print(f"warning: {metrics}:{n} is not a metrics row; dropped")
    return kept


# -----------------------------------------------------------------------------
# One checkpoint as a model, in one process (export, evaluation)


def load_train_checkpoint(ckpt_dir) -> tuple[Transformer, dict]:
    """The fp32 CPU model of a train.py checkpoint, in one process whatever the world size that
    wrote it (DCP reshards on load), and its train.json."""
    import torch.distributed.checkpoint as dcp

    meta = read_train_meta(ckpt_dir)
    with torch.device("meta"):  # asdict(cfg) as train.py wrote it: the fields are the keywords
        model = Transformer(ModelConfig(**saved_config(meta, ckpt_dir)))
    model.to_empty(device="cpu")  # new tensors per module: to_empty unties lm_head and embedding,
    if model.config.tie_word_embeddings:  # so tie them again (the checkpoint holds one tensor)
        model.lm_head.weight = model.model.embed_tokens.weight
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the point
        warnings.simplefilter("ignore", UserWarning)
        try:  # only the "model" entry: the optimizer state is as large again and not needed here
            dcp_load({"model": model.state_dict()}, ckpt_dir, no_dist=True)
        except dcp.api.CheckpointException as e:  # e.g. train.json edited to another shape
            why = str(e).strip().splitlines()[-1]
            raise ValueError(f"{ckpt_dir}: its shards do not fit the model its {TRAIN_META} "
                             f"describes ({why})") from None
    return model, meta


# ModelConfig fields that train.json files of older train.py versions hold and ModelConfig no
# longer has: ttt_mode (config.json's switch, now read in load_hf and never a field).
RETIRED_FIELDS = ("ttt_mode",)


def saved_config(meta: dict, ckpt_dir) -> dict:
    """The ModelConfig fields of a train.json (retired ones dropped); ValueError naming the file
    for a field this ModelConfig does not know."""
    config = {k: v for k, v in meta["config"].items() if k not in RETIRED_FIELDS}
    unknown = sorted(set(config) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{Path(ckpt_dir) / TRAIN_META}: config fields {', '.join(unknown)} are "
                         f"not ModelConfig's (a checkpoint of another version of train.py?)")
    return config
