"""Work done whose MLflow logging is pending: a trained adapter, an evaluation's predictions, kept until their run
has them so that a rerun logs them instead of doing the work again.

It sits beside the stage's outputs, never inside them: ``dvc repro`` deletes a stage's declared outputs before it
runs the stage again, so the files are hard links (a copy where links cannot be made) in a hidden folder, and
``state.json``, written last, says what they are: the MLflow run to log into, the fingerprint of the configuration
that made them, whatever else the stage needs to log them. A folder without its ``state.json`` (a stop while
keeping), or whose fingerprint differs from the rerun's, is discarded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from med_idefics.files import write_json

logger = logging.getLogger(__name__)
STATE_FILE = "state.json"


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_file)
    else:
        _link_file(source, target)


def _link_file(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, target)


class PendingLog:
    """The pending work kept in ``folder`` (see the module docstring); ``root``: a folder above it, removed with the
    folders between them when they are left empty."""

    def __init__(self, folder: str | Path, root: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.root = Path(root) if root is not None else self.folder

    def keep(self, state: Mapping[str, Any], files: Mapping[str, Path] | None = None) -> None:
        """Keep ``files`` (name → a file or folder, linked) and then ``state``; replaces what was kept before."""
        self.clear()
        for name, source in (files or {}).items():
            _link_or_copy(Path(source), self.folder / name)
        write_json(self.folder / STATE_FILE, dict(state))

    def update(self, **values: Any) -> None:
        state = json.loads((self.folder / STATE_FILE).read_text())
        write_json(self.folder / STATE_FILE, state | values)

    def load(self, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
        """The kept state when it was made by this very configuration; otherwise None, and what was kept is
        removed (naming why)."""
        if not self.folder.exists():
            return None
        state_file = self.folder / STATE_FILE
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            logger.warning("%s: incomplete (no readable %s), removed", self.folder, STATE_FILE)
            self.clear()
            return None
        if state.get("fingerprint") != json.loads(json.dumps(dict(fingerprint))):
            logger.warning("%s: kept by another configuration (params, data or model changed), removed", self.folder)
            self.clear()
            return None
        return state

    def peek(self) -> dict[str, Any] | None:
        """The kept state, read only (another rank, after the main one has loaded it)."""
        try:
            return json.loads((self.folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None

    def restore(self, name: str, target: str | Path) -> Path:
        """Put the kept ``name`` back at ``target`` (replacing what is there)."""
        target = Path(target)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        _link_or_copy(self.folder / name, target)
        return target

    def path(self, name: str) -> Path:
        return self.folder / name

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        for parent in [self.folder, *self.folder.parents]:
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
            if parent == self.root:
                break
