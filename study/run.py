"""The study's one command, `python -m study` (study/__main__.py calls main here): prepares the
recall data, runs every arm (study/arms.py) two at a time, then writes RESULTS.md and the
pictures."""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import cli
import study
from study.arms import ANSWER_ARMS, FULL, QUICK, Sizes, plan, prepare_recall_data, run_job
from study.plots import plot_learned, plot_study, plot_text, pyplot
from study.probes import fast_weight_answers
from study.report import results_markdown
from study.stats import by_arm


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
    p = argparse.ArgumentParser(prog="python -m study", description=study.__doc__,
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="toy sizes: the whole pipeline in about 3 minutes on 2 cores")
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
