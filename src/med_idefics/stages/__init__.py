"""The pipeline's stages, one module per `dvc.yaml` stage: each holds the logic its `med-idefics` command calls."""
