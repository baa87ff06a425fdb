"""Summaries over seeds: mean and spread, paired differences with a t-interval, and the lookups
the tables and plots share (runs by arm, a run's start, its curve at a step)."""

import math

import numpy as np

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
    if len(p["seeds"]) == 1:  # one seed: no interval over seeds, so nothing is called real
        return f"{p['mean']:+.4f} (windows ±{p['se']:.4f}; one seed)"
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
