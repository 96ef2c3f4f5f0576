"""The model registry's client: the writes and reads the ``register`` and ``promote`` stages share."""

from __future__ import annotations

import math
import time
from typing import Any

from med_idefics.tracking.provenance import redact

_TAG_LIMIT = 5000  # MLflow allows 8000 characters per model version tag value


def set_version_tag(client, name: str, version: str, key: str, value: Any) -> None:
    retry_write(client.set_model_version_tag, name, version, key, redact(str(value))[:_TAG_LIMIT])


def retry_write(write, *args, attempts: int = 5) -> None:
    """A registry write, retried: MLflow's SQL store upserts tags and aliases by select-then-insert, so a concurrent
    writer of the same key can make the insert fail once; the retry finds the row and updates it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return write(*args)
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def versions(client, name: str) -> list:
    return list(client.search_model_versions(f"name = '{name}'"))


def number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None
