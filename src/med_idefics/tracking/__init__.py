"""MLflow: the store, runs, provenance, the model registry's client and the `mlflow run` experiment provider."""
