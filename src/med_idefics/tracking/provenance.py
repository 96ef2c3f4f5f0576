"""Where a run came from: the repository root, the git commit, the data version, the DVC context, the process — and
the rule for what never leaves the machine (secrets). Used by :mod:`med_idefics.tracking.runs` for MLflow tags."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from med_idefics.config import PARAMS_FILE

DATA_DVC_FILE = "data.dvc"
DVC_LOCK_FILE = "dvc.lock"
NONE = "none"  # tag value for "not available", so that `tags.x = 'none'` is searchable in MLflow

# Environment DVC gives a stage command (dvc 3.x: dvc/stage/run.py, dvc/repo/experiments/queue/base.py).
# DVC_STAGE and DVC_ROOT are set for every stage command; the other two only under `dvc exp run`.
DVC_ENV_TAGS = {
    "DVC_STAGE": "dvc_stage",
    "DVC_EXP_NAME": "dvc_exp_name",
    "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev",
}

# A key is secret when a word in it is token/secret/password/credentials or an api/access/private key.
# "max_new_tokens" and "tokenizer" are not: the word has to end there.
_SECRET_KEY = re.compile(r"(token|secret|passw(or)?d|credentials?)(?![a-z])|(api|access|private)[^a-z0-9]?key(?![a-z])")
# Values that look like credentials whatever their key: Hugging Face tokens, URLs with a password in them.
_SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{10,}|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)")
# Environment variables holding a secret: the name ends in one of these words (HF_TOKEN, WANDB_API_KEY; not
# HF_TOKEN_PATH). Shorter values than _MIN_SECRET_LEN are ignored: they would match innocent text everywhere.
_SECRET_ENV_NAME = re.compile(r"(token|secret|passw(or)?d|credentials?|key)$")
_MIN_SECRET_LEN = 8
REDACTED = "[redacted]"


def find_repo_root(start: str | Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: the cwd) holding params.yaml or .dvc; else ``start``."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / PARAMS_FILE).is_file() or (folder / ".dvc").is_dir():
            return folder
    return start


def store_root() -> Path:
    """Where the default tracking store lives: ``$DVC_ROOT`` when DVC runs the stage (under ``dvc exp run --temp`` or
    ``--queue`` the cwd is a throwaway copy and DVC_ROOT names the real repository), else :func:`find_repo_root`."""
    return Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else find_repo_root()


def experiment_copy() -> Path | None:
    """The real repository when this process runs in a DVC experiment's temporary copy (``dvc exp run --queue`` or
    ``--temp``: the cwd is under ``.dvc/tmp/exps``, ``$DVC_ROOT`` names the repository); None otherwise."""
    dvc_root = os.environ.get("DVC_ROOT")
    if not dvc_root:
        return None
    real = Path(dvc_root).resolve()
    return None if find_repo_root() == real else real


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(root: Path) -> str:
    return _git(root, "rev-parse", "HEAD") or NONE


def git_dirty(root: Path) -> str:
    """ "true" when tracked files differ from HEAD, "false", or "none" outside git. Untracked files do not count, nor
    what the pipeline itself writes — ``dvc.lock``, the outputs it lists, ``.gitignore`` entries DVC adds — so that a
    ``dvc repro`` of a committed tree is still a committed state when its later stages run."""
    changed = _git(root, "diff", "--name-only", "HEAD", "--")  # staged or not; None outside git or before a commit
    if changed is None:
        return NONE
    outputs = pipeline_outputs(root) | _committed_pipeline_outputs(root)
    return str(any(not _written_by_pipeline(path, outputs) for path in changed.splitlines() if path)).lower()


def pipeline_outputs(root: Path, attempts: int = 50) -> set[str]:
    """The output paths ``<root>/dvc.lock`` records (files or folders, relative to the root).

    DVC rewrites dvc.lock in place when a stage ends: under ``repro --jobs`` another stage may read it half-written
    (a YAML error, or a truncated mapping). Such a read is retried for up to ~5 s, so that a torn read never makes
    every changed output look like an uncommitted source change."""
    path = root / DVC_LOCK_FILE
    for attempt in range(attempts):
        try:
            text = path.read_text()
        except OSError:
            return set()
        try:
            lock = yaml.safe_load(text)
        except yaml.YAMLError:
            lock = None
        stages = lock.get("stages") if isinstance(lock, dict) else None
        if (isinstance(stages, dict) and text.endswith("\n")) or not text.strip() or attempt == attempts - 1:
            break
        time.sleep(0.1)
    return _lock_outputs(stages)


def _lock_outputs(stages: Any) -> set[str]:
    return {
        str(out["path"]).rstrip("/")
        for stage in (stages or {}).values()
        if isinstance(stage, dict)
        for out in stage.get("outs") or []
        if isinstance(out, dict) and out.get("path")
    }


def _committed_pipeline_outputs(root: Path) -> set[str]:
    """The outputs the committed dvc.lock records: a second source that a torn read of the working one cannot hide."""
    text = _git(root, "show", f"HEAD:{DVC_LOCK_FILE}")
    try:
        lock = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return set()
    return _lock_outputs(lock.get("stages") if isinstance(lock, dict) else None)


def _written_by_pipeline(path: str, outputs: set[str]) -> bool:
    if path == DVC_LOCK_FILE or Path(path).name == ".gitignore":
        return True
    return any(path == out or path.startswith(f"{out}/") for out in outputs)


SOURCE_TAGS = ("git_commit", "git_dirty", "dvc_exp_name")


def source_state(root: Path | None = None) -> dict[str, str]:
    """``git_commit``, ``git_dirty`` and ``dvc_exp_name`` (``none`` outside ``dvc exp run``): what a run or a
    registered version was made from."""
    root = root or find_repo_root()
    return {"git_commit": git_commit(root), "git_dirty": git_dirty(root),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME") or NONE}  # fmt: skip


def uncommitted(state: dict[str, str]) -> str | None:
    """Why ``state`` (:func:`source_state`'s tags; missing ones unknown) is not a committed state, or None when it
    is: made in a DVC experiment (queued or run, not yet applied and committed), from a dirty tree, or outside git."""
    commit, dirty, experiment = (state.get(k, NONE) for k in SOURCE_TAGS)
    if experiment != NONE:
        return f"made in DVC experiment {experiment!r}"
    if commit == NONE or dirty == NONE:
        return "made outside git (no commit to reproduce it from)"
    if dirty != "false":
        return f"made from uncommitted changes to commit {commit[:8]}"
    return None


def data_md5(root: Path) -> str:
    """The md5 DVC recorded for ``data/`` in ``<root>/data.dvc``: the version of every dataset the run could read."""
    dvc_file = root / DATA_DVC_FILE
    if not dvc_file.is_file():
        return NONE
    try:
        return str(yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return "unreadable"


def provenance_tags(profile: str, dvc_stage: str | None = None, root: Path | None = None) -> dict[str, str]:
    """Tags that let a run be reproduced or explained: code, data, pipeline stage, profile and process."""
    root = root or find_repo_root()
    tags = {
        "git_commit": git_commit(root),
        "git_dirty": git_dirty(root),
        "data_md5": data_md5(root),
        "profile": profile,
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
    }
    tags |= {tag: os.environ[var] for var, tag in DVC_ENV_TAGS.items() if os.environ.get(var)}
    tags["dvc_stage"] = dvc_stage or tags.get("dvc_stage", NONE)
    return tags


# --------------------------------------------------------------------------------------------------------------------
# Secrets: the HF token comes from the environment only and is never logged


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(str(key).lower()))


def _environ_snapshot() -> dict[str, str]:
    """A copy of the environment; mlflow's telemetry thread may delete a variable while we iterate, so retry."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue
    raise RuntimeError("the environment kept changing while it was read")


def _secret_env_values() -> list[str]:
    environ = _environ_snapshot()
    values = {v for k, v in environ.items() if _SECRET_ENV_NAME.search(k.lower()) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first, so a secret containing another is redacted whole


def looks_secret(value: Any, env_secrets: list[str] | None = None) -> bool:
    text = str(value)
    env_secrets = _secret_env_values() if env_secrets is None else env_secrets
    return bool(_SECRET_VALUE.search(text)) or any(secret in text for secret in env_secrets)


def scrub_secrets(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``mapping`` without the entries whose key or value looks like a secret (nested mappings scrubbed
    recursively). Entries are dropped, not masked: a masked value would still say a secret was there."""
    return _scrub(mapping, _secret_env_values())


def _scrub(mapping: Mapping[str, Any], env_secrets: list[str]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in mapping.items():
        if is_secret_key(key):
            continue
        if isinstance(value, Mapping):
            clean[key] = _scrub(value, env_secrets)
        elif not looks_secret(value, env_secrets):
            clean[key] = value
    return clean


def redact(text: str) -> str:
    """``text`` with anything secret-looking replaced by ``[redacted]`` — for free text such as error messages."""
    for secret in _secret_env_values():
        text = text.replace(secret, REDACTED)
    return _SECRET_VALUE.sub(REDACTED, text)
