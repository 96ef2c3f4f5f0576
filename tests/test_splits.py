"""Image-disjoint re-split, the validation carve-out, their params keys, their use by training and evaluation, and
the leakage check (`med-idefics data check`)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from med_idefics.cli import main
from med_idefics.config import ConfigError, load_params
from med_idefics.data.leakage import check_stored
from med_idefics.data.rewordings import Link
from med_idefics.data.schema import DatasetError, write_splits
from med_idefics.data.splits import carve_validation, image_disjoint, image_key, load_vqa_splits, split_name
from med_idefics.data.suites import has_validation, load_suite, parse_suites


def leaky(make_vqa_records, n_images: int = 12, per_image: int = 3, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """train and test sharing images the way VQA-RAD's official split does: by question, not by image."""
    base = make_vqa_records([(f"q{i}?", "yes") for i in range(n_images)], seed=seed, size=8)
    records = [
        {**base[i], "id": f"r{i}-{j}", "question": f"question {j} about image {i}?"}
        for i in range(n_images)
        for j in range(per_image)
    ]
    test = [r for k, r in enumerate(records) if k % 4 == 0]
    train = [r for k, r in enumerate(records) if k % 4 != 0]
    return [{**r, "split": "train"} for r in train], [{**r, "split": "test"} for r in test]


def images_of(records) -> set[str]:
    return {image_key(r) for r in records}


def test_image_disjoint_resplit_is_disjoint_deterministic_and_close_to_the_official_size(make_vqa_records):
    train, test = leaky(make_vqa_records)
    assert images_of(train) & images_of(test)  # the official-style split leaks
    new_train, new_test = image_disjoint(train, test, seed=0)
    assert not images_of(new_train) & images_of(new_test)
    assert sorted(r["id"] for r in new_train + new_test) == sorted(r["id"] for r in train + test)
    assert len(test) - 3 < len(new_test) <= len(test)  # whole images of 3 questions each
    assert {r["split"] for r in new_test} == {"test"} and {r["split"] for r in new_train} == {"train"}
    assert image_disjoint(train, test, seed=0) == (new_train, new_test)
    assert image_disjoint(train, test, seed=1)[1] != new_test


def test_validation_is_carved_from_train_by_image(make_vqa_records):
    train, _ = leaky(make_vqa_records, n_images=20, per_image=2)
    rest, validation = carve_validation(train, 0.2, seed=0)
    assert validation and not images_of(rest) & images_of(validation)
    assert len(rest) + len(validation) == len(train) and {r["split"] for r in validation} == {"validation"}
    assert carve_validation(train, 0.0, seed=0) == (train, [])


def test_a_question_and_its_rewordings_stay_together_across_images(make_vqa_records, tmp_path, repo_root):
    """A linked group spanning two images (one VQA-RAD training group does) moves as one, in the image-disjoint
    re-split and in the validation carve-out, for every seed; without links the splits are what they were."""
    train, test = leaky(make_vqa_records, n_images=20, per_image=2)
    pool = train + test
    first, second = pool[0], next(r for r in pool if image_key(r) != image_key(pool[0]))
    found = {first["id"]: Link("g", rewording=False), second["id"]: Link("g", rewording=True)}
    together = {image_key(first), image_key(second)}
    for seed in range(20):
        resplits = (image_disjoint(train, test, seed, found), carve_validation(train, 0.3, seed, found))
        for new_train, new_test in resplits:
            sides = [{image_key(r) for r in side} & together for side in (new_train, new_test)]
            assert together in sides and set() in sides, seed  # both images on one side, none on the other
        assert image_disjoint(train, test, seed, {}) == image_disjoint(train, test, seed)
    linked = [r | {"qid_linked_id": found[r["id"]].group if r["id"] in found else r["id"], "phrase_type":
              "para" if r is second else "freeform"} for r in train]  # fmt: skip
    write_splits(tmp_path / "data", "toy", {"train": linked, "test": test})
    params = load_params(repo_root / "params.yaml", {"data.root": str(tmp_path / "data"), "data.vqa.dataset": "toy",
                                                     "data.vqa.split": "image-disjoint"})  # fmt: skip
    assert load_vqa_splits(params) == load_vqa_splits(params)  # the links read from the stored columns
    splits = load_vqa_splits(params)
    held = [r["id"] for part in (splits.train, splits.validation, splits.test) for r in part if r["id"] in found]
    assert len(held) == 2 and any(set(held) <= {r["id"] for r in part} for part in (splits.train, splits.validation,
                                                                                     splits.test))  # fmt: skip


@pytest.mark.parametrize(
    ("override", "key"),
    [("data.vqa.split=by-image", "data.vqa.split"), ("data.vqa.validation_fraction=1.0", "validation_fraction")],
)
def test_split_keys_are_checked(repo_root, override, key):
    with pytest.raises(ConfigError, match=key):
        load_params(repo_root / "params.yaml", [override])


def test_every_shipped_profile_uses_the_official_split(repo_root):
    import yaml

    from med_idefics.workflow.profiles import apply_profile

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert params["data"]["vqa"]["split"] == "official"
    for path in sorted((repo_root / "configs").glob("*.yaml")):  # as applied: an overlay on top of what it extends
        assert apply_profile(params, path.stem, repo_root / "configs")["data"]["vqa"]["split"] == "official", path


@pytest.fixture
def leaky_data(tmp_path, make_vqa_records, repo_root):
    train, test = leaky(make_vqa_records)
    write_splits(tmp_path / "data", "toy", {"train": train, "test": test})
    overrides = [f"data.root={tmp_path / 'data'}", "data.vqa.dataset=toy", "data.vqa.train_split=train",
                 "data.vqa.eval_split=test"]  # fmt: skip
    return tmp_path, overrides


def test_training_and_suites_see_the_configured_split(leaky_data, repo_root):
    from med_idefics.stages.train import _records

    _, overrides = leaky_data
    overrides = [*overrides, "data.vqa.validation_fraction=0"]
    official = load_params(repo_root / "params.yaml", overrides)
    disjoint = load_params(repo_root / "params.yaml", [*overrides, "data.vqa.split=image-disjoint"])
    assert split_name(official.data.vqa) == "official"
    assert split_name(disjoint.data.vqa) == "image-disjoint (seed 0)"
    suite = load_suite(disjoint, "vqa-rad").records
    assert suite == load_vqa_splits(disjoint).test
    assert not images_of(suite) & images_of(load_vqa_splits(disjoint).train)

    validating = load_params(repo_root / "params.yaml", [*overrides, "data.vqa.validation_fraction=0.25"])
    splits = load_vqa_splits(validating)
    train, monitored = _records(validating, "vqa", None)
    assert train == splits.train and monitored == splits.validation[: validating.data.vqa.eval_size]
    assert not {r["id"] for r in train} & {r["id"] for r in splits.validation}
    assert "validation 0.25 of train by image" in split_name(validating.data.vqa)


@pytest.mark.parametrize("split", ["official", "image-disjoint"])
def test_the_validation_suite_asks_the_held_out_questions_and_is_in_all_only_when_carved(leaky_data, repo_root, split):
    _, overrides = leaky_data
    params = load_params(repo_root / "params.yaml", [*overrides, f"data.vqa.split={split}"])
    assert params.data.vqa.validation_fraction > 0  # shipped: promotion chooses on it
    splits = load_vqa_splits(params)
    suite = load_suite(params, "validation")
    assert suite.records == splits.validation and suite.prefix == params.data.prompt_prefix
    assert not images_of(suite.records) & images_of(splits.train)  # never trained on
    assert not images_of(suite.records) & images_of(load_suite(params, "vqa-rad").records) or split == "official"
    assert parse_suites("all", has_validation(params))[-2:] == ["validation", "validation-blank"]
    without = load_params(repo_root / "params.yaml", [*overrides, "data.vqa.validation_fraction=0"])
    assert not {"validation", "validation-blank"} & set(parse_suites("all", has_validation(without)))
    with pytest.raises(ConfigError, match="validation_fraction is 0"):
        load_suite(without, "validation")
    too_small = load_params(repo_root / "params.yaml", [*overrides, "data.vqa.validation_fraction=0.01"])
    with pytest.raises(DatasetError, match="holds no whole image"):  # 0.01 of 27 questions: not one image's 3
        load_suite(too_small, "validation")


def test_data_check_reports_leaks_and_strict_fails_on_them(leaky_data, repo_root):
    tmp_path, overrides = leaky_data
    report = check_stored(tmp_path / "data", "toy")
    (pair,) = report.pairs
    assert pair.shared_images == 9 and pair.second_questions_on_shared == 9
    sets = [arg for o in [*overrides, "data.vqa.validation_fraction=0"] for arg in ("--set", o)]
    args = ["data", "check", "toy", "--params", str(repo_root / "params.yaml"), *sets]
    result = CliRunner().invoke(main, [*args, "--strict"])
    assert result.exit_code == 1 and "train ↔ test: 9 shared images" in result.output
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, [*args, "--strict", "--set", "data.vqa.split=image-disjoint"])
    assert result.exit_code == 0, result.output
    assert "image-disjoint (seed 0)" in result.output and "train ↔ test: 0 shared images" in result.output


def test_data_check_applies_a_split_override_to_the_dataset_it_checks(leaky_data, repo_root):
    """docs/data.md's `data check vqa-rad --set data.vqa.split=image-disjoint --strict` in a profile whose VQA dataset
    is another one (the demo's): the override is honoured for the dataset named."""
    tmp_path, _ = leaky_data
    args = ["data", "check", "toy", "--params", str(repo_root / "params.yaml")]
    args += ["--set", f"data.root={tmp_path / 'data'}"]
    assert load_params(repo_root / "params.yaml").data.vqa.dataset != "toy"
    result = CliRunner().invoke(main, [*args, "--strict", "--set", "data.vqa.split=image-disjoint"])
    assert result.exit_code == 0, result.output
    assert "image-disjoint (seed 0)" in result.output and "train ↔ test: 0 shared images" in result.output
    result = CliRunner().invoke(main, [*args, "--strict"])  # the stored, official split: the leak is reported
    assert result.exit_code == 1 and "train ↔ test: 9 shared images" in result.output


def test_data_check_counts_duplicates_and_missing_images(tmp_path, make_vqa_records):
    records = make_vqa_records([("Is it?", "yes"), ("What?", "liver")], size=8)
    no_image = {**records[1], "id": "text-only", "image": None}
    duplicate = {**records[0], "id": "again", "question": " is IT? "}
    write_splits(tmp_path, "toy", {"train": [*records, no_image, duplicate]})
    (split,) = check_stored(tmp_path, "toy").splits
    assert (split.questions, split.duplicate_triples, split.missing_image) == (4, 1, ["text-only"])


def test_slake_is_a_suite_by_name_only(tmp_path, make_vqa_records, repo_root):
    assert "slake" not in parse_suites("all") and parse_suites("slake") == ["slake"]
    params = load_params(repo_root / "params.yaml", [f"data.root={tmp_path}"])
    with pytest.raises(Exception, match="med-idefics data slake"):
        load_suite(params, "slake")
    write_splits(tmp_path, "slake", {"test": make_vqa_records([("Which organ?", "liver")], split="test")})
    assert [r["answer"] for r in load_suite(params, "slake").records] == ["liver"]
