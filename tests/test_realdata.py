"""The real datasets in the formats their authors released (``<repo>/../shared/realdata``, see its README.md).

Each test skips, naming the missing folder, where those files are absent (the repository never holds them). The
figures asserted are the ones measured on the files (realdata/README.md); the VQA-RAD import is done once per module.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from med_idefics.config import load_params
from med_idefics.data.importers import import_dataset
from med_idefics.data.leakage import check_splits, check_stored
from med_idefics.data.releases import detect_release, path_vqa_questions
from med_idefics.data.schema import DatasetError, read_records, split_path
from med_idefics.data.splits import load_vqa_splits
from med_idefics.scoring.metrics import is_abstention

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"
PROMPT = "Describe this radiology image."


def folder(name: str) -> Path:
    path = REALDATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent (see the realdata README: tests only)")
    return path


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def vqa_rad_root(tmp_path_factory) -> Path:
    """The official VQA-RAD release imported (both splits) into a tmp data root."""
    source = folder("vqa-rad")
    root = tmp_path_factory.mktemp("realdata") / "data"
    reports = import_dataset("vqa-rad", root, caption_prompt=PROMPT, source=str(source), counter=real_counter())
    assert {split: (r.kept, sum(r.rejected.values())) for split, r in reports.items()} == {
        "train": (1797, 0),
        "test": (451, 0),
    }
    return root


def real_counter():
    """Token lengths under Idefics2-8b's own processor (tiny-real-processor's), when mistral-common is installed."""
    from med_idefics.modeling.processors import token_counter

    counter, _ = token_counter(load_params(REPO_ROOT / "params.yaml", {"model.base": "tiny-real-processor",
                                                                      "model.base_dir": "/nonexistent"}))  # fmt: skip
    return counter


def test_vqa_rad_token_lengths_are_what_the_collator_trains_on(vqa_rad_root):
    """The import counted every training sequence as the collator builds it: its percentiles and longest record."""
    import numpy as np

    from med_idefics.data.collator import VqaCollator
    from med_idefics.data.token_lengths import read_lengths
    from med_idefics.modeling.realistic import build_processor

    stats = read_lengths(vqa_rad_root, "vqa-rad", "train")
    if stats is None:
        pytest.skip("tiny-real-processor unavailable (mistral-common): the import counted nothing")
    records = read_records(vqa_rad_root, "vqa-rad", "train")
    lengths = [len(t["input_ids"]) for t in VqaCollator(build_processor()).encode_texts(records)]
    assert stats["count"] == len(records) == 1797 and stats["max"] == max(lengths)
    assert stats["longest_id"] == records[int(np.argmax(lengths))]["id"]
    percentiles = [int(np.percentile(lengths, p, method="higher")) for p in (50, 90, 99)]
    assert [stats["p50"], stats["p90"], stats["p99"]] == percentiles
    assert stats["tokenizer"].startswith("Idefics2-8b's processor") and 64 < stats["p50"] < stats["max"]


def text_columns(root: Path, dataset: str, split: str) -> list[dict]:
    """The stored split without its image column (reading 500 MB of PNGs is not needed to count questions)."""
    path = split_path(root, dataset, split)
    columns = [name for name in pq.read_schema(path).names if name != "image"]
    return pq.read_table(path, columns=columns).to_pylist()


def test_vqa_rad_official_release(vqa_rad_root):
    train, test = text_columns(vqa_rad_root, "vqa-rad", "train"), text_columns(vqa_rad_root, "vqa-rad", "test")
    assert (len(train), len(test)) == (1797, 451)
    assert Counter(r["answer_type"] for r in test) == {"closed": 272, "open": 179}  # the dataset's own labels
    closed_not_yes_no = [r for r in test if r["answer_type"] == "closed" and r["answer"].lower() not in ("yes", "no")]
    assert len(closed_not_yes_no) == 21
    by_id = {r["id"]: r for r in train + test}
    assert by_id["0"]["question"] == "Are regions of the brain infarcted?"  # the one string qid, among int qids
    assert {"4", "12"} <= {r["answer"] for r in train + test}  # int answers stored as text
    assert list(test[0])[6:] == ["question_type", "image_organ", "phrase_type", "qid_linked_id", "image_name"]
    assert {r["phrase_type"] for r in test} == {"test_freeform", "test_para"}
    assert {r["phrase_type"] for r in train} == {"freeform", "para"}
    assert len({r["image_name"] for r in train + test}) == 314


def test_vqa_rad_import_keeps_each_rewording_linked_to_its_original(vqa_rad_root, repo_root):
    """qid_linked_id and phrase_type survive the import. Test: 301 of the 451 questions fall in 148 linked groups of
    more than one, 137 of them an original and its one rewording; the pairs (each rewording of a group with one
    original) are those 137, and the 2 of a group of one original and two rewordings: 139, 121 of them with the same
    answer (the rest reword into another question: "is the diaphragm obscured?" for "is it clearly visualized?").
    Train: 591 rewordings, 583 of them in pairs. The vqa-rad suite carries the test's pairs."""
    from med_idefics.data.rewordings import links, rewording_pairs
    from med_idefics.data.suites import load_suite
    from med_idefics.scoring.metrics import normalize

    found = links(vqa_rad_root, "vqa-rad")
    test, train = (text_columns(vqa_rad_root, "vqa-rad", split) for split in ("test", "train"))
    assert len(found) == 1797 + 451
    groups = Counter(found[r["id"]].group for r in test)
    linked = {group: n for group, n in groups.items() if n > 1}
    assert (len(linked), sum(linked.values())) == (148, 301)
    phrases = Counter(tuple(sorted(r["phrase_type"] for r in test if found[r["id"]].group == g)) for g in linked)
    assert phrases[("test_freeform", "test_para")] == 137
    pairs = rewording_pairs([r["id"] for r in test], found)
    by_id = {r["id"]: r for r in test}
    assert len(pairs) == 139 and all(by_id[o]["image_name"] == by_id[r]["image_name"] for o, r in pairs)
    assert sum(normalize(by_id[o]["answer"]) == normalize(by_id[r]["answer"]) for o, r in pairs) == 121
    assert sum(r["phrase_type"] == "para" for r in train) == 591
    assert len(rewording_pairs([r["id"] for r in train], found)) == 583
    params = load_params(repo_root / "params.yaml", [f"data.root={vqa_rad_root}", "data.vqa.dataset=vqa-rad"])
    assert load_suite(params, "vqa-rad").pairs == tuple(pairs)


def test_vqa_rad_closed_with_a_trailing_space_is_closed(vqa_rad_root):
    release = detect_release("vqa-rad", str(folder("vqa-rad")))
    rows = [row for split in ("train", "test") for row in release.open(split).rows]
    spaced = {str(row["id"]) for row in rows if row["answer_type"] == "CLOSED "}
    assert len(spaced) == 2
    records = {r["id"]: r for split in ("train", "test") for r in text_columns(vqa_rad_root, "vqa-rad", split)}
    assert {records[i]["answer_type"] for i in spaced} == {"closed"}


def test_vqa_rad_mevf_layout_finds_the_images_one_level_up():
    source = folder("vqa-rad") / "mevf-split"
    release = detect_release("vqa-rad", str(source))
    assert release is not None and release.format == "VQA-RAD MEVF layout"
    train, test = (list(release.open(split).rows) for split in ("train", "test"))
    assert (len(train), len(test)) == (3064, 451)
    assert all(Path(row["image"]).is_file() for row in test)


def test_leakage_official_split_shares_202_images_image_disjoint_none(vqa_rad_root, repo_root):
    official = check_stored(vqa_rad_root, "vqa-rad")
    (pair,) = official.pairs
    assert (pair.first, pair.second, pair.shared_images) == ("train", "test", 202)
    assert official.train_shares_held_out_images

    overrides = [f"data.root={vqa_rad_root}", "data.vqa.dataset=vqa-rad", "data.vqa.split=image-disjoint"]
    params = load_params(repo_root / "params.yaml", overrides)
    splits = load_vqa_splits(params)
    assert params.data.vqa.validation_fraction > 0 and splits.validation  # promotion's split, carved from train
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 1797 + 451
    assert 0.95 * 451 <= len(splits.test) <= 451  # close to the official test size
    named = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    disjoint = check_splits("vqa-rad", splits.name, named)
    assert [pair.shared_images for pair in disjoint.pairs] == [0, 0, 0] and not disjoint.train_shares_held_out_images
    assert load_vqa_splits(params).test == splits.test  # deterministic for the seed


def test_slake_english_release():
    source = folder("slake")
    release = detect_release("slake", str(source))
    counts = {split: len(list(release.open(split).rows)) for split in release.splits}
    assert counts == {"train": 4919, "test": 1061}
    chinese = detect_release("slake", str(source), lang="zh")
    assert len(list(chinese.open("test").rows)) == 1033


def test_slake_import_keeps_its_labels_as_extra_columns(tmp_path):
    source = folder("slake")
    import_dataset("slake", tmp_path, caption_prompt=PROMPT, source=str(source), limits={"train": 5, "test": 40})
    table = pq.read_table(split_path(tmp_path, "slake", "test"))
    assert {"modality", "location", "content_type"} <= set(table.column_names)
    assert set(table.column("q_lang").to_pylist()) == {"en"} and table.num_rows == 40
    assert set(table.column("answer_type").to_pylist()) <= {"closed", "open"}


def test_path_vqa_questions_parse_and_missing_images_are_named(tmp_path):
    source = folder("path-vqa")
    counts = {split: len(path_vqa_questions(source / f"{split}_vqa.pkl")) for split in ("train", "val", "test")}
    assert counts == {"train": 19755, "val": 6279, "test": 6761}
    train = path_vqa_questions(source / "train_vqa.pkl")
    assert len({row["img_id"] for row in train}) == 2599
    assert all(row["answer"] and row["answer_type"] in ("closed", "open") for row in train)
    with pytest.raises(DatasetError, match=r"PathVQA images .* are missing.*--images"):
        import_dataset("path-vqa", tmp_path / "data", caption_prompt=PROMPT, source=str(source))
    assert not (tmp_path / "data").exists()


def test_med_halt_reasoning_fake_as_released(tmp_path):
    source = folder("med-halt") / "reasoning_fake.csv"
    (report,) = import_dataset("med-halt", tmp_path, caption_prompt=PROMPT, source=str(source)).values()
    assert report.kept + sum(report.rejected.values()) == 1858
    assert set(report.rejected) <= {"no 'I do not know' option", "unreadable options"}
    assert report.kept >= 1850
    records = read_records(tmp_path, "med-halt", "reasoning_fake")
    assert len(records) == report.kept
    assert all(is_abstention(r["answer"]) for r in records)  # the expected response is the abstention the suite scores


def test_pipeline_on_real_vqa_rad(vqa_rad_root, tiny_base_dir, repo_root, tmp_path, monkeypatch):
    """Official VQA-RAD → two single-stage steps on a tiny base that knows its words → the vqa-rad suite answers all
    451 questions. A tiny base built on other words would learn to answer <unk>: training refuses it."""
    from dataclasses import replace

    from med_idefics.data.schema import DatasetError
    from med_idefics.modeling.bases import tokenizer_corpus
    from med_idefics.modeling.tiny import build_tiny
    from med_idefics.stages.evaluate import EvalRequest, evaluate
    from med_idefics.stages.train import TrainRequest, train

    monkeypatch.chdir(tmp_path)
    tiny = load_params(repo_root / "params.yaml").model.tiny
    texts = tokenizer_corpus(read_records(vqa_rad_root, "vqa-rad", "train"), extra=[PROMPT])
    model, processor = build_tiny(texts, replace(tiny, vocab_size=4096), seed=0)  # ~1,300 words: 512 too few
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    overrides = {
        "data.root": str(vqa_rad_root),
        "data.vqa.dataset": "vqa-rad",
        "data.vqa.eval_size": 4,
        "model.base_dir": str(tmp_path / "base"),
        "single_stage.max_steps": 2,
        "single_stage.micro_batch": 2,
        "single_stage.eval_steps": 100,
        "single_stage.save_steps": 100,
        "single_stage.warmup_steps": 0,
        "eval.max_new_tokens": 2,
        "eval.bootstrap_resamples": 100,
    }
    strange = load_params(repo_root / "params.yaml", overrides | {"model.base_dir": str(tiny_base_dir)})
    with pytest.raises(DatasetError, match=r"of 1617 training answers of vqa-rad/train .*<unk>"):
        train(strange, TrainRequest(stage="single-stage", out_dir=tmp_path / "outputs" / "strange"))
    params = load_params(repo_root / "params.yaml", overrides)
    summary = train(params, TrainRequest(stage="single-stage", out_dir=tmp_path / "outputs" / "single-stage"))
    assert summary["optimizer_steps"] == 2
    adapter = tmp_path / "outputs" / "single-stage" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    results = evaluate(
        params,
        EvalRequest(str(adapter), ["vqa-rad"], "real", tmp_path / "predictions", tmp_path / "metrics"),
    )
    metrics = results["vqa-rad"].metrics
    assert (metrics["n"], metrics["n_closed"], metrics["n_open"]) == (451, 272, 179)
