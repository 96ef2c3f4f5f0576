"""The packaged model: a LoRA adapter, its processor, its prompt config and a reference to its base, as an MLflow
``pyfunc`` that answers questions about images — in Python (``mlflow.pyfunc.load_model``) and over REST
(``mlflow models serve``).

``mlflow.transformers`` cannot round-trip a PEFT Idefics2, hence a custom :class:`VqaModel`. Its artifacts
(:func:`package`): ``adapter`` (PEFT folder), ``processor`` (``save_pretrained``), ``config`` (``serving.json``: prompt
prefix, ``max_new_tokens``, batch size, quantization) and ``base``: the saved tiny base itself, or — for a base that
``model.base_dir`` only points to (a hub id + revision, or a local folder) — just that ``base.json`` pointer: a 16 GB
checkpoint is never copied into a model version. A gated hub base reads its token from ``$HF_TOKEN`` when loaded.

Input: a DataFrame with ``image`` (base64 text, a ``data:`` URL, a file path, or raw bytes; PNG, JPEG, DICOM, …) and
``question``; params ``max_new_tokens``. Output: a DataFrame with ``answer``, one row per input row. DICOM is read by
:func:`med_idefics.data.images.read_dicom` (the file's window, else min–max; no tag is kept). Bad input raises
:class:`InvalidInput`, an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring server answers 400. A file
path is read on the machine that runs the model: serve on trusted networks only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import numbers
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from med_idefics.config import Params, QuantizationConfig
from med_idefics.data.images import ImageRejected, normalize_image
from med_idefics.files import folder_sha256
from med_idefics.modeling.loading import POINTER_FILE, load_processor, read_pointer
from med_idefics.reporting.results import RUN_INFO_FILE

IMAGE, QUESTION, ANSWER, MAX_NEW_TOKENS = "image", "question", "answer", "max_new_tokens"
ADAPTER, PROCESSOR, BASE, CONFIG = "adapter", "processor", "base", "config"
CONFIG_FILE = "serving.json"
MAX_NEW_TOKENS_LIMIT = 1024  # a request may not ask for more: one answer would hold the model for minutes
# What the packaged model imports (bitsandbytes: 4-bit bases), pinned to the registering environment; none inferred.
REQUIREMENTS = ("torch", "transformers", "peft", "accelerate", "safetensors", "mlflow", "pandas", "numpy", "pillow",
                "pydicom", "pyyaml", "tqdm", "bitsandbytes")  # fmt: skip


class InvalidInput(MlflowException, ValueError):
    """A request the model cannot answer; the message names the row and field and says what is accepted."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class ServingConfig:
    prompt_prefix: str
    max_new_tokens: int
    batch_size: int
    quantization: dict[str, Any]

    @classmethod
    def from_params(cls, params: Params) -> ServingConfig:
        return cls(params.data.prompt_prefix, params.eval.max_new_tokens, params.eval.batch_size,
                   asdict(params.quantization))  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Packaging


@dataclass(frozen=True)
class Package:
    """What ``mlflow.pyfunc.log_model`` needs besides the model object."""

    artifacts: dict[str, str]
    signature: ModelSignature  # and no input example: MLflow would load and run the model (16 GB) to check it
    pip_requirements: list[str]
    base_reference: str  # "hub:<id>@<revision>", "local:<path> sha256:<digest>" or "copied:<base_dir>"


def base_reference(base_dir: str | Path) -> str:
    pointer = read_pointer(base_dir)
    if pointer is None:
        return f"copied:{base_dir}"
    if pointer["source"] == "hub":
        return f"hub:{pointer['id']}@{pointer.get('revision') or 'default'}"
    digest = f" sha256:{pointer['sha256']}" if pointer.get("sha256") else ""
    return f"local:{pointer['path']}{digest}"


def package_sha256(base_dir: str | Path, adapter_dir: str | Path, config: ServingConfig) -> str:
    """Identifies what :func:`package` would store: the adapter, the serving config and the base (a saved base's
    files, else the pointer), so an unchanged variant is recognised without packaging it again."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    folder_sha256(adapter_dir, digest)
    pointer = read_pointer(base_dir)
    if pointer is None:  # the base's run_info.json names the run that built it, not what it is
        return folder_sha256(base_dir, digest, exclude=RUN_INFO_FILE)
    digest.update(json.dumps(pointer, sort_keys=True).encode())
    return digest.hexdigest()


def package(base_dir: str | Path, adapter_dir: str | Path, config: ServingConfig, staging: Path) -> Package:
    """Stage the artifacts of a model version in ``staging`` (processor, config, base pointer); the adapter and a
    saved base are referenced where they are (``log_model`` copies them)."""
    base_dir, staging = Path(base_dir), Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    load_processor(base_dir).save_pretrained(staging / PROCESSOR)
    (staging / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    base = base_dir
    if read_pointer(base_dir) is not None:
        base = staging / BASE
        base.mkdir(exist_ok=True)
        shutil.copy2(base_dir / POINTER_FILE, base / POINTER_FILE)
    artifacts = {ADAPTER: str(adapter_dir), PROCESSOR: str(staging / PROCESSOR), BASE: str(base),
                 CONFIG: str(staging / CONFIG_FILE)}  # fmt: skip
    return Package(artifacts, signature(config), requirements(), base_reference(base_dir))


def signature(config: ServingConfig) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE), ColSpec("string", QUESTION)]),
        outputs=Schema([ColSpec("string", ANSWER)]),
        params=ParamSchema([ParamSpec(MAX_NEW_TOKENS, "long", config.max_new_tokens)]),
    )


def requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pinned


# --------------------------------------------------------------------------------------------------------------------
# Requests


def decode_image(value: Any, row: int) -> Image.Image:
    """One ``image`` cell → an RGB image; raises :class:`InvalidInput` naming the row."""
    if isinstance(value, bytes | bytearray | memoryview):
        return _open(bytes(value), row, "the image bytes")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise InvalidInput(f"row {row}: {IMAGE} is missing; send a base64-encoded PNG/JPEG/DICOM or a file path")
    if not isinstance(value, str):
        raise InvalidInput(f"row {row}: {IMAGE} must be base64 text, a file path or bytes, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InvalidInput(f"row {row}: {IMAGE} is empty; send a base64-encoded PNG/JPEG/DICOM or a file path")
    if _is_file(text):
        return _open(Path(text), row, f"file {text}")
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInput(
            f"row {row}: {IMAGE} is neither an existing file nor valid base64 ({err}); send the image file's bytes "
            "base64-encoded"
        ) from err
    return _open(data, row, "the decoded base64")


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _open(source: bytes | Path, row: int, what: str) -> Image.Image:
    try:
        return normalize_image(source)
    except ImageRejected as err:
        # For a file, only the category: the detail may quote the first bytes of a file that is not an image.
        detail = err.reason if isinstance(source, Path) else str(err)
        raise InvalidInput(f"row {row}: {what} is not a readable image ({detail}); send PNG, JPEG or DICOM") from err


def check_question(value: Any, row: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"row {row}: {QUESTION} is missing or empty; send the question as text")
    return value


def max_new_tokens(params: dict[str, Any] | None, default: int) -> int:
    value = (params or {}).get(MAX_NEW_TOKENS, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_NEW_TOKENS_LIMIT:
        limit = MAX_NEW_TOKENS_LIMIT
        raise InvalidInput(f"params.{MAX_NEW_TOKENS} must be an integer from 1 to {limit}, got {value!r}")
    return int(value)


def decode_request(model_input: Any) -> list[dict[str, Any]]:
    """``model_input`` (a DataFrame, or what ``pd.DataFrame`` accepts) → records ``{image: PIL image, question}``;
    every row is checked before anything is generated."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [column for column in (IMAGE, QUESTION) if column not in frame.columns]
    if missing:
        raise InvalidInput(f"the input lacks column(s) {missing}; send a table with columns {IMAGE!r} and {QUESTION!r}")
    return [
        {IMAGE: decode_image(image, row), QUESTION: check_question(question, row)}
        for row, (image, question) in enumerate(zip(frame[IMAGE], frame[QUESTION], strict=True))
    ]


# --------------------------------------------------------------------------------------------------------------------
# The model


class VqaModel(mlflow.pyfunc.PythonModel):
    """Base + adapter, loaded once per process; answers are generated one request at a time (the scoring server runs
    requests in threads; the model and tokenizer are not made for concurrent use)."""

    def load_context(self, context) -> None:
        from transformers import AutoProcessor

        from med_idefics.modeling.generation import load_adapted_model

        config = json.loads(Path(context.artifacts[CONFIG]).read_text())
        self.config = ServingConfig(**config)
        self.processor = AutoProcessor.from_pretrained(context.artifacts[PROCESSOR])
        quantization = QuantizationConfig(**self.config.quantization)
        self.model = load_adapted_model(context.artifacts[BASE], context.artifacts[ADAPTER], quantization)
        self.lock = threading.Lock()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from med_idefics.modeling.generation import generate_answers
        from med_idefics.prompts import extract_answer

        tokens = max_new_tokens(params, self.config.max_new_tokens)
        records = decode_request(model_input)
        with self.lock:
            raws = generate_answers(self.model, self.processor, records, self.config.prompt_prefix,
                                    self.config.batch_size, tokens, show_progress=False)  # fmt: skip
        return pd.DataFrame({ANSWER: [extract_answer(raw) for raw in raws]}, dtype=object)


def answer(model_uri: str, image: str | Path | bytes, question: str, max_tokens: int | None = None) -> str:
    """Load the model at ``model_uri`` (``models:/<name>@<alias>``, ``models:/<name>/<version>``, a run or a folder)
    and answer one question about ``image`` (a file path — PNG, JPEG, DICOM — or its bytes)."""
    model = mlflow.pyfunc.load_model(model_uri)
    value = str(Path(image).resolve()) if isinstance(image, str | Path) else bytes(image)
    params = {MAX_NEW_TOKENS: max_tokens} if max_tokens is not None else None
    return str(model.predict(pd.DataFrame({IMAGE: [value], QUESTION: [question]}), params=params)[ANSWER].iloc[0])


__all__ = ["InvalidInput", "Package", "ServingConfig", "VqaModel", "answer", "decode_request", "package"]
