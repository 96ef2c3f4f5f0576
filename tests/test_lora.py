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
    model = add_lora(tiny_model, repo_params.lora)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert not any(".vision_model." in name for name in trainable)
    assert any(".modality_projection." in name for name in trainable)
    assert any(".perceiver_resampler." in name for name in trainable)
    assert trainable_parameters(model) == expected


def test_a_step_moves_the_adapters_and_nothing_else(repo_params, tiny_model, tiny_processor, vqa_records):
    model = add_lora(tiny_model, repo_params.lora)
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
        add_lora(tiny_model, into_vision)
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

    model = add_lora(model, repo_params.lora)
    assert trainable_parameters(model) == expected
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    batch = VqaCollator(tiny_processor)(vqa_records)
    losses = [one_step(model, batch) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    changed = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora[name])]
    assert sorted(changed) == sorted(lora)


def test_a_4bit_base_loads_onto_the_gpu_of_its_own_rank(monkeypatch, tiny_base_dir):
    """Under torchrun every rank must load its 4-bit base onto its own GPU, not all onto cuda:0."""
    from transformers import Idefics2ForConditionalGeneration

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        Idefics2ForConditionalGeneration, "from_pretrained", classmethod(lambda cls, source, **kw: seen.append(kw))
    )
    for rank in ("1", "3"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        load_base_model(tiny_base_dir, QLORA)
    monkeypatch.delenv("LOCAL_RANK")
    load_base_model(tiny_base_dir, QLORA)  # a single process: the first GPU
    assert [kw["device_map"] for kw in seen] == [{"": 1}, {"": 3}, {"": 0}]


def _qlora_loss_and_gradients(base_dir, lora_cfg, batch, checkpointing: bool):
    model = load_base_model(base_dir, QLORA)
    torch.manual_seed(0)
    model = add_lora(model, lora_cfg, gradient_checkpointing=checkpointing)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without a gradient on the first step
            p.data.normal_(std=0.05)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_step_with_activation_checkpointing_equals_the_step_without(
    repo_params, tiny_base_dir, tiny_processor, vqa_records
):
    lora_cfg = dataclasses.replace(repo_params.lora, dropout=0.0)
    batch = VqaCollator(tiny_processor)(vqa_records)
    plain, loss, grads = _qlora_loss_and_gradients(tiny_base_dir, lora_cfg, batch, checkpointing=False)
    model, loss_ckpt, grads_ckpt = _qlora_loss_and_gradients(tiny_base_dir, lora_cfg, batch, checkpointing=True)

    assert model.base_model.model.is_activation_checkpointing and not plain.base_model.model.is_activation_checkpointing
    assert model.config.use_cache is False and model.config.text_config.use_cache is False
    torch.testing.assert_close(loss_ckpt, loss)
    assert set(grads_ckpt) == set(grads) and len(grads) == expected_lora_tensors(model)
    for name, grad in grads_ckpt.items():
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(grad, grads[name])


def expected_lora_tensors(model) -> int:
    return 2 * sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A.default"))


def test_training_and_evaluation_hold_the_base_at_one_precision(repo_params, tiny_base_dir, tmp_path):
    """Non-4-bit weights (vision encoder, lm_head, embeddings, norms) in training = in evaluation."""
    from med_idefics.modeling.generation import load_adapted_model
    from med_idefics.modeling.loading import base_dtype

    bf16 = dataclasses.replace(QLORA, compute_dtype="bfloat16")
    training = add_lora(load_base_model(tiny_base_dir, bf16), repo_params.lora, gradient_checkpointing=True)
    training.save_pretrained(tmp_path / "adapter")
    evaluation = load_adapted_model(tiny_base_dir, tmp_path / "adapter", bf16)

    def base_dtypes(model):
        return {
            n.replace(".default", ""): p.dtype
            for n, p in model.named_parameters()
            if "lora_" not in n and p.dtype.is_floating_point
        }

    trained, evaluated = base_dtypes(training), base_dtypes(evaluation)
    assert trained == evaluated
    assert any(".vision_model." in n for n in trained) and set(trained.values()) == {base_dtype(bf16)}
    lora = {p.dtype for n, p in training.named_parameters() if "lora_" in n}
    assert lora == {torch.float32}  # the trained weights themselves stay fp32
