"""The vision-feature cache (params ``vision_cache``): training losses and greedy answers equal the uncached path's
on the tiny and the tiny-real-processor bases; the cache's keys, bound and file integrity; nothing of the vision
encoder trains."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from med_idefics.config import QuantizationConfig, load_params
from med_idefics.data.collator import VqaCollator
from med_idefics.data.feature_store import CacheError, FeatureStore, image_digest
from med_idefics.data.schema import read_records
from med_idefics.modeling import realistic
from med_idefics.modeling.bases import REAL_PROCESSOR, build_base
from med_idefics.modeling.generation import generate_answers, load_adapted_model
from med_idefics.modeling.loading import load_processor
from med_idefics.modeling.lora import add_lora
from med_idefics.modeling.vision_cache import (
    BATCH_KEYS,
    accept_cached_features,
    bytes_per_image,
    connector_inputs,
    context_of,
    fill,
    open_store,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FP32 = QuantizationConfig(load_in_4bit=False, quant_type="nf4", double_quant=True, compute_dtype="float32")
QA = [("Is there a lesion?", "yes"), ("Which organ is shown?", "chest"), ("Is the lesion on the left?", "no")]


def cache_params(tmp_path, **overrides):
    values = {"vision_cache.enabled": True, "vision_cache.dir": str(tmp_path / "cache"), "vision_cache.max_gib": 1.0}
    return load_params(REPO_ROOT / "params.yaml", values | overrides)


@pytest.fixture(scope="module")
def real_base_dir(tmp_path_factory) -> Path:
    try:
        realistic.mistral_sentencepiece_file()
    except Exception as err:  # the tokenizer file comes from the mistral-common wheel that `make venv` installs
        pytest.skip(f"tiny-real-processor unavailable: {err}")
    out = tmp_path_factory.mktemp("real-processor") / "base"
    build_base(load_params(REPO_ROOT / "params.yaml", {"model.base": REAL_PROCESSOR}), out)
    return out


@pytest.fixture
def real_setup(real_base_dir, make_vqa_records):
    """(base_dir, processor, records): images of three sizes — 300 px (scaled up to the 378 px shortest edge),
    500 px (kept), 1,200 px (scaled down to the 980 px longest edge) — so batches pad unequal patch grids."""
    records = []
    for i, size in enumerate((300, 500, 1200)):
        records += make_vqa_records(QA[i : i + 1] * 2, seed=10 + i, size=size)
    return real_base_dir, load_processor(real_base_dir), records


@pytest.fixture
def tiny_setup(tiny_base_dir, tiny_processor, vqa_records):
    return tiny_base_dir, tiny_processor, vqa_records


@pytest.fixture(params=["tiny", "tiny-real-processor"])
def setup(request):
    return request.getfixturevalue("tiny_setup" if request.param == "tiny" else "real_setup")


def losses(model, collator, texts, steps: int = 3, batch: int = 3) -> list[float]:
    """``steps`` AdamW steps of the training loss on consecutive batches; the same seed for LoRA dropout."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    result = []
    for step in range(steps):
        chunk = [texts[(step * batch + i) % len(texts)] for i in range(batch)]
        loss = model(**collator.collate_texts(chunk)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        result.append(loss.item())
    return result


def lora_model(base_dir, params):
    model = load_adapted_model(base_dir, None, FP32)
    torch.manual_seed(1)
    return add_lora(model, params.lora)


def test_training_loss_with_the_cache_equals_the_uncached_path(setup, tmp_path):
    base_dir, processor, records = setup
    params = cache_params(tmp_path, **{"model.base_dir": str(base_dir)})
    collator = VqaCollator(processor)
    texts = collator.encode_texts(records)

    plain_model = lora_model(base_dir, params)
    vision_before = {k: v.clone() for k, v in plain_model.named_parameters() if ".vision_model." in k}
    plain = losses(plain_model, collator, texts)

    cached_model = lora_model(base_dir, params)
    store = open_store(params, cached_model, processor, base_dir)
    assert fill(store, cached_model, processor, [t["image"] for t in texts], "training")
    accept_cached_features(cached_model)
    cached_collator = collator.with_features(store)
    batch = cached_collator.collate_texts(texts[:3])
    assert "pixel_values" not in batch and set(BATCH_KEYS) <= set(batch)
    cached = losses(cached_model, cached_collator, texts)

    assert max(abs(a - b) / abs(a) for a, b in zip(plain, cached, strict=True)) < 1e-4, (plain, cached)
    assert plain[0] != plain[-1]  # the steps trained: the later losses are not the first one again
    for model in (plain_model, cached_model):
        vision = {k: p for k, p in model.named_parameters() if ".vision_model." in k}
        assert vision and not any(p.requires_grad for p in vision.values())
        assert all(torch.equal(vision[k], vision_before[k]) for k in vision)
    connector = [p for k, p in cached_model.named_parameters() if "connector" in k and "lora_" in k]
    assert connector and all(p.requires_grad for p in connector)


def image_features(inputs: dict) -> torch.Tensor:
    """The connector's output from ``connector_inputs``, whichever keyword the installed transformers takes."""
    if "mm_encoder_outputs" in inputs:
        return torch.cat(inputs["mm_encoder_outputs"]["image"].pooler_output)
    return inputs["image_hidden_states"]


def test_the_connector_output_from_cached_states_equals_the_models_own(setup, tmp_path):
    """What the language model receives for the images: from pixels (transformers' ``get_image_features``, on a
    padded batch of unequal images) and from the cache (each image encoded alone, padded per batch)."""
    base_dir, processor, records = setup
    params = cache_params(tmp_path, **{"model.base_dir": str(base_dir)})
    model = load_adapted_model(base_dir, None, FP32)
    store = open_store(params, model, processor, base_dir)
    images = [r["image"] for r in records]
    for image in images:  # one at a time: no padding when encoded
        assert fill(store, model, processor, [image], "one image")
    collator = VqaCollator(processor)
    texts = collator.encode_texts(records)
    pixels = collator.collate_texts(texts)
    cached = collator.with_features(store).collate_texts(texts)
    with torch.inference_mode():
        plain = model.model.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"]).pooler_output
        plain = torch.cat(list(plain)) if isinstance(plain, list | tuple) else plain
        from_cache = image_features(connector_inputs(model, *(cached[key] for key in BATCH_KEYS)))
    assert from_cache.shape == plain.shape
    assert (from_cache - plain).abs().max() <= 1e-5 * plain.abs().max(), (from_cache - plain).abs().max()
    # what is cached, the encoder's states, against the encoder's output on the padded pixel batch
    inner, size = model.model, model.config.vision_config.patch_size
    mask = pixels["pixel_attention_mask"].flatten(0, 1)
    patches = mask.unfold(1, size, size).unfold(2, size, size).sum(dim=(-1, -2)) == size * size
    with torch.inference_mode():
        states = inner.vision_model(pixels["pixel_values"].flatten(0, 1), patch_attention_mask=patches)
    assert torch.equal(cached["patch_attention_mask"].flatten(0, 1), patches)
    real = patches.flatten(1)
    expected, got = states.last_hidden_state[real], cached["vision_hidden_states"].flatten(0, 1)[real]
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), (got - expected).abs().max()


def test_a_cache_hit_never_runs_the_image_processor(tiny_setup, tmp_path, monkeypatch):
    base_dir, processor, records = tiny_setup
    params = cache_params(tmp_path, **{"model.base_dir": str(base_dir)})
    model = load_adapted_model(base_dir, None, FP32)
    store = open_store(params, model, processor, base_dir)
    collator = VqaCollator(processor)
    texts = collator.encode_texts(records)
    assert fill(store, model, processor, [t["image"] for t in texts], "training")
    cached = collator.with_features(store)

    def refuse(*args, **kwargs):
        raise AssertionError("the image processor ran on a cache hit")

    monkeypatch.setattr(type(processor.image_processor), "__call__", refuse)
    monkeypatch.setattr(type(processor.image_processor), "preprocess", refuse)
    cached.collate_texts(texts)
    answers = generate_answers(model, processor, records, "", 4, 3, show_progress=False, store=store)
    assert len(answers) == len(records)


def test_greedy_answers_with_the_cache_are_identical(setup, tmp_path):
    base_dir, processor, records = setup
    params = cache_params(tmp_path, **{"model.base_dir": str(base_dir)})
    model = load_adapted_model(base_dir, None, FP32)
    store = open_store(params, model, processor, base_dir)
    assert fill(store, model, processor, [r["image"] for r in records], "answering")
    kwargs = {"show_progress": False, "min_new_tokens": 4}  # a random model must not stop early
    plain = generate_answers(model, processor, records, "", 4, 4, **kwargs)
    cached = generate_answers(model, processor, records, "", 4, 4, store=store, **kwargs)
    assert cached == plain and all(answer.strip() for answer in plain)


def test_answering_batches_prepared_by_workers_give_the_same_answers(tiny_setup):
    base_dir, processor, records = tiny_setup
    model = load_adapted_model(base_dir, None, FP32)
    kwargs = {"show_progress": False, "min_new_tokens": 3}
    inline = generate_answers(model, processor, records, "", 4, 3, **kwargs)
    assert generate_answers(model, processor, records, "", 4, 3, workers=2, **kwargs) == inline


def test_cache_keys_change_with_the_base_and_the_processor_settings(tiny_setup, real_base_dir, tmp_path):
    base_dir, processor, records = tiny_setup
    model = load_adapted_model(base_dir, None, FP32)
    context = context_of(base_dir, processor, model)
    other_processor = copy.deepcopy(processor)
    other_processor.image_processor.size = {"longest_edge": 32, "shortest_edge": 16}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    real = load_adapted_model(real_base_dir, None, FP32)
    contexts = [
        context,
        context_of(base_dir, other_processor, model),
        context_of(base_dir, processor, bf16),
        context_of(real_base_dir, load_processor(real_base_dir), real),
    ]
    folders = {FeatureStore(tmp_path, c, 2**20).folder for c in contexts}
    assert len(folders) == 4
    assert FeatureStore(tmp_path, context_of(base_dir, processor, model), 2**20).folder == (
        FeatureStore(tmp_path, context, 2**20).folder
    )
    assert image_digest(records[0]["image"]) != image_digest(records[1]["image"])


def test_the_size_bound_is_honoured(tiny_setup, tmp_path):
    base_dir, processor, records = tiny_setup
    model = load_adapted_model(base_dir, None, FP32)
    per_image = bytes_per_image(model, processor)
    images = [r["image"] for r in records]
    context = context_of(base_dir, processor, model)

    too_small = FeatureStore(tmp_path / "small", context, per_image * (len(images) - 1))
    assert not fill(too_small, model, processor, images, "a split larger than the bound")
    assert too_small.files() == []

    store = FeatureStore(tmp_path / "fits", context, per_image * 4)
    assert fill(store, model, processor, images[:4], "four images")
    assert len(store.files()) == 4 and store.total_bytes() <= store.max_bytes
    assert fill(store, model, processor, images[4:], "two others")  # room made: the least recently used go
    assert store.total_bytes() <= store.max_bytes
    assert {image_digest(i) for i in images[4:]} <= {p.name.split(".")[0] for p in store.files()}


def test_a_corrupted_or_partial_cache_file_is_detected_and_recomputed(tiny_setup, tmp_path):
    base_dir, processor, records = tiny_setup
    model = load_adapted_model(base_dir, None, FP32)
    context = context_of(base_dir, processor, model)
    store = FeatureStore(tmp_path, context, 2**30)
    images = [r["image"] for r in records[:2]]
    assert fill(store, model, processor, images, "two images")
    digests = [image_digest(i) for i in images]
    hidden, grid = store.load(digests[0])
    hidden = hidden.clone()  # the loaded tensor may map the file
    assert not list(store.folder.glob("*.tmp"))  # written next to the final name, then renamed

    partial, flipped = (store.path(d) for d in digests)
    partial.write_bytes(partial.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF
    flipped.write_bytes(bytes(data))
    fresh = FeatureStore(tmp_path, context, 2**30)  # a new process: nothing verified yet
    for digest in digests:
        with pytest.raises(CacheError, match=digest):
            fresh.load(digest)
    assert fill(fresh, model, processor, images, "two images again")
    again, again_grid = FeatureStore(tmp_path, context, 2**30).load(digests[0])
    assert again_grid == grid and torch.allclose(again, hidden)


def test_training_stage_uses_the_cache_and_a_split_that_does_not_fit_runs_uncached(project, capsys):
    from med_idefics.stages.train import TrainRequest, train

    overrides = {"vision_cache.enabled": True, "vision_cache.dir": str(project / "cache")}
    params = load_params(project / "params.yaml", overrides)
    summary = train(params, TrainRequest("single-stage", project / "outputs" / "single-stage"))
    cached = {p.name.split(".")[0] for p in (project / "cache").glob("*/*.safetensors")}
    # the training split and the eval-loss split (validation, carved out of train): every train image
    images = {image_digest(r["image"]) for r in read_records(project / "data", "syn-vqa", "train")}
    assert summary["optimizer_steps"] > 0 and cached == images
    assert "running uncached" not in capsys.readouterr().out

    params = load_params(project / "params.yaml", overrides | {"vision_cache.max_gib": 1e-6})
    summary = train(params, TrainRequest("single-stage", project / "outputs" / "tight"))
    assert summary["optimizer_steps"] > 0 and "running uncached" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------------
# One load of the base per evaluation process: adapters swapped


def random_adapter(base_dir, params, out: Path, seed: int) -> Path:
    """A saved LoRA adapter whose B matrices are random (a fresh one is the identity), so it changes the answers."""
    model = load_adapted_model(base_dir, None, FP32)
    torch.manual_seed(seed)
    model = add_lora(model, params.lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(str(out))
    return out


def test_answers_after_an_adapter_swap_equal_a_fresh_load(tiny_setup, tmp_path):
    from med_idefics.modeling.generation import AdapterSwitch

    base_dir, processor, records = tiny_setup
    params = load_params(REPO_ROOT / "params.yaml")
    adapters = [random_adapter(base_dir, params, tmp_path / f"adapter-{seed}", seed) for seed in (1, 2)]
    kwargs = {"show_progress": False, "min_new_tokens": 4}

    def fresh(adapter):
        return generate_answers(load_adapted_model(base_dir, adapter, FP32), processor, records, "", 4, 4, **kwargs)

    expected = {None: fresh(None), adapters[0]: fresh(adapters[0]), adapters[1]: fresh(adapters[1])}
    assert len({tuple(answers) for answers in expected.values()}) == 3  # the adapters do change the answers
    switch = AdapterSwitch(base_dir, FP32)
    loads = []
    for adapter in (None, adapters[0], adapters[1], None, adapters[0]):
        model = switch.use(adapter)
        loads.append(id(model.get_base_model()) if hasattr(model, "get_base_model") else id(model))
        assert generate_answers(model, processor, records, "", 4, 4, **kwargs) == expected[adapter], adapter
        if adapter is not None:
            assert len(model.peft_config) == 1  # the previous adapter was deleted, not kept beside
    assert len(set(loads)) == 1  # one base all along


def test_a_failed_write_leaves_neither_a_cache_file_nor_a_temporary(tmp_path, monkeypatch):
    import med_idefics.data.feature_store as feature_store

    store = FeatureStore(tmp_path, {"base": "x"}, 2**20)

    def crash(tensors, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(feature_store, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save("d" * 32, torch.ones(4, 8), (2, 2))
    assert "d" * 32 not in store and sorted(p.name for p in store.folder.iterdir()) == ["context.json"]
