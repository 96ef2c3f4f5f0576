"""The cluster's realities, checked on the login node before any job is submitted (``repro --slurm``, ``seeds
--slurm``, the MLflow backend): the tracking store (SQLite is refused: jobs on several nodes would write one file),
DVC's lock on a network filesystem, and a hub base resolved and fetched here, since compute nodes often have no
network."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from med_idefics.config import ConfigError, Params
from med_idefics.workflow.slurm import SlurmError

DVC = (sys.executable, "-m", "dvc")  # this environment's DVC, on PATH or not
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse.ceph", "glusterfs"}


def check_cluster(params: Params, repo: Path = Path(".")) -> None:
    check_tracking_store(params)
    check_dvc_lock(repo)


def check_tracking_store(params: Params) -> None:
    """Jobs on several nodes must not write one SQLite file (on a shared filesystem its locks do not hold): the
    team's MLflow server, unless ``cluster.slurm.sqlite_single_node`` says every job runs on one node."""
    from med_idefics.tracking.store import resolve_tracking_uri, sqlite_file

    uri = resolve_tracking_uri(params)
    if sqlite_file(uri) is not None and not params.cluster.slurm.sqlite_single_node:
        raise ConfigError(
            f"the MLflow tracking store is a SQLite file ({uri}): jobs on several nodes writing it at once corrupt "
            "it (SQLite's locks do not hold on a shared filesystem). Point the project at the team's MLflow server "
            "(`export MLFLOW_TRACKING_URI=http://<server>:5000` on the login node: the jobs inherit it; README, Team "
            "setup), or, on a single-node cluster, set cluster.slurm.sqlite_single_node: true"
        )


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the filesystem ``path`` is on (``/proc/mounts``: the longest mount point above it)."""
    if mounts is None:
        mounts = Path("/proc/mounts").read_text()
    path = str(path.resolve())
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ")
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def check_dvc_lock(repo: Path = Path("."), mounts: str | None = None) -> None:
    """On a network filesystem DVC's default lock (flock) does not hold across nodes: ``core.hardlink_lock``."""
    kind = filesystem_type(repo, mounts)
    if kind not in NETWORK_FILESYSTEMS:
        return
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        hardlink = dvc.config["core"].get("hardlink_lock", False)
    if not hardlink:
        raise ConfigError(
            f"the repository is on {kind}, shared by the nodes, where DVC's default lock (flock) does not hold: "
            "stages started on two nodes could both write dvc.lock. Run `dvc config core.hardlink_lock true` "
            "(and commit .dvc/config) on the login node, then submit again"
        )


def prepare_hub_base(params: Params, stale: list[str], dry_run: bool, echo: Callable[[str], None]) -> list[str]:
    """A hub base (``model.base: owner/name``) needs the network, which compute nodes often lack: its ``base``
    stage (resolving the revision to a commit) runs here, on the login node, and its files are fetched into the HF
    cache here (the jobs read it offline: it must sit on a filesystem the nodes share, ``$HF_HOME``). Returns the
    stages left for jobs."""
    base = params.model.base
    if "/" not in base or Path(base).is_dir():  # tiny, tiny-real-processor, a local folder: no network needed
        return stale
    from med_idefics.modeling.bases import HUB_ID  # torch and transformers: only for a hub base

    if not HUB_ID.fullmatch(base):
        return stale
    if dry_run:
        echo(f"# {base} is a hub model: the login node runs `base` and fetches its files before submitting")
        return [name for name in stale if name != "base"]
    if "base" in stale:
        echo(f"base: {base} is a hub model; resolving it here, on the login node (compute nodes may have no network)")
        if subprocess.run([*DVC, "--wait-for-lock", "repro", "--single-item", "base"]).returncode != 0:
            raise SlurmError("base failed on the login node (its output is above): the hub id, $HF_TOKEN, network")
    fetch_hub_snapshot(params.model.base_dir, echo)
    return [name for name in stale if name != "base"]


def fetch_hub_snapshot(base_dir: str, echo: Callable[[str], None]) -> None:
    """The files of the base ``base_dir`` points to, in the HF cache (downloaded here when missing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from med_idefics.modeling.loading import hub_token, read_pointer

    pointer = read_pointer(base_dir) or {}
    if pointer.get("source") != "hub":
        return
    wanted = {"repo_id": pointer["id"], "revision": pointer["revision"], "allow_patterns": HUB_FILES}
    try:
        path = snapshot_download(**wanted, local_files_only=True)
    except LocalEntryNotFoundError:
        echo(f"base: fetching {pointer['id']}@{pointer['revision'][:12]} into the HF cache (once, on the login node)")
        path = snapshot_download(**wanted, token=hub_token())
    echo(f"base: {pointer['id']} in the HF cache ({path}); the jobs read it offline")


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # weights, configs, processor, tokenizer
