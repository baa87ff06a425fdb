"""The study's pictures (study.png, text.png, learned.png), drawn from the runs' results.
matplotlib is optional: without it the tables are still written."""

from pathlib import Path

import numpy as np

from study.arms import Sizes
from study.stats import by_arm, start_of


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
