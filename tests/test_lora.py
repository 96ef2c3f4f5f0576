"""LoRA and QLoRA adapters: where they go, how many parameters they train, and that training moves only them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from bitsandbytes.nn import Linear4bit

from med_idefics.config import ConfigError, QuantizationConfig
from med_idefics.data.collator import VqaCollator
from med_idefics.modeling.loading import QUANTIZATION_SKIP_MODULES, VISION_MODULE, load_base_model, quantization_config
from med_idefics.modeling.lora import add_lora, expected_trainable_parameters, trainable_parameters

QLORA = QuantizationConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="float32")


def params_prediction(tiny, r: int) -> int:
    """LoRA parameters the params predict for the tiny model: r x (in + out) for each adapted layer, by hand."""
    h, text_head = tiny.text_hidden, tiny.text_hidden // tiny.text_heads
    q, kv = tiny.text_heads * text_head, tiny.text_kv_heads * text_head
    text_layer = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + tiny.text_intermediate)
    modality_projection = 2 * (tiny.vision_hidden + tiny.text_intermediate) + (tiny.text_intermediate + h)
    inner = tiny.perceiver_heads * tiny.perceiver_head_dim  # the perceiver has no grouped key/values here
    perceiver_layer = 4 * (h + inner) + 3 * (h + 4 * h)  # attention; MLP 4 x hidden
    return r * (tiny.text_layers * text_layer + modality_projection + tiny.perceiver_depth * perceiver_layer)


def one_step(model, batch, lr: float = 1e-2) -> torch.Tensor:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def test_lora_trains_the_predicted_parameters_and_never_the_vision_encoder(repo_params, tiny_model):
    expected = expected_trainable_parameters(tiny_model, repo_params.lora)
    assert expected == params_prediction(repo_params.model.tiny, repo_params.lora.r)
    model = add_lora(tiny_model, repo_params.lora, quantized=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert not any(".vision_model." in name for name in trainable)
    assert any(".modality_projection." in name for name in trainable)
    assert any(".perceiver_resampler." in name for name in trainable)
    assert trainable_parameters(model) == expected


def test_a_step_moves_the_adapters_and_nothing_else(repo_params, tiny_model, tiny_processor, vqa_records):
    model = add_lora(tiny_model, repo_params.lora, quantized=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = VqaCollator(tiny_processor)(vqa_records)
    torch.manual_seed(0)
    one_step(model, batch)
    one_step(model, batch)  # lora_B starts at zero, so lora_A only gets a gradient from the second step on
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"base weight {name} changed"


def test_target_modules_must_not_reach_the_vision_encoder(repo_params, tiny_model):
    into_vision = dataclasses.replace(repo_params.lora, target_modules=r".*(vision_model|text_model).*q_proj")
    with pytest.raises(ConfigError, match="vision encoder"):
        add_lora(tiny_model, into_vision, quantized=False)
    nothing = dataclasses.replace(repo_params.lora, target_modules=r".*no_such_layer")
    with pytest.raises(ConfigError, match="matches no linear layer"):
        expected_trainable_parameters(tiny_model, nothing)


def test_quantization_keeps_the_vision_encoder_and_head_in_full_precision(tiny_model):
    config = quantization_config(QLORA)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32
    names = {name for name, _ in tiny_model.named_modules()}
    assert set(QUANTIZATION_SKIP_MODULES) <= names  # the paths exist in this transformers version
    assert quantization_config(dataclasses.replace(QLORA, load_in_4bit=False)) is None


def test_qlora_step_on_cpu(repo_params, tiny_base_dir, tiny_processor, vqa_records):
    model = load_base_model(tiny_base_dir, QLORA)
    quantized = {name for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert any(".text_model." in name for name in quantized)
    assert any(".perceiver_resampler." in name for name in quantized)
    assert not any(name.startswith(VISION_MODULE) or name == "lm_head" for name in quantized)
    expected = expected_trainable_parameters(model, repo_params.lora)

    model = add_lora(model, repo_params.lora, quantized=True)
    assert trainable_parameters(model) == expected
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    batch = VqaCollator(tiny_processor)(vqa_records)
    losses = [one_step(model, batch) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    changed = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora[name])]
    assert sorted(changed) == sorted(lora)
