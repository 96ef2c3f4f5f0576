"""Writing output files atomically (a temp file in the target's folder, then renamed: a failure never leaves a
half-written file — metrics, predictions, reports, summaries), and the digests that identify files and folders."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path


class DiskSpaceError(RuntimeError):
    """Not enough disk for what a stage is about to write (checked before), or the disk filled while it wrote."""


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Mapping) -> Path:
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes: what DVC 3 records for it (``hash: md5``), so it matches ``dvc`` listings."""
    digest = hashlib.md5()  # an identifier, as DVC uses it; not security
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | Path, digest=None, exclude: str | None = None) -> str:
    """sha256 over a folder's files (relative paths and bytes, in path order), leaving out the file ``exclude``
    (a path relative to ``folder``)."""
    digest = digest or hashlib.sha256()
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if exclude is not None and path.relative_to(folder).as_posix() == exclude:
            continue
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
    return digest.hexdigest()
