"""The study's text part at a context of 4,096 bytes (32 windows of W = 128): does a fast weight
that can carry what left the window help real text when there is more of it to carry? (README,
section 4.)

    python -m study.long_context     # about 50 minutes on 2 cores; rerun to resume

SWA without TTT and SWA + TTT from the `paper` and `zero-conv` starts (C = W = 128, TTT as the
bytes preset has it), seeds 0-2: each a `python train.py` run on the study's training speeches, 150
steps of one 4,096-byte window, two at a time on one thread each. Scored as the study scores its
text arms (study/probes.py text_scores): the held-out windows of 4,096 (the same 68 for every arm, 278,528
tokens; train.py's own validation uses all 69), as trained and with the fast-weight updates off,
with paired differences over seeds.
Prints the tables; runs and scores stay in out/long/.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python study/long_context.py` works too
from study.arms import FULL, text_files  # noqa: E402  (the project's files, after the path insert)
from study.probes import held_out, text_scores  # noqa: E402
from study.stats import diff_cell, mean_sd, paired, window_loss  # noqa: E402

L, W, STEPS, SEEDS, OUT = 4096, 128, 150, (0, 1, 2), ROOT / "out" / "long"
ARMS = {"swa": ["--no-ttt"], "paper": ["--ttt-init", "paper", "--ttt-chunk", str(W)],
        "zero-conv": ["--ttt-init", "zero-conv", "--ttt-chunk", str(W)]}


def argv(arm, seed) -> list:
    train_files, val_files = text_files(FULL)
    return ["--data", *train_files, "--val-data", *val_files, "--val-windows", str(282_624 // L),
            "--seq-len", str(L), "--batch-tokens", str(L), "--steps", str(STEPS),
            "--val-every", "50", "--save-every", str(STEPS), "--keep", "1", "--override",
            f"max_position_embeddings={L}", f"sliding_window={W}", *ARMS[arm], "--seed", str(seed),
            "--out", str(OUT / arm / f"seed{seed}"), "--cache", str(ROOT / "out/study/cache")]


def run(arm, seed) -> dict:
    """Train (or resume, or find finished) one arm, then score it (kept in scores.json)."""
    flags, scores = argv(arm, seed), OUT / arm / f"seed{seed}" / "scores.json"
    if scores.exists() and json.loads(scores.read_text())["argv"] == flags:
        return json.loads(scores.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--resume"], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    run_dir = OUT / arm / f"seed{seed}"
    val, hf = held_out(run_dir)[0], run_dir / "hf"
    result = {"arm": arm, "seed": seed, "argv": flags,
              **{f"text.{v}": text_scores(hf, val, L, v)
                 for v in (["on"] if arm == "swa" else ["on", "off"])}}
    scores.write_text(json.dumps(result))
    print(f"{arm}/seed{seed}: held-out {window_loss(result).mean():.4f}", flush=True)
    return result


def main():
    torch.set_num_threads(1)  # scoring runs beside the other job's training
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: run(*job), [(a, s) for s in SEEDS for a in ARMS]))
    by = {arm: [r for r in results if r["arm"] == arm] for arm in ARMS}
    spans = {"all": (0, None), f"0-{W}": (0, W), f"{W}-{L}": (W, None)}
    head = " | ".join(spans) + " |\n|---|---|---|---|"
    print(f"\nheld-out loss, {len(results[0]['text.on']['windows'])} windows of {L}; mean ± sd "
          f"over seeds {', '.join(map(str, SEEDS))}\n\n| arm | {head}")
    for arm, rs in by.items():
        cells = [mean_sd([window_loss(r, "on", *s).mean() for r in rs])
                 for s in spans.values()]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    print(f"\npaired, b − a (diff_cell)\n\n| b − a | {head}")
    pairs = [("paper − swa", "swa", "paper", "on", "on"),
             ("zero-conv − swa", "swa", "zero-conv", "on", "on"),
             ("zero-conv − paper", "paper", "zero-conv", "on", "on"),
             ("paper, updates off − on", "paper", "paper", "on", "off"),
             ("zero-conv, updates off − on", "zero-conv", "zero-conv", "on", "off")]
    for label, a, b, va, vb in pairs:
        cells = [diff_cell(paired(by[a], by[b], va, vb, s)) for s in spans.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
