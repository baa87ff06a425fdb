"""The recall task: sequences that bind keys to values, then query them from beyond the window.

Each sequence of T tokens binds n_live keys (ids [0, K)) to values (ids [K, K + V)) as key, value
pairs, then repeats bound keys with their values; a key is never rebound within a sequence. A
repeat is a query whose value is predictable only from the key's earlier occurrence d tokens back;
the loss is on those answers alone (train.py's loss_mask), and half the queries reach back d >= W,
past a sliding window of W tokens. Written as train.py's pre-tokenised .npz; scored here by
argmax accuracy at the answers, by distance.
"""

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import load_hf
from files import atomic_write
from data import load_npz, window_batch


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
