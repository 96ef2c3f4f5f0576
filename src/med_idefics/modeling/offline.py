"""Where the weights of a pointed-to base are on this machine (``base.json``: :mod:`med_idefics.modeling.loading`), so
that compute nodes without network load it, and a registered version loads wherever it is served.

- A hub base (``{"source": "hub", "id", "revision"}``, the revision a commit): with network, from the hub (files
  already in the HF cache are not fetched again); offline (``HF_HUB_OFFLINE=1``), from the HF cache's snapshot of
  that commit (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``). When the snapshot is missing or incomplete
  the error names the command to run where there is network (:func:`download_command`).
- A local folder (``{"source": "local", "path", "sha256"}``): ``path`` is absolute, a relative ``model.base`` having
  been anchored at the repository root (:func:`anchor_local_folder`); when the folder has moved with a clone, the
  relative form (``given``) is looked up under the repository again.
- ``$MED_IDEFICS_BASE`` (:data:`OVERRIDE_VAR`), a folder holding the base's weights, stands in for either: a local
  base's copy must have the recorded digest; a hub base's copy is taken as given and the log says so.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from med_idefics.config import ConfigError

logger = logging.getLogger(__name__)
OVERRIDE_VAR = "MED_IDEFICS_BASE"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_command(repo_id: str, revision: str | None) -> str:
    return f"hf download {repo_id} --revision {revision or 'main'}"


def cache_folder() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def missing_weights(folder: Path) -> list[str]:
    """The files a saved model in ``folder`` lacks: its config and every weight shard its index lists (or one
    ``*.safetensors``/``*.bin`` when there is no index)."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return missing + [shard for shard in shards if not (folder / shard).is_file()]
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("model.safetensors")
    return missing


def cached_snapshot(repo_id: str, revision: str | None) -> tuple[Path | None, str]:
    """(the HF cache's snapshot folder of ``repo_id`` at ``revision`` (a commit, a branch or a tag; None: main),
    None and why when it is not there whole)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_folder()))
    except Exception as err:  # LocalEntryNotFoundError, or a cache laid out by another tool: not usable either way
        return None, f"not in the HF cache {cache_folder()} ({type(err).__name__})"
    missing = missing_weights(folder)
    if missing:
        return None, f"incomplete in the HF cache {folder}: {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}"
    return folder, ""


def not_cached_error(repo_id: str, revision: str | None, why: str, what: str) -> ConfigError:
    return ConfigError(
        f"{what}: {repo_id} (revision {revision or 'main'}) is {why}, and HF_HUB_OFFLINE is set (or the hub cannot be "
        f"reached). Where there is network, run `{download_command(repo_id, revision)}` with the same HF_HOME / "
        f"HF_HUB_CACHE as this machine (a shared cache for compute nodes; $HF_TOKEN for a gated model), or set "
        f"${OVERRIDE_VAR} to a folder holding the model"
    )


def anchor_local_folder(given: str) -> Path:
    """A local ``model.base``: an absolute folder as is, a relative one under the repository root (not the cwd)."""
    from med_idefics.tracking.provenance import store_root

    path = Path(given).expanduser()
    return path if path.is_absolute() else (store_root() / path).resolve()


def locate(pointer: dict[str, Any], base_dir: Path) -> tuple[str, dict[str, Any]]:
    """(name or folder for ``from_pretrained``, its extra kwargs) for a pointer read from ``base_dir``."""
    from med_idefics.modeling.loading import hub_token

    override = os.environ.get(OVERRIDE_VAR)
    if override:
        return str(_checked_override(Path(override), pointer)), {}
    if pointer["source"] == "local":
        return str(_local_folder(pointer, base_dir)), {}
    repo_id, revision = pointer["id"], pointer.get("revision")
    if offline():
        snapshot, why = cached_snapshot(repo_id, revision)
        if snapshot is None:
            raise not_cached_error(repo_id, revision, why, f"the base in {base_dir}")
        return str(snapshot), {}
    return repo_id, {"revision": revision, "token": hub_token()}


def _local_folder(pointer: dict[str, Any], base_dir: Path) -> Path:
    from med_idefics.tracking.provenance import find_repo_root

    candidates = [Path(pointer["path"])]
    given = pointer.get("given")
    if given and not Path(given).is_absolute():  # the repository moved: the folder is found under it again
        candidates += [find_repo_root(base_dir) / given, find_repo_root() / given]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    digest = f" (sha256 {pointer['sha256']})" if pointer.get("sha256") else ""
    raise ConfigError(
        f"{base_dir / 'base.json'} points to {pointer['path']}, which holds no model (no config.json) here; copy that "
        f"folder{digest} to this machine and set ${OVERRIDE_VAR} to it, or rerun `med-idefics base` with model.base "
        "naming where it is"
    )


def _checked_override(folder: Path, pointer: dict[str, Any]) -> Path:
    from med_idefics.files import folder_sha256

    what = f"${OVERRIDE_VAR}={folder}"
    missing = missing_weights(folder) if folder.is_dir() else ["the folder itself"]
    if missing:
        raise ConfigError(f"{what} holds no whole saved model (missing {', '.join(missing[:4])}); point it at one")
    recorded = pointer.get("sha256")
    if pointer["source"] == "local" and recorded:
        found = folder_sha256(folder)
        if found != recorded:
            raise ConfigError(
                f"{what} is not the base this model was trained on: its files' sha256 is {found}, the recorded base "
                f"({pointer['path']}) had {recorded}"
            )
        return folder
    stands_for = f"{pointer['id']}@{pointer.get('revision')}" if pointer["source"] == "hub" else pointer["path"]
    logger.warning("%s stands in for the base %s (not verified: a hub base records no digest)", what, stands_for)
    return folder
