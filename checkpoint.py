"""train.py's checkpoints: every rank's DCP shards plus train.json, written whole or not at all,
checked byte by byte before they are trusted, rotated, resumed; and the readers of a checkpoint
someone else may have made: train.json by one schema check, .metadata by an unpickler closed to
every global DCP does not write, then a schema check.

    out/bytes/metrics.jsonl                     one row per step (train.py)
    out/bytes/ckpt/step_000400/__0_0.distcp     one file per rank (torch.distributed.checkpoint)
    out/bytes/ckpt/step_000400/train.json       config, tokenizer, flags, step, loss, and the size
                                                and sha256 of every file of the checkpoint
    python load_hf.py export out/bytes/ckpt/step_000400 out/bytes-400   # one -> Hugging Face

A checkpoint is written into .tmp_step_N and renamed step_N once complete, so a directory named
step_N is always whole; rotation deletes only names of that form. load_hf.load_train_checkpoint
reads one into a model in a single process whatever world size wrote it, and export_checkpoint
turns that into an HF checkpoint. This module imports only files.py of this codebase: a
checkpoint's config is a dict of ModelConfig's fields here, and load_hf.py makes the model of it
(so load_hf.py sits one floor above the model, not two).
"""

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from files import (TRAIN_META, NoSpace, atomic_write, damaged_files, file_record, remove_orphans,
                   restricted_load, UnsafeFile, unsafe, written_aside)

# torch.distributed.checkpoint (DCP) is imported inside the functions that use it: load_hf.py, and
# so sample.py and ruler.py, import this module for its names, and DCP takes seconds to import.

# The names save_checkpoint writes, and only those: a user's step_000004_best is never taken for
# a checkpoint, resumed from or rotated away.
CKPT_NAME = re.compile(r"step_(\d{6,})")


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


TRAIN_META_MAX = 64 * 2**20  # bytes: a train.json is kilobytes (megabytes with a data record of
# many thousand files); a larger one is not read at all.
SIZE_MAX = 2**40  # any size or count a train.json names (a vocabulary, a dimension, a step)
SHA256 = re.compile(r"[0-9a-f]{64}")


def read_train_meta(ckpt_dir) -> dict:
    """train.json of a train.py checkpoint: the ModelConfig as a dict, the tokenizer, the run's
    flags, its step, the loss its weights gave and the integrity record of its files; checked
    whole (check_train_meta) before any of it is used."""
    path = Path(ckpt_dir) / TRAIN_META
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint of train.py (no "
                                f"{TRAIN_META})")
    if path.stat().st_size > TRAIN_META_MAX:
        raise ValueError(f"{path} is damaged ({path.stat().st_size:,} bytes; a train.json is at "
                         f"most {TRAIN_META_MAX:,})")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is one
        raise ValueError(f"{path} is damaged (not JSON: {str(e)[:100]})") from None
    check_train_meta(meta, path)
    return meta


def _bad(path, field, value, allowed) -> ValueError:
    return ValueError(f"{path}: {field} is {json.dumps(value)[:80]}, but a train.json holds "
                      f"{allowed}: refused (damaged, or edited?)")


def _count(v, lo=0, hi=SIZE_MAX) -> bool:
    return type(v) is int and lo <= v <= hi


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _record(v) -> bool:  # {name: {"size", "sha256"}}: files of a checkpoint or of a data stream
    return type(v) is dict and all(
        type(r) is dict and set(r) == {"size", "sha256"} and _count(r["size"])
        and type(r["sha256"]) is str and SHA256.fullmatch(r["sha256"]) for r in v.values())


# The fields train.py writes into train.json: (test, what is allowed). Older train.py versions
# wrote no data, files, loss or sha256: those may be absent.
META_FIELDS = {
    "config": (lambda v: type(v) is dict, "an object of ModelConfig fields"),
    "tokenizer": (lambda v: type(v) is str and 0 < len(v) < 4096, "a directory name"),
    "world_size": (lambda v: _count(v, 1, 2**20), "a number of ranks, 1 to 2**20"),
    "args": (lambda v: type(v) is dict, "an object of train.py's flags"),
    "step": (_count, f"a step count, 0 to {SIZE_MAX}"),
    "loss": (lambda v: v is None or _number(v), "a finite number or null"),
    "files": (lambda v: _record(v) and all("/" not in n and n not in (".", "..") for n in v),
              "the files beside it, each {\"size\", \"sha256\"}"),
    "sha256": (lambda v: type(v) is str and SHA256.fullmatch(v), "a sha256 in hex"),
    # The data record's contents are data.py's; here only its JSON shape: per stream, null or an
    # object of objects.
    "data": (lambda v: v is None or type(v) is dict and all(
        s is None or type(s) is dict and all(type(r) is dict for r in s.values())
        for s in v.values()), "null or {stream: null or {file: record}}"),
}
REQUIRED = ("config", "tokenizer", "world_size", "args", "step")


def check_train_meta(meta, path):
    """The schema of a train.json, checked whole: each field's type and range, and the model
    config's (check_config_fields), so the rest of the code never sees a malformed value."""
    if type(meta) is not dict:
        raise _bad(path, "the file", meta, "an object")
    for name in [*REQUIRED, *meta]:
        if name not in META_FIELDS:
            raise _bad(path, f"field {name[:40]!r}", meta[name], f"only {', '.join(META_FIELDS)}")
        if name not in meta:
            raise ValueError(f"{path}: field {name!r} is missing: refused (damaged, or edited?)")
        test, allowed = META_FIELDS[name]
        if not test(meta[name]):
            raise _bad(path, name, meta[name], allowed)
    check_config_fields(meta["config"], path)


# ModelConfig fields as train.json holds them (asdict, through JSON): (test, what is allowed).
# Sizes are bounded here; whether the whole model fits the checkpoint's files is checked before it
# is built (load_hf.fits_files).
_dim = (lambda v: _count(v, 1, 2**20), "an integer 1 to 2**20")
_id = (lambda v: v is None or _count(v, 0, 2**32), "null or an id 0 to 2**32")
_flag = (lambda v: type(v) is bool, "true or false")
_positive = (lambda v: _number(v) and v > 0, "a finite number > 0")
CONFIG_FIELDS = {
    "arch": (lambda v: v in ("qwen3", "llama"), '"qwen3" or "llama"'),
    "vocab_size": (lambda v: _count(v, 1, 2**32), "an integer 1 to 2**32"),
    "hidden_size": _dim, "intermediate_size": _dim, "num_heads": _dim, "num_kv_heads": _dim,
    "head_dim": _dim, "num_layers": (lambda v: _count(v, 1, 4096), "an integer 1 to 4096"),
    "rms_norm_eps": _positive, "rope_theta": _positive, "ttt_lr": (_number, "a finite number"),
    "rope_scaling": (lambda v: v is None or type(v) is dict, "null or an object"),
    "max_position_embeddings": (lambda v: _count(v, 1, 2**31), "an integer 1 to 2**31"),
    "tie_word_embeddings": _flag, "qk_norm": _flag, "ttt_proj": _flag, "ttt_lookahead": _flag,
    "ttt_fp32_state": _flag, "ttt_mode": _flag,  # ttt_mode: older train.py versions (retired)
    "sliding_window": (lambda v: v is None or _count(v, 1, 2**31), "null or an integer >= 1"),
    "bos_token_id": _id,
    "eos_token_id": (lambda v: _id[0](v) or type(v) is list and 0 < len(v) <= 64
                     and all(_count(i, 0, 2**32) for i in v), "null, an id or a list of ids"),
    "ttt_layers": (lambda v: type(v) is list and len(v) <= 4096
                   and all(_count(i, 0, 4095) for i in v), "a list of layer indices"),
    "ttt_chunk": (lambda v: _count(v, 1, 2**31), "an integer 1 to 2**31"),
    "ttt_target": (lambda v: v in ("hidden_states", "input_embed"),
                   '"hidden_states" or "input_embed"'),
    "ttt_clip_tau": (lambda v: v is None or _positive[0](v), "null or a finite number > 0"),
    "ttt_key_norm": _flag, "ttt_target_norm": _flag, "ttt_norm_preserve": _flag,  # stabilisers
    "ttt_lr_warmup": (lambda v: _count(v, 0, 2**31), "an integer 0 to 2**31"),
    "extra": (lambda v: type(v) is dict, "an object"),
}


def check_config_fields(config: dict, path):
    """Each ModelConfig field of train.json's config: its type and range (CONFIG_FIELDS)."""
    for name, value in config.items():
        if name not in CONFIG_FIELDS:
            raise ValueError(f"{path}: config field {name[:40]!r} is not ModelConfig's (a "
                             f"checkpoint of another version of train.py?)")
        test, allowed = CONFIG_FIELDS[name]
        if not test(value):
            raise _bad(path, f"config field {name}", value, allowed)
    layers = config.get("num_layers", 0)
    if any(i >= layers for i in config.get("ttt_layers", [])):
        raise _bad(path, "config field ttt_layers", config["ttt_layers"],
                   f"layer indices below num_layers {layers}")


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
# opened. Pickle stays: DCP's FileSystemWriter writes it, and a writer of our own (JSON, say) would
# leave every checkpoint written so far unreadable and DCP's tools (dcp_to_torch_save) blind to
# ours. So .metadata is unpickled with exactly the globals DCP writes into it, then checked field
# by field; every pickled entry passes torch's weights-only unpickler and must have the type of
# the value it replaces.


def metadata_globals() -> dict:
    """{(module, name): object}: every global a train.py checkpoint's .metadata holds under this
    torch (found by unpickling real ones), nothing else: DCP's metadata classes and its file layout
    record, torch.Size, dtypes, layouts (through torch.serialization's lookup by name), the memory
    format code and the path DCP records."""
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    import torch.serialization

    allowed = {("torch.distributed.checkpoint.metadata", c.__name__): c
               for c in (md.Metadata, md.TensorStorageMetadata, md.ChunkStorageMetadata,
                         md.BytesStorageMetadata, md.TensorProperties, md.MetadataIndex,
                         md.StorageMeta, md._MEM_FORMAT_ENCODING)}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("torch", "Size")] = torch.Size
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    dtypes = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
    allowed.update({("torch", name): v for name, v in dtypes.items()})
    return allowed


class DamagedMetadata(ValueError):
    """A .metadata that unpickles to something DCP never writes."""


class DamagedEntry(ValueError):
    """A pickled state-dict entry that is not what train.py's checkpoint holds there."""


def read_metadata(ckpt_dir):
    """DCP's metadata of a checkpoint: unpickled with only metadata_globals() admitted, then
    checked (check_metadata) before anything uses it."""
    path = Path(ckpt_dir) / ".metadata"
    metadata = restricted_load(path, metadata_globals())
    check_metadata(metadata, path)
    return metadata


def _is(x, *types) -> bool:
    return type(x) in types  # exact: a subclass could bring methods of its own


def _fields(obj, cls, path, where):
    """Refuse `obj` unless it is a `cls` whose attributes are exactly cls's dataclass fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    have = set(vars(obj)) if hasattr(obj, "__dict__") else set()
    # A field an older torch did not write keeps its class default; no default: refused.
    if not _is(obj, cls) or have - names or any(not hasattr(cls, n) for n in names - have):
        got = type(obj).__name__ + (f" with {sorted(have)}" if have else "")
        raise DamagedMetadata(f"{path}: {where} is a {got[:120]}, not DCP's {cls.__name__} "
                              f"({', '.join(sorted(names))}): refused (damaged, or not written by "
                              f"torch.distributed.checkpoint)")


def _sane_size(size, path, where, limit):
    """A torch.Size of non-negative ints whose elements fit in `limit` (the bytes of the
    checkpoint's files): a size nothing on disk could fill is refused before DCP allocates it."""
    ok = _is(size, torch.Size) and all(_is(d, int) and 0 <= d <= limit for d in size)
    if not ok or len(size) > 64 or math.prod(size) > limit:
        raise DamagedMetadata(f"{path}: {where} has size {str(size)[:80]}, which no tensor of a "
                              f"checkpoint of {limit:,} bytes has: refused (damaged?)")


def check_metadata(m, path):
    """The schema of a .metadata, checked whole: a Metadata of tensors and byte entries whose sizes
    fit in the checkpoint's files and whose storage lies in plain files beside it."""
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    limit = sum(p.stat().st_size for p in Path(path).parent.iterdir() if p.is_file())
    _fields(m, md.Metadata, path, "its top object")
    if not _is(m.state_dict_metadata, dict) or not _is(m.storage_data, dict):
        raise DamagedMetadata(f"{path}: its entries are not dicts: refused (damaged?)")
    for fqn, entry in m.state_dict_metadata.items():
        if not _is(fqn, str):
            raise DamagedMetadata(f"{path}: an entry is named by a {type(fqn).__name__}, not a "
                                  f"string: refused (damaged?)")
        where = f"entry {fqn[:80]!r}"
        if _is(entry, md.BytesStorageMetadata):  # a pickled value: checked when it is read
            _fields(entry, md.BytesStorageMetadata, path, where)
            continue
        _fields(entry, md.TensorStorageMetadata, path, where)
        _check_tensor(entry, path, where, limit, md)
    for index, info in m.storage_data.items():
        _fields(index, md.MetadataIndex, path, "a storage index")
        _fields(info, fs._StorageInfo, path, f"the storage of {str(index.fqn)[:80]!r}")
        name = info.relative_path
        plain = _is(name, str) and "/" not in name and name not in ("", ".", "..")
        if not plain or not (_is(info.offset, int) and _is(info.length, int)) \
                or not 0 <= info.offset <= limit or not 0 <= info.length <= limit:
            raise DamagedMetadata(f"{path}: the storage of {str(index.fqn)[:80]!r} is "
                                  f"{str(name)[:80]!r} at {info.offset!r}+{info.length!r}, not a "
                                  f"range of a file beside it: refused (damaged?)")
    _check_extras(m, path, md)


def _check_tensor(entry, path, where, limit, md):
    props = entry.properties
    _fields(props, md.TensorProperties, path, f"{where}'s properties")
    if not (_is(props.dtype, torch.dtype) and _is(props.layout, torch.layout)
            and _is(props.memory_format, torch.memory_format)
            and _is(props.requires_grad, bool) and _is(props.pin_memory, bool)):
        raise DamagedMetadata(f"{path}: {where}'s properties are not a dtype, layout, memory "
                              f"format and flags: refused (damaged?)")
    _sane_size(entry.size, path, where, limit)
    if not _is(entry.chunks, list):
        raise DamagedMetadata(f"{path}: {where}'s chunks are not a list: refused (damaged?)")
    for chunk in entry.chunks:
        _fields(chunk, md.ChunkStorageMetadata, path, f"a chunk of {where}")
        _sane_size(chunk.offsets, path, f"a chunk of {where}", limit)
        _sane_size(chunk.sizes, path, f"a chunk of {where}", limit)
        if len(chunk.offsets) != len(entry.size) or len(chunk.sizes) != len(entry.size) or any(
                o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, entry.size)):
            raise DamagedMetadata(f"{path}: a chunk of {where} lies outside its tensor of size "
                                  f"{list(entry.size)}: refused (damaged?)")


def _check_extras(m, path, md):
    """planner_data ({name: path of keys}), storage_meta and version, as DCP writes them."""
    plan = m.planner_data
    if plan is not None and not (_is(plan, dict) and all(
            _is(k, str) and _is(v, tuple, list) and all(_is(x, str, int) for x in v)
            for k, v in plan.items())):
        raise DamagedMetadata(f"{path}: its planner data is not DCP's {{name: key path}}: refused "
                              f"(damaged?)")
    meta = m.storage_meta
    if meta is not None:
        _fields(meta, md.StorageMeta, path, "its storage record")
        ok = (_is(meta.checkpoint_id, str, pathlib.PosixPath, type(None))
              and _is(meta.save_id, str, type(None)) and _is(meta.load_id, str, type(None))
              and _is(meta.modules, list) and all(_is(x, str) for x in meta.modules))
        if not ok:
            raise DamagedMetadata(f"{path}: its storage record holds values DCP never writes: "
                                  f"refused (damaged?)")
    if not _is(m.version, str, type(None)):
        raise DamagedMetadata(f"{path}: its version is a {type(m.version).__name__}: refused")


def same_kind(saved, now) -> bool:
    """Whether a pickled state-dict entry `saved` is what a train.py checkpoint holds where this
    run holds `now`: the same type (an int for a float too, None for an optional flag), finite
    numbers, and for tuples and lists the same length, element by element."""
    number = (int, float)
    if _is(now, bool) or _is(saved, bool) or now is None or saved is None:
        return _is(saved, bool, type(None)) and _is(now, bool, type(None))
    if _is(now, *number):
        return _is(saved, *number) and math.isfinite(saved)
    if _is(now, tuple, list):
        return _is(saved, type(now)) and len(saved) == len(now) and all(
            same_kind(a, b) for a, b in zip(saved, now))
    return _is(saved, type(now)) and not _is(now, dict)  # strings; never a container of unknowns


def dcp_load(state: dict, ckpt_dir, no_dist=False):
    """dcp.load(state, ckpt_dir) with the .metadata and every pickled entry checked first."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # DCP's own reader would pickle.load it
            metadata = read_metadata(self.path)
            if metadata.storage_meta is None:  # as DCP's reader fills it in
                metadata.storage_meta = dcp.metadata.StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # DCP's would torch.load(weights_only=False)
            fqn = read_item.dest_index.fqn
            try:  # plain containers, numbers, strings and tensors pass; any other global fails
                saved = torch.load(io.BytesIO(value.read()), weights_only=True)
            except pickle.UnpicklingError as e:  # torch names it as "GLOBAL module.name"
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                raise unsafe(f"{ckpt_dir}: its entry {fqn}",
                             found[1] if found else "a global") from None
            except Exception as e:  # noqa: BLE001 -- whatever a damaged entry raises
                raise DamagedEntry(f"{ckpt_dir}: its entry {fqn} is damaged ({e})"[:300]) from None
            now = self.state_dict.get(fqn)
            if not same_kind(saved, now):
                raise DamagedEntry(f"{ckpt_dir}: its entry {fqn} holds {str(saved)[:60]!r} "
                                   f"({type(saved).__name__}) where a train.py checkpoint holds a "
                                   f"{type(now).__name__} like {str(now)[:60]!r}: refused "
                                   f"(damaged, or a checkpoint from someone else?)")
            super().load_bytes(read_item, io.BytesIO(pickled(saved)))

    read_metadata(ckpt_dir)  # refused here, before DCP wraps every error in its own exception
    try:
        dcp.load(state, storage_reader=SafeReader(Path(ckpt_dir)), planner=SafePlanner(),
                 no_dist=no_dist)
    except dcp.api.CheckpointException as e:  # each rank's failure, as (exception, traceback)
        errors = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        raise next((f for f in errors if isinstance(f, (UnsafeFile, DamagedEntry))), e) from None


def pickled(value) -> bytes:
    """`value` as torch.save writes it: what DCP's load_bytes reads, now from our checked copy."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


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
    tmp = ckpt_dir / f".tmp_step_{step:06d}"  # rank 0 clears what a killed save left
    try:
        with written_aside(final, tmp, owner=rank == 0):
            dist.barrier()  # no rank writes into tmp before rank 0 has cleared it
            dcp.save(train_state(model, optimizer), checkpoint_id=tmp)
            dist.barrier()  # every rank's shards are on disk
            parts = over_ranks(partial(file_record, tmp), sorted(os.listdir(tmp)))
            if rank == 0:
                files = {name: r for part in parts for name, r in part.items()}
                record = {**meta, "step": step, "loss": loss, "files": files}
                record["sha256"] = meta_digest(record)  # train.json covered by a record of its own
                (tmp / TRAIN_META).write_text(json.dumps(record, indent=2))
    # written_aside has removed the partial files and named a full disk or a file-size limit.
    # DCP's CheckpointException gathers every rank's failure, so all ranks end up here together.
    except NoSpace as e:
        kept = ", ".join(p.name for p in checkpoints(ckpt_dir)) or "none yet"
        raise SystemExit(f"{e.why}: checkpoint step_{step:06d} was not saved (its partial files are "
                         f"removed; older checkpoints are kept: {kept}). Free space (or raise the limit), "
                         f"then --resume"
                         if rank == 0 else 1) from None
    if rank == 0:
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


def stop_nonfinite(what: str, good: Path | None, rank: int, resumed_from: Path | None = None):
    """End a run after a non-finite loss (`what` says where), naming `good`, the newest checkpoint
    whose weights gave a finite loss. The loss is the same on every rank, so all stop; rank 0 says
    why. resumed_from (a ckpt/ directory): the first step of a resume was not finite, so the
    resumed weights `good` did it: set_aside_nonfinite, and the one before it is named."""
    if resumed_from is not None and good is not None and rank == 0:
        good = set_aside_nonfinite(good, resumed_from)
    tail = (f"The newest checkpoint whose weights gave a finite loss is {good}: --resume "
            f"continues from it" if good else "No checkpoint holds weights that gave a finite loss")
    raise SystemExit(f"{what} {tail} (try a lower --lr or --ttt-lr)" if rank == 0 else 1)


def set_aside_nonfinite(resumed: Path, ckpt_dir: Path) -> Path | None:
    """Set aside checkpoint `resumed`, whose weights gave a non-finite loss at once (a checkpoint
    of an older train.py, or other data); returns the newest checkpoint left (None: none)."""
    set_aside(resumed, "nonfinite")
    return (checkpoints(ckpt_dir) or [None])[-1]


# -----------------------------------------------------------------------------
# Resuming: what --out holds, the checkpoint to continue, loading it, tidying the run directory


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
    config = saved_fields(saved)
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
    `optimizer` (load_checkpoint), after checking its data are this run's (check_data), with a
    warning for each flag that changes the trajectory (warn_changed_flags). Returns its step."""
    check_data(path, meta, log, allow_data_change)
    try:
        saved = load_checkpoint(path, model, optimizer, meta)
    except ValueError as e:  # a refused global, a damaged entry: the file named, no traceback
        raise SystemExit(str(e)) from None
    log(f"resumed {path} at step {saved['step']} (saved by {saved['world_size']} rank(s))")
    warn_changed_flags(saved["args"], meta["args"], log)
    return saved["step"]


def check_data(path: Path, meta, log, allow_data_change=False):
    """Refuse to continue checkpoint `path` on other data than its run's (meta["data"] against its
    train.json's); with allow_data_change, a warning naming each change."""
    changes = data_changes(read_train_meta(path).get("data"), meta["data"])
    if changes and not allow_data_change:
        raise SystemExit(f"cannot resume {path}: its run trained on other data ({'; '.join(changes)})"
                         f": pass --allow-data-change to continue it on these data anyway")
    if changes:
        log(f"warning: continuing {path} on other data than its run's: {'; '.join(changes)}")


def warn_changed_flags(saved_args: dict, args: dict, log):
    """A warning for each flag that changes the trajectory but not the model: allowed, but the user
    should know."""
    keys = ("data", "val_data", "seq_len", "batch_tokens", "seed", "steps", "lr", "min_lr",
            "warmup", "precision")
    changed = [k.replace("_", "-") for k in keys if saved_args.get(k) != args[k]]
    if changed:
        log(f"warning: --{', --'.join(changed)} differ from the checkpoint's run, so this run "
            f"will not retrace the one it continues")


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
    """Rank 0 tidies --out for a run starting at step `start`: temporary files of killed writers
    go (remove_orphans), metrics.jsonl keeps one trajectory (trim_metrics), damaged checkpoints
    newer than the resumed one move aside (set_aside_damaged), and half-written or replaced
    checkpoints go (clear_checkpoints)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)  # e.g. the hf/ export of a run killed while writing it
    trim_metrics(out / "metrics.jsonl", start)
    set_aside_damaged(damaged)
    clear_checkpoints(out / "ckpt", start)


def trim_metrics(metrics: Path, start: int):
    """metrics.jsonl keeps the rows up to step `start` (none for a fresh start), rewritten whole: a
    kill now leaves the old rows or the new, never none."""
    kept = metric_rows(metrics, start) if start and metrics.exists() else []
    atomic_write(metrics, "".join(kept))


def set_aside_damaged(damaged):
    """Damaged checkpoints move aside, kept for a look under a name no run reads: step N is written
    again, so its name must be free."""
    for path in damaged:
        print(f"moved the damaged {path} aside to {set_aside(path, 'damaged').name}")


def clear_checkpoints(ckpt_dir: Path, start: int):
    """Delete half-written checkpoints of killed saves and, for a fresh run (start 0, only with
    --overwrite when there were any), the previous run's checkpoints."""
    stale = checkpoints(ckpt_dir) if start == 0 else []
    half = [p for p in ckpt_dir.glob(".tmp_step_*") if CKPT_NAME.fullmatch(p.name[5:])]
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


# ModelConfig fields that train.json files of older train.py versions hold and ModelConfig no
# longer has: ttt_mode (config.json's switch, now read in load_hf and never a field).
RETIRED_FIELDS = ("ttt_mode",)


def saved_fields(meta: dict) -> dict:
    """The config of a train.json as ModelConfig's keywords: retired fields dropped
    (check_train_meta has refused any other field ModelConfig does not know). Whether they make a
    model is load_hf.saved_config's check: this module never imports model.py."""
    return {k: v for k, v in meta["config"].items() if k not in RETIRED_FIELDS}
