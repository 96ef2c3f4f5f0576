"""Running the pipeline: `repro` (stages at once), on Slurm (`repro --slurm`, `seeds --slurm`, the MLflow backend),
the cost estimate, profile switching."""
