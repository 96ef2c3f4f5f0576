"""Checkpoints a rerun can trust, and the disk they need.

A checkpoint is written aside, in ``<checkpoints>/.incomplete/checkpoint-<step>``, then a manifest of its files
(names and sizes, the step, the MLflow run that wrote it) is written into it last, its files are synced to disk, and
the folder is renamed into ``<checkpoints>/checkpoint-<step>``: a checkpoint is there whole or not at all. A kill
or a full disk during a save leaves only the aside folder; a checkpoint folder without its manifest, or whose files
differ from it, is incomplete as well. :func:`resume_point` takes the newest complete checkpoint and says which; it
names every incomplete one and removes it. :class:`AtomicCheckpointTrainer` is the HF ``Trainer`` that saves so;
:func:`space_needed` / :func:`check_free_space` refuse a training the disk cannot hold, with the numbers.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import Trainer

from med_idefics.files import DiskSpaceError

logger = logging.getLogger(__name__)
PREFIX = "checkpoint-"
STAGING = ".incomplete"
MANIFEST = "checkpoint_manifest.json"
FINGERPRINT_FILE = "fingerprint.json"  # what the checkpoints were made by: another configuration's are discarded
_OVERHEAD = 2**18  # scheduler, RNG states, trainer_state.json, training_args.bin: 76 KB on the tiny base


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    run_id: str | None  # the MLflow run that wrote it


def _step(path: Path) -> int | None:
    suffix = path.name.removeprefix(PREFIX)
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def _incomplete_reason(path: Path) -> str | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST}: its save did not finish"
    except (OSError, ValueError) as err:
        return f"unreadable {MANIFEST} ({err})"
    for name, size in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, its manifest says {size}"
    return None


def scan(folder: str | Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(incomplete folder, why)]) in ``folder``."""
    folder = Path(folder)
    complete, incomplete = [], []
    staging = folder / STAGING
    if staging.is_dir():
        incomplete += [(path, "written aside by a save that did not finish") for path in sorted(staging.iterdir())]
    for path in sorted(folder.glob(f"{PREFIX}*")):
        step = _step(path)
        if step is None or not path.is_dir():
            continue
        reason = _incomplete_reason(path)
        if reason is not None:
            incomplete.append((path, reason))
        else:
            run_id = json.loads((path / MANIFEST).read_text()).get("run_id")
            complete.append(Checkpoint(path, step, run_id))
    return sorted(complete, key=lambda c: c.step), incomplete


def resume_point(folder: str | Path, remove_incomplete: bool = True) -> Checkpoint | None:
    """The newest complete checkpoint in ``folder`` (None when there is none), saying which; every incomplete one is
    named and, when ``remove_incomplete`` (the main process only, under torchrun), removed."""
    complete, incomplete = scan(folder)
    for path, why in incomplete:
        logger.warning("ignoring incomplete checkpoint %s (%s)%s", path, why, ", removed" if remove_incomplete else "")
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    if remove_incomplete and (Path(folder) / STAGING).is_dir():
        shutil.rmtree(Path(folder) / STAGING, ignore_errors=True)
    if not complete:
        return None
    newest = complete[-1]
    written_by = f", written by run {newest.run_id}" if newest.run_id else ""
    logger.warning("resuming from %s (step %d%s)", newest.path, newest.step, written_by)
    return newest


def prepare_folder(folder: str | Path, fingerprint: dict, main_process: bool = True) -> Checkpoint | None:
    """The checkpoint to resume from in ``folder`` — the newest complete one made by this very configuration
    (``fingerprint``) — or None. Only the main process (rank 0 under torchrun) removes a stale folder or an incomplete
    checkpoint and writes the fingerprint; the other ranks only read, after it (``main_process_first``), so that every
    rank takes the same decision on the same folder."""
    folder = Path(folder)
    marker = folder / FINGERPRINT_FILE
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(fingerprint)):
        return resume_point(folder, remove_incomplete=main_process)
    if main_process:
        if any(folder.glob(f"{PREFIX}*")):
            logger.warning("%s: checkpoints of another configuration (params, data or model changed), removed", folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, folder: Path, step: int, run_id: str | None, keep: int | None) -> Path:
    """Seal the checkpoint written in ``staging`` with its manifest and rename it into ``folder``; then keep the
    newest ``keep`` complete checkpoints (by step)."""
    files = {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    for name in files:
        _fsync(staging / name)
    manifest = staging / MANIFEST
    manifest.write_text(json.dumps({"step": step, "run_id": run_id, "files": files}, indent=1))
    _fsync(manifest)
    target = folder / f"{PREFIX}{step}"
    if target.exists():  # the same step saved again (a resumed run's first save)
        shutil.rmtree(target)
    staging.rename(target)
    _fsync(folder)
    if keep:
        complete, _ = scan(folder)
        for old in complete[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return target


def is_disk_full(err: BaseException, folder: Path, needed: int) -> bool:
    """Whether a failed save failed for want of space: ENOSPC anywhere in its chain (torch reports it as a bare
    RuntimeError, safetensors in its message), or less than ``needed`` bytes left on ``folder``'s disk."""
    seen: BaseException | None = err
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return free_bytes(folder) < needed


def free_bytes(folder: Path) -> int:
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} GiB"


@dataclass(frozen=True)
class SpaceNeed:
    trainable: int  # parameters
    adapter: int  # bytes of the trainable weights: the adapter, and its part of each checkpoint
    checkpoint: int  # bytes of one checkpoint: the weights, AdamW's two moments per weight, a little state
    checkpoints: int  # how many are on disk at once, at most: save_total_limit, plus the one being written
    existing: int  # complete checkpoints already there (their space is taken)
    total: int  # free bytes training needs

    def explain(self) -> str:
        return (
            f"{human(self.total)}: {self.checkpoints - self.existing} more checkpoint(s) of {human(self.checkpoint)} "
            f"(save_total_limit {self.checkpoints - 1} plus the one being written, {self.existing} there already; "
            f"each {self.trainable:,} trainable parameters, {human(self.adapter)}, and AdamW's state, "
            f"{human(2 * self.adapter)}) and the adapter's copy in the MLflow artifacts, {human(self.adapter)}"
        )


def space_needed(model, save_total_limit: int, existing: int = 0) -> SpaceNeed:
    """What training ``model`` needs on disk, from its trainable parameters (the AdamW moments are the parameters'
    size each). The final adapter is saved while the last checkpoints are still there: within the same bound."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * p.element_size() for p in trainable)
    checkpoint = 3 * adapter + _OVERHEAD
    count = save_total_limit + 1
    existing = min(existing, save_total_limit)
    total = (count - existing) * checkpoint + adapter
    return SpaceNeed(sum(p.numel() for p in trainable), adapter, checkpoint, count, existing, total)


def check_free_space(folder: Path, need: SpaceNeed) -> None:
    free = free_bytes(folder)
    if free < need.total:
        raise DiskSpaceError(
            f"not enough free disk for training in {folder}: it needs about {need.explain()}; {human(free)} is free "
            "there. Free space on that disk, or train into a larger one (--out)"
        )


class AtomicCheckpointTrainer(Trainer):
    """The HF ``Trainer``, its checkpoints written aside and renamed into place when complete (module docstring).
    ``run_id``: the MLflow run recorded in each manifest; ``checkpoint_bytes``: one checkpoint's estimated size,
    what a failed save must have had free to not be a full disk."""

    def __init__(self, *args, run_id: str | None = None, checkpoint_bytes: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_id, self.checkpoint_bytes = run_id, checkpoint_bytes
        self._saving_aside = False

    def _get_output_dir(self, trial) -> str:
        # The Trainer writes checkpoint-<step> in (and rotates) the folder this returns: during a save, the aside one.
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._saving_aside else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(super()._get_output_dir(trial))
        staging = folder / STAGING / f"{PREFIX}{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self._saving_aside = True
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's part is written
            if self.args.should_save:
                publish(staging, folder, self.state.global_step, self.run_id, self.args.save_total_limit)
        except Exception as err:
            full = is_disk_full(err, folder, self.checkpoint_bytes)
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if full:
                complete, _ = scan(folder)
                last = f"the last complete one is {complete[-1].path}" if complete else "there is no complete one"
                raise DiskSpaceError(
                    f"the disk of {folder} filled while saving {staging.name} ({human(free_bytes(folder))} free "
                    f"after removing it; a checkpoint takes about {human(self.checkpoint_bytes)}): {last}. Free "
                    "space there and run the same command again: it resumes from the last complete checkpoint"
                ) from err
            raise
        finally:
            self._saving_aside = False
