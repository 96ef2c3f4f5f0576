"""``mlflow run`` and the project's experiment: the runs of the MLproject's entry points belong to
``mlflow.experiment`` (``med-idefics``) like every other run of the project, without ``--experiment-name``.

``mlflow run`` opens its project run before the entry point starts, in ``--experiment-name`` /
``$MLFLOW_EXPERIMENT_NAME`` if given, else in what MLflow's default-experiment providers say (else Default), and hands
it to the entry point in ``$MLFLOW_RUN_ID``; the entry point's first ``mlflow.start_run`` adopts it.
:class:`ProjectExperimentProvider` (registered under the ``mlflow.default_experiment_provider`` entry point) makes that
default the experiment named in the cwd's checkout's params.yaml, so ``mlflow run . -e stage1`` opens its run there.
Where a project run is in another experiment all the same (``mlflow run /path/…`` from outside the checkout), a run
cannot change experiment: :func:`project_run_elsewhere` keeps the stage from adopting it, the stage logs its own run in
the project's experiment (with the project's source tags), and the project run is tagged ``moved_to`` pointing there.

Imported by MLflow itself when it loads its plugins: keep the imports at the top light.
"""

from __future__ import annotations

import os

from mlflow.tracking.default_experiment.abstract_context import DefaultExperimentProvider

# What `mlflow run` tags its project run with (source, entry point, git): copied onto a stage run taking its place.
PROJECT_TAGS = ("mlflow.source.", "mlflow.project.", "mlflow.gitRepoURL", "mlflow.user")
RUN_ID_VAR = "MLFLOW_RUN_ID"


def checkout_experiment() -> str | None:
    """``mlflow.experiment`` of the params.yaml of the checkout the cwd is in; None outside one."""
    import yaml

    from med_idefics.config import PARAMS_FILE
    from med_idefics.provenance import find_repo_root

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

        from med_idefics.tracking import ensure_experiment

        return ensure_experiment(checkout_experiment(), mlflow.get_tracking_uri())


def project_run_elsewhere(client, experiment_id: str):
    """The project run ``$MLFLOW_RUN_ID`` when it is not in ``experiment_id`` (then taken out of the environment, so
    that ``mlflow.start_run`` opens a run of the stage's own); None when there is none or it is to be adopted."""
    from mlflow.exceptions import MlflowException

    run_id = os.environ.get(RUN_ID_VAR)
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:  # in another store: `mlflow run` ends it; the stage logs where its params say
        del os.environ[RUN_ID_VAR]
        return None
    if run.info.experiment_id == experiment_id:
        return None
    del os.environ[RUN_ID_VAR]
    return run


def project_source_tags(project_run) -> dict[str, str]:
    tags = {k: v for k, v in project_run.data.tags.items() if k.startswith(PROJECT_TAGS)}
    return tags | {"mlflow_project_run_id": project_run.info.run_id}


def point_to(client, project_run, moved_to: str) -> None:
    """Tag the project run with where its stage logged (``<experiment>/<run id>``); `mlflow run` ends it."""
    client.set_tag(project_run.info.run_id, "moved_to", moved_to)
    note = f"This `mlflow run` logged in experiment {moved_to}; pass --experiment-name to open it there directly."
    client.set_tag(project_run.info.run_id, "mlflow.note.content", note)
