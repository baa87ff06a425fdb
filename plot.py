"""Draw a train.py run's curves from its metrics.jsonl into one PNG: training and validation loss,
validation loss by position in the window, and ‖ΣΔW‖/‖W0‖ per TTT layer (the first thing to watch
in an unstable TTT run). Several runs overlay: one line style per run, one colour per curve.

    python plot.py out/bytes                                     # writes out/bytes/curves.png
    python plot.py out/bytes out/bytes-no-ttt --out compare.png  # TTT against its baseline

matplotlib is optional for the rest of the project; without it this script says how to get it.
"""

import argparse
import itertools
import json
from pathlib import Path

STYLES = ["-", "--", ":", "-."]  # one per run, in the order given


def read_metrics(run: str) -> tuple[Path, list[dict]]:
    """A run's metrics.jsonl (given as the run directory or the file) and its rows. A line a kill
    cut short, or any line that is not a JSON object with a step, is skipped."""
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")  # a torn character: one line
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror}") from None
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    if not rows:
        raise SystemExit(f"error: {path} holds no metrics (no line is a JSON object with a step)")
    return path, rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, over the rows that have it (validation runs every few steps)."""
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def keys(rows: list[dict], prefix: str) -> list[str]:
    """Keys with this prefix in the order they first appear: buckets by position, layers by index."""
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith(prefix)))


def plot(runs: dict[str, list[dict]], path: Path):
    """Three panels; returns the (closed) figure, whose lines hold exactly the plotted data."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (loss, pos, dw) = plt.subplots(1, 3, figsize=(16, 4.5))
    for style, (name, rows) in zip(itertools.cycle(STYLES), runs.items()):
        loss.plot(*series(rows, "loss"), ls=style, color="C0", lw=1, label=f"{name}: train")
        loss.plot(*series(rows, "val_loss"), ls=style, color="C1", marker="o", ms=3,
                  label=f"{name}: validation")
        for color, key in enumerate(keys(rows, "val_loss_pos.")):
            pos.plot(*series(rows, key), ls=style, color=f"C{color}", marker="o", ms=3,
                     label=f"{name}: {key.removeprefix('val_loss_pos.')}")
        for color, key in enumerate(keys(rows, "ttt_dw_rel.")):
            dw.plot(*series(rows, key), ls=style, color=f"C{color}", marker="o", ms=3,
                    label=f"{name}: layer {key.removeprefix('ttt_dw_rel.')}")
    loss.set(xlabel="step", ylabel="loss (nats / token)", title="loss")
    pos.set(xlabel="step", ylabel="validation loss", title="validation loss by position")
    dw.set(xlabel="step", ylabel="‖ΣΔW‖ / ‖W0‖", title="fast-weight change per TTT layer")
    for ax in (loss, pos, dw):
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # a run without TTT layers, or stopped before its first validation
            ax.text(0.5, 0.5, "nothing logged", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="train.py output directories (or their metrics.jsonl files)")
    p.add_argument("--out", help="PNG to write (default: curves.png in the first run's directory)")
    args = p.parse_args(argv)
    try:  # checked first: reading a long metrics file is wasted without it
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: plot.py draws with matplotlib, which is not installed: "
                         "pip install matplotlib") from None
    runs = dict(read_metrics(run) for run in args.runs)
    out = Path(args.out) if args.out else next(iter(runs)).parent / "curves.png"
    try:
        fig = plot({str(path.parent): rows for path, rows in runs.items()}, out)
    except OSError as e:  # a missing or read-only folder: one line, not matplotlib's traceback
        raise SystemExit(f"error: cannot write {out}: {e.strerror}") from None
    print(f"wrote {out}")
    return fig


if __name__ == "__main__":
    main()
