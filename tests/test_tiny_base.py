"""The tiny Idefics2 built offline, its pretraining, the `base` stage and loading the result back."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from med_idefics.config import ConfigError, QuantizationConfig, load_params
from med_idefics.data.collator import VqaCollator, build_generation_batch
from med_idefics.data.images import image_from_bytes
from med_idefics.data.schema import write_splits
from med_idefics.modeling.bases import SUMMARY_FILE, build_base, pretrain
from med_idefics.modeling.loading import POINTER_FILE, base_source, load_base_model, load_processor
from med_idefics.modeling.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_model, build_tokenizer
from med_idefics.prompts import END_OF_UTTERANCE, chat_messages

FULL_PRECISION = QuantizationConfig(load_in_4bit=False, quant_type="nf4", double_quant=True, compute_dtype="float32")


def test_tokenizer_is_word_level_lowercase_and_decodes_exactly():
    tokenizer = build_tokenizer(["Is there a lesion?", "x-ray of the chest, left side (t2/flair)."], vocab_size=512)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    ids = tokenizer("IS THERE a lesion?", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and tokenizer.unk_token_id not in ids  # four words and "?"
    assert tokenizer("is there a tumour?")["input_ids"].count(tokenizer.unk_token_id) == 1
    text = "x-ray of the chest, left side (t2/flair)."
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer("yes")["input_ids"][0] == tokenizer.bos_token_id


def test_vocab_size_caps_the_vocabulary():
    words = [f"word{i}" for i in range(100)]
    assert len(build_tokenizer(words, vocab_size=40)) == 40


def test_processor_and_model_agree(repo_params, tiny_processor, tiny_model):
    tiny = repo_params.model.tiny
    tokenizer = tiny_processor.tokenizer
    config = tiny_model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == tiny_processor.image_token_id
    assert tiny_processor.image_seq_len == config.perceiver_config.resampler_n_latents == tiny.perceiver_latents
    assert config.text_config.vocab_size % 64 == 0 and config.text_config.vocab_size >= len(tokenizer)
    assert (config.text_config.hidden_size, config.vision_config.hidden_size) == (tiny.text_hidden, tiny.vision_hidden)
    assert config.vision_config.image_size == tiny.image_size
    assert tiny_model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    assert tiny_model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tiny_processor.image_processor.do_image_splitting is False
    assert tiny_processor.chat_template == CHAT_TEMPLATE
    prompt = tiny_processor.apply_chat_template(chat_messages("Is there a lesion?"), add_generation_prompt=True)
    assert prompt == "User:<image>Is there a lesion?<end_of_utterance>\nAssistant:"
    ids = tiny_processor(text=[prompt])["input_ids"][0]
    assert ids.count(config.image_token_id) == tiny.perceiver_latents


def test_same_seed_same_weights(repo_params, tiny_processor):
    tiny = repo_params.model.tiny
    first, second = build_model(tiny_processor, tiny, seed=3), build_model(tiny_processor, tiny, seed=3)
    other = build_model(tiny_processor, tiny, seed=4)
    reference = second.state_dict()
    for name, value in first.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters(), strict=True))


def test_save_and_load_round_trip(repo_params, tiny_base_dir, tiny_processor, vqa_records):
    model = load_base_model(tiny_base_dir, FULL_PRECISION)
    processor = load_processor(tiny_base_dir)
    assert type(processor.image_processor).__name__ == "Idefics2ImageProcessorPil"
    batch = VqaCollator(processor)(vqa_records)
    assert torch.equal(batch["input_ids"], VqaCollator(tiny_processor)(vqa_records)["input_ids"])
    reference = build_model(tiny_processor, repo_params.model.tiny, seed=0).eval()  # what tiny_base_dir saved
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch).logits, reference(**batch).logits)
    generation = build_generation_batch(processor, [image_from_bytes(vqa_records[0]["image"])], ["Is there a lesion?"])
    out = model.generate(**generation, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= generation["input_ids"].shape[1] + 3


def test_pretraining_starts_with_its_focus_records_then_trains_on_all(repo_params, tiny_processor, vqa_records):
    model = build_model(tiny_processor, repo_params.model.tiny, seed=0)
    cfg = replace(repo_params.model.pretrain, steps=6, focus_steps=4, batch_size=2, warmup_steps=0, logging_steps=1)
    summary = pretrain(model, tiny_processor, vqa_records, vqa_records[:2], cfg, seed=0, focus=vqa_records[:3])
    assert (summary["steps"], summary["focus_steps"], summary["focus_records"]) == (6, 4, 3)
    assert summary["train_records"] == len(vqa_records)


def test_pretraining_lowers_the_loss(repo_params, tiny_model, tiny_processor, vqa_records):
    cfg = repo_params.model.pretrain
    cfg = replace(cfg, steps=12, focus_steps=0, batch_size=6, lr=1e-2, warmup_steps=0, logging_steps=4)
    summary = pretrain(tiny_model, tiny_processor, vqa_records, vqa_records, cfg, seed=0)
    assert summary["steps"] == 12 and summary["focus_steps"] == 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["parameters"] == sum(p.numel() for p in tiny_model.parameters())


@pytest.fixture
def demo_like_data(tmp_path, make_vqa_records):
    """A few records in the demo layout; `rare` and `tumour` occur only outside the training splits."""
    prompt = "Describe this radiology image."
    root = tmp_path / "data"
    write_splits(
        root,
        "demo",
        {
            "general": make_vqa_records([("describe this image.", "a red circle with zero dots.")] * 6, "general", 4),
            "general-validation": make_vqa_records([("is the rare shape red?", "no")] * 2, "general-validation", 5),
            "caption-train": make_vqa_records([(prompt, "x-ray of the chest with no lesions.")] * 6, "caption-train"),
            "caption-validation": make_vqa_records([(prompt, "ct of the rare brain.")] * 2, "caption-validation", 1),
            "train": make_vqa_records([("is there a lesion?", "yes"), ("which organ?", "chest")], "train", 2),
            "test": make_vqa_records([("is there a tumour?", "no")], "test", 3),
        },
    )
    return root


def tiny_overrides(data_root, base_dir, steps: int = 3) -> list[str]:
    return [
        f"data.root={data_root}",
        f"model.base_dir={base_dir}",
        f"model.pretrain.steps={steps}",
        "model.pretrain.batch_size=4",
        "model.pretrain.logging_steps=1",
    ]


def test_base_command_builds_a_pretrained_tiny_base(repo_root, demo_like_data, tmp_path):
    from med_idefics.cli.app import main
    from med_idefics.cli.model import base_command  # noqa: F401  (registers `base`)

    base_dir = tmp_path / "base"
    (base_dir).mkdir()
    (base_dir / POINTER_FILE).write_text("{}")  # a stale pointer from an earlier base must not survive
    args = ["base", "--params", str(repo_root / "params.yaml")]
    for override in tiny_overrides(demo_like_data, base_dir):
        args += ["--set", override]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "tiny base" in result.output
    assert not (base_dir / POINTER_FILE).exists()
    summary = json.loads((base_dir / SUMMARY_FILE).read_text())
    assert summary["steps"] == 3 and summary["train_records"] == 6 and summary["eval_records"] == 2
    assert summary["eval_loss_before"] is not None and summary["eval_loss_after"] is not None
    processor = load_processor(base_dir)
    tokenizer = processor.tokenizer
    unk = tokenizer.unk_token_id
    # the general pretraining texts, the medical captions and VQA questions: the base knows every word of them
    assert unk not in tokenizer("a red circle. x-ray of the chest. is there a lesion? which organ?")["input_ids"]
    assert tokenizer("rare")["input_ids"][-1] == unk  # validation words are not learned
    assert tokenizer("tumour")["input_ids"][-1] == unk  # nor test words
    model = load_base_model(base_dir, FULL_PRECISION)
    assert model.config.image_token_id == processor.image_token_id


def test_tiny_base_is_deterministic(repo_root, demo_like_data, tmp_path):
    states = []
    for name in ("a", "b"):
        params = load_params(repo_root / "params.yaml", tiny_overrides(demo_like_data, tmp_path / name))
        build_base(params)
        states.append(load_base_model(tmp_path / name, FULL_PRECISION).state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_hub_id_writes_a_pointer_without_weights(repo_root, tmp_path, monkeypatch):
    import med_idefics.modeling.bases as base

    monkeypatch.setattr(base, "resolve_hub_revision", lambda repo_id, revision: "0123abcd")
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "config.json").write_text("{}")  # left over from a tiny base: must go
    params = load_params(
        repo_root / "params.yaml", ["model.base=HuggingFaceM4/idefics2-8b", f"model.base_dir={base_dir}"]
    )
    pointer = build_base(params)
    assert sorted(p.name for p in base_dir.iterdir()) == [POINTER_FILE]
    assert json.loads((base_dir / POINTER_FILE).read_text()) == pointer
    assert pointer == {
        "source": "hub",
        "id": "HuggingFaceM4/idefics2-8b",
        "revision": "0123abcd",
        "do_image_splitting": False,
    }
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, the hub is asked for that commit (offline: test_offline_base)
    source, kwargs = base_source(base_dir)
    assert source == "HuggingFaceM4/idefics2-8b" and kwargs["revision"] == "0123abcd"


def test_unreachable_hub_model_is_a_config_error(repo_root, tmp_path):
    # tests run with HF_HUB_OFFLINE=1 (conftest): the hub cannot be asked, and the error says what to do
    params = load_params(repo_root / "params.yaml", ["model.base=owner/model", f"model.base_dir={tmp_path / 'base'}"])
    with pytest.raises(ConfigError, match=r"model\.base=tiny to work offline"):
        build_base(params)
    assert not (tmp_path / "base").exists()


def test_hub_token_comes_from_the_environment_only(monkeypatch):
    from med_idefics.modeling.loading import hub_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hub_token() is False
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub_token() == "hf_secret"


def test_local_folder_is_pointed_to(repo_root, tiny_base_dir, tiny_processor, tmp_path):
    base_dir = tmp_path / "base"
    params = load_params(repo_root / "params.yaml", [f"model.base={tiny_base_dir}", f"model.base_dir={base_dir}"])
    assert build_base(params)["source"] == "local"
    assert base_source(base_dir)[0] == str(tiny_base_dir)
    assert load_processor(base_dir).tokenizer.get_vocab() == tiny_processor.tokenizer.get_vocab()


@pytest.mark.parametrize("base", ["not a model", "/no/such/folder"])
def test_unknown_base_is_a_config_error(repo_root, tmp_path, base):
    params = load_params(repo_root / "params.yaml", [f"model.base={base}", f"model.base_dir={tmp_path / 'base'}"])
    with pytest.raises(ConfigError, match=r"model\.base"):
        build_base(params)
    assert not (tmp_path / "base").exists()


def test_missing_base_dir_tells_what_to_run(tmp_path):
    with pytest.raises(ConfigError, match="med-idefics base"):
        load_processor(tmp_path)
