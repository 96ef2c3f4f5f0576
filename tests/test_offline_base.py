"""Bases on compute nodes without network (issue 24): a hub id resolves and loads from an HF cache laid out as
huggingface_hub lays it out, offline; a missing revision names the download command; a relative local folder is the
repository's; a registered version finds its base in the cache or in ``$MED_IDEFICS_BASE``, checked, or says why not."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from med_idefics.config import ConfigError, QuantizationConfig, load_params
from med_idefics.modeling.bases import build_base
from med_idefics.modeling.loading import POINTER_FILE, load_base_model, load_processor, read_pointer
from med_idefics.modeling.offline import OVERRIDE_VAR

REPO_ROOT = Path(__file__).resolve().parents[1]
FP32 = QuantizationConfig(load_in_4bit=False, quant_type="nf4", double_quant=True, compute_dtype="float32")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "med-org/tiny-idefics2"


@pytest.fixture
def hf_cache(tmp_path, tiny_base_dir, monkeypatch):
    """An HF hub cache holding ``HUB_ID`` at ``COMMIT`` (refs/main → the commit), and offline mode."""
    cache = tmp_path / "hf-cache"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(tiny_base_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(OVERRIDE_VAR, raising=False)
    return repo / "snapshots" / COMMIT


def params_for(tmp_path, **overrides):
    values = {"model.base_dir": str(tmp_path / "base")} | overrides
    return load_params(REPO_ROOT / "params.yaml", values)


def weights_equal(model, folder: Path) -> bool:
    """Every base weight of ``model`` (LoRA layers aside) equals the saved model's in ``folder``."""
    reference = load_base_model(folder, FP32).state_dict()
    weights = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    return weights.keys() == reference.keys() and all(torch.equal(v, reference[k]) for k, v in weights.items())


@pytest.mark.parametrize("revision", [None, "main", COMMIT])
def test_a_hub_id_resolves_and_loads_from_the_cache_offline(tmp_path, hf_cache, revision):
    pointer = build_base(params_for(tmp_path, **{"model.base": HUB_ID, "model.revision": revision}))
    assert pointer["revision"] == COMMIT  # a branch resolved to its commit through refs/, as the hub would
    model = load_base_model(tmp_path / "base", FP32)
    assert weights_equal(model, hf_cache)
    assert load_processor(tmp_path / "base").tokenizer.get_vocab() == load_processor(hf_cache).tokenizer.get_vocab()


def test_a_revision_not_in_the_cache_names_the_download_command(tmp_path, hf_cache):
    with pytest.raises(ConfigError, match=rf"hf download {HUB_ID} --revision v2\b"):
        build_base(params_for(tmp_path, **{"model.base": HUB_ID, "model.revision": "v2"}))
    assert not (tmp_path / "base").exists()  # nothing half-written


def test_a_snapshot_missing_its_weights_is_not_taken(tmp_path, hf_cache):
    build_base(params_for(tmp_path, **{"model.base": HUB_ID}))
    (hf_cache / "model.safetensors").unlink()  # the cache lost the weights after the base stage ran
    with pytest.raises(ConfigError, match=r"incomplete in the HF cache .*model\.safetensors.*hf download"):
        load_base_model(tmp_path / "base", FP32)


def test_a_relative_local_folder_is_the_repositorys_not_the_cwds(tmp_path, tiny_base_dir, monkeypatch):
    repo = tmp_path / "checkout"
    shutil.copytree(tiny_base_dir, repo / "models" / "base")
    (repo / "params.yaml").write_text("profile: demo\n")  # what marks the repository root
    (repo / "src").mkdir()
    monkeypatch.chdir(repo / "src")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    pointer = build_base(params_for(tmp_path, **{"model.base": "models/base"}))
    assert pointer["path"] == str(repo / "models" / "base") and pointer["given"] == "models/base"
    from med_idefics.files import folder_sha256

    assert pointer["sha256"] == folder_sha256(repo / "models" / "base")
    moved = tmp_path / "moved"  # the clone moves (another node's scratch path): found under the repository again
    shutil.move(repo, moved)
    monkeypatch.chdir(moved)
    shutil.copytree(tmp_path / "base", moved / "outputs" / "base")
    assert weights_equal(load_base_model(moved / "outputs" / "base", FP32), tiny_base_dir)


def registered(tmp_path, pointer_dir: Path, repo_params) -> dict:
    """The artifacts of a model version packaged from ``pointer_dir`` with a tiny (untrained) adapter."""
    from med_idefics.modeling.lora import add_lora
    from med_idefics.modeling.serving import ServingConfig, package

    adapter = tmp_path / "adapter"
    add_lora(load_base_model(pointer_dir, FP32), repo_params.lora).save_pretrained(adapter)
    config = ServingConfig("", 2, 2, {"load_in_4bit": False, "quant_type": "nf4", "double_quant": True,
                                      "compute_dtype": "float32"})  # fmt: skip
    return package(pointer_dir, adapter, config, tmp_path / "staging").artifacts


def test_a_registered_version_of_a_local_base_loads_from_a_checked_override(tmp_path, tiny_base_dir, repo_params,
                                                                            monkeypatch):  # fmt: skip
    from med_idefics.modeling.serving import VqaModel

    monkeypatch.delenv(OVERRIDE_VAR, raising=False)
    original = tmp_path / "weights"
    shutil.copytree(tiny_base_dir, original)
    build_base(params_for(tmp_path, **{"model.base": str(original)}))
    artifacts = registered(tmp_path, tmp_path / "base", repo_params)
    assert read_pointer(artifacts["base"])["sha256"] == read_pointer(tmp_path / "base")["sha256"]
    copy = tmp_path / "elsewhere"
    shutil.move(original, copy)  # served on a machine where the weights sit at another path
    with pytest.raises(ConfigError, match=rf"holds no model .*sha256 .*\${OVERRIDE_VAR}"):
        VqaModel().load_context(SimpleNamespace(artifacts=artifacts))
    monkeypatch.setenv(OVERRIDE_VAR, str(copy))
    served = VqaModel()
    served.load_context(SimpleNamespace(artifacts=artifacts))
    assert weights_equal(served.model.get_base_model(), copy)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "note": "edited"}', 1))
    with pytest.raises(ConfigError, match="not the base this model was trained on"):
        VqaModel().load_context(SimpleNamespace(artifacts=artifacts))


def test_a_registered_version_of_a_hub_base_loads_offline_from_the_cache(tmp_path, hf_cache, repo_params,
                                                                         monkeypatch):  # fmt: skip
    from med_idefics.modeling.serving import VqaModel

    build_base(params_for(tmp_path, **{"model.base": HUB_ID}))
    artifacts = registered(tmp_path, tmp_path / "base", repo_params)
    assert sorted(p.name for p in Path(artifacts["base"]).iterdir()) == [POINTER_FILE]  # the id and commit only
    served = VqaModel()
    served.load_context(SimpleNamespace(artifacts=artifacts))
    assert weights_equal(served.model.get_base_model(), hf_cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # another machine, whose cache lacks it
    with pytest.raises(ConfigError, match=rf"not in the HF cache .*hf download {HUB_ID} --revision {COMMIT}"):
        VqaModel().load_context(SimpleNamespace(artifacts=artifacts))
