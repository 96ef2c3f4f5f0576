"""Importers for the real datasets, fed tiny fixtures in the hub datasets' own schemas (no network)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom.data import get_testdata_file

import med_idefics.cli.data_import  # noqa: F401  (registers the import commands)
from med_idefics.cli import main
from med_idefics.data import versioning
from med_idefics.data.images import image_from_bytes
from med_idefics.data.importers import import_dataset, parse_options
from med_idefics.data.schema import DatasetError, read_records
from med_idefics.data.sources import SOURCES, hf_token

PROMPT = "Describe this radiology image."


def png(mode: str = "RGB", size=(16, 16), value=(90, 100, 110)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def hf_parquet(path, columns: dict, image_column: str = "image") -> None:
    """A parquet file as the hub serves it: image as a {bytes, path} struct, HF features in the schema metadata."""
    features = {name: datasets.Value("string") for name in columns}
    features[image_column] = datasets.Image()
    if "qid" in columns:
        features["qid"] = datasets.Value("int64")
    rows = {name: values for name, values in columns.items()}
    rows[image_column] = [{"bytes": b, "path": None} for b in columns[image_column]]
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(str(path))


def vqa_rad_repo(tmp_path, test_columns: dict | None = None):
    """A local copy of flaviagiammarino/vqa-rad: data/{train,test}-00000-of-00001.parquet; image, question, answer."""
    repo = tmp_path / "vqa-rad-repo"
    train = {
        "image": [
            png(),
            png("RGBA", value=(200, 10, 10, 255)),
            b"\x89PNG\r\n\x1a\ncorrupt",
            png("L", value=80),
            png("RGB", (1, 1)),
            png("I;16", value=3000),
        ],
        "question": ["is there a fracture?", "where is the lesion?", "is it normal?", "  ", "what organ?", "is it CT?"],
        "answer": ["yes", "left lung", "no", "yes", "liver", " No "],
    }
    hf_parquet(repo / "data" / "train-00000-of-00001.parquet", train)
    test = test_columns or {"image": [png()], "question": ["is the heart enlarged?"], "answer": ["no"]}
    hf_parquet(repo / "data" / "test-00000-of-00001.parquet", test)
    return repo


def run_cli(*args, params_file):
    return CliRunner().invoke(main, ["data", *args, "--params", str(params_file)], catch_exceptions=True)


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """`datasets` leaves lock files in its cache even when streaming local files: keep them out of $HOME."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture
def params_file(repo_root):
    return repo_root / "params.yaml"


def test_vqa_rad_folder_through_the_cli(tmp_path, params_file, monkeypatch):
    tracked = []
    monkeypatch.setattr(versioning, "dvc_track", lambda root: tracked.append(root))
    root = tmp_path / "data"
    result = run_cli("vqa-rad", "--source", str(vqa_rad_repo(tmp_path)), "--root", str(root), params_file=params_file)
    assert result.exit_code == 0, result.output
    assert tracked == [str(root)]  # data.dvc is updated after a successful import

    train = {r["id"]: r for r in read_records(root, "vqa-rad", "train")}
    assert sorted(train) == ["vqa-rad-train-00000", "vqa-rad-train-00001", "vqa-rad-train-00005"]
    assert [train[i]["answer_type"] for i in sorted(train)] == ["closed", "open", "closed"]
    assert train["vqa-rad-train-00005"]["answer"] == "No"
    assert {r["dataset"] for r in train.values()} == {"vqa-rad"} and {r["split"] for r in train.values()} == {"train"}
    rgba = image_from_bytes(train["vqa-rad-train-00001"]["image"])
    assert rgba.mode == "RGB" and rgba.getpixel((3, 3)) == (200, 10, 10)
    constant_16_bit = np.asarray(image_from_bytes(train["vqa-rad-train-00005"]["image"]))
    assert (constant_16_bit == 0).all()
    assert len(read_records(root, "vqa-rad", "test")) == 1

    assert "vqa-rad/train: kept 3, rejected 3" in result.output
    assert "corrupt image: 1 (vqa-rad-train-00002)" in result.output
    assert "empty question: 1 (vqa-rad-train-00003)" in result.output
    assert "too small: 1 (vqa-rad-train-00004)" in result.output
    assert "vqa-rad/test: kept 1, rejected 0" in result.output


def test_the_import_counts_training_sequence_lengths_and_prints_percentiles(tmp_path, repo_root, monkeypatch):
    """With a processor to count with (here Idefics2-8b's, tiny-real-processor's), each split's training-sequence
    lengths go into its parquet file and the import prints their percentiles; without one it says why."""
    import yaml

    from med_idefics.data.token_lengths import METADATA_KEY, read_lengths
    from med_idefics.modeling import realistic

    try:
        realistic.mistral_sentencepiece_file()
    except Exception as err:
        pytest.skip(f"tiny-real-processor unavailable: {err}")
    monkeypatch.setattr(versioning, "dvc_track", lambda root: None)
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"] |= {"base": "tiny-real-processor", "base_dir": str(tmp_path / "no-base-yet")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    long_answer = "a hypodense lesion in the right lobe of the liver with peripheral enhancement " * 6
    test = {"image": [png()] * 3, "question": ["is the heart enlarged?", "describe it", "is it normal?"],
            "answer": ["no", long_answer, "yes"]}  # fmt: skip
    root = tmp_path / "data"
    result = run_cli("vqa-rad", "--source", str(vqa_rad_repo(tmp_path, test)), "--root", str(root),
                     params_file=tmp_path / "params.yaml")  # fmt: skip
    assert result.exit_code == 0, result.output
    stats = read_lengths(root, "vqa-rad", "test")
    assert stats["count"] == 3 and stats["longest_id"] == "vqa-rad-test-00001" and stats["max"] > stats["p50"] + 60
    assert f"p50 {stats['p50']:,} · p90 {stats['p90']:,} · p99 {stats['p99']:,} · max {stats['max']:,}" in result.output
    assert read_lengths(root, "vqa-rad", "train")["count"] == 3  # the kept records only
    assert METADATA_KEY.encode() in pq.ParquetFile(root / "vqa-rad" / "test.parquet").metadata.metadata

    params["model"]["base"] = "tiny"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_cli("vqa-rad", "--source", str(vqa_rad_repo(tmp_path)), "--root", str(tmp_path / "other"),
                     params_file=tmp_path / "params.yaml")  # fmt: skip
    assert result.exit_code == 0 and "token lengths not counted: model.base=tiny" in result.output
    assert read_lengths(tmp_path / "other", "vqa-rad", "test") is None


def test_a_relative_hub_layout_folder_is_read(tmp_path, params_file, monkeypatch):
    vqa_rad_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = run_cli("vqa-rad", "--source", "vqa-rad-repo", "--root", "data", "--no-dvc", params_file=params_file)
    assert result.exit_code == 0, result.output
    assert len(read_records("data", "vqa-rad", "train")) == 3 and len(read_records("data", "vqa-rad", "test")) == 1


def test_octomed_answer_type_is_kept_and_qid_is_the_id(tmp_path):
    file = tmp_path / "octomed-test.parquet"
    columns = {
        "qid": [11, 12],
        "image_name": ["synpic1.jpg", "synpic2.jpg"],
        "image_organ": ["CHEST", "HEAD"],
        "answer": ["yes", "Yes"],
        "answer_type": ["OPEN", "CLOSED"],  # the source's type wins over the yes/no rule
        "question_type": ["PRES", "PRES"],
        "question": ["what is seen? answer yes or no", "is there blood?"],
        "phrase_type": ["freeform", "para"],
        "image": [png(), png()],
        "image_hash": ["a", "b"],
    }
    hf_parquet(file, columns)
    reports = import_dataset("vqa-rad", tmp_path / "data", caption_prompt=PROMPT, source=str(file), splits=("test",))
    records = {r["id"]: r for r in read_records(tmp_path / "data", "vqa-rad", "test")}
    assert {k: r["answer_type"] for k, r in records.items()} == {"11": "open", "12": "closed"}
    assert reports["test"].kept == 2


def test_unknown_answer_type_is_rejected(tmp_path):
    file = tmp_path / "vqa.parquet"
    columns = {"image": [png(), png()], "question": ["a?", "b?"], "answer": ["x", "y"], "answer_type": ["OPEN", "NO"]}
    hf_parquet(file, columns)
    reports = import_dataset("vqa-rad", tmp_path / "data", caption_prompt=PROMPT, source=str(file), splits=("train",))
    assert reports["train"].kept == 1 and reports["train"].rejected == {"unknown answer_type": 1}


def test_path_vqa_image_folder_and_jsonl_with_relative_paths(tmp_path):
    folder = tmp_path / "pathvqa"
    (folder / "validation").mkdir(parents=True)
    Image.new("RGB", (20, 12), (1, 2, 3)).save(folder / "validation" / "a.png")
    Image.new("P", (20, 12)).save(folder / "validation" / "b.png")
    with open(folder / "validation" / "metadata.jsonl", "w") as f:
        for name, question, answer in [("a.png", "what stain?", "h&e"), ("b.png", "is this benign?", "no")]:
            f.write(json.dumps({"file_name": name, "question": question, "answer": answer}) + "\n")
    import_dataset("path-vqa", tmp_path / "data", caption_prompt=PROMPT, source=str(folder), splits=("validation",))
    records = read_records(tmp_path / "data", "path-vqa", "validation")
    assert sorted((r["answer"], r["answer_type"]) for r in records) == [("h&e", "open"), ("no", "closed")]
    assert {image_from_bytes(r["image"]).size for r in records} == {(20, 12)}

    (tmp_path / "imgs").mkdir()
    Image.new("L", (9, 9), 7).save(tmp_path / "imgs" / "c.png")
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text(
        json.dumps({"image": "imgs/c.png", "question": "what tissue?", "answer": "liver"})
        + "\n"
        + json.dumps({"image": "imgs/missing.png", "question": "what tissue?", "answer": "lung"})
        + "\n"
    )
    reports = import_dataset("path-vqa", tmp_path / "data", caption_prompt=PROMPT, source=str(jsonl), splits=("test",))
    assert reports["test"].kept == 1 and reports["test"].examples == {"missing file": ["path-vqa-test-00001"]}
    (kept,) = read_records(tmp_path / "data", "path-vqa", "test")
    assert image_from_bytes(kept["image"]).getpixel((0, 0)) == (7, 7, 7)
    assert len(read_records(tmp_path / "data", "path-vqa", "validation")) == 2  # the earlier split is still there


def test_roco_plain_struct_parquet_with_dicom_and_limit(tmp_path, params_file):
    """ROCO rows: image as a plain {bytes, path} struct (no HF metadata), a DICOM among them; --limit keeps the first N
    good records in source order."""
    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    images = [png(), b"not an image", dicom, png(), png()]
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)]),
            "image_id": [f"ROCO_{i:05d}" for i in range(5)],
            "caption": [" CT of the chest. ", "Broken.", "Axial CT.", "MRI.", "X-ray."],
        }
    )
    file = tmp_path / "roco-train.parquet"
    pq.write_table(table, file)
    root = tmp_path / "data"
    args = ["roco", "--source", str(file), "--split", "train", "--limit", "train=3", "--root", str(root), "--no-dvc"]
    result = run_cli(*args, params_file=params_file)
    assert result.exit_code == 0, result.output
    records = read_records(root, "roco", "train")
    assert [r["id"] for r in records] == ["ROCO_00000", "ROCO_00002", "ROCO_00003"]
    assert {r["question"] for r in records} == {PROMPT} and {r["answer_type"] for r in records} == {"open"}
    assert records[0]["answer"] == "CT of the chest."
    ct = image_from_bytes(records[1]["image"])
    assert ct.size == (128, 128) and ct.getextrema() == ((0, 255),) * 3
    assert b"CompressedSamples" not in records[1]["image"]
    assert "roco/train: kept 3, rejected 1" in result.output and "ROCO_00001" in result.output


def _jpeg(mode: str, size: tuple[int, int], **save) -> bytes:
    rng = np.random.default_rng(len(size) + size[0])
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def test_a_sound_rgb_jpeg_is_stored_as_it_came_without_its_metadata(tmp_path):
    """ROCO's 12.8 GB of JPEGs re-encoded as PNG were tens of GB: an RGB JPEG within the size limits keeps its own
    compressed bytes (its EXIF, comment and ICC profile dropped, the pixels untouched); anything else is converted."""
    exif = Image.Exif()
    exif[0x010E] = "Doe^Jane, 1970-01-01"  # ImageDescription
    sound = _jpeg("RGB", (120, 90), exif=exif.tobytes(), comment=b"PatientID 12345")
    images = [sound, _jpeg("CMYK", (40, 30)), _jpeg("RGB", (3000, 40)), _jpeg("L", (50, 40))]
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in images]),
                      "image_id": [f"ROCO_{i}" for i in range(4)], "caption": ["A.", "B.", "C.", "D."]})  # fmt: skip
    pq.write_table(table, tmp_path / "roco.parquet")
    import_dataset("roco", tmp_path / "data", caption_prompt=PROMPT, source=str(tmp_path / "roco.parquet"),
                   splits=("train",))  # fmt: skip
    stored = [r["image"] for r in read_records(tmp_path / "data", "roco", "train")]
    assert stored[0].startswith(b"\xff\xd8") and len(stored[0]) < len(sound)
    assert b"Doe^Jane" not in stored[0] and b"12345" not in stored[0] and b"Exif" not in stored[0]
    with Image.open(io.BytesIO(sound)) as original, Image.open(io.BytesIO(stored[0])) as kept:
        assert kept.format == "JPEG" and np.array_equal(np.asarray(kept), np.asarray(original))
    png_magic = b"\x89PNG\r\n\x1a\n"
    assert all(data.startswith(png_magic) for data in stored[1:])  # CMYK; over 2,048 px (downscaled); grey
    assert image_from_bytes(stored[2]).size == (2048, 27)


def test_med_halt_csv_through_the_cli_and_json_through_the_api(tmp_path, params_file):
    rows = [
        {
            "id": "fake-1",
            "question": "What is the treatment for the purple wobble syndrome of the liver?",
            "options": str({"0": "Surgery", "1": "Rest", "2": "I do not know", "correct answer": "I do not know"}),
            "correct_answer": "I do not know",
            "correct_index": 2,
            "split_type": "val",
            "subject_name": "Medicine",
        },
        {
            "id": "fake-2",
            "question": "Which nerve sings?",
            "options": str({"0": "None of the above", "1": "Vagus"}),
            "correct_answer": "",
            "correct_index": 0,
            "split_type": "val",
            "subject_name": "Anatomy",
        },
        {
            "id": "fake-3",
            "question": "",
            "options": "{}",
            "correct_answer": "x",
            "correct_index": 0,
            "split_type": "val",
            "subject_name": "Anatomy",
        },
    ]
    csv = tmp_path / "reasoning_fake.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    root = tmp_path / "data"
    result = run_cli("med-halt", "--source", str(csv), "--root", str(root), "--no-dvc", params_file=params_file)
    assert result.exit_code == 0, result.output
    records = read_records(root, "med-halt", "reasoning_fake")
    assert [(r["id"], r["question"], r["answer"]) for r in records] == [
        ("fake-1", rows[0]["question"], "I do not know"),
        ("fake-2", "Which nerve sings?", "None of the above"),  # from options[correct_index]
    ]
    assert {r["image"] for r in records} == {None} and {r["answer_type"] for r in records} == {"open"}
    assert "empty question: 1 (fake-3)" in result.output

    json_rows = [dict(rows[0], options={"0": "Surgery", "1": "I do not know"}, unused_column=[1, 2])]
    file = tmp_path / "fake.json"
    file.write_text(json.dumps(json_rows))
    import_dataset("med-halt", tmp_path / "data2", caption_prompt=PROMPT, source=str(file))
    assert read_records(tmp_path / "data2", "med-halt", "reasoning_fake")[0]["answer"] == "I do not know"


def test_parse_options_accepts_dict_json_and_python_repr():
    expected = {"0": "a", "1": "b"}
    assert parse_options({0: "a", 1: " b "}) == expected
    assert parse_options('{"0": "a", "1": "b"}') == expected
    assert parse_options("{'0': 'a', '1': 'b'}") == expected
    assert parse_options("not a dict") == {} and parse_options(None) == {}


# --------------------------------------------------------------------------------------------------------------------
# Failures write nothing


def test_missing_column_fails_before_writing_naming_column_and_file(tmp_path, params_file, monkeypatch):
    tracked = []
    monkeypatch.setattr(versioning, "dvc_track", lambda root: tracked.append(root))
    # train is fine; only test lacks `answer` — still nothing may be written, not even train
    repo = vqa_rad_repo(tmp_path, test_columns={"image": [png()], "question": ["q?"], "label": ["no"]})
    root = tmp_path / "data"
    result = run_cli("vqa-rad", "--source", str(repo), "--root", str(root), params_file=params_file)
    assert isinstance(result.exception, DatasetError)
    assert "missing column(s) ['answer']" in str(result.exception) and str(repo) in str(result.exception)
    assert not (root / "vqa-rad").exists() and tracked == []


def test_split_with_every_record_rejected_fails_and_keeps_the_old_data(tmp_path):
    root = tmp_path / "data"
    good = tmp_path / "good.parquet"
    hf_parquet(good, {"image": [png()], "question": ["q?"], "answer": ["yes"]})
    import_dataset("vqa-rad", root, caption_prompt=PROMPT, source=str(good), splits=("train",))
    before = (root / "vqa-rad" / "train.parquet").read_bytes()

    bad = tmp_path / "bad.parquet"
    hf_parquet(bad, {"image": [b"junk", png()], "question": ["q?", "q2?"], "answer": ["yes", ""]})
    with pytest.raises(DatasetError, match="nothing written") as err:
        import_dataset("vqa-rad", root, caption_prompt=PROMPT, source=str(bad), splits=("train",))
    assert "corrupt image: 1 (vqa-rad-train-00000)" in str(err.value)
    assert "empty answer: 1 (vqa-rad-train-00001)" in str(err.value)
    assert (root / "vqa-rad" / "train.parquet").read_bytes() == before
    assert sorted(p.name for p in root.iterdir()) == ["vqa-rad"]  # no staging leftovers


def test_duplicate_ids_are_rejected(tmp_path):
    file = tmp_path / "roco.parquet"
    hf_parquet(file, {"image": [png(), png()], "image_id": ["ROCO_1", "ROCO_1"], "caption": ["a", "b"]})
    reports = import_dataset("roco", tmp_path / "data", caption_prompt=PROMPT, source=str(file), splits=("train",))
    assert reports["train"].kept == 1 and reports["train"].rejected == {"duplicate id": 1}


def test_bad_sources_give_clear_errors(tmp_path, params_file):
    file = tmp_path / "one.parquet"
    hf_parquet(file, {"image": [png()], "question": ["q?"], "answer": ["yes"]})
    with pytest.raises(DatasetError, match="single file holds one split"):
        import_dataset("vqa-rad", tmp_path / "data", caption_prompt=PROMPT, source=str(file))
    with pytest.raises(DatasetError, match="no such file"):
        import_dataset("vqa-rad", tmp_path / "data", caption_prompt=PROMPT, source=str(tmp_path / "nope.parquet"))
    with pytest.raises(DatasetError, match="split 'validation'"):
        import_dataset("path-vqa", tmp_path / "data", caption_prompt=PROMPT, source=str(vqa_rad_repo(tmp_path)))
    result = run_cli("vqa-rad", "--limit", "train=0", "--root", str(tmp_path / "data"), params_file=params_file)
    assert result.exit_code == 2 and "--limit" in result.output
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_help_names_the_default_hub_source(name, params_file):
    result = CliRunner().invoke(main, ["data", name, "--help"])
    assert result.exit_code == 0
    assert (SOURCES[name].hub_id or "release") in result.output
    assert "--limit" in result.output and "--root" in result.output


def test_hub_token_comes_only_from_the_environment(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hf_token() is False
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hf_token() == "hf_secret"


def test_bare_limit_applies_to_every_split_and_split_limit_overrides_it(tmp_path, params_file):
    repo = vqa_rad_repo(tmp_path)
    root = tmp_path / "data"
    args = ["vqa-rad", "--source", str(repo), "--limit", "2", "--limit", "test=1", "--root", str(root), "--no-dvc"]
    result = run_cli(*args, params_file=params_file)
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_records(root, "vqa-rad", "train")] == ["vqa-rad-train-00000", "vqa-rad-train-00001"]
    assert len(read_records(root, "vqa-rad", "test")) == 1
