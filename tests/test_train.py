"""The training stages on the tiny base: tracked runs, PEFT adapters, continuation, bad input, NaN, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from med_idefics.config import ConfigError, load_params
from med_idefics.data.schema import DatasetError, split_path
from med_idefics.files import file_md5
from med_idefics.modeling.adapters import AdapterError
from med_idefics.reporting.results import read_run_info, run_id_of
from med_idefics.stages.train import TrainRequest, train


def _runs(name: str | None = None):
    experiment = mlflow.get_experiment_by_name("med-idefics")
    if experiment is None:
        return []
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    return [r for r in runs if name is None or r.info.run_name.split(" (seed ")[0] == name]  # "two-stage (seed 42)"


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_stage1_saves_a_peft_adapter_equal_to_the_trained_weights_and_tracks_the_run(project, monkeypatch):
    from peft import PeftModel

    import med_idefics.stages.train as train_module
    from med_idefics.modeling.loading import load_base_model

    captured = {}
    real_save = train_module._save_adapter

    def capture(model, target):
        captured.update(_lora_state(model))
        real_save(model, target)

    monkeypatch.setattr(train_module, "_save_adapter", capture)
    params = load_params("params.yaml")
    summary = train(params, TrainRequest(stage="stage1", out_dir=Path("outputs/stage1")))

    adapter = project / "outputs/stage1/adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    loaded = PeftModel.from_pretrained(load_base_model(params.model.base_dir, params.quantization), str(adapter))
    reloaded = _lora_state(loaded)
    assert captured and set(captured) == set(reloaded)
    for key, value in captured.items():
        assert torch.equal(value, reloaded[key]), key

    assert summary["optimizer_steps"] == 8  # 16 records / micro-batch 4 × 2 epochs
    assert summary["last_loss"] < summary["first_loss"]
    assert not (project / "outputs/stage1/checkpoints").exists()  # finished: nothing left to resume
    written = json.loads((project / "outputs/stage1/train_summary.json").read_text())
    assert written == summary and all(isinstance(v, int | float) for v in written.values())  # a DVC metric: numbers

    (run,) = _runs("stage1")
    info = read_run_info(project / "outputs/stage1")
    assert info == {"variant": "stage1", "stage": "stage1", "run_id": run.info.run_id, "resumed_from_checkpoint": False}
    data = load_params("params.yaml").data
    inputs = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"], i.dataset.digest)
              for i in run.inputs.dataset_inputs}  # fmt: skip
    name = data.captions.dataset
    captions = [(data.captions.train_split, "training"), (data.captions.eval_split, "validation")]
    digest = {split: file_md5(split_path(data.root, name, split)) for split, _ in captions}
    assert inputs == {(f"{name}/{split}", context, digest[split]) for split, context in captions}
    assert run.info.status == "FINISHED"
    assert run.data.params["stage1.lr"] == "0.005" and run.data.params["lora.r"] == "8"
    assert run.data.tags["profile"] == "demo" and "git_commit" in run.data.tags
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 8
    assert {"eval_loss", "learning_rate", "samples_per_second"} <= set(run.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    all_files = mlflow.artifacts.download_artifacts(run_id=run.info.run_id)
    assert not list(Path(all_files).rglob("model.safetensors"))  # adapter only, never the base weights


def test_stage2_continues_the_stage1_adapter_weights(project):
    params = load_params("params.yaml")
    train(params, TrainRequest(stage="stage1", out_dir=Path("outputs/stage1")))
    stage1 = load_file(project / "outputs/stage1/adapter/adapter_model.safetensors")

    # A vanishing learning rate: if stage 2 continued stage 1, its adapter is stage 1's; a fresh one would not be.
    still = load_params("params.yaml", ["stage2.lr=1e-12", "stage2.warmup_steps=0"])
    train(still, TrainRequest(stage="stage2", out_dir=Path("outputs/two-stage")))
    stage2 = load_file(project / "outputs/two-stage/adapter/adapter_model.safetensors")
    assert set(stage1) == set(stage2)
    for key in stage1:
        torch.testing.assert_close(stage2[key], stage1[key], atol=1e-6, rtol=0)

    (stage1_run,) = _runs("stage1")
    (stage2_run,) = _runs("two-stage")
    assert stage2_run.data.tags["stage1_run_id"] == stage1_run.info.run_id
    assert stage2_run.data.tags["init_adapter"] == "outputs/stage1/adapter"


def test_single_stage_learns_from_the_bare_base_and_validates_once_per_interval(project):
    summary = train(load_params("params.yaml"), TrainRequest(stage="single-stage", out_dir=Path("outputs/ss")))
    assert summary["last_loss"] < summary["first_loss"]
    (run,) = _runs("single-stage")
    assert run.info.status == "FINISHED" and "stage1_run_id" not in run.data.tags
    # 24 records / micro-batch 4 × 2 epochs = 12 steps, eval every 4: the Trainer's own evaluations, the last at the
    # end of training, and no second one after it (on the paper's 5,000 captions, hours of forward passes)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval_loss")
    assert [m.step for m in history] == [4, 8, 12]
    assert summary["eval_loss"] == pytest.approx(history[-1].value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage1.lr=0", "stage1.lr"),
        ("stage1.epochs=0", "stage1.epochs"),
        ("stage1.micro_batch=0", "stage1.micro_batch"),
    ],
)
def test_invalid_params_fail_before_training(project, override, message):
    with pytest.raises(ConfigError, match=message):
        load_params("params.yaml", [override])


def test_unknown_params_key_fails(project):
    with pytest.raises(ConfigError, match=r"stage1\.learning_rate"):
        load_params("params.yaml", ["stage1.learning_rate=1"])


def test_missing_dataset_fails_before_any_run(project):
    params = load_params("params.yaml", ["data.vqa.dataset=nope"])
    with pytest.raises(DatasetError, match="nope"):
        train(params, TrainRequest(stage="single-stage", out_dir=Path("outputs/x")))
    assert _runs() == []


def test_a_sweep_size_as_large_as_the_whole_caption_split_is_refused(project):
    """With data.captions.train_size null (the whole split) config validation cannot see the split's size: stage 1
    of a sweep point checks it before any run. 16 of the 16 captions would be two-stage's stage 1 again."""
    params = load_params("params.yaml")
    assert params.data.captions.train_size is None
    with pytest.raises(ConfigError, match=r"sweep\.sizes.*16.*two-stage"):
        train(params, TrainRequest(stage="stage1", out_dir=Path("outputs/stage1-n16"), train_size=16))
    assert _runs() == []


def test_stage2_without_stage1_says_to_run_stage1(project):
    with pytest.raises(AdapterError, match="stage 1 first"):
        train(load_params("params.yaml"), TrainRequest(stage="stage2", out_dir=Path("outputs/two-stage")))
    assert _runs() == []


def test_adapter_for_a_different_base_is_rejected_before_training(project, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig

    other = get_peft_model(
        AutoModelForCausalLM.from_config(
            MistralConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=99,
            )
        ),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    )
    other.save_pretrained(tmp_path / "foreign")
    with pytest.raises(AdapterError, match="different base"):
        train(
            load_params("params.yaml"),
            TrainRequest(stage="stage2", out_dir=Path("outputs/two-stage"), init_adapter=str(tmp_path / "foreign")),
        )


def test_nan_loss_stops_the_run_and_marks_it_failed(project, monkeypatch):
    from transformers import Idefics2ForConditionalGeneration

    from med_idefics.modeling.trainer_support import NonFiniteLoss

    real_forward = Idefics2ForConditionalGeneration.forward

    def nan_forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Idefics2ForConditionalGeneration, "forward", nan_forward)
    with pytest.raises(NonFiniteLoss):
        train(load_params("params.yaml"), TrainRequest(stage="single-stage", out_dir=Path("outputs/ss")))
    (run,) = _runs("single-stage")
    assert run.info.status == "FAILED" and "NonFiniteLoss" in run.data.tags["error"]
    assert not (project / "outputs/ss/adapter").exists()


def test_sigkilled_training_resumes_from_its_checkpoint(project):
    """Kill -9 mid-training, rerun the same command: it resumes and ends with the uninterrupted step count."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["single_stage"] |= {"epochs": 10.0, "save_steps": 5}  # 6 steps/epoch → 60 optimizer steps
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    command = [sys.executable, "-m", "med_idefics.cli", "train", "single-stage", "--out", "outputs/ss"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}

    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(Path("outputs/ss/checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert first.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not Path("outputs/ss/adapter").exists()
    (killed,) = _runs("single-stage")
    assert killed.info.status == "RUNNING"  # nobody could clean up after SIGKILL …

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(Path("outputs/ss/train_summary.json").read_text())
    assert read_run_info("outputs/ss")["resumed_from_checkpoint"] is True
    assert summary["optimizer_steps"] == 60
    statuses = {r.info.run_id: r.info.status for r in _runs("single-stage")}
    assert statuses[killed.info.run_id] == "KILLED"  # … so the next run marks it
    assert sorted(statuses.values()) == ["FINISHED", "KILLED"]


# --------------------------------------------------------------------------------------------------------------------
# The paper's setup on the tiny base: QLoRA, activation checkpointing, bf16 base weights, one rule for every stage


def _make_stage1_adapter(params, target: Path, seed: int = 0) -> None:
    """A stage-1 adapter without training it (stage 2 only needs its shapes and weights)."""
    from med_idefics.modeling.loading import load_base_model
    from med_idefics.modeling.lora import add_lora

    torch.manual_seed(seed)
    add_lora(load_base_model(params.model.base_dir, params.quantization), params.lora).save_pretrained(target)


@pytest.mark.parametrize(
    ("stage", "section"), [("stage1", "stage1"), ("stage2", "stage2"), ("single-stage", "single_stage")]
)
def test_every_stage_prepares_a_4bit_base_alike_and_trains_every_lora_weight(project, monkeypatch, stage, section):
    from transformers import Trainer

    from med_idefics.config import precision_label
    from med_idefics.modeling.generation import load_adapted_model

    overrides = ["quantization.load_in_4bit=true", "quantization.compute_dtype=bfloat16",
                 "model.attn_implementation=eager", f"{section}.gradient_checkpointing=true",
                 f"{section}.max_steps=2"]  # fmt: skip
    params = load_params("params.yaml", overrides)
    if stage == "stage2":
        _make_stage1_adapter(params, project / "outputs/stage1/adapter")

    seen = {}
    real_init = Trainer.__init__

    def spy(self, model=None, **kwargs):
        seen["checkpointing"] = model.base_model.model.is_activation_checkpointing
        seen["use_cache"] = (model.config.use_cache, model.config.text_config.use_cache)
        seen["attention"] = model.config._attn_implementation
        seen["dtypes"] = {n.replace(".default", ""): p.dtype for n, p in model.named_parameters() if "lora_" not in n}
        seen["lora"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        real_init(self, model=model, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", spy)
    summary = train(params, TrainRequest(stage=stage, out_dir=Path("outputs/x")))

    assert summary["optimizer_steps"] == 2
    assert seen["checkpointing"] and seen["use_cache"] == (False, False) and seen["attention"] == "eager"
    evaluation = load_adapted_model(params.model.base_dir, project / "outputs/x/adapter", params.quantization)
    evaluated = {n.replace(".default", ""): p.dtype for n, p in evaluation.named_parameters() if "lora_" not in n}
    assert seen["dtypes"] == evaluated  # one precision rule for training and evaluation
    trained = load_file(project / "outputs/x/adapter/adapter_model.safetensors")
    assert len(trained) == len(seen["lora"]) > 0
    for name, before in seen["lora"].items():
        key = name.replace(".default", "")
        assert not torch.equal(trained[key], before), f"{key} did not change: no gradient reached it"
    (run,) = _runs(read_run_info(project / "outputs/x")["variant"])
    assert run.data.params["precision"] == precision_label(params.quantization) == "4bit-nf4/bfloat16"


def test_training_arguments_set_checkpointing_cache_and_workers_explicitly(repo_params, tmp_path):
    import dataclasses

    from med_idefics.modeling.trainer_support import training_arguments

    recipe = dataclasses.replace(repo_params.stage2, gradient_checkpointing=True, dataloader_workers=3)
    args = training_arguments(recipe, tmp_path, seed=0, run_name="x")
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.use_cache is False and args.dataloader_num_workers == 3


def test_one_process_on_a_multi_gpu_machine_trains_on_one_gpu(repo_params, tmp_path, monkeypatch):
    """`dvc repro` starts one process. Seeing 4 GPUs, the Trainer would wrap the model in DataParallel: a batch of
    micro-batch x 4 per step (4x fewer steps, another recipe) while a 4-bit model, not split, sits on cuda:0."""
    import dataclasses

    from med_idefics.modeling.trainer_support import training_arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    recipe = dataclasses.replace(repo_params.stage2, precision="fp32")
    args = training_arguments(recipe, tmp_path, seed=0, run_name="two-stage")
    assert args.n_gpu == 1 and args.train_batch_size == recipe.micro_batch
    assert args.eval_batch_size == recipe.eval_batch and str(args.device) == "cuda:0"


def test_init_adapter_runs_uri_resolves_in_the_configured_store(project, tmp_path, _migrated_store_template):
    """`--init-adapter runs:/…` names a run of params mlflow.tracking_uri, not of MLflow's default store."""
    import shutil

    env_store = os.environ["MLFLOW_TRACKING_URI"]  # MLflow's default here (mlflow.set_tracking_uri changes the env)
    store = tmp_path / "configured"
    store.mkdir()
    shutil.copy(_migrated_store_template, store / "mlflow.db")
    configured = [f"mlflow.tracking_uri=sqlite:///{store}/mlflow.db", "stage1.max_steps=1", "stage2.max_steps=1"]
    train(load_params("params.yaml", configured), TrainRequest(stage="stage1", out_dir=Path("outputs/s1")))
    first = {"run_id": run_id_of("outputs/s1")}
    shutil.rmtree("outputs/s1")  # only the store has it now
    mlflow.set_tracking_uri(env_store)  # as in a new process: MLflow's default is the env store

    ref = f"runs:/{first['run_id']}/adapter"
    summary = train(
        load_params("params.yaml", configured), TrainRequest("stage2", Path("outputs/s2"), init_adapter=ref)
    )
    assert summary["optimizer_steps"] == 1
    in_store = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert {r.info.run_name for r in in_store} == {"stage1 (seed 42)", "two-stage (seed 42)"}
    mlflow.set_tracking_uri(env_store)
    assert _runs() == []  # nothing went to the env store


NO_VALIDATION = ["data.vqa.validation_fraction=0"]  # all 24 records train; the eval loss is on test


def test_answers_the_tokenizer_cannot_spell_stop_training_naming_the_words(project):
    """The tiny base's word-level tokenizer turns words it was not built on into <unk>: trained on such answers,
    the model learns to answer <unk> (40 % of real VQA-RAD's tokens on the demo base). Stop before any run."""
    from med_idefics.data.schema import read_records, write_splits

    records = read_records("data", "syn-vqa", "train")
    records[1] = records[1] | {"answer": "pneumothorax"}
    records[4] = records[4] | {"answer": "a small pneumothorax"}
    write_splits("data", "syn-vqa", {"train": records, "test": read_records("data", "syn-vqa", "test")})
    with pytest.raises(DatasetError, match=r"2 of 24 training answers.*<unk>.*'pneumothorax' \(2\).*small"):
        train(load_params("params.yaml", NO_VALIDATION), TrainRequest(stage="single-stage", out_dir=Path("outputs/ss")))
    assert _runs() == [] and not Path("outputs/ss").exists()


def test_questions_with_unknown_words_are_reported_before_training(project, caplog):
    from med_idefics.data.schema import read_records, write_splits
    from med_idefics.stages.train import prepare

    records = read_records("data", "syn-vqa", "train")
    for i in (0, 3, 6):
        records[i] = records[i] | {"question": f"{records[i]['question']} Any effusion?"}
    write_splits("data", "syn-vqa", {"train": records, "test": read_records("data", "syn-vqa", "test")})
    with caplog.at_level("WARNING"):
        prepare(
            load_params("params.yaml", NO_VALIDATION), TrainRequest(stage="single-stage", out_dir=Path("outputs/ss"))
        )
    (warning,) = [r.getMessage() for r in caplog.records if "<unk>" in r.getMessage()]
    assert "3 of 24 training records" in warning and "'any' (3)" in warning and "'effusion' (3)" in warning


@pytest.mark.parametrize("flaw", ["no image", "prompt merges with the answer"])
def test_a_bad_record_fails_before_training_starts(project, tmp_path, flaw):
    """One record the collator cannot encode, last in the split: the run fails before it starts, naming it."""
    import shutil

    from transformers import AutoProcessor

    from med_idefics.data.schema import read_records, write_splits

    params = load_params("params.yaml")
    records = read_records("data", "syn-vqa", "train")
    if flaw == "no image":
        records[-1] = records[-1] | {"image": None}
    else:  # a tokenizer that merges ": maybe" into one token, as sentencepiece merges across `Assistant: …`
        base = tmp_path / "merging-base"
        shutil.copytree(params.model.base_dir, base)
        processor = AutoProcessor.from_pretrained(base)
        processor.tokenizer.add_tokens([": maybe"])
        processor.save_pretrained(base)
        records[-1] = records[-1] | {"answer": "maybe"}
        params = load_params("params.yaml", [f"model.base_dir={base}"])
    write_splits("data", "syn-vqa", {"train": records, "test": read_records("data", "syn-vqa", "test")})

    with pytest.raises(DatasetError, match=records[-1]["id"]):
        train(params, TrainRequest(stage="single-stage", out_dir=Path("outputs/ss")))
    assert _runs() == [] and not Path("outputs/ss").exists()


def _complete_checkpoint(checkpoints: Path, step: int) -> Path:
    """A checkpoint folder as a finished save leaves it (its manifest written last, then renamed into place)."""
    from med_idefics.modeling.checkpoints import STAGING, publish

    staging = checkpoints / STAGING / f"checkpoint-{step}"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "trainer_state.json").write_text("{}")
    return publish(staging, checkpoints, step, run_id=None, keep=None)


def test_under_torchrun_only_rank_0_clears_the_checkpoints_and_writes_the_fingerprint(tmp_path, monkeypatch):
    """Every rank decides whether to resume, but only rank 0 touches the folder: another rank deleting and
    recreating it (and writing the fingerprint) at the same time races rank 0 and can destroy its checkpoint."""
    from med_idefics.modeling.checkpoints import FINGERPRINT_FILE, prepare_folder

    checkpoints = tmp_path / "checkpoints"
    _complete_checkpoint(checkpoints, 4)
    (checkpoints / FINGERPRINT_FILE).write_text('{"stage": "stage1"}')
    assert prepare_folder(checkpoints, {"stage": "stage2"}, main_process=False) is None  # stale: rank 0 clears it
    assert (checkpoints / "checkpoint-4" / "trainer_state.json").is_file()
    assert (checkpoints / FINGERPRINT_FILE).read_text() == '{"stage": "stage1"}'
    resumed = prepare_folder(checkpoints, {"stage": "stage1"}, main_process=False)  # what rank 0 resumes, every rank
    assert resumed is not None and resumed.step == 4 and resumed.path == checkpoints / "checkpoint-4"
    assert prepare_folder(checkpoints, {"stage": "stage2"}, main_process=True) is None
    assert not (checkpoints / "checkpoint-4").exists()
    assert json.loads((checkpoints / FINGERPRINT_FILE).read_text()) == {"stage": "stage2"}


def test_a_checkpoint_is_resumed_only_with_the_same_data_base_and_init_adapter(project, tmp_path):
    """The fingerprint covers what the run reads, not only params and paths."""
    import shutil

    from med_idefics.data.schema import read_records, write_splits
    from med_idefics.modeling.checkpoints import prepare_folder
    from med_idefics.stages.train import _fingerprint, prepare

    params = load_params("params.yaml")
    _make_stage1_adapter(params, project / "outputs/stage1/adapter")
    checkpoints = project / "outputs/two-stage/checkpoints"

    def resumable() -> bool:
        request = TrainRequest(stage="stage2", out_dir=Path("outputs/two-stage"))
        resumed = prepare_folder(checkpoints, _fingerprint(params, request, prepare(params, request))) is not None
        if not (checkpoints / "checkpoint-4").exists():
            _complete_checkpoint(checkpoints, 4)
        return resumed

    assert resumable() is False  # nothing to resume yet
    assert resumable() is True  # the same everything: resume

    # Same records count and paths, other answers (regenerated data)
    train_split = read_records("data", "syn-vqa", "train")
    write_splits("data", "syn-vqa", {"train": [r | {"answer": "no"} for r in train_split],
                                     "test": read_records("data", "syn-vqa", "test")})  # fmt: skip
    assert resumable() is False
    assert resumable() is True

    # Another stage-1 adapter at the same path
    _make_stage1_adapter(params, project / "outputs/stage1/adapter", seed=1)
    assert resumable() is False

    # The base rebuilt in place
    base = tmp_path / "base-copy"
    shutil.copytree(params.model.base_dir, base)
    params = load_params("params.yaml", [f"model.base_dir={base}"])
    assert resumable() is False
    assert resumable() is True
    with (base / "model.safetensors").open("ab") as weights:
        weights.write(b" ")  # other weights, same path
    assert resumable() is False


def test_a_stage_that_would_not_fit_the_gpu_runs_split_with_the_same_steps(project, monkeypatch):
    """memory.fit: the peak predicted from the repository's gpu_check.json (its memory per token) and the longest
    training sequence exceeds the card (here a pretended 1 GiB GPU): the stage trains at half the micro-batch and twice
    the accumulation, so the optimizer steps (and examples per step) are the same, and the run records it."""
    import json

    import med_idefics.modeling.measurements as measurements
    from med_idefics.modeling import trainer_support

    recipes = []
    original = trainer_support.training_arguments
    monkeypatch.setattr(
        trainer_support, "training_arguments", lambda r, *a, **k: recipes.append(r) or original(r, *a, **k)
    )
    monkeypatch.setattr(measurements, "gpu_memory_gib", lambda: 1.0)
    results = project / "benchmarks" / "results"
    results.mkdir(parents=True)
    row = {
        "quantization": "float32",
        "gradient_checkpointing": False,
        "compiled": False,
        "cache": False,
        "fixed_gib": 0.2,
        "gib_per_sample": 0.0,
        "gib_per_token": 0.002,
    }  # 4 x 0.002 x ~25 tokens: too much
    (results / "gpu_check.json").write_text(json.dumps({"device": {"name": "test", "total_gib": 1.0}, "memory": [row]}))
    params = load_params("params.yaml", ["memory.fit=true", "memory.headroom_gib=0.5"])
    fitted = train(params, TrainRequest(stage="stage1", out_dir=Path("outputs/fitted")))
    assert [(r.micro_batch, r.grad_accum) for r in recipes] == [(2, 2)]  # 0.2 + 2 x 0.002 x tokens fits 0.5
    (run,) = _runs("stage1")
    assert run.data.params["memory.fitted"].startswith("stage1: predicted peak")

    monkeypatch.setattr(measurements, "gpu_memory_gib", lambda: None)  # a CPU: params as they are
    plain = train(load_params("params.yaml"), TrainRequest(stage="stage1", out_dir=Path("outputs/plain")))
    assert recipes[-1].micro_batch == 4 and fitted["optimizer_steps"] == plain["optimizer_steps"]
