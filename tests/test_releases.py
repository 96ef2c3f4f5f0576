"""The authors' release formats, on tiny synthetic copies (the real files: tests/test_realdata.py), and the import
machinery they exercise: images converted once, records streamed in batches, failures leaving data/ as it was."""

from __future__ import annotations

import json
import os
import pickle

import datasets
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

import med_idefics.cli.data_import  # noqa: F401  (registers the import commands)
from med_idefics.cli import main
from med_idefics.data import images as images_module
from med_idefics.data import schema
from med_idefics.data.importers import abstention_option, import_dataset
from med_idefics.data.releases import load_plain_pickle
from med_idefics.data.schema import DatasetError, question_types, read_records, split_path

PROMPT = "Describe this radiology image."


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def jpeg(path, value=(120, 30, 30), size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, value).save(path, format="JPEG", quality=95)


def vqa_rad_release(tmp_path):
    folder = tmp_path / "VQA_RAD"
    for i in range(3):
        jpeg(folder / "VQA_RAD Image Folder" / f"synpic{i}.jpg", value=(40 * i, 10, 10))
    entries = [
        {"qid": "0", "image_name": "synpic0.jpg", "question": "Is it CT?", "answer": "Yes", "answer_type": "CLOSED",
         "phrase_type": "freeform", "question_type": "MODALITY", "image_organ": "HEAD"},
        {"qid": 1, "image_name": "synpic0.jpg", "question": "How many?", "answer": 4, "answer_type": "CLOSED ",
         "phrase_type": "para", "question_type": "COUNT", "image_organ": "HEAD"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "Which side?", "answer": "Left", "answer_type": "CLOSED",
         "phrase_type": "test_freeform", "question_type": "POS", "image_organ": "CHEST"},
        {"qid": 3, "image_name": "synpic2.jpg", "question": "What organ?", "answer": "liver", "answer_type": "OPEN",
         "phrase_type": "test_para", "question_type": "ORGAN", "image_organ": "ABD"},
        {"qid": 4, "image_name": "missing.jpg", "question": "Is it?", "answer": "no", "answer_type": "CLOSED",
         "phrase_type": "freeform", "question_type": "PRES", "image_organ": "ABD"},
    ]  # fmt: skip
    (folder / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))
    return folder


def test_vqa_rad_official_release_through_the_cli(tmp_path, repo_root):
    source, root = vqa_rad_release(tmp_path), tmp_path / "data"
    args = ["data", "vqa-rad", "--source", str(source), "--root", str(root), "--no-dvc"]
    result = CliRunner().invoke(main, [*args, "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 0, result.output
    train, test = read_records(root, "vqa-rad", "train"), read_records(root, "vqa-rad", "test")
    assert [(r["id"], r["answer"], r["answer_type"]) for r in train] == [("0", "Yes", "closed"), ("1", "4", "closed")]
    assert [(r["id"], r["answer_type"]) for r in test] == [("2", "closed"), ("3", "open")]  # "Left" stays closed
    assert train[0]["image"] == train[1]["image"]
    assert "missing file: 1 (4)" in result.output
    stored = pq.read_table(split_path(root, "vqa-rad", "test")).to_pylist()
    assert [(r["phrase_type"], r["question_type"]) for r in stored] == [
        ("test_freeform", "POS"),
        ("test_para", "ORGAN"),
    ]


def test_relative_source_and_images_paths_are_joined_once(tmp_path, repo_root, monkeypatch):
    """docs/data.md's `--source "downloads/VQA_RAD"`: a relative release folder (and a relative --images) resolve once,
    not as `…/VQA_RAD Image Folder/downloads/VQA_RAD/VQA_RAD Image Folder/synpic0.jpg`."""
    vqa_rad_release(tmp_path / "downloads")
    mevf = tmp_path / "downloads" / "data_RAD"
    mevf.mkdir()
    row = {"qid": 7, "image_name": "synpic2.jpg", "question": "Is it?", "answer": "yes", "answer_type": "CLOSED"}
    (mevf / "testset.json").write_text(json.dumps([row]))
    monkeypatch.chdir(tmp_path)
    params = ["--params", str(repo_root / "params.yaml"), "--no-dvc"]
    result = CliRunner().invoke(main, ["data", "vqa-rad", "--source", "downloads/VQA_RAD", "--root", "data", *params])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_records("data", "vqa-rad", "train")] == ["0", "1"]
    images = ["--images", "downloads/VQA_RAD/VQA_RAD Image Folder"]
    command = ["data", "vqa-rad", "--source", "downloads/data_RAD", *images, "--root", "mevf", *params]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in read_records("mevf", "vqa-rad", "test")] == ["7"]


def test_mevf_layout_with_images_option(tmp_path):
    images = tmp_path / "imgs"
    jpeg(images / "synpic9.jpg")
    folder = tmp_path / "data_RAD"
    folder.mkdir()
    row = {"qid": 7, "image_name": "synpic9.jpg", "question": "Is it?", "answer": "yes", "answer_type": "CLOSED"}
    (folder / "testset.json").write_text(json.dumps([row]))
    with pytest.raises(DatasetError, match=r"images \(synpic\*\.jpg\) are missing.*--images"):
        import_dataset("vqa-rad", tmp_path / "data", caption_prompt=PROMPT, source=str(folder))
    reports = import_dataset(
        "vqa-rad", tmp_path / "data", caption_prompt=PROMPT, source=str(folder), images=str(images)
    )
    assert list(reports) == ["test"] and reports["test"].kept == 1


def test_slake_release_one_language_with_its_labels(tmp_path):
    folder = tmp_path / "Slake1.0"
    jpeg(folder / "imgs" / "xmlab1" / "source.jpg")
    base = {"img_name": "xmlab1/source.jpg", "answer_type": "OPEN", "modality": "MRI", "location": "Brain",
            "content_type": "Modality"}  # fmt: skip
    rows = [
        base | {"qid": 1, "question": "Which modality?", "answer": "MRI", "q_lang": "en"},
        base | {"qid": 2, "question": "什么模态?", "answer": "MRI", "q_lang": "zh"},
    ]
    (folder / "test.json").write_text(json.dumps(rows, ensure_ascii=False))
    import_dataset("slake", tmp_path / "en", caption_prompt=PROMPT, source=str(folder))
    (record,) = pq.read_table(split_path(tmp_path / "en", "slake", "test")).to_pylist()
    assert (record["id"], record["modality"], record["location"], record["content_type"]) == (
        "1",
        "MRI",
        "Brain",
        "Modality",
    )
    assert record["question_type"] == "Modality"  # the column the report's accuracy by type reads, every source
    assert question_types(tmp_path / "en", "slake") == {"1": "MODALITY"}
    import_dataset("slake", tmp_path / "zh", caption_prompt=PROMPT, source=str(folder), lang="zh")
    assert [r["id"] for r in read_records(tmp_path / "zh", "slake", "test")] == ["2"]
    with pytest.raises(DatasetError, match="release"):
        import_dataset("slake", tmp_path / "x", caption_prompt=PROMPT)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_path_vqa_pickles_with_images_and_the_restricted_unpickler(tmp_path):
    folder = tmp_path / "pvqa"
    questions = [
        {"img_id": "test_0001", "sent": "Is this benign?", "label": {"no": 1}, "answer_type": "yes/no",
         "question_type": "is", "question_id": 1},
        {"img_id": "test_0002", "sent": "What stain?", "label": {"h&e": 1}, "answer_type": "other",
         "question_type": "what", "question_id": 2},
    ]  # fmt: skip
    folder.mkdir()
    (folder / "test_vqa.pkl").write_bytes(pickle.dumps(questions))
    with pytest.raises(DatasetError, match=r"images .* are missing"):
        import_dataset("path-vqa", tmp_path / "data", caption_prompt=PROMPT, source=str(folder))
    jpeg(folder / "images" / "test" / "test_0001.jpg")
    jpeg(folder / "images" / "test" / "test_0002.jpg")
    import_dataset("path-vqa", tmp_path / "data", caption_prompt=PROMPT, source=str(folder))
    records = read_records(tmp_path / "data", "path-vqa", "test")
    assert [(r["id"], r["answer"], r["answer_type"]) for r in records] == [("1", "no", "closed"), ("2", "h&e", "open")]

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DatasetError, match="refused global"):
        load_plain_pickle(tmp_path / "evil.pkl")


def test_med_halt_abstention_option():
    assert abstention_option(str({"0": "Surgery", "1": "I do not know", "2": "I do not know"})) == "I do not know"
    assert abstention_option(str({"0": "A", "1": "E. I do not know", "2": "Say 'I do not know' twice"})) == (
        "E. I do not know"
    )
    for options, reason in [
        ({"0": "Surgery", "1": "Conceding defeat"}, "no 'I do not know' option"),
        ({"0": "1. a\n2. I do not know"}, "unreadable options"),
        ({"0": "well, I do not know", "1": "truly I don't know that"}, "several 'I do not know' options"),
    ]:
        with pytest.raises(ValueError) as err:
            abstention_option(str(options))
        assert err.value.reason == reason


def test_each_image_is_converted_once_and_records_stream_in_batches(tmp_path, monkeypatch):
    calls = []
    real = images_module.stored_bytes
    monkeypatch.setattr(images_module, "stored_bytes", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(schema, "BATCH_RECORDS", 2)
    source = vqa_rad_release(tmp_path)
    import_dataset("vqa-rad", tmp_path / "data", caption_prompt=PROMPT, source=str(source))
    assert len(calls) == 4  # 3 images and one missing file, for 5 questions
    assert pq.ParquetFile(split_path(tmp_path / "data", "vqa-rad", "train")).num_row_groups == 1
    monkeypatch.setattr(schema, "BATCH_RECORDS", 1)
    import_dataset("vqa-rad", tmp_path / "data", caption_prompt=PROMPT, source=str(source))
    assert pq.ParquetFile(split_path(tmp_path / "data", "vqa-rad", "train")).num_row_groups == 2


def test_a_failure_after_some_batches_were_written_leaves_the_old_data(tmp_path, monkeypatch):
    source, root = vqa_rad_release(tmp_path), tmp_path / "data"
    import_dataset("vqa-rad", root, caption_prompt=PROMPT, source=str(source))
    before = {p.name: p.read_bytes() for p in (root / "vqa-rad").iterdir()}
    monkeypatch.setattr(schema, "BATCH_RECORDS", 1)
    (source / "VQA_RAD Image Folder" / "synpic2.jpg").write_bytes(b"not a jpeg")  # test: nothing usable is left…
    (source / "VQA_RAD Image Folder" / "synpic1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="nothing written"):  # …after train's batches were already written
        import_dataset("vqa-rad", root, caption_prompt=PROMPT, source=str(source))
    assert {p.name: p.read_bytes() for p in (root / "vqa-rad").iterdir()} == before
    assert sorted(p.name for p in root.iterdir()) == ["vqa-rad"]


def test_streamed_images_are_reused_by_content_and_release_images_dropped_after_their_last_question(tmp_path):
    from med_idefics.data.images import ImageCache, to_png_bytes

    cache, data = ImageCache(), to_png_bytes(Image.new("RGB", (10, 10), (1, 2, 3)))
    assert cache.stored(data) == cache.stored(bytes(data)) and (cache.misses, cache.hits) == (1, 1)
    jpeg(tmp_path / "a.jpg")
    cache.expect({str(tmp_path / "a.jpg"): 2})
    first = cache.stored(str(tmp_path / "a.jpg"))
    assert cache.stored("a.jpg", tmp_path) == first and cache.misses == 2  # the same file, relative to its folder
    assert cache._expected.size == 0  # both of its questions are done: nothing kept
