"""The packaged model's input decoding and packaging, and the real `mlflow models serve` REST server on loopback."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from pydicom.data import get_testdata_file

from med_idefics.config import load_params
from med_idefics.data.images import read_dicom, to_png_bytes
from med_idefics.modeling.loading import write_pointer
from med_idefics.modeling.serving import (
    MAX_NEW_TOKENS_LIMIT,
    InvalidInput,
    ServingConfig,
    decode_request,
    max_new_tokens,
    package,
)

DICOM = get_testdata_file("CT_small.dcm")
NAME = "med-idefics-vqa"


def _png(seed: int = 0, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return to_png_bytes(Image.fromarray(pixels))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_every_accepted_image_form_decodes_to_the_same_pixels(tmp_path):
    png = _png()
    (tmp_path / "scan.png").write_bytes(png)
    forms = [png, _b64(png), f"data:image/png;base64,{_b64(png)}", str(tmp_path / "scan.png")]
    records = decode_request(pd.DataFrame({"image": forms, "question": ["Is there a lesion?"] * len(forms)}))
    reference = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert all(np.array_equal(np.asarray(r["image"]), reference) for r in records)

    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png)).save(jpeg, format="JPEG")
    (decoded,) = decode_request({"image": [_b64(jpeg.getvalue())], "question": ["q"]})
    assert decoded["image"].size == (64, 64) and decoded["image"].mode == "RGB"


def test_dicom_by_bytes_or_path_is_windowed_to_8_bit(tmp_path):
    windowed = np.asarray(read_dicom(DICOM))
    raw = Path(DICOM).read_bytes()
    renamed = tmp_path / "scan.dcm"  # a path ending .dcm is read as DICOM whatever its first bytes
    renamed.write_bytes(raw)
    records = decode_request(pd.DataFrame({"image": [raw, _b64(raw), str(renamed)], "question": ["q"] * 3}))
    for record in records:
        pixels = np.asarray(record["image"])
        assert pixels.dtype == np.uint8 and np.array_equal(pixels, windowed)
        assert not record["image"].info  # no DICOM tag (patient name, ids) travels with the image
    assert len(np.unique(windowed)) > 50  # a real window over the CT, not a flat image


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"question": ["q"]}, "lacks column(s) ['image']"),
        ({"image": [_b64(_png())]}, "lacks column(s) ['question']"),
        ({"image": ["not*base64!"], "question": ["q"]}, "neither an existing file nor valid base64"),
        ({"image": [_b64(b"just some text, no picture")], "question": ["q"]}, "row 0: the decoded base64 is not a"),
        ({"image": [b"\x89PNG\r\n\x1a\n broken"], "question": ["q"]}, "row 0: the image bytes is not a readable image"),
        ({"image": [_b64(_png()), _b64(_png())], "question": ["q", "  "]}, "row 1: question is missing or empty"),
        ({"image": [None], "question": ["q"]}, "row 0: image is missing"),
    ],
)
def test_bad_input_is_refused_naming_the_row_and_field(frame, message):
    with pytest.raises(InvalidInput, match=__import__("re").escape(message)) as caught:
        decode_request(frame)
    assert caught.value.get_http_status_code() == 400 and isinstance(caught.value, ValueError)


def test_max_new_tokens_param_is_checked():
    assert max_new_tokens(None, 8) == 8 and max_new_tokens({"max_new_tokens": np.int64(3)}, 8) == 3
    for bad in (0, -1, MAX_NEW_TOKENS_LIMIT + 1, "5", 2.5, True):
        with pytest.raises(InvalidInput, match="max_new_tokens"):
            max_new_tokens({"max_new_tokens": bad}, 8)


def test_a_pointed_to_base_is_referenced_not_copied(tmp_path, tiny_base_dir, repo_params):
    pointer_dir = tmp_path / "base"
    write_pointer(pointer_dir, {"source": "local", "path": str(tiny_base_dir), "do_image_splitting": False})
    config = ServingConfig.from_params(repo_params)
    packaged = package(pointer_dir, tiny_base_dir, config, tmp_path / "staging")  # any folder does as the adapter
    assert [p.name for p in Path(packaged.artifacts["base"]).iterdir()] == ["base.json"]
    assert packaged.base_reference == f"local:{tiny_base_dir}"
    copied = package(tiny_base_dir, tiny_base_dir, config, tmp_path / "staging2")
    assert Path(copied.artifacts["base"]) == tiny_base_dir  # the saved tiny base itself goes into the version
    assert packaged.signature.params.to_dict()[0]["default"] == config.max_new_tokens


# --------------------------------------------------------------------------------------------------------------------
# The REST server


@pytest.fixture
def champion(tmp_path, repo_root, tiny_base_dir, monkeypatch):
    """A tiny adapter registered into the test's tmp store, with the alias `champion`."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import Idefics2ForConditionalGeneration

    from med_idefics.stages.register import register

    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"]["base_dir"] = str(tiny_base_dir)
    params["eval"] |= {"max_new_tokens": 3, "batch_size": 8}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    torch.manual_seed(2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=params["lora"]["target_modules"], init_lora_weights=False)
    base = Idefics2ForConditionalGeneration.from_pretrained(tiny_base_dir)
    get_peft_model(base, lora).save_pretrained(tmp_path / "outputs/two-stage/adapter")
    (registration,) = register(load_params("params.yaml"), ["two-stage"])
    MlflowClient().set_registered_model_alias(NAME, "champion", registration.version)
    return f"models:/{NAME}@champion"


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _answers(text: str) -> list[str]:
    return [row["answer"] for row in json.loads(text)["predictions"]]


def _split(images: list, questions: list, **extra) -> dict:
    rows = [list(row) for row in zip(images, questions, strict=True)]
    return {"dataframe_split": {"columns": ["image", "question"], "data": rows}, **extra}


@pytest.fixture
def server(champion, tmp_path):
    """`mlflow models serve` on a free loopback port; yields (port, seconds until /ping answered)."""
    port = _free_port()
    # MLFLOW_TRACKING_URI is the test's store; the server execs `uvicorn` from this environment's bin folder.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", champion, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = (tmp_path / "server.log").open("wb")
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{_log_tail(tmp_path / 'server.log')}")
            if time.monotonic() - started > 120:
                pytest.fail(f"no /ping answer in 120 s:\n{_log_tail(tmp_path / 'server.log')}")
            try:
                if _request(port, "GET", "/ping")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        yield port, time.monotonic() - started
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
        log.close()


def test_rest_server_answers_refuses_bad_requests_and_survives_load(server, champion):
    port, load_seconds = server
    images = [_b64(_png(seed)) for seed in range(3)] + [_b64(Path(DICOM).read_bytes())]
    questions = ["Is there a lesion?", "Which organ is shown?", "Where is the lesion?", "Is there a lesion?"]
    expected = mlflow.pyfunc.load_model(champion).predict(pd.DataFrame({"image": images, "question": questions}))
    expected = expected["answer"].tolist()

    status, text = _request(port, "POST", "/invocations", _split(images, questions))
    assert status == 200, text
    assert _answers(text) == expected
    records = [{"image": i, "question": q} for i, q in zip(images, questions, strict=True)]
    status, text = _request(port, "POST", "/invocations", {"inputs": records, "params": {"max_new_tokens": 1}})
    assert status == 200, text
    assert all(len(answer.split()) <= 1 for answer in _answers(text))

    bad = {
        "no image": ({"dataframe_split": {"columns": ["question"], "data": [["q"]]}}, "image"),
        "bad base64": (_split(["not*base64!"], ["q"]), "valid base64"),
        "not an image": (_split([_b64(b"plain text")], ["q"]), "not a readable image"),
        "no question": ({"dataframe_split": {"columns": ["image"], "data": [[images[0]]]}}, "question"),
        "empty question": (_split([images[0]], [""]), "question is missing or empty"),
        "too many tokens": (_split([images[0]], ["q"], params={"max_new_tokens": 10**6}), "max_new_tokens"),
    }
    for what, (body, message) in bad.items():
        status, text = _request(port, "POST", "/invocations", body)
        assert 400 <= status < 500 and message in json.loads(text)["message"], (what, status, text[-500:])

    def one(i: int) -> tuple[int, str, int]:
        k = i % len(images)
        status, text = _request(port, "POST", "/invocations", _split([images[k]], [questions[k]]))
        return status, text, k

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(200)))
    seconds = time.monotonic() - started
    failures = [(status, text[-300:]) for status, text, _ in results if status != 200]
    assert not failures, failures[:3]
    assert all(_answers(text) == [expected[k]] for _, text, k in results)
    assert _request(port, "GET", "/ping")[0] == 200
    print(f"\nserver ready in {load_seconds:.1f} s; {len(results) / seconds:.1f} answers/s (200 requests, 8 at a time)")


def test_the_package_hash_ignores_which_run_built_the_base(tmp_path):
    """A rebuilt but identical base is the same package: its run_info.json (the run that built it) is no part of it."""
    from med_idefics.modeling.serving import ServingConfig, package_sha256
    from med_idefics.reporting.results import write_run_info

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    for folder in (base, adapter):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(folder.name.encode())
    config = ServingConfig("", 8, 4, {"load_in_4bit": False})
    before = package_sha256(base, adapter, config)
    write_run_info(base, {"variant": "base", "run_id": "abc"})
    assert package_sha256(base, adapter, config) == before
    (base / "weights.bin").write_bytes(b"other")
    assert package_sha256(base, adapter, config) != before
