"""Metrics where people look: each metrics.jsonl row of train.py also to wandb and/or TensorBoard.

    python train.py --wandb my-project          # WANDB_MODE=offline: files for a later `wandb sync`
    python train.py --tensorboard               # event files in <out>/tb: tensorboard --logdir out

Both are optional and off by default; metrics.jsonl stays the record that --resume and plot.py
read. Every number of a row is logged under its metrics.jsonl name at the row's "step" (the
untrained model's validation is step 0). Only rank 0 logs, as only it writes metrics.jsonl.
"""

import importlib.util
import os
from pathlib import Path

PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}  # flag -> the package it needs


def missing_package(wandb_project=None, tensorboard=False) -> str | None:
    """The one-line error for a requested logger whose package is not installed, else None."""
    for flag, wanted in (("wandb", wandb_project), ("tensorboard", tensorboard)):
        if wanted and importlib.util.find_spec(PACKAGES[flag]) is None:
            return f"error: --{flag} needs the {PACKAGES[flag]} package: pip install {PACKAGES[flag]}"
    return None


class Logs:
    """The loggers a run asked for; write(row) sends a metrics.jsonl row to each, close() ends."""

    def __init__(self, out: Path, wandb_project=None, tensorboard=False, config=None, start=0):
        self.wandb, self.tb = None, None
        if wandb_project:
            import wandb
            # mode: wandb's own WANDB_MODE (offline writes <out>/wandb/offline-run-*), else online.
            # A resumed run is a new wandb run of the same group (the run directory's name).
            self.wandb = wandb.init(project=wandb_project, dir=str(out), config=config,
                                    group=Path(out).resolve().name,
                                    mode=os.environ.get("WANDB_MODE", "online"),
                                    settings=wandb.Settings(silent=True))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: readers hide the events at steps from start + 1 on, which a killed run
            # wrote past the checkpoint this run resumes (a fresh run, start 0: all of an
            # overwritten run's), as metrics.jsonl drops those rows.
            self.tb = SummaryWriter(log_dir=str(Path(out) / "tb"), purge_step=start + 1 if start else 0)

    def write(self, row: dict):
        step = row["step"]
        numbers = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()  # a killed run keeps what it logged

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
