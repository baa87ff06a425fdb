"""A training run's directory (train.py --out) and its Hugging Face export target: what a run may
write there. Nothing a run did not write is replaced: a rerun into an --out holding a run needs
--resume or --overwrite, and an export replaces only an earlier export.

    existing = claim_out(Path("out/bytes"), Path("out/bytes/hf"), resume=False, overwrite=False,
                         rank=0, log=print, hold=stack)    # links refused, the lock held, checked
"""

from contextlib import ExitStack
from pathlib import Path

from checkpoint import checkpoints, run_files
from files import check_export_target, check_out, hold_out, refuse_links


def claim_out(out: Path, export: Path | None, resume, overwrite, rank, log,
              hold: ExitStack) -> list[Path]:
    """Before any data or weights load: refuse links in --out, take its lock (held until `hold`
    closes: one run at a time writes there), and refuse a run that would replace what it did not
    write (check_run_dir). Returns the checkpoints found."""
    refuse_links(out)  # before the lock: its own file could be a link
    hold.enter_context(hold_out(out, rank, log))
    return check_run_dir(out, export, resume, overwrite)


def check_run_dir(out: Path, export: Path | None, resume, overwrite) -> list[Path]:
    """Refuse a run that would replace what it did not write: an --export-hf onto this run's own
    checkpoints or metrics, or onto what is not an earlier export (without --overwrite,
    files.check_export_target); and a fresh start into an --out holding a previous run
    (files.check_out). Returns the checkpoints found."""
    if export is not None:
        try:
            check_export_target(export, overwrite, run_files(out))
        except OSError as e:
            raise SystemExit(f"--export-hf {export}: {e}") from None
    existing = checkpoints(out / "ckpt")
    check_out(out, existing, export, resume, overwrite)
    return existing
