"""Starts × stabilisers (README, "Stabilisers, measured"): which exact start, with which
stabiliser, learns the recall task and stays stable on text?

    python -m study.stabilisers screen         # one seed: recall, then text at 4,096 for the
                                               # combinations that learned recall, and controls
    python -m study.stabilisers full ARM ...   # chosen arms in full, each paired with controls

An arm is START+STABILISER: a start of starts.TTT_INITS and one stabiliser of STABILISERS (train.py
--override keys), e.g. calibrated+target-norm. Parts (each run is `python train.py`, one thread,
study/arms.py's train_arm; finished runs are skipped, a killed one resumes):
- recall: study part 1's task and model (SWA W = 8, TTT in layer 1, 300 steps); accuracy at the
  answers d >= W back;
- text4096: study.long_context's runs (bytes preset, SWA W = 128 = C, 150 steps of one 4,096-byte
  window), scored on the same 68 held-out windows, as trained and with the updates off;
- text1024: study part 4's runs (8 windows of W, 150 steps of 2,048 bytes), on 276 windows;
- cpt: study part 3's continual pretraining (100 steps from the study's no-TTT base model,
  TTT in layers 1 and 3 with the MLP-input target, C = 128), on 276 windows, paired with no TTT.
Every TTT run's ‖ΣΔW‖/‖W0‖ over training comes from train.py's validations. Writes
<out>/RESULTS.md (default out/stab); the study's base model and recall data are shared with
`python -m study` (out/study).
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import cli
from files import atomic_write
from starts import TTT_INITS
from study.arms import (FULL, ROOT, Job, plan as study_plan, prepare_recall_data, recall_argv,
                        text_files, train_arm)
from study.plots import curves, pyplot
from study.probes import held_out, text_scores
from study.stats import at_step, diff_cell, mean_sd, paired, window_loss
from study.task import recall_accuracy

# --override fields. τ = 0.5 is ~0.08 ‖W0‖ at init for both models (‖W0‖ 6.5 bytes, 4.6 recall):
# a window's ΣΔW then stays within a few ‖W0‖ (the text runs that never diverged stayed below 3).
# The warm-up spans half of each part's steps (the reproduction's: 200 of 300 steps).
STABILISERS = {"none": [], "key-norm": ["ttt_key_norm=true"],
               "target-norm": ["ttt_target_norm=true"], "clip": ["ttt_clip_tau=0.5"],
               "norm-preserve": ["ttt_norm_preserve=true"], "warmup": ["ttt_lr_warmup={half}"]}
STARTS = ("paper", "zero-conv", "calibrated")  # zero-proj spikes continual pretraining: left out
# every text and CPT arm is paired with these: no TTT (SWA in the text parts), and the paper start
CONTROLS = ("no-ttt", "paper+none")
SCREEN_SEED = 1  # zero-conv diverged at 4,096 in seeds 1 and 2, not 0: the harder screen
SEEDS = {"recall": (0, 1, 2, 3, 4), "text4096": (0, 1, 2), "text1024": (0, 1, 2), "cpt": (0, 1, 2)}
W, L_LONG, STEPS = 128, 4096, 150


def split(arm) -> tuple[str | None, str]:
    """(start, stabiliser) of an arm name; (None, "none") for no-ttt."""
    if arm == "no-ttt":
        return None, "none"
    start, _, stab = arm.partition("+")
    if start not in TTT_INITS or stab not in STABILISERS:
        raise SystemExit(f"arm {arm!r}: expected START+STABILISER with START one of "
                         f"{', '.join(TTT_INITS)} and STABILISER one of {', '.join(STABILISERS)}")
    return start, stab


def argv(part, arm, seed, out: Path) -> list:
    """train.py's flags for one run of an arm in a part."""
    start, stab = split(arm)
    steps = {"recall": FULL.recall_steps, "cpt": FULL.cpt_steps}.get(part, STEPS)
    fields = [f.format(half=steps // 2) for f in STABILISERS[stab]]
    ttt = ["--no-ttt"] if start is None else ["--ttt-init", start]
    tail = ["--seed", str(seed), "--out", str(out / part / arm / f"seed{seed}"),
            "--cache", str(ROOT / "out" / "study" / "cache")]
    if part == "recall":
        return [*recall_argv(FULL, ROOT / "out" / "study", ["sliding_window={W}", *fields], ttt),
                *tail]  # SWA of the task's W, as every recall arm of the study
    train_files, val_files = text_files(FULL)
    data = ["--data", *train_files, "--val-data", *val_files, "--val-windows", "8"]
    if part == "cpt":  # study part 3's run, from its base model's export
        base = study_plan(FULL, ROOT / "out" / "study")[0]
        ttt += [] if start is None else ["--ttt-layers", "1,3", "--ttt-chunk", str(FULL.cpt_chunk),
                                         "--ttt-lr", "1.0", "--ttt-target", "hidden_states"]
        return [*data, "--init", str(base.out / "hf"), "--seq-len", str(FULL.base_seq_len),
                "--batch-tokens", str(FULL.cpt_batch), "--steps", str(steps),
                "--lr", str(FULL.cpt_lr), "--warmup", str(FULL.cpt_warmup),
                "--val-every", str(FULL.cpt_val_every), "--save-every", str(steps), "--keep", "1",
                *(["--override", *fields] if fields else []), *ttt, *tail]
    L = L_LONG if part == "text4096" else FULL.text_seq_len
    ttt += [] if start is None else ["--ttt-chunk", str(W)]
    return [*data, "--seq-len", str(L), "--batch-tokens", str(L if L == L_LONG else FULL.text_batch),
            "--steps", str(steps), "--val-every", "25", "--save-every", str(steps), "--keep", "1",
            "--override", f"max_position_embeddings={L}", f"sliding_window={W}", *fields, *ttt,
            *tail]


def run(part, arm, seed, out: Path) -> dict:
    """Train (or find) one run and score it; the result is kept in <run>/result.json."""
    job = Job(part, arm, seed, argv(part, arm, seed, out), out / part / arm / f"seed{seed}")
    done, hf = job.out / "result.json", job.out / "hf"
    result = json.loads(done.read_text()) if done.exists() else None
    if result is None or result["argv"] != job.argv:
        result = train_arm(job)
    if part == "recall" and "acc" not in result:
        result["acc"] = recall_accuracy(hf, ROOT / "out" / "study" / "data" / "recall_eval.npz",
                                        FULL.task)["acc"]
    # text: as trained; TTT arms also with the updates off, and at 1,024 with the paper's
    # evaluation clip (at 4,096 a scoring pass costs a third of a run)
    tau = ["paper-tau"] if part != "text4096" else []
    for v in [] if part == "recall" else ["on"] if arm == "no-ttt" else ["on", "off", *tau]:
        if f"text.{v}" not in result:
            result[f"text.{v}"] = text_scores(hf, *held_out(job.out), v)
    atomic_write(done, json.dumps(result))  # scores added later keep the training's
    print(f"{job.name}: {result['wall_s']:.0f} s, val_loss {result['val_loss']:.3f}"
          + (f", d>=W {result['acc']['d>=W']:.3f}" if "acc" in result else ""), flush=True)
    return result


def base_model(out_study: Path):
    """The study's no-TTT base model (part 3 continues it), trained here if `python -m study`
    has not."""
    from study.arms import run_job
    run_job(study_plan(FULL, out_study)[0], FULL, out_study)


def runs(pool, part, arms, seeds, out, finished_only=False) -> list[dict]:
    """Every (arm, seed) of a part: trained and scored, or with finished_only those already done
    (their result.json), so a report can be written while the rest still runs or was cut."""
    todo = [(arm, s) for s in seeds for arm in arms]
    if finished_only:
        todo = [(a, s) for a, s in todo if (out / part / a / f"seed{s}" / "result.json").exists()]
    return list(pool.map(lambda a: run(part, *a, out), todo))


# -----------------------------------------------------------------------------
# Tables


def dw_cells(rs, marks) -> list[str]:
    """‖ΣΔW‖/‖W0‖ (train.py's, mean over TTT layers) at each mark, the seeds' values."""
    return [", ".join(f"{at_step(r, m):.3g}" for r in rs) if r_ttt(rs) else "—" for m in marks]


def r_ttt(rs) -> bool:
    return "--no-ttt" not in rs[0]["argv"]


def recall_md(results: dict) -> list[str]:
    lines = ["| arm | d ≥ W: mean ± sd | seeds ≥ 0.9 | d < W | ‖ΣΔW‖/‖W0‖ at 30, 150, 300 "
             "(per seed) | s/run |", "|---|---:|---:|---:|---|---:|"]
    for arm, rs in results.items():
        far = [r["acc"]["d>=W"] for r in rs]
        lines.append(f"| {arm} | {mean_sd(far)} | {sum(a >= 0.9 for a in far)}/{len(far)} | "
                     f"{mean_sd([r['acc']['d<W'] for r in rs])} | "
                     + " ; ".join(dw_cells(rs, (30, 150, 300)))
                     + f" | {np.mean([r['wall_s'] for r in rs]):.0f} |")
    return lines


def text_md(results: dict, steps) -> list[str]:
    """Held-out loss, paired against the controls and updates off − on; the fast weight's size."""
    ctl, paper = results.get("no-ttt"), results.get("paper+none")
    lines = ["| arm | held-out loss | − no TTT, paired | − paper, paired | updates off − on | "
             "paper's τ = 1e-5 at evaluation − as trained | "
             f"‖ΣΔW‖/‖W0‖ at {', '.join(map(str, steps))} (per seed) | s/run |",
             "|---|---:|---|---|---|---|---|---:|"]
    for arm, rs in results.items():
        cells = [mean_sd([window_loss(r).mean() for r in rs], 4)]
        cells += [diff_cell(paired(c, rs)) if c and c is not rs else "" for c in (ctl, paper)]
        cells += [diff_cell(paired(rs, rs, "on", v)) if r_ttt(rs) and f"text.{v}" in rs[0]
                  else "" for v in ("off", "paper-tau")]
        cells.append(" ; ".join(dw_cells(rs, steps)))
        lines.append(f"| {arm} | " + " | ".join(cells)
                     + f" | {np.mean([r['wall_s'] for r in rs]):.0f} |")
    return lines


def cpt_spikes(rs) -> str:
    """'loss at step 1 → highest of steps 2–10' per seed: a start's first steps."""
    return ", ".join(f"{r['losses'][0]:.2f} → {max(r['losses'][1:10]):.2f}" for r in rs)


def report(parts: dict, out: Path, name: str, wall: float):
    lines = [f"# {name} (python -m study.stabilisers; {wall / 60:.1f} min of this invocation)", ""]
    titles = {"recall": ("Recall beyond the window (study part 1's task)", None),
              "text4096": ("Text from scratch at context 4,096", (50, 100, 150)),
              "text1024": ("Text from scratch at context 1,024", (50, 100, 150)),
              "cpt": ("Continual pretraining from the study's base model", (10, 50, 100))}
    for part, results in parts.items():
        title, steps = titles[part]
        seeds = sorted({r["seed"] for rs in results.values() for r in rs})
        lines += [f"## {title}; seeds {', '.join(map(str, seeds))}", ""]
        lines += recall_md(results) if part == "recall" else text_md(results, steps)
        if part == "cpt":
            lines += ["", "first steps (loss at step 1 → highest of steps 2–10), per seed:", ""]
            lines += [f"- {arm}: {cpt_spikes(rs)}" for arm, rs in results.items()]
        lines.append("")
    atomic_write(out / f"RESULTS-{name}.md", "\n".join(lines))
    print("\n".join(lines))


def plot(parts: dict, path: Path, plt):
    """Per part: ‖ΣΔW‖/‖W0‖ and train.py's validation loss over training, one line per arm."""
    shown = [p for p in parts if p != "recall"] or list(parts)
    fig, axes = plt.subplots(2, len(shown), figsize=(6.5 * len(shown), 9), squeeze=False)
    for col, part in enumerate(shown):
        curves(axes[0, col], parts[part], "dw", "‖ΣΔW‖/‖W0‖", f"{part}: the fast weight's size")
        curves(axes[1, col], parts[part], "val_loss", "validation loss", f"{part}: loss", log=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grouped(results) -> dict:
    arms = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        arms.setdefault(r["arm"], []).append(r)
    return arms


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m study.stabilisers", description=__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("stage", choices=("screen", "full"))
    p.add_argument("arms", nargs="*", metavar="ARM", help="full: START+STABILISER arms")
    p.add_argument("--parts", nargs="+", choices=tuple(SEEDS), default=list(SEEDS),
                   help="full: which parts to run")
    p.add_argument("--out", default=str(ROOT / "out" / "stab"), help="runs and RESULTS-*.md")
    p.add_argument("--jobs", type=int, action=cli.AtLeast, low=1, default=2,
                   help="train.py runs at a time (one thread each)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: report the runs that have finished")
    args = p.parse_args(argv)
    for arm in args.arms:
        split(arm)  # a misspelt arm fails now, not after an hour of runs
    out, t0, fin = Path(args.out), time.perf_counter(), args.finished_only
    torch.set_num_threads(1)
    prepare_recall_data(FULL, ROOT / "out" / "study")
    parts = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        if args.stage == "screen":
            arms = [f"{s}+{t}" for s in STARTS for t in STABILISERS]
            parts["recall"] = grouped(runs(pool, "recall", arms, [SCREEN_SEED], out, fin))
            learned = [a for a, rs in parts["recall"].items() if rs[0]["acc"]["d>=W"] >= 0.9]
            # what learned recall, beside the same start without a stabiliser and the controls
            text = list(dict.fromkeys([*CONTROLS, *(split(a)[0] + "+none" for a in learned),
                                       *learned]))
            parts["text4096"] = grouped(runs(pool, "text4096", text, [SCREEN_SEED], out, fin))
        else:
            if "cpt" in args.parts and not fin:
                base_model(ROOT / "out" / "study")
            for part in args.parts:
                arms = args.arms if part == "recall" else [*CONTROLS, *args.arms]
                parts[part] = grouped(runs(pool, part, list(dict.fromkeys(arms)), SEEDS[part],
                                           out, fin))
    report(parts, out, args.stage, time.perf_counter() - t0)
    if (plt := pyplot()) is not None:
        plot(parts, out / f"{args.stage}.png", plt)
        print(f"wrote {out / f'{args.stage}.png'}")


if __name__ == "__main__":
    main()
