"""Shared fixtures. Tests are offline and CPU-only; anything slow is marked `slow` and kept out of `make test`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"

# Never reach a hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tiny model's matrices are far too small to gain from threads; on 2 shared cores they only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def evaluation_model(params, adapter_dir: str | Path | None):
    """(processor, model) as `med-idefics evaluate` loads them: the base once (AdapterSwitch), the adapter switched
    on (None: the bare base)."""
    from med_idefics.modeling.generation import AdapterSwitch
    from med_idefics.modeling.loading import load_processor

    switch = AdapterSwitch(params.model.base_dir, params.quantization, params.model.attn_implementation)
    return load_processor(params.model.base_dir), switch.use(adapter_dir)


@pytest.fixture(scope="session")
def _migrated_store_template(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow sqlite store, made once: migrating a fresh store costs seconds."""
    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    import mlflow

    mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    return template


@pytest.fixture(autouse=True)
def isolated_tracking_store(request, tmp_path_factory, monkeypatch):
    """Every test tracks into its own sqlite store (a copy of the migrated template), never the repo's mlflow.db —
    but the `demo` checks, which read the store `make demo` logged to, as configured ($MLFLOW_TRACKING_URI too)."""
    import shutil

    if request.node.get_closest_marker("demo"):
        return None
    store = tmp_path_factory.mktemp("mlflow")
    shutil.copy(request.getfixturevalue("_migrated_store_template"), store / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")  # mlflow caches the URI of the previous test otherwise
    return store


# --------------------------------------------------------------------------------------------------------------------
# A tiny Idefics2 and a few schema records, for the model, collator and training tests. Built once per session;
# `tiny_model` is a fresh (unpretrained) copy per test, so a test may wrap or train it.

VQA_QA = [
    ("Is there a lesion?", "yes"),
    ("Is the lesion on the left?", "no"),
    ("Which organ is shown?", "chest"),
    ("Where is the lesion?", "left lung, upper lobe."),
    ("How many lesions are there?", "two"),
    ("Describe this radiology image.", "x-ray of the chest with one lesion on the right side."),
]


def _make_records(qa: list[tuple[str, str]], split: str = "train", seed: int = 0, size: int = 64) -> list[dict]:
    """Schema records with random-noise RGB PNGs (``size`` px square), one per question."""
    import numpy as np
    from PIL import Image

    from med_idefics.data.images import to_png_bytes
    from med_idefics.data.schema import infer_answer_type

    rng = np.random.default_rng(seed)
    records = []
    for i, (question, answer) in enumerate(qa):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        records.append(
            {
                "id": f"{split}-{i}",
                "image": to_png_bytes(Image.fromarray(pixels)),
                "question": question,
                "answer": answer,
                "answer_type": infer_answer_type(answer),
                "dataset": "synthetic",
                "split": split,
            }
        )
    return records


@pytest.fixture(scope="session")
def repo_params():
    from med_idefics.config import load_params

    return load_params(REPO_ROOT / "params.yaml")


@pytest.fixture(scope="session")
def make_vqa_records():
    """``make(qa_pairs, split="train", seed=0, size=64)`` → schema records with random-noise images."""
    return _make_records


@pytest.fixture(scope="session")
def vqa_records() -> list[dict]:
    return _make_records(VQA_QA)


@pytest.fixture(scope="session")
def tiny_processor(repo_params, vqa_records):
    """An Idefics2Processor whose word-level tokenizer knows the words of ``vqa_records``."""
    from med_idefics.modeling.tiny import build_processor, build_tokenizer

    texts = [text for r in vqa_records for text in (r["question"], r["answer"])]
    tokenizer = build_tokenizer(texts, repo_params.model.tiny.vocab_size)
    return build_processor(tokenizer, repo_params.model.tiny, repo_params.model.do_image_splitting)


@pytest.fixture
def tiny_model(repo_params, tiny_processor):
    """A fresh, randomly initialised tiny Idefics2 (seed 0) matching ``tiny_processor``."""
    from med_idefics.modeling.tiny import build_model

    return build_model(tiny_processor, repo_params.model.tiny, seed=0)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, repo_params, tiny_processor) -> Path:
    """A base_dir as `med-idefics base` leaves it for model.base=tiny (model + processor; not pretrained)."""
    from med_idefics.modeling.tiny import build_model

    base_dir = tmp_path_factory.mktemp("base")
    build_model(tiny_processor, repo_params.model.tiny, seed=0).save_pretrained(base_dir)
    tiny_processor.save_pretrained(base_dir)
    return base_dir


# --------------------------------------------------------------------------------------------------------------------
# A tmp project for the stage tests: params.yaml with tiny recipes, synthetic data in the record schema, the tiny base.

CAPTIONS = [("Describe this radiology image.", "x-ray of the chest with one lesion on the right side.")] * 2
QA = [("Is there a lesion?", "yes"), ("Is the lesion on the left?", "no"), ("Which organ is shown?", "chest")]


@pytest.fixture
def project(tmp_path, repo_root, tiny_base_dir, make_vqa_records, monkeypatch):
    """A tmp project: params.yaml (tiny recipes), synthetic data in the record schema, and the tiny base."""
    import yaml

    from med_idefics.data.schema import write_splits

    data = tmp_path / "data"
    write_splits(
        data,
        "syn-captions",
        {
            "train": make_vqa_records(CAPTIONS * 8, split="train", seed=1),
            "val": make_vqa_records(CAPTIONS, split="val", seed=2),
        },
    )
    write_splits(
        data,
        "syn-vqa",
        {
            "train": make_vqa_records(QA * 8, split="train", seed=3),
            "test": make_vqa_records(QA, split="test", seed=4),
        },
    )
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"]["base_dir"] = str(tiny_base_dir)
    params["data"]["root"] = str(data)
    params["data"]["captions"] |= {"dataset": "syn-captions", "train_split": "train", "eval_split": "val"}
    params["data"]["vqa"] |= {"dataset": "syn-vqa", "train_split": "train", "eval_split": "test"}
    for stage in ("stage1", "stage2", "single_stage"):
        params[stage] |= {
            "epochs": 2.0,
            "micro_batch": 4,
            "eval_batch": 4,
            "save_steps": 4,
            "eval_steps": 4,
            "logging_steps": 1,
            "warmup_steps": 0,
            "lr": 5e-3,
        }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------------------------------------------
# A real single-node Slurm cluster (tests/slurm_cluster.py), one per test session: the tests that use it skip, saying
# why, where Slurm is not installed or the tests do not run as root.


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    from slurm_cluster import SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    """The session's cluster, its jobs cancelled after the test, ``$SLURM_CONF`` set for this test's processes."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    yield slurm_cluster
    slurm_cluster.cancel_all()
