"""Where the model runs: an 8B base is refused without CUDA — in training, evaluation and serving alike — before
anything is read or loaded, with a message saying what is missing; the tiny bases run on CPU. (One GPU per process
for a run that sees several: tests/test_train.py; per stage under `med-idefics repro --jobs`: tests/test_pipeline.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Idefics2Config

from med_idefics.config import ConfigError, load_params
from med_idefics.modeling.loading import load_base_model, write_pointer

#: Idefics2-8b's shape (Mistral-7B text model, SigLIP so400m vision encoder, 64-latent perceiver), config only.
IDEFICS2_8B = {
    "text_config": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32003},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                      "num_attention_heads": 16, "patch_size": 14, "image_size": 980},
    "perceiver_config": {"hidden_size": 4096, "resampler_n_latents": 64, "resampler_depth": 3, "resampler_n_heads": 16,
                         "resampler_head_dim": 96, "num_key_value_heads": 4},
}  # fmt: skip
MISSING = r"8\.4B parameters.*needs a CUDA GPU.*CPU-only build of torch"


@pytest.fixture
def large_base(tmp_path, monkeypatch) -> Path:
    """``model.base_dir`` pointing at a local folder holding Idefics2-8b's config (no weights: nothing may load)."""
    monkeypatch.setattr(torch.version, "cuda", None)  # as a CPU build of torch reports it
    folder = tmp_path / "idefics2-8b"
    Idefics2Config(**IDEFICS2_8B).save_pretrained(folder)
    base_dir = tmp_path / "base"
    write_pointer(base_dir, {"source": "local", "path": str(folder), "do_image_splitting": False})
    return base_dir


def test_loading_an_8b_base_without_cuda_is_refused_before_any_weight(large_base, repo_params):
    assert not torch.cuda.is_available()
    with pytest.raises(ConfigError, match=MISSING):
        load_base_model(large_base, repo_params.quantization)


def test_training_an_8b_base_without_cuda_stops_before_any_run(project, large_base):
    from mlflow import MlflowClient

    from med_idefics.stages.train import TrainRequest, train

    params = load_params("params.yaml", [f"model.base_dir={large_base}"])
    with pytest.raises(ConfigError, match=MISSING):
        train(params, TrainRequest(stage="single-stage", out_dir=Path("outputs/single-stage")))
    experiments = [e.experiment_id for e in MlflowClient().search_experiments()]
    assert not MlflowClient().search_runs(experiments)


def test_serving_an_8b_base_without_cuda_is_refused(large_base, repo_params, tiny_processor, tmp_path):
    from med_idefics.modeling.serving import ADAPTER, BASE, CONFIG, PROCESSOR, ServingConfig, VqaModel

    tiny_processor.save_pretrained(tmp_path / "processor")
    config = tmp_path / "serving.json"
    config.write_text(json.dumps(ServingConfig.from_params(repo_params).__dict__))
    artifacts = {BASE: str(large_base), ADAPTER: str(tmp_path / "adapter"), PROCESSOR: str(tmp_path / "processor"),
                 CONFIG: str(config)}  # fmt: skip
    with pytest.raises(ConfigError, match=MISSING):
        VqaModel().load_context(SimpleNamespace(artifacts=artifacts))


def test_a_tiny_base_runs_on_the_cpu(tiny_base_dir, repo_params):
    assert load_base_model(tiny_base_dir, repo_params.quantization).device.type == "cpu"
