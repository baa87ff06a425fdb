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

import hashlib
import json
import os
import re
import shutil
import socket
import time
import warnings
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


def verify_checkpoint(ckpt_dir) -> dict:
    """train.json of a checkpoint whose files all match its integrity record, else ValueError
    naming the damaged files. A checkpoint of an older train.py has no record: read as it is."""
    meta = read_train_meta(ckpt_dir)
    problems = damaged_files(ckpt_dir, meta.get("files", {}))
    if problems:
        raise ValueError(f"checkpoint {ckpt_dir} is damaged: {'; '.join(problems)}")
    return meta


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
    dcp.save(train_state(model, optimizer), checkpoint_id=tmp)
    dist.barrier()  # every rank's shards are on disk
    parts = over_ranks(partial(file_record, tmp), sorted(os.listdir(tmp)))
    if rank == 0:
        files = {name: r for part in parts for name, r in part.items()}
        record = {**meta, "step": step, "loss": loss, "files": files}
        (tmp / TRAIN_META).write_text(json.dumps(record, indent=2))
        os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
        rotate(ckpt_dir, keep)
    dist.barrier()  # no rank runs ahead and saves again before the rename
    return final


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
    if found and not overwrite and not (resume and existing):
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
            record = read_train_meta(path).get("files", {})
        except (OSError, ValueError) as e:  # train.json missing or torn: the same on every rank
            problems = [str(e)]
        else:
            check = lambda names: damaged_files(path, {n: record[n] for n in names})
            problems = [p for part in over_ranks(check, list(record)) for p in part]
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
        log(f"--resume: no intact checkpoint in {ckpt_dir}, starting at step 0")
        return None, []
    if damaged:
        log(f"falling back to {resume_from}, the newest checkpoint that is intact")
    return resume_from, damaged


def load_checkpoint(path: Path, model, optimizer, meta) -> dict:
    """Load model and optimizer shards (DCP reshards across world sizes); returns the checkpoint's
    train.json. A different model config is refused, field by field."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)

    saved = read_train_meta(path)
    if saved["config"] != meta["config"]:
        diff = {k: (saved["config"].get(k), v) for k, v in meta["config"].items()
                if saved["config"].get(k) != v}
        what = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(f"cannot resume {path}: the model config differs from the checkpoint's "
                         f"{what}")
    state = train_state(model, optimizer)  # the shapes DCP loads into, in place
    dcp.load(state, checkpoint_id=path)
    # The state dicts hold name-keyed views or copies (the optimizer's always): put them back.
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return saved


def resume(path: Path, model, optimizer, meta, log) -> int:
    """Continue checkpoint `path`: its weights, optimizer moments and RNG into `model` and
    `optimizer` (load_checkpoint), and a warning for each flag in meta["args"] that changes the
    trajectory but not the model. Returns the step it was saved at."""
    saved = load_checkpoint(path, model, optimizer, meta)
    log(f"resumed {path} at step {saved['step']} (saved by {saved['world_size']} rank(s))")
    keys = ("data", "val_data", "seq_len", "batch_tokens", "seed", "steps", "lr", "min_lr",
            "warmup", "precision")
    changed = [k.replace("_", "-") for k in keys if saved["args"].get(k) != meta["args"][k]]
    if changed:  # allowed, but the user should know
        log(f"warning: --{', --'.join(changed)} differ from the checkpoint's run, so this run "
            f"will not retrace the one it continues")
    return saved["step"]


def prepare_out(out: Path, start: int, damaged=()):
    """Rank 0: metrics.jsonl keeps one trajectory (rows up to the resumed step), half-written
    checkpoints and temporary files of killed runs go, damaged checkpoints newer than the resumed
    one move aside (kept for a look, under a name no run reads), and a fresh run (start 0, only with
    --overwrite when there were any) replaces the previous run's checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)  # e.g. the hf/ export of a run killed while writing it
    metrics, kept = out / "metrics.jsonl", []  # a fresh start keeps no rows
    for line in metrics.read_text().splitlines() if start and metrics.exists() else []:
        try:
            if json.loads(line)["step"] <= start:  # rows past the checkpoint will be written again
                kept.append(line + "\n")
        except json.JSONDecodeError:  # a line torn by a kill
            pass
    metrics.write_text("".join(kept))
    for path in damaged:  # step N is written again: its name must be free
        print(f"moved the damaged {path} aside to {set_aside(path, 'damaged').name}")
    stale = checkpoints(out / "ckpt") if start == 0 else []
    half = [p for p in (out / "ckpt").glob(".tmp_step_*") if CKPT_NAME.fullmatch(p.name[5:])]
    for old in half + stale:
        shutil.rmtree(old)


# -----------------------------------------------------------------------------
# One checkpoint as a model, in one process (export, evaluation)


def load_train_checkpoint(ckpt_dir) -> tuple[Transformer, dict]:
    """The fp32 CPU model of a train.py checkpoint, in one process whatever the world size that
    wrote it (DCP reshards on load), and its train.json."""
    import torch.distributed.checkpoint as dcp

    meta = read_train_meta(ckpt_dir)
    with torch.device("meta"):  # asdict(cfg) as train.py wrote it: the fields are the keywords
        model = Transformer(ModelConfig(**meta["config"]))
    model.to_empty(device="cpu")  # new tensors per module: to_empty unties lm_head and embedding,
    if model.config.tie_word_embeddings:  # so tie them again (the checkpoint holds one tensor)
        model.lm_head.weight = model.model.embed_tokens.weight
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the point
        warnings.simplefilter("ignore", UserWarning)
        # Only the "model" entry: the optimizer state is as large again and not needed here.
        dcp.load({"model": model.state_dict()}, checkpoint_id=Path(ckpt_dir), no_dist=True)
    return model, meta
