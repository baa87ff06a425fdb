"""How the fast weight's gain grows with training (README, "How the gain grows"): the quick
start's model (bytes preset, context 1,024, TTT as the preset has it) with and without TTT, with
full attention and with SWA of W = 128 = C, seeds 0-2, 1,000 steps; each run's checkpoints at
150, 400 and 1,000 steps exported and scored on the study's held-out speeches (276 windows,
282,624 tokens) as trained and with the fast-weight updates off.

    python -m study.growth            # about 1.3 h on 2 cores (12 runs of 9-10 min); rerun to resume
    python -m study.growth --jobs 1   # one run at a time (leaves a core for other work)

Each run is `python train.py` (study/arms.py's train_arm: one thread, --resume). Two paired
differences per step and attention, over seeds: TTT − no TTT (same seed: same batches, same
windows) and, for the same TTT weights, updates off − on. Writes <out>/RESULTS.md and
<out>/growth.png; runs and scores stay in <out> (default out/growth).
"""

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import cli
import load_hf
from files import atomic_write
from study.arms import FULL, ROOT, Job, text_files, train_arm
from study.plots import pyplot
from study.probes import held_out, text_scores
from study.stats import diff_cell, mean_sd, paired, window_loss

STEPS, MARKS, SEEDS, W = 1000, (150, 400, 1000), (0, 1, 2), 128
ATTENTION = {"full": [], "swa": [f"sliding_window={W}"]}  # --override fields


def plan(out: Path, steps=STEPS, seeds=SEEDS, marks=MARKS) -> list[Job]:
    """Every run: attention × (TTT, no TTT) × seed, checkpoints kept at every mark."""
    train_files, val_files = text_files(FULL)
    every = int(np.gcd.reduce(marks))
    jobs = []
    for seed in seeds:
        for attn, fields in ATTENTION.items():
            for ttt in (True, False):
                arm = f"{attn}-{'ttt' if ttt else 'nottt'}"
                run = out / arm / f"seed{seed}"
                argv = ["--data", *train_files, "--val-data", *val_files, "--steps", str(steps),
                        "--save-every", str(every), "--keep", str(steps // every),
                        "--val-every", "250", "--no-export",
                        *(["--override", *fields] if fields else []),
                        *([] if ttt else ["--no-ttt"]), "--seed", str(seed), "--out", str(run),
                        "--cache", str(out / "cache")]
                jobs.append(Job("growth", arm, seed, argv, run))
    return jobs


def score_run(job: Job, val, L, marks=MARKS) -> dict:
    """held-out scores of the run's checkpoint at each mark (exported once to <run>/hf<step>):
    {"<step>.on": text_scores, "<step>.off": ... (TTT runs)}; kept in <run>/scores.json."""
    path = job.out / "scores.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    for step in marks:
        hf = job.out / f"hf{step}"
        for variant in ("on", "off") if job.arm.endswith("-ttt") else ("on",):
            if f"{step}.{variant}" in scores:
                continue
            if not (hf / "config.json").exists():
                load_hf.export_checkpoint(job.out / "ckpt" / f"step_{step:06d}", hf)
            scores[f"{step}.{variant}"] = text_scores(hf, val, L, variant)
            atomic_write(path, json.dumps(scores))
    return scores


def as_result(job: Job, scores: dict, step: int) -> dict:
    """One run at one step in study/stats.py's shape (seed, text.on, text.off)."""
    return {"seed": job.seed, **{f"text.{k.split('.')[1]}": v for k, v in scores.items()
                                 if k.startswith(f"{step}.")}}


def table(jobs, scores, marks=MARKS) -> tuple[list[str], dict]:
    """RESULTS.md's lines, and the paired differences by (attention, step) for the picture."""
    lines = ["| attention | step | TTT | TTT, updates off | no TTT | TTT − no TTT (paired) | "
             "updates off − on (paired) |", "|---|---:|---:|---:|---:|---|---|"]
    diffs = {}
    for attn in ATTENTION:
        for step in marks:
            runs = {arm: [as_result(j, scores[j.name], step) for j in jobs
                          if j.arm == f"{attn}-{arm}"] for arm in ("ttt", "nottt")}
            gain = paired(runs["nottt"], runs["ttt"])
            off = paired(runs["ttt"], runs["ttt"], "on", "off")
            diffs[(attn, step)] = (gain, off)
            cells = [mean_sd([window_loss(r, v).mean() for r in runs[a]], 4)
                     for a, v in (("ttt", "on"), ("ttt", "off"), ("nottt", "on"))]
            lines.append(f"| {attn} | {step} | " + " | ".join(cells)
                         + f" | {diff_cell(gain)} | {diff_cell(off)} |")
    return lines, diffs


def plot(diffs, path: Path, plt, marks=MARKS):
    """TTT − no TTT and updates off − on against steps, both attentions, 95% t-intervals."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, k, title in ((axes[0], 0, "TTT − no TTT (held-out nats/byte; < 0: TTT better)"),
                         (axes[1], 1, "updates off − on, same weights (> 0: updates help)")):
        for i, attn in enumerate(ATTENTION):
            ps = [diffs[(attn, s)][k] for s in marks]
            ax.errorbar(np.array(marks) * (1 + 0.03 * i), [p["mean"] for p in ps],
                        yerr=[p["ci"] for p in ps], marker="o", capsize=3, label=attn)
            for s, p in zip(marks, ps):
                ax.scatter([s * (1 + 0.03 * i)] * len(p["seeds"]), p["seeds"], color=f"C{i}",
                           alpha=0.3, s=10)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", xticks=list(marks), xticklabels=[str(m) for m in marks],
               xlabel="training step", title=title)
        ax.minorticks_off()  # the marks are the only steps there are
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m study.growth", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--out", default=str(ROOT / "out" / "growth"), help="runs and results")
    p.add_argument("--jobs", type=int, action=cli.AtLeast, low=1, default=2,
                   help="train.py runs at a time (one thread each)")
    args = p.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)
    jobs = plan(out)

    def train(job):
        if not (job.out / "ckpt" / f"step_{STEPS:06d}").exists():
            train_arm(job)
        print(f"{job.name}: trained", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(train, jobs))
    val, L = held_out(jobs[-1].out)  # every run holds out the same speeches
    with ThreadPoolExecutor(args.jobs) as pool:
        scores = dict(zip([j.name for j in jobs], pool.map(lambda j: score_run(j, val, L), jobs)))
    lines, diffs = table(jobs, scores)
    atomic_write(out / "RESULTS.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if (plt := pyplot()) is not None:
        plot(diffs, out / "growth.png", plt)
        print(f"wrote {out / 'growth.png'}")


if __name__ == "__main__":
    main()
