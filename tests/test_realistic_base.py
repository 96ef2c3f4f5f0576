"""The ``tiny-real-processor`` base: Idefics2-8b's real processor (Mistral sentencepiece tokenizer, added tokens, chat
template, 980 px image processing) in front of tiny random layers — and what the pipeline does on it: prompt masking
on real VQA-RAD answers, left-padded batched generation, stopping at ``<end_of_utterance>``, a QLoRA training run and
an evaluation on CPU, bf16."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from mlflow import MlflowClient
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from med_idefics.config import QuantizationConfig, load_params
from med_idefics.data.collator import IGNORE_INDEX, VqaCollator, build_generation_batch, render_prompt
from med_idefics.data.schema import write_splits
from med_idefics.modeling import realistic
from med_idefics.modeling.bases import REAL_PROCESSOR, build_base
from med_idefics.modeling.generation import generate_answers, load_adapted_model, stop_token_ids
from med_idefics.modeling.loading import load_base_model, load_processor
from med_idefics.prompts import END_OF_UTTERANCE
from med_idefics.reporting.results import eval_run_id

REPO_ROOT = Path(__file__).resolve().parents[1]
VQA_RAD = REPO_ROOT.parent / "shared" / "realdata" / "vqa-rad"
VQA_RAD_JSON = VQA_RAD / "VQA_RAD Dataset Public.json"
FP32 = QuantizationConfig(load_in_4bit=False, quant_type="nf4", double_quant=True, compute_dtype="float32")

try:
    realistic.mistral_sentencepiece_file()
except Exception as err:  # the tokenizer file comes from the mistral-common wheel that `make venv` installs
    pytest.skip(f"tiny-real-processor unavailable: {err}", allow_module_level=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """``med-idefics base`` with model.base=tiny-real-processor: saved, so every test loads it back like a stage."""
    out = tmp_path_factory.mktemp("real-processor") / "base"
    params = load_params(REPO_ROOT / "params.yaml", {"model.base": REAL_PROCESSOR, "model.do_image_splitting": False})
    result = build_base(params, out)
    assert result["source"] == realistic.NAME == REAL_PROCESSOR and result["vocab_size"] == 32003
    return out


@pytest.fixture(scope="module")
def processor(base_dir):
    return load_processor(base_dir)


@pytest.fixture(scope="module")
def vqa_rad_rows() -> list[dict]:
    if not VQA_RAD_JSON.is_file():
        pytest.skip(f"real VQA-RAD not found at {VQA_RAD_JSON} (see ../shared/realdata/README.md)")
    return json.loads(VQA_RAD_JSON.read_text())


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# The processor is Idefics2-8b's


def test_tokenizer_has_mistral_pieces_and_idefics2_added_tokens_at_their_published_ids(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 32003
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in realistic.ADDED_TOKENS} == {
        "<fake_token_around_image>": 32000,
        "<image>": 32001,
        "<end_of_utterance>": 32002,
    }
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<unk>", 0)
    assert tokenizer("Hello world")["input_ids"] == [1, 22557, 1526]  # Mistral-7B v0.1's ids
    assert tokenizer.tokenize("hypodense lesion, 12 mm") == [
        "▁hyp", "od", "ense", "▁les", "ion", ",", "▁", "1", "2", "▁mm"
    ]  # fmt: skip
    assert stop_token_ids(processor) == [32002, 2]


def test_chat_template_and_image_geometry_are_idefics2_8b(processor):
    image_processor = processor.image_processor
    assert image_processor.size == {"longest_edge": 980, "shortest_edge": 378}
    assert list(image_processor.image_mean) == list(image_processor.image_std) == [0.5, 0.5, 0.5]
    assert image_processor.do_image_splitting is False and processor.image_seq_len == 64
    assert render_prompt(processor, "Is there a mass?", answer="yes") == (
        "User:<image>Is there a mass?<end_of_utterance>\nAssistant: yes<end_of_utterance>\n"
    )
    wide = Image.new("RGB", (2000, 1000), "white")
    batch = build_generation_batch(processor, [wide], ["Is there a mass?"])
    assert tuple(batch["pixel_values"].shape) == (1, 1, 3, 490, 980)  # longest edge 980, aspect kept
    assert torch.allclose(batch["pixel_values"].max(), torch.tensor(1.0))  # white: (1 - 0.5) / 0.5
    ids = batch["input_ids"][0].tolist()
    start = ids.index(32000)
    assert ids[start : start + 66] == [32000] + [32001] * 64 + [32000]
    assert ids[-4:] == [13, 7226, 11143, 28747]  # "\nAssistant:" — no dummy prefix after <end_of_utterance>


# --------------------------------------------------------------------------------------------------------------------
# Prompt masking on real answers


def test_unmasked_labels_decode_to_exactly_each_real_vqa_rad_answer(processor, vqa_rad_rows):
    """Every VQA-RAD row, answers as released: ints, a leading space, "CLOSED " answer types, digits that
    sentencepiece splits one by one after the template's space."""
    answers = [str(row["answer"]) for row in vqa_rad_rows]
    assert any(isinstance(row["answer"], int) for row in vqa_rad_rows)
    assert any(answer != answer.lstrip() for answer in answers)
    assert any(row["answer_type"] == "CLOSED " for row in vqa_rad_rows)
    image = png(Image.new("RGB", (64, 64)))
    records = [
        {"id": row["qid"], "image": image, "question": row["question"], "answer": answer}
        for row, answer in zip(vqa_rad_rows, answers, strict=True)
    ]
    collator = VqaCollator(processor)
    eou = collator.end_of_utterance_id
    for start in range(0, len(records), 256):
        chunk = records[start : start + 256]
        for record, example in zip(chunk, collator.encode(chunk), strict=True):
            kept = example["labels"][example["labels"] != IGNORE_INDEX].tolist()
            assert kept[-1] == eou and eou not in kept[:-1], record["id"]
            assert processor.tokenizer.decode(kept) == record["answer"] + END_OF_UTTERANCE, record["id"]


# --------------------------------------------------------------------------------------------------------------------
# Generation


@pytest.fixture(scope="module")
def model(base_dir):
    return load_adapted_model(base_dir, None, FP32)


def real_images(n: int) -> list[Image.Image]:
    folder = VQA_RAD / "VQA_RAD Image Folder"
    if not folder.is_dir():
        pytest.skip(f"real VQA-RAD images not found in {folder}")
    paths = sorted(folder.iterdir())
    step = len(paths) // n
    return [Image.open(paths[i * step]).convert("RGB") for i in range(n)]


def test_left_padded_batch_answers_equal_one_question_at_a_time(model, processor):
    images = real_images(3)
    assert len({image.size for image in images}) == 3  # different sizes: different padding of pixels too
    questions = ["Is there a mass?", "What imaging modality was used to take this image of the abdomen?", "Normal?"]
    records = [{"image": image, "question": q} for image, q in zip(images, questions, strict=True)]
    # min_new_tokens: a random model must not stop early, so every position of the answer is compared
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "show_progress": False}
    together = generate_answers(model, processor, records, "", batch_size=3, **kwargs)
    alone = [generate_answers(model, processor, [r], "", batch_size=1, **kwargs)[0] for r in records]
    assert together == alone
    assert all(answer.strip() for answer in alone)


class Script(LogitsProcessor):
    """Forces the tokens of ``script`` one step after another, then keeps forcing its last token."""

    def __init__(self, script: list[int], prompt_length: int) -> None:
        self.script, self.prompt_length = script, prompt_length

    def __call__(self, input_ids, scores):
        step = min(input_ids.shape[1] - self.prompt_length, len(self.script) - 1)
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.script[step]] = 0.0
        return forced


def test_generation_stops_at_end_of_utterance(model, processor):
    tokenizer = processor.tokenizer
    yes, no = (tokenizer.convert_tokens_to_ids(t) for t in ("▁yes", "▁no"))
    eou = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    records = [{"image": Image.new("RGB", (400, 400)), "question": "Is there a mass?"}]
    prompt = build_generation_batch(processor, [records[0]["image"]], [records[0]["question"]])
    length = prompt["input_ids"].shape[1]
    # generation would say "yes <eou> no no no …" if it did not stop at <end_of_utterance>
    script = LogitsProcessorList([Script([yes, eou, no], length)])
    with torch.inference_mode():
        output = model.generate(
            **prompt, do_sample=False, max_new_tokens=8, eos_token_id=stop_token_ids(processor), logits_processor=script
        )
    assert output[0, length:].tolist() == [yes, eou]
    answers = generate_answers(model, processor, records, "", 1, 8, show_progress=False, logits_processor=script)
    assert answers == ["yes"]


# --------------------------------------------------------------------------------------------------------------------
# Training and evaluation on CPU: QLoRA (4-bit nf4) and bf16


QA = [
    ("Is there a mass?", "yes"),
    ("Is the liver normal?", "no"),
    ("How many lesions are there?", "2"),
    ("What modality is this?", "MRI - T2 weighted"),
]


@pytest.fixture
def real_processor_project(tmp_path, base_dir, make_vqa_records, monkeypatch) -> Path:
    """A tmp project on the tiny-real-processor base: 400 px noise images (resized up to the 378 px shortest edge)."""
    write_splits(
        tmp_path / "data",
        "syn-vqa",
        {
            "train": make_vqa_records(QA * 2, split="train", seed=3, size=400),
            "test": make_vqa_records(QA, split="test", seed=4, size=400),
        },
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def project_params(root: Path, base_dir: Path, **overrides):
    training = {f"single_stage.{key}": value for key, value in {
        "max_steps": 2, "micro_batch": 2, "eval_batch": 2, "save_steps": 100, "eval_steps": 100, "logging_steps": 1,
        "warmup_steps": 0}.items()}  # fmt: skip
    return load_params(
        REPO_ROOT / "params.yaml",
        {
            "model.base_dir": str(base_dir),
            "data.root": str(root / "data"),
            "data.prompt_prefix": "",
            "data.vqa.dataset": "syn-vqa",
            "data.vqa.train_split": "train",
            "data.vqa.eval_split": "test",
            "data.vqa.eval_size": 2,
            "eval.batch_size": 4,
            "eval.max_new_tokens": 4,
            "eval.bootstrap_resamples": 1000,
            **training,
            **overrides,
        },
    )


def test_qlora_training_and_evaluation_run_on_cpu(real_processor_project, base_dir):
    from med_idefics.stages.evaluate import EvalRequest, evaluate
    from med_idefics.stages.train import TrainRequest, train

    root = real_processor_project
    qlora = {"quantization.load_in_4bit": True, "quantization.compute_dtype": "float32"}
    params = project_params(root, base_dir, **qlora)
    quantized = load_base_model(base_dir, params.quantization)  # what the stages load: the language side in 4 bits
    assert any(isinstance(m, Linear4bit) and ".text_model." in name for name, m in quantized.named_modules())
    summary = train(params, TrainRequest("single-stage", root / "outputs" / "single-stage"))
    assert (
        summary["optimizer_steps"] == 2 and math.isfinite(summary["first_loss"]) and math.isfinite(summary["eval_loss"])
    )
    adapter = root / "outputs" / "single-stage" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    results = evaluate(params, EvalRequest("single-stage", ["vqa-rad"]))
    metrics = results["vqa-rad"].metrics
    assert metrics["n"] == len(QA)
    run_id = eval_run_id(results["vqa-rad"].metrics_path.parent.parent, "single-stage", "vqa-rad")
    assert MlflowClient().get_run(run_id).data.tags["precision"] == "4bit-nf4/float32"
    rows = [json.loads(line) for line in results["vqa-rad"].predictions_path.read_text().splitlines()]
    assert [row["answer"] for row in rows] == [answer for _, answer in QA]


def test_bf16_answers_and_a_bf16_lora_step(base_dir, processor):
    from med_idefics.modeling.lora import add_lora

    bf16 = QuantizationConfig(load_in_4bit=False, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    model = load_adapted_model(base_dir, None, bf16)
    assert model.dtype == torch.bfloat16
    records = [{"image": Image.new("RGB", (500, 300)), "question": "Is there a mass?"}]
    answers = generate_answers(model, processor, records, "", 1, 3, show_progress=False, min_new_tokens=3)
    assert answers[0].strip()

    params = load_params(REPO_ROOT / "params.yaml")
    model = add_lora(model, params.lora, gradient_checkpointing=False)
    question, answer = QA[0]
    batch = VqaCollator(processor)(
        [{"id": "x", "image": png(records[0]["image"]), "question": question, "answer": answer}]
    )
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    model.train()
    output = model(**batch)
    output.loss.backward()
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.loss)
    grads = [p.grad for name, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
