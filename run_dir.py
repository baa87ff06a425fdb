"""A training run's directory (train.py --out) and its Hugging Face export: what a run may write
there, and when. Nothing a run did not write is replaced: a rerun into an --out holding a run
needs --resume or --overwrite, an export replaces only an earlier export, and the export of a
finished run is written again only when it is older than the run's final checkpoint.

    existing = claim_out(Path("out/bytes"), Path("out/bytes/hf"), resume=False, overwrite=False,
                         rank=0, log=print, hold=stack)    # links refused, the lock held, checked
"""

from contextlib import ExitStack
from pathlib import Path

import load_hf
from checkpoint import TRAIN_META, check_out, hold_out, refuse_links, run_files


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
    load_hf.check_export_target); and a fresh start into an --out holding a previous run
    (checkpoint.check_out). Returns the checkpoints found."""
    if export is not None:
        try:
            load_hf.check_export_target(export, overwrite, run_files(out))
        except OSError as e:
            raise SystemExit(f"--export-hf {export}: {e}") from None
    return check_out(out, export, resume, overwrite)


def export_final(final: Path, target: Path, out: Path, overwrite, finished, rank, log):
    """Rank 0 exports the final checkpoint to `target` (one process reads every rank's shards). A
    run resumed when already `finished` exports only when the export is missing or older than its
    final checkpoint (a kill between the last save and the export)."""
    mark, meta = target / load_hf.EXPORT_MARK, final / TRAIN_META
    if finished and mark.is_file() and mark.stat().st_mtime_ns >= meta.stat().st_mtime_ns:
        log(f"its export {target} was written after {final}: kept as it is")
        return
    if rank == 0:
        # Checked at setup too; again here, since the target may have changed during the run.
        # verify=False: the run has just written (or verified) this checkpoint.
        written = load_hf.export_checkpoint(final, target, overwrite=overwrite,
                                            protect=run_files(out), verify=False)
        log(f"exported {written} (from {final})")
