"""Checkpoints that are whole or absent: written under a temporary name, renamed, rotated safely.

transformers 5.24 writes `checkpoint-N/` in place (weights, optimizer, scheduler, RNG states, and
`trainer_state.json` last), so a kill during a save leaves a half-written folder with the name of
a good one, and its rotation (`save_total_limit`) orders folders by mtime, or by step number when
the mtimes lie within a second of each other, so a half-written folder with a higher step can be
"the newest" it protects while the newest complete one is deleted. `AtomicCheckpointsMixin`
(first in a trainer's bases, like `techniques.training.ExactEvalMixin`) changes both:

1. The trainer writes the checkpoint into `<output_dir>/.partial-checkpoints/checkpoint-N/`; once
   every process has written its part, the main process renames it to `<output_dir>/checkpoint-N`
   (replacing an older folder of that name). A `checkpoint-N` folder that exists is complete.
2. Rotation keeps the `save_total_limit` complete checkpoints with the highest steps plus the one
   just written, and never counts or deletes an incomplete folder: the newest complete
   checkpoint always survives.

`complete_checkpoints(output_dir)` lists what a resume may start from; `runs.guards` picks from it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-" + step
STAGING_DIR = ".partial-checkpoints"
TRAINER_STATE = "trainer_state.json"  # transformers writes it last in a checkpoint


def checkpoint_step(folder: str | Path) -> int | None:
    """N of a folder named `checkpoint-N`, else None."""
    match = CHECKPOINT_NAME.match(Path(folder).name)
    return int(match[1]) if match else None


def is_complete_checkpoint(folder: str | Path) -> bool:
    """A `checkpoint-N` folder whose `trainer_state.json` reads back with global_step N.

    Checkpoints written here are complete by construction (renamed into place); this also rejects
    folders written in place by other tools or older versions and cut short, which lack the state
    file or hold a truncated one.
    """
    folder = Path(folder)
    step = checkpoint_step(folder)
    if step is None or not folder.is_dir():
        return False
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == step


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, lowest step first ([] when there is no such folder)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if is_complete_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-N` folders of `output_dir` that are not complete (a save cut short elsewhere)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if checkpoint_step(p) is not None and not is_complete_checkpoint(p)),
                  key=checkpoint_step)


def rotate_checkpoints(output_dir: str | Path, save_total_limit: int | None, keep: Path) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `save_total_limit`; return the deleted ones.

    Kept: the `save_total_limit` complete checkpoints with the highest steps, and `keep` (the one
    just written; after resuming from an earlier checkpoint a higher-step folder of the abandoned
    continuation may exist until this run overwrites it). Incomplete folders are never counted,
    so they can never push the newest complete checkpoint out. None = keep every checkpoint.
    """
    if not save_total_limit:
        return []
    checkpoints = complete_checkpoints(output_dir)
    newest = set(checkpoints[-save_total_limit:]) | {Path(keep)}
    deleted = [p for p in checkpoints if p not in newest]
    for folder in deleted:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("deleted %s (save_total_limit=%d)", folder, save_total_limit)
    return deleted


def replace_dir(new: Path, target: Path) -> None:
    """Move folder `new` to `target` on the same filesystem, replacing an older `target` (renamed
    away first, then removed), so that `target`, when it exists, is either the old or the new folder
    whole. Between the two renames it is absent and the old one lies in `.<name>.old`; the next call
    clears that."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


class AtomicCheckpointsMixin:
    """Checkpoints written whole or not at all, rotated without losing the newest (module docstring).

    Put it before the transformers/TRL trainer class in the bases. Works under several processes:
    every process writes its part (FSDP shards, RNG states) into the staging folder, then the main
    process renames it once all have finished.
    """

    _checkpoint_staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        # transformers' _save_checkpoint writes into <this>/checkpoint-N; while saving, <this> is staging
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        staging = run_dir / STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a save cut short before
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            replace_dir(staging / name, run_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=run_dir / name)
        self.accelerator.wait_for_everyone()
