"""``mlflow run`` and the project's experiment: the runs of the MLproject's entry points belong to
``mlflow.experiment`` (``med-idefics``) like every other run of the project, without ``--experiment-name``.

``mlflow run`` opens its project run before the entry point starts, in ``--experiment-name`` /
``$MLFLOW_EXPERIMENT_NAME`` if given, else in what MLflow's default-experiment providers say (else Default), and hands
it to the entry point in ``$MLFLOW_RUN_ID``; the entry point's first ``mlflow.start_run`` adopts it.
:class:`ProjectExperimentProvider` (registered under the ``mlflow.default_experiment_provider`` entry point) makes that
default the experiment named in the cwd's checkout's params.yaml, so ``mlflow run . -e stage1`` opens its run there.
Where a project run is in another experiment all the same (``mlflow run /path/…`` from outside the checkout), a run
cannot change experiment: :func:`med_idefics.tracking.runs.tracked_run` does not adopt it but logs the stage's own run
in the project's experiment (with the project's source tags), and tags the project run ``moved_to`` pointing there.

Imported by MLflow itself when it loads its plugins: keep the imports at the top light.
"""

from __future__ import annotations

from mlflow.tracking.default_experiment.abstract_context import DefaultExperimentProvider


def checkout_experiment() -> str | None:
    """``mlflow.experiment`` of the params.yaml of the checkout the cwd is in; None outside one."""
    import yaml

    from med_idefics.config import PARAMS_FILE
    from med_idefics.tracking.provenance import find_repo_root

    path = find_repo_root() / PARAMS_FILE
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    section = data.get("mlflow") if isinstance(data, dict) else None
    name = section.get("experiment") if isinstance(section, dict) else None
    return name if isinstance(name, str) and name else None


class ProjectExperimentProvider(DefaultExperimentProvider):
    """MLflow's default experiment inside a med-idefics checkout: its ``mlflow.experiment`` (created if missing)."""

    def in_context(self) -> bool:
        return checkout_experiment() is not None

    def get_experiment_id(self) -> str:
        import mlflow

        from med_idefics.tracking.store import ensure_experiment

        return ensure_experiment(checkout_experiment(), mlflow.get_tracking_uri())
