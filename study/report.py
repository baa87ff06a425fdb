"""The study's tables: RESULTS.md, one section per part of the study (see study/__init__.py)."""

import numpy as np

from starts import EXACT_TTT_INITS
from study.arms import CPT_ARMS, RECALL_ARMS, TEXT_ARMS, Sizes
from study.stats import at_step, by_arm, diff_cell, mean_sd, paired, start_of, window_loss
from study.task import distance_buckets


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
        exact = "—" if start == "—" else "yes" if start in EXACT_TTT_INITS else "no"
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
             "P = I (starts.update_scale on the first batch): what a start's P multiplies. Gradient "
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
        exact = "—" if start == "—" else "yes" if start in EXACT_TTT_INITS else "no"
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
             "", f"`python -m study` took {wall / 60:.1f} min here (skipped arms excluded)."]
    return "\n".join(lines) + "\n"
